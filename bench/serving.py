"""Single-row serving: ctcd's server vs `mlflow models serve` vs in-process predict.

    .venv/bin/python bench/serving.py [--seconds 8]

The same model (default: random forest, 100 trees, depth 12, trained on the 115,609-row
sample; `--model-type linear` makes the server's own cost dominate) behind
each server, 1 worker then 2 workers each; keep-alive clients from ctcd's load generator
(Python threads, so the client shares the 2 cores with the server: compare ratios).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
from common import isolated_home, register_two_versions, single_row_body


def mlflow_serve(model_dir: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    from blocks.local_process import free_port

    port = free_port("127.0.0.1")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "models",
        "serve",
        "-m",
        model_dir,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/ping", timeout=1).status_code == 200:
                return proc, f"{base}/invocations"
        except httpx.HTTPError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("mlflow models serve did not start")


def measure(url: str, body: bytes, clients: int, seconds: float) -> str:
    from ctcd.serving.loadgen import Load

    with Load(url, body, clients) as load:
        time.sleep(seconds)
    s = load.stats
    return (
        f"{s.requests / seconds:7.0f} req/s  p50 {s.percentile(50) * 1000:6.1f} ms  "
        f"p99 {s.percentile(99) * 1000:6.1f} ms  failed {s.failed}"
    )


def in_process(model_uri: str, body: bytes, seconds: float) -> str:
    import json

    import mlflow.pyfunc
    import pandas as pd

    split = json.loads(body)["dataframe_split"]
    row = pd.DataFrame(split["data"], columns=split["columns"])
    model = mlflow.pyfunc.load_model(model_uri)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict(row)
        count += 1
    return f"{count / seconds:7.0f} predictions/s (one thread, no HTTP)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model-type", default="random_forest", help="or linear: server cost")
    args = parser.parse_args()
    isolated_home()
    from blocks import MLflowModelDeployer

    print(f"training a {args.model_type} model on the 115,609-row sample ...", flush=True)
    config = register_two_versions(model_type=args.model_type)[0]
    for workers in (1, 2):
        deployer = MLflowModelDeployer(workers=workers)
        record = deployer.deploy_model(config)
        body = single_row_body(record)
        model_dir = f"{record.runtime_dir}/models/{record.model_version}"
        proc, mlflow_url = mlflow_serve(model_dir, workers)
        try:
            for clients in (1, 4):
                time.sleep(1)
                ours = measure(record.prediction_url, body, clients, args.seconds)
                theirs = measure(mlflow_url, body, clients, args.seconds)
                print(f"workers={workers} clients={clients}  ctcd:   {ours}", flush=True)
                print(f"workers={workers} clients={clients}  mlflow: {theirs}", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            deployer.delete_model_server(record.uuid)
    print(f"in-process predict:           {in_process(config.model_uri, body, args.seconds)}")


if __name__ == "__main__":
    main()
