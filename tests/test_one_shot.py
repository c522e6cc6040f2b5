"""The path users run without any set-up: `ctcd demo` and a script calling a flow, each in a
fresh process with no PREFECT_API_URL — so ctcd's local Prefect server (ctcd/local_api.py) is
used, not the test harness. Real processes throughout: the CLI, `prefect server start`, MLflow
on SQLite and a gunicorn model server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict[str, str]:
    """A user's shell: none of the suite's Prefect, MLflow or ctcd settings."""
    ours = ("PREFECT_", "MLFLOW_", "CTCD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        CTCD_HOME=str(tmp / "home"),
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{VENV_BIN}:{env['PATH']}",
        PYTHONPATH=str(ROOT / "tests" / "import_probe"),
    )
    return env


def _run(cmd: list[str], env: dict[str, str], probe: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, cwd=ROOT, env={**env, "CTCD_IMPORT_PROBE": str(probe)}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _server(env: dict[str, str]) -> dict:
    return json.loads((Path(env["CTCD_HOME"]) / "prefect-server" / "server.json").read_text())


def _cleanup(env: dict[str, str]) -> None:
    """Delete the model servers the demo left and stop the local Prefect server, by PID."""
    code = (
        "from blocks import MLflowModelDeployer as D; d = D()\n"
        "for r in d.find_model_server(): d.delete_model_server(r.uuid, timeout=5)\n"
        "from ctcd import local_api\n"
        "s = local_api.recorded()\n"
        "if s: local_api.stop(s)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120, check=False)


@pytest.fixture
def user_env(tmp_path: Path):
    env = _env(tmp_path)
    yield env
    _cleanup(env)


def _flow_run(api: str, flow_run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()


def _task_runs(api: str, flow_run_id: str) -> list[dict]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    return httpx.post(f"{api}/task_runs/filter", json=body, timeout=10).json()


def test_demo_then_a_script_share_one_local_server_and_import_on_one_thread(user_env, tmp_path):
    # 1. `ctcd demo`, as `make demo` runs it (a small table to keep the suite quick).
    demo = _run([str(VENV_BIN / "ctcd"), "demo", "--rows", "3000"], user_env, tmp_path / "a.json")
    assert "prediction for one order: review_score ~" in demo.stdout
    # No thread but the main one imported scikit-learn, MLflow, pandas & co. (the race of
    # issue 9: a second importing thread can get a partially initialised module).
    assert json.loads((tmp_path / "a.json").read_text()) == []
    server = _server(user_env)
    ui = f"http://127.0.0.1:{server['port']}"
    assert f"Prefect UI (the run, its tasks, logs and report): {ui}" in demo.stdout

    # 2. A later one-shot script reuses that server: no second server, no start-up to wait for.
    table = tmp_path / "home" / "data" / "customer_satisfaction_synthetic_3000_42.parquet"
    script = (
        "from flows.training import training_pipeline\n"
        f"r = training_pipeline(data_path={str(table)!r}, model_type='linear')\n"
        "print('VERSION', r.model_version)\n"
    )
    second = _run([sys.executable, "-c", script], user_env, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == []
    assert _server(user_env)["pid"] == server["pid"]
    assert "VERSION 2" in second.stdout

    # 3. Everything the script's run wrote reached the server before its process exited, and
    # the link it printed still works now that the process is gone.
    link = next(w for w in (second.stdout + second.stderr).split() if "/runs/flow-run/" in w)
    assert link.startswith(f"{ui}/runs/flow-run/")
    page = httpx.get(link, headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    flow_run_id = link.rsplit("/", 1)[-1]
    api = f"{ui}/api"
    assert _flow_run(api, flow_run_id)["state"]["type"] == "COMPLETED"
    expected = sorted(
        ["ingest_data", "validate_data", "clean_data", "train_model", "evaluate_model",
         "plot_evaluation", "register_model"]
    )  # fmt: skip
    deadline = time.monotonic() + 30  # Prefect 3 records task runs from events
    names: list[str] = []
    while time.monotonic() < deadline and len(names) < len(expected):
        names = sorted(t["name"].rsplit("-", 1)[0] for t in _task_runs(api, flow_run_id))
        time.sleep(0.5)
    assert names == expected
    logs = httpx.post(
        f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}, timeout=10
    ).json()
    assert any("Finished in state Completed" in entry["message"] for entry in logs)
    artifacts = httpx.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
        timeout=10,
    ).json()
    assert [a["key"] for a in artifacts] == ["ctcd-customer-satisfaction"]

    # 4. `ctcd prefect-server stop` ends it; status says so.
    ctcd = str(VENV_BIN / "ctcd")
    stopped = subprocess.run([ctcd, "prefect-server", "stop"], env=user_env, text=True,
                             capture_output=True, timeout=60)  # fmt: skip
    assert stopped.returncode == 0 and f"stopped: {ui}" in stopped.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api}/health", timeout=2)
    status = subprocess.run([ctcd, "prefect-server", "status"], env=user_env, text=True,
                            capture_output=True, timeout=60)  # fmt: skip
    assert status.stdout.startswith("not running")


def test_a_configured_api_url_is_left_alone(user_env, tmp_path):
    """With PREFECT_API_URL set (a real server, a worker), importing the flows starts nothing."""
    env = {**user_env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    _run([sys.executable, "-c", "import flows.training"], env, tmp_path / "c.json")
    assert not (Path(env["CTCD_HOME"]) / "prefect-server" / "server.json").exists()
