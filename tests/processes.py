"""Starting and stopping the server processes tests run (each in its own process group)."""

from __future__ import annotations

import os
import signal
import subprocess

from blocks.local_process import free_port


def loopback_port() -> int:
    return free_port("127.0.0.1")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group a test started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
