"""What the evaluation report adds to a training run, on the full sample table.

    .venv/bin/python bench/report.py [--rows 115609] [--repeat 3]

In one fresh process, for each tree model type: train and evaluate as the flow does, then
time what the report adds: drawing the plots (`plot_evaluation`; the first call also pays
for importing matplotlib) and logging them into an MLflow run (SQLite, local artifacts).
Printed beside the training time of the same model, as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import isolated_home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=115_609)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    isolated_home()

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
        plot_times, log_times, first = [], [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            plots = plot_evaluation.fn(model, data, "review_score")
            drawn = time.perf_counter()
            with mlflow.start_run(experiment_id=experiment):
                log_plots(plots)
            logged = time.perf_counter()
            first = first if first is not None else drawn - start
            plot_times.append(drawn - start)
            log_times.append(logged - drawn)
        plot, log = statistics.median(plot_times), statistics.median(log_times)
        sizes = ", ".join(f"{name} {len(png) // 1024} KiB" for name, png in plots.images.items())
        print(
            f"{model_type:18} train+evaluate {trained:6.2f} | plots {plot:.3f} "
            f"(first call {first:.3f}, with matplotlib import) + log {log:.3f} "
            f"= {plot + log:.3f} ({(plot + log) / trained:.1%} of training) | {sizes}"
        )


if __name__ == "__main__":
    main()
