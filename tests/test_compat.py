"""Each private MLflow and scikit-learn API the model server relies on (`ctcd.serving.compat`)
still behaves as assumed on the installed versions: a library upgrade that breaks one fails here,
naming it, before it fails a request."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
import skops.io
from mlflow.models import infer_signature
from mlflow.pyfunc import scoring_server
from sklearn.ensemble import RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ctcd.serving import compat

pytestmark = pytest.mark.unit

COLUMNS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.normal(size=(60, 3)), columns=COLUMNS)


@pytest.fixture(scope="module")
def pipeline(frame: pd.DataFrame) -> Pipeline:
    model = Pipeline(
        [
            ("impute", SimpleImputer()),
            ("skip", "passthrough"),
            ("scale", StandardScaler()),
            ("forest", RandomForestRegressor(n_estimators=4, random_state=0)),
        ]
    )
    return model.fit(frame, frame["a"] * 2)


@pytest.fixture(scope="module")
def served(pipeline: Pipeline, frame: pd.DataFrame, tmp_path_factory) -> mlflow.pyfunc.PyFuncModel:
    """The pipeline saved and loaded as the server loads it (skops, MLflow's pyfunc loader)."""
    path = Path(tmp_path_factory.mktemp("model")) / "m"
    mlflow.sklearn.save_model(
        pipeline, str(path), signature=infer_signature(frame, pipeline.predict(frame)),
        input_example=frame.head(2), serialization_format="skops",
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)),
    )  # fmt: skip
    return mlflow.pyfunc.load_model(str(path))


def test_sklearn_estimator_and_raw_predict_are_the_flavours_own(served, pipeline, frame):
    estimator = compat.sklearn_estimator(served)
    assert isinstance(estimator, Pipeline) and len(estimator.steps) == len(pipeline.steps)
    np.testing.assert_array_equal(compat.raw_predict(served)(frame), pipeline.predict(frame))


def test_validate_input_checks_the_signature_without_scoring(served, frame):
    checked = compat.validate_input(served, frame.astype("float32"), None)
    assert list(checked.columns) == COLUMNS and all(checked.dtypes == "float64")
    with pytest.raises(mlflow.exceptions.MlflowException, match="b"):
        compat.validate_input(served, frame.drop(columns=["b"]), None)


def test_a_tabular_signature_is_not_from_type_hints(served):
    assert compat.signature_from_type_hints(served) is False


def test_pipeline_transforms_skip_passthrough_and_the_final_step(pipeline):
    steps = compat.pipeline_transforms(pipeline)
    assert [type(s).__name__ for s in steps] == ["SimpleImputer", "StandardScaler"]


def test_forest_input_is_the_forests_own_check(pipeline, frame):
    forest = pipeline.steps[-1][1]
    assert isinstance(forest, compat.ForestRegressor)
    checked = compat.forest_input(forest, frame.to_numpy())
    assert checked.dtype == np.float32 and checked.shape == frame.shape


def test_errors_inside_mlflows_body_parser_are_recognised():
    assert compat._PARSING[1] in vars(scoring_server)
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError) as info:
        scoring_server._parse_json_data(deep, {}, None)  # type: ignore[attr-defined]
    assert compat.raised_while_parsing(info.value)
    assert not compat.raised_while_parsing(ValueError("raised elsewhere"))
