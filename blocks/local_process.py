"""Process plumbing for local model servers: spawn gunicorn detached, check, signal, stop.

The truth about a local server lives in its runtime folder: `service.json` (the record),
`current.json` (the model it should serve), `server.log` and the model copies.
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
    cmd = [
        sys.executable, "-m", "gunicorn",
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


def wait_serving(record: ServiceRecord, version: str, timeout: float) -> None:
    """Block until the server answers with `version`; raise with the log tail if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process(record) is None:
            raise ModelServerError(
                f"Starting the model server for {record.model_name}",
                f"the server process (PID {record.pid}) exited",
                log_tail(record.log_path),
            )
        if served_version(record) == version:
            return
        time.sleep(0.1)
    raise ModelServerError(
        f"Serving {record.model_name} version {version} at {record.prediction_url}",
        f"not answering with that version after {timeout:.0f} s",
        log_tail(record.log_path),
        "Raise the deployer's deploy_timeout if the model is slow to load.",
    )


def _signal(record: ServiceRecord, sig: signal.Signals) -> None:
    if record.pid is not None:
        os.kill(record.pid, sig)


def workers(record: ServiceRecord) -> list[psutil.Process]:
    """The master's worker processes, oldest first."""
    master = process(record)
    if master is None:
        return []
    try:
        return sorted(master.children(), key=lambda p: p.create_time())
    except psutil.Error:
        return []


def announced_version(runtime_dir: Path, pid: int) -> str | None:
    """The model version a worker reported once it had loaded it (see ctcd.serving.app)."""
    try:
        data = json.loads((runtime_dir / "workers" / f"{pid}.json").read_text())
        return str(data["model_version"])
    except (OSError, ValueError, KeyError):
        return None


def rolling_swap(record: ServiceRecord, runtime_dir: Path, version: str, timeout: float) -> None:
    """Replace the workers one at a time: SIGTTIN makes the master fork a worker, which loads
    the model `current.json` names while the old workers keep serving; once it announces
    `version`, SIGTTOU makes the master retire its oldest worker, which drains its requests.
    """
    deadline = time.monotonic() + timeout
    old = workers(record)
    seen = {p.pid for p in old}
    for retiring in old:
        _signal(record, signal.SIGTTIN)
        seen.add(_wait_new_worker(record, runtime_dir, version, seen, deadline))
        _signal(record, signal.SIGTTOU)
        with contextlib.suppress(psutil.Error):  # already gone
            retiring.wait(max(0.1, deadline - time.monotonic()))
    for stale in (runtime_dir / "workers").glob("*.json"):
        if int(stale.stem) not in seen:
            stale.unlink(missing_ok=True)


def _wait_new_worker(
    record: ServiceRecord, runtime_dir: Path, version: str, seen: set[int], deadline: float
) -> int:
    while time.monotonic() < deadline:
        if process(record) is None:
            raise ModelServerError(
                f"Swapping in {record.model_name} version {version}",
                "the server process exited",
                log_tail(record.log_path),
            )
        for proc in workers(record):
            if proc.pid in seen:
                continue
            got = announced_version(runtime_dir, proc.pid)
            if got == version:
                return proc.pid
            if got is not None:  # it fell back to the previous version: see ctcd.serving.app
                raise ModelLoadError(record.model_name, version, log_tail(record.log_path, 80))
        time.sleep(0.05)
    raise ModelServerError(
        f"Swapping in {record.model_name} version {version}",
        "no new worker announced that version in time",
        log_tail(record.log_path),
        "Raise the deployer's deploy_timeout if the model is slow to load.",
    )


def trim_workers(record: ServiceRecord, wanted: int, timeout: float = 15.0) -> None:
    """Retire the oldest workers until the master runs `wanted` (after a failed swap)."""
    current = workers(record)
    for retiring in current[: max(0, len(current) - wanted)]:
        _signal(record, signal.SIGTTOU)
        with contextlib.suppress(psutil.Error):
            retiring.wait(timeout)


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
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
    except httpx.HTTPError as err:
        return False, f"probe request failed: {err!r}"
    if response.status_code != 200 or "predictions" not in response.text:
        return False, f"probe answered {response.status_code}: {response.text[:500]}"
    return True, "ok"
