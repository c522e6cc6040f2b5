"""Every private API of MLflow and scikit-learn the model server relies on, in one place.

The server scores through MLflow's own scoring code and speeds up forests without changing a
result; both need a few names their libraries do not promise to keep. Each is wrapped here,
with the version it was checked against, and `tests/test_compat.py` checks each assumption on
the installed versions; `pyproject.toml` bounds both libraries from above
(`mlflow==3.17.*`, `scikit-learn<1.10`), so an upgrade is a deliberate change that runs those
tests first.
"""

from __future__ import annotations

import traceback
from typing import Any

from mlflow import pyfunc
from mlflow.pyfunc import PyFuncModel
from sklearn.ensemble._forest import ForestRegressor  # the forests' base (1.5-1.9)
from sklearn.pipeline import Pipeline

__all__ = ["ForestRegressor"]

# MLflow 3.17: the function of the scoring server that decodes a JSON body into model input.
# Exceptions raised below it are the body's fault; MLflow answers most with 400 but lets a few
# escape as 500s (`ctcd.serving.limits` answers those 400).
_PARSING = ("mlflow.pyfunc.scoring_server", "_parse_json_data")


def raised_while_parsing(exc: BaseException) -> bool:
    """Whether `exc` came from inside MLflow's decoding of a request body."""
    return any(
        (frame.f_globals.get("__name__"), frame.f_code.co_name) == _PARSING
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def validate_input(model: PyFuncModel, data: Any, params: dict[str, Any] | None) -> Any:
    """The model input as MLflow's `predict` checks it against the signature (the frame it
    would score), without scoring it (MLflow 3.17 `_validate_prediction_input`)."""
    meta: Any = model.metadata
    frame, _ = pyfunc._validate_prediction_input(
        data,
        params,
        meta.get_input_schema(),
        meta.get_params_schema(),
        model.loader_module,
    )
    return frame


def signature_from_type_hints(model: PyFuncModel) -> bool:
    """Whether the model's signature comes from Python type hints (such models take other
    input than a plain frame, so the server does not batch them)."""
    meta: Any = model.metadata
    return bool(meta._is_signature_from_type_hint() or meta._is_type_hint_from_example())


def sklearn_estimator(model: PyFuncModel) -> Any | None:
    """The scikit-learn estimator inside an MLflow sklearn-flavoured pyfunc, else None."""
    return getattr(model._model_impl, "sklearn_model", None)


def raw_predict(model: PyFuncModel) -> Any:
    """The flavour's own predict function, which MLflow's `predict` calls after checking the
    input against the signature (for input checked already)."""
    return model._predict_fn


def pipeline_transforms(pipeline: Pipeline) -> list[Any]:
    """The transforming steps of a Pipeline, as its `predict` applies them (skipping
    `passthrough`/None steps; scikit-learn 1.9 `Pipeline._iter`)."""
    return [step for _, _, step in pipeline._iter(with_final=False)]


def forest_input(forest: ForestRegressor, data: Any) -> Any:
    """The forest's own check of `data` before its trees see it (float32, validated once;
    scikit-learn 1.9 `BaseForest._validate_X_predict`)."""
    return forest._validate_X_predict(data)
