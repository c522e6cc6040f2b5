"""MLflowModelDeployer on real gunicorn processes: lifecycle, refusal of broken models,
crash detection, locking, and the `ctcd models` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from typer.testing import CliRunner

from blocks import MLflowModelDeployer, ServiceRecord
from blocks import local_process as lp
from ctcd.cli import app
from ctcd.exceptions import DeployerNotFoundError, ModelLoadError, RollbackError
from deployments.lookup import find_service, load_deployer
from tests.conftest import SERVED_MODEL as NAME

pytestmark = pytest.mark.server


def _version_served(record: ServiceRecord) -> str | None:
    return lp.served_version(record)


def test_server_outlives_the_process_that_deployed_it(versions, ctcd_home):
    code = (
        "from blocks import MLflowModelDeployer, DeploymentConfig;"
        f"c = DeploymentConfig.model_validate_json({versions['good'].model_dump_json()!r});"
        "print(MLflowModelDeployer().deploy_model(c).prediction_url)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    [record] = MLflowModelDeployer().find_model_server()
    assert record.status.value == "active" and record.local.host == "127.0.0.1"
    assert record.prediction_url == done.stdout.strip().splitlines()[-1]
    assert _version_served(record) == versions["good"].model_version
    example = Path(
        record.local.runtime_dir, "models", record.model_version, "serving_input_example.json"
    )
    response = httpx.post(
        record.prediction_url,
        content=example.read_bytes(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5


def test_broken_version_is_refused_and_the_old_one_keeps_serving(versions, ctcd_home):
    deployer = MLflowModelDeployer()
    first = deployer.deploy_model(versions["good"])
    with pytest.raises(ModelLoadError, match="keeps serving its current version") as info:
        deployer.deploy_model(versions["broken"])
    message = str(info.value)  # carries the cause, from the server log
    assert "failed to load or to score its input example" in message
    assert "Traceback" in message and "skops" in message.lower()
    [record] = deployer.find_model_server()
    assert record.local.pid == first.local.pid and record.status.value == "active"
    assert _version_served(record) == versions["good"].model_version
    assert record.model_version == versions["good"].model_version
    assert "Probing served-model version 3" in str(record.last_error)
    updated = deployer.deploy_model(versions["better"])
    assert updated.uuid == first.uuid and updated.prediction_url == first.prediction_url
    assert _version_served(updated) == versions["better"].model_version
    assert updated.last_error is None


def test_broken_first_deploy_starts_nothing(versions, ctcd_home):
    deployer = MLflowModelDeployer()
    with pytest.raises(ModelLoadError, match="no server was started"):
        deployer.deploy_model(versions["broken"])
    assert deployer.find_model_server() == []
    assert list((ctcd_home / "servers").glob("*/service.json")) == []


def test_stop_start_kill_and_delete(versions, ctcd_home):
    deployer = MLflowModelDeployer()
    record = deployer.deploy_model(versions["good"])
    stopped = deployer.stop_model_server(record.uuid)
    assert stopped.status.value == "inactive"
    with pytest.raises(httpx.ConnectError):
        httpx.get(record.health_url, timeout=2)
    started = deployer.start_model_server(record.uuid)
    assert started.status.value == "active" and started.prediction_url == record.prediction_url

    os.killpg(started.local.pid, signal.SIGKILL)  # the master and its workers, as an OOM kill would
    time.sleep(0.5)
    [crashed] = deployer.find_model_server()
    assert crashed.status.value == "error"
    assert f"server process {started.local.pid} is not running" in crashed.status_message
    restarted = deployer.start_model_server(record.uuid)
    assert restarted.status.value == "active" and restarted.prediction_url == record.prediction_url
    assert _version_served(restarted) == versions["good"].model_version

    assert deployer.delete_model_server(record.uuid) is True
    assert deployer.delete_model_server(record.uuid) is False
    assert lp.process(restarted) is None and deployer.find_model_server() == []


def test_concurrent_deploys_leave_one_server(versions, ctcd_home):
    deployer = MLflowModelDeployer()
    results: list[ServiceRecord] = []
    threads = [
        threading.Thread(target=lambda: results.append(deployer.deploy_model(versions["good"])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(results) == 2 and results[0].uuid == results[1].uuid
    assert len(deployer.find_model_server()) == 1


def test_pid_reuse_is_not_mistaken_for_the_server(versions, ctcd_home):
    record = MLflowModelDeployer().deploy_model(versions["good"])
    # alive, but started at another time
    impostor = record.model_copy(
        update={"runtime": record.local.model_copy(update={"pid": os.getpid()})}
    )
    assert lp.process(record) is not None and lp.process(impostor) is None


def test_saved_deployer_block_is_used_by_name(versions, ctcd_home, tmp_path):
    MLflowModelDeployer(workers=2, root_dir=str(tmp_path / "srv")).save(
        "two-workers", overwrite=True
    )
    deployer = load_deployer("two-workers")
    assert isinstance(deployer, MLflowModelDeployer) and deployer.workers == 2
    record = deployer.deploy_model(versions["good"])
    try:
        assert record.workers == 2 and Path(record.local.runtime_dir).parent == tmp_path / "srv"
        assert find_service(NAME, deployer="two-workers").uuid == record.uuid
        workers = [p for p in lp.process(record).children() if "gunicorn" in " ".join(p.cmdline())]
        assert len(workers) == 2
    finally:
        deployer.delete_model_server(record.uuid)
    with pytest.raises(DeployerNotFoundError, match="No saved deployer block named 'nope'"):
        load_deployer("nope")


def test_cli_inspects_and_manages_servers(versions, ctcd_home):
    runner = CliRunner()
    record = MLflowModelDeployer().deploy_model(versions["good"])
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0
    [row] = json.loads(listed.output)
    for key in (
        "uuid",
        "model_name",
        "model_version",
        "pipeline_name",
        "step_name",
        "status",
        "prediction_url",
        "model_uri",
        "last_error",
    ):
        assert key in row
    assert row["status"] == "active" and row["uuid"] == record.uuid
    table = runner.invoke(app, ["models", "list", "--model", NAME])
    assert record.uuid[:8] in table.output and "active" in table.output
    assert (
        runner.invoke(app, ["models", "url", record.uuid[:8]]).output.strip()
        == record.prediction_url
    )
    described = runner.invoke(app, ["models", "describe", record.uuid[:8], "--json"])
    assert json.loads(described.output)["model_uri"] == versions["good"].model_uri
    assert "Booting worker" in runner.invoke(app, ["models", "logs", record.uuid[:8]]).output
    assert runner.invoke(app, ["models", "stop", record.uuid[:8]]).output.startswith("inactive")
    assert runner.invoke(app, ["models", "list", "--running", "--json"]).output.strip() == "[]"
    assert runner.invoke(app, ["models", "start", record.uuid[:8]]).output.startswith("active")
    missing = runner.invoke(app, ["models", "describe", "ffffffff"])
    assert missing.exit_code == 1 and "No model server matches uuid 'ffffffff'" in missing.output
    assert runner.invoke(app, ["models", "delete", record.uuid, "--yes"]).exit_code == 0
    again = runner.invoke(app, ["models", "delete", record.uuid, "--yes"])
    assert again.exit_code == 0 and "Not found" in again.output


def test_rollback_serves_the_previous_version_and_moves_champion(versions, ctcd_home):
    deployer = MLflowModelDeployer()
    first = deployer.deploy_model(versions["good"])
    with pytest.raises(RollbackError, match="has served no other version"):
        deployer.rollback_model_server(first.uuid)
    deployer.deploy_model(versions["better"])
    rolled = deployer.rollback_model_server(first.uuid)
    assert rolled.uuid == first.uuid and rolled.prediction_url == first.prediction_url
    assert _version_served(rolled) == versions["good"].model_version
    champion = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == versions["good"].model_version
    assert rolled.history == [versions[k].model_version for k in ("good", "better", "good")]
    with pytest.raises(RollbackError, match="has no registered version 999"):
        deployer.rollback_model_server(first.uuid, to_version="999")
    runner = CliRunner()
    to_better = [
        "models",
        "rollback",
        first.uuid[:8],
        "--to-version",
        versions["better"].model_version,
    ]
    done = runner.invoke(app, to_better)
    assert done.exit_code == 0 and f"v{versions['better'].model_version}" in done.output
    assert _version_served(rolled) == versions["better"].model_version
    bad = runner.invoke(app, ["models", "rollback", first.uuid[:8], "--to-version", "999"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1  # one line, the reason
