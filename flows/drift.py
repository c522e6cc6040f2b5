"""`drift_monitor`: compare a new batch with the data the champion was trained on.

Per feature: the population stability index (PSI, on deciles of the reference) and the
two-sample Kolmogorov-Smirnov test (scipy). Where the batch has labels, also the served
model's error on it. The run shows a table artifact; on drift it emits the Prefect event
`ctcd.drift.detected` naming the model and the drifted features, which the
continuous-training deployment can trigger on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel
from scipy.stats import ks_2samp

from blocks.tracking import use_tracking
from ctcd.exceptions import DataContractError
from flows import ctcd_flow
from flows.data import Dataset, feature_frame, ingest_data
from flows.model import REFERENCE_PATH, score

DRIFT_EVENT = "ctcd.drift.detected"


@dataclass(frozen=True)
class Reference:
    model_name: str
    model_version: str
    frame: pd.DataFrame


class FeatureDrift(BaseModel):
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    drifted: bool


class DriftReport(BaseModel):
    model_name: str
    model_version: str
    rows: int
    features: list[FeatureDrift]
    drifted_features: list[str]
    served_metrics: dict[str, float] | None = None

    @property
    def drifted(self) -> bool:
        return bool(self.drifted_features)


@task(cache_policy=NO_CACHE)
def load_reference(model_name: str, alias: str = "champion") -> Reference:
    """The training sample stored with the version holding `alias`."""
    import mlflow

    from ctcd.settings import configure_mlflow

    configure_mlflow(model_name)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(model_name, alias)
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=REFERENCE_PATH)
    return Reference(model_name, str(version.version), pd.read_parquet(path))


def psi(reference: pd.Series, batch: pd.Series, bins: int = 10) -> float:
    """Population stability index of `batch` against `reference` (deciles of the reference)."""
    ref, new = reference.dropna().to_numpy(), batch.dropna().to_numpy()
    if len(ref) == 0 or len(new) == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant column: any new value is a shift
        return 0.0 if np.all(new == ref[0]) else float("inf")
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.histogram(ref, edges)[0] / len(ref)
    actual = np.histogram(new, edges)[0] / len(new)
    expected, actual = np.clip(expected, 1e-6, None), np.clip(actual, 1e-6, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@task(cache_policy=NO_CACHE)
def compute_drift(
    reference: Reference, batch: Dataset, target: str, psi_threshold: float, ks_alpha: float
) -> DriftReport:
    """PSI and KS per feature; a feature drifts when PSI > threshold and KS p < alpha."""
    expected = [c for c in reference.frame.columns if c != target]
    features = feature_frame(batch.frame, target)
    missing = [c for c in expected if c not in features]
    extra = [str(c) for c in features if c not in expected]
    if missing:
        problems = [f"missing feature column(s) the model was trained on: {', '.join(missing)}"]
        if extra:
            problems.append(f"columns the reference does not have: {', '.join(extra)}")
        raise DataContractError(batch.source, problems)
    rows = []
    for name in expected:
        value = psi(reference.frame[name], features[name])
        ks = ks_2samp(reference.frame[name].dropna(), features[name].dropna())
        drifted = value > psi_threshold and ks.pvalue < ks_alpha
        rows.append(
            FeatureDrift(
                feature=name,
                psi=value,
                ks_statistic=float(ks.statistic),
                ks_pvalue=float(ks.pvalue),
                drifted=drifted,
            )
        )
    return DriftReport(
        model_name=reference.model_name,
        model_version=reference.model_version,
        rows=len(features),
        features=rows,
        drifted_features=[r.feature for r in rows if r.drifted],
    )


@task(cache_policy=NO_CACHE)
def served_model_error(model_name: str, batch: Dataset, target: str) -> dict[str, float] | None:
    """The running server's error on the batch, when the batch has labels (else None)."""
    from blocks.lookup import find_service

    if target not in batch.frame or batch.frame[target].isna().all():
        return None
    labelled = batch.frame[batch.frame[target].notna()]
    service = find_service(model_name)
    predictions = service.predict(feature_frame(labelled, target))
    return score(labelled[target], np.asarray(predictions))


@ctcd_flow(name="drift-monitor", log_prints=True)
def drift_monitor(
    data_path: str | None = None,
    model_name: str = "customer-satisfaction",
    target: str = "review_score",
    psi_threshold: float = 0.2,
    ks_alpha: float = 0.01,
    score_served_model: bool = True,
    tracking: str | None = None,
) -> DriftReport:
    """Compare a batch with the champion's training sample; on drift, emit
    `ctcd.drift.detected` (resource `ctcd.model.<model_name>`) naming the drifted features.
    `tracking`: a saved `MLflowTracking` block's name, where the champion is registered."""
    with use_tracking(tracking):
        reference = load_reference(model_name)
    batch = ingest_data(data_path)
    report = compute_drift(reference, batch, target, psi_threshold, ks_alpha)
    if score_served_model:
        report = report.model_copy(
            update={"served_metrics": served_model_error(model_name, batch, target)}
        )
    create_table_artifact(
        key=f"drift-{model_name}".lower(),
        table=[r.model_dump() for r in report.features],
        description=f"Drift of {batch.source} against {model_name} v{report.model_version}; "
        f"served model error: {report.served_metrics}",
    )
    if report.drifted:
        emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": f"ctcd.model.{model_name}", "ctcd.model": model_name},
            payload={
                "drifted_features": report.drifted_features,
                "model_version": report.model_version,
            },
        )
    drifted = ", ".join(report.drifted_features) or "none"
    print(f"{model_name} v{report.model_version}: drifted features: {drifted}")
    return report
