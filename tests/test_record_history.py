"""A deploy killed at the worst moments leaves a true record: real gunicorn servers, the deploying
process SIGKILLed at a named step (`CTCD_TEST_PAUSE`).

- Killed after it wrote the desired state (`desired-written`), before it wrote the record: the
  server converges on the new version by itself, and the record's history has that version
  (the master records what it converged on), so rollback can go back to it; `describe` says
  where the stored record differs and `start` rewrites it.
- Killed while copying the model for a server's first deploy (`staging`): the half-made server
  is listed as such, with what to do, and the next deploy finishes it (no folder is left).
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from blocks import MLflowModelDeployer
from ctcd.cli import app
from tests.interrupt import deploy_killed_at, eventually

pytestmark = pytest.mark.server


def _served(record) -> str | None:
    url = record.prediction_url.replace("/invocations", "/metadata")
    try:
        return str(httpx.get(url, timeout=5).json()["model_version"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


@pytest.mark.timeout(600)
def test_a_version_served_after_its_deploy_was_killed_is_in_the_history(versions, ctcd_home):
    good, better = versions["good"].model_version, versions["better"].model_version
    deployer = MLflowModelDeployer()
    first = deployer.deploy_model(versions["good"])
    runtime = deploy_killed_at(versions["better"], "desired-written", ctcd_home / "servers")
    assert runtime == first.local.runtime_dir

    def converged():
        record = deployer.get_model_server(first.uuid)
        ok = record.status.value == "active" and record.worker_versions
        ok = ok and record.history[-1:] == [better]  # the master records it once converged
        return record if ok and set(record.worker_versions.values()) == {better} else None

    record = eventually(converged, 120, f"the server serving {better} on its own, recorded")
    assert _served(record) == better
    assert record.history == [good, better]  # what served, though the deploy never said so
    runner = CliRunner()
    described = runner.invoke(app, ["models", "describe", first.uuid[:8], "--json"])
    assert described.exit_code == 0, described.output
    shown = json.loads(described.stdout)
    assert shown["history"] == [good, better] and shown["model_version"] == better
    assert any(
        "service.json" in line and "ctcd models start" in line for line in shown["state_differs"]
    ), shown["state_differs"]

    started = runner.invoke(app, ["models", "start", first.uuid[:8]])  # repairs the record
    assert started.exit_code == 0 and f"v{better}" in started.output, started.output
    stored = json.loads((runtime / "service.json").read_text())
    assert stored["history"] == [good, better] and stored["model_version"] == better
    assert deployer.get_model_server(first.uuid).observed.state_differs == []

    rolled = deployer.rollback_model_server(first.uuid)  # back to the version before
    assert rolled.model_version == good and _served(rolled) == good
    assert rolled.history == [good, better, good]


@pytest.mark.timeout(600)
def test_a_first_deploy_killed_while_copying_its_model_is_listed_and_finished(versions, ctcd_home):
    servers = ctcd_home / "servers"
    runtime = deploy_killed_at(versions["good"], "staging", servers)
    version = versions["good"].model_version
    assert not (runtime / "models" / version).exists(), "killed before the copy was in place"
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert row["uuid"] == runtime.name and row["status"] == "error"
    message = row["status_message"]
    assert "never started" in message and f"ctcd models start {runtime.name[:8]}" in message
    assert f"ctcd models delete {runtime.name[:8]}" in message

    record = MLflowModelDeployer().deploy_model(versions["good"])  # the next deploy finishes it
    assert record.uuid == runtime.name and record.status.value == "active"
    assert _served(record) == version and record.history == [version]
    assert [p.name for p in servers.iterdir() if p.is_dir()] == [runtime.name]
    assert [p.name for p in (runtime / "models").iterdir()] == [version]  # nothing half-made
