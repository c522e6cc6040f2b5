"""What a rollout costs the champion, side by side in one run (issue 23):

    .venv/bin/python bench/rollout.py [--rounds 5] [--seconds 5] [--clients 1 16]
                                      [--champion random_forest] [--candidate linear]

One local server (1 worker by default) serves the champion (the demo's model: a random forest,
100 trees, depth 12) and, during a rollout, a second version of the same registered model (the
linear model), both trained on the 115,609-row sample (`ctcd.sample`). In each round the same
server is put in each state in turn and loaded by `httpload.py` (a separate client process,
keep-alive connections, single-row bodies, no `X-Request-ID`: each request gets a new id):

- `none`: the champion alone;
- `canary 10 %`: `deploy_model(candidate, rollout=RolloutPolicy("canary", traffic_percent=10))`;
- `shadow 100 %`: `deploy_model(candidate, rollout=RolloutPolicy("shadow", shadow_percent=100))`;
- `shadow 100 %, batched`: the same on the server redeployed with `shadow_batch_ms`
  (`--shadow-batch-ms`, default 500): copies collected and scored together;

with `abort_rollout` between them, so the rounds interleave (none, canary, shadow, none, ...)
and slow drifts of a shared machine spread over every state. After each switch a warm-up load
runs first. Latency p50/p99 counts the champion's answers only (`X-Model-Role: champion`);
req/s counts every answer; the workers' CPU time per answer (psutil, over the cell) says what
each state costs the server whatever else the machine runs, and the load average is printed
beside it. Memory: RSS and PSS of the worker (holding one version, or two
during a rollout) after its runs. Printed: each round's figures, then per state and client
count the median over rounds and the median of each round's ratio to that round's `none`, and
whether the issue's goal holds (shadow adds <= 10 % to the champion's p99 at 1 client). Results
also go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from common import isolated_home, register_versions, single_row_body
from serving import Server, load

from ctcd.rollout import RolloutPolicy

SHADOW = RolloutPolicy(mode="shadow", shadow_percent=100)
# state: (the rollout, whether the server collects shadow copies into batches)
STATES: dict[str, tuple[RolloutPolicy | None, bool]] = {
    "none": (None, False),
    "canary 10 %": (RolloutPolicy(mode="canary", traffic_percent=10), False),
    "shadow 100 %": (SHADOW, False),
    "shadow 100 %, batched": (SHADOW, True),
}
KEYS = ("p50_ms", "p99_ms", "req_s", "cpu_ms", "loadavg")
GOAL = 0.10  # shadow may add this share to the champion's p99 at 1 client


def worker_memory(server: Server) -> dict[str, float]:
    """RSS and PSS in MB of the server's workers (the master's children), summed, and how
    many there are (1 per worker once a switch has converged)."""
    rss = pss = 0.0
    workers = psutil.Process(server.pid).children(recursive=True)
    for proc in workers:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0.0)
    return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "workers": len(workers)}


def worker_cpu(server: Server) -> float:
    """CPU seconds (user + system) the server's workers have used so far."""
    total = 0.0
    for proc in psutil.Process(server.pid).children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure(server: Server, body: Path, clients: int, seconds: float) -> dict[str, Any]:
    """One cell: httpload's figures (latency of the champion's answers), the workers' CPU
    milliseconds per answer, and the machine's load average meanwhile (1 min)."""
    before = worker_cpu(server)
    r = load(server, body, clients, 1, seconds, role="champion")
    used = worker_cpu(server) - before
    return r | {"cpu_ms": used * 1000 / max(r["requests"], 1), "loadavg": os.getloadavg()[0]}


def metadata(url: str) -> dict[str, Any]:
    base = url.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/metadata", timeout=10) as answer:
        return json.loads(answer.read())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(rounds: list[dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    """Per state and client count: median p50, p99, req/s, CPU over the rounds, and the
    median of each round's ratio to that round's `none` (paired: a drift of the machine's
    load between rounds cancels); per state: median worker memory."""
    out: dict[str, Any] = {"load": {}, "memory": {}}
    for state in STATES:
        for c in clients:
            cells = [r["load"][str(c)] for r in rounds if r["state"] == state]
            out["load"][f"{state}|{c}"] = {
                key: median([cell[key] for cell in cells]) for key in KEYS
            } | {
                "p99_range": [min(cell["p99_ms"] for cell in cells),
                              max(cell["p99_ms"] for cell in cells)],
                "rounds": len(cells),
            }  # fmt: skip
        mems = [r["memory"] for r in rounds if r["state"] == state]
        out["memory"][state] = {k: median([m[k] for m in mems]) for k in ("rss_mb", "pss_mb")}
    base = {r["round"]: r["load"] for r in rounds if r["state"] == "none"}
    for c in clients:
        for state in STATES:
            mine = [r for r in rounds if r["state"] == state and r["round"] in base]
            out["load"][f"{state}|{c}"]["ratios"] = {
                k: median([r["load"][str(c)][k] / base[r["round"]][str(c)][k] for r in mine])
                for k in KEYS
            }
    return out


def print_tables(result: dict[str, Any], clients: list[int]) -> None:
    s = result["summary"]
    n = result["args"]["rounds"]
    print(f"\n| clients | state | champion p50 (ms) | champion p99 (ms) | p99 range over {n} "
          "rounds | req/s (all answers) | worker CPU ms per answer | load avg | vs none (median of "
          "paired ratios): p50 / p99 / req/s / CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        for state in STATES:
            cell = s["load"][f"{state}|{c}"]
            r = cell["ratios"]
            lo, hi = cell["p99_range"]
            print(f"| {c} | {state} | {cell['p50_ms']:.2f} | {cell['p99_ms']:.2f} | "
                  f"{lo:.2f}-{hi:.2f} | {cell['req_s']:,.0f} | {cell['cpu_ms']:.2f} | "
                  f"{cell['loadavg']:.1f} | {r['p50_ms']:.2f}x / {r['p99_ms']:.2f}x / "
                  f"{r['req_s']:.2f}x / {r['cpu_ms']:.2f}x |")  # fmt: skip
    print("\n| state | versions in the worker | worker RSS (MB) | worker PSS (MB) |")
    print("|---|---|---|---|")
    for state in STATES:
        m = s["memory"][state]
        held = 1 if STATES[state][0] is None else 2
        print(f"| {state} | {held} | {m['rss_mb']:.0f} | {m['pss_mb']:.0f} |")
    if 1 not in clients:
        return
    print()
    for state in ("shadow 100 %", "shadow 100 %, batched"):
        one = s["load"][f"{state}|1"]["ratios"]["p99_ms"]
        held = "holds" if one - 1 <= GOAL else "does NOT hold"
        print(f"goal: {state} adds <= {GOAL:.0%} to the champion's p99 at 1 client: "
              f"{one - 1:+.1%} ({held})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="load after each switch")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--champion", default="random_forest")
    parser.add_argument("--candidate", default="linear")
    parser.add_argument("--shadow-batch-ms", type=float, default=500.0)
    parser.add_argument("--out", default="rollout-results.json")
    args = parser.parse_args()
    work = isolated_home()
    from blocks import MLflowModelDeployer

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"training {args.champion} (champion) and {args.candidate} (candidate) on the "
          "115,609-row sample ...", flush=True)  # fmt: skip
    champion, candidate = register_versions(
        "bench-rollout", [(args.champion, {}), (args.candidate, {})]
    )
    deployers = {
        False: MLflowModelDeployer(workers=args.workers),
        True: MLflowModelDeployer(workers=args.workers, shadow_batch_ms=args.shadow_batch_ms),
    }
    deployer, batching = deployers[False], False
    record = deployer.deploy_model(champion)
    body = work / "body.json"
    body.write_bytes(single_row_body(record))
    server = Server(record.prediction_url, int(record.local.pid), None)
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(args.rounds):
            for state, (policy, batched) in STATES.items():
                switch = time.perf_counter()
                if deployer.get_model_server(record.uuid).rollout is not None:
                    deployer.abort_rollout(record.uuid)
                if batched != batching:  # the same version, the other settings: a swap
                    deployer, batching = deployers[batched], batched
                    deployer.deploy_model(champion)
                if policy is not None:
                    deployer.deploy_model(candidate, rollout=policy)
                switch_s = time.perf_counter() - switch
                warm = load(server, body, 1, 1, args.warmup)
                cells = {}
                for c in args.clients:
                    cells[str(c)] = measure(server, body, c, args.seconds)
                memory = worker_memory(server)
                meta = metadata(record.prediction_url)
                copies = meta.get("rollout", {}).get("candidate_requests")
                batch_ms = meta["settings"].get("shadow_batch_ms")
                sent = warm["requests"] + sum(r["requests"] for r in cells.values())
                rounds.append({"round": i + 1, "state": state, "load": cells, "memory": memory,
                               "switch_s": switch_s, "candidate_requests": copies,
                               "sent": sent, "shadow_batch_ms": batch_ms})  # fmt: skip
                line = "  ".join(
                    f"c={c}: {r['req_s']:6.0f} req/s p50 {r['p50_ms']:5.2f} p99 {r['p99_ms']:6.2f}"
                    f" ms cpu {r['cpu_ms']:.2f} ms/req ({r['timed']}/{r['requests']} timed, "
                    f"failed {r['failed']}, load {r['loadavg']:.1f})"
                    for c, r in cells.items()
                )
                print(f"round {i + 1} {state:21s} {line}  worker RSS {memory['rss_mb']:.0f} "
                      f"PSS {memory['pss_mb']:.0f} MB ({memory['workers']})"
                      + (f", candidate answered {copies}/{sent}" if copies is not None else "")
                      + f", switch {switch_s:.1f} s, shadow_batch_ms {batch_ms:g}",
                      flush=True)  # fmt: skip
    finally:
        deployer.delete_model_server(record.uuid)
    result = {"started": started, "args": vars(args), "rounds": rounds,
              "summary": summary(rounds, args.clients)}  # fmt: skip
    print_tables(result, args.clients)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
