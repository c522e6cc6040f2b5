"""A local model server's settings, in one typed model: the deployer block's fields, the service
record's `server_settings` and the server process all use `ServerSettings`.

The deployer block declares its fields by inheriting `ServerKnobs` (so a wrong value is refused
when the block is saved); a deploy writes them into the desired state (`current.json`), and
every worker reads them from there when it starts, so a swap applies changed settings with no
downtime. A server run by hand reads them from `CTCD_*` environment variables instead
(`CTCD_MAX_BATCH_SIZE=64`, ...), as MLServer's settings do; a wrong value stops the worker at
start with the field named.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class ServerKnobs(BaseModel):
    """The settings a user chooses for a local model server (the deployer block's fields)."""

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
    shadow_batch_ms: float = Field(
        default=0.0,
        ge=0,
        le=5000,
        description="Shadow rollouts: milliseconds a worker collects copies of requests before "
        "the candidate scores them together (at most 1,024 copies); 0 scores each copy on its "
        "own as soon as the client has its answer.",
    )
    max_body_bytes: int = Field(
        default=16 * MIB,
        ge=1024,
        description="Largest request body a server accepts (413 above it, before reading it).",
    )


class ServerSettings(ServerKnobs, BaseSettings):
    """`ServerKnobs` as one value: given, or read from `CTCD_<FIELD>` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CTCD_", extra="forbid", frozen=True)

    @classmethod
    def of(cls, knobs: ServerKnobs) -> ServerSettings:
        """The settings of an object with these fields (a deployer block)."""
        return cls(**{name: getattr(knobs, name) for name in ServerKnobs.model_fields})

    def fingerprint(self) -> str:
        """A short digest of the values: a worker announces the one it runs with, so the
        server's master can tell which workers must be replaced to apply new settings."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def differences(self, other: ServerSettings) -> dict[str, tuple[object, object]]:
        """{field: (mine, theirs)} for each field whose values differ."""
        mine, theirs = self.model_dump(), other.model_dump()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}
