"""`MLflowModelDeployer`: serves registered MLflow model versions from local gunicorn servers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field, HttpUrl

from blocks import local_process as lp
from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.service import ServiceRecord, ServiceState
from blocks.ui import logo
from ctcd.exceptions import ModelLoadError, ModelServerError
from ctcd.serving import desired as ds
from ctcd.serving.predlog import read_stats
from ctcd.settings import ctcd_home

KEEP_MODEL_COPIES = 3
_OBSERVED_FIELDS = {
    "status", "status_message", "live_workers", "worker_versions", "prediction_log_rows",
}  # fmt: skip
_DESIRED_FIELDS = ("model_version", "model_uri", "run_id", "flow_run_id")


def _state(
    record: ServiceRecord, want: dict[str, object], seen: list[tuple[int, str | None, bool]]
) -> dict[str, object]:
    """Status and message of a running server: `active` once exactly the recorded number of
    workers all serve the recorded version and it answers /health; `pending`, saying why, else."""
    version, count = want.get("model_version"), want.get("workers", record.workers)
    if lp.converged(seen, want):
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


class MLflowModelDeployer(BaseModelDeployer):
    """Serves MLflow model versions on this machine: one gunicorn server (MLflow's scoring
    app on uvicorn workers) per pipeline, step and model, updated in place.

    A new version is copied into the server's runtime folder and swapped in one worker at a
    time; each new worker loads it and scores its input example before it accepts a
    connection, and the old workers serve until it has. A version that fails never takes
    traffic: the deploy raises with the server log's account, and the old version serves on.

    Example:
        ```python
        from blocks import MLflowModelDeployer

        deployer = MLflowModelDeployer.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "MLflow Model Deployer"
    _block_type_slug = "mlflow-model-deployer"
    _logo_url = logo("process")
    _description = "Serves registered MLflow model versions from local gunicorn processes."
    # The scoring protocol these servers speak (ctcd's own docs live in its README).
    _documentation_url = HttpUrl("https://mlflow.org/docs/latest/deployment/deploy-model-locally/")

    host: str = Field(
        default="127.0.0.1", description="Address the servers bind; loopback unless you need more."
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Fixed port for the server; default: a free port chosen at first deploy "
        "and kept for the server's life.",
    )
    workers: int = Field(default=1, ge=1, le=32, description="gunicorn worker processes.")
    max_batch_size: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Most rows a worker scores in one `predict` call when requests arrive "
        "together (micro-batching); 1 scores every request alone.",
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Milliseconds a batch may wait for more requests once it has one; 0 waits "
        "for none (requests that arrive while a batch is scored form the next batch).",
    )
    model_threads: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Threads the served model uses per worker (scikit-learn `n_jobs`, BLAS, "
        "OpenMP); 0 keeps the model's own setting. The registered model is not changed.",
    )
    prediction_log: bool = Field(
        default=True,
        description="Log what the server scores (time, version, request id, rows, "
        "predictions) as Parquet under its runtime folder, off the request path.",
    )
    log_sample_rate: float = Field(
        default=1.0, gt=0, le=1, description="Share of answered requests the log records."
    )
    max_log_bytes: int = Field(
        default=1024**3, ge=1, description="The log's size limit; the oldest files go first."
    )
    log_flush_s: float = Field(
        default=2.0, gt=0, le=5, description="Seconds between writes of a worker's log buffer."
    )
    log_buffer_rows: int = Field(
        default=100_000,
        ge=1,
        description="Rows a worker buffers between writes; more are dropped and counted, so "
        "logging never slows a request.",
    )
    deploy_timeout: float = Field(
        default=120.0, gt=0, description="Seconds to wait for a version to load and answer."
    )
    stop_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a server may drain before it is killed."
    )
    root_dir: str | None = Field(
        default=None,
        description="Folder for the servers' runtime folders; default `$CTCD_HOME/servers`.",
    )

    def _root(self) -> Path:
        root = Path(self.root_dir).expanduser() if self.root_dir else ctcd_home() / "servers"
        root.mkdir(parents=True, exist_ok=True)
        return root

    @contextmanager
    def _lock(self, config: DeploymentConfig) -> Iterator[object]:
        ident = f"{config.pipeline_name}\0{config.step_name}\0{config.model_name}"
        path = self._root() / f".lock-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield handle

    def _records(self) -> list[ServiceRecord]:
        records = []
        for path in self._root().glob("*/service.json"):
            try:
                records.append(self._observe(ServiceRecord.model_validate_json(path.read_text())))
            except (OSError, ValueError):
                continue  # a folder being deleted or written right now
        return records

    def _observe(self, record: ServiceRecord) -> ServiceRecord:
        """The record as it is now: model fields from the desired state (written first by a
        deploy), status, live workers and their versions from the processes themselves."""
        want = ds.read_desired(Path(str(record.runtime_dir))) or {}
        update: dict[str, object] = {
            key: want[key] for key in _DESIRED_FIELDS if want.get(key) is not None
        }
        rejected = want.get("rejected")
        if rejected and record.last_error is None:
            update["last_error"] = (
                f"version {rejected['model_version']} was not swapped in: {rejected['reason']}"
            )
        if lp.process(record) is None:
            update |= self._down(record)
        else:
            seen = lp.observe_workers(record)
            update["live_workers"] = len(seen)
            update["worker_versions"] = {
                str(pid): (version or "loading") + (" (leaving)" if leaving else "")
                for pid, version, leaving in seen
            }
            update |= _state(record, want, seen)
        if record.prediction_log_dir:
            update["prediction_log_rows"] = read_stats(Path(str(record.runtime_dir)))
        return record.model_copy(update=update)

    def _down(self, record: ServiceRecord) -> dict[str, object]:
        if record.desired_state == ServiceState.INACTIVE:
            return {"status": ServiceState.INACTIVE, "status_message": "stopped"}
        last = lp.log_tail(record.log_path, 1)
        message = (
            f"server process {record.pid} is not running (exited or killed); "
            f"`ctcd models start {record.uuid[:8]}` restarts it. Last log line: {last}"
        )
        return {"status": ServiceState.ERROR, "status_message": message, "live_workers": 0}

    def _write_record(self, record: ServiceRecord, **changes: object) -> ServiceRecord:
        record = record.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
        data = record.model_dump(mode="json", exclude=_OBSERVED_FIELDS)
        lp.write_json(Path(str(record.runtime_dir)) / "service.json", data)
        return self._observe(record)

    def _stage(self, runtime: Path, config: DeploymentConfig) -> Path:
        """Copy the version into the runtime folder (`models/<version>`)."""
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

    def _desire(self, runtime: Path, config: DeploymentConfig, uuid: str, workers: int) -> int:
        """Write the desired state (durably, before anything else changes); its generation."""
        model = {**config.model_dump(), "uuid": uuid, "model_path": str(runtime / "models" /
                 config.model_version)}  # fmt: skip
        generation = ds.set_desired(runtime, model, workers)
        assert generation is not None  # unconditional writes always happen
        return generation

    def _create(self, config: DeploymentConfig, timeout: float | None) -> ServiceRecord:
        timeout = timeout or self.deploy_timeout
        uuid = str(uuidlib.uuid4())
        runtime = self._root() / uuid
        runtime.mkdir()
        try:
            model = self._stage(runtime, config)
        except Exception:
            shutil.rmtree(runtime, ignore_errors=True)
            raise
        port = self.port or lp.free_port(self.host)
        base = f"http://{self.host}:{port}"
        record = ServiceRecord(
            uuid=uuid,
            backend="mlflow-local",
            **config.model_dump(),
            prediction_url=f"{base}/invocations",
            health_url=f"{base}/health",
            log_path=str(runtime / "server.log"),
            host=self.host,
            port=port,
            workers=self.workers,
            server_settings={
                "max_batch_size": self.max_batch_size,
                "max_batch_wait_ms": self.max_batch_wait_ms,
                "model_threads": self.model_threads,
                "prediction_log": int(self.prediction_log),
                "log_sample_rate": self.log_sample_rate,
                "max_log_bytes": self.max_log_bytes,
                "log_flush_s": self.log_flush_s,
                "log_buffer_rows": self.log_buffer_rows,
            },
            prediction_log_dir=str(runtime / "predictions") if self.prediction_log else None,
            runtime_dir=str(runtime),
            history=[config.model_version],
        )
        generation = self._desire(runtime, config, uuid, self.workers)
        try:
            record = self._launch(record, generation, timeout)
            ok, output = lp.probe_live(record, model)
        except ModelServerError as err:
            ok, output = False, str(err)
        if not ok:
            tail = lp.log_tail(record.log_path)
            self._delete(record, self.stop_timeout)
            raise ModelLoadError(
                config.model_name, config.model_version, f"{output}\n{tail}",
                "no server was started",
            )  # fmt: skip
        return record

    def _launch(self, record: ServiceRecord, generation: int, timeout: float) -> ServiceRecord:
        lp.sweep_orphans(record, self.stop_timeout)
        if lp.port_in_use(record.host, record.port):
            error = (
                f"port {record.port} on {record.host} is taken by another process; free it, "
                "or delete this server and deploy again to get a new port"
            )
            self._write_record(record, last_error=error, desired_state=ServiceState.ACTIVE)
            raise ModelServerError(f"Starting the server for {record.model_name}", error)
        pid, started = lp.spawn(record, Path(str(record.runtime_dir)))
        record = self._write_record(
            record, pid=pid, pid_started_at=started, desired_state=ServiceState.ACTIVE
        )
        try:
            lp.wait_converged(record, generation, timeout)
        except ModelServerError as err:
            self._write_record(record, last_error=str(err))
            raise
        return self._write_record(record, last_error=None)

    def _update(
        self, record: ServiceRecord, config: DeploymentConfig, timeout: float | None
    ) -> ServiceRecord:
        """Write the desired state first, then let the server's master converge on it
        (`ctcd.serving.master`) and wait. Killing this process at any point leaves the
        server converging on the desired state by itself."""
        timeout = timeout or self.deploy_timeout
        runtime = Path(str(record.runtime_dir))
        self._stage(runtime, config)
        generation = self._desire(runtime, config, record.uuid, record.workers)
        ds.pause_point("desired-written", runtime)
        history = [*record.history, config.model_version][-20:]
        updated = self._write_record(
            record.model_copy(update={**config.model_dump(), "history": history}),
            desired_state=ServiceState.ACTIVE,
        )
        if lp.process(record) is None:
            return self._launch(updated, generation, timeout)
        lp.wake(record)
        try:
            lp.wait_converged(updated, generation, timeout)
        except ModelLoadError as err:  # the master set the desired state back to the stable one
            self._write_record(record, last_error=str(err))
            with contextlib.suppress(ModelServerError):  # it retires the extra worker
                lp.wait_converged(record, generation + 1, self.stop_timeout)
            raise
        except ModelServerError as err:
            reverted = self._undo(record, config.model_version, generation, str(err))
            self._write_record(record if reverted else updated, last_error=str(err))
            raise
        stable = ds.read_json(runtime / ds.STABLE) or {}
        self._prune(runtime, keep={config.model_version, str(stable.get("model_version"))})
        return self._write_record(updated, last_error=None)

    def _undo(self, record: ServiceRecord, version: str, generation: int, error: str) -> bool:
        """After a timeout, ask a live server to go back to the version all its workers served
        last (True if it was asked); a dead one keeps the desired version (`start` serves it)."""
        runtime = Path(str(record.runtime_dir))
        stable = ds.read_json(runtime / ds.STABLE)
        if stable is None or lp.process(record) is None:
            return False
        rejected = {"model_version": version, "reason": error.splitlines()[0]}
        written = ds.set_desired(runtime, stable, record.workers, generation, rejected)
        lp.wake(record)
        return written is not None

    def _prune(self, runtime: Path, keep: set[str]) -> None:
        copies = sorted((runtime / "models").iterdir(), key=lambda p: p.stat().st_mtime)
        for path in copies[:-KEEP_MODEL_COPIES]:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _start(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        """Start a stopped or dead server with its desired state; a running one that has not
        converged (`pending`) is woken and waited for."""
        timeout = timeout or self.deploy_timeout
        runtime = Path(str(record.runtime_dir))
        want = ds.read_desired(runtime) or {}
        generation = int(want.get("generation", 0))
        if lp.process(record) is None:
            return self._launch(record, generation, timeout)
        lp.wake(record)
        lp.wait_converged(record, generation, timeout)
        return self._write_record(record, desired_state=ServiceState.ACTIVE)

    def _stop(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        lp.terminate(record, timeout or self.stop_timeout)
        lp.sweep_orphans(record, timeout or self.stop_timeout)
        return self._write_record(record, desired_state=ServiceState.INACTIVE)

    def _delete(self, record: ServiceRecord, timeout: float | None) -> None:
        lp.terminate(record, timeout or self.stop_timeout)
        lp.sweep_orphans(record, timeout or self.stop_timeout)
        shutil.rmtree(str(record.runtime_dir), ignore_errors=True)

    def _logs(self, record: ServiceRecord, tail: int | None) -> list[str]:
        if not record.log_path or not Path(record.log_path).exists():
            return []
        lines = Path(record.log_path).read_text(errors="replace").splitlines()
        return lines[-tail:] if tail else lines

    def _follow(self, record: ServiceRecord) -> Iterator[str]:
        with open(str(record.log_path), errors="replace") as handle:
            handle.seek(0, 2)
            while True:
                line = handle.readline()
                if line:
                    yield line.rstrip("\n")
                else:
                    time.sleep(0.25)
