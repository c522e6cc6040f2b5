"""Progressive delivery through the deployments in `prefect.yaml`, on a real Prefect server and
process worker and a real local model server, under client traffic from start to end:

1. v1 is trained on a table whose labels are reversed (6 - score): it becomes champion.
2. v2, trained on the true labels, passes the gate and opens a shadow rollout. Labels arrive
   for the served requests; `rollout-analysis` (its deployment, run on demand) finds v2's live
   error lower on the same requests (paired test) and promotes it.
3. v3, trained on reversed labels again, passes its gate (measured on its own reversed rows,
   where v2 is poor) and opens a 50 % canary. On live labels it is far worse: rolled back.

No client request fails from start to end; each decision is tagged on its version and emitted
as a Prefect event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from blocks import MLflowModelDeployer
from ctcd.loadgen import Load
from ctcd.names import CHALLENGER, CHAMPION, ROLLOUT_TAG
from ctcd.sample import generate
from flows.data import feature_frame
from tests.processes import end_processes_under, loopback_port, start_logged, stop_group
from tests.test_prefect_deployments import BIN, ROOT, _api, _completed_runs, _make_deploy, _wait

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

CLIENTS = 2
LIVE_ROWS = 400


@pytest.fixture(scope="module")
def prefect(tmp_path_factory) -> dict[str, str]:
    """A real Prefect server (SQLite, loopback) with `make deploy` applied."""
    import os

    home = tmp_path_factory.mktemp("prefect-rollout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", CTCD_LOCAL_API="0")  # fmt: skip
    port = loopback_port()
    proc = start_logged(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home / "server.log", env=env, cwd=ROOT,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: _healthy(api), 90, "the Prefect server")
        env["PREFECT_API_URL"] = api
        done = _make_deploy(env)
        assert done.returncode == 0, done.stdout + done.stderr
        _only_on_demand(env, "rollout-analysis/rollout-analysis")
        yield env
    finally:
        stop_group(proc)


def _only_on_demand(env: dict[str, str], name: str) -> None:
    """Turn off the deployment's schedule and drop the runs it scheduled: a scheduled analysis
    with the default parameters (no outcomes: guardrails only) would decide the test's rollouts
    before the test's own run, on other evidence."""
    with _api(env) as client:
        deployment = client.read_deployment_by_name(name)
        for schedule in deployment.schedules:
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        scheduled = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        )
        only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        for run in client.read_flow_runs(flow_run_filter=scheduled, deployment_filter=only):
            client.delete_flow_run(run.id)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _run(env: dict[str, str], name: str, parameters: dict) -> str:
    with _api(env) as client:
        deployment = client.read_deployment_by_name(name)
        return str(client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id)


def _finished(env: dict[str, str], flow_run_id: str) -> bool:
    with _api(env) as client:
        state = client.read_flow_run(flow_run_id).state
    assert state is None or state.type.value not in ("FAILED", "CRASHED"), state
    return state is not None and state.type.value == "COMPLETED"


def _events(env: dict[str, str], prefix: str) -> list[dict]:
    body = {"filter": {"event": {"prefix": [prefix]}}, "limit": 50}
    answer = httpx.post(f"{env['PREFECT_API_URL']}/events/filter", json=body, timeout=10)
    answer.raise_for_status()
    return answer.json()["events"]


def test_live_evidence_promotes_a_better_candidate_and_rolls_back_a_worse_one(prefect, tmp_path):
    env = {
        **prefect,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "CTCD_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    worker = start_logged(
        [str(BIN / "prefect"), "worker", "start", "--pool", "ctcd-process"],
        tmp_path / "worker.log", env=env, cwd=ROOT,
    )  # fmt: skip
    truth = generate(2_000, seed=7)
    true_csv, reversed_csv = tmp_path / "true.csv", tmp_path / "reversed.csv"
    truth.to_csv(true_csv, index=False)
    truth.assign(review_score=6 - truth["review_score"]).to_csv(reversed_csv, index=False)
    live = generate(LIVE_ROWS, seed=8)
    bodies = [
        json.dumps({"dataframe_split": json.loads(row.to_json(orient="split", index=False))})
        .encode() for _, row in feature_frame(live, "review_score").groupby(level=0)
    ]  # fmt: skip
    outcomes = tmp_path / "outcomes.csv"
    _labels(live["review_score"].to_numpy(), outcomes)
    deployer = MLflowModelDeployer(root_dir=str(tmp_path / "home" / "servers"))
    analysis = {"outcomes_path": str(outcomes), "min_requests": 100, "min_outcomes": 60}
    load = None
    try:
        # 1. v1, trained on reversed labels, is the champion.
        _run(env, "training-pipeline/continuous-training",
             {"data_path": str(reversed_csv), "model_type": "linear"})  # fmt: skip
        _wait(lambda: _completed_runs(env, "continuous-deployment"), 240, "v1's deploy")
        [server] = deployer.find_model_server()
        assert server.model_version == "1"
        load = Load(server.prediction_url, bodies, clients=CLIENTS, request_ids="live-")
        load.__enter__()

        # 2. v2 (true labels) opens a shadow rollout; live labels promote it.
        _set_rollout(env, {"mode": "shadow"})
        _run(env, "training-pipeline/continuous-training",
             {"data_path": str(true_csv), "model_type": "linear"})  # fmt: skip
        _wait(lambda: len(_completed_runs(env, "continuous-deployment")) >= 2, 240, "v2's deploy")
        opened = deployer.get_model_server(server.uuid)
        assert opened.rollout is not None and opened.rollout.mode == "shadow"
        assert opened.rollout.candidate_version == "2" and opened.model_version == "1"
        _wait_for_rows(deployer, server.uuid, 150)
        run = _run(env, "rollout-analysis/rollout-analysis", analysis)
        _wait(lambda: _finished(env, run), 180, "the first analysis")
        promoted = _wait(lambda: _alone(deployer, server.uuid, "2"), 120, "v2 promoted")
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert _alias(client, CHAMPION) == "2"
        assert _alias(client, CHALLENGER) is None  # promoted: no longer on trial
        tag = client.get_model_version("customer-satisfaction", "2").tags[ROLLOUT_TAG]
        print(f"\nv2 (shadow): {tag}")
        assert tag.startswith("promoted: the candidate is better"), tag
        assert promoted.history[-2:] == ["1", "2"]

        # 3. v3 (reversed labels) opens a 50 % canary; live labels roll it back.
        _set_rollout(env, {"mode": "canary", "traffic_percent": 50})
        _run(env, "training-pipeline/continuous-training",
             {"data_path": str(reversed_csv), "model_type": "linear"})  # fmt: skip
        _wait(lambda: len(_completed_runs(env, "continuous-deployment")) >= 3, 240, "v3's deploy")
        canary = deployer.get_model_server(server.uuid)
        assert canary.rollout is not None and canary.rollout.candidate_version == "3"
        _wait_for_rows(deployer, server.uuid, 300)
        run = _run(env, "rollout-analysis/rollout-analysis", analysis)
        _wait(lambda: _finished(env, run), 180, "the second analysis")
        _wait(lambda: _alone(deployer, server.uuid, "2"), 120, "v3 rolled back")
        tag = client.get_model_version("customer-satisfaction", "3").tags[ROLLOUT_TAG]
        print(f"v3 (canary): {tag}")
        assert tag.startswith("rolled back: the candidate is worse"), tag
        assert _alias(client, CHALLENGER) == "3" and _alias(client, CHAMPION) == "2"
        want = ["ctcd.rollout.promoted", "ctcd.rollout.rolled_back"]
        _wait(lambda: sorted(e["event"] for e in _events(env, "ctcd.rollout.")) == want, 60,
              "both decisions as Prefect events")  # fmt: skip

        time.sleep(2)  # traffic on the decided state
        load.__exit__(None, None, None)
        stats, load = load.stats, None
        assert stats.requests > 500 and stats.failed == 0, (stats.errors, stats.resets)
    finally:
        if load is not None:
            load.__exit__(None, None, None)
        stop_group(worker)
        for record in deployer.find_model_server():
            deployer.delete_model_server(record.uuid)
        end_processes_under(tmp_path)


def _labels(scores, path: Path) -> None:
    """The label of every request id the load generator can send (`live-<client>-<n>`: client
    `i`'s n-th request carries body `(n * CLIENTS + i) % len(bodies)`)."""
    rows = []
    for i in range(CLIENTS):
        for n in range(20_000):
            rows.append((f"live-{i}-{n}", scores[(n * CLIENTS + i) % len(scores)]))
    pd.DataFrame(rows, columns=["request_id", "review_score"]).to_csv(path, index=False)


def _set_rollout(env: dict[str, str], rollout: dict) -> None:
    with _api(env) as client:
        deployment = client.read_deployment_by_name("deploy-model-version/continuous-deployment")
        parameters = {**deployment.parameters, "rollout": rollout}
        client.update_deployment(deployment.id, DeploymentUpdate(parameters=parameters))


def _wait_for_rows(deployer: MLflowModelDeployer, uuid: str, rows: int) -> None:
    """Until the candidate has answered `rows` requests since its rollout opened."""
    from ctcd.serving.logstats import worker_stats

    def enough() -> bool:
        record = deployer.get_model_server(uuid)
        assert record.rollout is not None
        counted = [s for s in worker_stats(record.local.runtime_dir)
                   if s.get("role") == record.rollout.role
                   and str(s.get("model_version")) == record.rollout.candidate_version]  # fmt: skip
        return sum(int(s.get("requests") or 0) for s in counted) >= rows

    _wait(enough, 120, f"{rows} candidate answers")
    time.sleep(3)  # the log's next flush


def _alone(deployer: MLflowModelDeployer, uuid: str, version: str):  # type: ignore[no-untyped-def]
    record = deployer.get_model_server(uuid)
    ok = record.rollout is None and record.model_version == version
    return record if ok and record.status.value == "active" else None


def _alias(client, alias: str) -> str | None:  # type: ignore[no-untyped-def]
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias("customer-satisfaction", alias).version)
    except MlflowException:
        return None
