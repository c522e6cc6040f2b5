"""Shared set-up for the serving benchmarks: an isolated CTCD_HOME and MLflow database with
registered versions (two random forests, or any model types) trained on the full 115,609-row
sample."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def isolated_home() -> Path:
    work = Path(tempfile.mkdtemp(prefix="ctcd-bench-serving-"))
    os.environ.update(
        CTCD_HOME=str(work / "home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        CTCD_LOCAL_API="0",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    return work


def register_two_versions(
    model_name: str = "bench-model", model_type: str = "random_forest", count: int = 2
) -> list:
    """v1: ctcd's defaults (random forest: 100 trees, depth 12); v2: 60 trees (or defaults)."""
    second = {"n_estimators": 60} if model_type == "random_forest" else {}
    return register_versions(model_name, [(model_type, {}), (model_type, second)][:count])


def register_versions(model_name: str, versions: list[tuple[str, dict]]) -> list:
    """One registered version of `model_name` per (model type, params), in order, each
    trained on the full sample; their DeploymentConfigs."""
    from blocks import DeploymentConfig
    from ctcd.settings import configure_mlflow
    from flows.data import clean_data, ingest_data
    from flows.model import evaluate_model, register_model, train_model

    dataset = ingest_data.fn(None)
    data = clean_data.fn(dataset)
    experiment = configure_mlflow(model_name)
    configs = []
    for model_type, params in versions:
        model = train_model.fn(data, model_type, params)
        metrics = evaluate_model.fn(model, data)
        reg = register_model.fn(
            model,
            data,
            dataset,
            metrics,
            model_name,
            model_type,
            params,
            "review_score",
            experiment,
        )
        configs.append(
            DeploymentConfig(
                model_name=model_name,
                model_version=reg.model_version,
                model_uri=reg.model_uri,
                pipeline_name="bench",
                step_name="serve",
            )
        )
    return configs


def example_body(record) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


def single_row_body(record) -> bytes:
    import json

    body = json.loads(example_body(record))
    body["dataframe_split"]["data"] = body["dataframe_split"]["data"][:1]
    return json.dumps(body).encode()
