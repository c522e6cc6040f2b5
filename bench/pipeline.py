"""Overhead of running the training steps as a Prefect flow with MLflow tracking.

    .venv/bin/python bench/pipeline.py [--rows 115609] [--repeat 2]

(a) one-shot, as a user runs it: a fresh process calling `training_pipeline()` with
    embedded defaults (Prefect's ephemeral server, MLflow on SQLite in CTCD_HOME), beside a
    fresh process running the same steps as plain function calls (`task.fn`, no tracking).
(b) steady state: a second call in the same process, beside the plain calls in that process.
Overhead = framework wall time - plain wall time. Both use random forest, 100 trees, depth 12.
One untimed warm-up creates the Prefect and MLflow databases and the sample file first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PLAIN = """
import time; t0 = time.perf_counter()
from flows.data import ingest_data, validate_data, clean_data
from flows.model import train_model, evaluate_model
t1 = time.perf_counter()
d = ingest_data.fn(PATH); validate_data.fn(d); c = clean_data.fn(d)
m = train_model.fn(c, "random_forest"); metrics = evaluate_model.fn(m, c)
t2 = time.perf_counter()
print("RESULT", {"import": t1 - t0, "ml": t2 - t1})
"""

FLOW = """
import time; t0 = time.perf_counter()
from flows.training import training_pipeline
t1 = time.perf_counter()
r = training_pipeline(data_path=PATH)
t2 = time.perf_counter()
print("RESULT", {"import": t1 - t0, "flow": t2 - t1, "version": r.model_version})
"""

STEADY = """
import time
from flows.training import training_pipeline
from flows.data import ingest_data, validate_data, clean_data
from flows.model import train_model, evaluate_model
training_pipeline(data_path=PATH)
out = {}
for i in range(REPEAT):
    t0 = time.perf_counter()
    d = ingest_data.fn(PATH); validate_data.fn(d); c = clean_data.fn(d)
    m = train_model.fn(c, "random_forest"); evaluate_model.fn(m, c)
    t1 = time.perf_counter()
    training_pipeline(data_path=PATH)
    t2 = time.perf_counter()
    out.setdefault("plain", []).append(t1 - t0); out.setdefault("flow", []).append(t2 - t1)
print("RESULT", out)
"""


def run(code: str, env: dict[str, str], path: str, repeat: int = 1) -> tuple[float, dict]:
    source = code.replace("PATH", repr(path)).replace("REPEAT", str(repeat))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", source], env=env, cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return wall, eval(line.removeprefix("RESULT "))  # our own printed dict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=115_609)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctcd-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        CTCD_HOME=str(work / "home"),
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    sys.path.insert(0, str(ROOT))
    os.environ["CTCD_HOME"] = env["CTCD_HOME"]
    from ctcd.sample import sample_path

    path = str(sample_path(args.rows))
    print(f"table: {path} ({args.rows} rows); warm-up run (untimed) ...", flush=True)
    run(FLOW, env, path)

    rows = []
    for i in range(args.repeat):
        plain_wall, plain = run(PLAIN, {**env, "CTCD_WARM_START": "0"}, path)
        flow_wall, flow = run(FLOW, env, path)
        rows.append((plain_wall, plain, flow_wall, flow))
        print(
            f"one-shot #{i + 1}: plain {plain_wall:6.2f} s (ML {plain['ml']:5.2f} s, imports "
            f"{plain['import']:4.2f} s) | flow {flow_wall:6.2f} s (imports {flow['import']:4.2f} s,"
            f" flow call {flow['flow']:5.2f} s) | overhead {flow_wall - plain_wall:+5.2f} s",
            flush=True,
        )
    _, steady = run(STEADY, env, path, args.repeat)
    for plain_s, flow_s in zip(steady["plain"], steady["flow"], strict=True):
        print(
            f"steady state: plain {plain_s:6.2f} s | flow {flow_s:6.2f} s | "
            f"overhead {flow_s - plain_s:+5.2f} s",
            flush=True,
        )
    best = min(r[2] - r[0] for r in rows)
    print(
        json.dumps(
            {
                "one_shot_overhead_s": [round(r[2] - r[0], 2) for r in rows],
                "steady_overhead_s": [
                    round(f - p, 2) for p, f in zip(steady["plain"], steady["flow"], strict=True)
                ],
                "best_one_shot_overhead_s": round(best, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
