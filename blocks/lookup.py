"""Loading a deployer and finding the server that serves a model: the deployers' own business,
so flows, the CLI and the app use it from here (`deployments.lookup` re-exports it for users).

Every deployer type is registered (so `Block.load("slug/name")` finds it) by `blocks/__init__.py`,
which Python runs before this module.
"""

from __future__ import annotations

from prefect.blocks.core import Block

from blocks.deployer import BaseModelDeployer
from blocks.mlflow_deployer import MLflowModelDeployer
from blocks.service import ServiceRecord
from blocks.ui import invalid_saved_block
from ctcd.exceptions import DeployerNotFoundError, ModelConfigError, ServiceNotFoundError


def load_deployer(name: str | None = None) -> BaseModelDeployer:
    """The saved deployer block `name` ("block-type-slug/name", e.g.
    `seldon-model-deployer/prod` or `kserve-model-deployer/prod`, or a plain MLflow deployer
    name); None gives the local MLflow deployer with defaults."""
    if name is None:
        return MLflowModelDeployer()
    try:
        block = Block.load(name) if "/" in name else MLflowModelDeployer.load(name)
    except RuntimeError as err:
        if (why := invalid_saved_block(err, "deployer block", name)) is None:
            raise
        raise ModelConfigError(why) from err
    except ValueError as err:
        raise DeployerNotFoundError(name) from err
    if not isinstance(block, BaseModelDeployer):
        raise DeployerNotFoundError(name)
    return block


def as_deployer(deployer: str | BaseModelDeployer | None) -> BaseModelDeployer:
    """A deployer instance as is; a name (or None) loaded with `load_deployer`."""
    return deployer if isinstance(deployer, BaseModelDeployer) else load_deployer(deployer)


def find_service(
    model_name: str,
    pipeline_name: str | None = None,
    step_name: str | None = None,
    deployer: str | BaseModelDeployer | None = None,
    running: bool = True,
) -> ServiceRecord:
    """The newest server for `model_name` (narrowed by pipeline and step when given)."""
    found = as_deployer(deployer).find_model_server(
        pipeline_name=pipeline_name, step_name=step_name, model_name=model_name, running=running
    )
    if not found:
        state = "running " if running else ""
        raise ServiceNotFoundError(f"{state}model '{model_name}'")
    return found[0]
