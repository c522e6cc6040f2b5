"""The prediction log: what a model server scored, written as Parquet off the request path.

Each worker keeps a bounded buffer of what it answered (time, model version, request id, the
input rows, the predictions) and a thread that writes the buffer out every `flush_s` seconds
(default 2) as one Parquet file per flush, under the server's runtime folder:

    <runtime>/predictions/date=YYYY-MM-DD/hour=HH/<pid>-<start>-<sequence>.parquet

partitioned by the hour of the requests (UTC), one row per input row: `ts`, `model_version`,
`role` (`champion`; during a rollout `canary` for the candidate's answers, `shadow` for its
copies, which pair with the champion's rows of the same `request_id`), `request_id`, `row` (its
index within the request), `latency_ms` (from the request's arrival to its answer), the
features, `prediction`. A file is
written under a temporary name and renamed into place, so a reader never sees a partial file,
whatever happens to the worker. Recording costs the request an append under a lock; when the
buffer holds `buffer_rows` rows, further rows are dropped and counted, never waited for. A
worker that leaves (a swap, a stop) writes what it holds first; one that is killed loses at most
what it buffered since its last flush. The counts (rows written, rows dropped by reason) are
in `predictions/_stats/<pid>-<start>.json` (`ctcd.serving.logstats`); `ctcd models describe`
adds them up.

A write the disk refuses (full, read-only, no permission) stops nothing: the writer keeps the
rows it holds and tries again at every flush, so logging resumes by itself once the disk
takes writes again; meanwhile new rows beyond the buffer are dropped and counted under the
error, and `ctcd models describe` shows the error (`prediction_log_error`). A leaving worker
that cannot write its buffer counts those rows as dropped, with the error.

Only what was scored is recorded: not headers, not refused requests, never credentials; nor
the deploy's own check of a new server (its request id starts with `ctcd-probe-`).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from collections import deque
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctcd.files import replacing
from ctcd.serving import logstats
from ctcd.serving.logstats import FOLDER, STATS, read_stats
from ctcd.serving.settings import ServerSettings

__all__ = ["FOLDER", "STATS", "PredictionLog", "read_log", "read_stats", "served_rows"]
FULL = "buffer full"
# (time, request id, column names, input rows, predictions, latency in ms)
Entry = tuple[float, str, tuple[str, ...], np.ndarray, np.ndarray, float]


# The id of the request being answered, set by `ctcd.serving.fastpath` for every
# `POST /invocations` (MLflow's route runs in a thread that inherits it).
REQUEST_ID: ContextVar[str] = ContextVar("ctcd_request_id", default="")
# When that request arrived (`time.perf_counter()`; 0: unknown), for its latency.
REQUEST_START: ContextVar[float] = ContextVar("ctcd_request_start", default=0.0)


PROBE_PREFIX = "ctcd-probe-"  # the deploy's own check of a new server: not logged


def new_request_id() -> str:
    return uuid.uuid4().hex


def probe_request_id() -> str:
    return PROBE_PREFIX + new_request_id()


def request_id_from(header: bytes | None) -> str:
    """The client's `X-Request-ID` if it is a usable id (printable, at most 128 characters),
    else a new one."""
    if header:
        text = header.decode("latin-1").strip()
        if 0 < len(text) <= 128 and text.isprintable():
            return text
    return new_request_id()


class PredictionLog:
    """One worker's log (see the module docstring). `record` is safe from any thread."""

    def __init__(
        self, runtime: Path, model_version: str, settings: ServerSettings, role: str = "champion"
    ) -> None:
        self.folder = runtime / FOLDER
        self.version = str(model_version)
        self.role = role
        self.settings = settings
        self.requests = 0  # requests answered by this worker's model in this role
        self.failures = 0  # of those, answered with an error (status 400 and above)
        self.skipped = 0  # shadow: copies not scored (too many in flight, `ctcd.serving.router`)
        self._buffer: deque[Entry] = deque()
        self._rows = 0
        self.dropped = 0
        self.reasons: dict[str, int] = {}  # rows dropped, by reason
        self.written = 0
        self.error: str | None = None  # the write error being retried now
        self.error_since: float | None = None
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._sequence = 0
        self.started = time.time()
        self._name = f"{os.getpid()}-{int(self.started * 1000)}"
        self._name += "" if role == "champion" else f"-{role}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.prediction_log:
            with contextlib.suppress(OSError):  # a full disk must not stop a worker's boot
                (self.folder / STATS).mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._run, name="ctcd-predlog", daemon=True)
            self._thread.start()

    def answered(self, ok: bool) -> None:
        """Count one request this model answered (`ok`: without an error status)."""
        with self._lock:
            self.requests += 1
            self.failures += 0 if ok else 1

    def skipped_copy(self) -> None:
        """Count one copy of a request this (shadow) model did not score."""
        with self._lock:
            self.skipped += 1

    def record(self, request_id: str, frame: pd.DataFrame, predictions: Any) -> None:
        """Buffer one answered request; drop it (counted) if the buffer is full."""
        if not self._taking(request_id, len(frame)):
            return
        try:
            values = frame.to_numpy()
            predicted = np.asarray(predictions)
        except Exception:  # not something we can store: count it, never fail the request
            with self._lock:
                self._rows -= len(frame)
                self._count(len(frame), "not storable (its rows or predictions are not an array)")
            return
        start = REQUEST_START.get()
        latency = (time.perf_counter() - start) * 1000 if start else float("nan")
        columns = tuple(map(str, frame.columns))
        entry = (time.time(), request_id, columns, values, predicted, latency)
        self._buffer.append(entry)

    def record_rows(
        self,
        request_id: str,
        columns: tuple[str, ...],
        values: np.ndarray,
        predictions: np.ndarray,
        latency_ms: float,
    ) -> None:
        """`record` for rows already in arrays (a batch of shadow copies, cut per request)."""
        if self._taking(request_id, len(values)):
            entry = (time.time(), request_id, columns, values, predictions, latency_ms)
            self._buffer.append(entry)

    def _taking(self, request_id: str, rows: int) -> bool:
        """Whether `rows` of this request are to be buffered (room counted for them)."""
        if not self.settings.prediction_log or request_id.startswith(PROBE_PREFIX):
            return False
        if self.settings.log_sample_rate < 1.0 and random.random() >= self.settings.log_sample_rate:
            return False
        with self._lock:
            if self._rows + rows > self.settings.log_buffer_rows:
                error = self.error
                self._count(rows, f"buffer full while writes fail ({error})" if error else FULL)
                return False
            self._rows += rows
        return True

    def _count(self, rows: int, reason: str) -> None:
        """Count `rows` as dropped for `reason` (the caller holds `_lock`)."""
        self.dropped += rows
        if reason not in self.reasons and len(self.reasons) >= logstats.REASONS:
            reason = "other"
        self.reasons[reason] = self.reasons.get(reason, 0) + rows

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        """Write every `log_flush_s` until the worker leaves. Nothing ends this thread: a
        write that fails is retried at the next flush (see `flush`)."""
        retained = time.monotonic()
        while not self._stop.wait(self.settings.log_flush_s):
            # Retention lists every file of the log: about once a minute is enough.
            due = time.monotonic() - retained >= 60
            try:
                self.flush(retain=due)
            except Exception as err:  # a bug or a surprise: say it, keep the thread alive
                self._failed(err)
            retained = time.monotonic() if due else retained

    def close(self) -> None:
        """Write what is buffered and stop the writer (a worker leaving). What cannot be
        written now is dropped and counted, with the reason."""
        self._stop.set()
        try:
            self.flush(final=True)
        except Exception as err:
            self._failed(err)

    def flush(self, retain: bool = True, final: bool = False) -> None:
        """Write what is buffered (and, with `retain`, apply `max_bytes`). Rows that cannot be
        written for lack of space or permission stay buffered for the next flush (new rows
        are dropped and counted while the buffer is full), or, when `final`, are dropped and
        counted with the error."""
        if not self.settings.prediction_log:
            return
        with self._flushing:
            entries = []
            while self._buffer:
                entries.append(self._buffer.popleft())
            unwritten = self._write(entries) if entries else []
            if unwritten and not final:
                self._buffer.extendleft(reversed(unwritten))
            with self._lock:
                self._rows -= sum(len(e[3]) for e in entries)
                if unwritten and not final:
                    self._rows += sum(len(e[3]) for e in unwritten)
                elif unwritten:
                    rows = sum(len(e[3]) for e in unwritten)
                    self._count(rows, f"not written before the worker left ({self.error})")
            self._write_stats()
            if retain and self.error is None:
                with contextlib.suppress(OSError):
                    self._retain()

    def _write(self, entries: list[Entry]) -> list[Entry]:
        """Write `entries` as Parquet files (one per hour and columns); the entries not
        written because the disk refused (full, read-only), to retry."""
        groups: dict[tuple[int, tuple[str, ...]], list[Entry]] = {}
        for entry in entries:  # by hour (formatted once per group below) and columns
            groups.setdefault((int(entry[0] // 3600), entry[2]), []).append(entry)
        pending = list(groups.items())
        for done, ((hour, columns), group) in enumerate(pending):
            try:
                self._write_group(hour, columns, group)
            except OSError as err:
                self._failed(err)
                return [entry for _, rest in pending[done:] for entry in rest]
            except Exception as err:  # rows Parquet cannot hold: dropped, counted
                with self._lock:
                    reason = f"not storable as Parquet ({type(err).__name__}: {err})"[:200]
                    self._count(sum(len(e[3]) for e in group), reason)
        self._resumed()
        return []

    def _write_group(self, hour: int, columns: tuple[str, ...], group: list[Entry]) -> None:
        frame = _frame(self.version, self.role, columns, group)
        folder = self.folder / datetime.fromtimestamp(hour * 3600, UTC).strftime(
            "date=%Y-%m-%d/hour=%H"
        )
        folder.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        path = folder / f"{self._name}-{self._sequence:06d}.parquet"
        with replacing(path) as tmp:
            frame.to_parquet(tmp, index=False)
        self.written += len(frame)

    def _failed(self, err: Exception) -> None:
        error = f"{type(err).__name__}: {err}"[:300]
        if self.error is None:
            self.error_since = time.time()
            logstats.say(f"cannot write ({error}); retrying at every flush")
        self.error = error

    def _resumed(self) -> None:
        if self.error is not None:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(self.error_since or 0))
            logstats.say(f"writing again (it failed since {since}: {self.error})")
        self.error = self.error_since = None

    def _write_stats(self) -> None:
        stats = {"pid": os.getpid(), "written_rows": self.written, "dropped_rows": self.dropped,
                 "dropped_reasons": dict(self.reasons), "error": self.error,
                 "error_since": self.error_since, "model_version": self.version,
                 "role": self.role, "requests": self.requests, "failures": self.failures,
                 "skipped": self.skipped, "started": self.started, "at": time.time()}  # fmt: skip
        with contextlib.suppress(OSError):
            (self.folder / STATS).mkdir(parents=True, exist_ok=True)
        logstats.save(self.folder / STATS / f"{self._name}.json", stats)

    def _retain(self) -> None:
        """Delete the oldest files while the log is larger than `max_bytes`."""
        files = []
        for path in self.folder.glob("date=*/hour=*/*.parquet"):
            with contextlib.suppress(FileNotFoundError):  # another worker's retention
                info = path.stat()
                files.append((path.parent.parent.name, path.parent.name, info.st_mtime,
                              info.st_size, path))  # fmt: skip
        files.sort(key=lambda f: f[:3])
        total = sum(f[3] for f in files)
        for *_, size, path in files:
            if total <= self.settings.max_log_bytes:
                break
            total -= size
            path.unlink(missing_ok=True)


def _frame(version: str, role: str, columns: tuple[str, ...], group: list[Entry]) -> pd.DataFrame:
    counts = [len(entry[3]) for entry in group]
    values = np.concatenate([entry[3] for entry in group])
    frame = pd.DataFrame(values, columns=list(columns))
    predicted = np.concatenate([entry[4].reshape(len(entry[3]), -1) for entry in group])
    head = pd.DataFrame(
        {
            "ts": pd.to_datetime(np.repeat([e[0] for e in group], counts), unit="s", utc=True),
            "model_version": version,
            "role": role,
            "request_id": np.repeat([e[1] for e in group], counts),
            "row": np.concatenate([np.arange(n) for n in counts]),
            "latency_ms": np.repeat([e[5] for e in group], counts),
        }
    )
    if predicted.shape[1] == 1:
        outputs = pd.DataFrame({"prediction": predicted[:, 0]})
    else:
        outputs = pd.DataFrame(
            predicted, columns=[f"prediction_{i}" for i in range(predicted.shape[1])]
        )
    return pd.concat([head, frame, outputs], axis=1)


def read_log(runtime: Path | str, since: datetime | None = None) -> pd.DataFrame:
    """Every logged row of a server (or since `since`), oldest first; empty if none. The
    candidate's `shadow` rows are in it too: what clients were answered is `served_rows`."""
    folder = Path(runtime) / FOLDER
    files = sorted(folder.glob("date=*/hour=*/*.parquet"))
    if since is not None:
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        floor = since.astimezone(UTC).strftime("date=%Y-%m-%d/hour=%H")
        files = [p for p in files if f"{p.parent.parent.name}/{p.parent.name}" >= floor]
    if not files:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    if "role" in frame:  # files of an older ctcd have no role: the champion answered them
        frame["role"] = frame["role"].fillna("champion")
    else:
        frame.insert(2, "role", "champion")
    if since is not None:
        frame = frame[frame["ts"] >= pd.Timestamp(since.astimezone(UTC))]
    return frame.sort_values(["ts", "request_id", "row"], kind="stable").reset_index(drop=True)


def served_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose answers went to clients (not a shadow candidate's copies)."""
    if frame.empty or "role" not in frame:
        return frame
    return frame[frame["role"] != "shadow"].reset_index(drop=True)
