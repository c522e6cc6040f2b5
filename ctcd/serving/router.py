"""Which model answers a `POST /invocations`: the champion, or during a rollout the candidate.

Every such request gets its id first (the client's `X-Request-ID`, or a new one), so the
scoring path, the prediction log and the answer all name the same id. Then:

- no rollout: the champion's app answers.
- `canary`: the candidate's app answers the requests whose id falls in its share
  (`ctcd.rollout.to_candidate`): the same id always gets the same version.
- `shadow`: the champion's app answers every request; for the share of ids copied, the
  candidate's app scores the same body in a task of its own once the client has its answer,
  and its answer goes only to the prediction log (role `shadow`), never to the client. At most
  `MAX_SHADOWS` copies are in flight per worker: beyond that a copy is skipped and counted (the
  candidate log's `skipped`, in its stats file), so a slow candidate never holds the champion's
  memory or time. With `shadow_batch_ms` (a server
  setting) the copies are collected instead, up to that long or `MAX_PENDING` copies, and the
  candidate scores them together in `predict` calls of up to `max_batch_size` rows: a copy then
  costs the worker a small share of one call instead of a call of its own, and the champion's
  requests meet the candidate's work once per batch instead of after every answer. Its log rows'
  `latency_ms` is then empty (a copy has no time of its own in a batch), so the rollout
  analysis's latency check does not apply to a batched shadow. A batch parses and logs its copies
  `YIELD_EVERY` at a time, letting the requests that arrived meanwhile in between, so the
  champion waits for a slice of it, not all of it. A copy whose body is not on the fast path
  (`ctcd.serving.fastpath`), or whose batch raised, is scored alone as above.

Every answer carries `X-Model-Version` (the version that answered) and `X-Model-Role`
(`champion` or `canary`). Each model's log counts the requests it answered and those it answered
with an error status (`PredictionLog.answered`): the rollout's failure-rate guardrail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pandas as pd
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctcd.rollout import ROLE_HEADER, VERSION_HEADER, OpenRollout, to_candidate
from ctcd.serving.batching import BatchingModel, split_rows
from ctcd.serving.fastpath import parse_rows, read_body, replay_body, signature_columns
from ctcd.serving.limits import first_headers
from ctcd.serving.predlog import REQUEST_START, PredictionLog, request_id_from

MAX_SHADOWS = 64
MAX_PENDING = 1024  # shadow copies collected for one batch (`shadow_batch_ms`)
YIELD_EVERY = 16  # copies a batch parses or logs before it lets the champion's requests in
DRAIN_S = 3.0  # a leaving worker waits this long for its shadow copies to be scored
ROUTERS: list[RolloutRouter] = []  # this worker's routers, drained when it leaves
Copy = tuple[str, Scope, bytes]  # a shadow copy: request id, scope, body


class Model:
    """One model's app (MLflow's route behind the fast path) and its prediction log."""

    def __init__(
        self, app: ASGIApp, version: str, log: PredictionLog, scorer: BatchingModel | None = None
    ) -> None:
        self.app = app
        self.version = version
        self.log = log
        self.scorer = scorer  # batched shadow copies are scored through it
        self.columns = signature_columns(scorer) if scorer is not None else None


class RolloutRouter:
    """ASGI middleware in front of the champion's app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        champion: Model,
        candidate: Model | None = None,
        rollout: OpenRollout | None = None,
        shadow_batch_ms: float = 0.0,
    ) -> None:
        self.app = app
        self.champion = Model(app, champion.version, champion.log)
        self.candidate = candidate if rollout is not None else None
        self.rollout = rollout
        self.shadows: set[asyncio.Task[None]] = set()
        self.batch_s = shadow_batch_ms / 1000
        self.pending: list[Copy] = []
        self.timer: asyncio.TimerHandle | None = None
        ROUTERS.append(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(first_headers(scope).get(b"x-request-id"))
        scope = _with_request_id(scope, request_id)
        REQUEST_START.set(time.perf_counter())
        rollout, candidate = self.rollout, self.candidate
        chosen = to_candidate(request_id, rollout.percent) if rollout else False
        if candidate is not None and rollout is not None and rollout.mode == "canary" and chosen:
            await _answer(candidate, "canary", scope, receive, send)
            return
        if candidate is None or not chosen:
            await _answer(self.champion, "champion", scope, receive, send)
            return
        body = await read_body(receive)  # shadow: the candidate scores the same body afterwards
        if body is None:
            return
        await _answer(self.champion, "champion", scope, replay_body(body, receive), send)
        if self.batch_s > 0 and candidate.columns is not None:
            self._collect(candidate, (request_id, scope, body))
            return
        self._start(candidate, _shadow(candidate, scope, body))

    def _start(self, candidate: Model, work: Any, copies: int = 1) -> None:
        """Run a shadow task (one copy, or a batch of `copies`) unless `MAX_SHADOWS` are in
        flight: then its copies are skipped and counted (the candidate log's `skipped`)."""
        if len(self.shadows) >= MAX_SHADOWS:
            for _ in range(copies):
                candidate.log.skipped_copy()
            work.close()
            return
        task = asyncio.create_task(work)
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    def _collect(self, candidate: Model, copy: Copy) -> None:
        """Keep a copy for the next batch; score the batch when it is full or due."""
        self.pending.append(copy)
        if len(self.pending) >= MAX_PENDING:
            self._flush(candidate)
        elif self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.batch_s, self._flush, candidate)

    async def drain(self, timeout: float = DRAIN_S) -> None:
        """Score the copies collected and wait (up to `timeout`) for those in flight: a
        leaving worker logs its shadow answers before it closes its logs."""
        if self.candidate is not None:
            self._flush(self.candidate)
        if self.shadows:
            await asyncio.wait(set(self.shadows), timeout=timeout)

    def _flush(self, candidate: Model) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if batch:
            self._start(candidate, _shadow_batch(candidate, batch), len(batch))


async def _answer(model: Model, role: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Let `model` answer, its version and role on the answer, its status counted."""
    extra = [(VERSION_HEADER.encode(), model.version.encode())]
    extra.append((ROLE_HEADER.encode(), role.encode()))
    status = 500

    async def sending(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            names = {name for name, _ in extra}
            kept = [h for h in message.get("headers", []) if h[0].lower() not in names]
            message = {**message, "headers": [*kept, *extra]}
        await send(message)

    try:
        await model.app(scope, receive, sending)
    finally:
        model.log.answered(status < 400)


async def _shadow(candidate: Model, scope: Scope, body: bytes) -> None:
    """The candidate scores a copy of a request; its answer is only logged and counted."""
    REQUEST_START.set(time.perf_counter())
    status = 500

    async def discard(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    async def nothing_more() -> Message:
        return {"type": "http.disconnect"}

    try:
        await candidate.app(scope, replay_body(body, nothing_more), discard)
    except Exception:  # the candidate's failure is counted, never the client's
        status = 500
    finally:
        candidate.log.answered(status < 400)


async def _shadow_batch(candidate: Model, batch: list[Copy]) -> None:
    """The candidate scores collected copies together (`predict` calls of at most its
    `max_batch_size` rows); each copy's rows and answer go to its log under its request id."""
    assert candidate.scorer is not None and candidate.columns is not None
    columns, names = candidate.columns, tuple(candidate.columns)
    limit = candidate.scorer.settings.max_batch_size
    parsed: list[tuple[Copy, list[list[Any]]]] = []
    for i, copy in enumerate(batch):
        if i and not i % YIELD_EVERY:
            await asyncio.sleep(0)  # the champion's requests are not held behind the batch
        rows = parse_rows(copy[2], columns)
        if rows is None:  # not the simple case: MLflow's route scores it, alone
            await _shadow(candidate, copy[1], copy[2])
        else:
            parsed.append((copy, rows))
    chunk: list[tuple[Copy, list[list[Any]]]] = []
    size = 0
    for copy, rows in parsed:
        if chunk and size + len(rows) > limit:
            await _score_chunk(candidate, chunk, columns, names)
            chunk, size = [], 0
        chunk.append((copy, rows))
        size += len(rows)
    if chunk:
        await _score_chunk(candidate, chunk, columns, names)


async def _score_chunk(
    candidate: Model,
    chunk: list[tuple[Copy, list[list[Any]]]],
    columns: list[str],
    names: tuple[str, ...],
) -> None:
    assert candidate.scorer is not None
    values = np.array([row for _, rows in chunk for row in rows], dtype=np.float64)
    sizes = [len(rows) for _, rows in chunk]
    try:
        future = candidate.scorer.submit(pd.DataFrame(values, columns=columns))
        parts = split_rows(await asyncio.wrap_future(future), sizes)
    except Exception:
        parts = None
    if parts is None:  # each copy alone: its own answer, or its own failure
        for (_, scope, body), _ in chunk:
            await _shadow(candidate, scope, body)
        return
    start = 0
    for i, (((request_id, _, _), _), part, size) in enumerate(
        zip(chunk, parts, sizes, strict=True)
    ):
        if i and not i % YIELD_EVERY:
            await asyncio.sleep(0)
        rows = values[start : start + size]
        start += size
        # No per-copy time exists in a batch: no latency (the analysis's latency check then
        # has nothing to compare, rather than a batch's time against one request's).
        candidate.log.record_rows(request_id, names, rows, np.asarray(part), float("nan"))
        candidate.log.answered(True)


def _with_request_id(scope: Scope, request_id: str) -> Scope:
    """`scope` whose only `X-Request-ID` is `request_id`."""
    headers = [h for h in scope["headers"] if h[0].lower() != b"x-request-id"]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    return {**scope, "headers": headers}
