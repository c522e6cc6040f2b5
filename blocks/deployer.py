"""The deployer base: concrete lifecycle methods with their semantics, small backend hooks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field

from blocks.service import ServiceRecord, ServiceState
from ctcd.exceptions import ModelConfigError, RollbackError, ServiceNotFoundError
from ctcd.names import CHAMPION
from ctcd.rollout import OpenRollout, RolloutMode, RolloutPolicy


class DeploymentConfig(BaseModel):
    """What to serve, and which pipeline step asked for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    model_version: str
    model_uri: str
    pipeline_name: str
    step_name: str
    run_id: str | None = None
    flow_run_id: str | None = None


class BaseModelDeployer(Block, ABC):
    """Deploys registered model versions to model servers and manages their lifecycle.

    Semantics every backend keeps:
    - `deploy_model` blocks until the model serves (or raises); with `replace=True` the same
      pipeline, step and model always reuse one server: same uuid and URL, new version.
    - `stop_model_server` is reversible: `start_model_server` brings it back on the same URL.
    - `delete_model_server` is irreversible and idempotent.
    """

    _block_type_slug = "ctcd-model-deployer"

    rollout: RolloutMode = Field(
        default="replace",
        description="How a new version takes traffic when a flow does not say: `replace` (all "
        "at once), `canary` (`traffic_percent` of requests) or `shadow` (a copy of "
        "`shadow_percent` of requests, answers only logged) until `rollout-analysis` or "
        "`ctcd models rollout promote|abort` decides.",
    )
    traffic_percent: float = Field(
        default=10.0, gt=0, lt=100, description="canary: the candidate's share of requests, in %."
    )
    shadow_percent: float = Field(
        default=100.0, gt=0, le=100, description="shadow: the share of requests copied, in %."
    )

    def rollout_policy(self, asked: RolloutPolicy | None = None) -> RolloutPolicy:
        """The policy a deploy follows: the one asked for, else this block's."""
        if asked is not None:
            return asked
        return RolloutPolicy(
            mode=self.rollout, traffic_percent=self.traffic_percent,
            shadow_percent=self.shadow_percent,
        )  # fmt: skip

    def deploy_model(
        self,
        config: DeploymentConfig,
        replace: bool = True,
        timeout: float | None = None,
        keep_settings: bool = False,
        rollout: RolloutPolicy | None = None,
    ) -> ServiceRecord:
        """Serve `config`'s model version; return the record once it answers requests. An
        existing server also takes this deployer's workers (replicas) and settings, unless
        `keep_settings` (a rollback keeps what the server runs with).

        With a `canary` or `shadow` policy (`rollout`, else the block's), a running server
        keeps serving its version and opens a rollout of this one beside it (the record's
        `rollout`); `promote_rollout` or `abort_rollout` closes it. A server's first version
        has nothing to be compared with, so it takes all traffic. A `replace` deploy closes
        an open rollout: its version alone serves."""
        self._check_deployable(config)
        policy = self.rollout_policy(rollout)
        with self._lock(config):
            existing = (
                self.find_model_server(
                    pipeline_name=config.pipeline_name,
                    step_name=config.step_name,
                    model_name=config.model_name,
                )
                if replace
                else []
            )
            if not existing:
                return self._create(config, timeout)
            record = existing[0]
            if policy.mode != "replace" and record.model_version != config.model_version:
                opened = OpenRollout(
                    mode=policy.mode, percent=policy.percent,
                    champion_version=record.model_version,
                    candidate_version=config.model_version, candidate_uri=config.model_uri,
                    candidate_run_id=config.run_id,
                )  # fmt: skip
                return self._open_rollout(record, config, opened, timeout)
            return self._update(record, config, timeout, keep_settings)

    def promote_rollout(self, uuid: str, timeout: float | None = None) -> ServiceRecord:
        """Close the server's open rollout in the candidate's favour: it takes every request
        (a rolling swap, health-gated as a deploy) and the champion is kept in the history for
        `rollback_model_server`. The registry's aliases are the caller's (see flows.rollout)."""
        record = self.get_model_server(uuid)
        opened = _open(record)
        with self._lock(config_of(record)):
            return self._promote(self.get_model_server(record.uuid), opened, timeout)

    def abort_rollout(self, uuid: str, timeout: float | None = None) -> ServiceRecord:
        """Close the server's open rollout in the champion's favour: the candidate is removed
        and the champion answers every request."""
        record = self.get_model_server(uuid)
        opened = _open(record)
        with self._lock(config_of(record)):
            return self._abort(self.get_model_server(record.uuid), opened, timeout)

    def find_model_server(
        self,
        pipeline_name: str | None = None,
        step_name: str | None = None,
        model_name: str | None = None,
        run_id: str | None = None,
        uuid: str | None = None,
        running: bool | None = None,
    ) -> list[ServiceRecord]:
        """Records matching every given filter, newest first, each with its observed status."""
        wanted = {
            "pipeline_name": pipeline_name,
            "step_name": step_name,
            "model_name": model_name,
            "run_id": run_id,
            "uuid": uuid,
        }
        found = [
            record
            for record in self._records()
            if all(v is None or getattr(record, k) == v for k, v in wanted.items())
            and (running is None or record.is_running == running)
        ]
        return sorted(found, key=lambda r: r.updated_at, reverse=True)

    def get_model_server(self, uuid: str) -> ServiceRecord:
        """The record with this uuid (a unique prefix works too)."""
        matches = [r for r in self._records() if r.uuid.startswith(uuid)] if uuid else []
        if len(matches) != 1:
            raise ServiceNotFoundError(f"uuid '{uuid}'")
        return matches[0]

    def start_model_server(self, uuid: str, timeout: float | None = None) -> ServiceRecord:
        """Start a stopped or crashed server on its recorded URL; a running one is left as is
        unless its record and what it serves differ (`state_differs`): then it is repaired."""
        record = self.get_model_server(uuid)
        if record.status == ServiceState.ACTIVE and not record.observed.state_differs:
            return record
        return self._start(record, timeout)

    def stop_model_server(self, uuid: str, timeout: float | None = None) -> ServiceRecord:
        """Stop serving but keep the record and model, so `start_model_server` can resume."""
        return self._stop(self.get_model_server(uuid), timeout)

    def delete_model_server(self, uuid: str, timeout: float | None = None) -> bool:
        """Stop and forget a server. Returns False when there was nothing to delete."""
        try:
            record = self.get_model_server(uuid)
        except ServiceNotFoundError:
            return False
        self._delete(record, timeout)
        return True

    def rollback_model_server(
        self, uuid: str, to_version: str | None = None, timeout: float | None = None
    ) -> ServiceRecord:
        """Serve an earlier registered version (default: the one this server served before
        the current one) through the same health-gated path as a deploy, then give it the
        `champion` alias. The server keeps its uuid and URL."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from ctcd.settings import tracking_uri

        record = self.get_model_server(uuid)
        target = to_version or _previous_version(record)
        client = mlflow.MlflowClient(tracking_uri())
        try:
            version = client.get_model_version(record.model_name, target)
        except MlflowException as err:
            raise RollbackError(
                record.model_name, f"it has no registered version {target}"
            ) from err
        config = DeploymentConfig(
            model_name=record.model_name,
            model_version=str(version.version),
            model_uri=f"models:/{record.model_name}/{version.version}",
            pipeline_name=record.pipeline_name,
            step_name=record.step_name,
            run_id=version.run_id,
        )
        served = self.deploy_model(config, replace=True, timeout=timeout, keep_settings=True)
        client.set_registered_model_alias(record.model_name, CHAMPION, config.model_version)
        return served

    def settings_differ(self, record: ServiceRecord) -> list[str]:
        """Where this deployer asks for something else than `record`'s server runs with, and
        how each is applied; the record observed with that list (`settings_differ`)."""
        return self._differences(record)

    def block_name(self) -> str | None:
        """`slug/name` of the saved block this deployer was loaded from (None: not saved)."""
        name = self._block_document_name
        return f"{self.get_block_type_slug()}/{name}" if name else None

    def get_logs(self, uuid: str, tail: int | None = None) -> list[str]:
        """The server's log lines (the last `tail` ones when given)."""
        return self._logs(self.get_model_server(uuid), tail)

    def follow_logs(self, uuid: str) -> Iterator[str]:
        """Log lines as the server writes them, until interrupted."""
        return self._follow(self.get_model_server(uuid))

    # Hooks each backend may override.
    def _check_deployable(self, config: DeploymentConfig) -> None:
        """Refuse a version this backend cannot serve, before anything is looked up or
        created (the default accepts every version)."""

    def _differences(self, record: ServiceRecord) -> list[str]:
        """See `settings_differ` (the default finds none)."""
        return []

    def _open_rollout(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        rollout: OpenRollout,
        timeout: float | None,
    ) -> ServiceRecord:
        """Serve `config` as a candidate beside the running version (the default refuses)."""
        raise ModelConfigError(
            f"The {type(self).__name__} cannot run a {rollout.mode} rollout; deploy with "
            "rollout mode 'replace', or use a deployer that can (local MLflow, Seldon)."
        )

    def _promote(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        raise ModelConfigError(f"The {type(self).__name__} cannot run rollouts.")

    def _abort(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        raise ModelConfigError(f"The {type(self).__name__} cannot run rollouts.")

    # Hooks each backend implements.
    @abstractmethod
    def _lock(self, config: DeploymentConfig) -> AbstractContextManager[object]: ...

    @abstractmethod
    def _records(self) -> list[ServiceRecord]: ...

    @abstractmethod
    def _create(self, config: DeploymentConfig, timeout: float | None) -> ServiceRecord: ...

    @abstractmethod
    def _update(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        timeout: float | None,
        keep_settings: bool = False,
    ) -> ServiceRecord: ...

    @abstractmethod
    def _start(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord: ...

    @abstractmethod
    def _stop(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord: ...

    @abstractmethod
    def _delete(self, record: ServiceRecord, timeout: float | None) -> None: ...

    @abstractmethod
    def _logs(self, record: ServiceRecord, tail: int | None) -> list[str]: ...

    @abstractmethod
    def _follow(self, record: ServiceRecord) -> Iterator[str]: ...


def _open(record: ServiceRecord) -> OpenRollout:
    if record.rollout is None:
        raise ModelConfigError(
            f"Server {record.uuid[:8]} of {record.model_name} has no open rollout: it serves "
            f"v{record.model_version} alone (`ctcd models describe {record.uuid[:8]}`)."
        )
    return record.rollout


def config_of(record: ServiceRecord) -> DeploymentConfig:
    """What `record` serves, as a deploy would ask for it."""
    return DeploymentConfig.model_validate(
        record.model_dump(include=set(DeploymentConfig.model_fields))
    )


def candidate_config(record: ServiceRecord, rollout: OpenRollout) -> DeploymentConfig:
    """The deployment of `record`'s candidate (what a promotion serves)."""
    update = {"model_version": rollout.candidate_version, "model_uri": rollout.candidate_uri,
              "run_id": rollout.candidate_run_id, "flow_run_id": None}  # fmt: skip
    return config_of(record).model_copy(update=update)


def _previous_version(record: ServiceRecord) -> str:
    for version in reversed(record.history):
        if version != record.model_version:
            return version
    raise RollbackError(
        record.model_name,
        f"server {record.uuid[:8]} has served no other version; pass the version to serve",
    )
