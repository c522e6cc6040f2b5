"""Micro-batching: concurrent requests scored in one `predict` call give each request exactly
what scoring it alone gives, and a request with bad rows fails alone, with MLflow's own answer.
Against the session's real registered models, in process and behind a real gunicorn server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from io import StringIO
from typing import Any

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import scoring_server

from blocks import MLflowModelDeployer
from ctcd.serving.batching import BatchingModel
from ctcd.serving.settings import ServerSettings

pytestmark = pytest.mark.server

JSON = "application/json"


def _load(uri: str) -> Any:
    """The model as a worker serves it: every `n_jobs` set to 1 (so a forest sums its trees
    in a fixed order, as the server's does)."""
    model = mlflow.pyfunc.load_model(uri)
    estimator = model._model_impl.sklearn_model
    jobs = [key for key in estimator.get_params() if key.split("__")[-1] == "n_jobs"]
    estimator.set_params(**dict.fromkeys(jobs, 1))
    return model


def _frames(model: Any, count: int) -> list[pd.DataFrame]:
    """`count` different frames of 1 to 5 rows, built from the model's input example."""
    example = pd.DataFrame(model.input_example)
    rng = np.random.default_rng(7)
    frames = []
    for i in range(count):
        rows = example.sample(n=1 + i % 5, replace=True, random_state=i).reset_index(drop=True)
        numeric = rows.select_dtypes("number").columns
        rows[numeric] = rows[numeric] * rng.uniform(0.5, 1.5, size=(len(rows), len(numeric)))
        frames.append(rows.astype(example.dtypes.to_dict()))
    return frames


def _concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads that start together; each one's result or exception."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("label", ["good", "better"])  # linear, random forest
def test_batched_predictions_equal_each_request_scored_alone(versions, label):
    """Bit for bit for the forest (each row's trees are summed in the same order whatever the
    batch). The linear model's matrix product goes through BLAS, whose kernel for one row
    differs from the one for many: a row's prediction may differ in the last bit (here up to
    4e-16), exactly as it does without ctcd when a client sends that row alone or inside a
    larger request; so for it, equal within 2 units in the last place."""
    model = _load(versions[label].model_uri)
    scorer = BatchingModel(model, ServerSettings(max_batch_size=64, max_batch_wait_ms=200))
    frames = _frames(model, 24)
    results = _concurrently([lambda f=f: scorer.predict(f) for f in frames])
    for frame, result in zip(frames, results, strict=True):
        assert not isinstance(result, Exception), result
        alone = np.asarray(model.predict(frame))
        assert len(result) == len(frame)
        if label == "better":
            np.testing.assert_array_equal(np.asarray(result), alone)
        else:
            np.testing.assert_array_max_ulp(np.asarray(result), alone, maxulp=2)
    # They really were scored together: fewer predict calls than requests.
    assert scorer.batched_requests == len(frames)
    assert scorer.batches < len(frames) / 2, (scorer.batches, len(frames))


def test_a_request_that_fails_fails_alone(versions):
    """Rows with infinity pass the signature (they are doubles) but make the model raise:
    the batch they joined is scored again request by request, so only they fail."""
    model = _load(versions["better"].model_uri)
    scorer = BatchingModel(model, ServerSettings(max_batch_size=64, max_batch_wait_ms=200))
    frames = _frames(model, 12)
    poisoned = frames[5].copy()
    poisoned.iloc[0, 0] = np.inf
    wrong_type = frames[7].astype(object)
    wrong_type.iloc[0, 0] = "not a number"
    frames[5], frames[7] = poisoned, wrong_type
    results = _concurrently([lambda f=f: scorer.predict(f) for f in frames])
    for i, (frame, result) in enumerate(zip(frames, results, strict=True)):
        if i in (5, 7):
            with pytest.raises(type(result)) as alone:
                model.predict(frame)
            assert isinstance(result, Exception) and str(result) == str(alone.value)
        else:
            assert not isinstance(result, Exception), result
            np.testing.assert_array_equal(np.asarray(result), model.predict(frame))


def test_max_batch_size_caps_rows_per_call(versions):
    model = _load(versions["good"].model_uri)
    scorer = BatchingModel(model, ServerSettings(max_batch_size=4, max_batch_wait_ms=200))
    sizes: list[int] = []
    original = scorer._call
    scorer._call = lambda frame: sizes.append(len(frame)) or original(frame)  # type: ignore[method-assign]
    frames = [f.iloc[:2] if len(f) > 1 else f for f in _frames(model, 10)]
    frames.append(pd.concat([frames[1]] * 5, ignore_index=True))  # 10 rows: goes alone
    results = _concurrently([lambda f=f: scorer.predict(f) for f in frames])
    assert not any(isinstance(r, Exception) for r in results), results
    assert sum(sizes) == sum(len(f) for f in frames)
    assert max(sizes) == 10 and sorted(sizes)[-2] <= 4, sizes


def _answer(status: int, body: str) -> tuple[int, Any]:
    """(status, JSON body); an error's stack trace (which names the frames it passed through)
    is replaced by whether there was one."""
    try:
        data = json.loads(body)
    except ValueError:
        return status, body
    if isinstance(data, dict) and "stack_trace" in data:
        data["stack_trace"] = bool(data["stack_trace"])
    return status, data


def _mlflow_alone(model: Any, body: bytes) -> tuple[int, Any]:
    """What MLflow's own scoring code answers for `body` with the model scored alone."""
    schema = model.metadata.get_input_schema()
    try:
        result = scoring_server.invocations(body, JSON, model, schema)
    except mlflow.exceptions.MlflowException as err:
        return _answer(err.get_http_status_code(), err.serialize_as_json())
    return _answer(result.status, result.response)


def _body(frame: pd.DataFrame) -> bytes:
    split = json.loads(frame.to_json(orient="split", index=False))
    return json.dumps({"dataframe_split": split}).encode()


def test_server_batches_concurrent_requests_and_answers_each_as_mlflow_would(versions, ctcd_home):
    """16 clients at once against a 1-worker server: each answer (status and JSON) equals
    MLflow's answer for that request scored alone, bad ones included; and the worker's
    `/metadata` shows the requests were scored in fewer `predict` calls."""
    config = versions["better"]
    deployer = MLflowModelDeployer(workers=1, max_batch_wait_ms=20)
    record = deployer.deploy_model(config)
    try:
        model = _load(config.model_uri)
        frames = _frames(model, 48)
        bodies = [_body(f) for f in frames]
        split = json.loads(bodies[3])
        split["dataframe_split"]["data"][0][0] = float("inf")  # the model raises on it
        bodies[3] = json.dumps(split).encode()
        column = frames[9].columns[0]  # a missing column: the signature check refuses it
        bodies[9] = bodies[9].replace(f'"{column}"'.encode(), b'"not_a_feature"', 1)
        bodies[20] = json.dumps({"dataframe_split": {"columns": ["x"], "data": "no"}}).encode()
        # The fast path's edges: each must be answered as MLflow answers it, on whichever path.
        edited = {
            11: lambda d: [[round(v) for v in row] for row in d],  # ints in double columns
            13: lambda d: [[float("nan"), *row[1:]] for row in d],  # NaN (JSON `NaN`)
            15: lambda d: [[None, *row[1:]] for row in d],  # null
            17: lambda d: [[True, *row[1:]] for row in d],  # a boolean
            19: lambda d: [[str(row[0]), *row[1:]] for row in d],  # a number as a string
            21: lambda d: [[2**60, *row[1:]] for row in d],  # an int too large for a double
        }
        for i, edit in edited.items():
            split = json.loads(bodies[i])
            split["dataframe_split"]["data"] = edit(split["dataframe_split"]["data"])
            bodies[i] = json.dumps(split).encode()
        split = json.loads(bodies[23])  # columns in another order: MLflow reorders them
        columns = split["dataframe_split"]["columns"]
        split["dataframe_split"] = {
            "columns": columns[::-1],
            "data": [row[::-1] for row in split["dataframe_split"]["data"]],
        }
        bodies[23] = json.dumps(split).encode()
        split = json.loads(bodies[25])  # records instead of split
        records = [dict(zip(columns, row, strict=True)) for row in split["dataframe_split"]["data"]]
        bodies[25] = json.dumps({"dataframe_records": records}).encode()
        bodies[27] = bodies[27][:-1] + b', "params": {}}'  # params: MLflow's route
        clients = [httpx.Client(timeout=30) for _ in range(16)]

        def send(i: int) -> tuple[int, Any]:
            response = clients[i % 16].post(
                record.prediction_url, content=bodies[i], headers={"Content-Type": JSON}
            )
            return _answer(response.status_code, response.text)

        answers = _concurrently([lambda i=i: send(i) for i in range(16)])
        answers += _concurrently([lambda i=i: send(i) for i in range(16, 48)])
        for client in clients:
            client.close()
        before = {}
        for i, (body, answer) in enumerate(zip(bodies, answers, strict=True)):
            expected = _mlflow_alone(model, body)
            assert answer == expected, (i, answer, expected)
            before[i] = answer[0]
        assert {3, 9, 20} <= {i for i, status in before.items() if status != 200}
        assert before[11] == before[13] == before[23] == before[25] == 200
        meta = httpx.get(record.prediction_url.replace("invocations", "metadata")).json()
        batching = meta["batching"]
        assert batching["enabled"] and batching["max_batch_wait_ms"] == 20
        assert meta["model_threads"] == 1
        # Both paths answered (the fast one most), and the requests that reached the model were
        # scored in fewer predict calls than there were requests.
        assert batching["fast_path"] >= 30 and batching["mlflow_path"] >= 8, batching
        assert batching["requests"] >= 40
        assert batching["predict_calls"] < batching["requests"] * 0.75, batching
    finally:
        deployer.delete_model_server(record.uuid)


def test_encoding_matches_mlflow_for_slices(versions):
    """A slice of the batch's predictions encodes as the request's own predictions would."""
    model = _load(versions["good"].model_uri)
    frames = _frames(model, 3)
    whole = model.predict(pd.concat(frames, ignore_index=True))
    start = 0
    for frame in frames:
        part, alone = StringIO(), StringIO()
        scoring_server.predictions_to_json(whole[start : start + len(frame)], part)
        scoring_server.predictions_to_json(model.predict(frame), alone)
        assert part.getvalue() == alone.getvalue()
        start += len(frame)


@pytest.mark.parametrize("trees", [5, 40])
def test_direct_forest_predict_is_bit_for_bit_the_forests_own(small_table, trees):
    """ctcd.serving.forest scores a forest tree by tree without joblib: exactly what the
    forest's own `predict` with one job gives, on single rows and on many."""
    from sklearn.ensemble import RandomForestRegressor

    from ctcd.serving.forest import direct_predict
    from flows.data import Dataset, clean_data
    from flows.model import train_model

    data = clean_data.fn(Dataset(frame=small_table, source="s.csv", sha256="00" * 32))
    pipeline = train_model.fn(data, "random_forest", {"n_estimators": trees})
    pipeline.set_params(model__n_jobs=1)
    predict = direct_predict(pipeline)
    assert predict is not None
    x = data.x_test.copy()
    x.iloc[0, 0] = np.nan  # the pipeline's imputer fills it, as in the forest's own path
    np.testing.assert_array_equal(predict(x), pipeline.predict(x))
    for i in range(20):
        row = x.iloc[i : i + 1]
        np.testing.assert_array_equal(predict(row), pipeline.predict(row))
    assert (
        direct_predict(RandomForestRegressor(n_estimators=2).fit([[0], [1]], [[0, 1], [1, 0]]))
        is None
    )
    assert direct_predict(pipeline.steps[0][1]) is None  # not a forest
