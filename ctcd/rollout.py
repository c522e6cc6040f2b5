"""How a new version takes traffic (`RolloutPolicy`), the rollout a server has open
(`OpenRollout`), and which version answers a request during a canary (`to_candidate`).

- `replace`: the new version takes every request once it serves (a rolling swap).
- `canary`: the candidate answers `traffic_percent` of requests, the champion the rest. The
  split is by request id (`X-Request-ID`): the same id always goes to the same version.
- `shadow`: the champion answers every request; the candidate scores a copy of
  `shadow_percent` of them off the request path (its answers only go to the prediction log).

A rollout stays open until it is promoted (the candidate takes every request and becomes
`champion`) or rolled back (the champion keeps every request); see `flows.rollout`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RolloutMode = Literal["replace", "canary", "shadow"]
Role = Literal["champion", "canary", "shadow"]
VERSION_HEADER = "x-model-version"  # on every answer: the version that answered
ROLE_HEADER = "x-model-role"  # on every answer: champion, or canary


class RolloutPolicy(BaseModel):
    """How a deploy's version takes traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RolloutMode = Field(
        default="replace",
        description="`replace` (all traffic at once), `canary` (a share of requests) or "
        "`shadow` (a copy of requests, answers only logged).",
    )
    traffic_percent: float = Field(
        default=10.0, gt=0, lt=100, description="canary: the candidate's share of requests, in %."
    )
    shadow_percent: float = Field(
        default=100.0, gt=0, le=100, description="shadow: the share of requests copied, in %."
    )

    @property
    def percent(self) -> float:
        return self.traffic_percent if self.mode == "canary" else self.shadow_percent

    def describe(self) -> str:
        if self.mode == "canary":
            return f"canary, {self.traffic_percent:g} % of requests"
        if self.mode == "shadow":
            return f"shadow, {self.shadow_percent:g} % of requests copied"
        return "replace"


def policy(value: RolloutPolicy | dict[str, object] | str | None) -> RolloutPolicy | None:
    """A policy from what a flow or the CLI was given (a mode alone is a policy too)."""
    if value is None or isinstance(value, RolloutPolicy):
        return value
    if isinstance(value, str):
        return RolloutPolicy(mode=value)  # type: ignore[arg-type]
    return RolloutPolicy.model_validate(value)


def as_text(value: Any) -> Any:
    """Versions are text; a number (written by hand, or MLflow's) is read as its text."""
    return str(value) if isinstance(value, int) else value


class OpenRollout(BaseModel):
    """A rollout a server has open: the candidate beside the champion, how, and since when."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: Literal["canary", "shadow"]
    percent: float = Field(gt=0, le=100)
    champion_version: str
    candidate_version: str
    candidate_uri: str
    candidate_run_id: str | None = None
    since: float = Field(default_factory=time.time, description="Epoch seconds it opened.")

    _text = field_validator("champion_version", "candidate_version", mode="before")(as_text)

    @property
    def role(self) -> Role:
        return "canary" if self.mode == "canary" else "shadow"

    def describe(self) -> str:
        share = "of requests" if self.mode == "canary" else "of requests copied"
        opened = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (
            f"{self.mode} of v{self.candidate_version} beside v{self.champion_version}, "
            f"{self.percent:g} % {share}, since {opened}"
        )


def bucket(request_id: str) -> float:
    """A request id's place in [0, 100): the same id always lands in the same place."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1_000_000 / 10_000


def to_candidate(request_id: str, percent: float) -> bool:
    """Whether a request with this id goes to the candidate (canary), or is copied (shadow)."""
    return bucket(request_id) < percent
