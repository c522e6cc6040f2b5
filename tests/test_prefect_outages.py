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


@pytest.fixture
def table(tmp_path: Path) -> Path:
    from ctcd.sample import generate

    path = tmp_path / "orders.parquet"
    generate(n_rows=3000, seed=3).to_parquet(path)
    return path


@pytest.fixture
def deploying(user_env):
    """Runs a continuous-deployment flow in a fresh process (`start(step)`), told to pause at
    a deploy's `step` (`CTCD_TEST_PAUSE`); afterwards deletes the model servers it left."""
    started: list[subprocess.Popen[str]] = []

    def start(table: Path, step: str) -> tuple[subprocess.Popen[str], Path, Path]:
        script = (
            "from flows.continuous_deployment import continuous_deployment_pipeline as p\n"
            f"r = p(data_path={str(table)!r}, model_type='linear')\n"
            "print('DEPLOYED', r.deployed)\n"
        )
        out = Path(user_env["CTCD_HOME"]).parent / f"flow-{len(started)}.log"
        with open(out, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", script], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**user_env, "CTCD_TEST_PAUSE": step}, text=True,
            )  # fmt: skip
        started.append(proc)
        servers = Path(user_env["CTCD_HOME"]) / "servers"
        found = eventually(
            lambda: list(servers.glob(f"*/paused-{step}")) or proc.poll() is not None,
            300,
            f"the flow's deploy pausing at {step}",
        )
        assert proc.poll() is None, out.read_text()[-3000:]
        return proc, found[0], out

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    code = (
        "from blocks import MLflowModelDeployer as D; d = D()\n"
        "for r in d.find_model_server(): d.delete_model_server(r.uuid, timeout=5)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env, timeout=120)


def _runs(api: str, state: str | None = None) -> list[dict]:
    body = {"flow_runs": {"state": {"type": {"any_": [state]}}}} if state else {}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


def test_a_killed_flow_process_leaves_its_run_crashed_not_running(user_env, table, deploying):
    _start(user_env)
    api = f"http://127.0.0.1:{_server(user_env)['port']}/api"
    proc, _, _ = deploying(table, "staging")
    running = _runs(api, "RUNNING")
    assert [r["name"] for r in running]  # the flow run, mid-deploy
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    # The next look at the local server (`status`, `start`, any ctcd flow starting) settles it.
    status = _ctcd(user_env, "prefect-server", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for run in running:
        assert f"flow run {run['id']}: marked Crashed" in status.stdout
        now = eventually(
            lambda run=run: (
                (r := httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json())
                and r["state_type"] == "CRASHED"
                and r
            ),
            30,
            f"flow run {run['name']} Crashed",
        )
        assert f"(PID {proc.pid}) died before the run ended" in now["state"]["message"]
    assert _runs(api, "RUNNING") == []


def test_the_server_killed_mid_run_gives_a_clear_error_and_the_real_end_later(
    user_env, table, deploying
):
    import time

    _start(user_env)
    port = _server(user_env)["port"]
    api = f"http://127.0.0.1:{port}/api"
    proc, marker, out = deploying(table, "staging")
    [run] = [r for r in _runs(api, "RUNNING") if r["parent_task_run_id"] is None]
    _kill_server(user_env)
    resumed = time.monotonic()
    marker.unlink()  # the deploy goes on, with no Prefect API
    # (before: a raw httpx.ConnectError after 3-4 minutes of retries)
    eventually(lambda: proc.poll() is not None, 120, "the flow's caller to hear")
    took = time.monotonic() - resumed
    said = out.read_text()
    print(f"\ncaller heard {took:.1f} s after the deploy resumed")
    assert proc.returncode != 0
    [error] = [line for line in said.splitlines() if line.startswith("ctcd.exceptions.")]
    assert error.startswith("ctcd.exceptions.PrefectApiLost: The Prefect API at "), said[-3000:]
    assert f"{api} stopped answering during flow run '{run['name']}'" in error
    assert "The work itself finished" in error
    assert (
        "Run `ctcd prefect-server start` to bring it back: the run is then marked Completed"
        in error
    )
    assert took < 60, f"the caller heard {took:.0f} s after the work went on"  # not 3-4 min

    again = _start(user_env)  # the same port: the run gets the end its work had
    assert f"running: http://127.0.0.1:{port}" in again.stdout
    assert f"flow run {run['id']}: marked Completed" in again.stdout
    now = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
    assert now["state_type"] == "COMPLETED", now["state"]
    assert "The Prefect API stopped answering before the run recorded it" in now["state"]["message"]
    assert _runs(api, "RUNNING") == []
