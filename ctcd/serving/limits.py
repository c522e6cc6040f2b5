"""Request limits and client-error answers for the model server, as pure ASGI middleware.

`RequestGuard` caps POST bodies at the server's `max_body_bytes` (default 16 MiB) without
buffering them, and turns the few malformed requests MLflow's scoring app fails on with a 500 into
4xx answers that say what was wrong. It does not mask server faults: only exceptions raised
inside MLflow's decoding of a JSON body are answered as the client's error (400); any other
exception still propagates to the app's 500 handler.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctcd.serving.compat import raised_while_parsing

logger = logging.getLogger("ctcd.serving")


def first_headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by (lower-case) name, the FIRST of any repeated one: what
    starlette's `request.headers.get()` gives MLflow's route, so the server reads a request
    with two Content-Type headers as MLflow does."""
    return dict(reversed(scope["headers"]))


class _TooLarge(Exception):
    """Raised from the app's `receive` once a body without a length passes the limit, to
    stop the app reading; the middleware then answers 413."""


def _unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) exception groups, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _answer(send: Send, status: int, error_code: str, message: str) -> None:
    """Send a JSON error in MLflow's shape: `{"error_code": ..., "message": ...}`."""
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: 413 for POST bodies over the limit, 4xx for malformed requests.

    A declared `Content-Length` over the limit is refused before the body is read; a body
    without one (chunked) is counted as the app reads it and refused once it passes the
    limit, if the app has not started its response.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return (
            f"The request body is larger than this server's limit of {self.max_bytes:,} bytes "
            "(the deployer's `max_body_bytes`). Send fewer rows per request: split the batch into "
            "several smaller requests."
        )

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, error code, message) for a request refused before its body is read."""
        headers = first_headers(scope)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return 413, "REQUEST_TOO_LARGE", self._too_large()
        # No header at all fails inside MLflow's route (a 500); an empty one is MLflow's to
        # answer (415, naming the type it got).
        if scope["path"] == "/invocations" and b"content-type" not in headers:
            message = (
                "The request has no Content-Type header. Send JSON as 'application/json' "
                '(e.g. {"dataframe_split": {"columns": [...], "data": [[...]]}}) or CSV '
                "as 'text/csv'."
            )
            return 415, "UNSUPPORTED_MEDIA_TYPE", message
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        watch = _Watch(receive, send, self.max_bytes)
        try:
            await self.app(scope, watch.receive, watch.send)
        except Exception as exc:  # may arrive wrapped in an ExceptionGroup by anyio
            if watch.started:
                raise
            if watch.received > self.max_bytes:
                await _answer(send, 413, "REQUEST_TOO_LARGE", self._too_large())
                return
            await _answer(send, 400, "BAD_REQUEST", _bad_body(exc))


class _Watch:
    """The app's `receive` and `send`, counting the body's bytes (stopping the app once it
    passes the limit) and noting whether the response has started."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.received = 0
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise _TooLarge
        return message

    async def send(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


def _bad_body(exc: Exception) -> str:
    """The 400's message for an exception MLflow's body decoding let escape (too deeply nested,
    integers of over 4,300 digits, unhashable column names, ...); any other exception is
    raised again, for the app's 500."""
    cause = _unwrap(exc)
    if not isinstance(cause, RecursionError | ValueError | TypeError):
        raise exc
    if not raised_while_parsing(cause):
        raise exc
    logger.warning("answered 400 to an unparsable request body: %r", cause)
    detail = "it is nested too deeply" if isinstance(cause, RecursionError) else repr(cause)
    return (
        f"The request body could not be read as model input: {detail[:300]}. Send one number "
        '(or null) per cell, e.g. {"dataframe_split": {"columns": [...], "data": [[1.0, 2.5, '
        "...], ...]}}."
    )
