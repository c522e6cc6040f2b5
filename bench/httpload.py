"""A lean HTTP/1.1 load client for bench/serving.py, run as its own process so that clients and
servers never share an interpreter:

    python bench/httpload.py URL BODY_FILE --clients 16 --seconds 5 --rows 1 [--v2] [--role R]

Each client holds one keep-alive connection and sends the same POST back to back (asyncio on
raw sockets, uvloop when installed: far less client CPU per request than an HTTP library, so
the 2 shared cores go to the servers). A request counts only when it is answered 200 with one
prediction per row sent (`predictions` in MLflow's protocol, `outputs[0].data` in V2's). Prints
one JSON line: requests, rows, failed, req/s, rows/s, p50, p99 (ms), and how many answers each
`X-Model-Role` gave (`roles`). With `--role R`, p50 and p99 are those of the answers with role
R alone (a rollout's champion); requests and req/s still count every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlsplit

from ctcd.client import read_predictions


def _count(body: bytes, v2: bool) -> int:
    return len(read_predictions(json.loads(body), "v2" if v2 else "mlflow"))


def _role(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        if line[:13].lower() == b"x-model-role:":
            return line[13:].strip().decode("latin-1")
    return ""


async def _client(
    host: str, port: int, request: bytes, rows: int, v2: bool, stop: float, out: dict
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    latencies = out["latencies"]
    try:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            took = time.perf_counter() - start
            role = _role(head)
            out["roles"][role] = out["roles"].get(role, 0) + 1
            if out["role"] is None or role == out["role"]:
                latencies.append(took)
            try:
                ok = status == 200 and _count(body, v2) == rows
            except (ValueError, KeyError, IndexError, TypeError):
                ok = False
            out["failed"] += not ok
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    except (ConnectionError, asyncio.IncompleteReadError) as err:
        out["errors"].append(repr(err))
    finally:
        writer.close()


async def run(
    url: str,
    body: bytes,
    clients: int,
    seconds: float,
    rows: int,
    v2: bool,
    role: str | None = None,
) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    out: dict = {"latencies": [], "failed": 0, "errors": [], "roles": {}, "role": role}
    stop = time.perf_counter() + seconds
    await asyncio.gather(
        *(_client(host, port, request, rows, v2, stop, out) for _ in range(clients))
    )
    lat = sorted(out["latencies"])
    answered = sum(out["roles"].values())
    done = answered - out["failed"]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0] if lat else 0.0] * 99
    return {
        "requests": answered,
        "failed": out["failed"] + len(out["errors"]),
        "req_s": done / seconds,
        "rows_s": done * rows / seconds,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "errors": out["errors"][:3],
        "roles": out["roles"],
        "timed": len(lat),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--role", help="time only the answers with this X-Model-Role")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with open(args.body_file, "rb") as handle:
        body = handle.read()
    result = asyncio.run(
        run(args.url, body, args.clients, args.seconds, args.rows, args.v2, args.role)
    )
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
