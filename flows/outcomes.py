"""`record_outcomes`: join labels that arrive later to what the server predicted, and judge the
served model on them.

A review score is known days after the order was scored. The outcomes table (CSV or Parquet)
holds the label (`target`) and a key: by default `request_id`, the id the server returned and
logged with every answer (a client can send its own, e.g. the order id, as `X-Request-ID`);
with a `row` column too, each label goes to that row of its request, else to every row of the
request. Any other `key` must be a column of both the table and the log. The joined rows give
the served model's live error, reported next to the champion's offline figure (its MLflow
run's metric on held-out rows); when the live error is worse by more than `margin` (relative:
0.1 = 10 %), the flow emits `ctcd.performance.degraded` for resource `ctcd.model.<model_name>`,
which `prefect.yaml` wires to retraining, like drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from pydantic import BaseModel

from blocks.tracking import use_tracking
from ctcd.exceptions import DataContractError, DataError, ModelConfigError
from ctcd.metrics import HIGHER_IS_BETTER, METRICS, score
from ctcd.names import CHAMPION, PERFORMANCE_DEGRADED, model_resource
from flows import ctcd_flow
from flows.data import read_table
from flows.drift import served_traffic


class OutcomeReport(BaseModel):
    model_name: str
    champion_version: str
    served_versions: list[str]
    rows: int
    unmatched_outcomes: int
    metric: str
    live_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    degraded: bool
    reason: str


@task(cache_policy=NO_CACHE)
def join_outcomes(
    outcomes: pd.DataFrame, served: pd.DataFrame, key: str, target: str, source: str
) -> tuple[pd.DataFrame, int]:
    """The served rows that have an outcome (with `target`), and how many outcomes matched
    nothing in the log."""
    problems = []
    if target not in outcomes:
        problems.append(f"no label column '{target}' (columns: {', '.join(map(str, outcomes))})")
    if key not in outcomes:
        problems.append(f"no key column '{key}' to join on")
    if key not in served:
        problems.append(
            f"the prediction log has no '{key}' column (it has request_id, row and the "
            "features): join on request_id, and send your key as the X-Request-ID header"
        )
    if problems:
        raise DataContractError(source, problems)
    labels = outcomes.dropna(subset=[target])
    on = [key, "row"] if key == "request_id" and "row" in labels else [key]
    labels = labels.drop_duplicates(subset=on, keep="last")
    if key == "request_id":
        labels = labels.assign(request_id=labels["request_id"].astype(str))
    joined = served.merge(labels[[*on, target]], on=on, how="inner", suffixes=("", "_outcome"))
    matched = labels.merge(served[on].drop_duplicates(), on=on, how="inner")
    return joined, len(labels) - len(matched)


@task(cache_policy=NO_CACHE)
def champion_figures(model_name: str) -> tuple[str, dict[str, float]]:
    """The champion's version and its training run's metrics (held-out rows)."""
    import mlflow

    from ctcd.settings import configure_mlflow

    configure_mlflow(model_name)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(model_name, CHAMPION)
    metrics = client.get_run(str(version.run_id)).data.metrics
    return str(version.version), {k: float(v) for k, v in metrics.items() if k in METRICS}


def judge(live: float, offline: float, metric: str, margin: float) -> tuple[bool, str]:
    """Whether the live figure is worse than the offline one by more than `margin` (relative
    for error metrics, absolute for r2), and why."""
    if not HIGHER_IS_BETTER[metric]:
        limit = offline * (1 + margin)
        worse = live > limit
        how = f"live {metric} {live:.4f} vs champion's {offline:.4f} (limit {limit:.4f})"
    else:
        limit = offline - margin
        worse = live < limit
        how = f"live {metric} {live:.4f} vs champion's {offline:.4f} (limit {limit:.4f})"
    return worse, ("degraded: " if worse else "within margin: ") + how


@ctcd_flow(name="record-outcomes", log_prints=True)
def record_outcomes(
    data_path: str | None = None,
    key: str = "request_id",
    model_name: str = "customer-satisfaction",
    target: str = "review_score",
    window: str = "30d",
    metric: str = "rmse",
    margin: float = 0.1,
    min_rows: int = 30,
    deployer: str | None = None,
    tracking: str | None = None,
) -> OutcomeReport:
    """Join the labels at `data_path` to the predictions the model's running server logged in
    the last `window`; report the live error beside the champion's offline one and, when it is
    worse by more than `margin`, emit `ctcd.performance.degraded`.

    Args:
        data_path: the table of labels (CSV or Parquet), with `target` and `key` columns;
            required.
        key: the column holding the request id each prediction was answered with.
        model_name: the registered model whose server's predictions to join.
        target: the label column.
        window: how far back to read the served predictions, e.g. `30d`.
        metric: the live error to compare: `rmse`, `mae`, `mse` or `r2`.
        margin: how much worse than the champion's offline error (0.1: 10 %) counts as
            degraded.
        min_rows: with fewer joined rows than this the run fails, saying so (too few to judge).
        deployer: name of a saved deployer block whose server's log to read; None: the
            local MLflow servers.
        tracking: name of a saved `MLflowTracking` block (server, registry, credentials,
            possibly from Vault); None uses MLFLOW_TRACKING_URI or local SQLite.
    """
    joined, unmatched, path = _joined(data_path, key, model_name, target, window, metric,
                                      min_rows, deployer)  # fmt: skip
    with use_tracking(tracking):
        champion, offline = champion_figures(model_name)
    live = score(joined[target].astype(float), joined["prediction"].to_numpy(dtype=np.float64))
    if metric not in offline:
        raise DataContractError(
            f"champion v{champion} of {model_name}", [f"its run logged no '{metric}' metric"]
        )
    degraded, reason = judge(live[metric], offline[metric], metric, margin)
    report = OutcomeReport(
        model_name=model_name,
        champion_version=champion,
        served_versions=sorted(joined["model_version"].astype(str).unique()),
        rows=len(joined),
        unmatched_outcomes=unmatched,
        metric=metric,
        live_metrics=live,
        champion_metrics=offline,
        degraded=degraded,
        reason=reason,
    )
    _publish(report, path, margin)
    print(f"{model_name}: {reason} on {len(joined)} rows")
    return report


def _joined(
    data_path: str | None, key: str, model_name: str, target: str, window: str, metric: str,
    min_rows: int, deployer: str | None,
) -> tuple[pd.DataFrame, int, Path]:  # fmt: skip
    """The labelled served rows, how many outcomes matched nothing, and the labels' path;
    a clear error when there is nothing (or too little) to judge."""
    if data_path is None:
        raise DataError(
            "record_outcomes needs data_path: the table (CSV or Parquet) of labels with the "
            f"'{key}' each prediction was answered with, e.g. `prefect deployment run "
            "record-outcomes/record-outcomes --param data_path=reviews.csv`."
        )
    if metric not in METRICS:
        raise ModelConfigError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    path = Path(data_path).expanduser()
    outcomes = read_table(path)
    served = served_traffic(model_name, window, deployer)
    if served.empty:
        raise DataError(
            f"The prediction log of {model_name}'s server holds no rows from the last {window}: "
            "nothing to join the outcomes to. Widen `window`, or check that the server logs "
            "(`ctcd models describe UUID`: prediction_log_dir, prediction_log_rows)."
        )
    joined, unmatched = join_outcomes(outcomes, served, key, target, str(path))
    if len(joined) < min_rows:
        raise DataError(
            f"Only {len(joined)} outcomes in {path} match a prediction logged in the last "
            f"{window} (by '{key}'); at least {min_rows} are needed to judge the live error. "
            f"{unmatched} outcomes matched nothing: check the key, or widen `window`."
        )
    return joined, unmatched, path


def _publish(report: OutcomeReport, path: Path, margin: float) -> None:
    """The run's artifact, and `ctcd.performance.degraded` when the live error is worse."""
    live, offline, metric = report.live_metrics, report.champion_metrics, report.metric
    table = "\n".join(
        f"| {name} | {live[name]:.4f} | {offline.get(name, float('nan')):.4f} |" for name in METRICS
    )
    create_markdown_artifact(
        key=f"outcomes-{report.model_name}".lower(),
        markdown=(
            f"## Live error of {report.model_name} (served versions "
            f"{', '.join(report.served_versions)})\n\n{report.rows} served rows with outcomes "
            f"from `{path}`; {report.unmatched_outcomes} outcomes matched no logged prediction."
            f"\n\n| metric | live | champion v{report.champion_version} (offline) |"
            f"\n|---|---|---|\n{table}\n\n**{report.reason}**\n"
        ),
    )
    if report.degraded:
        emit_event(
            event=PERFORMANCE_DEGRADED,
            resource=model_resource(report.model_name),
            payload={
                "metric": metric,
                "live": live[metric],
                "champion": offline[metric],
                "margin": margin,
                "rows": report.rows,
                "served_versions": report.served_versions,
            },
        )
