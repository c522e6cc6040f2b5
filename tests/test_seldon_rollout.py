"""Canary and shadow rollouts on a SeldonDeployment, against the same real components as
tests/test_seldon.py (the real kube-apiserver with Seldon Core's CRD, S3 on moto_server, MLflow,
rclone, Seldon Core's own model server), in a namespace of their own.

STAND-IN (tests/seldon_standin.py): Seldon's operator (a Deployment per predictor, named as the
real one names them; those of removed predictors deleted once the graph serves), the kubelet and
the ingress (Istio's weighted routes and mirror)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pandas as pd
import pytest

from blocks import DeploymentConfig, SeldonModelDeployer, ServiceState
from blocks.seldon_manifest import storage_uri
from ctcd.exceptions import ModelConfigError, ModelServerError
from ctcd.rollout import RolloutPolicy
from flows.data import feature_frame
from flows.training import training_pipeline
from tests import seldon_env as env
from tests.test_seldon import _deployer, _in_process, _sdep, seldon_components, train_two

NS = "ctcd-seldon-rollout"
MODEL = "seldon-rollout"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
CANARY = RolloutPolicy(mode="canary", traffic_percent=10)
SHADOW = RolloutPolicy(mode="shadow")
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def components(kube_api, tmp_path_factory) -> Iterator[dict[str, Any]]:
    with seldon_components(kube_api, tmp_path_factory, NS) as found:
        yield found


@pytest.fixture(scope="module")
def deployer(components, kube_api) -> Iterator[SeldonModelDeployer]:
    deployer = _deployer(components, kube_api)
    yield deployer
    for record in deployer.find_model_server():
        deployer.delete_model_server(record.uuid)


@pytest.fixture(scope="module")
def trained(components, small_csv) -> dict[str, DeploymentConfig]:
    """v1 linear, v2 a random forest (they answer differently), logged to the bucket."""
    return train_two(small_csv, MODEL)


@pytest.fixture(scope="module")
def features(small_table) -> pd.DataFrame:
    return feature_frame(small_table, "review_score").head(20)


def _predictors(kube_api: Any, name: str) -> list[dict[str, Any]]:
    """What `kubectl get sdep NAME -o yaml` shows under spec.predictors, in short."""
    shown = []
    for p in _sdep(kube_api, name, NS)["spec"]["predictors"]:
        short = {"name": p["name"], "modelUri": p["graph"]["modelUri"]}
        short |= {k: p[k] for k in ("traffic", "shadow") if k in p}
        shown.append(short)
    return shown


def _deployments(kube_api: Any, name: str) -> dict[str, dict[str, Any]]:
    """The Deployments Seldon's operator owns for SeldonDeployment `name`, by name."""
    with kube_api.client() as kube:
        found = kube.get(DEPLOYMENTS, params={"labelSelector": f"seldon-deployment-id={name}"})
    return {d["metadata"]["name"]: d for d in found.json()["items"]}


def _answers(url: str, row: pd.DataFrame, n: int) -> list[float]:
    body = {"data": {"names": list(row.columns), "ndarray": row.values.tolist()}}
    with httpx.Client(timeout=30) as http:
        return [float(http.post(url, json=body).json()["data"]["ndarray"][0]) for _ in range(n)]


def test_a_canary_is_a_second_predictor_with_traffic_weights_on_the_same_resource(
    deployer, trained, features, kube_api
) -> None:
    first = deployer.deploy_model(trained["v1"])
    name = str(first.kube.resource_name)
    record = deployer.deploy_model(trained["v2"], rollout=CANARY)
    assert (record.uuid, record.prediction_url) == (first.uuid, first.prediction_url)
    assert record.status == ServiceState.ACTIVE
    assert record.model_version == trained["v1"].model_version  # the champion still
    assert record.rollout is not None and record.rollout.mode == "canary"
    assert record.rollout.candidate_version == trained["v2"].model_version
    assert "canary of v" in record.status_message
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v1"]), "traffic": 90},
        {"name": "candidate", "modelUri": storage_uri(trained["v2"]), "traffic": 10},
    ]
    assert sorted(_deployments(kube_api, name)) == [
        f"{name}-candidate-0-model",
        f"{name}-default-0-model",
    ]
    found = deployer.find_model_server("p", "s", MODEL)
    assert [r.rollout for r in found] == [record.rollout]
    # Through the ingress both versions answer, the candidate about one request in ten.
    row = features.head(1)
    champion, candidate = _in_process(trained["v1"], row)[0], _in_process(trained["v2"], row)[0]
    assert champion != pytest.approx(candidate)
    answers = _answers(record.prediction_url, row, 200)
    by_candidate = sum(a == pytest.approx(candidate) for a in answers)
    by_champion = sum(a == pytest.approx(champion) for a in answers)
    assert by_candidate + by_champion == 200
    assert 0 < by_candidate < 50, by_candidate


def test_promote_leaves_one_predictor_on_the_candidates_model(
    deployer, trained, features, kube_api
) -> None:
    record = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(record.kube.resource_name)
    promoted = deployer.promote_rollout(record.uuid)
    assert (promoted.uuid, promoted.prediction_url) == (record.uuid, record.prediction_url)
    assert promoted.model_version == trained["v2"].model_version
    assert promoted.run_id == trained["v2"].run_id
    assert promoted.history == [trained["v1"].model_version, trained["v2"].model_version]
    assert promoted.rollout is None and promoted.status == ServiceState.ACTIVE
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v2"])}
    ]
    assert sorted(_deployments(kube_api, name)) == [f"{name}-default-0-model"]
    assert deployer.get_model_server(record.uuid).rollout is None
    assert promoted.predict(features) == pytest.approx(_in_process(trained["v2"], features))
    with pytest.raises(ModelConfigError, match="has no open rollout"):
        deployer.promote_rollout(record.uuid)


def test_abort_removes_the_candidate_and_leaves_the_champion_alone(
    deployer, trained, features, kube_api
) -> None:
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    pods = f"{name}-default-0-model"
    generation = _deployments(kube_api, name)[pods]["metadata"]["generation"]
    opened = deployer.deploy_model(trained["v1"], rollout=CANARY)
    assert opened.rollout is not None
    assert opened.rollout.candidate_version == trained["v1"].model_version
    aborted = deployer.abort_rollout(champion.uuid)
    assert aborted.rollout is None and aborted.status == ServiceState.ACTIVE
    assert (aborted.model_version, aborted.history) == (champion.model_version, champion.history)
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v2"])}
    ]
    deployments = _deployments(kube_api, name)
    assert sorted(deployments) == [pods]
    assert deployments[pods]["metadata"]["generation"] == generation  # never restarted
    assert aborted.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_a_shadow_predictor_gets_a_copy_of_every_request(
    deployer, trained, features, kube_api, components
) -> None:
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    record = deployer.deploy_model(trained["v1"], rollout=SHADOW)
    assert record.rollout is not None and record.rollout.mode == "shadow"
    assert record.rollout.percent == 100
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v2"])},
        {"name": "candidate", "modelUri": storage_uri(trained["v1"]), "shadow": True},
    ]
    shadow = _deployments(kube_api, name)[f"{name}-candidate-0-model"]
    assert shadow["spec"]["template"]["metadata"]["labels"]["seldon.io/shadow"] == "true"
    # Every client answer is the champion's; the shadow scored copies (answers dropped).
    row = features.head(1)
    answers = _answers(record.prediction_url, row, 20)
    assert answers == pytest.approx(_in_process(trained["v2"], row) * 20)
    route = components["ingress"].routes[(NS, name)]
    deadline = time.monotonic() + 10
    while route.mirrored < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert route.mirrored == 20
    closed = deployer.abort_rollout(record.uuid)
    assert closed.rollout is None
    assert [p["name"] for p in _predictors(kube_api, name)] == ["default"]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            RolloutPolicy(mode="shadow", shadow_percent=50),
            "Seldon Core mirrors every request to a shadow predictor; it cannot copy only 50 %",
        ),
        (RolloutPolicy(mode="canary", traffic_percent=0.4), "rounds to 0 %"),
        (RolloutPolicy(mode="canary", traffic_percent=99.6), "rounds to 100 %"),
    ],
)
def test_what_seldon_cannot_do_is_refused_and_nothing_changes(
    deployer, trained, kube_api, policy, message
) -> None:
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    before = _sdep(kube_api, name, NS)["metadata"]["resourceVersion"]
    with pytest.raises(ModelConfigError, match=message) as info:
        deployer.deploy_model(trained["v1"], rollout=policy)
    assert "shadow_percent" in str(info.value) or "traffic_percent" in str(info.value)
    assert _sdep(kube_api, name, NS)["metadata"]["resourceVersion"] == before
    assert deployer.get_model_server(champion.uuid).rollout is None


def test_a_block_asking_for_what_seldon_cannot_do_is_refused_when_made() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot copy only 30 %"):
        SeldonModelDeployer(base_url="http://127.0.0.1:9", rollout="shadow", shadow_percent=30)
    with pytest.raises(ValidationError, match="rounds to 0 %"):
        SeldonModelDeployer(base_url="http://127.0.0.1:9", rollout="canary", traffic_percent=0.2)
    kept = SeldonModelDeployer(base_url="http://127.0.0.1:9", rollout="canary", shadow_percent=30)
    assert kept.rollout_policy().describe() == "canary, 10 % of requests"


def test_a_replace_deploy_closes_an_open_rollout(deployer, trained, features, kube_api) -> None:
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    deployer.deploy_model(trained["v1"], rollout=CANARY)
    record = deployer.deploy_model(trained["v1"], rollout=RolloutPolicy(mode="replace"))
    assert record.rollout is None and record.model_version == trained["v1"].model_version
    assert record.history[-2:] == [trained["v2"].model_version, trained["v1"].model_version]
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v1"])}
    ]
    assert sorted(_deployments(kube_api, name)) == [f"{name}-default-0-model"]
    assert record.predict(features) == pytest.approx(_in_process(trained["v1"], features))


def test_a_candidate_not_ready_in_time_is_taken_out_again(
    deployer, trained, features, kube_api, components
) -> None:
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    components["operator"].paused = True  # as an operator that is down: no candidate pods
    try:
        with pytest.raises(ModelServerError, match="not ready after 3 s") as info:
            deployer.deploy_model(trained["v2"], rollout=CANARY, timeout=3)
    finally:
        components["operator"].paused = False
    assert f"no Deployment with {storage_uri(trained['v2'])} yet" in str(info.value)
    assert "The previous spec was put back" in " ".join(info.value.__notes__)
    after = deployer.get_model_server(champion.uuid)
    assert after.rollout is None and "not ready after 3 s" in str(after.last_error)
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v1"])}
    ]
    assert after.predict(features) == pytest.approx(_in_process(trained["v1"], features))


def test_a_candidate_that_never_serves_puts_the_spec_back_and_raises(
    deployer, trained, features, kube_api, small_csv
) -> None:
    import boto3

    broken = training_pipeline(data_path=small_csv, model_type="linear", model_name=MODEL)
    config = trained["v1"].model_copy(
        update={"model_version": broken.model_version, "model_uri": broken.model_uri}
    )
    bucket_path = storage_uri(config).removeprefix(f"s3://{env.BUCKET}/")
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    s3.put_object(Bucket=env.BUCKET, Key=f"{bucket_path}/model.skops", Body=b"not a model")
    champion = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(champion.kube.resource_name)
    with pytest.raises(ModelServerError, match="Seldon reports Failed: ") as info:
        deployer.deploy_model(config, rollout=CANARY)
    assert f"{name}-candidate-0-model: model server did not start" in str(info.value)
    assert "The previous spec was put back" in " ".join(info.value.__notes__)
    after = deployer.get_model_server(champion.uuid)
    assert after.rollout is None and after.model_version == champion.model_version
    assert "Failed" in str(after.last_error)
    assert _predictors(kube_api, name) == [
        {"name": "default", "modelUri": storage_uri(trained["v1"])}
    ]
    deadline = time.monotonic() + 30  # the operator deletes the candidate's Deployment
    while len(_deployments(kube_api, name)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(_deployments(kube_api, name)) == [f"{name}-default-0-model"]
    assert after.predict(features) == pytest.approx(_in_process(trained["v1"], features))
