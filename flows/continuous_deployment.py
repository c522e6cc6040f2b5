"""`continuous_deployment_pipeline`: train, gate, and only if the gate passes, deploy."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from blocks.deployer import DeploymentConfig
from blocks.service import ServiceRecord
from deployments.lookup import DEFAULT_PIPELINE, DEFAULT_STEP, load_deployer
from flows import ctcd_flow
from flows.data import Contract
from flows.gate import DeploymentCriteria, deployment_trigger, evaluate_champion
from flows.model import ModelType, RegisteredModel
from flows.report import publish_report
from flows.results import DeploymentResult
from flows.training import train_and_register


@task(cache_policy=NO_CACHE)
def deploy_model(
    registered: RegisteredModel,
    deployer: str | None = None,
    pipeline_name: str = DEFAULT_PIPELINE,
    step_name: str = DEFAULT_STEP,
    timeout: float | None = None,
) -> ServiceRecord:
    """Serve the version: update the server of this pipeline, step and model in place
    (same uuid and URL), or start one. Returns once the new version answers."""
    config = DeploymentConfig(
        model_name=registered.model_name,
        model_version=registered.model_version,
        model_uri=registered.model_uri,
        pipeline_name=pipeline_name,
        step_name=step_name,
        run_id=registered.run_id,
        flow_run_id=flow_run.get_id(),
    )
    return load_deployer(deployer).deploy_model(config, replace=True, timeout=timeout)


def _set_alias(model_name: str, alias: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(model_name, alias, version)


@ctcd_flow(name="continuous-deployment-pipeline", log_prints=True)
def continuous_deployment_pipeline(
    data_path: str | None = None,
    target: str = "review_score",
    model_type: ModelType = "random_forest",
    model_name: str = "customer-satisfaction",
    criteria: DeploymentCriteria | None = None,
    deployer: str | None = None,
    model_params: dict[str, Any] | None = None,
    experiment_name: str | None = None,
    contract: Contract = "auto",
) -> DeploymentResult:
    """Train and register a model, gate it, and deploy it only if the gate passes.

    Args:
        criteria: metric, threshold and must_beat_champion (default: r2 >= 0 and at least
            as good as the champion). Honoured on the first deploy too.
        deployer: name of a saved deployer block; None is the local MLflow deployer.
        Others: as in `training_pipeline`.
    """
    criteria = DeploymentCriteria.model_validate(criteria or {})
    trained = train_and_register(
        data_path, target, model_type, model_name, model_params, experiment_name, contract
    )
    reg = trained.registered
    champion = evaluate_champion(model_name, trained.data)
    decision = deployment_trigger(trained.metrics, criteria, champion)
    print(f"Gate for {model_name} v{reg.model_version}: {decision.reason}")
    service: ServiceRecord | None
    if decision.passed:
        service = deploy_model(reg, deployer)
        _set_alias(model_name, "champion", reg.model_version)
    else:
        _set_alias(model_name, "challenger", reg.model_version)
        running = load_deployer(deployer).find_model_server(
            pipeline_name=DEFAULT_PIPELINE, step_name=DEFAULT_STEP, model_name=model_name
        )
        service = running[0] if running else None
    publish_report(
        reg.model_name, reg.model_version, trained.metrics, reg.run_id, reg.experiment_id,
        trained.dataset.source, trained.dataset.sha256,
        ("deployed: " if decision.passed else "refused: ") + decision.reason,
        service.prediction_url if service else None,
    )  # fmt: skip
    return DeploymentResult(
        **trained.result_fields(), deployed=decision.passed, reason=decision.reason, service=service
    )
