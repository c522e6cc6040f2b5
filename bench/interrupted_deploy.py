"""Deploys killed mid-swap: what a server looks like afterwards (issue 15's scenario).

    .venv/bin/python bench/interrupted_deploy.py [--kills 5] [--seed 1]

A local server (1 worker) serves version A under steady keep-alive load. Five times in a
row, a fresh process calls `MLflowModelDeployer().deploy_model(...)` for the version the
record does not name and is SIGKILLed mid-swap: 0-0.6 s (random, seeded) after the server
started a new worker (if none starts within 60 s, 0.2-1.5 s later). Right after
the kills, once the server settles (or 60 s later), and after one clean deploy: the worker
processes the master runs, the record's version and status, the versions 60 `/metadata`
calls (fresh connections) were answered with, and the requests that failed after one retry.

Against older code: copy this folder into that tree and run it with PYTHONPATH=that tree.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

from common import ROOT, example_body, isolated_home, register_two_versions

CHILD = """
import sys
from blocks import DeploymentConfig, MLflowModelDeployer
config = DeploymentConfig.model_validate_json(sys.argv[1])
print("ready", flush=True)
MLflowModelDeployer().deploy_model(config)
"""
SETTLE_S = 60.0  # how long to wait for the server to settle after the kills


def answered(record, calls: int = 60) -> Counter[str]:
    import httpx

    url = record.prediction_url.replace("/invocations", "/metadata")
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(limits=fresh, timeout=10) as client:
        return Counter(str(client.get(url).json()["model_version"]) for _ in range(calls))


def settle(deployer, uuid: str) -> str:
    """Seconds until the master runs the recorded worker count, all on one version."""
    from blocks import local_process as lp

    start = time.monotonic()
    while time.monotonic() - start < SETTLE_S:
        record = deployer.get_model_server(uuid)
        if len(lp.workers(record)) == record.workers and len(answered(record, 20)) == 1:
            return f"settled {time.monotonic() - start:.1f} s after the last kill"
        time.sleep(0.5)
    return f"not settled {SETTLE_S:.0f} s after the last kill"


def report(label: str, deployer, uuid: str, load) -> None:
    from blocks import local_process as lp

    record = deployer.get_model_server(uuid)
    workers = lp.workers(record)
    versions = dict(answered(record))
    print(
        f"{label}: master + {len(workers)} workers, record says "
        f"v{record.model_version}, status {record.status.value}; 60 /metadata calls answered "
        f"{versions}; failed requests so far {load.stats.failed} of {load.stats.requests}",
        flush=True,
    )


def kill_mid_deploy(record, config, rng: random.Random) -> str:
    """Start a deploy of `config` in a fresh process and SIGKILL it mid-swap; say when."""
    from blocks import local_process as lp

    before = {p.pid for p in lp.workers(record)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, config.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    while time.monotonic() < started + 60 and proc.poll() is None:
        if {p.pid for p in lp.workers(record)} - before:  # the swap started a worker
            delay = rng.uniform(0.0, 0.6)
            when = f"{delay:.2f} s after a new worker started"
            break
        time.sleep(0.02)
    else:
        delay = rng.uniform(0.2, 1.5)
        waited = time.monotonic() - started + delay
        when = f"{waited:.2f} s after its imports (no new worker seen: before the swap)"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return when


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--kills", type=int, default=5)
    args.add_argument("--seed", type=int, default=1)
    opts = args.parse_args()
    isolated_home()
    from blocks import MLflowModelDeployer
    from ctcd.loadgen import Load

    print(f"code under test: {ROOT}", flush=True)
    v1, v2 = register_two_versions(model_type="linear")
    by_version = {v1.model_version: v1, v2.model_version: v2}
    deployer = MLflowModelDeployer()
    record = deployer.deploy_model(v1)
    rng = random.Random(opts.seed)
    try:
        with Load(record.prediction_url, example_body(record), clients=2) as load:
            report("before", deployer, record.uuid, load)
            for _ in range(opts.kills):
                now = deployer.get_model_server(record.uuid).model_version
                other = v2 if now == v1.model_version else v1
                when = kill_mid_deploy(record, other, rng)
                print(f"  deploy of v{other.model_version} killed {when}", flush=True)
            report(f"{opts.kills} killed deploys", deployer, record.uuid, load)
            print(f"  {settle(deployer, record.uuid)}", flush=True)
            report(f"{opts.kills} killed deploys, then", deployer, record.uuid, load)
            now = deployer.get_model_server(record.uuid).model_version
            other = v2 if now == v1.model_version else v1
            deployer.deploy_model(by_version[other.model_version])
            report("after one clean deploy", deployer, record.uuid, load)
    finally:
        deployer.delete_model_server(record.uuid)


if __name__ == "__main__":
    main()
