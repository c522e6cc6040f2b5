"""Find the server that serves a model: for apps, batch jobs and `inference_pipeline`.

from deployments.lookup import find_service
service = find_service("customer-satisfaction")
service.predict(frame)        # or POST to service.prediction_url

`load_deployer` and `find_service` live in `blocks/lookup.py` (flows use them from there) and are
re-exported here; `find_service_for_latest_run` asks Prefect's API, so it stays here.
"""

from __future__ import annotations

from blocks.deployer import BaseModelDeployer
from blocks.lookup import as_deployer, find_service, load_deployer
from blocks.service import ServiceRecord
from ctcd.exceptions import ModelConfigError, ServiceNotFoundError
from ctcd.names import DEFAULT_PIPELINE, DEFAULT_STEP

__all__ = [
    "DEFAULT_PIPELINE",
    "DEFAULT_STEP",
    "find_service",
    "find_service_for_latest_run",
    "load_deployer",
]


def find_service_for_latest_run(
    deployment: str | None = None,
    flow_name: str | None = None,
    deployer: str | BaseModelDeployer | None = None,
) -> ServiceRecord:
    """The server deployed by the latest completed run of a Prefect deployment
    ("flow-name/deployment-name") or flow that deployed one, asked of Prefect's API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    if (deployment is None) == (flow_name is None):
        raise ModelConfigError("Pass exactly one of `deployment` or `flow_name`.")
    by_run = {r.flow_run_id: r for r in as_deployer(deployer).find_model_server() if r.flow_run_id}
    completed = filters.FlowRunFilter(
        state=filters.FlowRunFilterState(
            type=filters.FlowRunFilterStateType(any_=[StateType.COMPLETED])
        )
    )
    with get_client(sync_client=True) as client:
        if deployment is not None:
            found = client.read_deployment_by_name(deployment)
            scope: dict[str, object] = {
                "deployment_filter": filters.DeploymentFilter(
                    id=filters.DeploymentFilterId(any_=[found.id])
                )
            }
        else:
            scope = {
                "flow_filter": filters.FlowFilter(
                    name=filters.FlowFilterName(any_=[str(flow_name)])
                )
            }
        runs = client.read_flow_runs(
            flow_run_filter=completed,
            sort=FlowRunSort.END_TIME_DESC,
            limit=200,
            **scope,  # type: ignore[arg-type]
        )
    for run in runs:
        if str(run.id) in by_run:
            return by_run[str(run.id)]
    what = f"deployment '{deployment}'" if deployment else f"flow '{flow_name}'"
    raise ServiceNotFoundError(f"a completed run of {what} that deployed a model")
