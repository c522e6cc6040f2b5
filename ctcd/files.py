"""Files that several processes share: written whole or not at all, read without trusting them,
and locked while a writer changes what they mean.

Every state file ctcd keeps (a model server's record and desired state, the workers'
announcements, the prediction log's files and counts, the local Prefect server's record, the
sample table) is written here: under a temporary name in the same folder, then renamed over
the old one, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ctcd.exceptions import StateFileError

M = TypeVar("M", bound=BaseModel)


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, rename it over
    `path`. With `durable`, the file and the rename survive a crash of the machine once this
    returns (fsync of the file and of its folder). On an error the temporary file goes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_text(path: Path, text: str, durable: bool = False) -> None:
    """Write `text` atomically (see `replacing`)."""
    with replacing(path, durable) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict[str, Any], durable: bool = False) -> None:
    """Write `data` as JSON atomically (see `replacing`)."""
    write_text(path, json.dumps(data, indent=2, default=str), durable)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_model(path: Path, model: type[M], fix: str) -> M | None:
    """The file's JSON as a `model`, validated; None if the file does not exist. A file that
    cannot be read, is not JSON or does not hold a valid `model` raises `StateFileError`
    naming the file, what is wrong and `fix` (what to do)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise StateFileError(path, f"it cannot be read ({err})", fix) from err
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        raise StateFileError(path, _problems(err), fix) from err


def _problems(err: ValidationError) -> str:
    """What a validation error says is wrong, in a line: the first few fields and why."""
    found = []
    for error in err.errors()[:3]:
        if error["type"] == "json_invalid":
            found.append(f"it is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
            continue
        where = ".".join(str(part) for part in error["loc"]) or "its content"
        found.append(f"{where}: {error['msg'].lower()}")
    more = err.error_count() - len(found)
    return "; ".join(found) + (f" (and {more} more)" if more > 0 else "")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block. Other processes
    wait; the lock goes with the process, however it ends."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def is_locked(path: Path) -> bool:
    """Whether some process holds the `flock` of `locked(path)` now (a probe: it takes and
    drops the lock at once when it is free)."""
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False
