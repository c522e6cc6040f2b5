"""Process plumbing for local model servers: spawn gunicorn detached, observe its workers,
wait for them to converge, stop.

The truth about a local server lives in its runtime folder: `service.json` (the record),
`current.json` (the desired state: the model it should serve, its worker count and settings,
see `ctcd.serving.desired`), `server.log`, the workers' announcements and the model copies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import psutil

from blocks.service import ServiceRecord
from ctcd import client, seams
from ctcd import processes as procs
from ctcd.exceptions import ModelLoadError, ModelServerError, StateFileError
from ctcd.serving import desired as ds
from ctcd.serving.predlog import probe_request_id

# Never hand a model server the credentials of the process that deployed it.
_SECRET_ENV_PREFIXES = ("MLFLOW_TRACKING_", "VAULT_", "BAO_", "AWS_SECRET", "PREFECT_API_KEY")


def log_tail(path: Path | str | None, lines: int = 30) -> str:
    if not path or not Path(path).exists():
        return ""
    with open(path, errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip()


def log_lines(path: Path, tail: int | None = None) -> list[str]:
    """The log's lines (the last `tail` ones when given); none when there is no log yet."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return lines[-tail:] if tail else lines


def follow_log(path: Path) -> Iterator[str]:
    """Lines as they are appended to the log, until the caller stops."""
    with open(path, errors="replace") as handle:
        handle.seek(0, 2)
        while True:
            line = handle.readline()
            if line:
                yield line.rstrip("\n")
            else:
                time.sleep(0.25)


def process(record: ServiceRecord) -> psutil.Process | None:
    """The server's master process, or None if it is gone or the PID now belongs to
    another process (checked against the recorded start time)."""
    ref = record.local.process
    return None if ref is None else ref.process()


def spawn(record: ServiceRecord) -> procs.ProcessRef:
    """Start gunicorn in its own session so it outlives the deploying process. Its settings
    reach the workers through the desired state (`current.json`), not the environment."""
    local = record.local
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SECRET_ENV_PREFIXES)}
    env["CTCD_SERVICE_DIR"] = str(local.runtime_dir)
    cmd = [
        sys.executable, "-m", "ctcd.serving.master",
        "--config", "python:ctcd.serving.gunicorn_conf",
        "--bind", f"{local.host}:{local.port}",
        "--workers", str(record.workers),
        "--pid", str(local.runtime_dir / "gunicorn.pid"),
        "--chdir", str(local.runtime_dir),
        "ctcd.serving.app:app",
    ]  # fmt: skip
    return procs.spawn_detached(cmd, local.log_path, env, local.runtime_dir)


def _url(record: ServiceRecord, path: str) -> str:
    return record.prediction_url.replace("/invocations", path)


def served_version(record: ServiceRecord, timeout: float = 2.0) -> str | None:
    """The version the worker that answers now says it serves (its `/metadata`)."""
    import httpx

    try:
        response = httpx.get(_url(record, "/metadata"), timeout=timeout)
        return str(response.json()["model_version"]) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def healthy(record: ServiceRecord, timeout: float = 2.0) -> bool:
    return procs.answers(record.health_url, timeout)


def workers(record: ServiceRecord) -> list[psutil.Process]:
    """The master's worker processes, oldest first."""
    master = process(record)
    if master is None:
        return []
    try:
        return sorted(master.children(), key=lambda p: p.create_time())
    except psutil.Error:
        return []


def observe_workers(record: ServiceRecord, want: ds.DesiredState | None = None) -> ds.Seen:
    """Each live worker, oldest first: (pid, the version it announced or None while it loads,
    whether the master told it to leave). From the workers' own announcements; `want` (default:
    the desired state, when readable) marks workers running with other settings."""
    runtime = record.local.runtime_dir
    if want is None:
        with contextlib.suppress(StateFileError):
            want = ds.read_desired(runtime)
    seen = []
    for proc in workers(record):
        said = ds.announcement(runtime, proc.pid)
        version = None if said is None else ds.served(said, want)
        seen.append((proc.pid, version, ds.is_leaving(runtime, proc.pid)))
    return seen


def wake(record: ServiceRecord) -> None:
    """Make the master look at the desired state now rather than at its next tick (SIGWINCH
    is a no-op for gunicorn when it is not daemonized; any signal ends its wait)."""
    if process(record) is not None and record.local.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.local.pid, signal.SIGWINCH)


def wait_converged(record: ServiceRecord, generation: int, timeout: float) -> ds.DesiredState:
    """Block until the workers serve desired-state `generation` and the master has recorded
    it (`stable.json`, which keeps the history); return that state. Raise ModelLoadError if
    the master rejected that version (a worker could not load or score it), ModelServerError
    if the server died, or nothing converged within `timeout`; StateFileError if the desired
    state became unreadable."""
    runtime = record.local.runtime_dir
    deadline = time.monotonic() + timeout
    want = _desired(record)
    old = {pid for pid, version, _ in observe_workers(record, want) if version != ds.wanted(want)}
    while True:
        want = _desired(record)
        if want.generation != generation:
            raise _moved_on(record, want, generation)
        if process(record) is None:
            raise ModelServerError(
                f"Serving {record.model_name} version {want.model_version}",
                f"the server process (PID {record.local.pid}) exited",
                log_tail(record.local.log_path),
            )
        seen = observe_workers(record, want)
        done = ds.converged(seen, want) and ds.master_recorded(runtime, generation)
        if done and healthy(record):
            return want
        _pause_on_progress(record, want, old, seen)
        if time.monotonic() > deadline:
            raise ModelServerError(
                f"Serving {record.model_name} version {want.model_version} at "
                f"{record.prediction_url}",
                f"the workers did not all serve that version within {timeout:.0f} s",
                log_tail(record.local.log_path),
                "Raise the deployer's deploy_timeout if the model is slow to load.",
            )
        time.sleep(0.05)


def _desired(record: ServiceRecord) -> ds.DesiredState:
    want = ds.read_desired(record.local.runtime_dir)
    if want is None:
        raise ModelServerError(
            f"Serving {record.model_name}",
            f"{record.local.runtime_dir / ds.CURRENT} is missing",
            hint=f"`ctcd models start {record.uuid[:8]}` writes it again from the record.",
        )
    return want


def _moved_on(record: ServiceRecord, want: ds.DesiredState, generation: int) -> Exception:
    """Why the desired state is no longer `generation`: the master rejected the version, or
    another deploy (or a start) wrote a newer state."""
    rejected = want.rejected
    if want.generation == generation + 1 and rejected:
        return ModelLoadError(
            record.model_name, rejected.model_version, log_tail(record.local.log_path, 80)
        )
    return ModelServerError(
        f"Serving {record.model_name} version {record.model_version}",
        f"another deploy or start changed the desired state meanwhile (now generation "
        f"{want.generation}, version {want.model_version}); the server converges on that",
    )


def _pause_on_progress(
    record: ServiceRecord, want: ds.DesiredState, old: set[int], seen: ds.Seen
) -> None:
    """Tests only (`ctcd.seams`): stop this deploy once a new worker has announced the
    desired version, or once one of the old workers was told to leave (or is gone)."""
    if not seams.pausing():
        return
    runtime = record.local.runtime_dir
    live = {pid for pid, _, _ in seen}
    if old - live or any(leaving for pid, _, leaving in seen if pid in old):
        seams.pause_point("worker-leaving", runtime)
    if any(pid not in old and v == ds.wanted(want) for pid, v, _ in seen):
        seams.pause_point("worker-announced", runtime)


def sweep_orphans(record: ServiceRecord, timeout: float) -> None:
    """End workers a killed master left behind (they would hold the port): processes in the
    master's process group working in this server's runtime folder. Their PDEATHSIG makes
    them drain and leave on their own; this waits for that, then kills what is left."""
    if record.local.pid is None or process(record) is not None:
        return
    runtime = os.path.realpath(record.local.runtime_dir)
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == record.local.pid and proc.cwd() == runtime:
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
    ref = record.local.process
    if ref is not None:
        procs.stop(ref, timeout)


def probe_live(record: ServiceRecord, model_dir: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """POST the model's own serving input example to the running server."""
    import httpx

    example = model_dir / "serving_input_example.json"
    if not example.exists():
        return False, f"{example} is missing: log the model with an input example"
    try:
        # marked as the deploy's own check: the prediction log leaves it out
        headers = {"X-Request-ID": probe_request_id()}
        response = client.post(record.prediction_url, example.read_bytes(), headers, timeout)
    except httpx.HTTPError as err:
        return False, f"probe request failed: {err!r}"
    if response.status_code != 200 or "predictions" not in response.text:
        return False, f"probe answered {response.status_code}: {response.text[:500]}"
    return True, "ok"
