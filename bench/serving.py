"""Serving speed and memory, side by side in one run: ctcd's server before and after
micro-batching, `mlflow models serve`, MLServer with adaptive batching, and the in-process limit.

    bash bench/mlserver_setup.sh                      # once: MLServer in a venv of its own
    .venv/bin/python bench/serving.py [--models random_forest linear] [--seconds 4]
                                      [--workers 1 2] [--clients 1 4 16] [--no-mlserver]
                                      [--peers "ctcd" "ctcd no log" ...]

For each model (trained on the 115,609-row sample: random forest 100 trees depth 12, and the
linear model), each server is started with 1 and then 2 workers and loaded by `httpload.py`, a
separate client process (keep-alive connections, 1/4/16 clients, single-row and 32-row
bodies). Only answers with one prediction per row sent count. Peers:

- `ctcd before`: ctcd's server as it was before micro-batching: every request scored alone,
  the model's own threading (the forest's `n_jobs=-1`): `max_batch_size=1, model_threads=0`.
- `ctcd`: the defaults (batching up to 256 rows, no batch wait, 1 model thread per worker;
  forests scored tree by tree without joblib, `ctcd.serving.forest`; the prediction log on).
- `ctcd no log`: the same with `prediction_log=False`, for the log's cost.
- `mlflow`: `mlflow models serve --workers N` (uvicorn).
- `mlserver`: MLServer 1.7.1's MLflow runtime, `parallel_workers=N`, adaptive batching
  (`max_batch_size` 256, `max_batch_time` 2 ms), V2 protocol bodies.

Memory: RSS and PSS summed over each server's processes, idle (after start) and loaded (after
its runs). The in-process limit: `mlflow.pyfunc.load_model(...).predict` on one row and on 32
rows in this process, as loaded and with 1 thread. Results also go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import isolated_home, register_two_versions

from ctcd import processes as procs
from ctcd.client import request_body

HERE = Path(__file__).resolve().parent
MLSERVER_VENV = Path(
    os.environ.get("MLSERVER_VENV", Path.home() / ".cache/ctcd-bench/mlserver-venv")
)
MLSERVER_BATCH_SIZE = 256  # requests (MLServer counts requests, not rows)
MLSERVER_BATCH_TIME_S = 0.002
PEERS = ("ctcd before", "ctcd", "ctcd no log", "mlflow", "mlserver")


# -- servers ------------------------------------------------------------------------------
class Server:
    """A running peer: its URL, the root PID of its processes, whether it speaks V2."""

    def __init__(self, url: str, pid: int, stop: Any, v2: bool = False) -> None:
        self.url, self.pid, self.stop, self.v2 = url, pid, stop, v2

    def memory(self) -> dict[str, float]:
        """RSS and PSS in MB, summed over the server's processes."""
        root = psutil.Process(self.pid)
        procs = [root, *root.children(recursive=True)]
        rss = pss = 0.0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += info.pss
        return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "processes": len(procs)}


def _wait(url: str, ref: procs.ProcessRef, what: str) -> None:
    for _ in range(1200):
        if not ref.alive():
            raise RuntimeError(f"{what} exited")
        if procs.answers(url, timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready")


def _kill_group(ref: procs.ProcessRef) -> None:
    procs.stop(ref, 30, whole_group=True)


def start_ctcd(config: Any, workers: int, peer: str) -> Server:
    from blocks import MLflowModelDeployer

    settings: dict[str, Any] = {
        "ctcd before": {"max_batch_size": 1, "model_threads": 0, "prediction_log": False},
        "ctcd no log": {"prediction_log": False},
    }.get(peer, {})
    deployer = MLflowModelDeployer(workers=workers, **settings)
    record = deployer.deploy_model(config)
    return Server(
        record.prediction_url,
        int(record.local.pid),
        lambda: deployer.delete_model_server(record.uuid),
    )


def start_mlflow(model_dir: Path, workers: int) -> Server:
    port = procs.free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]  # fmt: skip
    ref = procs.spawn_detached(cmd, Path(os.devnull))
    base = f"http://127.0.0.1:{port}"
    _wait(f"{base}/ping", ref, "mlflow models serve")
    return Server(f"{base}/invocations", ref.pid, lambda: _kill_group(ref))


def start_mlserver(model_dir: Path, workers: int, work: Path) -> Server:
    folder = Path(tempfile.mkdtemp(prefix="mlserver-", dir=work))
    http, grpc, metrics = (procs.free_port() for _ in range(3))
    settings = {
        "host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics,
        "parallel_workers": workers, "debug": False, "metrics_endpoint": None,
    }  # fmt: skip
    model = {
        "name": "m",
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": str(model_dir)},
        "max_batch_size": MLSERVER_BATCH_SIZE,
        "max_batch_time": MLSERVER_BATCH_TIME_S,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "model-settings.json").write_text(json.dumps(model))
    cmd = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)]
    ref = procs.spawn_detached(cmd, folder / "mlserver.log", cwd=folder)
    base = f"http://127.0.0.1:{http}"
    try:
        _wait(f"{base}/v2/models/m/ready", ref, f"MLServer (log: {folder / 'mlserver.log'})")
    except RuntimeError:
        _kill_group(ref)
        raise
    return Server(f"{base}/v2/models/m/infer", ref.pid, lambda: _kill_group(ref), v2=True)


# -- bodies and load ----------------------------------------------------------------------
def bodies(rows: Any, work: Path) -> dict[tuple[str, int], Path]:
    """Request bodies of 1 and 32 rows, in MLflow's protocol and in V2's."""
    out = {}
    for n in (1, 32):
        for kind in ("mlflow", "v2"):
            path = work / f"body-{kind}-{n}.json"
            path.write_text(request_body(rows.iloc[:n], kind))  # type: ignore[arg-type]
            out[(kind, n)] = path
    return out


def load(
    server: Server, body: Path, clients: int, rows: int, seconds: float, role: str | None = None
) -> dict[str, Any]:
    """`httpload.py`'s figures for `server` (with `role`: latency of that role's answers)."""
    cmd = [sys.executable, str(HERE / "httpload.py"), server.url, str(body),
           "--clients", str(clients), "--seconds", str(seconds), "--rows", str(rows)]  # fmt: skip
    if server.v2:
        cmd.append("--v2")
    if role:
        cmd += ["--role", role]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_process(model_uri: str, rows: Any, seconds: float) -> dict[str, float]:
    """Milliseconds per `predict` call, 1 row and 32 rows, as loaded and with 1 thread."""
    import mlflow.pyfunc

    from ctcd.serving.batching import set_threads

    model = mlflow.pyfunc.load_model(model_uri)
    out = {}
    for label in ("as loaded", "1 thread"):
        if label == "1 thread":
            set_threads(model, 1)
        for n in (1, 32):
            frame = rows.iloc[:n]
            model.predict(frame)
            times = []
            stop = time.perf_counter() + seconds / 2
            while time.perf_counter() < stop:
                start = time.perf_counter()
                model.predict(frame)
                times.append(time.perf_counter() - start)
            out[f"{label}, {n} row{'s' * (n > 1)}"] = statistics.median(times) * 1000
    return out


# -- the run ------------------------------------------------------------------------------
def bench_model(model_type: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import mlflow

    from flows.data import clean_data, ingest_data

    print(f"\n== {model_type}: training on the 115,609-row sample ...", flush=True)
    config = register_two_versions(f"bench-{model_type}", model_type, count=1)[0]
    model_dir = Path(mlflow.artifacts.download_artifacts(config.model_uri, dst_path=str(work)))
    rows = clean_data.fn(ingest_data.fn(None)).x_test.iloc[:32].reset_index(drop=True)
    paths = bodies(rows, work)
    result: dict[str, Any] = {"in_process_ms": in_process(config.model_uri, rows, args.seconds)}
    print("in-process predict (median ms): " + ", ".join(
        f"{k} {v:.2f}" for k, v in result["in_process_ms"].items()))  # fmt: skip
    runs: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    peers = [p for p in args.peers if p != "mlserver" or args.mlserver]
    for workers in args.workers:
        for peer in peers:
            if peer == "mlserver":
                server = start_mlserver(model_dir, workers, work)
            elif peer == "mlflow":
                server = start_mlflow(model_dir, workers)
            else:
                server = start_ctcd(config, workers, peer)
            try:
                time.sleep(2)
                idle = server.memory()
                for clients in args.clients:
                    for n in (1, 32):
                        body = paths[("v2" if server.v2 else "mlflow", n)]
                        r = load(server, body, clients, n, args.seconds)
                        r |= {"peer": peer, "workers": workers, "clients": clients, "rows": n}
                        runs.append(r)
                        print(
                            f"  {peer:11s} w={workers} c={clients:2d} rows={n:2d}: "
                            f"{r['req_s']:7.0f} req/s {r['rows_s']:8.0f} rows/s  "
                            f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                            f"failed {r['failed']}",
                            flush=True,
                        )
                loaded = server.memory()
                memory.append({"peer": peer, "workers": workers, "idle": idle, "loaded": loaded})
                print(
                    f"  {peer:11s} w={workers} memory: idle RSS {idle['rss_mb']:.0f} MB "
                    f"(PSS {idle['pss_mb']:.0f}), loaded RSS {loaded['rss_mb']:.0f} MB "
                    f"(PSS {loaded['pss_mb']:.0f}), {idle['processes']} processes",
                    flush=True,
                )
            finally:
                server.stop()
    result |= {"runs": runs, "memory": memory}
    goals(model_type, result)
    return result


def _find(runs: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    for r in runs:
        if all(r[k] == v for k, v in where.items()):
            return r
    return None


def goals(model_type: str, result: dict[str, Any]) -> None:
    """The issue's goals, as ratios of this run's figures."""
    runs = result["runs"]
    print(f"-- goals, {model_type}:")
    one = _find(runs, peer="ctcd", workers=1, clients=1, rows=1)
    mlf = _find(runs, peer="mlflow", workers=1, clients=1, rows=1)
    if one and mlf:
        inproc = result["in_process_ms"]["as loaded, 1 row"]
        print(f"  1 client, 1 worker: ctcd p50 {one['p50_ms']:.2f} ms = "
              f"{one['p50_ms'] / inproc:.2f}x in-process predict ({inproc:.2f} ms) (goal <= 1.3x); "
              f"{one['req_s'] / mlf['req_s']:.2f}x mlflow's req/s (goal >= 1.5x)")  # fmt: skip
    many = _find(runs, peer="ctcd", workers=2, clients=16, rows=1)
    theirs = [r for r in runs if r["peer"] == "mlflow" and r["clients"] == 16 and r["rows"] == 1]
    if many and theirs:
        best = max(r["req_s"] for r in theirs)
        line = (f"  16 clients, 2 workers, 1 row: ctcd {many['req_s']:.0f} req/s = "
                f"{many['req_s'] / best:.2f}x mlflow's best (goal >= 3x), "
                f"p99 {many['p99_ms']:.1f} ms (goal <= 50)")  # fmt: skip
        ms = _find(runs, peer="mlserver", workers=2, clients=16, rows=1)
        if ms:
            line += f", {many['req_s'] / ms['req_s']:.2f}x MLServer's (goal >= 1x)"
        print(line)
    on = _find(runs, peer="ctcd", workers=1, clients=1, rows=1)
    off = _find(runs, peer="ctcd no log", workers=1, clients=1, rows=1)
    if on and off:
        cost = 1 - on["req_s"] / off["req_s"]
        print(f"  prediction log, 1 worker, 1 client: {on['req_s']:.0f} vs {off['req_s']:.0f} "
              f"req/s without = {cost:+.1%} cost (goal <= 5 %)")  # fmt: skip
    mem = {(m["peer"], m["workers"]): m for m in result["memory"]}
    if ("ctcd", 1) in mem and ("mlflow", 1) in mem:
        ours, their = mem[("ctcd", 1)]["idle"], mem[("mlflow", 1)]["idle"]
        print(f"  idle RSS, 1 worker: ctcd {ours['rss_mb']:.0f} MB vs mlflow {their['rss_mb']:.0f} "
              f"MB = {ours['rss_mb'] / their['rss_mb']:.2f}x (goal <= 1x); PSS "
              f"{ours['pss_mb']:.0f} vs {their['pss_mb']:.0f} MB")  # fmt: skip
    if ("ctcd", 2) in mem and ("ctcd", 1) in mem:
        extra = mem[("ctcd", 2)]["idle"]["pss_mb"] - mem[("ctcd", 1)]["idle"]["pss_mb"]
        print(f"  ctcd: an extra worker adds {extra:.0f} MB PSS idle")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["random_forest", "linear"])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--no-mlserver", dest="mlserver", action="store_false")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--out", default="serving-results.json")
    args = parser.parse_args()
    args.mlserver = args.mlserver and "mlserver" in args.peers
    if args.mlserver and not (MLSERVER_VENV / "bin" / "mlserver").exists():
        sys.exit(
            f"No MLServer venv at {MLSERVER_VENV}: bash bench/mlserver_setup.sh (or --no-mlserver)"
        )
    work = isolated_home()
    out = {m: bench_model(m, args, work) for m in args.models}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
