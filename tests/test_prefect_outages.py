"""ctcd's local Prefect server (ctcd/local_api.py) and the flow runs against it, after a SIGKILL:
of the server (it comes back on its port, links keep working), of a flow's process (its run ends
Crashed, not Running forever) and of the server mid-run (the caller hears so within seconds of
the work ending, and the run gets its real final state once the server is back). Real processes
throughout: the CLI, `prefect server start`, MLflow on SQLite, flows in fresh processes with no
PREFECT_API_URL (a user's shell, not the suite's test harness)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.interrupt import eventually

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CTCD = str(VENV_BIN / "ctcd")


def _env(tmp: Path) -> dict[str, str]:
    """A user's shell: none of the suite's Prefect, MLflow or ctcd settings."""
    ours = ("PREFECT_", "MLFLOW_", "CTCD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        CTCD_HOME=str(tmp / "home"),
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        PATH=f"{VENV_BIN}:{env['PATH']}",
    )
    return env


def _server(env: dict[str, str]) -> dict:
    return json.loads((Path(env["CTCD_HOME"]) / "prefect-server" / "server.json").read_text())


def _ctcd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CTCD, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = _ctcd(env, "prefect-server", "start")
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _kill_server(env: dict[str, str]) -> None:
    """SIGKILL the recorded local Prefect server by its PID and wait until it is gone."""
    pid = _server(env)["pid"]
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not _alive(pid), 30, f"the Prefect server (PID {pid}) to end")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


@pytest.fixture
def user_env(tmp_path: Path):
    env = _env(tmp_path)
    yield env
    code = "from ctcd import local_api\ns = local_api.recorded()\nif s: local_api.stop(s)\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120, check=False)


def _a_flow_run(api: str) -> str:
    """A flow run recorded on the server (made through its API: only its record matters)."""
    flow = httpx.post(f"{api}/flows/", json={"name": "earlier-run"}, timeout=10).json()
    body = {"flow_id": flow["id"], "state": {"type": "COMPLETED", "name": "Completed"}}
    return str(httpx.post(f"{api}/flow_runs/", json=body, timeout=10).json()["id"])


def test_a_killed_local_server_comes_back_on_its_port(user_env):
    _start(user_env)
    first = _server(user_env)
    ui = f"http://127.0.0.1:{first['port']}"
    run_id = _a_flow_run(f"{ui}/api")

    _kill_server(user_env)
    again = _start(user_env)
    assert f"running: {ui}" in again.stdout
    assert _server(user_env)["pid"] != first["pid"]
    # The earlier run's API URL and its page (the "View at" link) answer again.
    assert httpx.get(f"{ui}/api/flow_runs/{run_id}", timeout=10).json()["id"] == run_id
    page = httpx.get(f"{ui}/runs/flow-run/{run_id}", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_taken_port_gives_a_new_one_and_says_so(user_env):
    _start(user_env)
    port = _server(user_env)["port"]
    _kill_server(user_env)
    with socket.socket() as squatter:  # another program took the port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # (the dead server's own connections may hold the port for a moment)
        eventually(lambda: _bound(squatter, port), 60, f"port {port} to be free again")
        squatter.listen()
        again = _start(user_env)
    moved = _server(user_env)["port"]
    assert moved != port
    assert f"port {port} is taken by another process" in again.stdout
    assert f"running: http://127.0.0.1:{moved}" in again.stdout
