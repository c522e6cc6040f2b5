"""The names ctcd writes into other systems and reads back: MLflow aliases, tags and artifact
paths, Prefect event names and resources, the default pipeline and step of a model server.

Flows write them, the app and the CLI read them: one definition here, so a rename is one edit.
"""

from __future__ import annotations

# MLflow registry aliases: the version serving now, and the last one the gate refused (or a
# candidate on trial).
CHAMPION = "champion"
CHALLENGER = "challenger"

# MLflow tags.
GATE_TAG = "ctcd.gate"  # on a model version: the gate's decision and why
ROLLOUT_TAG = "ctcd.rollout"  # on a model version: its rollout's decision (or opening) and why
# The decision a later run gives a version whose own run died before its gate decided.
INTERRUPTED = "interrupted"
# On a model version: why `champion` was moved to it (it serves; the alias named another).
CHAMPION_REPAIR_TAG = "ctcd.champion_repaired"
FLOW_RUN_TAG = "ctcd.prefect_flow_run_id"  # on a run: the Prefect flow run that trained it
DATA_SHA_TAG = "ctcd.data_sha256"  # on a run: the training table's content hash
DATA_SOURCE_TAG = "ctcd.data_source"  # on a run: where the training table was read
IMPORTANCE_TAG = "ctcd.feature_importance"  # on a run: how its feature importances were measured

# MLflow artifact paths of a training run.
REFERENCE_PATH = "reference/reference.parquet"  # a sample of the training rows
EVALUATION_DIR = "evaluation"  # the evaluation plots

# Prefect events, all about the resource `model_resource(name)`.
DRIFT_DETECTED = "ctcd.drift.detected"
PERFORMANCE_DEGRADED = "ctcd.performance.degraded"
ROLLOUT_PROMOTED = "ctcd.rollout.promoted"
ROLLOUT_ROLLED_BACK = "ctcd.rollout.rolled_back"

# The server a continuous-deployment run updates: one per (pipeline, step, model).
DEFAULT_PIPELINE = "continuous-deployment-pipeline"
DEFAULT_STEP = "deploy_model"


def model_resource_id(model_name: str) -> str:
    """The Prefect resource id of a model, which its events name and triggers match."""
    return f"ctcd.model.{model_name}"


def model_resource(model_name: str) -> dict[str, str]:
    """The `resource` of an event about a model."""
    return {"prefect.resource.id": model_resource_id(model_name), "ctcd.model": model_name}
