"""Helpers for tests of rollouts on a real local server: request bodies of distinct rows,
a concurrent client that keeps every answer's version, role and predictions, the shadow
candidate's counts from the prediction log's stats, and a shadow that fails on some rows."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from blocks import DeploymentConfig, MLflowModelDeployer, ServiceRecord
from ctcd.client import request_body
from ctcd.rollout import ROLE_HEADER, VERSION_HEADER, RolloutPolicy
from ctcd.serving.logstats import FOLDER, STATS
from ctcd.serving.predlog import read_log
from tests.conftest import RAISING_COLUMN, UNSEEN_VALUE
from tests.interrupt import eventually

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Answer:
    status: int
    version: str | None  # X-Model-Version
    role: str | None  # X-Model-Role
    predictions: tuple[float, ...]


def feature_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The held-out feature rows of `table` (cleaned as training does), without missing values."""
    from flows.data import Dataset, clean_data

    data = clean_data.fn(Dataset(frame=table, source="s.csv", sha256="00" * 32))
    return data.x_test.dropna().astype("float64").reset_index(drop=True)


def bodies(rows: pd.DataFrame, count: int, per_request: int = 1) -> list[pd.DataFrame]:
    """`count` request frames of `per_request` consecutive rows each (cycling through `rows`)."""
    frames = []
    for i in range(count):
        start = (i * per_request) % (len(rows) - per_request)
        frames.append(rows.iloc[start : start + per_request].reset_index(drop=True))
    return frames


def body(frame: pd.DataFrame) -> bytes:
    return request_body(frame, "mlflow").encode()


def send_all(
    url: str, requests: Iterable[tuple[str, bytes]], clients: int = 16
) -> dict[str, Answer]:
    """POST every (request id, body) over `clients` keep-alive connections (asyncio on raw
    sockets, as bench/httpload.py: the test process takes little of the cores the server
    needs); every answer by request id (a resent id keeps its last answer)."""
    return asyncio.run(_send_all(url, list(requests), clients))


async def _send_all(url: str, requests: list[tuple[str, bytes]], clients: int) -> dict[str, Answer]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    answers: dict[str, Answer] = {}
    todo = iter(requests)  # shared: each connection takes the next request when it is free

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for request_id, content in todo:
                writer.write(
                    f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\n"
                    f"Content-Length: {len(content)}\r\n\r\n".encode()
                    + content
                )
                status, headers = _head(await reader.readuntil(b"\r\n\r\n"))
                data = await reader.readexactly(int(headers.get("content-length", 0)))
                predictions = tuple(json.loads(data)["predictions"]) if status == 200 else ()
                answers[request_id] = Answer(
                    status, headers.get(VERSION_HEADER), headers.get(ROLE_HEADER), predictions
                )
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(clients)))
    return answers


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    """An answer's status and headers (names in lower case)."""
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if value:
            headers[name.strip().lower()] = value.strip()
    return int(status.split(" ", 2)[1]), headers


def role_counts(runtime: Path | str, role: str) -> dict[str, int]:
    """Requests answered (or, for a shadow, copies scored) in `role` and how many failed,
    summed over the server's workers' prediction-log stats (written at every flush)."""
    total = {"requests": 0, "failures": 0, "skipped": 0}
    for path in (Path(runtime) / FOLDER / STATS).glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("role") == role:
            for key in total:
                total[key] += int(data.get(key, 0))
    return total


WAVE = 8  # requests sent at once by `shadow_that_fails_on_some_rows`


@dataclass(frozen=True)
class ShadowFailures:
    """What `shadow_that_fails_on_some_rows` sent and what the candidate failed on."""

    record: ServiceRecord  # the server, with the shadow open
    requests: int  # requests sent; the champion answered every one (asserted)
    failing: frozenset[str]  # the ids of those with a row the candidate raises on
    failed_rows: int  # rows the candidate raises on (one in each failing request)


def shadow_that_fails_on_some_rows(
    deployer: MLflowModelDeployer,
    candidate: DeploymentConfig,
    rows: pd.DataFrame,
    requests: int = 200,
    every: int = 4,
) -> ShadowFailures:
    """Open a 100 % shadow of `candidate` (the `raising_version` fixture) on the server of
    `deployer` that serves its champion, send `requests` requests of 2 rows, every `every`-th
    with one row the candidate raises on, assert the clients got the champion's answers
    only, and wait until the candidate's copies are all counted in the log's stats.

    The requests go in waves of `WAVE` with a pause: a worker scores at most 64 copies at once
    (`ctcd.serving.router.MAX_SHADOWS`) and skips the rest (counted as `skipped`); a burst of
    16 clients had 79 of 200 copies of this candidate skipped on a loaded 2-core machine."""
    record = deployer.deploy_model(candidate, rollout=RolloutPolicy(mode="shadow"))
    assert record.rollout is not None and record.rollout.mode == "shadow", record
    frames = bodies(rows, requests, per_request=2)
    failing = set()
    sent = []
    for i, frame in enumerate(frames):
        request_id = f"raising-{i}"
        if i % every == 0:
            frame = frame.copy()
            frame.loc[1, RAISING_COLUMN] = UNSEEN_VALUE
            failing.add(request_id)
        sent.append((request_id, body(frame)))
    answers: dict[str, Answer] = {}
    for start in range(0, len(sent), WAVE):  # paced, so that no copy is skipped (see above)
        answers |= send_all(record.prediction_url, sent[start : start + WAVE], clients=WAVE)
        time.sleep(0.1)
    assert {a.status for a in answers.values()} == {200}, "a client saw the candidate fail"
    assert {(a.version, a.role) for a in answers.values()} == {
        (record.rollout.champion_version, "champion")
    }
    runtime = record.local.runtime_dir
    eventually(
        lambda: (c := role_counts(runtime, "shadow"))["requests"] + c["skipped"] >= requests,
        30,
        f"the log's stats counting the candidate's {requests} copies",
    )
    return ShadowFailures(record, requests, frozenset(failing), len(failing))


def logged(runtime: Path | str, prefix: str, rows: int) -> pd.DataFrame:
    """The log's rows of requests whose id starts with `prefix`, once at least `rows` of them
    are written (the workers flush every 2 s)."""

    def read() -> list[pd.DataFrame] | None:
        log = read_log(runtime)
        if log.empty:
            return None
        mine = log[log["request_id"].str.startswith(prefix)].reset_index(drop=True)
        return [mine] if len(mine) >= rows else None

    found: list[pd.DataFrame] = eventually(read, 30, f"{rows} logged rows of requests {prefix}*")
    return found[0]
