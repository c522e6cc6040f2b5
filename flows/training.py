"""`training_pipeline`: ingest -> validate -> clean -> train -> evaluate -> register."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blocks.tracking import use_tracking
from ctcd.settings import configure_mlflow, experiment_for
from flows import ctcd_flow
from flows.data import CleanData, Contract, Dataset, clean_data, ingest_data, validate_data
from flows.evaluation import plot_evaluation
from flows.model import (
    ModelType,
    RegisteredModel,
    evaluate_model,
    register_model,
    train_model,
)
from flows.report import RunFacts, publish_report
from flows.results import TrainingResult


@dataclass(frozen=True)
class Trained:
    dataset: Dataset
    data: CleanData
    metrics: dict[str, float]
    registered: RegisteredModel

    def result_fields(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "model_name": self.registered.model_name,
            "model_version": self.registered.model_version,
            "model_uri": self.registered.model_uri,
            "run_id": self.registered.run_id,
            "data_source": self.dataset.source,
            "data_sha256": self.dataset.sha256,
        }

    def facts(self) -> RunFacts:
        return RunFacts(
            self.registered,
            self.metrics,
            self.dataset.source,
            self.dataset.sha256,
            len(self.data.x_test),
        )


def train_and_register(
    data_path: str | None,
    target: str,
    model_type: ModelType,
    model_name: str,
    model_params: dict[str, Any] | None,
    experiment_name: str | None,
    contract: Contract,
    tags: dict[str, str] | None = None,
) -> Trained:
    """The steps both pipelines share. Nothing reaches MLflow until the data has passed
    its contract and the model has trained and been evaluated."""
    dataset = ingest_data(data_path)
    validate_data(dataset, target, contract)
    data = clean_data(dataset, target)
    model = train_model(data, model_type, model_params)
    metrics = evaluate_model(model, data)
    plots = plot_evaluation(model, data, target)
    experiment_id = configure_mlflow(experiment_for(model_name, experiment_name))
    registered = register_model(
        model,
        data,
        dataset,
        metrics,
        model_name,
        model_type,
        model_params,
        target,
        experiment_id,
        tags,
        plots,
    )
    _log_outcome(model_type, data, metrics, registered)
    return Trained(dataset, data, metrics, registered)


def _log_outcome(
    model_type: str, data: CleanData, metrics: dict[str, float], registered: RegisteredModel
) -> None:
    """One line in the run's log (the Prefect UI's Logs tab) with what the run produced."""
    from prefect import get_run_logger

    figures = ", ".join(f"{name} {metrics[name]:.4f}" for name in ("rmse", "mae", "mse", "r2"))
    get_run_logger().info(
        f"Trained {model_type} on {len(data.x_train):,} rows; on the {len(data.x_test):,} "
        f"held-out rows: {figures}. Registered {registered.model_name} version "
        f"{registered.model_version} (MLflow run {registered.run_id})."
    )


@ctcd_flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    data_path: str | None = None,
    target: str = "review_score",
    model_type: ModelType = "random_forest",
    model_name: str = "customer-satisfaction",
    model_params: dict[str, Any] | None = None,
    experiment_name: str | None = None,
    contract: Contract = "auto",
    tracking: str | None = None,
) -> TrainingResult:
    """Train a model on a table and register it as a new MLflow model version.

    Args:
        data_path: a local CSV or Parquet file; None uses the generated sample table.
        target: the numeric column to predict; features are the other numeric columns.
        model_type: `linear`, `random_forest` or `gradient_boosting`.
        model_name: the MLflow registered model.
        model_params: overrides of the estimator's hyperparameters.
        experiment_name: the MLflow experiment (default: the tracking block's, else the
            model name).
        contract: `auto` (the customer-satisfaction contract when target is `review_score`),
            `generic` or `customer_satisfaction`.
        tracking: name of a saved `MLflowTracking` block (server, registry, experiment,
            credentials, possibly from Vault); None uses MLFLOW_TRACKING_URI or local SQLite.
    """
    with use_tracking(tracking):
        trained = train_and_register(
            data_path, target, model_type, model_name, model_params, experiment_name, contract
        )
        publish_report(trained.facts(), "not evaluated (training only)")
    return TrainingResult(**trained.result_fields())
