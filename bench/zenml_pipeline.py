"""ZenML peer for bench/pipeline.py: the same training steps as plain calls or as a ZenML
pipeline (default local stack: local orchestrator, SQLite store, local artifact store).
Runs with the ZenML venv's Python (bench/zenml_setup.sh), not the project's:

    ~/.cache/ctcd-bench/zenml-venv/bin/python bench/zenml_pipeline.py TABLE [--plain | --steady N]

The cleaning mirrors ctcd's (flows/data.py): drop timestamps and ids, numeric columns,
product sizes filled with the median, 80/20 split with seed 42; random forest 100 trees,
depth 12, every core. Prints `RESULT {...}` like bench/pipeline.py's scripts. `--steady N`:
in one process, one untimed pipeline run, then N rounds of the plain calls and the pipeline.
"""

from __future__ import annotations

import time

t0 = time.perf_counter()
import sys  # noqa: E402
from typing import Annotated  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.ensemble import RandomForestRegressor  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402

PLAIN = "--plain" in sys.argv
if not PLAIN:
    from zenml import pipeline, step
else:

    def step(fn):  # type: ignore[no-untyped-def]
        return fn


TARGET = "review_score"
DROPPED = [
    "order_approved_at", "order_delivered_carrier_date", "order_delivered_customer_date",
    "order_estimated_delivery_date", "order_purchase_timestamp", "customer_zip_code_prefix",
    "order_item_id",
]  # fmt: skip
SIZES = ["product_weight_g", "product_length_cm", "product_height_cm", "product_width_cm"]


@step
def ingest_data(path: str) -> pd.DataFrame:
    return pd.read_parquet(path)


@step
def clean_data(
    frame: pd.DataFrame,
) -> tuple[
    Annotated[pd.DataFrame, "x_train"],
    Annotated[pd.DataFrame, "x_test"],
    Annotated[pd.Series, "y_train"],
    Annotated[pd.Series, "y_test"],
]:
    features = frame.drop(columns=[c for c in [*DROPPED, TARGET] if c in frame.columns])
    features = features.select_dtypes("number").astype("float64")
    for name in SIZES:
        features[name] = features[name].fillna(features[name].median())
    x_train, x_test, y_train, y_test = train_test_split(
        features, frame[TARGET], test_size=0.2, random_state=42
    )
    return x_train, x_test, y_train, y_test


@step
def train_model(x_train: pd.DataFrame, y_train: pd.Series) -> Pipeline:
    forest = RandomForestRegressor(n_estimators=100, max_depth=12, n_jobs=-1, random_state=42)
    model = Pipeline([("impute", SimpleImputer(strategy="median")), ("model", forest)])
    return model.fit(x_train, y_train)


@step
def evaluate_model(model: Pipeline, x_test: pd.DataFrame, y_test: pd.Series) -> dict:
    predicted = model.predict(x_test)
    mse = float(mean_squared_error(y_test, predicted))
    return {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(mean_absolute_error(y_test, predicted)),
        "r2": float(r2_score(y_test, predicted)),
    }


def steps(path: str) -> None:
    frame = ingest_data(path)
    x_train, x_test, y_train, y_test = clean_data(frame)
    model = train_model(x_train, y_train)
    evaluate_model(model, x_test, y_test)


def steady(path: str, repeat: int) -> None:
    run = pipeline(name="customer_satisfaction_training", enable_cache=False)(steps)
    run(path)
    plain = [ingest_data, clean_data, train_model, evaluate_model]
    out: dict[str, list[float]] = {"plain": [], "flow": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        frame = plain[0].entrypoint(path)
        x_train, x_test, y_train, y_test = plain[1].entrypoint(frame)
        model = plain[2].entrypoint(x_train, y_train)
        plain[3].entrypoint(model, x_test, y_test)
        t1 = time.perf_counter()
        run(path)
        out["plain"].append(t1 - t0)
        out["flow"].append(time.perf_counter() - t1)
    print("RESULT", out)


def main() -> None:
    path = sys.argv[1]
    if "--steady" in sys.argv:
        steady(path, int(sys.argv[sys.argv.index("--steady") + 1]))
        return
    t1 = time.perf_counter()
    if PLAIN:
        steps(path)
    else:
        # No step cache: every run trains, as the plain calls and ctcd do.
        pipeline(name="customer_satisfaction_training", enable_cache=False)(steps)(path)
    t2 = time.perf_counter()
    print("RESULT", {"import": t1 - t0, "flow": t2 - t1})


if __name__ == "__main__":
    main()
