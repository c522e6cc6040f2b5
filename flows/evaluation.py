"""Evaluation plots logged with every training run: predicted vs actual, residuals and, for
tree models, feature importances.

They are drawn on a fixed sample of the held-out rows (`PLOT_ROWS`), so they cost a fraction
of a second even on the 115,609-row table, with matplotlib's object-oriented API on its Agg
canvas (no pyplot: no global figure state, no GUI backend). matplotlib is imported with
this module (about 0.3 s of CPU): in a one-shot run that happens while `import flows` waits
for its Prefect API server to start, not inside the training run.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import Pipeline

from ctcd.names import EVALUATION_DIR, IMPORTANCE_TAG
from flows.data import CleanData

PLOT_ROWS = 2_000
PERMUTATION_ROWS = 500
PERMUTATION_REPEATS = 2
SEED = 42
DPI = 90
DISCRETE_LEVELS = 10  # a target with this few distinct values is drawn as one box per value


@dataclass(frozen=True)
class EvaluationPlots:
    """PNG images by file name, how the importances were measured, and on how many rows."""

    images: dict[str, bytes] = field(repr=False)
    importance: str | None
    rows: int

    def describe(self) -> str:
        names = ", ".join(f"`{EVALUATION_DIR}/{name}`" for name in self.images)
        note = f"; feature importance: {self.importance}" if self.importance else ""
        return f"{names} (on {self.rows:,} held-out rows{note})"


def _figure(width: float = 6.0, height: float = 4.5, left: float = 0.12) -> Any:
    """A figure with fixed margins: a layout engine would double the drawing time."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    figure.subplots_adjust(left=left, right=0.97, bottom=0.13, top=0.91, wspace=0.3)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", pil_kwargs={"compress_level": 3})
    return buffer.getvalue()


def _predicted_vs_actual(actual: pd.Series, predicted: np.ndarray, target: str) -> bytes:
    figure = _figure()
    axes = figure.add_subplot()
    levels = np.sort(actual.unique())
    if len(levels) <= DISCRETE_LEVELS:
        groups = [predicted[(actual == level).to_numpy()] for level in levels]
        axes.boxplot(groups, positions=levels, widths=0.5, showfliers=False)
        axes.set_xticks(levels, [f"{level:g}" for level in levels])
    else:
        axes.scatter(actual, predicted, s=6, alpha=0.3)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="tab:red", linewidth=1, label="predicted = actual")
    axes.set(xlabel=f"actual {target}", ylabel=f"predicted {target}", title="Predicted vs actual")
    axes.legend(loc="upper left")
    return _png(figure)


def _residuals(actual: pd.Series, predicted: np.ndarray) -> bytes:
    residual = actual.to_numpy() - predicted
    figure = _figure(9.0, 4.0)
    left, right = figure.subplots(1, 2)
    left.scatter(predicted, residual, s=6, alpha=0.3)
    left.axhline(0, color="tab:red", linewidth=1)
    left.set(xlabel="predicted", ylabel="actual - predicted", title="Residuals vs predicted")
    right.hist(residual, bins=40, histtype="stepfilled")
    right.set(xlabel="actual - predicted", ylabel="rows", title="Residual distribution")
    return _png(figure)


def _permutation_importance(model: Pipeline, x: pd.DataFrame, y: pd.Series) -> pd.Series:
    """The drop in R² when one feature's values are shuffled, averaged over repeats.

    Like `sklearn.inspection.permutation_importance`, but every shuffled copy is scored in
    one `predict` call: measured 3-10x cheaper here for gradient boosting, whose every
    predict call starts a thread pool.
    """
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(SEED)
    copies = []
    for name in x.columns:
        for _ in range(PERMUTATION_REPEATS):
            shuffled = x.copy()
            shuffled[name] = rng.permutation(shuffled[name].to_numpy())
            copies.append(shuffled)
    scored = model.predict(pd.concat(copies, ignore_index=True))
    scored = scored.reshape(len(x.columns), PERMUTATION_REPEATS, len(x))
    base = r2_score(y, model.predict(x))
    drops = [base - np.mean([r2_score(y, p) for p in per_feature]) for per_feature in scored]
    return pd.Series(drops, index=x.columns)


def _importances(model: Pipeline, x: pd.DataFrame, y: pd.Series) -> tuple[pd.Series, str] | None:
    """Impurity-based importances where the estimator has them (random forest), permutation
    importances for gradient boosting, None for models that are not trees."""
    estimator = model[-1]
    if hasattr(estimator, "feature_importances_"):
        values = pd.Series(estimator.feature_importances_, index=x.columns)
        return values, "impurity (mean decrease in squared error over the trees, training rows)"
    if isinstance(estimator, HistGradientBoostingRegressor):
        rows = x.head(PERMUTATION_ROWS)
        kind = (
            f"permutation (drop in R² when a feature is shuffled, {len(rows):,} held-out "
            f"rows, {PERMUTATION_REPEATS} repeats)"
        )
        return _permutation_importance(model, rows, y.loc[rows.index]), kind
    return None


def _importance_chart(values: pd.Series, kind: str) -> bytes:
    ordered = values.sort_values()
    figure = _figure(7.0, 0.3 * len(ordered) + 1.5, left=0.35)
    axes = figure.add_subplot()
    axes.barh(ordered.index, ordered.to_numpy())
    axes.set(xlabel=kind.split(" (")[0] + " importance", title="Feature importance")
    return _png(figure)


@task(cache_policy=NO_CACHE)
def plot_evaluation(model: Pipeline, data: CleanData, target: str) -> EvaluationPlots:
    """Draw the evaluation plots on a fixed sample of the held-out rows."""
    x = data.x_test.sample(min(PLOT_ROWS, len(data.x_test)), random_state=SEED)
    actual = data.y_test.loc[x.index].astype("float64")
    predicted = np.asarray(model.predict(x), dtype="float64")
    images = {
        "predicted_vs_actual.png": _predicted_vs_actual(actual, predicted, target),
        "residuals.png": _residuals(actual, predicted),
    }
    found = _importances(model, x, actual)
    if found is not None:
        images["feature_importance.png"] = _importance_chart(*found)
    return EvaluationPlots(images, found[1] if found else None, len(x))


def log_plots(plots: EvaluationPlots) -> None:
    """Log the images into the active MLflow run under `evaluation/`."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        for name, image in plots.images.items():
            (Path(tmp) / name).write_bytes(image)
        mlflow.log_artifacts(tmp, artifact_path=EVALUATION_DIR)
    if plots.importance:
        mlflow.set_tag(IMPORTANCE_TAG, plots.importance)
