"""`make deploy` and the deployments' schedules and triggers, on a real `prefect server start`
(SQLite, loopback) with a real process worker. Nothing is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks import MLflowModelDeployer
from tests.processes import (
    end_processes_under,
    loopback_port,
    missing,
    start_logged,
    stop_group,
)

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return start_logged(cmd, log, env=env, cwd=ROOT)


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _postgres(sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _create_database(database: str, seconds: float = 30.0) -> None:
    """Create the test's database, giving a PostgreSQL that is still starting time to accept
    connections. Unreachable after that: a failure under CI=true, a skip (with why) locally."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            _postgres(f'CREATE DATABASE "{database}"')
            return
        except (OSError, TimeoutError) as err:  # refused, unreachable, or no answer
            if time.monotonic() < deadline:
                time.sleep(1)
                continue
            why = f"PostgreSQL at 127.0.0.1:5432 is unreachable after {seconds:.0f} s ({err!r})"
            missing(why)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server on SQLite, or on the local PostgreSQL (a database of its own,
    dropped afterwards); yields the environment that points at it."""
    home = tmp_path_factory.mktemp(f"prefect-{request.param}")
    database = f"ctcd_test_{os.getpid()}_{int(time.time())}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        CTCD_LOCAL_API="0",
    )
    if request.param == "postgresql":
        _create_database(database)
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
    port = loopback_port()
    proc = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home / "server.log",
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            pytest.fail(
                f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
            )
        yield {**env, "PREFECT_API_URL": api}
    finally:
        stop_group(proc)
        if request.param == "postgresql":
            _postgres(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _make_deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "deploy", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _api(env: dict[str, str]) -> Any:
    """A sync Prefect client for the real server (the session's harness stays untouched)."""
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return get_client(sync_client=True)


def _wait(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def deployed(server) -> dict[str, str]:
    # What ctcd before issue 20 left on a server: the abstract deployer base as a block type.
    stale = {"name": "BaseModelDeployer", "slug": "ctcd-model-deployer"}
    httpx.post(f"{server['PREFECT_API_URL']}/block_types/", json=stale).raise_for_status()
    done = _make_deploy(server)
    assert done.returncode == 0, done.stdout + done.stderr
    return server


def test_make_deploy_creates_every_deployment_schedule_and_trigger(deployed) -> None:
    with _api(deployed) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        automations = client.read_automations()
        pools = {p.name: p for p in client.read_work_pools()}
    assert set(deployments) == {
        "continuous-training",
        "continuous-deployment",
        "train-and-deploy",
        "batch-inference",
        "drift-monitor",
        "record-outcomes",
        "rollout-analysis",
        "continuous-training-kubernetes",
    }
    assert pools["ctcd-process"].type == "process"
    assert pools["ctcd-kubernetes"].type == "kubernetes"
    defaults = pools["ctcd-kubernetes"].base_job_template["variables"]["properties"]
    assert defaults["namespace"]["default"] == "ctcd" and defaults["cpu_request"]["default"] == "1"
    training = deployments["continuous-training"]
    assert training.schedules[0].schedule.interval.total_seconds() == 14 * 24 * 3600
    assert deployments["batch-inference"].schedules[0].schedule.cron == "0 6 * * *"
    assert deployments["rollout-analysis"].schedules[0].schedule.interval.total_seconds() == 300
    schema = deployments["continuous-deployment"].parameter_openapi_schema
    criteria = schema["definitions"]["DeploymentCriteria"]["properties"]  # the UI's form fields
    assert criteria["metric"]["enum"] == ["mse", "rmse", "mae", "r2"]
    assert {"threshold", "must_beat_champion"} <= set(criteria)
    expects = sorted(sorted(a.trigger.expect) for a in automations)  # `expect` is a set
    assert expects == [
        ["ctcd.drift.detected", "ctcd.performance.degraded"],  # retraining
        ["prefect.flow-run.Completed"],  # deploying what training registered
    ]


def test_automations_and_run_forms_say_what_they_do(deployed) -> None:
    """What the UI shows: each automation's name and description say what fires it and what
    it runs (not `continuous-training__automation_1`); every parameter of every deployed flow
    has a description in the run form; the block catalog holds ctcd's blocks and not the
    abstract deployer base (an older ctcd's registration of it is removed)."""
    with _api(deployed) as client:
        automations = {a.name: a for a in client.read_automations()}
        deployments = client.read_deployments()
        block_types = {b.slug for b in client.read_block_types()}
    assert set(automations) == {
        "Retrain customer-satisfaction on drift or a worse live error",
        "Deploy the version continuous training registered",
    }
    retrain = automations["Retrain customer-satisfaction on drift or a worse live error"]
    for event in ("ctcd.drift.detected", "ctcd.performance.degraded", "continuous-training"):
        assert event in retrain.description
    deploy = automations["Deploy the version continuous training registered"]
    for words in ("continuous-training run completes", "continuous-deployment", "champion"):
        assert words in deploy.description
    for deployment in deployments:
        fields = deployment.parameter_openapi_schema["properties"]
        undescribed = [name for name, field in fields.items() if not field.get("description")]
        assert not undescribed, f"{deployment.name}: {undescribed}"
    assert {
        "mlflow-model-deployer",
        "seldon-model-deployer",
        "mlflow-tracking",
        "object-store-credentials",
        "vault-credentials",
    } <= block_types
    assert "ctcd-model-deployer" not in block_types


def _completed_runs(env: dict[str, str], deployment: str) -> list[Any]:
    completed = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
    )
    names = DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
    with _api(env) as client:
        return client.read_flow_runs(flow_run_filter=completed, deployment_filter=names)


def _bodies(frame: Any, rows: int = 10) -> list[bytes]:
    """Scoring bodies of `rows` rows each, covering `frame`."""
    import json

    return [
        json.dumps(
            {"dataframe_split": json.loads(part.to_json(orient="split", index=False))}
        ).encode()
        for part in (frame.iloc[i : i + rows] for i in range(0, len(frame), rows))
    ]


def test_the_loop_from_served_traffic_to_a_new_version(deployed, small_csv, tmp_path):
    """The whole loop on a real Prefect server, a real process worker and a real local model
    server: training deploys v1; a client's traffic (with request ids) shifts halfway; the
    drift monitor, run from its deployment on the served log, emits the event; the trigger
    trains on the newer data and continuous deployment swaps in v2. The client sees no failed
    request from start to end, and the log shows both versions."""
    from ctcd.loadgen import Load
    from ctcd.sample import generate
    from ctcd.serving.predlog import read_log
    from flows.data import feature_frame

    env = {
        **deployed,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "CTCD_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    worker = _start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "ctcd-process"],
        env,
        tmp_path / "worker.log",
    )
    deployer = MLflowModelDeployer(root_dir=str(tmp_path / "home" / "servers"))
    newer = generate(2_000, seed=41).assign(price=lambda f: f["price"] * 4)
    newer_csv = tmp_path / "newer.csv"
    newer.to_csv(newer_csv, index=False)
    load = None
    try:
        with _api(env) as client:
            training = client.read_deployment_by_name("training-pipeline/continuous-training")
            params = {"data_path": small_csv, "model_type": "linear"}
            client.create_flow_run_from_deployment(training.id, parameters=params)
        _wait(lambda: _completed_runs(env, "continuous-deployment"), 180, "the triggered deploy")
        [first] = deployer.find_model_server()
        assert first.status.value == "active" and first.model_version == "1"

        steady = _bodies(feature_frame(generate(1_000, seed=40), "review_score"))
        shifted = _bodies(feature_frame(newer, "review_score"))
        load = Load(first.prediction_url, steady, clients=2, request_ids="loop-").__enter__()
        _wait(lambda: load.stats.requests >= 100, 60, "steady traffic")
        load.bodies = shifted  # the customers changed: prices are four times what they were
        _wait(lambda: load.stats.requests >= 250, 60, "shifted traffic")
        _wait(
            lambda: (
                deployer.get_model_server(first.uuid).prediction_log_rows["written_rows"] >= 2_000
            ),
            30,
            "the prediction log",
        )

        with _api(env) as client:  # retraining will use the newer data
            client.update_deployment(
                training.id, DeploymentUpdate(parameters={**params, "data_path": str(newer_csv)})
            )
            monitor = client.read_deployment_by_name("drift-monitor/drift-monitor")
            client.create_flow_run_from_deployment(
                monitor.id, parameters={"window": "1h", "min_rows": 200}
            )
        _wait(lambda: _completed_runs(env, "drift-monitor"), 180, "the drift monitor")
        _wait(lambda: len(_completed_runs(env, "continuous-deployment")) >= 2, 240, "the loop")
        _wait(lambda: deployer.get_model_server(first.uuid).status.value == "active", 60, "v2")
        time.sleep(3)  # traffic on v2
        load.__exit__(None, None, None)
        stats, load = load.stats, None
        assert stats.failed == 0, (stats.errors, stats.resets)
        [served] = deployer.find_model_server()
        assert served.model_version == "2" and served.uuid == first.uuid
        assert len(_completed_runs(env, "continuous-training")) == 2
        _wait(
            lambda: set(read_log(served.local.runtime_dir)["model_version"]) == {"1", "2"},
            30,
            "both versions in the log",
        )
        log = read_log(served.local.runtime_dir)
        assert log["request_id"].str.startswith("loop-").all()
    finally:
        if load is not None:
            load.__exit__(None, None, None)
        stop_group(worker)
        for record in deployer.find_model_server():
            deployer.delete_model_server(record.uuid)
        end_processes_under(tmp_path)  # e.g. a deploy still running after a timeout


def _deploy_file(prefect_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What `make deploy` runs, with another prefect.yaml."""
    return subprocess.run(
        [sys.executable, "-m", "deployments.setup", str(prefect_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _deployments(env: dict[str, str]) -> dict[str, tuple[Any, ...]]:
    """What a wrongful apply would change: each deployment's update time and parameters."""
    with _api(env) as client:
        return {
            d.name: (d.updated, d.parameters, [s.schedule for s in d.schedules])
            for d in client.read_deployments()
        }


def test_make_deploy_refuses_bad_input_before_applying_anything(deployed, tmp_path) -> None:
    server = deployed  # every deployment exists: a wrongful apply would update them
    no_api = {k: v for k, v in server.items() if k != "PREFECT_API_URL"}
    done = _make_deploy(no_api)
    assert done.returncode != 0 and "PREFECT_API_URL is not set" in done.stderr
    dead = f"http://127.0.0.1:{loopback_port()}/api"
    done = _make_deploy({**server, "PREFECT_API_URL": dead})
    assert done.returncode != 0 and f"The Prefect API at {dead} is not reachable" in done.stderr

    bad = tmp_path / "prefect.yaml"
    text = (ROOT / "prefect.yaml").read_text().replace("name: ctcd-process", "name: gpu-pool")
    bad.write_text(text)
    done = _deploy_file(bad, server)
    assert done.returncode != 0 and "gpu-pool" in done.stderr
    with _api(server) as client:
        assert "gpu-pool" not in {p.name for p in client.read_work_pools()}
    before = _deployments(server)
    assert len(before) == 8

    text = (ROOT / "prefect.yaml").read_text()
    for old, new, words in [
        (
            "metric: r2",
            "metric: accuracy",
            "'continuous-deployment': parameter criteria.metric: 'accuracy' is not one of",
        ),
        ('cron: "0 6 * * *"', 'cron: "daily at six"', "deployment 'batch-inference': schedules[0]"),
        (
            "prefect.resource.name: continuous-training",
            "prefect.resource.name: nightly-training",
            "triggers[0].match_related names deployment 'nightly-training'",
        ),
    ]:
        bad.write_text(text.replace(old, new, 1))
        done = _deploy_file(bad, server)
        assert done.returncode != 0 and words in done.stderr, done.stderr
        assert "nothing was applied" in done.stderr
    assert _deployments(server) == before


def test_serve_builds_the_same_deployments_from_prefect_yaml() -> None:
    from deployments.serve import build

    built = {d.name: d for d in build()}
    assert set(built) == {
        "continuous-training",
        "continuous-deployment",
        "train-and-deploy",
        "batch-inference",
        "drift-monitor",
        "record-outcomes",
        "rollout-analysis",
    }
    interval = built["continuous-training"].schedules[0].schedule.interval
    assert interval.total_seconds() == 14 * 24 * 3600
    [trigger] = built["continuous-deployment"].triggers
    assert trigger.expect == {"prefect.flow-run.Completed"}
    assert trigger.parameters == {"training_flow_run_id": "{{ event.resource.id }}"}


def test_kubernetes_worker_submits_the_job(deployed, kube_api, tmp_path) -> None:
    """A prefect-kubernetes worker turns a flow run of the Kubernetes deployment into a Job.
    No kubelet runs here, so its pod never starts: the test checks the Job it submitted."""
    with kube_api.client() as kube:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ctcd"}}
        created = kube.post("/api/v1/namespaces", json=namespace)
        assert created.status_code in (201, 409), created.text  # 409: made by the other backend
    env = {**deployed, "PREFECT_WORKER_QUERY_SECONDS": "1", "KUBECONFIG": str(kube_api.kubeconfig)}
    worker = _start(
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            "ctcd-kubernetes",
            "--type",
            "kubernetes",
        ],
        env,
        tmp_path / "worker.log",
    )
    try:
        with _api(deployed) as client:
            deployment = client.read_deployment_by_name(
                "training-pipeline/continuous-training-kubernetes"
            )
            run = client.create_flow_run_from_deployment(
                deployment.id, job_variables={"pod_watch_timeout_seconds": 5}
            )

        def jobs() -> list[dict[str, Any]]:
            with kube_api.client() as kube:
                selector = {"labelSelector": f"prefect.io/flow-run-id={run.id}"}
                found = kube.get("/apis/batch/v1/namespaces/ctcd/jobs", params=selector)
                return found.json().get("items", [])

        [job] = _wait(jobs, 90, f"the Job (worker log: {tmp_path / 'worker.log'})")
    finally:
        stop_group(worker)
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env_vars = {e["name"]: e.get("value") for e in container["env"]}
    assert job["metadata"]["namespace"] == "ctcd"
    assert container["image"] == "ctcd:latest"
    assert spec["serviceAccountName"] == "ctcd-flows"  # deployments/kubernetes/
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert env_vars["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert env_vars["PREFECT_API_URL"] == deployed["PREFECT_API_URL"]
    assert env_vars["CTCD_HOME"] == "/var/lib/ctcd" and env_vars["CTCD_LOCAL_API"] == "0"
