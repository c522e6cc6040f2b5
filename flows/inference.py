"""`inference_pipeline`: score a batch with the server that serves the model now."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.lookup import find_service
from blocks.service import ServiceRecord
from flows import ctcd_flow
from flows.data import Dataset, feature_frame, ingest_data
from flows.results import InferenceResult

BATCH_ROWS = 5_000


@task(cache_policy=NO_CACHE)
def prediction_service_loader(
    model_name: str, pipeline_name: str | None, step_name: str | None, deployer: str | None
) -> ServiceRecord:
    """The running server for the model (the seed's `prediction_service_loader`)."""
    return find_service(model_name, pipeline_name, step_name, deployer, running=True)


@task(cache_policy=NO_CACHE)
def predictor(service: ServiceRecord, dataset: Dataset, target: str) -> list[float]:
    """Send the batch's features to the server in chunks of 5,000 rows."""
    features = feature_frame(dataset.frame, target)
    predictions: list[float] = []
    for start in range(0, len(features), BATCH_ROWS):
        predictions.extend(service.predict(features.iloc[start : start + BATCH_ROWS]))
    return predictions


@ctcd_flow(name="inference-pipeline", log_prints=True)
def inference_pipeline(
    data_path: str | None = None,
    model_name: str = "customer-satisfaction",
    target: str = "review_score",
    pipeline_name: str | None = None,
    step_name: str | None = None,
    deployer: str | None = None,
) -> InferenceResult:
    """Load a batch (the target column, if present, is ignored), find the running server
    for `model_name` and return its predictions, one per row.

    Args:
        data_path: a local CSV or Parquet file to score; None uses the generated sample table.
        model_name: the registered model whose running server scores the batch.
        target: a label column to leave out of the features if the table has one.
        pipeline_name: narrow the server lookup to one deploying pipeline (default: any).
        step_name: narrow the server lookup to one deploying step (default: any).
        deployer: name of a saved deployer block (`seldon-model-deployer/NAME`, or a plain
            MLflow deployer name); None is the local MLflow deployer with defaults.
    """
    dataset = ingest_data(data_path)
    service = prediction_service_loader(model_name, pipeline_name, step_name, deployer)
    predictions = predictor(service, dataset, target)
    print(f"Scored {len(predictions)} rows with {model_name} v{service.model_version}")
    return InferenceResult(predictions=predictions, service=service, rows=len(predictions))
