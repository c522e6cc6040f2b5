"""Helpers of bench/soak.py: the environment, the mlflow server it runs, the local Prefect
server's record and runs, and what registry, record and server each say serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "soak-model"


def environment(work: Path, mlflow_port: int) -> None:
    for name in [k for k in os.environ if k.startswith(("PREFECT_API", "MLFLOW_"))]:
        del os.environ[name]
    os.environ.pop("CTCD_LOCAL_API", None)
    os.environ.update(
        CTCD_HOME=str(work / "home"),
        PREFECT_HOME=str(work / "prefect"),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(ROOT),
        PATH=f"{BIN}:{os.environ['PATH']}",
    )


class Mlflow:
    """The `mlflow server` the soak runs: same port, database and artifact store on restart."""

    def __init__(self, work: Path, port: int):
        self.work, self.port, self.ref = work, port, None

    def start(self) -> None:
        from ctcd import processes as procs

        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.work / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.work / "artifacts"), "--workers", "1"]
        self.ref = procs.spawn_detached(cmd, self.work / "mlflow.log", cwd=self.work)
        deadline = time.monotonic() + 180
        while not procs.answers(f"http://127.0.0.1:{self.port}/health"):
            if time.monotonic() > deadline or not self.ref.alive():
                raise RuntimeError(f"mlflow server did not start: see {self.work}/mlflow.log")
            time.sleep(0.2)

    def stop(self) -> None:
        from ctcd import processes as procs

        if self.ref is not None:
            procs.stop(self.ref, 10, whole_group=True)
            self.ref = None


def ctcd_cli(*args: str) -> str:
    out = subprocess.run([str(BIN / "ctcd"), *args], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()


def prefect_record() -> dict:
    from ctcd.files import read_json

    return read_json(Path(os.environ["CTCD_HOME"], "prefect-server", "server.json")) or {}


def kill_prefect() -> str:
    from ctcd import processes as procs

    rec = prefect_record()
    ref = procs.ProcessRef(int(rec.get("pid", 0)), float(rec.get("started_at", 0)))
    if not ref.alive():  # only the server this soak's CTCD_HOME started, by its PID
        return "prefect server not running"
    os.killpg(ref.pid, signal.SIGKILL)
    return f"SIGKILLed prefect server PID {ref.pid}"


def flow_runs(states: list[str] | None = None) -> list[dict] | None:
    """The local Prefect server's flow runs (in `states` if given; None: it did not answer)."""
    import httpx

    rec = prefect_record()
    body: dict = {"limit": 200}
    if states:
        body["flow_runs"] = {"state": {"type": {"any_": states}}}
    try:
        url = f"http://127.0.0.1:{rec['port']}/api/flow_runs/filter"
        response = httpx.post(url, json=body, timeout=10)
        response.raise_for_status()
    except (httpx.HTTPError, KeyError):
        return None
    runs: list[dict] = response.json()
    return runs


def unended_runs() -> list[str] | None:
    """Flow runs left Running or Pending (None: the server did not answer)."""
    runs = flow_runs(["RUNNING", "PENDING"])
    return None if runs is None else [f"{r['name']} {r['id']} {r['state_type']}" for r in runs]


def run_states() -> dict[str, int] | None:
    """How many of the server's flow runs are in each state."""
    runs = flow_runs()
    return None if runs is None else dict(Counter(str(r["state_type"]) for r in runs))


def picture() -> dict:
    """What the registry, the record and the server each say serves now."""
    import httpx
    import mlflow

    from blocks import MLflowModelDeployer
    from blocks.lookup import find_service

    seen: dict = {}
    try:
        client = mlflow.MlflowClient()
        seen["champion"] = client.get_model_version_by_alias(MODEL, "champion").version
    except Exception as err:  # what a check sees is what it reports
        seen["champion"] = f"? {type(err).__name__}"
    try:
        record = find_service(MODEL, deployer=MLflowModelDeployer())
        seen["record"] = record.model_version
        url = record.prediction_url.replace("/invocations", "/metadata")
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=fresh, timeout=5) as http:
            answers = {str(http.get(url).json()["model_version"]) for _ in range(10)}
        seen["served"] = ",".join(sorted(answers))
    except Exception as err:
        seen.setdefault("record", f"? {type(err).__name__}")
        seen["served"] = f"? {type(err).__name__}"
    return seen


def disagreement(seen: dict) -> str | None:
    if len({seen["champion"], seen["record"], seen["served"]}) == 1:
        return None
    return f"champion v{seen['champion']}, record v{seen['record']}, served v{seen['served']}"
