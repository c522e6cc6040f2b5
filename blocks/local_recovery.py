"""A local server's record rebuilt from its runtime folder when `service.json` is unreadable.

The folder holds the truth the record repeats: the desired state (`current.json`: model,
pipeline, step, workers, settings), what the server served (`stable.json`: the history), the
master's PID (`gunicorn.pid`, checked against the running process), and the address it
listens on (the master's `--bind`, else the last "Listening at" line of its log). So a server
whose record was garbled stays listed, can be stopped, started and deleted, and the next
deploy of its model updates it in place instead of starting a second server.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from blocks import local_process as lp
from blocks.deployer import DeploymentConfig
from blocks.service import LocalRuntime, ServiceRecord, ServiceState
from ctcd.exceptions import ModelServerError, StateFileError
from ctcd.processes import ProcessRef
from ctcd.serving import desired as ds
from ctcd.serving.settings import ServerSettings

RECORD = "service.json"
NEW_PREFIX = ".new-"  # a runtime folder being created (renamed once its record is in it)
UNKNOWN = "(unknown)"  # pipeline or step a desired state of an older ctcd does not name
_LISTENING = re.compile(rb"Listening at: http://(\[[^\]]+\]|[^:\s]+):(\d+)")


def recover(folder: Path, problem: str) -> ServiceRecord | None:
    """The record of the server in `folder` as its files and process say (None when the
    folder has no readable desired or stable state to rebuild it from). Its `state_differs`
    names `problem`."""
    try:
        want: ds.ServedModel | None = ds.read_desired(folder)
    except StateFileError:
        want = None
    stable = ds.stable_or_none(folder)
    model = want or stable
    if model is None:
        return None
    ref, address = _master(folder)
    host, port = address or _logged_address(folder / "server.log") or ("127.0.0.1", 0)
    settings = ServerSettings(**(getattr(model, "settings", None) or {}))
    base = f"http://{host}:{port}"
    history = (stable.history if stable else None) or [model.model_version]
    runtime = LocalRuntime(
        host=host, port=port, runtime_dir=folder, log_path=folder / "server.log",
        pid=ref.pid if ref else None, pid_started_at=ref.started_at if ref else None,
        prediction_log_dir=folder / "predictions" if settings.prediction_log else None,
        server_settings=settings,
    )  # fmt: skip
    written = getattr(model, "written_at", None) or folder.stat().st_mtime
    record = ServiceRecord(
        uuid=folder.name, backend="mlflow-local", model_name=model.model_name,
        model_version=model.model_version, model_uri=model.model_uri,
        pipeline_name=model.pipeline_name or UNKNOWN, step_name=model.step_name or UNKNOWN,
        run_id=model.run_id, flow_run_id=model.flow_run_id, history=history,
        workers=getattr(model, "workers", 1), prediction_url=f"{base}/invocations",
        health_url=f"{base}/health", runtime=runtime,
        created_at=datetime.fromtimestamp(folder.stat().st_mtime, UTC),
        updated_at=datetime.fromtimestamp(written, UTC),
        desired_state=ServiceState.ACTIVE,
    )  # fmt: skip
    return record.seen(state_differs=[problem])


def sweep_leftovers(root: Path, new_after: float = 60.0, bare_after: float = 3600.0) -> None:
    """Remove what interrupted creations left under the servers' folder `root`: folders still
    being built (`.new-*`, see `local_records.create`) older than `new_after` seconds, and
    folders with neither a record nor a desired state (left by an older ctcd killed while
    copying a first model) older than `bare_after`."""
    now = time.time()
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name.startswith(".lock-"):
            continue
        try:
            age = now - folder.stat().st_mtime
        except FileNotFoundError:
            continue
        building = folder.name.startswith(NEW_PREFIX) and age > new_after
        bare = (
            not folder.name.startswith(".")
            and age > bare_after
            and not any((folder / name).exists() for name in (RECORD, ds.CURRENT))
        )
        if building or bare:
            shutil.rmtree(folder, ignore_errors=True)


def _master(folder: Path) -> tuple[ProcessRef | None, tuple[str, int] | None]:
    """The running master of the server in `folder` (from `gunicorn.pid`, checked: a ctcd
    master working in this folder) and the address it binds."""
    try:
        pid = int((folder / "gunicorn.pid").read_text().strip())
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        if "ctcd.serving.master" not in cmdline or proc.cwd() != os.path.realpath(folder):
            return None, None
        ref = ProcessRef(pid, proc.create_time())
    except (OSError, ValueError, psutil.Error):
        return None, None
    bind = cmdline[cmdline.index("--bind") + 1] if "--bind" in cmdline[:-1] else ""
    host, _, port = bind.rpartition(":")
    return ref, ((host, int(port)) if port.isdigit() else None)


def _logged_address(log: Path, tail: int = 1 << 20) -> tuple[str, int] | None:
    """The address of the last "Listening at" line in the last `tail` bytes of the log."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - tail))
            found = _LISTENING.findall(handle.read())
    except OSError:
        return None
    if not found:
        return None
    host, port = found[-1]
    return host.decode().strip("[]"), int(port)


def refuse_unowned(records: list[ServiceRecord], config: DeploymentConfig) -> None:
    """Refuse to start a second server for a model whose running server's record is
    unreadable and does not say which pipeline and step own it (an older ctcd's desired
    state), naming the server and what to do."""
    for other in records:
        unowned = UNKNOWN in (other.pipeline_name, other.step_name)
        if other.model_name == config.model_name and unowned and lp.process(other):
            raise ModelServerError(
                f"Deploying {config.model_name} version {config.model_version}",
                f"server {other.uuid[:8]} serves {other.model_name} at {other.prediction_url}, "
                "but its record is unreadable and nothing says which pipeline and step it "
                "belongs to, so this deploy could start a second server beside it",
                hint=f"If this deploy replaces it, `ctcd models delete {other.uuid[:8]}` and "
                "deploy again.",
            )
