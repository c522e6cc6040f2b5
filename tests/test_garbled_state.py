"""Garbled state files of a real local model server under client load.

- `current.json` (the desired state) garbled: every `ctcd models` command names the file, what
  is wrong and what to do (no traceback); a worker that dies is replaced by one serving the
  stable version and the master stays up; `start` rewrites the file from the record, and so
  does the next deploy; `stop` and `delete` work.
- `service.json` (the record) garbled: the server stays listed (recovered from its folder and
  process), the next deploy updates it in place (same URL, no second server), and it can be
  deleted with ctcd.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from blocks import MLflowModelDeployer
from blocks import local_process as lp
from ctcd.cli import app
from ctcd.loadgen import Load
from tests.interrupt import eventually

pytestmark = pytest.mark.server

GARBLED = '{"model_name": "served-model", "model_vers'  # a write cut short


def _body(record) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


def _served(record) -> str:
    url = record.prediction_url.replace("/invocations", "/metadata")
    return str(httpx.get(url, timeout=10).json()["model_version"])


def _cli(*args: str):
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "KeyError" not in result.output, result.output
    return result


@pytest.mark.timeout(600)
def test_a_garbled_desired_state_is_named_served_through_and_repaired(versions, ctcd_home):
    good = versions["good"].model_version
    deployer = MLflowModelDeployer(workers=2)
    record = deployer.deploy_model(versions["good"])
    short, current = record.uuid[:8], record.local.runtime_dir / "current.json"
    master = psutil.Process(record.local.pid)
    with Load(record.prediction_url, _body(record), clients=2) as load:
        current.write_text(GARBLED)
        for args in (["list"], ["describe", short], ["logs", short, "--tail", "5"]):
            result = _cli(*args)
            assert result.exit_code == 0, (args, result.output)
            assert str(current) in result.output and "not valid JSON" in result.output, args
            assert f"ctcd models start {short}" in result.output, args
        [row] = json.loads(_cli("list", "--json").stdout)
        assert row["status"] == "active" and row["model_version"] == good

        victim = lp.workers(record)[0]
        os.kill(victim.pid, signal.SIGKILL)  # its replacement finds current.json garbled

        def replaced() -> bool:
            seen = deployer.get_model_server(record.uuid).worker_versions
            return str(victim.pid) not in seen and list(seen.values()) == [good, good]

        eventually(replaced, 120, "a replacement worker serving the stable version")
        assert master.is_running() and lp.process(record) is not None, "the master quit"
        assert _served(record) == good

        started = _cli("start", short)  # rewrites current.json from the record
        assert started.exit_code == 0 and started.output.startswith("active"), started.output
        assert json.loads(current.read_text())["model_version"] == good
        assert deployer.get_model_server(record.uuid).observed.state_differs == []

        current.write_text(GARBLED)  # the next deploy repairs it too
        updated = deployer.deploy_model(versions["better"])
        assert updated.local.pid == record.local.pid and updated.status.value == "active"
        assert _served(updated) == versions["better"].model_version
    assert load.stats.requests > 50 and load.stats.failed == 0, load.stats.errors

    current.write_text(GARBLED)
    stopped = _cli("stop", short)
    assert stopped.exit_code == 0 and stopped.output.startswith("inactive"), stopped.output
    assert str(current) in stopped.output  # says what else is wrong with the server
    deleted = _cli("delete", short, "--yes")
    assert deleted.exit_code == 0 and "Deleted" in deleted.output
    assert not record.local.runtime_dir.exists() and not master.is_running()


@pytest.mark.timeout(600)
def test_a_garbled_record_keeps_the_server_listed_updated_in_place_and_deletable(
    versions, ctcd_home
):
    deployer = MLflowModelDeployer()
    record = deployer.deploy_model(versions["good"])
    short, stored = record.uuid[:8], record.local.runtime_dir / "service.json"
    stored.write_text(stored.read_text()[:40])

    [row] = json.loads(_cli("list", "--json").stdout)  # still listed, as it serves
    assert row["uuid"] == record.uuid and row["status"] == "active"
    assert row["prediction_url"] == record.prediction_url and row["pid"] == record.local.pid
    assert row["model_version"] == versions["good"].model_version
    assert any(str(stored) in line for line in row["state_differs"]), row["state_differs"]

    updated = deployer.deploy_model(versions["better"])  # in place: no second server
    assert updated.uuid == record.uuid and updated.prediction_url == record.prediction_url
    assert updated.local.pid == record.local.pid
    assert _served(record) == versions["better"].model_version
    assert len(deployer.find_model_server()) == 1
    assert json.loads(stored.read_text())["model_version"] == versions["better"].model_version

    stored.write_text("not json at all")
    deleted = _cli("delete", short, "--yes")
    assert deleted.exit_code == 0 and "Deleted" in deleted.output, deleted.output
    assert not record.local.runtime_dir.exists() and lp.process(record) is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(record.health_url, timeout=2)
