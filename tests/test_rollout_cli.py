"""`ctcd models rollout status|promote|abort` and `ctcd models describe` on a real local server
with an open rollout: what a person on call reads, and the one command that decides."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import pytest
from typer.testing import CliRunner

from blocks import MLflowModelDeployer
from ctcd.cli import app
from ctcd.names import CHALLENGER, CHAMPION, ROLLOUT_TAG
from ctcd.rollout import RolloutPolicy

pytestmark = pytest.mark.server

JSON = {"Content-Type": "application/json"}


def _cli(*args: str):
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    return result


def _send(record, count: int, prefix: str) -> set[str]:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    body = (folder / "serving_input_example.json").read_bytes()
    answered = set()
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            headers = JSON | {"X-Request-ID": f"{prefix}{i}"}
            response = client.post(record.prediction_url, content=body, headers=headers)
            assert response.status_code == 200
            answered.add(response.headers["x-model-version"])
    return answered


def _alias(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@pytest.mark.timeout(600)
def test_status_describe_abort_and_promote_by_hand(versions, ctcd_home, tmp_path):
    deployer = MLflowModelDeployer(log_flush_s=0.5)
    good, better = versions["good"], versions["better"]
    name = good.model_name
    record = deployer.deploy_model(good)
    short = record.uuid[:8]
    try:
        none = _cli("rollout", "status", short)
        assert none.exit_code == 1 and "no open rollout" in none.output
        deployer.deploy_model(better, rollout=RolloutPolicy(mode="canary", traffic_percent=30))
        assert _send(record, 60, "a") == {good.model_version, better.model_version}
        import time

        time.sleep(1.5)  # the log's next flush
        status = _cli("rollout", "status", short)
        assert status.exit_code == 0, status.output
        text = " ".join(status.output.split())
        assert f"canary of v{better.model_version} beside v{good.model_version}, 30 %" in text
        assert "canary:" in text and "requests" in text  # evidence so far
        assert "would decide wait: not enough evidence yet" in text
        assert "next check" in text
        described = json.loads(_cli("describe", short, "--json").output)
        assert described["rollout"]["candidate_version"] == better.model_version
        assert described["rollout_would_decide"].startswith("wait")
        worker_versions = set(described["worker_versions"].values())
        assert worker_versions == {f"{good.model_version} + {better.model_version} (canary 30 %)"}

        aborted = _cli("rollout", "abort", short)
        assert aborted.exit_code == 0, aborted.output
        assert f"v{good.model_version} alone" in aborted.output
        assert _send(record, 30, "b") == {good.model_version}
        tags = mlflow.MlflowClient().get_model_version(name, better.model_version).tags
        assert tags[ROLLOUT_TAG].startswith("rolled back: by hand")
        assert _alias(name, CHALLENGER) == better.model_version

        deployer.deploy_model(better, rollout=RolloutPolicy(mode="shadow"))
        assert _send(record, 20, "c") == {good.model_version}  # the client gets the champion
        promoted = _cli("rollout", "promote", short)
        assert promoted.exit_code == 0, promoted.output
        assert _send(record, 20, "d") == {better.model_version}
        assert _alias(name, CHAMPION) == better.model_version
        assert _alias(name, CHALLENGER) is None
        served = deployer.get_model_server(record.uuid)
        assert served.rollout is None and served.history[-2:] == [
            good.model_version, better.model_version
        ]  # fmt: skip
        back = _cli("rollback", short)  # the old champion stays one command away
        assert back.exit_code == 0, back.output
        assert _send(record, 10, "e") == {good.model_version}
    finally:
        deployer.delete_model_server(record.uuid)
