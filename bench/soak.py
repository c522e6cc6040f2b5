"""Soak (issue 21): scheduled runs under client load, with random kills of the flow process, the
local Prefect server and the MLflow tracking server; afterwards, do registry, record and server
agree, and is any flow run left Running?

    .venv/bin/python bench/soak.py [--minutes 30] [--seed 1]

An isolated CTCD_HOME and PREFECT_HOME; a real `mlflow server` (SQLite, artifacts under the
work folder) as the tracking URI; ctcd's local Prefect server (`ctcd prefect-server start`, no
PREFECT_API_URL). Every 60-90 s a fresh process runs `continuous_deployment_pipeline` on a
generated 3,000-row table (new seed each run) for one model name, deployer block `soak`
(local MLflowModelDeployer, 2 workers), gate r2 >= 0 with must_beat_champion=False. Run 0 deploys
the first version without faults; 3 keep-alive clients then send single-row requests for the
whole soak. A fault (seeded; at most one at a time) hits 3 runs in 4, at a random moment of the
flow run (0-95 % of a fault-free run's median length after it began): SIGKILL
the flow process; SIGKILL the local Prefect server (then `ctcd prefect-server start`, or the
next run starts it); stop the mlflow server for 20-60 s, then restart it on the same port and
store. Only processes the soak started are signalled, by PID. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from soak_parts import (
    MODEL,
    ROOT,
    Mlflow,
    ctcd_cli,
    disagreement,
    environment,
    kill_prefect,
    picture,
    prefect_record,
    run_states,
    unended_runs,
)

sys.path.insert(0, str(ROOT))
KINDS = ("kill-flow", "kill-prefect", "mlflow-outage")
ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Lost)\w*)(?::.*)?$")
RUN_LIMIT_S = 600.0  # a run still going after this is killed and counted as hung
CHILD = """
import json, sys
from flows.continuous_deployment import continuous_deployment_pipeline
r = continuous_deployment_pipeline(
    data_path=sys.argv[1], model_name=sys.argv[2], deployer="soak",
    model_params={"n_estimators": 30, "max_depth": 8},
    criteria={"metric": "r2", "threshold": 0.0, "must_beat_champion": False},
)
print("SOAK-RESULT " + json.dumps({"version": r.model_version, "deployed": r.deployed,
      "reason": r.reason}), flush=True)
"""
SAVE_BLOCK = """
from blocks import MLflowModelDeployer
from ctcd import local_api
with local_api.api():
    MLflowModelDeployer(workers=2).save("soak", overwrite=True)
"""


class Soak:
    def __init__(self, work: Path, opts: argparse.Namespace):
        from ctcd import processes as procs

        self.work, self.rng = work, random.Random(opts.seed)
        self.mlflow = Mlflow(work, procs.free_port())
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.runs = 0
        self.durations: list[float] = []
        self.between: list[str] = []
        self.running_seen: set[str] = set()
        self.stuck: set[str] = set()
        self.mlflow_back_at: float | None = None

    def restore_mlflow(self, wait: bool = False) -> None:
        if self.mlflow_back_at is None:
            return
        if wait:
            time.sleep(max(0.0, self.mlflow_back_at - time.monotonic()))
        if time.monotonic() >= self.mlflow_back_at:
            self.mlflow.start()
            self.mlflow_back_at = None
            print("    mlflow server back on the same port", flush=True)

    def inject(self, kind: str, proc: subprocess.Popen) -> str:
        if kind == "kill-flow":
            proc.send_signal(signal.SIGKILL)
            return f"SIGKILLed flow process PID {proc.pid}"
        if kind == "kill-prefect":
            said = kill_prefect()
            if self.rng.random() < 0.5:
                time.sleep(self.rng.uniform(2, 10))
                said += "; then `ctcd prefect-server start`: " + ctcd_cli("prefect-server", "start")
            else:
                said += "; the next run starts it"
            return said
        outage = self.rng.uniform(20, 60)
        self.mlflow.stop()
        self.mlflow_back_at = time.monotonic() + outage
        return f"stopped mlflow server for {outage:.0f} s"

    def run_once(self, fault: bool) -> None:
        from ctcd.sample import generate

        index, self.runs = self.runs, self.runs + 1
        data = self.work / f"data-{index}.csv"
        generate(3000, seed=1000 + index).to_csv(data, index=False)
        log = open(self.work / f"run-{index}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data), MODEL],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
        )  # fmt: skip
        start, begun = time.monotonic(), None  # begun: when the flow run began (its log)
        kind = self.rng.choice(KINDS) if fault else None
        moment = self.rng.uniform(0.0, 0.95) * self.typical() if kind else None
        said = ""
        while proc.poll() is None and time.monotonic() - start < RUN_LIMIT_S:
            if begun is None and "Beginning flow run" in self.log_text(index):
                begun = time.monotonic()
            if moment is not None and begun and time.monotonic() - begun >= moment:
                at = f"{time.monotonic() - start:.1f} s ({moment:.1f} s into the flow run)"
                said = f"{kind} at {at}: {self.inject(kind, proc)}"
                self.faults[kind] += 1
                moment = None
            self.restore_mlflow()
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            said += " | hung: killed by the soak"
        proc.wait()
        log.close()
        elapsed = time.monotonic() - start
        outcome, detail = self.outcome(index, proc.returncode)
        if kind is None and begun and outcome.startswith("completed"):
            self.durations.append(time.monotonic() - begun)
        if kind and moment is not None:
            said = f"{kind} planned at {moment:.1f} s: not injected, the run ended first"
        self.outcomes[outcome] += 1
        print(f"run {index}: {outcome} in {elapsed:.0f} s; {said}\n    {detail}", flush=True)
        self.restore_mlflow(wait=True)
        self.check(f"after run {index}", swept=begun is not None)

    def typical(self) -> float:
        """The median length of a flow run (from its start) without faults."""
        ordered = sorted(self.durations)
        return ordered[len(ordered) // 2] if ordered else 30.0

    def log_text(self, index: int) -> str:
        return (self.work / f"run-{index}.log").read_text(errors="replace")

    def outcome(self, index: int, code: int) -> tuple[str, str]:
        """(category, detail) of a finished run, from its exit and its output."""
        text = self.log_text(index)
        for line in text.splitlines():
            if line.startswith("SOAK-RESULT "):
                result = json.loads(line.split(" ", 1)[1])
                state = "deployed" if result["deployed"] else "refused"
                return f"completed ({state})", f"v{result['version']}: {result['reason']}"
        if code < 0:
            return "crashed (killed)", f"signal {-code}"
        errors = [m for ln in text.splitlines() if (m := ERROR_LINE.match(ln))]
        if not errors:
            return f"failed (exit {code})", text.strip().splitlines()[-1:][0][:300] if text else ""
        return f"failed ({errors[-1].group(1)})", errors[-1].group(0)[:300]

    def check(self, when: str, swept: bool) -> tuple[str | None, list[str] | None]:
        """Registry, record and server agree? Runs left Running or Pending (`swept`: a sweep
        ran since the last check, so a run seen Running then and now is stuck)?"""
        seen = picture()
        differ = disagreement(seen)
        if differ:
            self.between.append(f"{when}: {differ}")
            print(f"    DISAGREE {when}: {differ}", flush=True)
        unended = unended_runs()
        if swept:
            self.stuck |= set(unended or []) & self.running_seen
        self.running_seen |= set(unended or [])
        print(f"    {when}: {seen}; Running/Pending: {unended}", flush=True)
        return differ, unended

    def main_loop(self, minutes: float, load_clients: int) -> dict:
        from blocks import MLflowModelDeployer
        from blocks.lookup import find_service
        from ctcd.loadgen import Load

        sys.path.insert(0, str(ROOT / "bench"))
        from common import single_row_body

        self.run_once(fault=False)  # the first version, then load for the whole soak
        record = find_service(MODEL, deployer=MLflowModelDeployer())
        started = time.monotonic()
        with Load(record.prediction_url, single_row_body(record), load_clients) as load:
            while time.monotonic() - started < minutes * 60:
                run_start = time.monotonic()
                self.run_once(fault=self.rng.random() < 0.75)
                pause = run_start + self.rng.uniform(60, 90) - time.monotonic()
                time.sleep(max(0.0, min(pause, started + minutes * 60 - time.monotonic())))
            print("settling 30 s ...", flush=True)
            time.sleep(30)
        self.restore_mlflow(wait=True)
        if not prefect_record() or unended_runs() is None:  # a kill left it down: as a user
            print(f"ctcd prefect-server start: {ctcd_cli('prefect-server', 'start')}", flush=True)
        print(f"ctcd prefect-server status: {ctcd_cli('prefect-server', 'status')}", flush=True)
        differ, unended = self.check("at the end", swept=True)
        print(f"load errors: {dict(load.stats.errors)}", flush=True)
        return {
            "minutes": round((time.monotonic() - started) / 60, 1),
            "requests_sent": load.stats.requests,
            "requests_failed": load.stats.failed,
            "runs_started": self.runs,
            "runs_completed": sum(n for k, n in self.outcomes.items() if k.startswith("compl")),
            "runs_failed": sum(n for k, n in self.outcomes.items() if k.startswith("failed")),
            "runs_crashed": sum(n for k, n in self.outcomes.items() if k.startswith("crash")),
            "faults": dict(self.faults),
            "disagreements_at_end": int(differ is not None),
            "disagreements_between_runs": len(self.between),
            "runs_left_running_at_end": -1 if unended is None else len(unended),
            "runs_running_after_a_later_sweep": len(self.stuck),
            "prefect_run_states": run_states(),
            "must_beat_champion": False,
        }


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--minutes", type=float, default=30)
    args.add_argument("--seed", type=int, default=1)
    args.add_argument("--clients", type=int, default=3)
    opts = args.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctcd-soak-"))
    soak = Soak(work, opts)
    environment(work, soak.mlflow.port)
    print(f"work folder {work}; code {ROOT}; seed {opts.seed}", flush=True)
    try:
        soak.mlflow.start()
        print(ctcd_cli("prefect-server", "start"), flush=True)
        subprocess.run([sys.executable, "-c", SAVE_BLOCK], check=True, cwd=work)
        figures = soak.main_loop(opts.minutes, opts.clients)
    finally:
        soak.restore_mlflow(wait=True)
        cleanup(soak)
    print("outcomes: " + json.dumps(dict(soak.outcomes)))
    for line in soak.between:
        print(f"disagreement {line}")
    print(json.dumps(figures))


def cleanup(soak: Soak) -> None:
    """Stop what the soak started, by PID: the model server, the Prefect server, mlflow."""
    from blocks import MLflowModelDeployer

    deployer = MLflowModelDeployer()
    for record in deployer.find_model_server(model_name=MODEL, running=None):
        deployer.delete_model_server(record.uuid)
    print(ctcd_cli("prefect-server", "stop"), flush=True)
    soak.mlflow.stop()


if __name__ == "__main__":
    main()
