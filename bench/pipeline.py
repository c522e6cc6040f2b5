"""Overhead of running the training steps as a Prefect flow with MLflow tracking, beside ZenML.

    .venv/bin/python bench/pipeline.py [--rows 115609] [--repeat 3] [--no-zenml]
                                       [--only one-shot|steady]

(a) one-shot, as a user runs it: a fresh process calling `training_pipeline()` with embedded
    defaults (ctcd's local Prefect server, MLflow on SQLite in CTCD_HOME), beside a fresh process
    running the same steps as plain function calls (`task.fn`, no tracking); and, in the same
    run, ZenML's default local stack running the same steps as a pipeline beside the same steps
    as plain calls in ZenML's venv (bench/zenml_setup.sh installs it; bench/zenml_pipeline.py).
    The four are interleaved in each round; medians over the rounds.
(b) steady state: after an untimed first call, calls in the same process, beside the plain
    calls in that process; ZenML the same way in its venv (`zenml_pipeline.py --steady N`).
Overhead = framework wall time - plain wall time. All use random forest, 100 trees, depth 12.
An untimed warm-up of each framework creates its databases first (and starts ctcd's local
Prefect server, which later one-shot runs reuse, as a user's would); it is stopped at the end.
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

import httpx

ROOT = Path(__file__).resolve().parent.parent
ZENML_VENV = Path(os.environ.get("ZENML_VENV", Path.home() / ".cache/ctcd-bench/zenml-venv"))

PLAIN = """
import time; t0 = time.perf_counter()
from flows.data import ingest_data, validate_data, clean_data
from flows.model import train_model, evaluate_model
t1 = time.perf_counter()
d = ingest_data.fn(PATH); validate_data.fn(d); c = clean_data.fn(d)
m = train_model.fn(c, "random_forest"); metrics = evaluate_model.fn(m, c)
t2 = time.perf_counter()
print("RESULT", {"import": t1 - t0, "flow": t2 - t1})
"""

FLOW = """
import time; t0 = time.perf_counter()
from flows.training import training_pipeline
t1 = time.perf_counter()
state = training_pipeline(data_path=PATH, return_state=True)
t2 = time.perf_counter()
run_id = str(state.state_details.flow_run_id)
print("RESULT", {"import": t1 - t0, "flow": t2 - t1, "flow_run": run_id})
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


def run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark run failed: {cmd[:3]}\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    result = eval(line.removeprefix("RESULT "))  # our own printed dict
    result["wall"] = wall
    if "import" in result:  # one-shot scripts: interpreter start and exit
        result["exit"] = wall - result["import"] - result["flow"]
    return wall, result


def python(code: str, path: str, repeat: int = 1) -> list[str]:
    source = code.replace("PATH", repr(path)).replace("REPEAT", str(repeat))
    return [sys.executable, "-c", source]


def task_times(env: dict[str, str], flow_run: str) -> dict[str, float]:
    """Seconds per task of the flow run, from the local Prefect server's API."""
    server = json.loads(Path(env["CTCD_HOME"], "prefect-server", "server.json").read_text())
    api = f"http://127.0.0.1:{server['port']}/api"
    body = {"flow_runs": {"id": {"any_": [flow_run]}}}
    for _ in range(60):  # task runs are recorded from events, shortly after the run
        runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=10).json()
        if len(runs) >= 7 and all(r["total_run_time"] for r in runs):
            break
        time.sleep(0.5)
    return {r["name"].rsplit("-", 1)[0]: r["total_run_time"] for r in runs}


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=115_609)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-zenml", action="store_true")
    parser.add_argument("--only", choices=("one-shot", "steady"))
    args = parser.parse_args()
    zenml = not args.no_zenml
    if zenml and not (ZENML_VENV / "bin" / "python").exists():
        sys.exit(f"No ZenML venv at {ZENML_VENV}: run bash bench/zenml_setup.sh (or --no-zenml)")
    work = Path(tempfile.mkdtemp(prefix="ctcd-bench-"))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CTCD_"))
    }
    env.update(
        CTCD_HOME=str(work / "home"),
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    zenv = {**env, "ZENML_CONFIG_PATH": str(work / "zenml"), "ZENML_ANALYTICS_OPT_IN": "false"}
    zcmd = [str(ZENML_VENV / "bin" / "python"), str(ROOT / "bench" / "zenml_pipeline.py")]
    (work / "zrepo").mkdir()
    sys.path.insert(0, str(ROOT))
    os.environ["CTCD_HOME"] = env["CTCD_HOME"]
    from ctcd.sample import sample_path

    path = str(sample_path(args.rows))
    print(f"table: {path} ({args.rows} rows); warm-up runs (untimed) ...", flush=True)
    run(python(FLOW, path), env)
    if zenml:
        run([*zcmd, path], zenv, work / "zrepo")

    rows: dict[str, list[dict]] = {"plain": [], "ctcd": [], "zplain": [], "zenml": []}
    steady: dict = {}
    zsteady: dict = {}
    try:
        for i in range(args.repeat if args.only != "steady" else 0):
            _, plain = run(python(PLAIN, path), {**env, "CTCD_LOCAL_API": "0"})
            _, flow = run(python(FLOW, path), env)
            flow["tasks"] = task_times(env, flow["flow_run"])
            rows["plain"].append(plain)
            rows["ctcd"].append(flow)
            line = f"round {i + 1}: plain {plain['wall']:6.2f} s | ctcd {flow['wall']:6.2f} s"
            if zenml:
                _, zplain = run([*zcmd, path, "--plain"], zenv, work / "zrepo")
                _, zflow = run([*zcmd, path], zenv, work / "zrepo")
                rows["zplain"].append(zplain)
                rows["zenml"].append(zflow)
                line += (
                    f" | plain (ZenML venv) {zplain['wall']:6.2f} s | ZenML {zflow['wall']:6.2f} s"
                )
            print(line, flush=True)
        if args.only != "one-shot":
            print("steady state ...", flush=True)
            _, steady = run(python(STEADY, path, args.repeat), env)
            if zenml:
                _, zsteady = run([*zcmd, path, "--steady", str(args.repeat)], zenv, work / "zrepo")
    finally:
        stop = "from ctcd import local_api\ns = local_api.recorded()\nif s: local_api.stop(s)"
        subprocess.run([sys.executable, "-c", stop], env=env, cwd=ROOT, check=False)
    out: dict[str, object] = {}
    if rows["ctcd"]:
        out |= report(rows, zenml)
    if steady:
        out |= report_steady(steady, zsteady)
    print(json.dumps(out))


def report(rows: dict[str, list[dict]], zenml: bool) -> dict[str, object]:
    ctcd_over = [f["wall"] - p["wall"] for p, f in zip(rows["plain"], rows["ctcd"], strict=True)]
    print("\none-shot, medians (s):      wall   imports  in-call  start+exit")
    for name in ("plain", "ctcd", "zplain", "zenml") if zenml else ("plain", "ctcd"):
        r = rows[name]
        print(
            f"  {name:24s} {med(r, 'wall'):6.2f}  {med(r, 'import'):6.2f}   {med(r, 'flow'):6.2f}"
            f"   {med(r, 'exit'):6.2f}"
        )
    out: dict[str, object] = {"ctcd_one_shot_overhead_s": [round(x, 2) for x in ctcd_over]}
    print(f"ctcd overhead: median {statistics.median(ctcd_over):+.2f} s "
          f"(rounds: {', '.join(f'{x:+.2f}' for x in ctcd_over)})")  # fmt: skip
    tasks = {
        k: statistics.median(f["tasks"][k] for f in rows["ctcd"]) for k in rows["ctcd"][0]["tasks"]
    }
    engine = med(rows["ctcd"], "flow") - sum(tasks.values())
    print(
        "  where ctcd's in-call time goes (medians): "
        + ", ".join(f"{k} {v:.2f}" for k, v in tasks.items())
        + f", Prefect engine and reporting {engine:.2f}"
    )
    if zenml:
        zen_over = [
            z["wall"] - p["wall"] for p, z in zip(rows["zplain"], rows["zenml"], strict=True)
        ]
        ratio = statistics.median(ctcd_over) / statistics.median(zen_over)
        print(f"ZenML overhead: median {statistics.median(zen_over):+.2f} s "
              f"(rounds: {', '.join(f'{x:+.2f}' for x in zen_over)})")  # fmt: skip
        print(f"ctcd / ZenML one-shot overhead: {ratio:.2f}x (goal <= 0.75x)")
        out |= {
            "zenml_one_shot_overhead_s": [round(x, 2) for x in zen_over],
            "ratio": round(ratio, 2),
        }
    return out


def report_steady(steady: dict, zsteady: dict) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, result in (("ctcd", steady), ("ZenML", zsteady)):
        if not result:
            continue
        over = [f - p for p, f in zip(result["plain"], result["flow"], strict=True)]
        for p, f in zip(result["plain"], result["flow"], strict=True):
            print(f"steady state {name:5s}: plain {p:6.2f} s | flow {f:6.2f} s | "
                  f"overhead {f - p:+5.2f} s")  # fmt: skip
        print(f"steady state {name}: median overhead {statistics.median(over):+.2f} s")
        out[f"{name.lower()}_steady_overhead_s"] = [round(x, 2) for x in over]
    return out


if __name__ == "__main__":
    main()
