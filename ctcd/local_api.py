"""The local Prefect server that runs with embedded defaults use.

With no `PREFECT_API_URL`, Prefect starts a temporary API server for every process that runs a
flow, waits for it (3-5 s, mostly that server importing itself) and stops it at exit, so the
"View at http://127.0.0.1:PORT/..." links it prints are dead by the time anyone clicks them.
ctcd does what Prefect users do instead: it keeps one local server running, `prefect server
start` on loopback with the UI, started by the first run and reused by the next ones.

- A flow call runs inside `api()`: it finds the server this `CTCD_HOME` recorded
  (`prefect-server/server.json`: PID, the PID's start time, port, log) or starts one, detached,
  in a session of its own; waits until it answers and points Prefect at it. Importing the flows
  starts nothing.
- `prepare()` starts (or finds) it without waiting: `ctcd demo` calls it before it imports the
  flows, so the server starts while that process imports (a separate process: no import ever
  runs in a second thread of this one).
- `ctcd prefect-server status|start|stop` shows, starts and stops it (`stop` ends the process
  group ctcd started, by PID).

Nothing of this happens when an API URL is configured (a real server, a worker, the test
harness), when Prefect's ephemeral server is switched off, or with `CTCD_LOCAL_API=0`; then
Prefect behaves as it documents.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

START_TIMEOUT = 180.0  # a first start on a loaded 2-core machine took 33 s


@dataclass(frozen=True)
class LocalServer:
    pid: int
    started_at: float
    port: int
    log: str
    prefect_home: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


_chosen: LocalServer | None = None


def _folder() -> Path:
    from ctcd.settings import ctcd_home

    folder = ctcd_home() / "prefect-server"
    folder.mkdir(exist_ok=True)
    return folder


def enabled() -> bool:
    """Whether ctcd should provide the API: nothing configured one and nobody said no."""
    if os.environ.get("CTCD_LOCAL_API", "1") == "0":
        return False
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def _prefect_home() -> str:
    from prefect.settings import PREFECT_HOME

    return str(Path(PREFECT_HOME.value()).expanduser().resolve())


def _alive(server: LocalServer) -> bool:
    import psutil

    try:
        proc = psutil.Process(server.pid)
        return (
            abs(proc.create_time() - server.started_at) < 0.5
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def recorded() -> LocalServer | None:
    """The server this CTCD_HOME started, if its process still runs."""
    try:
        data = json.loads((_folder() / "server.json").read_text())
        server = LocalServer(**data)
    except (OSError, ValueError, TypeError):
        return None
    return server if _alive(server) else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_folder() / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _spawn() -> LocalServer:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = _folder() / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    import psutil

    server = LocalServer(
        proc.pid, psutil.Process(proc.pid).create_time(), port, str(log), _prefect_home()
    )
    tmp = _folder() / ".server.json.tmp"
    tmp.write_text(json.dumps(asdict(server)))
    tmp.replace(_folder() / "server.json")
    return server


def ensure() -> LocalServer:
    """The running server for this CTCD_HOME and PREFECT_HOME, started if there is none."""
    with _locked():
        server = recorded()
        if server is not None and server.prefect_home != _prefect_home():
            stop(server)  # it serves another PREFECT_HOME's database
            server = None
        return server or _spawn()


def prepare() -> None:
    """Choose (or start) the server without waiting for it, so it starts while the caller
    goes on (`ctcd demo` calls this before it imports the flows)."""
    global _chosen
    if _chosen is None and enabled():
        _chosen = ensure()


def healthy(server: LocalServer, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{server.api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(server: LocalServer, timeout: float = START_TIMEOUT) -> None:
    from ctcd.exceptions import LocalApiError

    deadline = time.monotonic() + timeout
    while not healthy(server):
        if not _alive(server):
            raise LocalApiError(server.url, "its process exited", server.log)
        if time.monotonic() > deadline:
            raise LocalApiError(server.url, f"not answering after {timeout:.0f} s", server.log)
        time.sleep(0.05)


@contextlib.contextmanager
def api() -> Iterator[None]:
    """Run the enclosed flow against the local server (started now if `prepare` did not,
    reused if it runs), once it answers. A no-op when an API URL is configured (a server, a
    worker, a test harness) or ctcd's local server is switched off (`enabled`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not enabled():
        yield
        return
    server = _chosen if _chosen is not None and _alive(_chosen) else ensure()
    wait_healthy(server)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def stop(server: LocalServer, timeout: float = 20.0) -> None:
    """End the server's process group (ctcd started it in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(server):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    (_folder() / "server.json").unlink(missing_ok=True)
