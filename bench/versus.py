"""This checkout against another one (e.g. the last release), side by side in one run: the same
benchmark run in both, alternately, so both see the same machine and the same noise.

    .venv/bin/python bench/versus.py OTHER_CHECKOUT [--rounds 2] [--seconds 3]

Each round runs `bench/serving.py --peers ctcd --no-mlserver` (random forest and linear, 1 and
2 workers, 1 and 16 clients, 1-row and 32-row bodies) with each checkout's own code and
`.venv`, then `bench/pipeline.py --only one-shot --repeat 1` (ZenML too when its venv exists,
for the ratio). Prints, per configuration, the median over the rounds of each checkout and the
ratio this/other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def serving(checkout: Path, seconds: float, out: Path) -> dict[str, Any]:
    cmd = [str(checkout / ".venv/bin/python"), "bench/serving.py", "--no-mlserver",
           "--peers", "ctcd", "--workers", "1", "2", "--clients", "1", "16",
           "--seconds", str(seconds), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def pipeline(checkout: Path) -> dict[str, Any]:
    cmd = [str(checkout / ".venv/bin/python"), "bench/pipeline.py", "--only", "one-shot",
           "--repeat", "1"]  # fmt: skip
    zenml = Path.home() / ".cache/ctcd-bench/zenml-venv/bin/python"
    if not zenml.exists():
        cmd.append("--no-zenml")
    done = subprocess.run(cmd, cwd=checkout, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _key(model: str, run: dict[str, Any]) -> tuple[Any, ...]:
    return model, run["workers"], run["clients"], run["rows"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctcd-versus-"))
    checkouts = {"this": HERE, "other": args.other.resolve()}
    runs: dict[str, dict[tuple[Any, ...], list[dict[str, Any]]]] = {k: {} for k in checkouts}
    one_shot: dict[str, list[dict[str, Any]]] = {k: [] for k in checkouts}
    for i in range(args.rounds):
        for name, checkout in checkouts.items():
            print(f"round {i + 1}: {name} ({checkout}) serving ...", flush=True)
            result = serving(checkout, args.seconds, work / f"{name}-{i}.json")
            for model, found in result.items():
                for run in found["runs"]:
                    runs[name].setdefault(_key(model, run), []).append(run)
            print(f"round {i + 1}: {name} one-shot pipeline ...", flush=True)
            one_shot[name].append(pipeline(checkout))
    report(runs, one_shot)


def report(
    runs: dict[str, dict[tuple[Any, ...], list[dict[str, Any]]]],
    one_shot: dict[str, list[dict[str, Any]]],
) -> None:
    print("\nserving (medians over rounds)          this                    other          ratio")
    for key in sorted(runs["this"]):
        this, other = runs["this"][key], runs["other"].get(key, [])
        if not other:
            continue
        t = {m: statistics.median(r[m] for r in this) for m in ("req_s", "p50_ms", "p99_ms")}
        o = {m: statistics.median(r[m] for r in other) for m in ("req_s", "p50_ms", "p99_ms")}
        label = f"{key[0]:13s} w={key[1]} c={key[2]:2d} rows={key[3]:2d}"
        print(f"  {label}  {t['req_s']:6.0f} req/s p99 {t['p99_ms']:5.1f}   "
              f"{o['req_s']:6.0f} req/s p99 {o['p99_ms']:5.1f}   "
              f"{t['req_s'] / o['req_s']:.2f}x req/s")  # fmt: skip
    for name, results in one_shot.items():
        over = [x for r in results for x in r.get("ctcd_one_shot_overhead_s", [])]
        ratios = [r["ratio"] for r in results if "ratio" in r]
        line = f"one-shot overhead, {name}: median {statistics.median(over):+.2f} s"
        if ratios:
            line += f", {statistics.median(ratios):.2f}x ZenML's"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
