"""Processes ctcd starts and must find again: a server started detached, known by its PID and
the PID's start time (so a reused PID is never mistaken for it), probed over HTTP, and stopped
with SIGTERM, then SIGKILL for whatever is left of its process group.

Used for the local model servers (`blocks/local_process.py`), the local Prefect server
(`ctcd/local_api.py`), the benchmarks and the tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

# A PID's start time as psutil reports it varies by a few ms between reads on some kernels.
_SAME_START = 0.5


@dataclass(frozen=True)
class ProcessRef:
    """A process as ctcd recorded it: its PID and that PID's start time."""

    pid: int
    started_at: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, psutil.Process(pid).create_time())

    def process(self) -> psutil.Process | None:
        """The process, or None if it is gone, a zombie, or the PID now belongs to another."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started_at) > _SAME_START:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on `host:port`."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def spawn_detached(
    cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> ProcessRef:
    """Start `cmd` in a session (and process group) of its own, so it outlives this process
    and one signal reaches all of it; its output is appended to `log`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    return ProcessRef.of(proc.pid)


def stop(ref: ProcessRef, timeout: float, whole_group: bool = False) -> bool:
    """SIGTERM the process (its whole process group with `whole_group`), wait up to `timeout`
    seconds for it to end, then SIGKILL its process group. False if it was not running."""
    proc = ref.process()
    if proc is None:
        return False
    with contextlib.suppress(ProcessLookupError, psutil.Error):
        if whole_group:
            os.killpg(ref.pid, signal.SIGTERM)
        else:
            proc.terminate()
    try:
        proc.wait(timeout)  # reaps it when it is this process's child
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.wait(5)
    except psutil.Error:
        pass
    return True


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 within `timeout` seconds."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
