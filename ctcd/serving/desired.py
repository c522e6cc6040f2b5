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

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CURRENT = "current.json"
STABLE = "stable.json"
WORKERS = "workers"
MODEL_KEYS = (
    "uuid", "model_name", "model_version", "model_uri", "model_path", "run_id", "flow_run_id",
)  # fmt: skip
PAUSE_ENV = "CTCD_TEST_PAUSE"  # tests only: see `pause_point`


def write_durable(path: Path, data: dict[str, Any]) -> None:
    """Write atomically and durably: readers see the old file or the new one, and the new
    one survives a crash of the machine once this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_desired(runtime: Path) -> dict[str, Any] | None:
    return read_json(runtime / CURRENT)


@contextmanager
def _locked(runtime: Path) -> Iterator[None]:
    """Serialises writers of `current.json` (a deploy and the master's revert)."""
    with open(runtime / ".current.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def set_desired(
    runtime: Path,
    model: dict[str, Any],
    workers: int,
    expect_generation: int | None = None,
    rejected: dict[str, Any] | None = None,
) -> int | None:
    """Write the desired state with the next generation and return that generation. With
    `expect_generation`, write only if the file still has that generation (else None)."""
    with _locked(runtime):
        now = read_desired(runtime) or {}
        generation = int(now.get("generation", 0))
        if expect_generation is not None and generation != expect_generation:
            return None
        data = {key: model.get(key) for key in MODEL_KEYS}
        data |= {"workers": workers, "generation": generation + 1, "written_at": time.time()}
        if rejected:
            data["rejected"] = rejected
        write_durable(runtime / CURRENT, data)
        return generation + 1


def announcement(runtime: Path, pid: int) -> dict[str, Any] | None:
    """What worker `pid` announced once its model was loaded; None while it loads."""
    return read_json(runtime / WORKERS / f"{pid}.json")


def is_leaving(runtime: Path, pid: int) -> bool:
    return (runtime / WORKERS / f"{pid}.leaving").exists()


def pause_point(step: str, runtime: Path) -> None:
    """Tests only: when `CTCD_TEST_PAUSE` names `step`, create `paused-<step>` in the runtime
    folder and sleep until killed, so a test can kill this process at exactly that step."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    (runtime / f"paused-{step}").write_text(str(os.getpid()))
    while True:
        time.sleep(1)
