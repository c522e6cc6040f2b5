"""Rollouts on a real local server: a canary answers its share of requests, sticky by request
id; a shadow candidate scores copies off the request path; promote and abort swap in place;
a candidate that cannot load or that raises never costs a client a request; a deploy or a
promotion killed midway converges on what it wrote."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest

from blocks import MLflowModelDeployer, ServiceRecord
from ctcd.exceptions import ModelLoadError
from ctcd.loadgen import Load
from ctcd.rollout import RolloutPolicy, to_candidate
from tests.interrupt import eventually, killed_at
from tests.rollouts import (
    Answer,
    bodies,
    body,
    feature_rows,
    logged,
    role_counts,
    send_all,
    shadow_that_fails_on_some_rows,
)

pytestmark = pytest.mark.server

JSON = {"Content-Type": "application/json"}
CANARY = RolloutPolicy(mode="canary", traffic_percent=20)
WORKERS = 2
CONVERGE_S = 90.0  # bound for the server to converge after a kill (a loaded 2-core machine)


def _body(record: ServiceRecord) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    example = json.loads((folder / "serving_input_example.json").read_text())
    example["dataframe_split"]["data"] = example["dataframe_split"]["data"][:1]
    return json.dumps(example).encode()


def _example(record: ServiceRecord) -> bytes:
    folder = Path(record.local.runtime_dir, "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


def _load(record: ServiceRecord, name: str) -> Load:
    """Keep-alive clients sending the input example, each request with an id of its own."""
    return Load(record.prediction_url, _example(record), clients=2, request_ids=f"{name}-")


def _no_request_failed(load: Load, minimum: int = 20) -> None:
    stats = load.stats
    assert stats.requests > minimum, "the load generator barely ran"
    assert stats.failed == 0, (stats.errors, stats.resets)


def _served_by(deployer: MLflowModelDeployer, uuid: str, label: str) -> ServiceRecord | None:
    """The record once every worker serves `label` (a version, or `v1 + v2 (canary 20 %)`)."""
    record = deployer.get_model_server(uuid)
    ok = (
        record.status.value == "active"
        and record.live_workers == WORKERS
        and set(record.worker_versions.values()) == {label}
    )
    return record if ok else None


def _described(uuid: str) -> dict[str, Any]:
    """What `ctcd models describe ID --json` prints."""
    from typer.testing import CliRunner

    from ctcd.cli import app

    done = CliRunner().invoke(app, ["models", "describe", uuid, "--json"])
    assert done.exit_code == 0, done.output
    described: dict[str, Any] = json.loads(done.output)
    return described


def test_a_canary_answers_its_share_sticky_by_request_id_then_is_promoted(versions, ctcd_home):
    """10,000 requests at 20 %: the candidate's share within 2 points, its own predictions,
    the same version for a resent id; opened and promoted under load, no request failed."""
    deployer = MLflowModelDeployer(workers=WORKERS)
    good, better = versions["good"].model_version, versions["better"].model_version
    record = deployer.deploy_model(versions["good"])
    with _load(record, "opening") as load:
        canary = deployer.deploy_model(versions["better"], rollout=CANARY)
    _no_request_failed(load)
    assert canary.uuid == record.uuid and canary.prediction_url == record.prediction_url
    assert canary.rollout is not None and canary.rollout.mode == "canary"
    assert (canary.rollout.champion_version, canary.rollout.candidate_version) == (good, better)
    assert canary.model_version == good and canary.rollout.percent == 20
    assert set(canary.worker_versions.values()) == {f"{good} + {better} (canary 20 %)"}

    one_row = _body(record)
    ids = [f"r{i}" for i in range(10_000)]
    answers = send_all(record.prediction_url, [(i, one_row) for i in ids])
    assert {a.status for a in answers.values()} == {200}
    share = sum(a.version == better for a in answers.values()) / len(ids)
    assert 0.18 <= share <= 0.22, share
    # each version answers with its own model and says which it is
    assert {(a.version, a.role) for a in answers.values()} == {
        (good, "champion"),
        (better, "canary"),
    }
    first = {a.version: a.predictions for a in answers.values()}
    assert first[good] != pytest.approx(first[better], rel=1e-3)
    for a in answers.values():
        assert a.predictions == pytest.approx(first[a.version], rel=1e-9)
    resent = ids[::10]
    for _ in range(2):
        again = send_all(record.prediction_url, [(i, one_row) for i in resent])
        assert {i: a.version for i, a in again.items()} == {i: answers[i].version for i in resent}

    with _load(record, "promoting") as load:
        promoted = deployer.promote_rollout(record.uuid)
    _no_request_failed(load)
    assert promoted.model_version == better and promoted.rollout is None
    seen = deployer.get_model_server(record.uuid)
    assert seen.rollout is None and seen.history[-2:] == [good, better]
    assert set(seen.worker_versions.values()) == {better}
    after = send_all(record.prediction_url, [(i, one_row) for i in ids[:500]])
    assert {(a.status, a.version, a.role) for a in after.values()} == {(200, better, "champion")}


def _same_answer(got: Answer, alone: Answer) -> bool:
    return (got.status, got.version, got.role) == (alone.status, alone.version, alone.role) and (
        got.predictions == pytest.approx(alone.predictions, rel=1e-9)
    )


def test_a_shadow_scores_copies_clients_get_the_champions_answer_alone(
    versions, ctcd_home, small_table
):
    """100 %: each client answer is the champion's (as before the shadow opened) and names it;
    the candidate's answers are logged as `shadow`, paired with the champion's row of the same
    request, and are the candidate's own; at 50 % exactly the ids in the share are copied;
    aborted under load, the champion serves alone again."""
    deployer = MLflowModelDeployer(workers=WORKERS)
    good, better = versions["good"], versions["better"]
    record = deployer.deploy_model(good)
    url, runtime = record.prediction_url, record.local.runtime_dir
    frames = bodies(feature_rows(small_table), 300, per_request=3)
    alone = send_all(url, [(f"alone-{i}", body(f)) for i, f in enumerate(frames)])
    assert {(a.status, a.version) for a in alone.values()} == {(200, good.model_version)}

    with _load(record, "opening") as load:
        shadow = deployer.deploy_model(better, rollout=RolloutPolicy(mode="shadow"))
    _no_request_failed(load)
    assert shadow.rollout is not None and shadow.rollout.mode == "shadow"
    assert shadow.rollout.percent == 100 and shadow.model_version == good.model_version
    label = f"{good.model_version} + {better.model_version} (shadow 100 %)"
    assert set(shadow.worker_versions.values()) == {label}
    copied = send_all(url, [(f"copied-{i}", body(f)) for i, f in enumerate(frames)])
    for i in range(len(frames)):
        assert _same_answer(copied[f"copied-{i}"], alone[f"alone-{i}"]), i

    rows = sum(len(f) for f in frames)
    log = logged(runtime, "copied-", 2 * rows)
    champion = log[log["role"] == "champion"]
    candidate = log[log["role"] == "shadow"]
    assert len(champion) == rows and len(candidate) == rows
    assert set(champion["model_version"]) == {good.model_version}
    assert set(candidate["model_version"]) == {better.model_version}
    paired = champion.merge(
        candidate, on=["request_id", "row"], suffixes=("", "_shadow"), validate="one_to_one"
    )
    assert len(paired) == rows
    features = list(frames[0].columns)
    for column in features:  # the same rows were scored
        assert (paired[column] == paired[f"{column}_shadow"]).all(), column
    paired["i"] = paired["request_id"].str.removeprefix("copied-").astype(int)
    paired = paired.sort_values(["i", "row"]).reset_index(drop=True)
    answered = [p for i in range(len(frames)) for p in copied[f"copied-{i}"].predictions]
    assert list(paired["prediction"]) == pytest.approx(answered, rel=1e-9)
    own = mlflow.pyfunc.load_model(better.model_uri).predict(pd.concat(frames))
    assert list(paired["prediction_shadow"]) == pytest.approx(list(own), rel=1e-9)
    assert not (paired["prediction"] == paired["prediction_shadow"]).all()

    half = deployer.deploy_model(better, rollout=RolloutPolicy(mode="shadow", shadow_percent=50))
    assert half.rollout is not None and half.rollout.percent == 50
    ids = [f"half-{i}" for i in range(1000)]
    answers = send_all(url, [(i, body(frames[0])) for i in ids])
    assert {(a.status, a.version, a.role) for a in answers.values()} == {
        (200, good.model_version, "champion")
    }
    in_share = {i for i in ids if to_candidate(i, 50)}
    assert 450 <= len(in_share) <= 550, len(in_share)
    log = logged(runtime, "half-", len(frames[0]) * (len(ids) + len(in_share)))
    assert set(log[log["role"] == "shadow"]["request_id"]) == in_share
    assert set(log[log["role"] == "champion"]["request_id"]) == set(ids)

    with _load(record, "aborting") as load:
        aborted = deployer.abort_rollout(record.uuid)
    _no_request_failed(load)
    assert aborted.rollout is None and aborted.model_version == good.model_version
    assert set(aborted.worker_versions.values()) == {good.model_version}
    answers = send_all(url, [(f"after-{i}", body(frames[0])) for i in range(200)])
    assert {(a.status, a.version) for a in answers.values()} == {(200, good.model_version)}


def test_candidates_that_fail_to_load_or_raise_on_some_rows_fail_no_client_request(
    versions, raising_version, ctcd_home, small_table
):
    """On one server: a canary whose version fails to load is refused (the deploy raises) and
    the champion serves alone, under load; then a shadow that raises on one request in four:
    every client is answered by the champion, the log's stats count the candidate's failures,
    and its other answers are logged."""
    deployer = MLflowModelDeployer(workers=WORKERS)
    good, broken = versions["good"].model_version, versions["broken"].model_version
    record = deployer.deploy_model(versions["good"])
    runtime = record.local.runtime_dir
    with (
        _load(record, "broken") as load,
        pytest.raises(ModelLoadError, match="failed to load or to score its input example"),
    ):
        deployer.deploy_model(versions["broken"], rollout=CANARY)
    _no_request_failed(load)
    after = deployer.get_model_server(record.uuid)
    assert after.rollout is None and after.model_version == good
    assert after.status.value == "active", after.status_message
    assert after.live_workers == WORKERS and set(after.worker_versions.values()) == {good}
    assert f"version {broken}" in str(after.last_error)
    one_row = _body(record)
    answers = send_all(record.prediction_url, [(f"after-{i}", one_row) for i in range(500)])
    assert {(a.status, a.version, a.role) for a in answers.values()} == {(200, good, "champion")}

    done = shadow_that_fails_on_some_rows(deployer, raising_version, feature_rows(small_table))
    assert done.record.rollout is not None
    assert done.record.rollout.candidate_version == raising_version.model_version
    assert role_counts(runtime, "shadow") == {"requests": 200, "failures": 50, "skipped": 0}
    assert len(done.failing) == done.failed_rows == 50
    sent = {f"raising-{i}" for i in range(done.requests)}
    log = logged(runtime, "raising-", 2 * 200 + 2 * 150)
    assert set(log[log["role"] == "shadow"]["request_id"]) == sent - done.failing
    assert set(log[log["role"] == "champion"]["request_id"]) == sent
    assert role_counts(runtime, "champion")["failures"] == 0
    from flows.rollout import rollout_analysis  # the analysis rolls it back on its failures

    decided = rollout_analysis(model_name=raising_version.model_name)
    assert decided.decision == "rollback" and decided.acted, decided.reason
    assert "the candidate failed 50 of 200 requests (25.0%" in decided.reason
    assert deployer.get_model_server(record.uuid).rollout is None
    answers = send_all(record.prediction_url, [(f"last-{i}", one_row) for i in range(50)])
    assert {(a.status, a.version) for a in answers.values()} == {(200, good)}


@pytest.mark.timeout(600)
def test_opening_and_promoting_a_canary_killed_midway_converge_with_no_failed_request(
    versions, ctcd_home
):
    """The deploying process SIGKILLed after it wrote the desired state (`desired-written`),
    opening a canary, then promoting it: each time the record shows the state written at once
    and the server converges on it by itself, under load, with no failed request."""
    deployer = MLflowModelDeployer(workers=WORKERS)
    good, better = versions["good"].model_version, versions["better"].model_version
    record = deployer.deploy_model(versions["good"])
    runtime = Path(record.local.runtime_dir)
    opening = (
        "from blocks import MLflowModelDeployer, DeploymentConfig;"
        "from ctcd.rollout import RolloutPolicy;"
        f"c = DeploymentConfig.model_validate_json({versions['better'].model_dump_json()!r});"
        f"MLflowModelDeployer(workers={WORKERS}).deploy_model(c, rollout=RolloutPolicy("
        "mode='canary', traffic_percent=20))"
    )
    promoting = (
        "from blocks import MLflowModelDeployer;"
        f"MLflowModelDeployer(workers={WORKERS}).promote_rollout({record.uuid!r})"
    )
    beside = f"{good} + {better} (canary 20 %)"
    one_row = _body(record)
    with _load(record, "killed") as load:
        assert killed_at(opening, "desired-written", runtime.parent) == runtime
        described = _described(record.uuid)
        assert described["model_version"] == good and described["rollout"] is not None
        rollout = described["rollout"]
        assert (rollout["mode"], rollout["percent"]) == ("canary", 20)
        assert (rollout["champion_version"], rollout["candidate_version"]) == (good, better)
        eventually(
            lambda: _served_by(deployer, record.uuid, beside),
            CONVERGE_S,
            f"{WORKERS} workers serving {beside} after the opening was killed",
        )
        answers = send_all(record.prediction_url, [(f"a{i}", one_row) for i in range(500)])
        assert Counter(a.version for a in answers.values()).keys() == {good, better}
        assert {a.status for a in answers.values()} == {200}

        assert killed_at(promoting, "desired-written", runtime.parent) == runtime
        described = _described(record.uuid)
        assert described["model_version"] == better and described["rollout"] is None
        settled = eventually(
            lambda: _served_by(deployer, record.uuid, better),
            CONVERGE_S,
            f"{WORKERS} workers serving {better} alone after the promotion was killed",
        )
        assert settled.rollout is None
        answers = send_all(record.prediction_url, [(f"b{i}", one_row) for i in range(500)])
        assert {(a.status, a.version) for a in answers.values()} == {(200, better)}
    _no_request_failed(load, 100)
    with httpx.Client(timeout=10) as client:
        meta = client.get(record.prediction_url.replace("/invocations", "/metadata")).json()
    assert str(meta["model_version"]) == better and "rollout" not in meta
