"""The record of one model server: what was asked of it, where it answers, what was observed
when the record was read, and what its backend needs to find it again.

- Asked (stored): the model version, pipeline and step, history, the desired state, the worker
  or replica count, the deployer block that made it; and the endpoint (`prediction_url`,
  `health_url`, `protocol`).
- `runtime`, the backend's own part (stored): `LocalRuntime` for a server on this machine (its
  address, process, runtime folder and settings), `KubernetesRuntime` for a custom resource on
  a cluster (namespace, kind and name). A third backend adds a third part here.
- `observed` (never stored, computed on every read by the deployer): status and why, live
  workers and the version each announced, the prediction log's counts.

`summary()` flattens it into the fields `ctcd models list --json` prints (the names shared
DESIGN.md keeps stable); records written in the older flat shape are read as well.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ctcd import client
from ctcd.exceptions import ModelConfigError
from ctcd.processes import ProcessRef
from ctcd.rollout import OpenRollout
from ctcd.serving.settings import ServerSettings


class ServiceState(StrEnum):
    ACTIVE = "active"
    PENDING = "pending"
    INACTIVE = "inactive"
    ERROR = "error"


def _now() -> datetime:
    return datetime.now(UTC)


class Observed(BaseModel):
    """What was seen when the record was read; never stored."""

    model_config = ConfigDict(extra="forbid")

    status: ServiceState = Field(default=ServiceState.PENDING, description="Observed state.")
    status_message: str = Field(default="", description="Why the status is what it is.")
    live_workers: int | None = Field(
        default=None, description="Worker processes running now (None when not observed)."
    )
    worker_versions: dict[str, str] = Field(
        default_factory=dict,
        description="The model version each worker (by PID) announced it serves, `loading` "
        "before it has, with `(leaving)` once told to leave.",
    )
    prediction_log_rows: dict[str, int] = Field(
        default_factory=dict,
        description="Rows the prediction log has written and dropped (buffer full or errors).",
    )
    prediction_log_dropped: dict[str, int] = Field(
        default_factory=dict, description="Rows the prediction log dropped, by reason."
    )
    prediction_log_error: str | None = Field(
        default=None,
        description="Why the prediction log cannot be written now (disk full, read-only), and "
        "what the workers do meanwhile; None while it is written.",
    )
    state_differs: list[str] = Field(
        default_factory=list,
        description="Where the stored record and what the server's own files and processes say "
        "differ (an interrupted deploy, an unreadable state file), and what repairs it; "
        "`ctcd models start` and the next deploy repair each before they act.",
    )
    settings_differ: list[str] = Field(
        default_factory=list,
        description="Where the deployer block that made this server now asks for something "
        "else than the server runs with, and how to apply it.",
    )


class LocalRuntime(BaseModel):
    """A server on this machine: gunicorn master and workers, known by PID and start time."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local"] = "local"
    host: str
    port: int
    runtime_dir: Path = Field(description="The server's folder: the truth about it.")
    log_path: Path
    pid: int | None = None
    pid_started_at: float | None = Field(default=None, description="Guards against PID reuse.")
    prediction_log_dir: Path | None = Field(
        default=None,
        description="Where the server logs what it scored (Parquet, by hour); None when off. "
        "Read it with `ctcd.serving.predlog.read_log`.",
    )
    server_settings: ServerSettings = Field(
        default_factory=ServerSettings,
        description="The settings the server runs with (batching, threads, prediction log).",
    )

    @property
    def process(self) -> ProcessRef | None:
        if self.pid is None or self.pid_started_at is None:
            return None
        return ProcessRef(self.pid, self.pid_started_at)


class KubernetesRuntime(BaseModel):
    """A custom resource on a Kubernetes cluster that a controller turns into model servers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kubernetes"] = "kubernetes"
    namespace: str
    resource_kind: str = Field(description="e.g. `SeldonDeployment`, `InferenceService`.")
    resource_name: str


Runtime = Annotated[LocalRuntime | KubernetesRuntime, Field(discriminator="kind")]
_OBSERVED = set(Observed.model_fields)


class ServiceRecord(BaseModel):
    """One model server. Asked and endpoint fields at the top; `runtime` for the backend;
    `observed` for what was seen when it was read (`status`, `status_message`, ... are
    shortcuts to it)."""

    model_config = ConfigDict(extra="forbid")

    uuid: str = Field(description="Stable id: the same pipeline, step and model keep it.")
    backend: str = Field(description="Which deployer runs it, e.g. `mlflow-local`, `seldon`.")
    model_name: str
    model_version: str
    model_uri: str = Field(description="Registry URI of the version being served.")
    pipeline_name: str
    step_name: str
    run_id: str | None = Field(default=None, description="MLflow run that produced the model.")
    flow_run_id: str | None = Field(
        default=None, description="Prefect flow run that deployed the version being served."
    )
    history: list[str] = Field(
        default_factory=list, description="Versions this server has served, oldest first."
    )
    desired_state: ServiceState = ServiceState.ACTIVE
    workers: int = Field(default=1, description="Worker processes (local) or replicas (cluster).")
    deployer_block: str | None = Field(
        default=None,
        description="The saved deployer block that made the server (`slug/name`), if any.",
    )
    last_error: str | None = Field(default=None, description="What the last action failed on.")
    prediction_url: str
    health_url: str
    rollout: OpenRollout | None = Field(
        default=None,
        description="The rollout open on this server: a candidate version beside the one "
        "serving (canary or shadow), until it is promoted or rolled back.",
    )
    protocol: client.Protocol = Field(
        default="mlflow",
        description="What `prediction_url` speaks: MLflow scoring, Seldon v1 or V2.",
    )
    runtime: Runtime
    observed: Observed = Field(default_factory=Observed)
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, data: Any) -> Any:
        """Read records written before the split (every field at the top)."""
        if not isinstance(data, dict) or "runtime" in data:
            return data
        return _unflatten(dict(data))

    # -- shortcuts -------------------------------------------------------------------------
    @property
    def status(self) -> ServiceState:
        return self.observed.status

    @property
    def status_message(self) -> str:
        return self.observed.status_message

    @property
    def live_workers(self) -> int | None:
        return self.observed.live_workers

    @property
    def worker_versions(self) -> dict[str, str]:
        return self.observed.worker_versions

    @property
    def prediction_log_rows(self) -> dict[str, int]:
        return self.observed.prediction_log_rows

    @property
    def is_running(self) -> bool:
        return self.status == ServiceState.ACTIVE

    @property
    def prediction_log_dir(self) -> Path | None:
        """Where the server logs what it scored (local servers with the log on), else None."""
        runtime = self.runtime
        return runtime.prediction_log_dir if isinstance(runtime, LocalRuntime) else None

    @property
    def local(self) -> LocalRuntime:
        """The local server's part; a clear error for a record of another backend."""
        if not isinstance(self.runtime, LocalRuntime):
            raise ModelConfigError(
                f"Server {self.uuid[:8]} is not a local server ({self.backend})."
            )
        return self.runtime

    @property
    def kube(self) -> KubernetesRuntime:
        """The cluster resource's part; a clear error for a record of another backend."""
        if not isinstance(self.runtime, KubernetesRuntime):
            raise ModelConfigError(f"Server {self.uuid[:8]} is not on Kubernetes ({self.backend}).")
        return self.runtime

    def seen(self, **observed: Any) -> ServiceRecord:
        """A copy with these observed fields replaced."""
        return self.model_copy(update={"observed": self.observed.model_copy(update=observed)})

    def stored(self) -> dict[str, Any]:
        """What a backend stores: everything but `observed` (as JSON-ready values)."""
        return self.model_dump(mode="json", exclude={"observed"})

    def summary(self) -> dict[str, Any]:
        """The fields `ctcd models list --json` prints: one flat object."""
        data = self.model_dump(mode="json", exclude={"runtime", "observed"})
        runtime = self.runtime.model_dump(mode="json", exclude={"kind"})
        return {**data, **self.observed.model_dump(mode="json"), **runtime}

    def predict(self, data: pd.DataFrame, timeout: float = 30.0) -> list[Any]:
        """Score a DataFrame over HTTP in the record's protocol (`ctcd.client`)."""
        return client.predict(self.prediction_url, data, self.protocol, timeout)


_LOCAL = set(LocalRuntime.model_fields) - {"kind"}
_KUBE = set(KubernetesRuntime.model_fields) - {"kind"}


def _unflatten(data: dict[str, Any]) -> dict[str, Any]:
    """A flat record (before the split) in today's shape."""
    observed = {key: data.pop(key) for key in list(data) if key in _OBSERVED}
    if data.get("backend") == "seldon":
        runtime = {key: data.pop(key, None) for key in ("namespace", "resource_name")}
        runtime |= {"kind": "kubernetes", "resource_kind": "SeldonDeployment"}
        for key in ("host", "port", "pid", "pid_started_at", "runtime_dir", "log_path"):
            data.pop(key, None)
        data.pop("prediction_log_dir", None), data.pop("server_settings", None)
    else:
        runtime = {key: data.pop(key) for key in list(data) if key in _LOCAL}
        runtime["kind"] = "local"
        runtime["server_settings"] = runtime.get("server_settings") or {}
        for key in _KUBE:
            data.pop(key, None)
    return {**data, "runtime": runtime, "observed": observed}
