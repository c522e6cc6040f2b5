"""Find the server that serves a model: for apps, batch jobs and `inference_pipeline`.

from deployments.lookup import find_service
service = find_service("customer-satisfaction")
service.predict(frame)        # or POST to service.prediction_url
"""

from __future__ import annotations

from prefect.blocks.core import Block

from blocks.deployer import BaseModelDeployer
from blocks.mlflow_deployer import MLflowModelDeployer
from blocks.service import ServiceRecord
from ctcd.exceptions import DeployerNotFoundError, ServiceNotFoundError

DEFAULT_PIPELINE = "continuous-deployment-pipeline"
DEFAULT_STEP = "deploy_model"


def load_deployer(name: str | None = None) -> BaseModelDeployer:
    """The saved deployer block `name` ("block-type-slug/name" or a plain MLflow deployer
    name); None gives the local MLflow deployer with defaults."""
    if name is None:
        return MLflowModelDeployer()
    try:
        block = Block.load(name) if "/" in name else MLflowModelDeployer.load(name)
    except ValueError as err:
        raise DeployerNotFoundError(name) from err
    if not isinstance(block, BaseModelDeployer):
        raise DeployerNotFoundError(name)
    return block


def find_service(
    model_name: str,
    pipeline_name: str | None = None,
    step_name: str | None = None,
    deployer: str | BaseModelDeployer | None = None,
    running: bool = True,
) -> ServiceRecord:
    """The newest server for `model_name` (narrowed by pipeline and step when given)."""
    found = _deployer(deployer).find_model_server(
        pipeline_name=pipeline_name, step_name=step_name, model_name=model_name, running=running
    )
    if not found:
        state = "running " if running else ""
        raise ServiceNotFoundError(f"{state}model '{model_name}'")
    return found[0]


def _deployer(deployer: str | BaseModelDeployer | None) -> BaseModelDeployer:
    return deployer if isinstance(deployer, BaseModelDeployer) else load_deployer(deployer)
