"""The drift monitor: PSI and KS per feature, the column check, and the flow end to end
(artifact, served-model error, and the `ctcd.drift.detected` event reaching Prefect)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from ctcd.exceptions import DataContractError
from ctcd.names import DRIFT_DETECTED
from ctcd.reference import Reference
from ctcd.sample import generate
from flows.continuous_deployment import continuous_deployment_pipeline
from flows.data import Dataset, clean_data
from flows.drift import compute_drift, drift_monitor, psi

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference(small_table) -> Reference:
    data = clean_data.fn(Dataset(frame=small_table, source="s.csv", sha256="0" * 64))
    frame = pd.concat([data.x_train, data.y_train], axis=1)
    return Reference("m", "1", frame)


def _batch(frame: pd.DataFrame) -> Dataset:
    return Dataset(frame=frame, source="batch.csv", sha256="1" * 64)


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = pd.Series(rng.normal(0, 1, 5_000)), pd.Series(rng.normal(0, 1, 5_000))
    assert psi(a, b) < 0.02
    assert psi(a, pd.Series(rng.normal(1.0, 1, 5_000))) > 0.5
    assert psi(pd.Series([1.0] * 10), pd.Series([1.0] * 5)) == 0.0


def test_same_distribution_does_not_drift(reference) -> None:
    report = compute_drift.fn(
        reference, _batch(generate(2_000, seed=11)), "review_score", 0.2, 0.01
    )
    assert report.rows == 2_000 and len(report.features) == 12
    assert report.drifted_features == []


def test_shifted_features_drift_and_are_named(reference) -> None:
    batch = generate(2_000, seed=11)
    batch["price"] *= 3
    batch["freight_value"] += 40
    report = compute_drift.fn(reference, _batch(batch), "review_score", 0.2, 0.01)
    assert report.drifted_features == ["price", "freight_value"]
    price = next(f for f in report.features if f.feature == "price")
    assert price.psi > 0.2 and price.ks_pvalue < 0.01


def test_columns_that_differ_from_the_reference_are_named(reference) -> None:
    batch = generate(500, seed=11).drop(columns=["price"]).assign(basket_size=1.0)
    with pytest.raises(DataContractError, match="missing feature column.*price") as info:
        compute_drift.fn(reference, _batch(batch), "review_score", 0.2, 0.01)
    assert "basket_size" in str(info.value)


def test_drift_monitor_end_to_end(small_csv, model_name, ctcd_home, tmp_path: Path) -> None:
    continuous_deployment_pipeline(data_path=small_csv, model_name=model_name, model_type="linear")
    steady = tmp_path / "steady.csv"
    generate(2_000, seed=11).to_csv(steady, index=False)
    calm = drift_monitor(data_path=str(steady), model_name=model_name)
    assert not calm.drifted and calm.served_metrics is not None and calm.served_metrics["r2"] > 0

    shifted = tmp_path / "shifted.csv"
    generate(2_000, seed=12).assign(price=lambda f: f["price"] * 3).to_csv(shifted, index=False)
    report = drift_monitor(data_path=str(shifted), model_name=model_name)
    assert report.drifted_features == ["price"]

    resource = EventResourceFilter(id=[f"ctcd.model.{model_name}"])
    wanted = EventFilter(event=EventNameFilter(name=[DRIFT_DETECTED]), resource=resource)
    events = []
    with get_client(sync_client=True) as client:
        for _ in range(50):  # events are written asynchronously
            # limit: Prefect 3.9.1 client defaults to 100, which its server refuses (max 50)
            events = client.read_events(filter=wanted, limit=10).events
            if events:
                break
            time.sleep(0.2)
    assert len(events) == 1
    assert events[0].payload["drifted_features"] == ["price"]


def _serve(service, frame: pd.DataFrame, per_request: int = 25) -> None:
    for start in range(0, len(frame), per_request):
        service.predict(frame.iloc[start : start + per_request])


def _logged(model_name: str, rows: int) -> None:
    from blocks.lookup import find_service

    for _ in range(100):  # the workers write their buffers every 2 s
        if find_service(model_name).prediction_log_rows.get("written_rows", 0) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"the prediction log did not reach {rows} rows")


def _drift_events(model_name: str) -> list:
    resource = EventResourceFilter(id=[f"ctcd.model.{model_name}"])
    wanted = EventFilter(event=EventNameFilter(name=[DRIFT_DETECTED]), resource=resource)
    with get_client(sync_client=True) as client:
        return client.read_events(filter=wanted, limit=10).events


def test_drift_monitor_on_what_the_server_served(small_csv, model_name, ctcd_home) -> None:
    """No data_path: the monitor reads the running server's prediction log of the window,
    compares its features and its predictions with the champion's reference, says when the
    window holds too few rows (and emits nothing), and names the shifted feature."""
    from blocks.lookup import find_service
    from flows.data import feature_frame

    continuous_deployment_pipeline(data_path=small_csv, model_name=model_name, model_type="linear")
    service = find_service(model_name)
    _serve(service, feature_frame(generate(600, seed=21), "review_score"))
    _logged(model_name, 600)

    few = drift_monitor(model_name=model_name, window="1h", min_rows=5_000)
    assert few.too_few_rows and few.rows == 600 and not few.features
    calm = drift_monitor(model_name=model_name, window="1h", min_rows=300)
    assert calm.rows == 600 and "served" in calm.source
    assert not calm.drifted, (calm.drifted_features, calm.output)
    assert calm.output is not None and calm.output.feature == "prediction"
    time.sleep(1.0)
    assert _drift_events(model_name) == []  # neither a small window nor calm traffic emits

    shifted = feature_frame(generate(1_200, seed=22), "review_score").assign(
        price=lambda f: f["price"] * 4
    )
    _serve(service, shifted)
    _logged(model_name, 1_800)
    report = drift_monitor(model_name=model_name, window="1h", min_rows=300)
    assert report.rows == 1_800
    assert "price" in report.drifted_features
    assert report.output is not None and report.output.drifted  # a linear model: price moves it
    events = []
    for _ in range(50):
        if events := _drift_events(model_name):
            break
        time.sleep(0.2)
    assert len(events) == 1 and events[0].payload["output_drift"] is True
    assert "price" in events[0].payload["drifted_features"]


def test_a_window_must_be_a_duration() -> None:
    from flows.drift import parse_window

    assert parse_window("24h").total_seconds() == 86_400
    assert parse_window("90s").total_seconds() == 90
    with pytest.raises(ValueError, match="e.g. '24h'"):
        parse_window("yesterday")
