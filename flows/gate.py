"""The deployment gate: a threshold on one metric, and optionally the champion to beat."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from ctcd.exceptions import TrackingError
from ctcd.metrics import Metric, at_least_as_good, score
from ctcd.names import CHAMPION
from ctcd.seams import pause_point
from ctcd.settings import ctcd_home
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


def champion_version(model_name: str) -> str | None:
    """The version holding `champion` (None: the model has no champion yet). Any other
    failure to read the registry raises `TrackingError`: an outage is not "no champion"."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.MlflowClient().get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise _unreadable(model_name, "its champion could not be read", err) from None
    except Exception as err:  # requests' errors, when MLflow does not wrap them
        raise _unreadable(model_name, "its champion could not be read", err) from None
    version = (model.aliases or {}).get(CHAMPION)
    return None if version is None else str(version)


def _unreadable(model_name: str, what: str, err: Exception) -> TrackingError:
    import mlflow

    cause = " ".join(str(err).split())[:300]
    return TrackingError(
        mlflow.get_tracking_uri(),
        f"{model_name}: {what} ({type(err).__name__}: {cause}), so the gate cannot compare "
        "the candidate with it and nothing was deployed; the champion keeps serving",
        "that the server runs and answers (start it, or fix MLFLOW_TRACKING_URI or the "
        "tracking block), then run again",
    )


@task(cache_policy=NO_CACHE)
def evaluate_champion(model_name: str, data: CleanData) -> ChampionScore | None:
    """Score the `champion` version on the candidate's held-out rows (None: no champion).

    Raises `TrackingError` when the registry or the champion's files cannot be read (an
    outage fails the run: it never passes the gate). A champion that loads but cannot score
    these rows (e.g. a column it needs is gone) is a real incompatibility: its note says so."""
    import mlflow

    pause_point("champion-reading", ctcd_home())
    version = champion_version(model_name)
    if version is None:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}")
    except Exception as err:
        what = f"champion v{version}'s files could not be read"
        raise _unreadable(model_name, what, err) from None
    try:
        champion = mlflow.pyfunc.load_model(path)
        return ChampionScore(version, score(data.y_test, champion.predict(data.x_test)))
    except Exception as err:
        note = f"champion v{version} cannot score these rows ({type(err).__name__}: {err})"
        return ChampionScore(version, None, note[:400])


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
