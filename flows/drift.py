"""`drift_monitor`: compare a new batch with the data the champion was trained on.

The batch is a table (`data_path`) or, with no `data_path`, what the model's running server
actually scored in the last `window` (its prediction log, `ctcd.serving.predlog`). Per feature:
the population stability index (PSI, on deciles of the reference) and the two-sample
Kolmogorov-Smirnov test (scipy); for served traffic also the same test on the predictions
(output drift: the served predictions against the champion's predictions on its reference).
Where a table has labels, also the served model's error on it. The run shows a table artifact;
on drift it emits the Prefect event `ctcd.drift.detected` naming the model and what drifted,
which the continuous-training deployment can trigger on. A window with fewer than `min_rows`
served rows says so and emits nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel
from scipy.stats import ks_2samp

from blocks.tracking import use_tracking
from ctcd.exceptions import DataContractError, ModelConfigError, ModelServerError
from ctcd.metrics import score
from ctcd.names import DRIFT_DETECTED, model_resource
from ctcd.reference import Reference, load_reference
from flows import ctcd_flow
from flows.data import Dataset, feature_frame, ingest_data


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
    source: str = ""
    output: FeatureDrift | None = None  # served traffic: predictions against the reference's
    too_few_rows: bool = False

    @property
    def drifted(self) -> bool:
        return bool(self.drifted_features) or bool(self.output and self.output.drifted)


def parse_window(window: str) -> timedelta:
    """'24h', '30m', '7d', '90s' as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", window)
    if not match:
        raise ModelConfigError(
            f"window {window!r} is not a duration: use a number and a unit, e.g. '24h', "
            "'30m', '7d' or '90s'"
        )
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: float(match.group(1))})


@task(cache_policy=NO_CACHE)
def served_traffic(model_name: str, window: str, deployer: str | None = None) -> pd.DataFrame:
    """What the model's running server answered in the last `window` (its prediction log,
    without a shadow candidate's copies)."""
    from blocks.lookup import find_service
    from ctcd.serving.predlog import read_log, served_rows

    service = find_service(model_name, deployer=deployer)
    if not service.prediction_log_dir:
        raise ModelServerError(
            f"Reading what server {service.uuid[:8]} of {model_name} served",
            "it keeps no prediction log",
            hint="deploy with prediction_log=True (the default for local servers), or pass "
            "data_path to compare a table instead",
        )
    since = datetime.now(UTC) - parse_window(window)
    return served_rows(read_log(service.local.runtime_dir, since=since))


def _same_test(name: str, reference: pd.Series, batch: pd.Series, psi_threshold: float,
               ks_alpha: float) -> FeatureDrift:  # fmt: skip
    value = psi(reference, batch)
    ks = ks_2samp(reference.dropna(), batch.dropna())
    return FeatureDrift(
        feature=name,
        psi=value,
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        drifted=value > psi_threshold and ks.pvalue < ks_alpha,
    )


@task(cache_policy=NO_CACHE)
def output_drift(
    reference: Reference, served: pd.DataFrame, target: str, psi_threshold: float, ks_alpha: float
) -> FeatureDrift:
    """The served predictions (of the champion version, if it served any) against the
    champion's own predictions on its reference sample."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{reference.model_name}/{reference.model_version}")
    features = reference.frame.drop(columns=[target], errors="ignore")
    expected = pd.Series(np.asarray(model.predict(features), dtype=float).ravel())
    mine = served[served["model_version"].astype(str) == reference.model_version]
    batch = (mine if len(mine) else served)["prediction"].astype(float)
    return _same_test("prediction", expected, batch, psi_threshold, ks_alpha)


@task(cache_policy=NO_CACHE)
def champion_reference(model_name: str) -> Reference:
    """The training sample stored with the champion version (`ctcd.reference`)."""
    return load_reference(model_name)


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
    rows = [
        _same_test(name, reference.frame[name], features[name], psi_threshold, ks_alpha)
        for name in expected
    ]
    return DriftReport(
        source=batch.source,
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
    window: str = "24h",
    min_rows: int = 200,
    deployer: str | None = None,
) -> DriftReport:
    """Compare a batch with the champion's training sample; on drift, emit
    `ctcd.drift.detected` (resource `ctcd.model.<model_name>`) naming what drifted.

    The batch: the table at `data_path`, or with no `data_path`, the rows the model's running
    server scored in the last `window` (e.g. '24h'), whose predictions are compared too. With
    fewer than `min_rows` served rows it reports that and emits nothing.

    Args:
        data_path: a CSV or Parquet batch to check; None reads what the model's running
            server scored in the last `window` (its prediction log).
        model_name: the registered model; its champion's training sample is the reference.
        target: the label column, left out of the features (scored when the batch has it).
        psi_threshold: a feature drifts when its population stability index exceeds this
        ks_alpha: and its two-sample Kolmogorov-Smirnov p-value is below this.
        score_served_model: for a `data_path` batch with labels, also report the served
            model's error on it.
        tracking: name of a saved `MLflowTracking` block (server, registry, credentials,
            possibly from Vault); None uses MLFLOW_TRACKING_URI or local SQLite.
        window: how far back to read the served traffic, e.g. `24h`, `90m`, `7d`.
        min_rows: fewer served rows than this are reported as too few, with no event.
        deployer: name of a saved deployer block whose server's log to read; None: the
            local MLflow servers.
    """
    with use_tracking(tracking):
        reference = champion_reference(model_name)
        if data_path is None:
            report = _served_report(
                reference, model_name, target, psi_threshold, ks_alpha, window, min_rows, deployer
            )
        else:
            batch = ingest_data(data_path)
            report = compute_drift(reference, batch, target, psi_threshold, ks_alpha)
            if score_served_model:
                report = report.model_copy(
                    update={"served_metrics": served_model_error(model_name, batch, target)}
                )
    _publish(report, min_rows)
    return report


def _publish(report: DriftReport, min_rows: int) -> None:
    """The run's table artifact, its log line, and `ctcd.drift.detected` on drift."""
    model_name = report.model_name
    table = [
        r.model_dump() for r in [*report.features, *([report.output] if report.output else [])]
    ]
    create_table_artifact(
        key=f"drift-{model_name}".lower(),
        table=table,
        description=f"Drift of {report.source} ({report.rows} rows) against {model_name} "
        f"v{report.model_version}; served model error: {report.served_metrics}"
        + ("; too few rows to judge" if report.too_few_rows else ""),
    )
    if report.too_few_rows:
        print(
            f"{model_name}: {report.source} holds {report.rows} rows, fewer than min_rows="
            f"{min_rows}: not judged, no event"
        )
        return
    if report.drifted:
        emit_event(
            event=DRIFT_DETECTED,
            resource=model_resource(model_name),
            payload={
                "drifted_features": report.drifted_features,
                "output_drift": bool(report.output and report.output.drifted),
                "model_version": report.model_version,
                "rows": report.rows,
                "source": report.source,
            },
        )
    drifted = ", ".join(report.drifted_features) or "none"
    output = "" if report.output is None else f"; predictions drifted: {report.output.drifted}"
    print(f"{model_name} v{report.model_version}: drifted features: {drifted}{output}")


def _served_report(
    reference: Reference,
    model_name: str,
    target: str,
    psi_threshold: float,
    ks_alpha: float,
    window: str,
    min_rows: int,
    deployer: str | None,
) -> DriftReport:
    served = served_traffic(model_name, window, deployer)
    source = f"traffic served in the last {window}"
    if len(served) < min_rows:
        return DriftReport(
            model_name=model_name, model_version=reference.model_version, rows=len(served),
            features=[], drifted_features=[], source=source, too_few_rows=True,
        )  # fmt: skip
    columns = [c for c in reference.frame.columns if c != target]
    missing = [c for c in columns if c not in served]
    if missing:
        raise DataContractError(source, [f"the log lacks feature column(s): {', '.join(missing)}"])
    batch = Dataset(frame=served[columns], source=source, sha256="")
    report = compute_drift(reference, batch, target, psi_threshold, ks_alpha)
    return report.model_copy(
        update={"output": output_drift(reference, served, target, psi_threshold, ks_alpha)}
    )
