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
- A server that died (killed, stopped) starts again on the port it had, same database, so the
  "View at" links and the flows still running against it keep working; only when another
  process took that port does it get a new one, and says so.

Nothing of this happens when an API URL is configured (a real server, a worker, the test
harness), when Prefect's ephemeral server is switched off, or with `CTCD_LOCAL_API=0`; then
Prefect behaves as it documents.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ctcd import processes as procs
from ctcd.files import locked, read_json, write_json

START_TIMEOUT = 180.0  # a first start on a loaded 2-core machine took 33 s


@dataclass(frozen=True)
class LocalServer:
    pid: int
    started_at: float
    port: int
    log: str
    prefect_home: str
    ui_api_url: str | None = None  # what its UI was told; None in records of ctcd before it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def process(self) -> procs.ProcessRef:
        return procs.ProcessRef(self.pid, self.started_at)


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
    return server.process.alive()


def _record() -> LocalServer | None:
    """The server this CTCD_HOME started last, running or not."""
    try:
        return LocalServer(**(read_json(_folder() / "server.json") or {}))
    except TypeError:
        return None


def recorded() -> LocalServer | None:
    """The server this CTCD_HOME started, if its process still runs."""
    server = _record()
    return server if server is not None and _alive(server) else None


def _port_for(last: LocalServer | None, say: Callable[[str], None]) -> int:
    """The port the last server of this database had, so its "View at" links and the flows
    still running against it keep working; a free one (said) if something else took it."""
    if last is None or last.prefect_home != _prefect_home():
        return procs.free_port()
    if not procs.port_in_use("127.0.0.1", last.port):
        return last.port
    port = procs.free_port()
    say(
        f"The local Prefect server's port {last.port} is taken by another process: starting "
        f"it on port {port} instead. Links to {last.url} no longer work (same runs, new port)."
    )
    return port


def _warn(message: str) -> None:
    print(f"ctcd: {message}", file=sys.stderr)


def _spawn(port: int) -> LocalServer:
    log = _folder() / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    # `--port` moves the API but not what the UI is told (`/ui-settings`: the configured server
    # port, 4200 by default), so the UI would call another server or none: tell it. The UI's
    # root opens the V1 UI, the one the run links open (and whose block Edit form keeps nested
    # blocks: see blocks/ui.py); "Switch to V2 UI" is one click away.
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.update(PREFECT_SERVER_UI_API_URL=api_url, PREFECT_UI_URL=f"http://127.0.0.1:{port}")
    env.setdefault("PREFECT_SERVER_UI_V2_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    ref = procs.spawn_detached(cmd, log, env)
    server = LocalServer(ref.pid, ref.started_at, port, str(log), _prefect_home(), api_url)
    write_json(_folder() / "server.json", asdict(server))
    return server


def ensure(say: Callable[[str], None] = _warn) -> LocalServer:
    """The running server for this CTCD_HOME and PREFECT_HOME, started if there is none: on
    the port the last one had when that is free (a server that died comes back where its
    links and running flows expect it)."""
    with locked(_folder() / ".lock"):
        last = _record()
        server = last if last is not None and _alive(last) else None
        if server is not None and (
            server.prefect_home != _prefect_home()  # it serves another database
            or server.ui_api_url != server.api_url  # its UI calls another port (older ctcd)
        ):
            stop(server)
            server = None
        return server or _spawn(_port_for(last, say))


def prepare() -> None:
    """Choose (or start) the server without waiting for it, so it starts while the caller
    goes on (`ctcd demo` calls this before it imports the flows)."""
    global _chosen
    if _chosen is None and enabled():
        _chosen = ensure()


def healthy(server: LocalServer, timeout: float = 2.0) -> bool:
    return procs.answers(f"{server.api_url}/health", timeout)


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
def api() -> Iterator[str | None]:
    """Run the enclosed flow against the local server (started now if `prepare` did not,
    reused if it runs), once it answers, after settling the runs it left unended
    (`flow_runs.sweep`); yields its API URL. A no-op yielding None when an API URL is
    configured (a server, a worker, a test harness) or ctcd's local server is switched off
    (`enabled`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not enabled():
        yield None
        return
    server = _chosen if _chosen is not None and _alive(_chosen) else ensure()
    wait_healthy(server)
    settle(server)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


def settle(server: LocalServer) -> list[tuple[str, str]]:
    """Mark the runs this server has whose process died or whose end it missed (see
    `ctcd.flow_runs`); what it changed."""
    from ctcd import flow_runs

    return flow_runs.sweep(server.api_url)


def stop(server: LocalServer, timeout: float = 20.0) -> None:
    """End the server's process group (ctcd started it in a session of its own). Its record
    stays, so the next start uses its port again."""
    procs.stop(server.process, timeout, whole_group=True)
