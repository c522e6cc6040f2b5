"""A local model server's desired state and its workers' announcements (files in its runtime
folder, shared by the deploying process, the gunicorn master and the workers).

- `current.json`, the desired state (`DesiredState`): the model every worker should serve
  (name, version, URI, the path of its local copy, the pipeline and step that asked), how many
  workers, their settings, and a `generation` that grows with every change. A deploy writes it
  first (atomically, fsynced) and then only waits; the master (`ctcd.serving.master`)
  converges the workers to it on every loop tick.
- `stable.json` (`StableState`): the last model all workers served at once (written by the
  master), the generation it converged on, and `history`, every version the server converged
  on, oldest first: what it really served, whatever happened to the process that asked. A
  worker whose model fails to load or to score its input example serves this one instead.
- `workers/<pid>.json`: a worker's announcement once its model is loaded: the version it
  serves, the generation it read, and whether it fell back (with the error).
- `workers/<pid>.leaving`: the master told that worker to leave (it drains, then exits).

Both state files are read here only, validated: a garbled one raises `StateFileError` naming
the file, what is wrong and what repairs it.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ctcd.exceptions import StateFileError
from ctcd.files import locked, read_json, read_model, write_json
from ctcd.rollout import OpenRollout, as_text
from ctcd.serving.settings import ServerSettings

CURRENT = "current.json"
STABLE = "stable.json"
WORKERS = "workers"
HISTORY_LIMIT = 20  # versions a server's history keeps (the record's and stable.json's)


class ServedModel(BaseModel):
    """A model a server serves, or should: what `current.json` and `stable.json` name."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    uuid: str | None = None
    model_name: str
    model_version: str
    model_uri: str
    model_path: str = Field(description="The version's copy in the runtime folder.")
    pipeline_name: str | None = None
    step_name: str | None = None
    run_id: str | None = None
    flow_run_id: str | None = None

    _version = field_validator("model_version", mode="before")(as_text)

    def served(self) -> ServedModel:
        """Only the model's fields (what a state file names as the model)."""
        return ServedModel.model_validate(self.model_dump(include=set(ServedModel.model_fields)))


class Rejected(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model_version: str
    reason: str

    _version = field_validator("model_version", mode="before")(as_text)


class DesiredState(ServedModel):
    """`current.json`: what the server must serve, with how many workers and which settings."""

    workers: int = Field(ge=1)
    generation: int = Field(ge=0)
    written_at: float | None = None
    settings: dict[str, Any] | None = None
    settings_id: str | None = None
    rejected: Rejected | None = None
    rollout: OpenRollout | None = Field(
        default=None, description="A candidate served beside the model (canary or shadow)."
    )
    candidate_path: str | None = Field(default=None, description="The candidate's copy.")

    @property
    def rollout_key(self) -> str | None:
        """What a worker must announce it serves beside the model (None: no candidate)."""
        return rollout_key(self.rollout)


def rollout_key(rollout: OpenRollout | None) -> str | None:
    if rollout is None:
        return None
    return f"{rollout.mode}:{rollout.percent:g}:{rollout.candidate_version}"


class StableState(ServedModel):
    """`stable.json`: the last model all workers served at once, and every version served."""

    generation: int | None = Field(
        default=None, description="The desired state's generation it converged on (None: an "
        "older ctcd wrote it)."
    )  # fmt: skip
    settings: dict[str, Any] | None = None
    settings_id: str | None = None
    history: list[str] | None = Field(
        default=None, description="Every version converged on, oldest first (None: unknown)."
    )


def _fix(runtime: Path, name: str) -> str:
    if name == CURRENT:
        short = runtime.name[:8]
        return (
            "The server keeps serving what its workers serve (the version stable.json names); "
            f"`ctcd models start {short}` (or the next deploy) rewrites it from the server's "
            "record (service.json)"
        )
    return (
        "The server's master writes it again once its workers next all serve the desired "
        "version (the history in its record, service.json, stands meanwhile); until then a "
        "worker whose new version fails to load has no version to fall back on"
    )


def read_desired(runtime: Path) -> DesiredState | None:
    """The desired state; None if there is none yet. Raises `StateFileError` if garbled."""
    return read_model(runtime / CURRENT, DesiredState, _fix(runtime, CURRENT))


def read_stable(runtime: Path) -> StableState | None:
    """The model all workers served at once last (None before the first time). Raises
    `StateFileError` if garbled."""
    return read_model(runtime / STABLE, StableState, _fix(runtime, STABLE))


def stable_or_none(runtime: Path) -> StableState | None:
    """`read_stable`, a garbled file read as none (for those who can only fall back on it)."""
    try:
        return read_stable(runtime)
    except StateFileError:
        return None


def _locked(runtime: Path) -> AbstractContextManager[None]:
    """Serialises writers of `current.json` (a deploy and the master's revert)."""
    return locked(runtime / ".current.lock")


def _last_generation(runtime: Path) -> tuple[int, DesiredState | None]:
    """The generation `current.json` has, and the file; when it is garbled, the highest
    generation the master or a worker has seen (so a rewrite still moves forward)."""
    try:
        now = read_desired(runtime)
    except StateFileError:
        stable = stable_or_none(runtime)
        seen = [stable.generation or 0] if stable else []
        folder = runtime / WORKERS
        for path in folder.glob("*.json") if folder.is_dir() else []:
            with suppress(TypeError, ValueError):
                seen.append(int((read_json(path) or {}).get("generation") or 0))
        return max(seen, default=0), None
    return (now.generation if now else 0), now


def set_desired(
    runtime: Path,
    model: ServedModel,
    workers: int,
    expect_generation: int | None = None,
    rejected: Rejected | None = None,
    settings: ServerSettings | None = None,
    rollout: tuple[OpenRollout, str] | None = None,
) -> int | None:
    """Write the desired state with the next generation and return that generation. With
    `expect_generation`, write only if the file still has that generation (else None).
    `settings` (the workers' `ServerSettings`) default to those the file has now. `rollout`
    (the open rollout and the candidate's local copy) serves a candidate beside the model;
    without it, the model serves alone. A garbled file is replaced (the next generation
    follows the highest one seen)."""
    with _locked(runtime):
        generation, now = _last_generation(runtime)
        if expect_generation is not None and (now is None or generation != expect_generation):
            return None
        data = model.served().model_dump(mode="json")
        data |= {"workers": workers, "generation": generation + 1, "written_at": time.time()}
        if settings is not None:
            data |= {
                "settings": settings.model_dump(mode="json"),
                "settings_id": settings.fingerprint(),
            }
        elif now is not None and now.settings is not None:
            data |= {"settings": now.settings, "settings_id": now.settings_id}
        if rejected:
            data["rejected"] = rejected.model_dump(mode="json")
        if rollout is not None:
            data |= {"rollout": rollout[0].model_dump(mode="json"), "candidate_path": rollout[1]}
        write_json(runtime / CURRENT, data, durable=True)
        return generation + 1


def serves(said: dict[str, Any], want: DesiredState) -> bool:
    """Whether a worker's announcement is what the desired state asks: its version, and its
    settings when the desired state names them."""
    same_settings = not want.settings_id or said.get("settings_id") == want.settings_id
    same_rollout = said.get("rollout") == want.rollout_key
    return str(said.get("model_version")) == want.model_version and same_settings and same_rollout


def label(version: str, rollout: str | None) -> str:
    """How observers name what a worker serves: its version, and a candidate beside it."""
    if not rollout:
        return version
    mode, percent, candidate = rollout.split(":", 2)
    return f"{version} + {candidate} ({mode} {percent} %)"


def wanted(want: DesiredState) -> str:
    """The label of a worker that serves `want`."""
    return label(want.model_version, want.rollout_key)


def served(said: dict[str, Any], want: DesiredState | None) -> str:
    """What a worker serves, for observers (`label`), marked when its settings are not the
    desired ones (such a worker is replaced like one of another version)."""
    named = label(str(said.get("model_version")), said.get("rollout"))
    if want is not None and named == wanted(want) and not serves(said, want):
        return f"{named} (previous settings)"
    return named


def main_version(named: str) -> str:
    """The version a label names as serving every request (the champion of a rollout)."""
    return named.split(" ", 1)[0]


def write_stable(runtime: Path, want: DesiredState) -> None:
    """Record that every worker serves `want` now: the model, its generation, and the version
    appended to the history unless it was the last one served. A history that is unknown (an
    unreadable `stable.json`, or one an older ctcd wrote) stays unknown: the record's holds."""
    history: list[str] | None = []
    try:
        before = read_stable(runtime)
    except StateFileError:
        before, history = None, None
    if before is not None:
        history = None if before.history is None else list(before.history)
    if history is not None and (not history or history[-1] != want.model_version):
        history = [*history, want.model_version][-HISTORY_LIMIT:]
    data = want.served().model_dump(mode="json") | {
        "generation": want.generation,
        "settings": want.settings,
        "settings_id": want.settings_id,
        "history": history,
    }
    if before is None or before.model_dump(mode="json") != data:
        write_json(runtime / STABLE, data, durable=True)


def seed_history(runtime: Path, history: list[str]) -> None:
    """Give a `stable.json` written by an older ctcd (no history) the history the server's
    record kept, so the master's own history starts from it. Only while no master runs."""
    stable = stable_or_none(runtime)
    if stable is not None and stable.history is None and history:
        data = stable.model_dump(mode="json") | {"history": history[-HISTORY_LIMIT:]}
        write_json(runtime / STABLE, data, durable=True)


def revert_to_stable(
    runtime: Path, workers: int, generation: int, version: str, reason: str
) -> int | None:
    """Set the desired state back to the stable model, naming `version` as rejected and why,
    if the desired state is still at `generation` (compare-and-swap); the new generation, or
    None when nothing was written (no stable model yet, or the state moved on)."""
    stable = stable_or_none(runtime)
    if stable is None:
        return None
    rejected = Rejected(model_version=version, reason=reason)
    return set_desired(runtime, stable, workers, generation, rejected)


def holding_state(runtime: Path, workers: int) -> DesiredState | None:
    """What a server serves while its desired state is unreadable: the stable model on the
    workers it runs (None when it has never converged)."""
    stable = stable_or_none(runtime)
    if stable is None:
        return None
    return DesiredState(
        **stable.served().model_dump(), workers=max(workers, 1),
        generation=stable.generation or 0, settings=stable.settings,
        settings_id=stable.settings_id,
    )  # fmt: skip


def master_recorded(runtime: Path, generation: int) -> bool:
    """Whether the master has recorded converging on `generation` (in `stable.json`); a
    `stable.json` of an older ctcd's master (no generation) counts once it exists."""
    stable = stable_or_none(runtime)
    return stable is not None and (stable.generation is None or stable.generation >= generation)


# What a server's workers were seen doing, oldest first: (pid, the version it announced or
# None while it loads, whether it was told to leave).
Seen = list[tuple[int, str | None, bool]]


def converged(seen: Seen, want: DesiredState) -> bool:
    """Whether exactly the desired number of workers run, all serving the desired version."""
    return len(seen) == want.workers and all(
        version == wanted(want) and not leaving for _, version, leaving in seen
    )


def announcement(runtime: Path, pid: int) -> dict[str, Any] | None:
    """What worker `pid` announced once its model was loaded; None while it loads."""
    return read_json(runtime / WORKERS / f"{pid}.json")


def is_leaving(runtime: Path, pid: int) -> bool:
    return (runtime / WORKERS / f"{pid}.leaving").exists()
