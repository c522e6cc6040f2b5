"""The evaluation report: plots logged to MLflow (read back and decoded as PNGs) and the
markdown artifact of the flow run (read back from Prefect's API, the test harness)."""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from ctcd.names import FLOW_RUN_TAG, GATE_TAG
from ctcd.sample import generate
from flows.continuous_deployment import continuous_deployment_pipeline
from flows.data import Dataset, clean_data
from flows.evaluation import plot_evaluation
from flows.model import train_model
from flows.training import training_pipeline
from tests.conftest import FAST_RF

pytestmark = pytest.mark.server

PLOTS = {"predicted_vs_actual.png", "residuals.png", "feature_importance.png"}


def _images(run_id: str) -> dict[str, bytes]:
    client = mlflow.MlflowClient()
    images = {}
    for item in client.list_artifacts(run_id, "evaluation"):
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=item.path)
        images[Path(item.path).name] = Path(local).read_bytes()
    return images


def _check_png(name: str, data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", name
    width, height = image.size
    assert 400 <= width <= 1200 and 250 <= height <= 900, (name, image.size)
    assert 10_000 < len(data) < 200_000, (name, len(data))
    darkest, lightest = image.convert("L").getextrema()
    assert darkest < 100 and lightest > 200, name  # something is drawn on a light page


def _report(run_id: str) -> str:
    flow_run_id = mlflow.get_run(run_id).data.tags[FLOW_RUN_TAG]
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert artifact.type == "markdown"
    return str(artifact.data)


def test_plots_are_logged_and_the_report_compares_with_the_champion(
    small_csv, model_name, ctcd_home
):
    first = training_pipeline(
        data_path=small_csv,
        model_name=model_name,
        model_type="gradient_boosting",
        model_params={"max_iter": 30},
    )
    images = _images(first.run_id)
    assert set(images) == PLOTS
    for name, data in images.items():
        _check_png(name, data)
    importance = mlflow.get_run(first.run_id).data.tags["ctcd.feature_importance"]
    assert importance.startswith("permutation")
    report = _report(first.run_id)
    assert "**Gate:** not evaluated (training only)" in report
    assert f"| r2 | {first.metrics['r2']:.4f} |\n" in report  # no champion column yet

    mlflow.MlflowClient().set_registered_model_alias(model_name, "champion", first.model_version)
    second = continuous_deployment_pipeline(
        data_path=small_csv,
        model_name=model_name,
        model_params=FAST_RF,
        criteria={"metric": "r2", "threshold": 0.99},
    )
    assert not second.deployed and second.service is None
    assert set(_images(second.run_id)) == PLOTS
    report = _report(second.run_id)
    # The champion scored on the candidate's held-out rows: the same CSV gives the same
    # split, so its figures equal the ones logged when it was trained.
    assert "| metric (held-out 400 rows) | candidate v2 | champion v1 (same rows) |" in report
    for name in ("mse", "rmse", "mae", "r2"):
        row = f"| {name} | {second.metrics[name]:.4f} | {first.metrics[name]:.4f} |"
        assert row in report
    assert "**Gate:** refused: r2" in report and "misses the threshold" in report
    assert f"sha256 `{second.data_sha256}`" in report
    assert (
        f"`{second.run_id}`" in report
        and f"#/experiments/{mlflow.get_run(second.run_id).info.experiment_id}/runs/{second.run_id}"
        in report
    )
    assert "`evaluation/feature_importance.png`" in report and "impurity" in report
    gate = mlflow.MlflowClient().get_model_version(model_name, second.model_version).tags
    assert gate[GATE_TAG].startswith("refused: r2")


def test_a_linear_model_gets_no_importance_plot():
    data = clean_data.fn(Dataset(frame=generate(n_rows=300, seed=5), source="s", sha256="0"))
    plots = plot_evaluation.fn(train_model.fn(data, "linear"), data, "review_score")
    assert set(plots.images) == PLOTS - {"feature_importance.png"}
    assert plots.importance is None and plots.rows == len(data.x_test)


def test_the_report_shows_where_to_post_and_links_only_to_a_page_that_opens(
    small_csv, model_name, ctcd_home
) -> None:
    """The prediction URL takes POST only: a link to it opened {"detail":"Method Not Allowed"}.
    The report shows it as code to POST to; its one link (what the server serves) opens."""
    import re

    import httpx

    result = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear"
    )
    assert result.deployed
    url = result.service.prediction_url
    report = _report(result.run_id)
    assert f"**Serving:** POST requests to `{url}`" in report
    links = re.findall(r"\]\((http[^)]+)\)", report.split("**Serving:**")[1].split("\n")[0])
    assert links == [url.removesuffix("/invocations") + "/metadata"]
    assert httpx.get(url, timeout=10).status_code == 405  # why it is not a link
    page = httpx.get(links[0], timeout=10)
    assert page.status_code == 200 and page.json()["model_version"] == result.model_version
