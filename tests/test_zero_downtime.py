"""Swapping model versions under load, on real gunicorn servers: no request may fail
after the one retry a keep-alive HTTP client makes on a reset connection, and none may wait
for a model to load (each new worker takes `LOAD_DELAY_S` longer to load here, so a request
sent to a loading worker would be that slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks import MLflowModelDeployer
from blocks import local_process as lp
from ctcd.exceptions import ModelLoadError
from ctcd.loadgen import Load

pytestmark = pytest.mark.server

LOAD_DELAY_S = 3.0


@pytest.fixture
def slow_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTCD_TEST_LOAD_DELAY_S", str(LOAD_DELAY_S))


def _example(record) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


def _assert_no_request_failed_or_waited(load: Load, minimum: int) -> None:
    stats = load.stats
    assert stats.requests > minimum, "the load generator barely ran"
    assert stats.failed == 0, (stats.errors, stats.resets)
    assert stats.longest < LOAD_DELAY_S * 0.66, (
        f"a request took {stats.longest:.2f} s: it waited for a model to load"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_redeploys_under_load_fail_no_request(versions, ctcd_home, slow_loads, workers):
    deployer = MLflowModelDeployer(workers=workers)
    record = deployer.deploy_model(versions["good"])
    pids_before = {p.pid for p in lp.workers(record)}
    with Load(record.prediction_url, _example(record), clients=4) as load:
        for label in ("better", "good", "better"):
            updated = deployer.deploy_model(versions[label])
            assert lp.served_version(updated) == versions[label].model_version
            assert {p.pid for p in lp.workers(updated)}.isdisjoint(pids_before)
            pids_before = {p.pid for p in lp.workers(updated)}
    _assert_no_request_failed_or_waited(load, 100)
    assert len(lp.workers(updated)) == workers and updated.local.pid == record.local.pid
    assert updated.live_workers == workers and updated.status.value == "active"


@pytest.mark.parametrize("label", ["broken", "unscorable"])
def test_version_that_cannot_serve_under_load_fails_no_request(versions, ctcd_home, label):
    """`broken` fails to load; `unscorable` loads but fails to score its input example."""
    deployer = MLflowModelDeployer(workers=2)
    record = deployer.deploy_model(versions["good"])
    with (
        Load(record.prediction_url, _example(record), clients=2) as load,
        pytest.raises(ModelLoadError, match="failed to load or to score its input example"),
    ):
        deployer.deploy_model(versions[label])
    _assert_no_request_failed_or_waited(load, 20)
    assert lp.served_version(record) == versions["good"].model_version
    [after] = deployer.find_model_server()
    assert after.status.value == "active", after.status_message
    assert after.model_version == versions["good"].model_version
    assert after.live_workers == 2
    assert set(after.worker_versions.values()) == {versions["good"].model_version}
    assert f"version {versions[label].model_version}" in str(after.last_error)


def test_rollback_under_load_fails_no_request(versions, ctcd_home, slow_loads):
    deployer = MLflowModelDeployer(workers=2)
    record = deployer.deploy_model(versions["good"])
    deployer.deploy_model(versions["better"])
    with Load(record.prediction_url, _example(record), clients=4) as load:
        rolled = deployer.rollback_model_server(record.uuid)
    _assert_no_request_failed_or_waited(load, 50)
    assert rolled.model_version == versions["good"].model_version
    assert set(rolled.worker_versions.values()) == {versions["good"].model_version}
    assert lp.served_version(rolled) == versions["good"].model_version


def _metadata_settings(record, calls: int = 30) -> set[int]:
    """The `max_batch_size` each answering worker runs with (over several calls)."""
    import httpx

    url = record.prediction_url.replace("/invocations", "/metadata")
    return {httpx.get(url, timeout=5).json()["settings"]["max_batch_size"] for _ in range(calls)}


def _described(uuid: str) -> dict:
    import json

    from typer.testing import CliRunner

    from ctcd.cli import app

    done = CliRunner().invoke(app, ["models", "describe", uuid, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def test_an_edited_deployer_block_is_reported_then_applied_under_load(versions, ctcd_home):
    """Issue 20: a saved block edited after the server started (as in the Prefect UI): the
    record says what differs and how to apply it; the next deploy applies workers and
    settings with a rolling swap (0 failed requests); the address cannot change and says so."""
    MLflowModelDeployer(workers=1, max_batch_size=256).save("edited", overwrite=True)
    first = MLflowModelDeployer.load("edited")
    record = first.deploy_model(versions["good"])
    assert record.deployer_block == "mlflow-model-deployer/edited"
    MLflowModelDeployer(workers=2, max_batch_size=8, port=1).save("edited", overwrite=True)
    differ = " ".join(_described(record.uuid)["settings_differ"])
    assert "workers: the block asks for 2, the server runs 1" in differ
    assert "max_batch_size: the block asks for 8, the server runs with 256" in differ
    assert "keeps its address" in differ
    assert _metadata_settings(record) == {256}  # nothing changed yet
    with Load(record.prediction_url, _example(record), clients=4) as load:
        applied = MLflowModelDeployer.load("edited").deploy_model(versions["better"])
    _assert_no_request_failed_or_waited(load, 20)
    assert applied.live_workers == 2 and applied.status.value == "active"
    assert _metadata_settings(applied) == {8}
    differ = _described(record.uuid)["settings_differ"]
    assert len(differ) == 1 and "keeps its address" in differ[0], differ
