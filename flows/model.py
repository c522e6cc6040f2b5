"""Model tasks: build and train a scikit-learn Pipeline, evaluate it, log and register it."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from sklearn.base import RegressorMixin
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ctcd.exceptions import ModelConfigError
from ctcd.metrics import score
from ctcd.names import DATA_SHA_TAG, DATA_SOURCE_TAG, FLOW_RUN_TAG
from flows.data import CleanData, Dataset
from flows.evaluation import EvaluationPlots, log_plots

ModelType = Literal["linear", "random_forest", "gradient_boosting"]
SEED = 42
# Defaults, overridable through `model_params`.
DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {},
    "random_forest": {"n_estimators": 100, "max_depth": 12, "n_jobs": -1, "random_state": SEED},
    "gradient_boosting": {"max_iter": 200, "learning_rate": 0.1, "random_state": SEED},
}
ESTIMATORS: dict[str, type[RegressorMixin]] = {
    "linear": LinearRegression,
    "random_forest": RandomForestRegressor,
    "gradient_boosting": HistGradientBoostingRegressor,
}


@dataclass(frozen=True)
class RegisteredModel:
    model_name: str
    model_version: str
    model_uri: str
    run_id: str
    experiment_id: str


def build_model(model_type: str, model_params: dict[str, Any] | None = None) -> Pipeline:
    """A Pipeline (median imputer, [scaler], estimator) so serving needs no extra code."""
    if model_type not in ESTIMATORS:
        raise ModelConfigError(
            f"Unknown model_type '{model_type}'. Choose one of: {', '.join(ESTIMATORS)}."
        )
    estimator_class = ESTIMATORS[model_type]
    params = {**DEFAULTS[model_type], **(model_params or {})}
    known = estimator_class().get_params()
    if unknown := sorted(set(params) - set(known)):
        raise ModelConfigError(
            f"model_params {unknown} are not parameters of {estimator_class.__name__} "
            f"(model_type '{model_type}'). Valid ones: {', '.join(sorted(known))}."
        )
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if model_type == "linear":
        steps.append(("scale", StandardScaler()))
    steps.append(("model", estimator_class(**params)))
    return Pipeline(steps)


@task(cache_policy=NO_CACHE)
def train_model(
    data: CleanData,
    model_type: ModelType = "random_forest",
    model_params: dict[str, Any] | None = None,
) -> Pipeline:
    """Fit the chosen model on the training split (fixed seeds)."""
    model = build_model(model_type, model_params)
    model.fit(data.x_train, data.y_train)
    return model


@task(cache_policy=NO_CACHE)
def evaluate_model(model: Pipeline, data: CleanData) -> dict[str, float]:
    """mse, rmse, mae and r2 on the held-out 20 %."""
    return score(data.y_test, model.predict(data.x_test))


def _pip_requirements() -> list[str]:
    names = ["mlflow", "scikit-learn", "skops", "pandas", "numpy", "scipy"]
    return [f"{name}=={version(name)}" for name in names]


def _log_dataset(dataset: Dataset, data: CleanData, target: str) -> None:
    import mlflow

    frame = pd.concat([data.x_train, data.y_train.astype("float64").rename(target)], axis=1)
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source class twice and warns about it.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        ml_dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            frame.head(1000), source=dataset.source, name=dataset.source.rsplit("/", 1)[-1],
            targets=target, digest=dataset.sha256[:16],
        )  # fmt: skip
    mlflow.log_input(ml_dataset, context="training")


REFERENCE_ROWS = 5_000


def _log_reference(data: CleanData, target: str) -> None:
    """A sample of the training rows (features and target), stored with the run so the
    drift monitor can compare new batches with what the model learned from."""
    import mlflow

    frame = pd.concat([data.x_train, data.y_train.rename(target)], axis=1)
    sample = frame.sample(min(REFERENCE_ROWS, len(frame)), random_state=SEED)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.parquet"
        sample.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path="reference")


@contextmanager
def _served_jobs(model: Pipeline) -> Iterator[dict[str, Any]]:
    """The model as it is saved for serving, for the block: a forest trained on every core
    scores with one job (a worker serves one request at a time and the workers give the
    parallelism; joblib's start-up would cost ~15 ms per single row). Yields the parameters
    the saved model has that differ from the training ones; the caller's model is as it was
    afterwards."""
    estimator = model[-1]
    jobs = estimator.get_params().get("n_jobs", 1)
    if jobs in (None, 1):
        yield {}
        return
    estimator.set_params(n_jobs=1)
    try:
        yield {"n_jobs": 1, "trained_n_jobs": jobs}
    finally:
        estimator.set_params(n_jobs=jobs)


def _log_model(model: Pipeline, data: CleanData, model_name: str) -> Any:
    """Log the model with skops (no arbitrary pickle code on load), its signature and input
    example, pinned pip requirements (not inferred in a subprocess); register a version."""
    import mlflow
    import skops.io
    from mlflow.models import infer_signature

    example = data.x_test.dropna().head(5)
    return mlflow.sklearn.log_model(
        model,
        name="model",
        signature=infer_signature(example, model.predict(example)),
        input_example=example,
        pip_requirements=_pip_requirements(),
        serialization_format="skops",
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(model)),
        registered_model_name=model_name,
    )


@task(cache_policy=NO_CACHE)
def register_model(
    model: Pipeline,
    data: CleanData,
    dataset: Dataset,
    metrics: dict[str, float],
    model_name: str,
    model_type: str,
    model_params: dict[str, Any] | None,
    target: str,
    experiment_id: str,
    tags: dict[str, str] | None = None,
    plots: EvaluationPlots | None = None,
) -> RegisteredModel:
    """Log params, metrics, the data's content hash, the evaluation plots and the model;
    register a new version.

    The parameters logged are the saved model's (`_served_jobs`).
    """
    import mlflow

    params = {**DEFAULTS[model_type], **(model_params or {})}
    with _served_jobs(model) as served, mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"model_type": model_type, "target": target, **params, **served})
        mlflow.log_params({"data_rows": len(dataset.frame), "features": ",".join(data.features)})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({DATA_SHA_TAG: dataset.sha256, DATA_SOURCE_TAG: dataset.source})
        mlflow.set_tag(FLOW_RUN_TAG, flow_run.get_id() or "")
        mlflow.set_tags(tags or {})
        _log_dataset(dataset, data, target)
        _log_reference(data, target)
        if plots is not None:
            log_plots(plots)
        info = _log_model(model, data, model_name)
    model_version = str(info.registered_model_version)
    return RegisteredModel(
        model_name=model_name,
        model_version=model_version,
        model_uri=f"models:/{model_name}/{model_version}",
        run_id=run.info.run_id,
        experiment_id=experiment_id,
    )
