"""train_model, evaluate_model, register_model, evaluate_champion and the gate (`task.fn`)."""

from __future__ import annotations

import math

import mlflow
import pytest
from sklearn.pipeline import Pipeline

from ctcd.exceptions import ModelConfigError
from ctcd.settings import configure_mlflow
from flows.data import Dataset, clean_data
from flows.gate import ChampionScore, DeploymentCriteria, deployment_trigger, evaluate_champion
from flows.model import evaluate_model, register_model, train_model
from tests.conftest import FAST_RF

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data(small_table):
    return clean_data.fn(Dataset(frame=small_table, source="small.csv", sha256="ab" * 32))


@pytest.mark.parametrize("model_type", ["linear", "random_forest", "gradient_boosting"])
def test_each_model_type_trains_a_pipeline_and_beats_the_mean(data, model_type) -> None:
    params = FAST_RF if model_type == "random_forest" else None
    model = train_model.fn(data, model_type, params)
    assert isinstance(model, Pipeline) and model.steps[0][0] == "impute"
    metrics = evaluate_model.fn(model, data)
    assert set(metrics) == {"mse", "rmse", "mae", "r2"}
    assert math.isclose(metrics["rmse"], math.sqrt(metrics["mse"]))
    assert metrics["r2"] > 0.02


def test_training_is_reproducible(data) -> None:
    first = evaluate_model.fn(train_model.fn(data, "random_forest", FAST_RF), data)
    second = evaluate_model.fn(train_model.fn(data, "random_forest", FAST_RF), data)
    assert first == pytest.approx(second, rel=1e-12)  # n_jobs=-1 sums in any order


def test_model_params_override_defaults_and_typos_are_named(data) -> None:
    model = train_model.fn(data, "random_forest", {"n_estimators": 3, "max_depth": 2})
    assert len(model[-1].estimators_) == 3 and model[-1].max_depth == 2
    with pytest.raises(ModelConfigError, match=r"\['n_estimator'\].*RandomForestRegressor"):
        train_model.fn(data, "random_forest", {"n_estimator": 3})
    with pytest.raises(ModelConfigError, match="Unknown model_type 'xgboost'"):
        train_model.fn(data, "xgboost")


def test_register_logs_everything_and_creates_a_new_version(data, model_name) -> None:
    model = train_model.fn(data, "linear")
    metrics = evaluate_model.fn(model, data)
    dataset = Dataset(frame=data.x_train, source="/data/small.csv", sha256="cd" * 32)
    experiment = configure_mlflow(model_name)
    first = register_model.fn(
        model, data, dataset, metrics, model_name, "linear", None, "review_score", experiment
    )
    second = register_model.fn(
        model, data, dataset, metrics, model_name, "linear", None, "review_score", experiment
    )
    assert (first.model_version, second.model_version) == ("1", "2")
    run = mlflow.get_run(first.run_id)
    assert run.data.metrics == pytest.approx(metrics)
    assert run.data.params["model_type"] == "linear"
    assert run.data.tags["ctcd.data_sha256"] == "cd" * 32
    assert run.inputs.dataset_inputs[0].dataset.digest == ("cd" * 32)[:16]
    loaded = mlflow.pyfunc.load_model(first.model_uri)
    assert len(loaded.predict(data.x_test)) == len(data.x_test)
    assert loaded.metadata.get_input_schema().input_names() == data.features


def test_champion_is_scored_on_the_same_rows(data, model_name) -> None:
    assert evaluate_champion.fn(model_name, data) is None
    model = train_model.fn(data, "linear")
    metrics = evaluate_model.fn(model, data)
    dataset = Dataset(frame=data.x_train, source="s.csv", sha256="ef" * 32)
    reg = register_model.fn(
        model,
        data,
        dataset,
        metrics,
        model_name,
        "linear",
        None,
        "review_score",
        configure_mlflow(model_name),
    )
    mlflow.MlflowClient().set_registered_model_alias(model_name, "champion", reg.model_version)
    champion = evaluate_champion.fn(model_name, data)
    assert champion.version == reg.model_version
    assert champion.metrics == pytest.approx(metrics)


def test_champion_that_cannot_score_the_rows_says_why(data, model_name) -> None:
    model = train_model.fn(data, "linear")
    dataset = Dataset(frame=data.x_train, source="s.csv", sha256="ef" * 32)
    reg = register_model.fn(
        model,
        data,
        dataset,
        {"r2": 0.1},
        model_name,
        "linear",
        None,
        "review_score",
        configure_mlflow(model_name),
    )
    mlflow.MlflowClient().set_registered_model_alias(model_name, "champion", reg.model_version)
    narrower = type(data)(
        ["price"], data.x_train[["price"]], data.x_test[["price"]], data.y_train, data.y_test
    )
    champion = evaluate_champion.fn(model_name, narrower)
    assert champion.metrics is None and "cannot score these rows" in champion.note


CANDIDATE = {"mse": 1.0, "rmse": 1.0, "mae": 0.8, "r2": 0.30}


def test_gate_threshold_fails_even_without_a_champion() -> None:
    decision = deployment_trigger.fn(
        CANDIDATE, DeploymentCriteria(metric="r2", threshold=0.5), None
    )
    assert not decision.passed
    assert decision.reason.startswith("r2 0.3000 misses the threshold (>= 0.5000) by 0.2000")


def test_gate_error_metrics_pass_when_at_or_below_threshold() -> None:
    passed = deployment_trigger.fn(
        CANDIDATE, DeploymentCriteria(metric="rmse", threshold=1.0), None
    )
    failed = deployment_trigger.fn(CANDIDATE, DeploymentCriteria(metric="mae", threshold=0.7), None)
    assert passed.passed and "no champion yet" in passed.reason
    assert (
        not failed.passed
        and "mae 0.8000 misses the threshold (<= 0.7000) by 0.1000" in failed.reason
    )


def test_gate_champion_beaten_and_not_beaten() -> None:
    criteria = DeploymentCriteria(metric="rmse", threshold=2.0)
    worse = ChampionScore("3", {**CANDIDATE, "rmse": 1.2})
    better = ChampionScore("3", {**CANDIDATE, "rmse": 0.9})
    beaten = deployment_trigger.fn(CANDIDATE, criteria, worse)
    kept = deployment_trigger.fn(CANDIDATE, criteria, better)
    assert beaten.passed and "champion v3 (rmse 1.2000, better by 0.2000)" in beaten.reason
    assert not kept.passed and "worse than champion v3 (rmse 0.9000) by 0.1000" in kept.reason
    tie = deployment_trigger.fn(CANDIDATE, criteria, ChampionScore("3", dict(CANDIDATE)))
    assert tie.passed and "rmse 1.0000, a tie" in tie.reason


def test_gate_can_ignore_the_champion_or_replace_one_that_cannot_score() -> None:
    better = ChampionScore("3", {**CANDIDATE, "r2": 0.9})
    ignore = DeploymentCriteria(must_beat_champion=False)
    assert deployment_trigger.fn(CANDIDATE, ignore, better).passed
    broken = ChampionScore("3", None, "champion v3 cannot score these rows (KeyError)")
    decision = deployment_trigger.fn(CANDIDATE, DeploymentCriteria(), broken)
    assert decision.passed and "cannot score" in decision.reason


def test_criteria_forbid_unknown_fields_and_metrics() -> None:
    with pytest.raises(ValueError, match="treshold"):
        DeploymentCriteria.model_validate({"metric": "r2", "treshold": 0.1})
    with pytest.raises(ValueError, match="metric"):
        DeploymentCriteria(metric="accuracy")  # type: ignore[arg-type]


def test_logged_params_are_the_saved_models_and_the_callers_model_is_unchanged(
    data, model_name
) -> None:
    model = train_model.fn(data, "random_forest", {"n_estimators": 5})
    assert model[-1].n_jobs == -1  # trained on every core
    reg = register_model.fn(
        model, data, Dataset(frame=data.x_train, source="s.csv", sha256="ab" * 32),
        evaluate_model.fn(model, data), model_name, "random_forest", {"n_estimators": 5},
        "review_score", configure_mlflow(model_name),
    )  # fmt: skip
    assert model[-1].n_jobs == -1  # the caller's model as it was
    params = mlflow.get_run(reg.run_id).data.params
    saved = mlflow.sklearn.load_model(reg.model_uri)[-1].get_params()
    assert params["n_jobs"] == str(saved["n_jobs"]) == "1" and params["trained_n_jobs"] == "-1"
