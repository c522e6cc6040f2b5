"""The fast path for the request a model server sees most: a small JSON `dataframe_split`
body whose columns are the model's signature, in order, and whose cells are plain numbers.

MLflow's scoring code spends about 1.1 ms parsing such a one-row body (a DataFrame built from
Python lists, then cast column by column to the signature's types) and 0.5 ms checking it
against the signature, more than a linear model takes to predict; and its route runs behind
a `BaseHTTPMiddleware` and a thread hop. For a body this path can prove conforming, it builds
the very frame MLflow's parsing and signature check would produce (float64 columns in signature
order, the same values) straight from the decoded JSON, has it scored in the worker's next
batch, and encodes the answer with MLflow's own encoder. Everything else (other formats,
content types or column orders, nulls, strings, booleans, large bodies, params, a signature
with other than `double` columns) and any request whose scoring raises is handed, body
unchanged, to MLflow's own route, so its answer, error or not, is exactly MLflow's.
"""

from __future__ import annotations

import asyncio
import json
from io import StringIO
from typing import Any

import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.pyfunc.scoring_server import predictions_to_json
from mlflow.types.schema import DataType
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctcd.serving.batching import BatchingModel
from ctcd.serving.limits import first_headers
from ctcd.serving.predlog import REQUEST_ID, request_id_from

MAX_FAST_BODY = 64 * 1024  # larger bodies are parsed by MLflow, in a thread
_EXACT_INT = 2**53  # ints up to this convert to float64 exactly


def signature_columns(model: BatchingModel) -> list[str] | None:
    """The signature's column names if every column is a required `double` (the case the
    fast path handles), else None."""
    schema = model.input_schema
    if (
        not model.enabled
        or schema is None
        or schema.is_tensor_spec()
        or not schema.has_input_names()
    ):
        return None
    columns = []
    for spec in schema.inputs:
        if getattr(spec, "type", None) != DataType.double or not getattr(spec, "required", False):
            return None
        columns.append(spec.name)
    return columns


def _number(value: Any) -> bool:
    kind = type(value)
    return kind is float or (kind is int and -_EXACT_INT < value < _EXACT_INT)


def parse(body: bytes, columns: list[str]) -> pd.DataFrame | None:
    """The frame MLflow would score for `body`, or None if this is not the simple case."""
    data = parse_rows(body, columns)
    if data is None:
        return None
    return pd.DataFrame(np.array(data, dtype=np.float64), columns=columns)


def parse_rows(body: bytes, columns: list[str]) -> list[list[Any]] | None:
    """The rows (plain numbers, in signature order) of `body`, or None if this is not the
    simple case (`parse` without building the frame)."""
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):  # MLflow's route gives these their 400
        return None
    if type(decoded) is not dict or len(decoded) != 1:
        return None
    split = decoded.get("dataframe_split")
    if type(split) is not dict or split.keys() != {"columns", "data"}:
        return None
    if split["columns"] != columns:
        return None
    data = split["data"]
    width = len(columns)
    if type(data) is not list or not data:
        return None
    for row in data:
        if type(row) is not list or len(row) != width or not all(map(_number, row)):
            return None
    return data


class FastInvocations:
    """ASGI middleware: answers `POST /invocations` on the fast path when it can, and hands
    every other request, and every request it cannot answer, to the app behind it. Every
    `POST /invocations` answer carries an `X-Request-ID` (the client's, or a new one)."""

    def __init__(self, app: ASGIApp, scorer: BatchingModel) -> None:
        self.app = app
        self.scorer = scorer
        self.columns = signature_columns(scorer)
        self.timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()  # type: ignore[no-untyped-call]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        headers = first_headers(scope)  # repeated headers read as MLflow's route reads them
        # Every answer names its request: the client's X-Request-ID, or one made here. The
        # prediction log records it (MLflow's route reads it from REQUEST_ID in its thread).
        request_id = request_id_from(headers.get(b"x-request-id"))
        REQUEST_ID.set(request_id)
        send = _with_request_id(send, request_id.encode("latin-1"))
        length = headers.get(b"content-length", b"")
        if (
            self.columns is None
            or headers.get(b"content-type") != b"application/json"
            or not (length.isdigit() and int(length) <= MAX_FAST_BODY)
        ):
            self.scorer.counts["mlflow_path"] += 1
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        frame = parse(body, self.columns)
        if frame is not None:
            try:
                answer = await asyncio.wait_for(self._score(frame, request_id), self.timeout)
            except TimeoutError:
                await _send(send, 504, b"Request processing time exceeded limit")
                return
            except Exception:
                answer = None  # MLflow's route scores it again and answers with its error
            if answer is not None:
                self.scorer.counts["fast_path"] += 1
                await _send(send, 200, answer)
                return
        self.scorer.counts["mlflow_path"] += 1
        await self.app(scope, replay_body(body, receive), send)

    async def _score(self, frame: pd.DataFrame, request_id: str) -> bytes:
        predictions = await asyncio.wrap_future(self.scorer.submit(frame))
        out = StringIO()
        predictions_to_json(predictions, out)  # type: ignore[no-untyped-call]
        if self.scorer.log is not None:
            self.scorer.log.record(request_id, frame, predictions)
        return out.getvalue().encode()


async def read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _with_request_id(send: Send, request_id: bytes) -> Send:
    """`send` with an `x-request-id` header added to the response."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
        await send(message)

    return sending


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then defers to the client's."""
    pending = [body]

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
