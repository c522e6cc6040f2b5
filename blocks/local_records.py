"""The records of local model servers: read from each runtime folder's `service.json`, written
back atomically, and observed on every read (the process, its workers, the desired state).

The record stores what was asked; what is observed (status and why, live workers and the
version each serves, the prediction log's counts) is computed from the processes and files
whenever a record is read, never stored.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from blocks import local_process as lp
from blocks.deployer import DeploymentConfig
from blocks.service import ServiceRecord, ServiceState
from ctcd.files import write_json
from ctcd.serving import desired as ds
from ctcd.serving.predlog import read_stats

RECORD = "service.json"
KEEP_MODEL_COPIES = 3
# Fields of the desired state that a deploy writes before the record (it may be killed between).
_DESIRED_FIELDS = ("model_version", "model_uri", "run_id", "flow_run_id")


def stage(runtime: Path, config: DeploymentConfig) -> Path:
    """Copy the version into the runtime folder (`models/<version>`), whole or not at all."""
    import mlflow

    from ctcd.settings import tracking_uri

    dest = runtime / "models" / config.model_version
    if not (dest / "MLmodel").exists():
        mlflow.set_tracking_uri(tracking_uri())
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            path = mlflow.artifacts.download_artifacts(config.model_uri, dst_path=tmp)
            shutil.rmtree(dest, ignore_errors=True)
            Path(path).rename(dest)
    return dest


def prune(runtime: Path, keep: set[str]) -> None:
    """Keep the newest model copies (and `keep`), delete the older ones."""
    copies = sorted((runtime / "models").iterdir(), key=lambda p: p.stat().st_mtime)
    for path in copies[:-KEEP_MODEL_COPIES]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def read_records(root: Path) -> list[ServiceRecord]:
    """Every server under `root`, observed now."""
    records = []
    for path in root.glob(f"*/{RECORD}"):
        try:
            records.append(observe(ServiceRecord.model_validate_json(path.read_text())))
        except (OSError, ValueError):
            continue  # a folder being deleted or written right now
    return records


def write(record: ServiceRecord, **changes: object) -> ServiceRecord:
    """Store the record with `changes` (and a new `updated_at`); return it observed."""
    record = record.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
    write_json(record.local.runtime_dir / RECORD, record.stored())
    return observe(record)


def observe(record: ServiceRecord) -> ServiceRecord:
    """The record as it is now: model fields from the desired state (written first by a
    deploy), status, live workers and their versions from the processes themselves."""
    runtime = record.local.runtime_dir
    want = ds.read_desired(runtime) or {}
    update: dict[str, object] = {
        key: want[key] for key in _DESIRED_FIELDS if want.get(key) is not None
    }
    rejected = want.get("rejected")
    if rejected and record.last_error is None:
        update["last_error"] = (
            f"version {rejected['model_version']} was not swapped in: {rejected['reason']}"
        )
    record = record.model_copy(update=update)
    if lp.process(record) is None:
        record = record.seen(**_down(record))
    else:
        seen = lp.observe_workers(record)
        versions = {
            str(pid): (version or "loading") + (" (leaving)" if leaving else "")
            for pid, version, leaving in seen
        }
        record = record.seen(live_workers=len(seen), worker_versions=versions)
        record = record.seen(**_state(record, want, seen))
    if record.local.prediction_log_dir:
        record = record.seen(prediction_log_rows=read_stats(runtime))
    return record


def _down(record: ServiceRecord) -> dict[str, object]:
    if record.desired_state == ServiceState.INACTIVE:
        return {"status": ServiceState.INACTIVE, "status_message": "stopped"}
    last = lp.log_tail(record.local.log_path, 1)
    message = (
        f"server process {record.local.pid} is not running (exited or killed); "
        f"`ctcd models start {record.uuid[:8]}` restarts it. Last log line: {last}"
    )
    return {"status": ServiceState.ERROR, "status_message": message, "live_workers": 0}


def _state(record: ServiceRecord, want: dict[str, object], seen: ds.Seen) -> dict[str, object]:
    """Status and message of a running server: `active` once exactly the recorded number of
    workers all serve the recorded version and it answers /health; `pending`, saying why, else."""
    version, count = want.get("model_version"), want.get("workers", record.workers)
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
