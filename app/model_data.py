"""What the app reads from MLflow: the served version's training sample (input ranges and
defaults), the registry's versions with their metrics and gate decisions, evaluation plots.
The names (artifact paths, tags, aliases) are the flows' own, from `ctcd.names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ctcd.metrics import METRICS
from ctcd.names import CHAMPION, EVALUATION_DIR, GATE_TAG, IMPORTANCE_TAG
from ctcd.reference import Reference
from ctcd.settings import tracking_uri


@dataclass(frozen=True)
class FeatureRange:
    """One input: the range and median of the feature in the stored training sample."""

    name: str
    low: float
    high: float
    default: float
    integer: bool


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri())


def run_of(model_name: str, version: str) -> str:
    return str(_client().get_model_version(model_name, version).run_id)


def _range(name: str, values: pd.Series) -> FeatureRange:
    values = values.dropna().astype("float64")
    if values.empty:
        return FeatureRange(name, 0.0, 0.0, 0.0, False)
    integer = bool((values == values.round()).all())
    median = float(values.median())
    median = float(round(median)) if integer else median
    return FeatureRange(name, float(values.min()), float(values.max()), median, integer)


def feature_ranges(reference: Reference) -> list[FeatureRange]:
    """Range and default of each feature in the version's training sample (`ctcd.reference`,
    the sample the drift monitor compares new data with)."""
    return [_range(name, reference.frame[name]) for name in reference.names]


def versions_table(model_name: str, served: str | None) -> pd.DataFrame:
    """Every registered version, newest first: aliases, whether it serves, metrics on its
    held-out rows and the gate's decision."""
    client = _client()
    rows: list[dict[str, Any]] = []
    for version in client.search_model_versions(f"name = '{model_name}'"):
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        rows.append(
            {
                "version": int(version.version),
                "aliases": ", ".join(version.aliases),
                "serving": "yes" if str(version.version) == served else "",
                "registered": pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC"),
                **{m: metrics.get(m) for m in METRICS},
                "gate": version.tags.get(GATE_TAG, ""),
            }
        )
    columns = ["version", "aliases", "serving", "registered", *METRICS, "gate"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("version", ascending=False, ignore_index=True)


def champion_version(model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def evaluation_images(run_id: str) -> tuple[dict[str, bytes], str | None]:
    """The evaluation PNGs logged with the run, and how its importances were measured."""
    import mlflow

    client = _client()
    images = {}
    for item in client.list_artifacts(run_id, EVALUATION_DIR):
        if item.path.endswith(".png"):
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=item.path, tracking_uri=tracking_uri()
            )
            with open(local, "rb") as handle:
                images[item.path.rsplit("/", 1)[-1]] = handle.read()
    return images, client.get_run(run_id).data.tags.get(IMPORTANCE_TAG)


def check_columns(
    columns: list[str], features: list[str], target: str
) -> tuple[list[str], list[str]]:
    """(missing features, unexpected columns) of an uploaded table; the target may be there."""
    missing = [f for f in features if f not in columns]
    unexpected = [c for c in columns if c not in features and c != target]
    return missing, unexpected


def conform(frame: pd.DataFrame, reference: Reference) -> tuple[pd.DataFrame, list[str]]:
    """The feature columns as the model was trained on them (numbers of the training
    dtypes; empty cells stay missing, the model imputes them), and a problem per column
    holding something that is not a number."""
    out, problems = pd.DataFrame(index=frame.index), []
    for name in reference.names:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = frame[name].notna() & values.isna()
        if bad.any():
            row = int(bad.to_numpy().argmax())
            problems.append(
                f"column '{name}' holds values that are not numbers, e.g. "
                f"{frame[name].iloc[row]!r} on data row {row + 1}"
            )
        wanted = np.dtype(reference.dtypes.get(name, "float64"))
        out[name] = values if values.isna().any() else values.astype(wanted)
    return out, problems
