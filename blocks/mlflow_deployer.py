"""`MLflowModelDeployer`: serves registered MLflow model versions from local gunicorn servers."""

from __future__ import annotations

import contextlib
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from pydantic import Field, HttpUrl

from blocks import local_process as lp
from blocks import local_records as store
from blocks import local_rollout
from blocks.deployer import BaseModelDeployer, DeploymentConfig, candidate_config, config_of
from blocks.local_recovery import refuse_unowned, sweep_leftovers
from blocks.service import LocalRuntime, ServiceRecord, ServiceState
from blocks.ui import logo
from ctcd import processes as procs
from ctcd.exceptions import ModelLoadError, ModelServerError, StateFileError
from ctcd.files import locked
from ctcd.rollout import OpenRollout
from ctcd.seams import pause_point
from ctcd.serving import desired as ds
from ctcd.serving.settings import ServerKnobs, ServerSettings
from ctcd.settings import ctcd_home


class MLflowModelDeployer(BaseModelDeployer, ServerKnobs):
    """Serves MLflow model versions on this machine: one gunicorn server (MLflow's scoring
    app on uvicorn workers) per pipeline, step and model, updated in place.

    A new version is copied into the server's runtime folder and swapped in one worker at a
    time; each new worker loads it and scores its input example before it accepts a
    connection, and the old workers serve until it has. A version that fails never takes
    traffic: the deploy raises with the server log's account, and the old version serves on.
    A deploy also applies the block's `workers` and server settings the same way (new workers
    with the new settings, then the old ones leave); `host` and `port` stay as the server was
    created (`ctcd models describe` says when the block asks for others).

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

    def _lock(self, config: DeploymentConfig) -> AbstractContextManager[None]:
        names = (config.pipeline_name, config.step_name, config.model_name)
        return locked(store.deploy_lock(self._root(), *names))

    def _records(self) -> list[ServiceRecord]:
        return store.read_records(self._root())

    def _differences(self, record: ServiceRecord) -> list[str]:
        local = record.local
        found = []
        if self.host != local.host or (self.port is not None and self.port != local.port):
            found.append(
                f"address: the block asks for {self.host}:{self.port or 'any port'}, the server "
                f"listens on {local.host}:{local.port}; a server keeps its address: delete it "
                f"(`ctcd models delete {record.uuid[:8]}`) and deploy again to move it"
            )
        if self.workers != record.workers:
            found.append(
                f"workers: the block asks for {self.workers}, the server runs {record.workers}; "
                "the next deploy applies it, one worker at a time"
            )
        for key, (asked, running) in (
            ServerSettings.of(self).differences(local.server_settings).items()
        ):
            found.append(
                f"{key}: the block asks for {asked}, the server runs with {running}; the next "
                "deploy applies it (new workers start with it, then the old ones leave)"
            )
        return found

    def _desire(self, runtime: Path, config: DeploymentConfig, record: ServiceRecord) -> int:
        """Write the desired state (durably, before anything else changes): the version, and
        the record's workers and settings; its generation."""
        path = str(runtime / "models" / config.model_version)
        model = ds.ServedModel(**config.model_dump(), uuid=record.uuid, model_path=path)
        settings = record.local.server_settings
        generation = ds.set_desired(runtime, model, record.workers, settings=settings)
        assert generation is not None  # unconditional writes always happen
        return generation

    def _new_record(self, config: DeploymentConfig, runtime: Path) -> ServiceRecord:
        port = self.port or procs.free_port(self.host)
        base = f"http://{self.host}:{port}"
        settings = ServerSettings.of(self)
        return ServiceRecord(
            uuid=runtime.name,
            backend="mlflow-local",
            **config.model_dump(),
            history=[],  # the versions it served: none yet
            workers=self.workers,
            deployer_block=self.block_name(),
            prediction_url=f"{base}/invocations",
            health_url=f"{base}/health",
            runtime=LocalRuntime(
                host=self.host,
                port=port,
                runtime_dir=runtime,
                log_path=runtime / "server.log",
                prediction_log_dir=runtime / "predictions" if settings.prediction_log else None,
                server_settings=settings,
            ),
        )

    def _create(self, config: DeploymentConfig, timeout: float | None) -> ServiceRecord:
        root = self._root()
        sweep_leftovers(root)
        refuse_unowned(self._records(), config)
        record = store.create(self._new_record(config, root / str(uuidlib.uuid4())))
        return self._bring_up(record, config, timeout)

    def _bring_up(
        self, record: ServiceRecord, config: DeploymentConfig, timeout: float | None
    ) -> ServiceRecord:
        """Serve `config` from a server that has never served: copy the model, write the
        desired state, start the server, probe it; on any failure, remove the server."""
        runtime = record.local.runtime_dir
        try:
            model = store.stage(runtime, config)
        except Exception:
            shutil.rmtree(runtime, ignore_errors=True)
            raise
        generation = self._desire(runtime, config, record)
        try:
            record = self._launch(record, generation, timeout or self.deploy_timeout)
            ok, output = lp.probe_live(record, model)
        except ModelServerError as err:
            ok, output = False, str(err)
        if not ok:
            tail = lp.log_tail(record.local.log_path)
            self._delete(record, self.stop_timeout)
            raise ModelLoadError(
                config.model_name, config.model_version, f"{output}\n{tail}",
                "no server was started",
            )  # fmt: skip
        return record

    def _launch(self, record: ServiceRecord, generation: int, timeout: float) -> ServiceRecord:
        lp.sweep_orphans(record, self.stop_timeout)
        local = record.local
        if procs.port_in_use(local.host, local.port):
            error = (
                f"port {local.port} on {local.host} is taken by another process; free it, "
                "or delete this server and deploy again to get a new port"
            )
            store.write(record, last_error=error, desired_state=ServiceState.ACTIVE)
            raise ModelServerError(f"Starting the server for {record.model_name}", error)
        ds.seed_history(local.runtime_dir, record.history)  # no master runs: safe to write
        ref = lp.spawn(record)
        runtime = local.model_copy(update={"pid": ref.pid, "pid_started_at": ref.started_at})
        record = store.write(record, runtime=runtime, desired_state=ServiceState.ACTIVE)
        try:
            lp.wait_converged(record, generation, timeout)
        except ModelServerError as err:
            store.write(record, last_error=str(err))
            raise
        return store.write(record, last_error=None)

    def _update(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        timeout: float | None,
        keep_settings: bool = False,
    ) -> ServiceRecord:
        """Write the desired state first, then let the server's master converge on it
        (`ctcd.serving.master`) and wait. Killing this process at any point leaves the
        server converging on the desired state by itself."""
        timeout = timeout or self.deploy_timeout
        runtime = record.local.runtime_dir
        asked = self._asked(record, config, keep_settings)
        if store.never_started(record):
            return self._bring_up(store.write(asked), config, timeout)
        store.stage(runtime, config)
        generation = self._desire(runtime, config, asked)
        pause_point("desired-written", runtime)
        updated = store.write(asked, desired_state=ServiceState.ACTIVE)
        if lp.process(record) is None:
            return self._launch(updated, generation, timeout)
        lp.wake(record)
        try:
            lp.wait_converged(updated, generation, timeout)
        except ModelLoadError as err:  # the master set the desired state back to the stable one
            store.write(record, last_error=str(err))
            with contextlib.suppress(ModelServerError):  # it retires the extra worker
                lp.wait_converged(record, generation + 1, self.stop_timeout)
            raise
        except ModelServerError as err:
            reverted = self._undo(record, config.model_version, generation, str(err))
            store.write(record if reverted else updated, last_error=str(err))
            raise
        stable = ds.stable_or_none(runtime)
        store.prune(runtime, keep={config.model_version, stable.model_version if stable else ""})
        return store.write(updated, last_error=None)

    def _asked(
        self, record: ServiceRecord, config: DeploymentConfig, keep_settings: bool
    ) -> ServiceRecord:
        """The record of `record`'s server serving `config`, with this block's workers and
        settings unless `keep_settings` (its address stays either way)."""
        history = [*record.history, config.model_version][-ds.HISTORY_LIMIT :]
        update: dict[str, object] = {**config.model_dump(), "history": history, "rollout": None}
        if not keep_settings:
            settings = {"server_settings": ServerSettings.of(self)}
            update |= {"workers": self.workers, "runtime": record.local.model_copy(update=settings),
                       "deployer_block": self.block_name()}  # fmt: skip
        return record.model_copy(update=update)

    def _open_rollout(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        rollout: OpenRollout,
        timeout: float | None,
    ) -> ServiceRecord:
        """The candidate beside the model on every worker (`blocks.local_rollout`); a server
        that never started takes the version alone (there is nothing to compare it with)."""
        if store.never_started(record):
            return self._update(record, config, timeout)
        timeout = timeout or self.deploy_timeout
        return local_rollout.open_rollout(record, config, rollout, timeout, self.stop_timeout)

    def _promote(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        """The candidate alone, swapped in as a deploy is (it keeps the server's settings)."""
        config = candidate_config(record, rollout)
        return self._update(record, config, timeout, keep_settings=True)

    def _abort(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        timeout = timeout or self.deploy_timeout
        return local_rollout.abort(record, rollout, timeout, self.stop_timeout)

    def _undo(self, record: ServiceRecord, version: str, generation: int, error: str) -> bool:
        """After a timeout, ask a live server to go back to the version all its workers served
        last (True if it was asked); a dead one keeps the desired version (`start` serves it)."""
        if lp.process(record) is None:
            return False
        runtime = record.local.runtime_dir
        reason = error.splitlines()[0]
        written = ds.revert_to_stable(runtime, record.workers, generation, version, reason)
        lp.wake(record)
        return written is not None

    def _start(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        """Start a stopped or dead server with its desired state; a running one that has not
        converged (`pending`) is woken and waited for. First repaired (holding the deploy
        lock): a server whose first deploy stopped early is brought up; an unreadable desired
        state is written again from the record; the record is stored as observed."""
        timeout = timeout or self.deploy_timeout
        config = config_of(record)
        with self._lock(config):  # no deploy of this server runs meanwhile
            record = self.get_model_server(record.uuid)
            if store.never_started(record):
                return self._bring_up(record, config, timeout)
            generation = self._repair_desired(record)
            if lp.process(record) is None:
                return self._launch(record, generation, timeout)
            lp.wake(record)
            lp.wait_converged(record, generation, timeout)
            return store.write(record, desired_state=ServiceState.ACTIVE)

    def _repair_desired(self, record: ServiceRecord) -> int:
        """The desired state's generation; when `current.json` is unreadable, rewritten first
        from the record (the version it names, its workers and settings)."""
        runtime = record.local.runtime_dir
        try:
            want = ds.read_desired(runtime)
        except StateFileError:
            want = None
        if want is not None:
            return want.generation
        config = config_of(record)
        store.stage(runtime, config)
        return self._desire(runtime, config, record)

    def _stop(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        lp.terminate(record, timeout or self.stop_timeout)
        lp.sweep_orphans(record, timeout or self.stop_timeout)
        return store.write(record, desired_state=ServiceState.INACTIVE)

    def _delete(self, record: ServiceRecord, timeout: float | None) -> None:
        lp.terminate(record, timeout or self.stop_timeout)
        lp.sweep_orphans(record, timeout or self.stop_timeout)
        shutil.rmtree(record.local.runtime_dir, ignore_errors=True)

    def _logs(self, record: ServiceRecord, tail: int | None) -> list[str]:
        return lp.log_lines(record.local.log_path, tail)

    def _follow(self, record: ServiceRecord) -> Iterator[str]:
        return lp.follow_log(record.local.log_path)
