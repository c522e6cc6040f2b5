"""Process plumbing for local model servers: spawn gunicorn detached, observe its workers,
wait for them to converge, stop.

The truth about a local server lives in its runtime folder: `service.json` (the record),
`current.json` (the desired state: the model it should serve and its worker count, see
`ctcd.serving.desired`), `server.log`, the workers' announcements and the model copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import psutil

from blocks.service import ServiceRecord
from ctcd.exceptions import ModelLoadError, ModelServerError
from ctcd.serving import desired as ds
from ctcd.serving.predlog import probe_request_id

# Never hand a model server the credentials of the process that deployed it.
_SECRET_ENV_PREFIXES = ("MLFLOW_TRACKING_", "VAULT_", "BAO_", "AWS_SECRET", "PREFECT_API_KEY")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def log_tail(path: str | None, lines: int = 30) -> str:
    if not path or not Path(path).exists():
        return ""
    with open(path, errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip()


def process(record: ServiceRecord) -> psutil.Process | None:
    """The server's master process, or None if it is gone or the PID now belongs to
    another process (checked against the recorded start time)."""
    if record.pid is None or record.pid_started_at is None:
        return None
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.pid_started_at) > 0.5:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def spawn(record: ServiceRecord, runtime_dir: Path) -> tuple[int, float]:
    """Start gunicorn in its own session so it outlives the deploying process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_ENV_PREFIXES)}
    env["CTCD_SERVICE_DIR"] = str(runtime_dir)
    for key, value in record.server_settings.items():  # read by ctcd.serving.app
        env[f"CTCD_{key.upper()}"] = str(value)
    cmd = [
        sys.executable, "-m", "ctcd.serving.master",
        "--config", "python:ctcd.serving.gunicorn_conf",
        "--bind", f"{record.host}:{record.port}",
        "--workers", str(record.workers),
        "--pid", str(runtime_dir / "gunicorn.pid"),
        "--chdir", str(runtime_dir),
        "ctcd.serving.app:app",
    ]  # fmt: skip
    with open(runtime_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=runtime_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )  # fmt: skip
    return proc.pid, psutil.Process(proc.pid).create_time()


def served_version(record: ServiceRecord, timeout: float = 2.0) -> str | None:
    try:
        response = httpx.get(
            record.prediction_url.replace("/invocations", "/metadata"), timeout=timeout
        )
        return str(response.json()["model_version"]) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def healthy(record: ServiceRecord, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(record.health_url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def workers(record: ServiceRecord) -> list[psutil.Process]:
    """The master's worker processes, oldest first."""
    master = process(record)
    if master is None:
        return []
    try:
        return sorted(master.children(), key=lambda p: p.create_time())
    except psutil.Error:
        return []


def observe_workers(record: ServiceRecord) -> list[tuple[int, str | None, bool]]:
    """Each live worker, oldest first: (pid, the version it announced or None while it loads,
    whether the master told it to leave). From the workers' own announcements."""
    runtime = Path(str(record.runtime_dir))
    seen = []
    for proc in workers(record):
        said = ds.announcement(runtime, proc.pid)
        version = None if said is None else str(said["model_version"])
        seen.append((proc.pid, version, ds.is_leaving(runtime, proc.pid)))
    return seen


def converged(seen: list[tuple[int, str | None, bool]], want: dict[str, Any]) -> bool:
    """Whether exactly the desired number of workers run, all serving the desired version."""
    return len(seen) == int(want.get("workers", 1)) and all(
        version == str(want["model_version"]) and not leaving for _, version, leaving in seen
    )


def wake(record: ServiceRecord) -> None:
    """Make the master look at the desired state now rather than at its next tick (SIGWINCH
    is a no-op for gunicorn when it is not daemonized; any signal ends its wait)."""
    if process(record) is not None and record.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGWINCH)


def wait_converged(record: ServiceRecord, generation: int, timeout: float) -> dict[str, Any]:
    """Block until the workers serve desired-state `generation`; return it. Raise
    ModelLoadError if the master rejected that version (a worker could not load or score it),
    ModelServerError if the server died, or nothing converged within `timeout`."""
    runtime = Path(str(record.runtime_dir))
    deadline = time.monotonic() + timeout
    target = str((ds.read_desired(runtime) or {}).get("model_version"))
    old = {pid for pid, version, _ in observe_workers(record) if version != target}
    while True:
        want = ds.read_desired(runtime) or {}
        if want.get("generation") != generation:
            rejected = want.get("rejected") or {}
            if want.get("generation") == generation + 1 and rejected:
                raise ModelLoadError(
                    record.model_name, str(rejected["model_version"]),
                    log_tail(record.log_path, 80),
                )  # fmt: skip
            raise ModelServerError(
                f"Serving {record.model_name} version {record.model_version}",
                f"the desired state changed under this deploy (now generation "
                f"{want.get('generation')}, version {want.get('model_version')})",
            )
        if process(record) is None:
            raise ModelServerError(
                f"Serving {record.model_name} version {want.get('model_version')}",
                f"the server process (PID {record.pid}) exited",
                log_tail(record.log_path),
            )
        if converged(observe_workers(record), want) and healthy(record):
            return want
        _pause_on_progress(record, runtime, want, old)
        if time.monotonic() > deadline:
            raise ModelServerError(
                f"Serving {record.model_name} version {want.get('model_version')} at "
                f"{record.prediction_url}",
                f"the workers did not all serve that version within {timeout:.0f} s",
                log_tail(record.log_path),
                "Raise the deployer's deploy_timeout if the model is slow to load.",
            )
        time.sleep(0.05)


def _pause_on_progress(
    record: ServiceRecord, runtime: Path, want: dict[str, Any], old: set[int]
) -> None:
    """Tests only (`CTCD_TEST_PAUSE`): stop this deploy once a new worker has announced the
    desired version, or once one of the old workers was told to leave (or is gone)."""
    if not os.environ.get(ds.PAUSE_ENV):
        return
    seen = observe_workers(record)
    live = {pid for pid, _, _ in seen}
    if old - live or any(leaving for pid, _, leaving in seen if pid in old):
        ds.pause_point("worker-leaving", runtime)
    if any(pid not in old and v == str(want["model_version"]) for pid, v, _ in seen):
        ds.pause_point("worker-announced", runtime)


def sweep_orphans(record: ServiceRecord, timeout: float) -> None:
    """End workers a killed master left behind (they would hold the port): processes in the
    master's process group working in this server's runtime folder. Their PDEATHSIG makes
    them drain and leave on their own; this waits for that, then kills what is left."""
    if record.pid is None or process(record) is not None:
        return
    runtime = os.path.realpath(str(record.runtime_dir))
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == record.pid and proc.cwd() == runtime:
                left.append(proc)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def terminate(record: ServiceRecord, timeout: float) -> None:
    """SIGTERM the master (graceful), then SIGKILL its whole process group after `timeout`."""
    proc = process(record)
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def probe_live(record: ServiceRecord, model_dir: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """POST the model's own serving input example to the running server."""
    example = model_dir / "serving_input_example.json"
    if not example.exists():
        return False, f"{example} is missing: log the model with an input example"
    try:
        response = httpx.post(
            record.prediction_url,
            content=example.read_bytes(),
            # marked as the deploy's own check: the prediction log leaves it out
            headers={"Content-Type": "application/json", "X-Request-ID": probe_request_id()},
            timeout=timeout,
        )
    except httpx.HTTPError as err:
        return False, f"probe request failed: {err!r}"
    if response.status_code != 200 or "predictions" not in response.text:
        return False, f"probe answered {response.status_code}: {response.text[:500]}"
    return True, "ok"
