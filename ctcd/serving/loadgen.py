"""A small load generator for tests and benchmarks: keep-alive HTTP clients in threads.

Each client sends the same body over one keep-alive connection, back to back, and retries a
request once when the connection is reset or closed under it (as HTTP clients do for a
keep-alive connection the server closed). It counts those resets, the requests that still
failed after the retry, and every request's latency (retry included).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


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
    """`with Load(url, body, clients=4) as load: ...` then read `load.stats`."""

    def __init__(self, url: str, body: bytes, clients: int = 1):
        self.url, self.body, self.clients = url, body, clients
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _send(self, client: httpx.Client) -> tuple[bool, bool, str]:
        """(ok, was_reset, error)"""
        for attempt in (1, 2):
            try:
                response = client.post(self.url, content=self.body)
            except httpx.TransportError as err:
                if attempt == 2:
                    return False, True, type(err).__name__
                continue
            ok = response.status_code == 200
            return ok, attempt == 2, "" if ok else f"HTTP {response.status_code}"
        return False, True, "unreachable"

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(headers=headers, timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                ok, reset, error = self._send(client)
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.stats.requests += 1
                    self.stats.failed += not ok
                    self.stats.resets += reset
                    self.stats.latencies.append(elapsed)
                    if error:
                        self.stats.errors[error] += 1
