"""What the flows return: pydantic models that also answer `result["key"]`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from blocks.service import ServiceRecord


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


class TrainingResult(_Result):
    metrics: dict[str, float]
    model_name: str
    model_version: str
    model_uri: str
    run_id: str
    data_source: str
    data_sha256: str


class DeploymentResult(TrainingResult):
    deployed: bool
    reason: str
    service: ServiceRecord | None


class InferenceResult(_Result):
    predictions: list[float]
    service: ServiceRecord
    rows: int
