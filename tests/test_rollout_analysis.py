"""How `rollout_analysis` decides an open rollout: the rules on given evidence (no server), and
the flow on a real local server."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import mlflow
import pytest

from blocks import MLflowModelDeployer
from ctcd.names import CHALLENGER, ROLLOUT_TAG
from ctcd.rollout import OpenRollout, RolloutPolicy
from flows.rollout_evidence import Criteria, Evidence, decide

NOW = 1_800_000_000.0


def _rollout(mode: str = "shadow", opened: float = NOW - 600) -> OpenRollout:
    percent = 100 if mode == "shadow" else 20
    return OpenRollout(mode=mode, percent=percent, champion_version="1", candidate_version="2",
                       candidate_uri="models:/m/2", since=opened)  # fmt: skip


def _evidence(role: str = "shadow", **changes) -> Evidence:
    base = Evidence(
        requests={"champion": 1000, role: 1000}, failures={"champion": 0, role: 0},
        latency_p99_ms={"champion": 10.0, role: 12.0}, output_shift=0.1,
    )  # fmt: skip
    return base.model_copy(update=changes)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "with_outcomes", "decision", "words"),
    [
        ({}, False, "promote", "guardrails passed"),
        ({"failures": {"champion": 0, "shadow": 30}}, False, "rollback", "failed 30 of 1000"),
        ({"failures": {"champion": 20, "shadow": 25}}, False, "promote", "guardrails passed"),
        ({"requests": {"champion": 1000, "shadow": 50}}, False, "wait", "50 of 200"),
        ({"latency_p99_ms": {"champion": 10.0, "shadow": 25.0}}, False, "rollback", "p99"),
        ({"output_shift": 0.9}, False, "rollback", "outputs differ"),
        (
            {
                "output_shift": 0.9,
                "outcomes": {"champion": 300, "shadow": 300},
                "live_mae": {"champion": 1.0, "shadow": 0.8},
                "p_value": 1e-9,
                "test": "Wilcoxon",
            },
            True,
            "promote",
            "better",
        ),
        (
            {
                "outcomes": {"champion": 300, "shadow": 300},
                "live_mae": {"champion": 1.0, "shadow": 1.2},
                "p_value": 1e-9,
                "test": "Wilcoxon",
            },
            True,
            "rollback",
            "worse",
        ),
        (
            {
                "outcomes": {"champion": 300, "shadow": 300},
                "live_mae": {"champion": 1.0, "shadow": 1.01},
                "p_value": 0.4,
                "test": "Wilcoxon",
            },
            True,
            "wait",
            "not significantly",
        ),
        (
            {
                "outcomes": {"champion": 300, "shadow": 300},
                "live_mae": {"champion": 1.0, "shadow": 0.99},
                "p_value": 0.4,
                "test": "Wilcoxon",
            },
            True,
            "promote",
            "not worse",
        ),
        ({"outcomes": {"champion": 30, "shadow": 30}}, True, "wait", "30 of 100 labelled"),
    ],
)
def test_the_rules(changes, with_outcomes, decision, words) -> None:
    got, reason = decide(_rollout(), _evidence(**changes), Criteria(), with_outcomes, now=NOW)
    assert (got, words in reason) == (decision, True), reason


@pytest.mark.unit
def test_too_little_evidence_for_too_long_rolls_back() -> None:
    old = _rollout(opened=NOW - 3 * 3600)
    thin = _evidence(requests={"champion": 1000, "shadow": 10})
    decision, reason = decide(old, thin, Criteria(), False, now=NOW)
    assert decision == "rollback" and "not enough evidence after 180 min" in reason


@pytest.mark.server
def test_the_flow_waits_then_carries_out_a_decision_made_elsewhere(versions, ctcd_home):
    from flows.rollout import rollout_analysis

    deployer = MLflowModelDeployer(log_flush_s=0.5)
    good, better = versions["good"], versions["better"]
    record = deployer.deploy_model(good)
    try:
        assert rollout_analysis(model_name=good.model_name).decision is None  # none open
        deployer.deploy_model(better, rollout=RolloutPolicy(mode="canary", traffic_percent=50))
        folder = Path(record.local.runtime_dir, "models", good.model_version)
        body = (folder / "serving_input_example.json").read_bytes()
        with httpx.Client(timeout=30) as client:
            for i in range(40):
                headers = {"Content-Type": "application/json", "X-Request-ID": f"f{i}"}
                assert client.post(record.prediction_url, content=body, headers=headers).is_success
        time.sleep(1.5)  # the log's next flush
        waiting = rollout_analysis(model_name=good.model_name)
        assert waiting.decision == "wait" and not waiting.acted
        assert waiting.evidence is not None and waiting.evidence.requests["canary"] > 5
        assert deployer.get_model_server(record.uuid).rollout is not None
        done = rollout_analysis(model_name=good.model_name, decision="rollback")
        assert done.acted and "decided outside ctcd" in done.reason
        after = deployer.get_model_server(record.uuid)
        assert after.rollout is None and after.model_version == good.model_version
        client = mlflow.MlflowClient()
        tags = client.get_model_version(good.model_name, better.model_version).tags
        assert tags[ROLLOUT_TAG].startswith("rolled back: decided outside ctcd")
        alias = client.get_model_version_by_alias(good.model_name, CHALLENGER)
        assert str(alias.version) == better.model_version
    finally:
        deployer.delete_model_server(record.uuid)
