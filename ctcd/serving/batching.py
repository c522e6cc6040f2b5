"""Adaptive micro-batching for a worker's `/invocations`, behind MLflow's own scoring code.

Each request still goes through MLflow's `scoring_server.invocations`: content types,
parsing, error answers and the JSON encoding of the result are MLflow's. Only the model it is
handed differs. `BatchingModel.predict` checks the request's rows against the model's
signature on their own (so a request whose rows fail validation fails alone, with MLflow's
message) and queues them for the worker's one scoring thread. That thread takes every request
waiting at that moment, up to `max_batch_size` rows, and after waiting up to
`max_batch_wait_ms` for more (default 0: no wait, so a lone client's request is scored at
once), scores them in one `predict` call and hands each request its own slice of the result.
While a batch is being scored, new requests queue, so the batch grows with the load by itself.

A batch is only formed from requests whose validated frames have the same columns and dtypes,
and only split back when the model returned one prediction per row; anything else (params,
non-tabular input, a model whose output is not per row, a batch that raised) is scored one
request at a time, exactly as without batching.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PyFuncModel
from threadpoolctl import threadpool_limits

from ctcd.serving import compat
from ctcd.serving.forest import direct_predict
from ctcd.serving.predlog import REQUEST_ID, PredictionLog, new_request_id
from ctcd.serving.settings import ServerSettings


@dataclass
class _Request:
    frame: pd.DataFrame
    key: tuple[Any, ...]
    result: Future[Any] = field(default_factory=Future)


def _key(frame: pd.DataFrame) -> tuple[Any, ...]:
    return tuple(frame.columns), tuple(str(dtype) for dtype in frame.dtypes)


def split_rows(predictions: Any, sizes: list[int]) -> list[Any] | None:
    """`predictions` cut into consecutive parts of `sizes` rows, or None if it is not one
    prediction per row of a type whose slices MLflow encodes as it encodes the whole."""
    total = sum(sizes)
    if isinstance(predictions, np.ndarray | pd.Series | pd.DataFrame | list):
        if len(predictions) != total:
            return None
    else:
        return None
    parts: list[Any] = []
    start = 0
    for size in sizes:
        if isinstance(predictions, pd.Series | pd.DataFrame):
            parts.append(predictions.iloc[start : start + size])
        else:
            parts.append(predictions[start : start + size])
        start += size
    return parts


class BatchingModel:
    """What MLflow's `invocations` is handed instead of the loaded model: same `metadata`,
    and a `predict` that batches concurrent requests (see the module's docstring)."""

    def __init__(
        self,
        model: PyFuncModel,
        settings: ServerSettings | None = None,
        log: PredictionLog | None = None,
    ) -> None:
        self.model = model
        self.settings = settings or ServerSettings()
        self.log = log  # what MLflow's route scored is recorded here (fastpath records its own)
        meta: Any = model.metadata
        self.input_schema = meta.get_input_schema()
        self.params_schema = meta.get_params_schema()
        # Only plain signature-checked tabular models are batched; others go to MLflow as is.
        self.enabled = (
            self.settings.max_batch_size > 1
            and self.input_schema is not None
            and not compat.signature_from_type_hints(model)
        )
        # Forests are scored tree by tree without joblib (ctcd.serving.forest); the same result.
        estimator = compat.sklearn_estimator(model)
        direct = direct_predict(estimator) if estimator is not None else None
        self._predict: Callable[[pd.DataFrame], Any] = direct or compat.raw_predict(model)
        self._waiting: deque[_Request] = deque()
        self._ready = threading.Condition()
        self.batches = 0  # predict calls made by the scoring thread
        self.batched_requests = 0
        # POST /invocations answered on ctcd.serving.fastpath's path and by MLflow's route
        self.counts = {"fast_path": 0, "mlflow_path": 0}
        if self.enabled:
            threading.Thread(target=self._run, name="ctcd-batcher", daemon=True).start()

    @property
    def metadata(self) -> Any:
        return self.model.metadata

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Called by MLflow's `invocations` (in a thread) for each request on its route."""
        if not self.enabled or params or not isinstance(data, pd.DataFrame):
            result = self.model.predict(data, params=params)
            self._record(data, result)
            return result
        frame = compat.validate_input(self.model, data, params)
        if not isinstance(frame, pd.DataFrame):
            result = self.model.predict(data, params=params)
        else:
            result = self.submit(frame).result()
        self._record(frame, result)
        return result

    def _record(self, data: Any, result: Any) -> None:
        if self.log is not None and isinstance(data, pd.DataFrame):
            self.log.record(REQUEST_ID.get() or new_request_id(), data, result)

    def submit(self, frame: pd.DataFrame) -> Future[Any]:
        """Queue a frame that already conforms to the signature (checked by `predict`, or
        built conforming by `ctcd.serving.fastpath`) for the next batch: its predictions."""
        request = _Request(frame, _key(frame))
        with self._ready:
            self._waiting.append(request)
            self._ready.notify()
        return request.result

    # -- the scoring thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                self._score(batch)
            except BaseException as err:  # never leave a request waiting
                for request in batch:
                    if not request.result.done():
                        request.result.set_exception(err)

    def _take(self) -> list[_Request]:
        """The next batch: the oldest waiting request and those behind it with the same
        columns and dtypes, up to `max_batch_size` rows (a larger request goes alone)."""
        limit = self.settings.max_batch_size
        wait = self.settings.max_batch_wait_ms / 1000
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            first = self._waiting.popleft()
            batch, rows = [first], len(first.frame)
            deadline = time.monotonic() + wait
            while rows < limit:
                matching = [r for r in self._waiting if r.key == first.key]
                for request in matching:
                    if rows + len(request.frame) > limit:
                        break
                    self._waiting.remove(request)
                    batch.append(request)
                    rows += len(request.frame)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining > 0 and self._ready.wait(remaining):
                        continue
                break
        return batch

    def _score(self, batch: list[_Request]) -> None:
        if len(batch) > 1:
            try:
                joined = pd.concat([r.frame for r in batch], ignore_index=True)
                parts = split_rows(self._call(joined), [len(r.frame) for r in batch])
            except Exception:
                parts = None  # score each request alone: each gets its own answer or error
            if parts is not None:
                self.batches += 1
                self.batched_requests += len(batch)
                for request, part in zip(batch, parts, strict=True):
                    request.result.set_result(part)
                return
        for request in batch:
            self.batches += 1
            self.batched_requests += 1
            _settle(request.result, partial(self._call, request.frame))

    def _call(self, frame: pd.DataFrame) -> Any:
        """The model's own predict, without checking the signature a second time: every frame
        queued was checked (or built conforming) on its own."""
        return self._predict(frame)


def _settle(result: Future[Any], compute: Callable[[], Any]) -> None:
    try:
        result.set_result(compute())
    except Exception as err:
        result.set_exception(err)


def set_threads(model: PyFuncModel, threads: int) -> None:
    """Give the loaded model `threads` threads (0: leave it as it is): every scikit-learn
    `n_jobs` parameter of the estimator (a Pipeline's steps included) and, process-wide, the
    BLAS and OpenMP pools. Only the loaded copy changes, never the registered artifact."""
    if threads < 1:
        return
    estimator = compat.sklearn_estimator(model)
    if estimator is not None and hasattr(estimator, "get_params"):
        jobs = [key for key in estimator.get_params() if key.split("__")[-1] == "n_jobs"]
        estimator.set_params(**dict.fromkeys(jobs, threads))
    threadpool_limits(threads)
