"""Killing a deploy at a named step (`ctcd.seams`), and waiting for what must follow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blocks import DeploymentConfig


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`check()`'s first truthy result within `timeout` seconds; else fail saying `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def deploy_killed_at(
    config: DeploymentConfig, step: str, servers: Path, deployer: str = "MLflowModelDeployer()"
) -> Path:
    """Deploy `config` from a fresh process told to stop at `step` (`CTCD_TEST_PAUSE`) and
    SIGKILL it there; return the runtime folder it stopped in (`servers/<uuid>`)."""
    code = (
        "from blocks import MLflowModelDeployer, DeploymentConfig;"
        f"c = DeploymentConfig.model_validate_json({config.model_dump_json()!r});"
        f"{deployer}.deploy_model(c)"
    )
    return killed_at(code, step, servers)


def killed_at(code: str, step: str, servers: Path) -> Path:
    """Run `code` (Python) in a fresh process told to stop at `step` (`CTCD_TEST_PAUSE`) and
    SIGKILL it there; return the runtime folder it stopped in (`servers/<uuid>`)."""
    for old in servers.glob(f"*/paused-{step}"):
        old.unlink()
    env = os.environ | {"CTCD_TEST_PAUSE": step}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        markers = eventually(
            lambda: list(servers.glob(f"*/paused-{step}")) or proc.poll() is not None,
            180,
            f"the process pausing at {step}",
        )
        assert proc.poll() is None, f"the process ended before {step}: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    [marker] = markers
    marker.unlink()
    return marker.parent


FLOW_SCRIPT = """
import json, sys
from flows.continuous_deployment import continuous_deployment_pipeline as flow
try:
    r = flow(**json.loads(sys.argv[1]))
except Exception as err:
    print("ERROR", type(err).__name__, err, flush=True)
    sys.exit(3)
print("RESULT", json.dumps({"deployed": r.deployed, "version": r.model_version,
                            "reason": r.reason}), flush=True)
"""


def start_flow(
    params: dict[str, Any], pause: str, log: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Run `continuous_deployment_pipeline(**params)` in a fresh process (the flow process)
    told to stop at the steps `pause` names (comma-separated); its output goes to `log`.
    It uses this test's Prefect API."""
    import json

    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    env = os.environ | {"CTCD_TEST_PAUSE": pause, "PREFECT_API_URL": api} | (extra or {})
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", FLOW_SCRIPT, json.dumps(params)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def paused_at(proc: subprocess.Popen[bytes], folder: Path, step: str, timeout: float) -> bool:
    """Wait until `proc` pauses at `step` (True) or ends (False)."""
    marker = folder / f"paused-{step}"
    eventually(lambda: marker.exists() or proc.poll() is not None, timeout, f"pausing at {step}")
    return marker.exists()


def resume(folder: Path, step: str) -> None:
    """Let a process paused at `step` go on (`ctcd.seams`: its marker removed)."""
    (folder / f"paused-{step}").unlink()


def outcome(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The line the flow process ended with (`RESULT {...}` or `ERROR Type message`)."""
    proc.wait(timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("RESULT", "ERROR"))]
    assert lines, f"the flow process printed no outcome:\n{log.read_text()[-3000:]}"
    return lines[-1]


def served(model_name: str) -> tuple[str, str | None]:
    """The version the model's local server records, and the one it answers with."""
    import httpx

    from blocks import MLflowModelDeployer

    [record] = MLflowModelDeployer().find_model_server(model_name=model_name)
    url = record.prediction_url.replace("/invocations", "/metadata")
    try:
        answered = str(httpx.get(url, timeout=5).json()["model_version"])
    except (httpx.HTTPError, ValueError, KeyError):
        answered = None
    return record.model_version, answered


def champion(model_name: str) -> str:
    """The version the `champion` alias names."""
    import mlflow

    from ctcd.names import CHAMPION

    return str(mlflow.MlflowClient().get_model_version_by_alias(model_name, CHAMPION).version)
