"""The load generator that the zero-downtime tests and the benchmarks trust: it counts a
request as served only when the answer holds one prediction per row sent. Checked against a
stand-in server (stdlib `http.server`, not a model server) that answers 200 with wrong bodies."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctcd.client import rows_in
from ctcd.loadgen import Load

pytestmark = pytest.mark.unit

BODY = json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}).encode()
ANSWERS = [
    (200, b'{"predictions": [1.0, 2.0]}'),  # right
    (200, b'{"predictions": [1.0]}'),  # one prediction short
    (200, b"not json"),
    (200, b'{"error_code": "BAD_REQUEST", "message": "x"}'),
    (500, b'{"predictions": [1.0, 2.0]}'),  # right body, wrong status
]


@pytest.fixture
def standin() -> Iterator[str]:
    """Answers POSTs with ANSWERS in turn."""
    turn = itertools.cycle(ANSWERS)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                status, body = next(turn)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/invocations"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_only_answers_with_every_prediction_count(standin: str) -> None:
    with Load(standin, BODY, clients=1) as load:
        deadline = time.monotonic() + 30
        while load.stats.requests < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
    stats = load.stats
    assert stats.requests >= 50
    # one answer in five is right: the other four kinds are failures, each named
    assert stats.failed == stats.requests - (stats.requests + 4) // 5
    assert set(stats.errors) == {
        "200 with 1 predictions",
        "200 without predictions",
        "HTTP 500",
    }


def test_rows_in_reads_every_scoring_format() -> None:
    assert rows_in(BODY) == 2
    assert rows_in(json.dumps({"dataframe_records": [{"a": 1}] * 3}).encode()) == 3
    assert rows_in(json.dumps({"instances": [[1], [2]]}).encode()) == 2
    with pytest.raises(ValueError, match="not a scoring-protocol body"):
        rows_in(b'{"rows": []}')
