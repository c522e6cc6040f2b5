"""ctcd's Prefect block types and the service records they manage."""

from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.mlflow_deployer import MLflowModelDeployer
from blocks.service import ServiceRecord, ServiceState

__all__ = [
    "BaseModelDeployer",
    "DeploymentConfig",
    "MLflowModelDeployer",
    "ServiceRecord",
    "ServiceState",
]
