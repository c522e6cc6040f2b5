"""Shadow copies scored in batches (`shadow_batch_ms`) on a real local server: the clients get
the champion's answers, and the log pairs every request with the candidate's own answer to
its rows, as if each copy had been scored alone, also for copies still collected when the
worker leaves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from blocks import MLflowModelDeployer
from ctcd.rollout import RolloutPolicy
from ctcd.serving.predlog import read_log

pytestmark = pytest.mark.server

JSON = {"Content-Type": "application/json"}
SHADOW = RolloutPolicy(mode="shadow", shadow_percent=100)


def _example(record) -> dict:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return json.loads((folder / "serving_input_example.json").read_text())


def _bodies(record, count: int) -> list[tuple[str, bytes, pd.DataFrame]]:
    """(request id, body, its rows): 1 to 3 rows each, every row different."""
    split = _example(record)["dataframe_split"]
    base = np.array(split["data"], dtype=float)
    out = []
    for i in range(count):
        rows = base[: 1 + i % 3] * (1 + i / 1000)
        data = {"dataframe_split": {"columns": split["columns"], "data": rows.tolist()}}
        out.append(
            (f"b{i}", json.dumps(data).encode(), pd.DataFrame(rows, columns=split["columns"]))
        )
    return out


def _metadata(record) -> dict:
    url = record.prediction_url.rsplit("/", 1)[0] + "/metadata"
    return httpx.get(url, timeout=10).json()


def _wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if (value is not None and value is not False) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_batched_shadow_copies_pair_with_the_champion_and_match_the_candidate_alone(
    versions, ctcd_home
):
    deployer = MLflowModelDeployer(workers=1, shadow_batch_ms=5000, log_flush_s=0.5)
    good, better = versions["good"], versions["better"]
    record = deployer.deploy_model(good)
    try:
        bodies = _bodies(record, 240)
        alone = {}
        with httpx.Client(timeout=30) as client:
            for rid, body, _ in bodies[:40]:
                alone[rid] = client.post(record.prediction_url, content=body, headers=JSON).json()
            deployer.deploy_model(better, rollout=SHADOW)
            for rid, body, _ in bodies:
                r = client.post(
                    record.prediction_url, content=body, headers=JSON | {"X-Request-ID": rid}
                )
                assert r.status_code == 200, r.text
                assert r.headers["x-model-role"] == "champion"
                assert r.headers["x-model-version"] == good.model_version
                if rid in alone:
                    assert r.json() == alone[rid]
        rollout = _wait_for(
            lambda: (m := _metadata(record)["rollout"])["candidate_requests"] >= 240 and m
        )
        assert rollout and rollout["candidate_requests"] == 240
        assert rollout["candidate_failures"] == 0
        runtime = record.local.runtime_dir
        ids = {rid for rid, _, _ in bodies}

        def logged() -> pd.DataFrame | None:
            log = read_log(runtime)
            if log.empty:
                return None
            mine = log[log["request_id"].isin(ids)]
            shadow = mine[mine["role"] == "shadow"]
            return mine if shadow["request_id"].nunique() == 240 else None

        log = _wait_for(logged)
        assert log is not None, "the shadow rows did not reach the log"
        shadow = log[log["role"] == "shadow"].sort_values(["request_id", "row"])
        served = log[log["role"] == "champion"]
        assert set(served["request_id"]) == set(shadow["request_id"]) == ids
        assert (shadow["model_version"] == better.model_version).all()
        # scored in batches: a copy scored alone has a latency, one scored in a batch none
        assert shadow["latency_ms"].isna().all()
        candidate = mlflow.pyfunc.load_model(better.model_uri)
        for rid, _, frame in bodies:
            mine = shadow[shadow["request_id"] == rid]
            assert len(mine) == len(frame)
            expected = np.asarray(candidate.predict(frame), dtype=float).ravel()
            np.testing.assert_allclose(mine["prediction"].to_numpy(dtype=float), expected)
        # copies still collected when the rollout closes are scored before the worker leaves
        late = [(f"late{i}", body) for i, (_, body, _) in enumerate(bodies[:30])]
        with httpx.Client(timeout=30) as client:
            for rid, body in late:
                headers = JSON | {"X-Request-ID": rid}
                assert client.post(record.prediction_url, content=body, headers=headers).is_success
        deployer.abort_rollout(record.uuid)
        lates = {rid for rid, _ in late}
        log = _wait_for(
            lambda: (
                log
                if not (log := read_log(runtime)).empty
                and lates <= set(log.loc[log["role"] == "shadow", "request_id"])
                else None
            ),
            timeout=15,
        )
        assert log is not None, "copies collected when the worker left were not logged"
    finally:
        deployer.delete_model_server(record.uuid)
