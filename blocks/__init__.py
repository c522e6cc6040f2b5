"""ctcd's Prefect block types and the service records they manage."""

from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.mlflow_deployer import MLflowModelDeployer
from blocks.service import ServiceRecord, ServiceState
from blocks.vault import VaultCredentials, VaultSecret

__all__ = [
    "BaseModelDeployer",
    "DeploymentConfig",
    "MLflowModelDeployer",
    "ServiceRecord",
    "ServiceState",
    "VaultCredentials",
    "VaultSecret",
]
