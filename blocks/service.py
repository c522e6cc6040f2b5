"""The record of one model server: what it serves, where, and in which state."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

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
    workers: int = Field(default=1, description="Worker processes (local) or replicas (Seldon).")
    server_settings: dict[str, int | float] = Field(
        default_factory=dict,
        description="Settings the server was created with (local: `max_batch_size`, "
        "`max_batch_wait_ms`, `model_threads`); kept across stop, start and redeploys.",
    )
    protocol: Literal["mlflow", "seldon", "v2"] = Field(
        default="mlflow",
        description="What `prediction_url` speaks: MLflow scoring, Seldon v1 or V2.",
    )
    namespace: str | None = Field(default=None, description="Kubernetes namespace (Seldon).")
    resource_name: str | None = Field(
        default=None, description="The SeldonDeployment's name (Seldon)."
    )
    prediction_log_dir: str | None = Field(
        default=None,
        description="Where the server logs what it scored (Parquet, by hour; local servers "
        "with the prediction log on). Read it with `ctcd.serving.predlog.read_log`.",
    )
    prediction_log_rows: dict[str, int] = Field(
        default_factory=dict,
        description="Observed: rows the prediction log has written and dropped (buffer full).",
    )
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
        """Score a DataFrame over HTTP in the record's protocol. Retries once on a reset
        connection, as HTTP clients do when a keep-alive connection closes under them."""
        headers = {"Content-Type": "application/json"}
        body = request_body(data, self.protocol)
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
        return read_predictions(response.json(), self.protocol)


def request_body(data: pd.DataFrame, protocol: str) -> str:
    """The JSON body a server of `protocol` takes for the rows of `data` (NaN sent as null)."""
    if protocol == "mlflow":
        return '{"dataframe_split": ' + data.to_json(orient="split", index=False) + "}"
    split = json.loads(data.to_json(orient="split", index=False))
    if protocol == "seldon":
        return json.dumps({"data": {"names": split["columns"], "ndarray": split["data"]}})
    columns = [
        {
            "name": str(name),
            "shape": [len(data)],
            "datatype": "FP64" if data[name].dtype.kind == "f" else "INT64",
            "data": [row[i] for row in split["data"]],
        }
        for i, name in enumerate(split["columns"])
    ]
    return json.dumps({"parameters": {"content_type": "pd"}, "inputs": columns})


def read_predictions(answer: dict[str, Any], protocol: str) -> list[Any]:
    """The predictions in a server's answer: MLflow's `predictions`, Seldon's
    `data.ndarray` (or `data.tensor.values`), V2's first output's `data`."""
    if protocol == "mlflow":
        predictions: list[Any] = answer["predictions"]
    elif protocol == "seldon":
        data = answer["data"]
        predictions = data["ndarray"] if "ndarray" in data else data["tensor"]["values"]
    else:
        predictions = answer["outputs"][0]["data"]
    return predictions
