"""A small load generator for tests and benchmarks: keep-alive HTTP clients in threads.

Each client sends the same body over one keep-alive connection, back to back, and retries a
request once when the connection is reset or closed under it (as HTTP clients do for a
keep-alive connection the server closed). It counts those resets, the requests that still
failed after the retry, and every request's latency (retry included). A request succeeds only
when it is answered 200 with a JSON body whose `predictions` has one entry per row sent.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from ctcd.client import answer_problem, rows_in


@dataclass
class LoadStats:
    requests: int = 0
    failed: int = 0
    resets: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def longest(self) -> float:
        return max(self.latencies, default=0.0)

    def percentile(self, q: float) -> float:
        if len(self.latencies) < 2:
            return self.longest
        return statistics.quantiles(self.latencies, n=100)[int(q) - 1]


class Load:
    """`with Load(url, body, clients=4) as load: ...` then read `load.stats`.

    `body` may be a list of bodies: each client cycles through it, and assigning
    `load.bodies` mid-run changes what the clients send next (e.g. a distribution shift).
    With `request_ids`, every request carries an `X-Request-ID` (`<prefix><client>-<n>`)."""

    def __init__(
        self, url: str, body: bytes | list[bytes], clients: int = 1, request_ids: str = ""
    ):
        self.url, self.clients, self.request_ids = url, clients, request_ids
        self.bodies = [body] if isinstance(body, bytes) else list(body)
        self.stats = LoadStats()
        self._rows: dict[bytes, int] = {}  # predictions expected per body
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _send(
        self, client: httpx.Client, body: bytes, headers: dict[str, str]
    ) -> tuple[bool, bool, str]:
        """(ok, was_reset, error)"""
        for attempt in (1, 2):
            try:
                response = client.post(self.url, content=body, headers=headers)
            except httpx.TransportError as err:
                if attempt == 2:
                    return False, True, type(err).__name__
                continue
            if body not in self._rows:
                self._rows[body] = rows_in(body)
            error = answer_problem(response, self._rows[body])
            return not error, attempt == 2, error
        return False, True, "unreachable"

    def _run(self, index: int) -> None:
        headers = {"Content-Type": "application/json"}
        sent = 0
        with httpx.Client(headers=headers, timeout=30) as client:
            while not self._stop.is_set():
                bodies = self.bodies
                body = bodies[(sent * self.clients + index) % len(bodies)]
                extra = (
                    {"X-Request-ID": f"{self.request_ids}{index}-{sent}"}
                    if self.request_ids
                    else {}
                )
                sent += 1
                start = time.perf_counter()
                ok, reset, error = self._send(client, body, extra)
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.stats.requests += 1
                    self.stats.failed += not ok
                    self.stats.resets += reset
                    self.stats.latencies.append(elapsed)
                    if error:
                        self.stats.errors[error] += 1
