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
  memory or time.

Every answer carries `X-Model-Version` (the version that answered) and `X-Model-Role`
(`champion` or `canary`). Each model's log counts the requests it answered and those it answered
with an error status (`PredictionLog.answered`): the rollout's failure-rate guardrail.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctcd.rollout import ROLE_HEADER, VERSION_HEADER, OpenRollout, to_candidate
from ctcd.serving.fastpath import read_body, replay_body
from ctcd.serving.limits import first_headers
from ctcd.serving.predlog import REQUEST_START, PredictionLog, request_id_from

MAX_SHADOWS = 64


class Model:
    """One model's app (MLflow's route behind the fast path) and its prediction log."""

    def __init__(self, app: ASGIApp, version: str, log: PredictionLog) -> None:
        self.app = app
        self.version = version
        self.log = log


class RolloutRouter:
    """ASGI middleware in front of the champion's app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        champion: Model,
        candidate: Model | None = None,
        rollout: OpenRollout | None = None,
    ) -> None:
        self.app = app
        self.champion = Model(app, champion.version, champion.log)
        self.candidate = candidate if rollout is not None else None
        self.rollout = rollout
        self.shadows: set[asyncio.Task[None]] = set()

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
        if len(self.shadows) >= MAX_SHADOWS:
            candidate.log.skipped_copy()
            return
        task = asyncio.create_task(_shadow(candidate, scope, body))
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)


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


def _with_request_id(scope: Scope, request_id: str) -> Scope:
    """`scope` whose only `X-Request-ID` is `request_id`."""
    headers = [h for h in scope["headers"] if h[0].lower() != b"x-request-id"]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    return {**scope, "headers": headers}
