"""`rollout_analysis`: decide an open rollout on live evidence, and act on the decision.

The deployment in `prefect.yaml` runs it every few minutes (and on demand). With no rollout
open it says so and ends. Otherwise it gathers the evidence (`flows.rollout_evidence`) and:

- `promote`: the candidate takes every request (`promote_rollout`), becomes `champion`, the
  old champion stays in the server's history for `ctcd models rollback`;
- `rollback`: the candidate is removed (`abort_rollout`), keeps `challenger`;
- `wait`: nothing changes.

Each decision is tagged on the candidate (`ctcd.rollout`) and emitted as a Prefect event
(`ctcd.rollout.promoted` / `ctcd.rollout.rolled_back`, resource `ctcd.model.<name>`). A server
without a prediction log (Seldon, KServe) has no live evidence here: the flow says so and waits;
decide there with `ctcd models rollout promote|abort`.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel

from blocks.deployer import BaseModelDeployer
from blocks.lookup import as_deployer
from blocks.service import ServiceRecord
from blocks.tracking import use_tracking
from ctcd.names import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_PIPELINE,
    DEFAULT_STEP,
    ROLLOUT_PROMOTED,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_TAG,
    model_resource,
)
from ctcd.rollout import OpenRollout
from flows import ctcd_flow
from flows.data import read_table
from flows.drift import parse_window
from flows.rollout_evidence import Criteria, Decision, Evidence, decide, gather


class RolloutReport(BaseModel):
    model_name: str
    server: str | None = None
    rollout: OpenRollout | None = None
    decision: Decision | None = None  # None: no rollout was open
    reason: str
    evidence: Evidence | None = None
    acted: bool = False


def evidence_of(
    service: ServiceRecord, outcomes_path: str | None = None, target: str = "review_score"
) -> Evidence | None:
    """The live evidence on `service`'s open rollout; None where the server keeps no log."""
    from ctcd.serving.logstats import worker_stats
    from ctcd.serving.predlog import read_log

    rollout = service.rollout
    if rollout is None or service.prediction_log_dir is None:
        return None
    runtime = service.local.runtime_dir
    since = datetime.fromtimestamp(rollout.since, UTC)
    outcomes = read_table(Path(outcomes_path).expanduser()) if outcomes_path else None
    log = read_log(runtime, since=since)
    return gather(rollout, log, worker_stats(runtime), outcomes, target)


def act(
    deployer: BaseModelDeployer,
    service: ServiceRecord,
    decision: Decision,
    reason: str,
    evidence: Evidence | None,
) -> ServiceRecord:
    """Carry out `promote` or `rollback` on the server, the registry and Prefect's events."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ctcd.settings import tracking_uri

    rollout = service.rollout
    assert rollout is not None
    client = mlflow.MlflowClient(tracking_uri())  # also from the CLI, which sets no default
    name, candidate = service.model_name, rollout.candidate_version
    payload: dict[str, Any] = {
        "server": service.uuid, "mode": rollout.mode, "percent": rollout.percent,
        "champion_version": rollout.champion_version, "candidate_version": candidate,
        "reason": reason, "evidence": evidence.model_dump() if evidence else None,
    }  # fmt: skip
    if decision == "promote":
        done = deployer.promote_rollout(service.uuid)
        client.set_registered_model_alias(name, CHAMPION, candidate)
        with contextlib.suppress(MlflowException):  # no challenger alias
            if str(client.get_model_version_by_alias(name, CHALLENGER).version) == candidate:
                client.delete_registered_model_alias(name, CHALLENGER)
        tag, event = f"promoted: {reason}", ROLLOUT_PROMOTED
    else:
        done = deployer.abort_rollout(service.uuid)
        client.set_registered_model_alias(name, CHALLENGER, candidate)
        tag, event = f"rolled back: {reason}", ROLLOUT_ROLLED_BACK
    client.set_model_version_tag(name, candidate, ROLLOUT_TAG, tag[:4000])
    emit_event(event=event, resource=model_resource(name), payload=payload)
    return done


def preview(
    service: ServiceRecord, outcomes_path: str | None = None, target: str = "review_score",
    criteria: Criteria | None = None,
) -> tuple[Decision, str, Evidence | None]:  # fmt: skip
    """What `rollout_analysis` would decide now (nothing is changed)."""
    return analyse.fn(service, outcomes_path, target, criteria or Criteria())


NAME = "rollout-analysis"  # the flow's and its deployment's name


def next_check(model_name: str) -> str:
    """When the `rollout-analysis` deployment next runs, as far as Prefect says."""
    import anyio
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ctcd import local_api

    url = PREFECT_API_URL.value()
    if not url:  # the local server ctcd started, if it runs
        local = local_api.recorded() if local_api.enabled() else None
        if local is None:
            return "unknown: no PREFECT_API_URL (the deployments run on a Prefect server)"
        url = local.api_url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    async def ask() -> str:
        with anyio.fail_after(10):
            async with get_client() as client:
                runs = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[NAME])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )), sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
                )  # fmt: skip
        if not runs or runs[0].expected_start_time is None:
            return "no scheduled run of the rollout-analysis deployment (`make deploy` wires it)"
        return f"{runs[0].expected_start_time:%Y-%m-%d %H:%M:%S %Z} (rollout-analysis)"

    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return anyio.run(ask)
    except Exception as err:
        return f"unknown: Prefect's API did not answer ({type(err).__name__})"


@task(cache_policy=NO_CACHE)
def analyse(
    service: ServiceRecord, outcomes_path: str | None, target: str, criteria: Criteria
) -> tuple[Decision, str, Evidence | None]:
    rollout = service.rollout
    assert rollout is not None
    evidence = evidence_of(service, outcomes_path, target)
    if evidence is None:
        return "wait", (
            f"no live evidence: server {service.uuid[:8]} ({service.backend}) keeps no "
            "prediction log here; decide with `ctcd models rollout promote|abort "
            f"{service.uuid[:8]}` (or a Prefect automation on your own event)"
        ), None  # fmt: skip
    decision, reason = decide(rollout, evidence, criteria, outcomes_path is not None)
    return decision, reason, evidence


@ctcd_flow(name=NAME, log_prints=True)
def rollout_analysis(
    model_name: str = "customer-satisfaction",
    outcomes_path: str | None = None,
    target: str = "review_score",
    min_requests: int = 200,
    min_outcomes: int = 100,
    max_duration: str = "2h",
    max_failure_rate: float = 0.01,
    max_latency_ratio: float = 2.0,
    max_output_shift: float = 0.5,
    alpha: float = 0.05,
    act_on_decision: bool = True,
    decision: Decision | None = None,
    deployer: str | None = None,
    tracking: str | None = None,
) -> RolloutReport:
    """Compare an open rollout's candidate with the champion on live evidence and promote it,
    roll it back, or wait (see `flows.rollout_evidence` for how each is decided).

    Args:
        model_name: the registered model whose server's rollout to decide.
        outcomes_path: a table (CSV or Parquet) of labels with `request_id` (and `row`) and
            `target`; None decides on the guardrails alone (failures, latency, outputs).
        target: the label column of `outcomes_path`.
        min_requests: candidate answers needed before anything but a failure decides.
        min_outcomes: labelled rows per model needed when `outcomes_path` is given.
        max_duration: how long a rollout may wait for enough evidence (e.g. `2h`); then it
            is rolled back.
        max_failure_rate: the candidate's failure rate allowed above the champion's (0.01: 1
            point).
        max_latency_ratio: the candidate's p99 latency allowed, as a multiple of the champion's.
        max_output_shift: the largest Kolmogorov-Smirnov statistic allowed between the two
            models' predictions.
        alpha: the significance level at which a worse live error rolls the candidate back.
        act_on_decision: False only reports what it would decide.
        decision: `promote` or `rollback` decided elsewhere (your own monitoring, e.g. an
            automation on your event runs this deployment with it): carried out as is, with
            the evidence there is recorded beside it. Where a server keeps no prediction log
            (Seldon, KServe) this is how a rollout is decided without a person.
        deployer: name of a saved deployer block; None: the local MLflow servers.
        tracking: name of a saved `MLflowTracking` block; None uses MLFLOW_TRACKING_URI or
            local SQLite.
    """
    criteria = Criteria(
        min_requests=min_requests, min_outcomes=min_outcomes,
        max_duration_s=parse_window(max_duration).total_seconds(),
        max_failure_rate=max_failure_rate, max_latency_ratio=max_latency_ratio,
        max_output_shift=max_output_shift, alpha=alpha,
    )  # fmt: skip
    chosen = as_deployer(deployer)
    found = chosen.find_model_server(
        pipeline_name=DEFAULT_PIPELINE, step_name=DEFAULT_STEP, model_name=model_name
    ) or chosen.find_model_server(model_name=model_name)
    if not found:
        print(f"{model_name}: no model server, so no rollout")
        return RolloutReport(model_name=model_name, reason="no model server")
    service = found[0]
    if service.rollout is None:
        print(f"{model_name}: no rollout is open on server {service.uuid[:8]}")
        return RolloutReport(model_name=model_name, server=service.uuid, reason="no open rollout")
    if decision is not None:
        reason = f"decided outside ctcd (the run's `decision` parameter: {decision})"
        evidence = evidence_of(service, outcomes_path, target)
    else:
        decision, reason, evidence = analyse(service, outcomes_path, target, criteria)
    print(f"{model_name} {service.rollout.describe()}: {decision}: {reason}")
    if evidence is not None:
        print(f"evidence: {evidence.summary()}")
    acted = False
    if decision != "wait" and act_on_decision:
        with use_tracking(tracking):
            act(chosen, service, decision, reason, evidence)
        acted = True
    report = RolloutReport(
        model_name=model_name, server=service.uuid, rollout=service.rollout, decision=decision,
        reason=reason, evidence=evidence, acted=acted,
    )  # fmt: skip
    _publish(report)
    return report


def _publish(report: RolloutReport) -> None:
    evidence = report.evidence.summary() if report.evidence else "none"
    rollout = report.rollout.describe() if report.rollout else ""
    create_markdown_artifact(
        key=f"rollout-{report.model_name}".lower(),
        markdown=(
            f"## Rollout of {report.model_name}\n\n{rollout}\n\n**{report.decision}**: "
            f"{report.reason}\n\nEvidence: {evidence}\n"
        ),
    )
