"""The record of one model server: what it serves, where, and in which state."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


class ServiceState(StrEnum):
    ACTIVE = "active"
    PENDING = "pending"
    INACTIVE = "inactive"
    ERROR = "error"


def _now() -> datetime:
    return datetime.now(UTC)


class ServiceRecord(BaseModel):
    """One model server. `desired_state` is what ctcd asked for; `status` is what was
    observed when the record was read, with `status_message` saying why, and (for local
    servers) `live_workers` and `worker_versions` what the workers themselves announced."""

    model_config = ConfigDict(extra="forbid")

    uuid: str = Field(description="Stable id: the same pipeline, step and model keep it.")
    backend: str = Field(description="Which deployer runs it, e.g. `mlflow-local`.")
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
    status: ServiceState = ServiceState.PENDING
    status_message: str = ""
    live_workers: int | None = Field(
        default=None,
        description="Observed: worker processes running now (None when not observed).",
    )
    worker_versions: dict[str, str] = Field(
        default_factory=dict,
        description="Observed: the model version each worker (by PID) announced it serves, "
        "`loading` before it has, with `(leaving)` once told to leave.",
    )
    last_error: str | None = None
    prediction_url: str
    health_url: str
    log_path: str | None = None
    host: str
    port: int
    workers: int = 1
    pid: int | None = None
    pid_started_at: float | None = Field(default=None, description="Guards against PID reuse.")
    runtime_dir: str | None = None
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)

    @property
    def is_running(self) -> bool:
        return self.status == ServiceState.ACTIVE

    def summary(self) -> dict[str, Any]:
        """The fields `ctcd models list --json` prints."""
        return self.model_dump(mode="json")

    def predict(self, data: pd.DataFrame, timeout: float = 30.0) -> list[Any]:
        """Score a DataFrame over HTTP. Retries once on a reset connection, as HTTP
        clients do when a keep-alive connection closes under them."""
        body = '{"dataframe_split": ' + data.to_json(orient="split", index=False) + "}"
        headers = {"Content-Type": "application/json"}
        for attempt in (1, 2):
            try:
                response = httpx.post(
                    self.prediction_url, content=body, headers=headers, timeout=timeout
                )
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                if attempt == 2:
                    raise
        response.raise_for_status()
        predictions: list[Any] = response.json()["predictions"]
        return predictions
