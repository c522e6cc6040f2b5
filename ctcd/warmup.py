"""Start what a one-shot run needs while Python is still importing.

With no `PREFECT_API_URL`, Prefect starts a temporary API server when the first flow
begins and waits for it (3-4 s, mostly that server importing itself); ctcd then imports
MLflow and opens its store (about 2 s). `import flows` starts both at once instead: the
same temporary server Prefect would start (same command, loopback, UI off) in a subprocess,
and MLflow in a thread, so they overlap with importing scikit-learn, pandas and pandera.
Flows use that server (`prefect_api()`); it stops when the process exits, as Prefect's does.

Nothing changes when an API URL is configured (a real server, a worker, the test harness).
`CTCD_WARM_START=0` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

_started = False
_server: subprocess.Popen[bytes] | None = None
_api_url: str | None = None
_healthy = threading.Event()
_mlflow: threading.Thread | None = None


def start() -> None:
    global _started, _mlflow
    if _started or os.environ.get("CTCD_WARM_START", "1") == "0":
        return
    _started = True
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        _spawn_server()
    _mlflow = threading.Thread(target=_open_mlflow, name="ctcd-warm-mlflow", daemon=True)
    _mlflow.start()


def _spawn_server() -> None:
    global _server, _api_url
    from prefect.settings import get_current_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    _server = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    _api_url = f"http://127.0.0.1:{port}/api"
    atexit.register(_stop_server)
    threading.Thread(target=_wait_healthy, name="ctcd-warm-prefect", daemon=True).start()


def _wait_healthy(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline and _server is not None and _server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{_api_url}/health", timeout=2).status_code == 200:
                    _healthy.set()
                    return
            time.sleep(0.05)
    _healthy.set()  # gave up: prefect_api() falls back to Prefect's own temporary server


def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _server.wait(5)


def _open_mlflow() -> None:
    with contextlib.suppress(Exception):
        import mlflow
        import mlflow.sklearn
        import skops.io  # noqa: F401

        from ctcd.settings import tracking_uri

        mlflow.MlflowClient(tracking_uri()).search_experiments(max_results=1)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Run the enclosed flow against the warm server, once it answers."""
    if _server is None:
        yield
        return
    _healthy.wait()
    if _server.poll() is not None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: _api_url}):
        yield


def wait_for_mlflow() -> None:
    """Block until MLflow is imported and its store opened, so two threads never create
    the same SQLite database at once."""
    if _mlflow is not None:
        _mlflow.join()
