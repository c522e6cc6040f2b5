"""Swaps interrupted by a dying process, on real gunicorn servers under keep-alive load.

The deploying process is SIGKILLed at named steps of a swap, which it reaches and then
waits at because the test sets `CTCD_TEST_PAUSE` (no sleeps decide where it dies). Whatever
the step, the server converges on the desired state by itself: the recorded worker count,
one version served, no failed request. The gunicorn master SIGKILLed mid-swap takes its
workers down with it, and `start` brings the server back with the recorded version.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from blocks import MLflowModelDeployer, ServiceRecord
from blocks import local_process as lp
from ctcd.exceptions import ModelServerError
from ctcd.loadgen import Load
from tests.interrupt import deploy_killed_at, eventually

pytestmark = pytest.mark.server

WORKERS = 2
LOAD_DELAY_S = 3.0  # each new worker takes this long on top of loading its model
CONVERGE_S = 90.0  # bound for the server to converge after a kill (a loaded 2-core machine)


def _example(record: ServiceRecord) -> bytes:
    folder = Path(str(record.local.runtime_dir), "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


def versions_answered(record: ServiceRecord, calls: int = 60) -> Counter[str]:
    """The versions 60 `/metadata` calls on fresh connections were answered with."""
    url = record.prediction_url.replace("/invocations", "/metadata")
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection for every call
    with httpx.Client(limits=fresh, timeout=10) as client:
        return Counter(str(client.get(url).json()["model_version"]) for _ in range(calls))


def _settled(deployer: MLflowModelDeployer, uuid: str, version: str) -> ServiceRecord | None:
    record = deployer.get_model_server(uuid)
    ok = (
        record.status.value == "active"
        and record.model_version == version
        and record.live_workers == WORKERS
        and set(record.worker_versions.values()) == {version}
    )
    return record if ok else None


@pytest.mark.timeout(900)
def test_deploys_killed_at_each_step_converge_with_no_failed_request(
    versions, ctcd_home, monkeypatch
):
    monkeypatch.setenv("CTCD_TEST_LOAD_DELAY_S", str(LOAD_DELAY_S))
    deployer = MLflowModelDeployer(workers=WORKERS)
    record = deployer.deploy_model(versions["good"])
    runtime = Path(str(record.local.runtime_dir))
    steps = [
        ("desired-written", "better"),  # before the new worker is up
        ("worker-announced", "good"),  # after a new worker announced itself
        ("worker-leaving", "better"),  # after an old worker was told to leave
    ]
    with Load(record.prediction_url, _example(record), clients=4) as load:
        for step, label in steps:
            version = versions[label].model_version
            deployer_code = f"MLflowModelDeployer(workers={WORKERS})"
            assert deploy_killed_at(versions[label], step, runtime.parent, deployer_code) == runtime
            seen = lp.observe_workers(record)
            if step == "desired-written":  # killed before any worker serves the new version
                assert all(v != version for _, v, _ in seen), (step, seen)
            else:
                assert any(v == version for _, v, _ in seen), (step, seen)
            # the record is readable and already names the version being swapped in
            assert deployer.get_model_server(record.uuid).model_version == version
            settled = eventually(
                lambda v=version: _settled(deployer, record.uuid, v),
                CONVERGE_S,
                f"{WORKERS} workers all serving version {version} after a kill at {step}",
            )
            assert versions_answered(settled) == Counter({version: 60}), step
        after = deployer.deploy_model(versions["good"])  # a clean deploy after the kills
    stats = load.stats
    assert stats.requests > 100, "the load generator barely ran"
    assert stats.failed == 0, (stats.errors, stats.resets)
    assert stats.longest < LOAD_DELAY_S * 0.66, "a request waited for a model to load"
    assert after.local.pid == record.local.pid and after.live_workers == WORKERS
    assert after.status.value == "active" and after.last_error is None
    assert versions_answered(after) == Counter({versions["good"].model_version: 60})


@pytest.mark.timeout(600)
def test_master_killed_mid_swap_is_down_and_start_restores_the_recorded_version(
    versions, ctcd_home, monkeypatch
):
    monkeypatch.setenv("CTCD_TEST_PAUSE", "master-retired")  # the server's master stops there
    deployer = MLflowModelDeployer(workers=WORKERS)
    record = deployer.deploy_model(versions["good"])
    runtime = Path(str(record.local.runtime_dir))
    errors: list[BaseException] = []

    def deploy() -> None:
        try:
            deployer.deploy_model(versions["better"])
        except BaseException as err:  # the deploy sees its server die
            errors.append(err)

    swap = threading.Thread(target=deploy)
    swap.start()
    eventually((runtime / "paused-master-retired").exists, 180, "the master retiring a worker")
    children = lp.workers(record)
    assert len(children) == WORKERS + 1  # mid-swap: two old workers (one leaving), a new one
    os.kill(int(record.local.pid or 0), signal.SIGKILL)
    swap.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ModelServerError), errors
    assert "exited" in str(errors[0])
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], "workers outlived their master"
    down = deployer.get_model_server(record.uuid)
    assert down.status.value == "error" and "is not running" in down.status_message
    assert down.model_version == versions["better"].model_version  # the recorded version
    with pytest.raises(httpx.ConnectError):
        httpx.get(record.health_url, timeout=2)

    monkeypatch.delenv("CTCD_TEST_PAUSE")
    started = deployer.start_model_server(record.uuid)
    assert started.prediction_url == record.prediction_url
    settled = _settled(deployer, record.uuid, versions["better"].model_version)
    assert settled is not None, deployer.get_model_server(record.uuid)
    assert versions_answered(settled) == Counter({versions["better"].model_version: 60})
