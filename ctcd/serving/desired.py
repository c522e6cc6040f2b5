"""A local model server's desired state and its workers' announcements (files in its runtime
folder, shared by the deploying process, the gunicorn master and the workers).

- `current.json`, the desired state: the model every worker should serve (name, version, URI,
  the path of its local copy), how many workers, and a `generation` that grows with every
  change. A deploy writes it first (atomically, fsynced) and then only waits; the master
  (`ctcd.serving.master`) converges the workers to it on every loop tick.
- `stable.json`: the last model all workers served at once (written by the master). A worker
  whose model fails to load or to score its input example serves this one instead.
- `workers/<pid>.json`: a worker's announcement once its model is loaded: the version it
  serves, the generation it read, and whether it fell back (with the error).
- `workers/<pid>.leaving`: the master told that worker to leave (it drains, then exits).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ctcd.files import locked, read_json, write_json
from ctcd.serving.settings import ServerSettings

CURRENT = "current.json"
STABLE = "stable.json"
WORKERS = "workers"
MODEL_KEYS = (
    "uuid", "model_name", "model_version", "model_uri", "model_path", "run_id", "flow_run_id",
)  # fmt: skip


def read_desired(runtime: Path) -> dict[str, Any] | None:
    return read_json(runtime / CURRENT)


def _locked(runtime: Path) -> AbstractContextManager[None]:
    """Serialises writers of `current.json` (a deploy and the master's revert)."""
    return locked(runtime / ".current.lock")


def set_desired(
    runtime: Path,
    model: dict[str, Any],
    workers: int,
    expect_generation: int | None = None,
    rejected: dict[str, Any] | None = None,
    settings: ServerSettings | None = None,
) -> int | None:
    """Write the desired state with the next generation and return that generation. With
    `expect_generation`, write only if the file still has that generation (else None).
    `settings` (the workers' `ServerSettings`) default to those the file has now."""
    with _locked(runtime):
        now = read_desired(runtime) or {}
        generation = int(now.get("generation", 0))
        if expect_generation is not None and generation != expect_generation:
            return None
        data = {key: model.get(key) for key in MODEL_KEYS}
        data |= {"workers": workers, "generation": generation + 1, "written_at": time.time()}
        if settings is not None:
            data |= {
                "settings": settings.model_dump(mode="json"),
                "settings_id": settings.fingerprint(),
            }
        elif "settings" in now:
            data |= {"settings": now["settings"], "settings_id": now.get("settings_id")}
        if rejected:
            data["rejected"] = rejected
        write_json(runtime / CURRENT, data, durable=True)
        return generation + 1


def serves(said: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a worker's announcement is what the desired state asks: its version, and its
    settings when the desired state names them."""
    same_settings = not want.get("settings_id") or said.get("settings_id") == want["settings_id"]
    return str(said.get("model_version")) == str(want.get("model_version")) and same_settings


def served(said: dict[str, Any], want: dict[str, Any]) -> str:
    """What a worker serves, for observers: its version, marked when its settings are not the
    desired ones (such a worker is replaced like one of another version)."""
    version = str(said.get("model_version"))
    if version == str(want.get("model_version")) and not serves(said, want):
        return f"{version} (previous settings)"
    return version


def read_stable(runtime: Path) -> dict[str, Any] | None:
    """The model all workers served at once last (None before the first time)."""
    return read_json(runtime / STABLE)


def write_stable(runtime: Path, model: dict[str, Any]) -> None:
    data = {key: model.get(key) for key in MODEL_KEYS}
    if {key: (read_stable(runtime) or {}).get(key) for key in MODEL_KEYS} != data:
        write_json(runtime / STABLE, data, durable=True)


def revert_to_stable(
    runtime: Path, workers: int, generation: int, version: object, reason: str
) -> int | None:
    """Set the desired state back to the stable model, naming `version` as rejected and why,
    if the desired state is still at `generation` (compare-and-swap); the new generation, or
    None when nothing was written (no stable model yet, or the state moved on)."""
    stable = read_stable(runtime)
    if stable is None:
        return None
    rejected = {"model_version": version, "reason": reason}
    return set_desired(runtime, stable, workers, generation, rejected)


# What a server's workers were seen doing, oldest first: (pid, the version it announced or
# None while it loads, whether it was told to leave).
Seen = list[tuple[int, str | None, bool]]


def converged(seen: Seen, want: dict[str, Any]) -> bool:
    """Whether exactly the desired number of workers run, all serving the desired version."""
    return len(seen) == int(want.get("workers", 1)) and all(
        version == str(want["model_version"]) and not leaving for _, version, leaving in seen
    )


def announcement(runtime: Path, pid: int) -> dict[str, Any] | None:
    """What worker `pid` announced once its model was loaded; None while it loads."""
    return read_json(runtime / WORKERS / f"{pid}.json")


def is_leaving(runtime: Path, pid: int) -> bool:
    return (runtime / WORKERS / f"{pid}.leaving").exists()
