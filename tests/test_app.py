"""The Streamlit app under Streamlit's own test runner (`AppTest`), against real gunicorn model
servers started by the local deployer and MLflow on SQLite (the session's `versions`)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from blocks import MLflowModelDeployer
from ctcd.names import REFERENCE_PATH
from tests.conftest import SERVED_MODEL

pytestmark = pytest.mark.server

SCRIPT = str(Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py")


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CTCD_APP_MODEL", SERVED_MODEL)
    return AppTest.from_file(SCRIPT, default_timeout=60)


def _text(at: AppTest) -> str:
    parts = [e.value for e in (*at.markdown, *at.caption, *at.warning, *at.error, *at.info)]
    return "\n".join(str(p) for p in parts)


def _inputs(at: AppTest) -> dict[str, float]:
    return {n.label: n.value for n in at.number_input}


def _predict(at: AppTest) -> AppTest:
    return at.button[0].click().run()


def test_no_server_says_so_and_shows_the_deploy_command(app, versions, ctcd_home):
    at = app.run()
    assert not at.exception
    warning = at.warning[0].value
    assert f"No model server is running for '{SERVED_MODEL}'" in warning
    assert "continuous_deployment_pipeline(model_name='served-model'" in warning
    assert at.number_input.len == 0 and at.button.len == 0  # nothing to ask
    table = at.dataframe[0].value  # the registry is still there to look at
    assert {"1", "2", "3"} <= set(table["version"].astype(str))


def test_single_prediction_follows_swaps_and_a_stopped_server(app, versions, ctcd_home):
    deployer = MLflowModelDeployer()
    service = deployer.deploy_model(versions["good"])
    at = app.run()
    assert not at.exception, at.exception
    assert f"version **{versions['good'].model_version}**" in at.markdown[0].value
    assert service.prediction_url in at.markdown[0].value

    # Ranges and defaults come from the training sample stored with the served version.
    path = mlflow.artifacts.download_artifacts(
        run_id=versions["good"].run_id, artifact_path=REFERENCE_PATH
    )
    sample = pd.read_parquet(path)
    price = at.number_input(key="feature:price")
    assert price.min == sample["price"].min() and price.max == sample["price"].max()
    assert price.value == sample["price"].median()
    assert len(at.number_input) == 12

    price.set_value(float(sample["price"].quantile(0.9)))
    at.number_input(key="feature:payment_installments").set_value(6.0)
    _predict(at)
    row = pd.DataFrame([_inputs(at)])
    assert row["payment_installments"][0] == 6.0
    expected = service.predict(row)[0]
    assert at.session_state["prediction"]["score"] == expected
    assert at.metric[0].value == f"{expected:.2f}"

    # A new version deployed while the page is open answers the next request.
    swapped = deployer.deploy_model(versions["better"])
    assert swapped.prediction_url == service.prediction_url
    _predict(at)
    assert not at.exception
    new = versions["better"].model_version
    assert f"version **{new}**" in at.markdown[0].value
    assert at.session_state["prediction"] == {"score": swapped.predict(row)[0], "version": new}
    assert swapped.predict(row)[0] != expected  # a different model answered

    # A rollout opened while the page is open is shown with what it means for the answers.
    from ctcd.rollout import RolloutPolicy

    deployer.deploy_model(versions["good"], rollout=RolloutPolicy(mode="shadow"))
    at.run()
    info = " ".join(i.value for i in at.info)
    assert f"shadow of v{versions['good'].model_version} beside v{new}" in info, info
    assert f"answers come from version {new}" in info
    assert f"ctcd models rollout status {service.uuid[:8]}" in info
    deployer.abort_rollout(service.uuid)

    # The server stops between two predictions: the next one says so, and how to restart it.
    deployer.stop_model_server(service.uuid)
    _predict(at)
    assert not at.exception
    assert "is inactive" in at.warning[0].value
    assert f"ctcd models start {service.uuid[:8]}" in at.warning[0].value
    assert at.metric.len == 0


def _upload(at: AppTest, name: str, frame: pd.DataFrame) -> AppTest:
    at.file_uploader[0].set_value((name, frame.to_csv(index=False).encode(), "text/csv"))
    return at.run()


def test_batch_upload_good_and_bad_columns(app, versions, ctcd_home, small_table):
    service = MLflowModelDeployer().deploy_model(versions["good"])
    at = app.run()
    rows = small_table.head(40)
    names = [n.label for n in at.number_input]
    good = rows[[*names, "review_score"]]
    _upload(at, "orders.csv", good)
    assert not at.exception and not at.error
    result = at.dataframe[0].value
    assert list(result["predicted_review_score"]) == pytest.approx(service.predict(good[names]))
    assert list(result["review_score"]) == list(good["review_score"])
    assert at.get("download_button")  # the same table as a CSV download

    bad = rows[[*names[2:], "order_id", "review_score"]]
    _upload(at, "wrong.csv", bad)
    assert not at.exception
    message = at.error[0].value
    assert f"missing columns: {names[0]}, {names[1]}" in message
    assert "unexpected columns: order_id" in message

    text = good.assign(price=["cheap", *good["price"][1:]])
    _upload(at, "text.csv", text)
    assert "column 'price' holds values that are not numbers, e.g. 'cheap'" in at.error[0].value

    at.file_uploader[0].set_value(("empty.csv", b"", "text/csv"))
    at.run()
    assert not at.exception and "cannot be read as a CSV file" in at.error[0].value


def test_model_tab_shows_the_registry_and_the_served_versions_plots(app, versions, ctcd_home):
    MLflowModelDeployer().deploy_model(versions["better"])
    at = app.run()
    table = at.dataframe[0].value
    served = table[table["serving"] == "yes"]
    assert list(served["version"].astype(str)) == [versions["better"].model_version]
    assert set(table.columns) >= {"mse", "rmse", "mae", "r2", "gate", "aliases"}
    run = mlflow.get_run(versions["better"].run_id)
    assert served["r2"].iloc[0] == pytest.approx(run.data.metrics["r2"])
    images = at.get("image")  # predicted vs actual, residuals, feature importances
    assert sorted(c for image in images for c in image.captions) == [
        "feature importance",
        "predicted vs actual",
        "residuals",
    ]
    assert "impurity" in _text(at)
