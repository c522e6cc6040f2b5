"""The records of local model servers: read from each runtime folder's `service.json`, written
back atomically, and observed on every read (the process, its workers, the desired state).

The record stores what was asked; what is observed (status and why, live workers and the
version each serves, the prediction log's counts) is computed from the processes and files
whenever a record is read, never stored. Where the stored record and the server's own files
disagree (a deploy killed after it wrote the desired state, a version the server served that
the record lacks, an unreadable state file), the observed record follows the server and
`state_differs` says what differs and what repairs it; the next write of the record (a
deploy, `start`, `stop`) stores what was observed. A folder whose `service.json` cannot be
read is listed all the same, its record recovered from the folder (`blocks.local_recovery`).

Also here: the model copies in a runtime folder (`models/<version>/`), staged from the
registry before a version is asked for and pruned after a swap.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from blocks import local_process as lp
from blocks.deployer import DeploymentConfig
from blocks.local_recovery import NEW_PREFIX, RECORD, recover
from blocks.service import ServiceRecord, ServiceState
from ctcd.exceptions import StateFileError
from ctcd.files import is_locked, read_model, write_json
from ctcd.seams import pause_point
from ctcd.serving import desired as ds
from ctcd.serving.logstats import read_health

KEEP_MODEL_COPIES = 3
STAGING = ".staging-"  # a model copy being downloaded (models/.staging-*)


def deploy_lock(root: Path, pipeline: str, step: str, model: str) -> Path:
    """The `flock` file deploys of one (pipeline, step, model) serialize on."""
    ident = f"{pipeline}\0{step}\0{model}"
    return root / f".lock-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"


def stage(runtime: Path, config: DeploymentConfig) -> Path:
    """Copy the version into the runtime folder (`models/<version>`): downloaded into a
    temporary folder, then renamed into place. Copies an interrupted deploy left half done go
    first (the caller holds the server's deploy lock, so no other copy is in progress)."""
    import mlflow

    from ctcd.settings import tracking_uri

    dest = runtime / "models" / config.model_version
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f"{STAGING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not (dest / "MLmodel").exists():
        mlflow.set_tracking_uri(tracking_uri())
        with tempfile.TemporaryDirectory(prefix=STAGING, dir=dest.parent) as tmp:
            path = mlflow.artifacts.download_artifacts(config.model_uri, dst_path=tmp)
            pause_point("staging", runtime)
            shutil.rmtree(dest, ignore_errors=True)
            Path(path).rename(dest)
    return dest


def prune(runtime: Path, keep: set[str]) -> None:
    """Keep the newest `KEEP_MODEL_COPIES` copies, and those named in `keep`."""
    copies = [path for path in (runtime / "models").iterdir() if not path.name.startswith(".")]
    copies.sort(key=lambda p: p.stat().st_mtime)
    for path in copies[:-KEEP_MODEL_COPIES]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def never_started(record: ServiceRecord) -> bool:
    """A server whose first deploy stopped before it wrote the desired state."""
    current = record.local.runtime_dir / ds.CURRENT
    return not current.exists() and lp.process(record) is None


def read_records(root: Path) -> list[ServiceRecord]:
    """Every server under `root`, observed now."""
    records = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            record = read_record(folder)
            if record is not None:
                records.append(observe(record))
        except FileNotFoundError:
            continue  # a folder being deleted right now
    return records


def read_record(folder: Path) -> ServiceRecord | None:
    """The stored record of the server in `folder`; recovered from the folder when
    `service.json` is unreadable (or missing beside a desired state); None for a folder that
    holds no server."""
    fix = (
        "ctcd rebuilt the record from the server's desired state and process; "
        f"`ctcd models start {folder.name[:8]}` (or the next deploy) writes it again"
    )
    try:
        record = read_model(folder / RECORD, ServiceRecord, fix)
    except StateFileError as err:
        return recover(folder, str(err))
    if record is None and (folder / ds.CURRENT).exists():
        return recover(folder, f"{folder / RECORD} is missing. {fix}")
    return record


def write(record: ServiceRecord, **changes: object) -> ServiceRecord:
    """Store the record with `changes` (and a new `updated_at`; its history is what the
    server served when its master keeps one); return it observed."""
    stable = ds.stable_or_none(record.local.runtime_dir)
    if stable is not None and stable.history and "history" not in changes:
        changes["history"] = stable.history
    record = record.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
    write_json(record.local.runtime_dir / RECORD, record.stored())
    return observe(record.seen(state_differs=[]))


def create(record: ServiceRecord) -> ServiceRecord:
    """Make the runtime folder of a new server with its record already in it (so no folder
    without a record is ever seen); return the record observed."""
    runtime = record.local.runtime_dir
    building = runtime.with_name(NEW_PREFIX + runtime.name)
    building.mkdir()
    write_json(building / RECORD, record.stored())
    building.rename(runtime)
    return observe(record)


def observe(record: ServiceRecord) -> ServiceRecord:
    """The record as it is now: model fields, workers and history from the server's own
    files (the desired state, written first by a deploy; the versions the master converged
    on), status, live workers and their versions from the processes themselves."""
    runtime = record.local.runtime_dir
    differs = list(record.observed.state_differs)
    want, problem = _desired(record)
    differs += [problem] if problem else []
    deploying = _deploying(record)
    if want is not None:
        differs += [] if deploying else _stored_vs_desired(record, want)
        record = _follow_desired(record, want)
    try:
        stable = ds.read_stable(runtime)
    except StateFileError as err:
        stable = None
        differs.append(str(err))
    if stable is not None and stable.history:
        if not deploying and not _history_agrees(record.history, stable.history):
            differs.append(_history_message(record, stable.history))
        record = record.model_copy(update={"history": stable.history})
    record = record.seen(state_differs=differs)
    if lp.process(record) is None:
        record = record.seen(**_down(record, deploying))
    else:
        seen = lp.observe_workers(record, want)
        versions = {
            str(pid): (version or "loading") + (" (leaving)" if leaving else "")
            for pid, version, leaving in seen
        }
        record = record.seen(live_workers=len(seen), worker_versions=versions)
        record = record.seen(**_state(record, want or _asked(record), seen))
    if record.local.prediction_log_dir:
        live = {int(pid) for pid in record.worker_versions}
        health = read_health(runtime, live)
        record = record.seen(prediction_log_rows=health.rows,
                             prediction_log_dropped=health.dropped,
                             prediction_log_error=health.error)  # fmt: skip
    return record


def _desired(record: ServiceRecord) -> tuple[ds.DesiredState | None, str | None]:
    """The desired state, and what is wrong with it when it is unreadable (or missing while
    the server runs: its master then holds the workers as they are)."""
    runtime = record.local.runtime_dir
    try:
        want = ds.read_desired(runtime)
    except StateFileError as err:
        return None, str(err)
    if want is None and lp.process(record) is not None:
        short = record.uuid[:8]
        return None, (
            f"{runtime / ds.CURRENT} is missing while the server runs: its workers keep "
            f"serving; `ctcd models start {short}` (or the next deploy) writes it again"
        )
    return want, None


def _deploying(record: ServiceRecord) -> bool:
    """Whether a deploy of this server's pipeline, step and model holds its lock now."""
    root = record.local.runtime_dir.parent
    return is_locked(deploy_lock(root, record.pipeline_name, record.step_name, record.model_name))


def _follow_desired(record: ServiceRecord, want: ds.DesiredState) -> ServiceRecord:
    update: dict[str, object] = {
        "model_version": want.model_version,
        "model_uri": want.model_uri,
        "workers": want.workers,
        "rollout": want.rollout,
    }
    update |= {key: getattr(want, key) for key in ("run_id", "flow_run_id") if getattr(want, key)}
    if want.rejected and record.last_error is None:
        update["last_error"] = (
            f"version {want.rejected.model_version} was not swapped in: {want.rejected.reason}"
        )
    return record.model_copy(update=update)


def _stored_vs_desired(record: ServiceRecord, want: ds.DesiredState) -> list[str]:
    """Where `service.json` and `current.json` disagree (a deploy killed between the two)."""
    found = []
    for what, stored, desired in (
        ("version", record.model_version, want.model_version),
        ("workers", record.workers, want.workers),
    ):
        if stored != desired:
            found.append(
                f"{what}: the record (service.json) says {stored}, the desired state "
                f"(current.json) {desired}: a deploy stopped between writing the two; the "
                f"server converges on {desired}; `ctcd models start {record.uuid[:8]}` (or the "
                "next deploy) writes the record again"
            )
    return found


def _history_agrees(stored: list[str], served: list[str]) -> bool:
    """Whether the record's history has what the server served: the same, or that and the
    version a deploy asked for (and may still be swapping in)."""
    return stored == served or (
        bool(stored) and stored == [*served, stored[-1]][-ds.HISTORY_LIMIT :]
    )


def _history_message(record: ServiceRecord, served: list[str]) -> str:
    return (
        f"history: the record (service.json) says {record.history}, the server served "
        f"{served} (stable.json, written by its master): a deploy stopped before it recorded "
        f"its version; `ctcd models start {record.uuid[:8]}` (or the next deploy) writes the "
        "record again"
    )


def _asked(record: ServiceRecord) -> ds.DesiredState:
    """The record's own version and workers as a desired state (when current.json is
    unreadable: what the server should serve is then what its record says)."""
    path = record.local.runtime_dir / "models" / record.model_version
    return ds.DesiredState(
        model_name=record.model_name, model_version=record.model_version,
        model_uri=record.model_uri, model_path=str(path), workers=record.workers, generation=0,
    )  # fmt: skip


def _down(record: ServiceRecord, deploying: bool) -> dict[str, object]:
    """Status and message of a server whose master is not running."""
    short = record.uuid[:8]
    if record.desired_state == ServiceState.INACTIVE:
        return {"status": ServiceState.INACTIVE, "status_message": "stopped"}
    if deploying:
        message = f"a deploy is starting it (version {record.model_version})"
        return {"status": ServiceState.PENDING, "status_message": message, "live_workers": 0}
    if never_started(record):
        message = (
            f"never started: its first deploy (version {record.model_version}) stopped before "
            f"the server started (killed while copying the model?); `ctcd models start {short}` "
            f"finishes it, `ctcd models delete {short}` removes it, and the next deploy of "
            f"{record.model_name} by {record.pipeline_name}/{record.step_name} finishes it too"
        )
        return {"status": ServiceState.ERROR, "status_message": message, "live_workers": 0}
    last = lp.log_tail(record.local.log_path, 1)
    which = f"server process {record.local.pid}" if record.local.pid else "the server"
    message = (
        f"{which} is not running (exited or killed); "
        f"`ctcd models start {short}` restarts it. Last log line: {last}"
    )
    return {"status": ServiceState.ERROR, "status_message": message, "live_workers": 0}


def _state(record: ServiceRecord, want: ds.DesiredState, seen: ds.Seen) -> dict[str, object]:
    """Status and message of a running server: `active` once exactly the recorded number of
    workers all serve the recorded version and it answers /health; `pending`, saying why, else."""
    version, count = ds.wanted(want), want.workers
    if ds.converged(seen, want):
        if lp.healthy(record):
            message = f"serving version {version} on {count} worker(s)"
            return {"status": ServiceState.ACTIVE, "status_message": message}
        return {"status": ServiceState.PENDING, "status_message": "not answering /health yet"}
    workers = ", ".join(
        f"{pid} " + ("loading" if v is None else f"serves {v}") + (" (leaving)" if leaving else "")
        for pid, v, leaving in seen
    )
    message = (
        f"converging on the recorded state (version {version} on {count} worker(s)); "
        f"{len(seen)} running: {workers or 'none yet'}"
    )
    return {"status": ServiceState.PENDING, "status_message": message}
