"""ctcd's Prefect block types and the service records they manage."""

from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.kserve_deployer import KServeModelDeployer
from blocks.mlflow_deployer import MLflowModelDeployer
from blocks.object_store import ObjectStoreCredentials, ObjectStoreKeys
from blocks.seldon_deployer import SeldonModelDeployer
from blocks.service import ServiceRecord, ServiceState
from blocks.tracking import MLflowTracking
from blocks.vault import VaultCredentials, VaultSecret

__all__ = [
    "BaseModelDeployer",
    "DeploymentConfig",
    "KServeModelDeployer",
    "MLflowModelDeployer",
    "MLflowTracking",
    "ObjectStoreCredentials",
    "ObjectStoreKeys",
    "SeldonModelDeployer",
    "ServiceRecord",
    "ServiceState",
    "VaultCredentials",
    "VaultSecret",
]
