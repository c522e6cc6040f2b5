"""The flows end to end under Prefect's test harness, with real MLflow and real servers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
)
from prefect.flow_engine import run_flow

from blocks import MLflowModelDeployer
from ctcd import exceptions as exc
from deployments.lookup import find_service_for_latest_run
from flows.continuous_deployment import continuous_deployment_pipeline, deploy_model_version
from flows.data import feature_frame
from flows.inference import inference_pipeline
from flows.training import training_pipeline
from tests.conftest import FAST_RF

pytestmark = pytest.mark.server


def _aliases(model_name: str) -> dict[str, str]:
    aliases = mlflow.MlflowClient().get_registered_model(model_name).aliases
    return {alias: str(version) for alias, version in aliases.items()}


def _versions(model_name: str) -> list[str]:
    found = mlflow.MlflowClient().search_model_versions(f"name='{model_name}'")
    return sorted(v.version for v in found)


def _served(url: str) -> dict:
    return httpx.get(url.replace("/invocations", "/metadata"), timeout=5).json()


def _log_line(flow_run_id: object, words: str, seconds: float = 30) -> str:
    """The flow run's log line holding `words` (logs reach the API shortly after the run)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            found = [entry.message for entry in logs if words in entry.message]
            if found or time.monotonic() > deadline:
                assert found, [entry.message for entry in logs]
                return found[0]
            time.sleep(0.5)


def test_training_pipeline_registers_a_version_with_report(small_csv, model_name, ctcd_home):
    state = training_pipeline(
        data_path=small_csv, model_name=model_name, model_params=FAST_RF, return_state=True
    )
    result = state.result()
    assert result.model_version == "1" and result["model_version"] == "1"
    # The run's log (the UI's Logs tab) says what it produced: metrics and the version.
    line = _log_line(state.state_details.flow_run_id, "Registered ")
    assert f"Registered {model_name} version 1 (MLflow run {result.run_id})" in line
    assert f"rmse {result.metrics['rmse']:.4f}" in line and f"r2 {result.metrics['r2']:.4f}" in line
    assert set(result.metrics) >= {"mse", "rmse", "mae", "r2"} and result.metrics["r2"] > 0
    again = training_pipeline(data_path=small_csv, model_name=model_name, model_params=FAST_RF)
    assert again.model_version == "2" and again.data_sha256 == result.data_sha256
    run = mlflow.get_run(result.run_id)
    assert run.data.params["n_estimators"] == "10"  # model_params are logged
    with get_client(sync_client=True) as client:
        key = f"ctcd-{model_name}".lower()
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    reports = " ".join(str(a.data) for a in artifacts)
    assert len(artifacts) == 2 and "not evaluated (training only)" in reports
    assert result.run_id in reports and again.run_id in reports


def test_first_deploy_honours_the_threshold(small_csv, model_name, ctcd_home):
    result = continuous_deployment_pipeline(
        data_path=small_csv,
        model_name=model_name,
        model_params=FAST_RF,
        criteria={"metric": "r2", "threshold": 0.99},
    )
    assert not result.deployed and result.service is None
    assert "misses the threshold (>= 0.9900)" in result.reason
    assert _aliases(model_name) == {"challenger": result.model_version}
    assert MLflowModelDeployer().find_model_server() == []


def test_deploy_update_in_place_and_refuse_a_worse_model(
    small_csv, small_table, model_name, ctcd_home
):
    first = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear"
    )
    assert first.deployed and first.service is not None
    assert "no champion yet" in first.reason
    rows = feature_frame(small_table.head(50), "review_score")
    body = '{"dataframe_split": ' + rows.to_json(orient="split", index=False) + "}"
    assert rows.isna().any().any()  # missing values travel as null and are imputed
    response = httpx.post(
        first.service.prediction_url,
        content=body,
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    local = mlflow.pyfunc.load_model(first.model_uri).predict(rows)
    assert response.json()["predictions"] == pytest.approx(list(local))

    second = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_params=FAST_RF
    )
    assert second.deployed, second.reason
    assert "at least as good as champion v1" in second.reason
    assert second.service.uuid == first.service.uuid
    assert second.service.prediction_url == first.service.prediction_url
    assert _served(second.service.prediction_url)["model_version"] == "2"
    assert len(MLflowModelDeployer().find_model_server()) == 1
    assert _aliases(model_name) == {"champion": "2"}

    third = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear"
    )
    assert not third.deployed
    assert "worse than champion v2" in third.reason and "on the same held-out rows" in third.reason
    assert third.service is not None and third.service.model_version == "2"
    assert _served(first.service.prediction_url)["model_version"] == "2"
    assert _aliases(model_name) == {"champion": "2", "challenger": "3"}


def _bad_inputs(tmp: Path, table: pd.DataFrame) -> list[tuple[str, dict, type[Exception]]]:
    (tmp / "empty.csv").write_bytes(b"")
    (tmp / "binary.csv").write_bytes(bytes(range(256)) * 64)
    table.head(10).to_csv(tmp / "few.csv", index=False)
    table.to_csv(tmp / "ok.csv", index=False)
    return [
        ("missing.csv", {}, exc.DataFileNotFoundError),
        ("empty.csv", {}, exc.EmptyDataError),
        ("binary.csv", {}, exc.UnreadableDataError),
        ("ok.csv", {"target": "satisfaction"}, exc.MissingTargetError),
        ("ok.csv", {"target": "customer_state"}, exc.NonNumericTargetError),
        ("few.csv", {}, exc.TooFewRowsError),
    ]


def test_bad_input_changes_nothing(small_csv, small_table, model_name, ctcd_home, tmp_path):
    served = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear"
    )
    before = (_versions(model_name), _aliases(model_name))
    pid = MLflowModelDeployer().find_model_server()[0].local.pid
    for name, kwargs, error in _bad_inputs(tmp_path, small_table):
        with pytest.raises(error) as info:
            continuous_deployment_pipeline(
                data_path=str(tmp_path / name), model_name=model_name, model_type="linear", **kwargs
            )
        assert name in str(info.value) or kwargs.get("target", "~") in str(info.value)
    assert (_versions(model_name), _aliases(model_name)) == before
    [record] = MLflowModelDeployer().find_model_server()
    assert record.local.pid == pid and record.status.value == "active"
    assert _served(served.service.prediction_url)["model_version"] == served.model_version


def test_inference_pipeline_uses_the_running_server(small_csv, small_table, model_name, ctcd_home):
    deployed = continuous_deployment_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear"
    )
    result = inference_pipeline(data_path=small_csv, model_name=model_name)
    assert result.rows == len(small_table) == len(result.predictions)
    assert result.service.uuid == deployed.service.uuid
    local = mlflow.pyfunc.load_model(deployed.model_uri).predict(
        feature_frame(small_table, "review_score")
    )
    assert result.predictions == pytest.approx(list(local))


def test_inference_without_a_server_says_what_to_do(small_csv, model_name, ctcd_home):
    with pytest.raises(exc.ServiceNotFoundError, match="ctcd models list"):
        inference_pipeline(data_path=small_csv, model_name=model_name)


def test_lookup_by_flow_and_by_deployment(small_csv, model_name, ctcd_home):
    params = {"data_path": small_csv, "model_name": model_name, "model_type": "linear"}
    result = continuous_deployment_pipeline(**params)
    by_flow = find_service_for_latest_run(flow_name="continuous-deployment-pipeline")
    assert by_flow.uuid == result.service.uuid

    name = f"t-{model_name}"[:60]
    deployment_id = continuous_deployment_pipeline.to_deployment(name=name).apply()
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=params)
    run_flow(continuous_deployment_pipeline, flow_run=flow_run, parameters=params)
    found = find_service_for_latest_run(deployment=f"continuous-deployment-pipeline/{name}")
    assert found.uuid == result.service.uuid and found.flow_run_id == str(flow_run.id)
    assert found.model_version == "2"
    with pytest.raises(ValueError, match="exactly one"):
        find_service_for_latest_run()


def test_deploy_model_version_from_a_training_run(small_csv, model_name, ctcd_home, tmp_path):
    state = training_pipeline(
        data_path=small_csv, model_name=model_name, model_type="linear", return_state=True
    )
    trained = state.result()
    run_id = str(state.state_details.flow_run_id)  # this run, not "the latest" in the session
    result = deploy_model_version(model_name=model_name, training_flow_run_id=run_id)
    assert result.deployed and result.model_version == trained.model_version
    assert result.metrics == pytest.approx(trained.metrics)
    assert _served(result.service.prediction_url)["model_version"] == trained.model_version
    assert _aliases(model_name) == {"champion": trained.model_version}
    with pytest.raises(exc.ModelConfigError, match="No version of .* was registered by"):
        deploy_model_version(model_name=model_name, training_flow_run_id="no-such-run")

    copy = tmp_path / "copy.csv"
    copy.write_bytes(Path(small_csv).read_bytes())
    again = training_pipeline(data_path=str(copy), model_name=model_name, model_type="linear")
    text = copy.read_text()
    copy.write_text(text + text.splitlines()[-1] + "\n")  # the table changes afterwards
    with pytest.raises(exc.DataError, match="changed since"):
        deploy_model_version(model_name=model_name, model_version=again.model_version)
