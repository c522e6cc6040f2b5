"""The prediction log of a real local model server: what it scored, by request id, as Parquet
under its runtime folder; never what it refused, never headers; a burst beyond the buffer is
dropped and counted without slowing a request; a killed worker leaves every file readable."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest

from blocks import MLflowModelDeployer
from ctcd.loadgen import Load
from ctcd.serving.predlog import read_log

pytestmark = pytest.mark.server

JSON = {"Content-Type": "application/json"}
SECRET = "Bearer do-not-log-this-token-7f3a"


def _example(record) -> dict:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return json.loads((folder / "serving_input_example.json").read_text())


def _body(record, rows: int) -> bytes:
    """The first `rows` rows of the served version's input example, as a request body."""
    example = _example(record)
    example["dataframe_split"]["data"] = example["dataframe_split"]["data"][:rows]
    return json.dumps(example).encode()


def _wait_rows(deployer, record, rows: int, timeout: float = 20) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = deployer.get_model_server(record.uuid).prediction_log_rows
        if seen.get("written_rows", 0) + seen.get("dropped_rows", 0) >= rows:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"the log holds {seen} after {timeout} s; expected {rows} rows")
        time.sleep(0.2)


def test_served_requests_are_logged_by_request_id(versions, ctcd_home):
    deployer = MLflowModelDeployer(log_flush_s=0.5)
    record = deployer.deploy_model(versions["good"])
    try:
        example = _example(record)
        columns, data = example["dataframe_split"]["columns"], example["dataframe_split"]["data"]
        sent: dict[str, list[list[float]]] = {}
        answers: dict[str, list[float]] = {}
        with httpx.Client(timeout=30) as client:
            for i in range(8):
                rows = data[: 1 + i % 3]
                body = {"dataframe_split": {"columns": columns, "data": rows}}
                headers = JSON | ({"X-Request-ID": f"req-{i}"} if i % 2 == 0 else {})
                headers["Authorization"] = SECRET
                response = client.post(record.prediction_url, json=body, headers=headers)
                assert response.status_code == 200
                rid = response.headers["x-request-id"]
                assert rid == f"req-{i}" if i % 2 == 0 else len(rid) == 32
                sent[rid], answers[rid] = rows, response.json()["predictions"]
            # MLflow's route (records, not split) is logged too
            records = [dict(zip(columns, row, strict=True)) for row in data[:2]]
            response = client.post(
                record.prediction_url,
                json={"dataframe_records": records},
                headers=JSON | {"X-Request-ID": "records-1"},
            )
            assert response.status_code == 200 and response.headers["x-request-id"] == "records-1"
            sent["records-1"], answers["records-1"] = data[:2], response.json()["predictions"]
            refused = client.post(
                record.prediction_url,
                json={"dataframe_split": {"columns": ["nope"], "data": [[1]]}},
                headers=JSON | {"X-Request-ID": "refused-1", "Authorization": SECRET},
            )
            assert refused.status_code == 400
        total = sum(len(rows) for rows in sent.values())
        assert _wait_rows(deployer, record, total) == {"written_rows": total, "dropped_rows": 0}

        log = read_log(record.local.runtime_dir)
        assert set(log["request_id"]) == set(sent)  # the refused request is not there
        assert set(log["model_version"]) == {record.model_version}
        for rid, rows in sent.items():
            mine = log[log["request_id"] == rid].sort_values("row")
            assert mine[columns].to_numpy().tolist() == pd.DataFrame(rows).to_numpy().tolist()
            assert mine["prediction"].tolist() == answers[rid]
        files = list(Path(str(record.prediction_log_dir)).rglob("*.parquet"))
        assert files and all(f.parent.name.startswith("hour=") for f in files)
        everything = b"".join(f.read_bytes() for f in Path(str(record.local.runtime_dir)).rglob("*")
                              if f.is_file() and f.name != "server.log")  # fmt: skip
        assert b"do-not-log-this-token" not in everything
        assert b"refused-1" not in everything
    finally:
        deployer.delete_model_server(record.uuid)


def test_a_burst_beyond_the_buffer_is_dropped_and_counted_not_waited_for(versions, ctcd_home):
    deployer = MLflowModelDeployer(log_buffer_rows=20, log_flush_s=5)
    record = deployer.deploy_model(versions["good"])
    try:
        started = time.monotonic()
        with Load(record.prediction_url, _body(record, 1), clients=4) as load:
            while load.stats.requests < 200:
                time.sleep(0.05)
        burst = time.monotonic() - started
        stats = load.stats
        assert stats.failed == 0
        assert stats.longest < 1.0, f"a request took {stats.longest:.2f} s"
        seen = _wait_rows(deployer, record, stats.requests, timeout=30)
        assert seen["written_rows"] + seen["dropped_rows"] == stats.requests
        # At most one full buffer (20 rows) per write during the burst, and one after it.
        most = 20 * (int(burst // 5) + 2)
        assert 0 < seen["written_rows"] <= most and seen["dropped_rows"] >= stats.requests - most
    finally:
        deployer.delete_model_server(record.uuid)


def test_swap_and_a_killed_worker_leave_a_readable_log_of_both_versions(versions, ctcd_home):
    deployer = MLflowModelDeployer(workers=2, log_flush_s=0.3)
    record = deployer.deploy_model(versions["good"])
    try:
        with Load(record.prediction_url, _body(record, 2), clients=3) as load:
            time.sleep(1.5)
            record = deployer.deploy_model(versions["better"])
            time.sleep(1.0)
            victim = psutil.Process(record.local.pid).children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(2.0)
        assert load.stats.requests > 50
        time.sleep(1.0)  # the surviving workers' next flush
        folder = Path(str(record.prediction_log_dir))
        for path in folder.rglob("*.parquet"):
            pd.read_parquet(path)  # every file written is whole
        log = read_log(record.local.runtime_dir)
        assert set(log["model_version"]) == {versions["good"].model_version,
                                             versions["better"].model_version}  # fmt: skip
        assert log.groupby("request_id")["row"].count().eq(2).all()
    finally:
        deployer.delete_model_server(record.uuid)


def test_retention_and_sampling(tmp_path: Path) -> None:
    """In process (no server): `max_log_bytes` deletes the oldest files first; `sample_rate`
    keeps about that share of requests; a log switched off writes nothing."""
    from ctcd.serving.predlog import PredictionLog, read_stats
    from ctcd.serving.settings import ServerSettings

    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    log = PredictionLog(tmp_path, "7", ServerSettings(max_log_bytes=20_000, log_flush_s=5))
    for i in range(40):
        for j in range(20):
            log.record(f"r{i}-{j}", frame, [0.5, 0.6])
        log.flush()
        time.sleep(0.01)  # distinct modification times
    log.close()
    files = sorted((tmp_path / "predictions").rglob("*.parquet"))
    assert 0 < sum(f.stat().st_size for f in files) <= 20_000
    assert len(files) < 40  # the oldest went
    kept = read_log(tmp_path)
    assert kept["request_id"].iloc[-1] == "r39-19" and "r0-0" not in set(kept["request_id"])
    assert read_stats(tmp_path)["written_rows"] == 40 * 20 * 2

    sampled = PredictionLog(
        tmp_path / "s", "7", ServerSettings(log_sample_rate=0.25, log_flush_s=5)
    )
    for i in range(2_000):
        sampled.record(f"s{i}", frame, [0.5, 0.6])
    sampled.close()
    share = len(read_log(tmp_path / "s")) / (2 * 2_000)
    assert 0.18 < share < 0.32, share

    off = PredictionLog(tmp_path / "off", "7", ServerSettings(prediction_log=False))
    off.record("x", frame, [0.5, 0.6])
    off.close()
    assert not (tmp_path / "off").exists()
