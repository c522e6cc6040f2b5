"""The deployment gate: a threshold on one metric, and optionally the champion to beat."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from ctcd.metrics import Metric, at_least_as_good, score
from ctcd.names import CHAMPION
from flows.data import CleanData


class DeploymentCriteria(BaseModel):
    """When a new model may replace the one serving."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Field(default="r2", description="Metric on the held-out 20 % that decides.")
    threshold: float = Field(
        default=0.0,
        description="Error metrics (mse, rmse, mae) pass when <= threshold; r2 when >=. "
        "The default, r2 >= 0, means: better than predicting the mean.",
    )
    must_beat_champion: bool = Field(
        default=True,
        description="Also be at least as good as the version holding the `champion` alias, "
        "scored on the same held-out rows.",
    )


@dataclass(frozen=True)
class ChampionScore:
    version: str
    metrics: dict[str, float] | None
    note: str = ""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


@task(cache_policy=NO_CACHE)
def evaluate_champion(model_name: str, data: CleanData) -> ChampionScore | None:
    """Score the `champion` version on the candidate's held-out rows (None: no champion)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION).version
    except MlflowException:
        return None
    try:
        champion = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
        return ChampionScore(str(version), score(data.y_test, champion.predict(data.x_test)))
    except Exception as err:
        note = f"champion v{version} cannot score these rows ({type(err).__name__}: {err})"
        return ChampionScore(str(version), None, note[:400])


@task(cache_policy=NO_CACHE)
def deployment_trigger(
    metrics: dict[str, float], criteria: DeploymentCriteria, champion: ChampionScore | None
) -> GateDecision:
    """Pass only if the threshold holds (on the first deploy too) and, with
    `must_beat_champion`, the candidate is at least as good as the champion."""
    name, value, limit = criteria.metric, metrics[criteria.metric], criteria.threshold
    sign = ">=" if name == "r2" else "<="
    if not at_least_as_good(name, value, limit):
        return GateDecision(
            False,
            f"{name} {value:.4f} misses the threshold ({sign} {limit:.4f}) by "
            f"{abs(value - limit):.4f}; not deployed",
        )
    margin = abs(value - limit)
    head = f"{name} {value:.4f} meets the threshold ({sign} {limit:.4f}, margin {margin:.4f})"
    if not criteria.must_beat_champion:
        return GateDecision(True, f"{head}; champion comparison not required")
    if champion is None:
        return GateDecision(True, f"{head}; no champion yet")
    if champion.metrics is None:
        return GateDecision(True, f"{head}; {champion.note}, so the candidate replaces it")
    best = champion.metrics[name]
    gap = abs(value - best)
    if at_least_as_good(name, value, best):
        versus = f"better by {gap:.4f}" if gap > 0 else "a tie"
        return GateDecision(
            True,
            f"{head} and is at least as good as champion v{champion.version} "
            f"({name} {best:.4f}, {versus}) on the same held-out rows",
        )
    return GateDecision(
        False,
        f"{head} but is worse than champion v{champion.version} "
        f"({name} {best:.4f}) by {gap:.4f} on the same held-out rows; not deployed",
    )
