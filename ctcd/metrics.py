"""The regression metrics ctcd gates, monitors and compares on, and which way is better."""

from __future__ import annotations

from typing import Literal

import numpy as np

Metric = Literal["mse", "rmse", "mae", "r2"]
METRICS: tuple[Metric, ...] = ("mse", "rmse", "mae", "r2")
# Error metrics are better lower; r2 is better higher.
HIGHER_IS_BETTER: dict[str, bool] = {"mse": False, "rmse": False, "mae": False, "r2": True}


def score(y_true: object, y_pred: object) -> dict[str, float]:
    """mse, rmse, mae and r2 of predictions against the truth."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    mse = float(mean_squared_error(y_true, y_pred))
    return {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)),
    }


def at_least_as_good(metric: str, a: float, b: float) -> bool:
    """Whether `a` is at least as good as `b` on `metric`."""
    return a >= b if HIGHER_IS_BETTER[metric] else a <= b
