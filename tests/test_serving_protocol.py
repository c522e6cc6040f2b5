"""The model server's protocol under fuzzing: over a thousand malformed requests, generated
from a fixed seed, against a real gunicorn server. Every one must get a 4xx with a message,
valid requests in between must still be scored, and no worker may crash or be replaced."""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from starlette.types import Message, Receive, Scope, Send

from blocks import MLflowModelDeployer, ServiceRecord
from ctcd.serving.limits import RequestGuard

pytestmark = pytest.mark.server

LIMIT = 1024 * 1024  # the server's max_body_bytes in this module
SEED = 20_240_611
JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
VALID_EVERY = 50


@dataclass(frozen=True)
class Case:
    """One request: `content_type=None` sends no Content-Type; `chunked` sends no length."""

    kind: str
    body: bytes = b""
    content_type: str | None = JSON
    method: str = "POST"
    path: str = "/invocations"
    chunked: bool = False
    rows: int = 0  # for valid requests: how many predictions to expect


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory) -> Iterator[ServiceRecord]:
    """The session's linear model served by two workers with a 1 MiB body limit."""
    config = versions["good"]
    deployer = MLflowModelDeployer(
        workers=2, root_dir=str(tmp_path_factory.mktemp("fuzz-srv")), max_body_bytes=LIMIT
    )
    record = deployer.deploy_model(config)
    try:
        yield record
    finally:
        deployer.delete_model_server(record.uuid)


class Fuzzer:
    """Builds valid and malformed requests from the model's own input example."""

    FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

    def __init__(self, example: dict[str, Any], seed: int) -> None:
        self.rng = random.Random(seed)
        self.columns: list[str] = list(example["dataframe_split"]["columns"])
        self.example: list[list[float]] = [list(r) for r in example["dataframe_split"]["data"]]

    # -- building blocks ------------------------------------------------------------------
    def rows(self, n: int | None = None) -> list[list[Any]]:
        n = self.rng.randint(1, 8) if n is None else n
        return [
            [round(v * self.rng.uniform(0.5, 1.5), 2) for v in self.rng.choice(self.example)]
            for _ in range(n)
        ]

    @staticmethod
    def payload(fmt: str, columns: list[Any], rows: list[list[Any]]) -> dict[str, Any]:
        if fmt == "dataframe_split":
            return {fmt: {"columns": columns, "data": rows}}
        if fmt in ("dataframe_records", "instances"):
            return {fmt: [dict(zip(columns, row, strict=False)) for row in rows]}
        return {fmt: {c: [row[i] for row in rows] for i, c in enumerate(columns)}}

    def valid_json(self, rows: list[list[Any]] | None = None, fmt: str | None = None) -> bytes:
        fmt = fmt or self.rng.choice(self.FORMATS)
        return json.dumps(self.payload(fmt, self.columns, rows or self.rows())).encode()

    def csv(self, rows: list[list[Any]]) -> bytes:
        lines = [",".join(self.columns)] + [",".join(map(str, row)) for row in rows]
        return ("\n".join(lines) + "\n").encode()

    def word(self) -> str:
        """Letters that do not parse as a float (so not 'nan', 'inf', 'infinity')."""
        while True:
            word = "".join(self.rng.choices(string.ascii_letters, k=self.rng.randint(1, 10)))
            try:
                float(word)
            except ValueError:
                return word

    def bad_value(self, fmt: str) -> Any:
        """A cell no float column accepts. (MLflow scores `[]` as missing in `inputs`.)"""
        if fmt == "inputs":
            return self.rng.choice(
                [self.word(), "", [0.5, 1.5], self.rng.choice([1, -1]) * 10**400]
            )
        return self.rng.choice(
            [
                lambda: self.word(),
                lambda: "",
                lambda: {self.word(): self.rng.random()},
                lambda: [self.rng.random(), self.rng.random()],
                lambda: [],
                lambda: self.rng.choice([-1, 1]) * 10 ** self.rng.randint(309, 4000),
                lambda: self.rng.choice([float("inf"), float("-inf")]),
            ]
        )()

    # -- malformed request generators -----------------------------------------------------
    def truncated(self) -> Case:
        body = self.valid_json()
        return Case("truncated JSON", body[: self.rng.randrange(len(body) - 1)])

    def malformed(self) -> Case:
        text = self.valid_json().decode()
        while _parses(text):
            at = self.rng.randrange(len(text))
            op = self.rng.randrange(4)
            if op == 0:
                text = text[:at] + text[at + 1 :]
            elif op == 1:
                text = text[:at] + self.rng.choice("{}[],:\"'\\") + text[at:]
            elif op == 2:
                text = text.replace('"', "'", self.rng.randint(1, 5))
            else:
                text = (
                    text[:at]
                    + self.rng.choice(["NULL", "True", "01", "1.", ".5", "+1"])
                    + text[at:]
                )
        return Case("malformed JSON", text.encode())

    def random_bytes(self) -> Case:
        body = self.rng.randbytes(self.rng.randint(1, 4000))
        return Case("random bytes", body, self.rng.choice([JSON, CSV, PARQUET]))

    def invalid_utf8(self) -> Case:
        as_csv = self.rng.random() < 0.3
        body = self.csv(self.rows()) if as_csv else self.valid_json()
        bad = self.rng.choice(
            [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80"]
        )
        at = self.rng.randrange(len(body))
        return Case("invalid UTF-8", body[:at] + bad + body[at:], CSV if as_csv else JSON)

    def wrong_top_level(self) -> Case:
        inner = self.payload("dataframe_split", self.columns, self.rows())["dataframe_split"]
        rows = self.rows()
        choice = self.rng.choice(
            [
                lambda: [],
                lambda: [inner],
                lambda: self.rng.choice([None, True, 42, 1.5, "dataframe_split"]),
                lambda: {},
                lambda: {"params": {}},
                lambda: {"data": rows},
                lambda: {"columns": self.columns, "data": rows},
                lambda: {self.word(): inner},
                lambda: {"Dataframe_Split": inner},
                lambda: {"dataframe_split ": inner},
                lambda: {"dataframe_split": inner, "instances": rows},
                lambda: dict.fromkeys(self.FORMATS, inner),
                lambda: {"inputs": rows, "instances": rows},
            ]
        )
        return Case("wrong top-level keys", json.dumps(choice()).encode())

    def wrong_columns(self) -> Case:
        fmt = self.rng.choice(self.FORMATS)
        columns: list[Any] = list(self.columns)
        rows = self.rows()
        how = self.rng.randrange(5)
        if how == 0:  # rename some columns
            for i in self.rng.sample(range(12), self.rng.randint(1, 12)):
                columns[i] = self.rng.choice([self.word(), columns[i].upper(), columns[i] + " "])
        elif how == 1:  # drop some columns (and their values)
            keep = sorted(self.rng.sample(range(12), self.rng.randint(0, 11)))
            columns = [columns[i] for i in keep]
            rows = [[row[i] for i in keep] for row in rows]
        elif how == 2:  # numbers or nulls for names
            columns = self.rng.choice([list(range(12)), [None] * 12, [1.5] * 12])
        elif how == 3:  # one name twice, another missing
            i, j = self.rng.sample(range(12), 2)
            columns[i] = columns[j]
        else:  # an extra column, and one missing
            columns[self.rng.randrange(12)] = self.word()
            columns.append(self.word())
            rows = [[*row, 1.0] for row in rows]
        return Case(f"wrong columns ({fmt})", json.dumps(self.payload(fmt, columns, rows)).encode())

    def wrong_values(self) -> Case:
        fmt = self.rng.choice(self.FORMATS)
        rows = self.rows()
        for _ in range(self.rng.randint(1, 4)):
            rows[self.rng.randrange(len(rows))][self.rng.randrange(12)] = self.bad_value(fmt)
        return Case(
            f"wrong values ({fmt})", json.dumps(self.payload(fmt, self.columns, rows)).encode()
        )

    def nesting(self) -> Case:
        rows = self.rows()
        split = {"columns": self.columns, "data": rows}
        depth = self.rng.choice([self.rng.randint(100, 900), self.rng.randint(1_000, 200_000)])
        deep = "[" * depth + "1" + "]" * depth
        deep_dict = '{"a": ' * min(depth, 100_000) + "1" + "}" * min(depth, 100_000)
        columns = json.dumps(self.columns)
        huge_row = "1" + "0" * self.rng.randint(4300, 20_000) + ",1.0" * 11  # > 4300 digits
        choice = self.rng.choice(
            [
                lambda: json.dumps({"dataframe_split": {"columns": self.columns, "data": [rows]}}),
                lambda: json.dumps(
                    {"dataframe_split": {**split, "data": [[[v] for v in r] for r in rows]}}
                ),
                lambda: json.dumps({"dataframe_split": {"dataframe_split": split}}),
                lambda: json.dumps({"dataframe_split": {**split, "columns": [{"a": 1}] * 12}}),
                lambda: json.dumps(
                    {"inputs": {"inputs": self.payload("inputs", self.columns, rows)}}
                ),
                lambda: json.dumps(
                    {"dataframe_records": [self.payload("dataframe_records", self.columns, rows)]}
                ),
                lambda: deep,
                lambda: f'{{"dataframe_split": {{"columns": {columns}, "data": {deep}}}}}',
                lambda: f'{{"{self.rng.choice(self.FORMATS)}": {deep}}}',
                lambda: f'{{"inputs": {deep_dict}}}',
                lambda: f'{{"dataframe_split": {{"columns": {columns}, "data": [[{huge_row}]]}}}}',
            ]
        )
        return Case("extra nesting / huge tokens", choice().encode())

    def row_lengths(self) -> Case:
        rows = self.rows(self.rng.randint(1, 8))
        lengths = [self.rng.choice([n for n in range(0, 30) if n != 12]) for _ in rows]
        if self.rng.random() < 0.5:  # some rows right, one too long
            lengths = [12] * len(rows)
            lengths[self.rng.randrange(len(rows))] = self.rng.randint(13, 30)
        data = [(row * 3)[:n] for row, n in zip(rows, lengths, strict=True)]
        body = {"dataframe_split": {"columns": self.columns, "data": data}}
        if self.rng.random() < 0.2:
            body = {
                "dataframe_split": {"columns": self.columns, "data": self.rng.choice([[], [[]]])}
            }
        return Case("mismatched row lengths", json.dumps(body).encode())

    def empty(self) -> Case:
        body = self.rng.choice([b"", b" ", b"\n", b"\r\n\t "])
        return Case("empty body", body, self.rng.choice([JSON, CSV, PARQUET, None, "text/plain"]))

    def content_type(self) -> Case:
        rows = self.rows()
        choice = self.rng.choice(
            [
                lambda: Case("content type", self.valid_json(rows), None),
                lambda: Case("content type", self.valid_json(rows), "text/plain"),
                lambda: Case("content type", b"<rows><row a='1'/></rows>", "application/xml"),
                lambda: Case("content type", self.valid_json(rows), "application/xml"),
                lambda: Case("content type", self.valid_json(rows), "text/html"),
                lambda: Case("content type", b"a=1&b=2", "application/x-www-form-urlencoded"),
                lambda: Case(
                    "content type", self.valid_json(rows), "multipart/form-data; boundary=x"
                ),
                lambda: Case(
                    "content type",
                    self.valid_json(rows),
                    self.rng.choice(
                        [
                            "application/json; charset=latin-1",
                            "application/json; charset=iso-8859-1",
                            "application/json; charset=utf-16",
                        ]
                    ),
                ),
                lambda: Case("content type", self.valid_json(rows), "application/json; foo=bar"),
                lambda: Case(
                    "content type",
                    self.valid_json(rows),
                    self.rng.choice(["json", "*/*", "application/jsonx"]),
                ),
                lambda: Case("content type", self.csv(rows), JSON),
                lambda: Case("content type", self.valid_json(rows), CSV),
                lambda: Case("content type", self.csv_garbage(), CSV),
                lambda: Case("content type", self.valid_json(rows), PARQUET),
            ]
        )
        return choice()

    def csv_garbage(self) -> bytes:
        tokens = [self.word(), str(self.rng.random()), '"', '""', ";", "\t", "é", ",", ",,"]
        lines = [
            ",".join(self.rng.choices(tokens, k=self.rng.randint(1, 15)))
            for _ in range(self.rng.randint(1, 20))
        ]
        return "\n".join(lines).encode()

    def oversize(self) -> Case:
        big = self.rows(LIMIT // 60)  # about 2 MiB as JSON
        choice = self.rng.choice(
            [
                lambda: (self.valid_json(big), JSON),
                lambda: (self.csv(big) * 2, CSV),
                lambda: (self.rng.randbytes(2 * LIMIT), JSON),
                lambda: (b"[" * (LIMIT + 1), JSON),
            ]
        )
        body, ctype = choice()
        assert len(body) > LIMIT
        return Case("oversize", body, ctype, chunked=self.rng.random() < 0.5)

    def wrong_method(self) -> Case:
        choice = self.rng.choice(
            [
                lambda: Case(
                    "wrong method/path",
                    self.valid_json(),
                    JSON,
                    self.rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
                ),
                lambda: Case(
                    "wrong method/path", b"", None, self.rng.choice(["GET", "PUT", "DELETE"])
                ),
                lambda: Case(
                    "wrong method/path",
                    self.valid_json(),
                    JSON,
                    "POST",
                    self.rng.choice(["/ping", "/health", "/version", "/metadata"]),
                ),
                lambda: Case(
                    "wrong method/path", self.valid_json(), JSON, "POST", "/x-" + self.word()
                ),
                lambda: Case("wrong method/path", b"", None, "GET", "/x-" + self.word()),
            ]
        )
        return choice()

    def bad_cases(self) -> list[Case]:
        plan: list[tuple[Callable[[], Case], int]] = [
            (self.truncated, 100),
            (self.malformed, 150),
            (self.random_bytes, 60),
            (self.invalid_utf8, 60),
            (self.wrong_top_level, 80),
            (self.wrong_columns, 120),
            (self.wrong_values, 160),
            (self.nesting, 80),
            (self.row_lengths, 60),
            (self.empty, 30),
            (self.content_type, 120),
            (self.oversize, 24),
            (self.wrong_method, 60),
        ]
        cases = [make() for make, count in plan for _ in range(count)]
        self.rng.shuffle(cases)
        return cases

    def valid_case(self, i: int) -> Case:
        if i % 10 == 9:  # just under the body limit
            rows = self.rows(LIMIT // 130)
            body = self.valid_json(rows, "dataframe_split")
            assert LIMIT // 2 < len(body) <= LIMIT
            return Case("valid", body, rows=len(rows), chunked=i % 20 == 9)
        rows = self.rows()
        if i % 3 == 2:
            return Case("valid", self.csv(rows), CSV, rows=len(rows))
        return Case("valid", self.valid_json(rows), rows=len(rows))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _send(client: httpx.Client, base: str, case: Case) -> httpx.Response:
    headers = {} if case.content_type is None else {"Content-Type": case.content_type}
    body = case.body
    content: bytes | Iterator[bytes] = (
        iter([body[i : i + 65_536] for i in range(0, len(body), 65_536)]) if case.chunked else body
    )
    return client.request(case.method, base + case.path, content=content, headers=headers)


def _problem(case: Case, response: httpx.Response) -> str | None:
    """Why this answer is wrong, or None."""
    if case.kind == "valid":
        if response.status_code != 200:
            return f"valid request answered {response.status_code}: {response.text[:300]}"
        if len(response.json()["predictions"]) != case.rows:
            return "wrong number of predictions"
        return None
    if not 400 <= response.status_code < 500:
        return f"answered {response.status_code}: {response.text[:300]}"
    if not response.content.strip():
        return "empty error body"
    if response.headers.get("content-type", "").startswith(JSON):
        error = response.json()
        message = error.get("message") or error.get("detail")
        if not isinstance(message, str) or not message.strip():
            return f"JSON error without a message: {response.text[:300]}"
    return None


def test_a_thousand_bad_requests_get_4xx_and_the_server_stays_up(server: ServiceRecord) -> None:
    base = server.prediction_url.removesuffix("/invocations")
    example = Path(
        str(server.local.runtime_dir), "models", server.model_version, "serving_input_example.json"
    )
    fuzzer = Fuzzer(json.loads(example.read_text()), SEED)
    bad = fuzzer.bad_cases()
    master = psutil.Process(server.local.pid)
    workers_before = {p.pid for p in master.children()}
    assert len(workers_before) == 2

    statuses: dict[str, Counter[int | str]] = defaultdict(Counter)
    problems: list[str] = []
    started = time.monotonic()
    clients = [httpx.Client(timeout=30) for _ in range(3)]
    try:
        schedule = []
        for i, case in enumerate(bad):
            if i % VALID_EVERY == 0:
                schedule.append(fuzzer.valid_case(i // VALID_EVERY))
            schedule.append(case)
        schedule.append(fuzzer.valid_case(len(bad)))
        for i, case in enumerate(schedule):
            try:
                response = _send(clients[i % len(clients)], base, case)
            except httpx.TransportError as err:
                statuses[case.kind]["dropped"] += 1
                problems.append(f"{case.kind}: connection error {err!r}")
                continue
            statuses[case.kind][response.status_code] += 1
            if (problem := _problem(case, response)) is not None:
                problems.append(f"{case.kind} ({case.content_type}, {len(case.body)} B): {problem}")
    finally:
        for client in clients:
            client.close()
    elapsed = time.monotonic() - started

    total: Counter[int | str] = Counter()
    for kind, counts in sorted(statuses.items()):
        total.update(counts)
        print(f"{kind:32s} {dict(sorted(counts.items(), key=str))}")
    print(f"all: {dict(sorted(total.items(), key=str))} in {elapsed:.1f} s")

    assert not problems, f"{len(problems)} wrong answers, e.g.:\n" + "\n".join(problems[:100])
    # Every bad request was answered with a 4xx (none dropped, none 2xx or 5xx), and every
    # valid one interleaved with them with a 200 and its predictions.
    client_errors = sum(
        count
        for kind, counts in statuses.items()
        if kind != "valid"
        for code, count in counts.items()
        if isinstance(code, int) and 400 <= code < 500
    )
    assert client_errors == len(bad)
    valid = sum(case.kind == "valid" for case in schedule)
    assert statuses["valid"][200] == valid
    assert master.is_running() and master.pid == server.local.pid
    assert httpx.get(server.health_url, timeout=5).status_code == 200
    assert {p.pid for p in master.children()} == workers_before, "a worker crashed"
    log = Path(str(server.local.log_path)).read_text()
    assert "Exception in ASGI application" not in log


def _call(app: RequestGuard, chunks: list[bytes]) -> list[Message]:
    """Run one POST /invocations through `app` with a body in `chunks` and no length."""
    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", JSON.encode())]}  # fmt: skip
    incoming: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_server_faults_are_not_turned_into_client_errors() -> None:
    """Only exceptions from MLflow's decoding of the body become 400s; a bug elsewhere
    still propagates (and is answered 500 by the app's error handler)."""

    async def buggy(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        raise TypeError("a bug in the server")

    app = RequestGuard(buggy, max_bytes=100)
    with pytest.raises(TypeError, match="a bug in the server"):
        _call(app, [b"{}"])
    start, body = _call(app, [b"x" * 60, b"x" * 41])  # no length: counted as it is read
    assert start["status"] == 413 and b"split the batch" in body["body"]
