"""MLflow down at the worst moments, against a real `mlflow server` (SQLite, proxied artifacts)
that the test stops and starts again, real flow processes paused at a named step
(`CTCD_TEST_PAUSE`) and real model servers.

- MLflow down while a gating run reads the champion: the run fails saying which server and
  what to do; nothing is deployed, the champion keeps serving and keeps its alias.
- MLflow down when a flow starts (no tracking block): the flow fails before it reads or trains
  anything, naming the server, what was tried and what to do; MLflow's retries are bounded in
  ctcd's processes whenever the user did not set them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from ctcd.exceptions import TrackingError
from ctcd.names import FLOW_RUN_TAG, GATE_TAG
from ctcd.settings import MLFLOW_REQUEST_DEFAULTS, tracking_uri
from flows.continuous_deployment import continuous_deployment_pipeline
from tests.interrupt import champion, outcome, paused_at, resume, served, start_flow
from tests.mlflow_server import MlflowServer
from tests.test_tracking import _task_runs

pytestmark = pytest.mark.server


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    """A real tracking server this test's flows use (MLFLOW_TRACKING_URI), started."""
    folder = tmp_path / "mlflow"
    folder.mkdir()
    server = MlflowServer(folder).start()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        yield server
    finally:
        server.stop()
        mlflow.set_tracking_uri(before)


@pytest.mark.timeout(600)
def test_mlflow_down_while_the_gate_reads_the_champion_fails_the_run(
    tracking, ctcd_home, small_csv, model_name, tmp_path
):
    params = {"data_path": small_csv, "model_name": model_name, "model_type": "linear"}
    first = continuous_deployment_pipeline(**params)
    assert first.deployed and champion(model_name) == first.model_version

    log = tmp_path / "flow.log"
    proc = start_flow(params, "champion-reading,gate-decided", log)
    try:
        assert paused_at(proc, ctcd_home, "champion-reading", 300), log.read_text()[-3000:]
        tracking.stop()  # MLflow goes down just before the gate reads the champion
        resume(ctcd_home, "champion-reading")
        if paused_at(proc, ctcd_home, "gate-decided", 300):
            tracking.start()  # ... and is back before the deploy (as in the issue)
            resume(ctcd_home, "gate-decided")
        ended = outcome(proc, log, 300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if tracking.proc is None:
        tracking.start()
    assert ended.startswith("ERROR TrackingError"), ended
    for words in (tracking.uri, "champion could not be read", "nothing was deployed", "start it"):
        assert words in ended, ended
    assert champion(model_name) == first.model_version  # the alias still names what serves
    assert served(model_name) == (first.model_version, first.model_version)
    candidate = str(int(first.model_version) + 1)
    tags = mlflow.MlflowClient().get_model_version(model_name, candidate).tags
    assert not str(tags.get(GATE_TAG, "")).startswith("deployed")


def test_a_flow_fails_before_any_work_when_mlflow_is_down(tracking, small_csv, model_name):
    tracking.stop()
    state = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear", return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TrackingError), repr(error)  # not a raw MlflowException
    message = str(error)
    for words in (
        f"MLflow tracking server at {tracking.uri}: unreachable",
        "GET /api/2.0/mlflow/experiments/search",
        "nothing was trained, registered or deployed",
        "start it",
        "MLFLOW_TRACKING_URI",
    ):
        assert words in message, message
    assert _task_runs(state) == []  # not even the data was read, let alone a model trained
    tracking.start()
    client = mlflow.MlflowClient(tracking.uri)
    assert client.search_registered_models(f"name = '{model_name}'") == []
    flow_run_id = str(state.state_details.flow_run_id)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
    )
    assert runs == []


def test_mlflow_retries_are_bounded_unless_the_user_set_them(monkeypatch) -> None:
    """MLflow's defaults retry a dead server ~4.5 minutes per call; ctcd bounds them."""
    for name in MLFLOW_REQUEST_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's choice stays
    tracking_uri()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
