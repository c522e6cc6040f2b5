"""Starting and stopping the server processes tests run (each in its own process group)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ctcd import processes as procs


def missing(why: str) -> None:
    """A real component a test needs is not here: fail under CI=true (.ci/run must provide
    it), skip saying why locally."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: a missing component fails the run; see .ci/run)")
    pytest.skip(why)


def loopback_port() -> int:
    return procs.free_port("127.0.0.1")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group a test started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        procs.stop(procs.ProcessRef.of(proc.pid), timeout, whole_group=True)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def start_logged(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own (so `stop_group` ends all of it), its output
    in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Return once `url` answers 200; else stop the process and raise with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_group(proc, 5)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def end_processes_under(folder: Path, timeout: float = 10.0) -> list[int]:
    """End every process this test run left that works in `folder` (a temp folder of its own):
    model servers (their command line names their runtime folder) and flow-run processes
    (their environment does), e.g. after a test timed out mid-deploy. Returns their PIDs.
    Only processes that name this run's own temp folder match, so nothing else is touched."""
    import psutil

    mark = str(folder)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in mine:
            continue
        try:
            named = any(mark in arg for arg in proc.info["cmdline"] or [])
            if named or any(mark in value for value in proc.environ().values()):
                found.append(proc)
        except psutil.Error:
            continue
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in found]
