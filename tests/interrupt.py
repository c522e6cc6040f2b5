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
    for old in servers.glob(f"*/paused-{step}"):
        old.unlink()
    env = os.environ | {"CTCD_TEST_PAUSE": step}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        markers = eventually(
            lambda: list(servers.glob(f"*/paused-{step}")) or proc.poll() is not None,
            180,
            f"the deploy pausing at {step}",
        )
        assert proc.poll() is None, f"the deploy ended before {step}: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    [marker] = markers
    marker.unlink()
    return marker.parent
