"""`continuous_deployment_pipeline`: train, gate, and only if the gate passes, deploy."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from blocks.deployer import DeploymentConfig
from blocks.lookup import load_deployer
from blocks.service import ServiceRecord
from blocks.tracking import use_tracking
from ctcd.exceptions import DataError, ModelConfigError
from ctcd.names import (
    CHALLENGER,
    DATA_SHA_TAG,
    DATA_SOURCE_TAG,
    DEFAULT_PIPELINE,
    DEFAULT_STEP,
    FLOW_RUN_TAG,
    GATE_TAG,
    ROLLOUT_TAG,
)
from ctcd.rollout import OpenRollout, RolloutPolicy, policy
from ctcd.seams import pause_point
from ctcd.settings import ctcd_home
from flows import ctcd_flow
from flows.champion import gating, record_deployed
from flows.data import CleanData, Contract, Dataset, clean_data, ingest_data
from flows.gate import (
    ChampionScore,
    DeploymentCriteria,
    GateDecision,
    deployment_trigger,
    evaluate_champion,
)
from flows.model import ModelType, RegisteredModel
from flows.report import RunFacts, publish_report
from flows.results import DeploymentResult
from flows.training import train_and_register


@task(cache_policy=NO_CACHE)
def deploy_model(
    registered: RegisteredModel,
    deployer: str | None = None,
    pipeline_name: str = DEFAULT_PIPELINE,
    step_name: str = DEFAULT_STEP,
    timeout: float | None = None,
    rollout: RolloutPolicy | None = None,
) -> ServiceRecord:
    """Serve the version: update the server of this pipeline, step and model in place
    (same uuid and URL), or start one. Returns once the new version answers. With a canary
    or shadow `rollout` (else the deployer block's), a running server opens a rollout of the
    version beside the one it serves; a candidate of an earlier rollout still open is
    replaced, and tagged so."""
    config = DeploymentConfig(
        model_name=registered.model_name,
        model_version=registered.model_version,
        model_uri=registered.model_uri,
        pipeline_name=pipeline_name,
        step_name=step_name,
        run_id=registered.run_id,
        flow_run_id=flow_run.get_id(),
    )
    chosen = load_deployer(deployer)
    before = chosen.find_model_server(
        pipeline_name=pipeline_name, step_name=step_name, model_name=registered.model_name
    )
    record = chosen.deploy_model(config, replace=True, timeout=timeout, rollout=rollout)
    if (
        before
        and before[0].rollout
        and before[0].rollout.candidate_version
        != (record.rollout.candidate_version if record.rollout else None)
    ):
        _replaced(registered.model_name, before[0].rollout, registered.model_version)
    differ = chosen.settings_differ(record)
    for line in differ:
        get_run_logger().warning("The server does not run with the deployer's setting: %s", line)
    return record.seen(settings_differ=differ)


def _replaced(model_name: str, rollout: OpenRollout, version: str) -> None:
    """Tag the candidate of a rollout a newer deploy closed before it was decided."""
    import mlflow

    why = f"replaced: v{version} was deployed before this {rollout.mode} was decided"
    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient()
        client.set_model_version_tag(model_name, rollout.candidate_version, ROLLOUT_TAG, why)


def _record_gate(model_name: str, version: str, alias: str, decision: str) -> None:
    """Give the version its alias and keep the gate's decision on it (the app shows it)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, GATE_TAG, decision)


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
    tracking: str | None = None,
    rollout: RolloutPolicy | None = None,
) -> DeploymentResult:
    """Train and register a model, gate it, and deploy it only if the gate passes.

    Args:
        data_path: a local CSV or Parquet file; None uses the generated sample table.
        target: the numeric column to predict; features are the other numeric columns.
        model_type: `linear`, `random_forest` or `gradient_boosting`.
        model_name: the MLflow registered model.
        criteria: metric, threshold and must_beat_champion (default: r2 >= 0 and at least
            as good as the champion). Honoured on the first deploy too.
        deployer: name of a saved deployer block (`seldon-model-deployer/NAME`, or a plain
            MLflow deployer name); None is the local MLflow deployer with defaults.
        model_params: overrides of the estimator's hyperparameters.
        experiment_name: the MLflow experiment (default: the tracking block's, else the
            model name).
        contract: `auto` (the customer-satisfaction contract when target is `review_score`),
            `generic` or `customer_satisfaction`.
        tracking: name of a saved `MLflowTracking` block (server, registry, credentials,
            possibly from Vault); None uses MLFLOW_TRACKING_URI or local SQLite.
        rollout: how a version that passes takes traffic: `mode` `replace` (all at once),
            `canary` (`traffic_percent` of requests) or `shadow` (a copy of `shadow_percent`
            of requests, answers only logged); None: the deployer block's. A canary or shadow
            stays open until `rollout-analysis` (or `ctcd models rollout`) decides.
    """
    with use_tracking(tracking):
        trained = train_and_register(
            data_path, target, model_type, model_name, model_params, experiment_name, contract
        )
        return gate_and_deploy(
            trained.registered, trained.metrics, trained.data, trained.dataset, criteria,
            deployer, rollout,
        )  # fmt: skip


def _deploy_or_record(
    reg: RegisteredModel, deployer: str | None, reason: str, rollout: RolloutPolicy | None
) -> ServiceRecord:
    """Deploy; if the deploy fails, keep that as the version's decision, then raise."""
    import mlflow

    try:
        return deploy_model(reg, deployer, rollout=rollout)
    except Exception as err:
        decision = f"passed, but its deploy failed ({type(err).__name__}): {reason}"
        with contextlib.suppress(Exception):  # MLflow down too: the next run says `interrupted`
            mlflow.MlflowClient().set_model_version_tag(
                reg.model_name, reg.model_version, GATE_TAG, decision[:4000]
            )
        raise


def _decide_and_act(
    reg: RegisteredModel,
    metrics: dict[str, float],
    data: CleanData,
    criteria: DeploymentCriteria,
    deployer: str | None,
    rollout: RolloutPolicy | None,
) -> tuple[ChampionScore | None, GateDecision, str, ServiceRecord | None]:
    """Compare with the champion, decide, and deploy (champion) or not (challenger).
    Returns the champion's score, the decision, the verdict recorded, and the server."""
    champion = evaluate_champion(reg.model_name, data)
    decision = deployment_trigger(metrics, criteria, champion)
    pause_point("gate-decided", ctcd_home())
    print(f"Gate for {reg.model_name} v{reg.model_version}: {decision.reason}")
    if not decision.passed:
        verdict = "refused: " + decision.reason
        _record_gate(reg.model_name, reg.model_version, CHALLENGER, verdict)
        running = load_deployer(deployer).find_model_server(
            pipeline_name=DEFAULT_PIPELINE, step_name=DEFAULT_STEP, model_name=reg.model_name
        )
        return champion, decision, verdict, running[0] if running else None
    service = _deploy_or_record(reg, deployer, decision.reason, rollout)
    pause_point("deployed", ctcd_home())
    passed, verdict = record_deployed(
        reg.model_name, reg.model_version, decision.reason, deployer, service.rollout
    )
    return champion, GateDecision(passed, verdict.split(": ", 1)[1]), verdict, service


def gate_and_deploy(
    reg: RegisteredModel,
    metrics: dict[str, float],
    data: CleanData,
    dataset: Dataset,
    criteria: DeploymentCriteria | dict[str, Any] | None,
    deployer: str | None,
    rollout: RolloutPolicy | dict[str, Any] | str | None = None,
) -> DeploymentResult:
    """Gate a registered version on its held-out rows; deploy it and make it champion if it
    passes (with a canary or shadow `rollout`: challenger, on trial beside the champion),
    else mark it challenger. Publishes the run's report."""
    criteria = DeploymentCriteria.model_validate(criteria or {})
    with gating(reg.model_name, reg.model_version, deployer):
        champion, decision, verdict, service = _decide_and_act(
            reg, metrics, data, criteria, deployer, policy(rollout)
        )
    publish_report(
        RunFacts(reg, metrics, dataset.source, dataset.sha256, len(data.x_test)),
        verdict,
        champion,
        service,
    )
    return DeploymentResult(
        metrics=metrics,
        model_name=reg.model_name,
        model_version=reg.model_version,
        model_uri=reg.model_uri,
        run_id=reg.run_id,
        data_source=dataset.source,
        data_sha256=dataset.sha256,
        deployed=decision.passed,
        reason=decision.reason,
        service=service,
    )


@task(cache_policy=NO_CACHE)
def find_registered_version(
    model_name: str, model_version: str | None, training_flow_run_id: str | None
) -> tuple[RegisteredModel, dict[str, float], dict[str, str]]:
    """The version to deploy: given, or the one a training flow run registered."""
    import mlflow

    from ctcd.settings import configure_mlflow

    experiment_id = configure_mlflow(model_name)
    client = mlflow.MlflowClient()
    if model_version is None:
        model_version = _version_from_flow_run(client, model_name, training_flow_run_id)
    version = client.get_model_version(model_name, model_version)
    run = mlflow.get_run(str(version.run_id))
    reg = RegisteredModel(
        model_name,
        str(version.version),
        f"models:/{model_name}/{version.version}",
        run.info.run_id,
        run.info.experiment_id or experiment_id,
    )
    return reg, dict(run.data.metrics), dict(run.data.tags)


def _version_from_flow_run(client: Any, model_name: str, flow_run_id: str | None) -> str:
    import mlflow

    if flow_run_id is None:
        raise ModelConfigError("Pass model_version or training_flow_run_id.")
    flow_run_id = flow_run_id.removeprefix("prefect.flow-run.")  # as an event's resource id
    runs = mlflow.search_runs(
        filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
        search_all_experiments=True,
        output_format="list",
    )
    for run in runs:
        for version in client.search_model_versions(f"run_id='{run.info.run_id}'"):
            if version.name == model_name:
                return str(version.version)
    raise ModelConfigError(
        f"No version of {model_name} was registered by Prefect flow run {flow_run_id}. "
        "Did that run fail before registering, or train another model_name?"
    )


@ctcd_flow(name="deploy-model-version", log_prints=True)
def deploy_model_version(
    model_name: str = "customer-satisfaction",
    model_version: str | None = None,
    training_flow_run_id: str | None = None,
    target: str = "review_score",
    criteria: DeploymentCriteria | None = None,
    deployer: str | None = None,
    tracking: str | None = None,
    rollout: RolloutPolicy | None = None,
) -> DeploymentResult:
    """Gate and deploy a version that is already registered: the given one, or the one the
    training flow run `training_flow_run_id` registered (what the continuous-deployment
    trigger passes). It re-reads the exact table the version was trained on (its SHA-256
    must match) so the champion is compared on the same held-out rows.

    Args:
        model_name: the MLflow registered model.
        model_version: the registered version to gate and deploy (e.g. `7`); None: the one
            the run `training_flow_run_id` registered.
        training_flow_run_id: the continuous-training flow run whose version to deploy (the
            trigger fills it in); used when `model_version` is None.
        target: the numeric column the model predicts (to rebuild the held-out rows).
        criteria: metric, threshold and must_beat_champion (default: r2 >= 0 and at least
            as good as the champion).
        deployer: name of a saved deployer block (`seldon-model-deployer/NAME`, or a plain
            MLflow deployer name); None is the local MLflow deployer with defaults.
        tracking: name of a saved `MLflowTracking` block (server, registry, credentials,
            possibly from Vault); None uses MLFLOW_TRACKING_URI or local SQLite.
        rollout: how a version that passes takes traffic: `mode` `replace`, `canary`
            (`traffic_percent` of requests) or `shadow` (a copy of `shadow_percent` of
            requests); None: the deployer block's.
    """
    with use_tracking(tracking):
        reg, metrics, tags = find_registered_version(
            model_name, model_version, training_flow_run_id
        )
        dataset = ingest_data(tags[DATA_SOURCE_TAG])
        if dataset.sha256 != tags[DATA_SHA_TAG]:
            raise DataError(
                f"'{dataset.source}' changed since {model_name} v{reg.model_version} was "
                "trained on it (its SHA-256 differs), so its held-out rows cannot be rebuilt. "
                "Retrain instead."
            )
        data = clean_data(dataset, target)
        return gate_and_deploy(reg, metrics, data, dataset, criteria, deployer, rollout)
