"""What the evaluation report adds to a training run, on the full sample table.

    .venv/bin/python bench/report.py [--rows 115609] [--repeat 3]

In one fresh process, for each tree model type: train and evaluate as the flow does, then
time what the report adds: drawing the plots (`plot_evaluation`) and logging them into an
MLflow run (SQLite, local artifacts). Wall and CPU seconds (CPU is steadier on a shared machine),
beside the training time of the same model, as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import isolated_home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=115_609)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    isolated_home()

    import numpy  # noqa: F401  (shared with everything else: not counted below)
    import pandas  # noqa: F401

    start, cpu = time.perf_counter(), time.process_time()
    import matplotlib.figure  # noqa: F401  (what importing flows.evaluation adds)

    print(
        f"import matplotlib.figure: {time.perf_counter() - start:.3f} s wall, "
        f"{time.process_time() - cpu:.3f} s CPU (once per process, at import of flows)"
    )
    import mlflow

    from ctcd.sample import generate
    from ctcd.settings import configure_mlflow
    from flows.data import Dataset, clean_data
    from flows.evaluation import log_plots, plot_evaluation
    from flows.model import evaluate_model, train_model

    data = clean_data.fn(Dataset(frame=generate(n_rows=args.rows), source="s", sha256="0" * 64))
    experiment = configure_mlflow("bench-report")
    print(f"{args.rows:,} rows, {len(data.x_test):,} held out; seconds (median of {args.repeat})")
    for model_type in ("random_forest", "gradient_boosting"):
        start = time.perf_counter()
        model = train_model.fn(data, model_type)
        evaluate_model.fn(model, data)
        trained = time.perf_counter() - start
        walls, cpus = [], []
        for _ in range(args.repeat):
            start, cpu = time.perf_counter(), time.process_time()
            plots = plot_evaluation.fn(model, data, "review_score")
            with mlflow.start_run(experiment_id=experiment):
                log_plots(plots)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        wall, cpu_s = statistics.median(walls), statistics.median(cpus)
        sizes = ", ".join(f"{name} {len(png) // 1024} KiB" for name, png in plots.images.items())
        print(
            f"{model_type:18} train+evaluate {trained:6.2f} s | plots + logging {wall:.3f} s wall "
            f"({wall / trained:.1%} of training; first call {walls[0]:.3f}), {cpu_s:.3f} s CPU "
            f"| {sizes}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
