"""`record_outcomes`: labels that arrive later, joined by request id to what the real local
server logged; the live error beside the champion's offline one; the degraded event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from blocks.lookup import find_service
from ctcd.exceptions import DataContractError
from ctcd.names import PERFORMANCE_DEGRADED
from ctcd.sample import generate
from flows.continuous_deployment import continuous_deployment_pipeline
from flows.data import feature_frame
from flows.outcomes import record_outcomes

pytestmark = pytest.mark.server


def _events(model_name: str) -> list:
    resource = EventResourceFilter(id=[f"ctcd.model.{model_name}"])
    wanted = EventFilter(event=EventNameFilter(name=[PERFORMANCE_DEGRADED]), resource=resource)
    with get_client(sync_client=True) as client:
        return client.read_events(filter=wanted, limit=10).events


def test_outcomes_join_by_request_id_and_degradation_emits(
    small_csv, model_name, ctcd_home, tmp_path: Path
) -> None:
    continuous_deployment_pipeline(data_path=small_csv, model_name=model_name, model_type="linear")
    service = find_service(model_name)
    orders = generate(120, seed=31)
    features = feature_frame(orders, "review_score")
    with httpx.Client(timeout=30) as client:
        for i in range(len(features)):
            row = features.iloc[[i]]
            split = json.loads(row.to_json(orient="split", index=False))
            answer = client.post(
                service.prediction_url,
                json={"dataframe_split": split},
                headers={"X-Request-ID": f"order-{i}"},
            )
            assert answer.status_code == 200
    for _ in range(100):
        if find_service(model_name).prediction_log_rows.get("written_rows", 0) >= len(features):
            break
        time.sleep(0.2)

    # Labels days later: the true scores, by the id each order was scored under, plus five
    # outcomes of orders this server never scored.
    truth = pd.DataFrame({"request_id": [f"order-{i}" for i in range(len(orders))],
                          "review_score": orders["review_score"]})  # fmt: skip
    strays = pd.DataFrame({"request_id": [f"other-{i}" for i in range(5)], "review_score": 5})
    calm_path = tmp_path / "outcomes.csv"
    pd.concat([truth, strays]).to_csv(calm_path, index=False)
    calm = record_outcomes(str(calm_path), model_name=model_name, window="1h", margin=0.5)
    assert calm.rows == len(orders) and calm.unmatched_outcomes == 5
    assert calm.served_versions == [service.model_version] == [calm.champion_version]
    assert not calm.degraded and "within margin" in calm.reason
    assert calm.live_metrics["rmse"] > 0 and calm.champion_metrics["rmse"] > 0
    assert _events(model_name) == []

    # Every customer gave one star: the live error is far worse than the offline one.
    bad_path = tmp_path / "bad.csv"
    truth.assign(review_score=1.0).to_csv(bad_path, index=False)
    bad = record_outcomes(str(bad_path), model_name=model_name, window="1h", margin=0.1)
    assert bad.degraded and bad.live_metrics["rmse"] > 1.1 * bad.champion_metrics["rmse"]
    events = []
    for _ in range(50):
        if events := _events(model_name):
            break
        time.sleep(0.2)
    assert len(events) == 1 and events[0].payload["metric"] == "rmse"

    with pytest.raises(DataContractError, match="X-Request-ID"):
        truth.rename(columns={"request_id": "order_id"}).to_csv(tmp_path / "k.csv", index=False)
        record_outcomes(str(tmp_path / "k.csv"), key="order_id", model_name=model_name, window="1h")
