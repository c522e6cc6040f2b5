"""The prediction log's counts and health: each worker's stats file, and what observers read.

A worker keeps `predictions/_stats/<pid>-<start>.json`: rows written, rows dropped (in all and
by reason), and the write error it is retrying now, if any. The file is always written at
the same size (padded), so when the disk is full or its folder refuses new files, the worker
can still overwrite it in place and `ctcd models describe` still says why rows are missing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctcd.files import read_json, write_text

FOLDER = "predictions"
STATS = "_stats"
SIZE = 4096  # bytes of every stats file (one page: overwritten in place without new space)
REASONS = 8  # distinct drop reasons a worker keeps; more are counted as "other"
LOW_SPACE = 64 * 1024  # a log folder with less free space than this is reported as full


def _padded(data: dict[str, Any]) -> str:
    """The JSON of `data` padded to `SIZE` bytes (long error texts cut to fit)."""
    text = json.dumps(data, default=str)
    if len(text.encode()) >= SIZE:
        data = data | {"error": str(data.get("error"))[:300], "dropped_reasons": {
            key[:120]: value for key, value in list(data["dropped_reasons"].items())[:REASONS]
        }}  # fmt: skip
        text = json.dumps(data, default=str)
    return text + " " * (SIZE - 1 - len(text.encode())) + "\n"


def save(path: Path, data: dict[str, Any]) -> bool:
    """Write a worker's stats: atomically, or, when that fails (disk full, folder read-only
    for new files), over the existing file in place. False if neither worked."""
    text = _padded(data)
    try:
        write_text(path, text)
        return True
    except OSError:
        pass
    try:
        with open(path, "r+b") as handle:  # same size: no new blocks needed
            handle.write(text.encode())
        return True
    except OSError:
        return False


def _stats(runtime: Path) -> list[dict[str, Any]]:
    found = []
    for path in (runtime / FOLDER / STATS).glob("*.json"):
        data = read_json(path) or read_json(path)  # once more: an in-place write may be torn
        if data is not None:
            found.append(data)
    return found


def worker_stats(runtime: Path) -> list[dict[str, Any]]:
    """Every worker's stats file (past workers too): its counts, role and model version."""
    return _stats(runtime)


def read_stats(runtime: Path) -> dict[str, int]:
    """Rows written and dropped, summed over the server's workers (past ones included)."""
    total = {"written_rows": 0, "dropped_rows": 0}
    for data in _stats(runtime):
        for key in total:
            total[key] += int(data.get(key, 0))
    return total


@dataclass
class LogHealth:
    """What observers are told about a server's prediction log."""

    rows: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped, by reason
    error: str | None = None  # why the log is not being written now, and what happens


def read_health(runtime: Path, live: set[int]) -> LogHealth:
    """Counts of every worker (past ones too), rows dropped by reason, and the errors the
    live workers (`live`: their PIDs) report now, with the folder's own state."""
    stats = _stats(runtime)
    rows = {key: sum(int(s.get(key, 0)) for s in stats) for key in ("written_rows", "dropped_rows")}
    dropped: dict[str, int] = {}
    errors = []
    for data in stats:
        for reason, count in (data.get("dropped_reasons") or {}).items():
            dropped[reason] = dropped.get(reason, 0) + int(count)
        if data.get("error") and data.get("pid") in live:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(float(data["error_since"] or 0)))
            errors.append(
                f"worker {data['pid']} cannot write since {since}: {data['error']}; it keeps "
                "its buffer and retries at every flush (what overflows is dropped and counted)"
            )
    if problem := folder_problem(runtime / FOLDER):
        errors.insert(0, problem)
    return LogHealth(rows, dropped, "; ".join(errors) or None)


def folder_problem(folder: Path) -> str | None:
    """Why nothing can be written in `folder` now (read-only, no space), else None."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return None
    if info.f_flag & os.ST_RDONLY:
        return f"the log's folder {folder} is on a read-only file system"
    free = info.f_bavail * info.f_frsize
    if free < LOW_SPACE:
        return f"the log's folder {folder} has no space left ({free} bytes free)"
    return None


def say(message: str) -> None:
    """A line in the server's log (which may itself be unwritable: then nothing)."""
    with suppress(OSError, ValueError):
        print(f"[ctcd] worker {os.getpid()}: prediction log: {message}", file=sys.stderr,
              flush=True)  # fmt: skip
