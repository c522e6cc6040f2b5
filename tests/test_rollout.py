"""Rollouts on a real local server: a canary answers its share of requests, sticky by request
id; a shadow candidate scores copies off the request path; promote and abort swap in place."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from blocks import MLflowModelDeployer
from ctcd.rollout import RolloutPolicy

pytestmark = pytest.mark.server

JSON = {"Content-Type": "application/json"}


def _body(record) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    example = json.loads((folder / "serving_input_example.json").read_text())
    example["dataframe_split"]["data"] = example["dataframe_split"]["data"][:1]
    return json.dumps(example).encode()


def test_a_canary_answers_its_share_sticky_by_request_id_then_is_promoted(versions, ctcd_home):
    deployer = MLflowModelDeployer(workers=2)
    good, better = versions["good"], versions["better"]
    record = deployer.deploy_model(good)
    try:
        canary = deployer.deploy_model(
            better, rollout=RolloutPolicy(mode="canary", traffic_percent=20)
        )
        assert canary.uuid == record.uuid and canary.prediction_url == record.prediction_url
        assert (
            canary.rollout is not None and canary.rollout.candidate_version == better.model_version
        )
        body = _body(record)
        answered: dict[str, str] = {}
        with httpx.Client(timeout=30) as client:
            for i in range(2000):
                r = client.post(
                    record.prediction_url, content=body, headers=JSON | {"X-Request-ID": f"r{i}"}
                )
                assert r.status_code == 200, r.text
                answered[f"r{i}"] = r.headers["x-model-version"]
            share = sum(v == better.model_version for v in answered.values()) / len(answered)
            assert 0.18 <= share <= 0.22, share
            for i in range(0, 2000, 97):
                r = client.post(
                    record.prediction_url, content=body, headers=JSON | {"X-Request-ID": f"r{i}"}
                )
                assert r.headers["x-model-version"] == answered[f"r{i}"]
        promoted = deployer.promote_rollout(record.uuid)
        assert promoted.model_version == better.model_version and promoted.rollout is None
        seen = deployer.get_model_server(record.uuid)
        assert seen.rollout is None and seen.history[-2:] == [
            good.model_version,
            better.model_version,
        ]
        with httpx.Client(timeout=30) as client:
            r = client.post(record.prediction_url, content=body, headers=JSON)
            assert r.headers["x-model-version"] == better.model_version
    finally:
        deployer.delete_model_server(record.uuid)
