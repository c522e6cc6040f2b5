"""SeldonModelDeployer against real components: the real kube-apiserver and etcd (the session
`kube_api`, no controller manager) with Seldon Core v1.18.2's own CRD validating every
manifest; a real S3 API (moto_server) as the artifact root of a real MLflow tracking server,
where the flows log the models; rclone fetching them with the Secret the deployer wrote; and
Seldon Core's own Python model server answering the v1 protocol.

STAND-IN (tests/seldon_standin.py): the Seldon operator, the kubelet and the ingress, which
cannot run here. The operator stand-in writes what the real one writes, in its order, and
leaves a stale `Available` during a rollout as the real one does."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
import yaml
from prefect_kubernetes.credentials import KubernetesClusterConfig
from pydantic import SecretStr

from blocks import DeploymentConfig, ObjectStoreCredentials, SeldonModelDeployer, ServiceState
from ctcd.exceptions import ModelConfigError, ModelServerError
from flows.data import feature_frame
from flows.training import training_pipeline
from tests import seldon_env as env
from tests.conftest import FAST_RF
from tests.processes import stop_group
from tests.seldon_standin import SDEPS, StandInIngress, StandInSeldonOperator

NS = "ctcd-seldon"
MODEL = "seldon-model"
# The shared folder beside the repository (as .ci/run finds ../shared/k8s).
CRD = Path(__file__).resolve().parents[2] / "shared" / "k8s" / "seldondeployment-crd.yaml"
pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.timeout(900),
]  # the stand-in starts Seldon's server (~15 s) per rollout


@pytest.fixture(scope="module")
def components(kube_api, tmp_path_factory) -> Iterator[dict[str, Any]]:
    with seldon_components(kube_api, tmp_path_factory, NS) as found:
        yield found


@contextmanager
def seldon_components(
    kube_api: Any, tmp_path_factory: pytest.TempPathFactory, namespace: str
) -> Iterator[dict[str, Any]]:
    """moto S3 + an MLflow server with its artifact root in the bucket (the tracking URI while
    it lasts), the Seldon CRD and `namespace` on the real API server, the stand-in operator
    and ingress."""
    env.require(CRD.exists(), f"the Seldon CRD is missing at {CRD}")
    env.require(bool(env.shutil.which("rclone")), "rclone is missing (`apt-get install rclone`)")
    venv = env.seldon_venv()
    work = tmp_path_factory.mktemp("seldon")
    moto, s3_url = env.start_moto(work)
    tracking = None
    patch = pytest.MonkeyPatch()
    try:
        tracking, tracking_uri = env.start_mlflow(work, s3_url, f"s3://{env.BUCKET}/mlflow")
        variables = {**env.s3_environment(s3_url), "MLFLOW_TRACKING_URI": tracking_uri}
        for key, value in variables.items():
            patch.setenv(key, value)
        with kube_api.client() as kube:
            _install_crd(kube)
            created = kube.post("/api/v1/namespaces", json={"metadata": {"name": namespace}})
            assert created.status_code in (201, 409), created.text
        ingress = StandInIngress()
        operator = StandInSeldonOperator(kube_api, namespace, venv, work / "pods", ingress)
        (work / "pods").mkdir()
        operator.start()
        try:
            yield {
                "s3": s3_url, "operator": operator, "ingress": ingress, "work": work,
                "namespace": namespace,
            }  # fmt: skip
        finally:
            operator.stop()
            ingress.stop()
    finally:
        patch.undo()
        # configure_mlflow() pointed MLflow's process-wide URI at this module's server: restore.
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        if tracking is not None:
            stop_group(tracking, 10)
        stop_group(moto, 10)


def _install_crd(kube: httpx.Client) -> None:
    crd = yaml.safe_load(CRD.read_text())
    answer = kube.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
    assert answer.status_code in (201, 409), answer.text
    url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conditions = (kube.get(url).json().get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        time.sleep(0.2)
    raise AssertionError("the Seldon CRD was not established")


def _deployer(components: dict[str, Any], kube_api: Any, **changes: Any) -> SeldonModelDeployer:
    store = ObjectStoreCredentials(
        access_key_id=SecretStr(env.ACCESS_KEY),
        secret_access_key=SecretStr(env.SECRET_KEY),
        endpoint_url=components["s3"],
        provider="Other",
    )
    options: dict[str, Any] = {
        "cluster_config": KubernetesClusterConfig.from_file(kube_api.kubeconfig),
        "namespace": components["namespace"],
        "base_url": components["ingress"].url,
        "object_store": store,
        "deploy_timeout": 180,
        "cpu_request": "100m",
        "memory_limit": "1Gi",
        **changes,
    }
    return SeldonModelDeployer(**options)


@pytest.fixture(scope="module")
def deployer(components, kube_api) -> SeldonModelDeployer:
    return _deployer(components, kube_api)


@pytest.fixture(scope="module")
def trained(components, small_csv) -> dict[str, DeploymentConfig]:
    """v1 linear, v2 a random forest: logged to the bucket by `training_pipeline`."""
    return train_two(small_csv, MODEL)


def train_two(small_csv: str, model: str) -> dict[str, DeploymentConfig]:
    """v1 linear, v2 a random forest (they answer differently) of `model`, by the flow."""
    configs = {}
    for label, kind in (("v1", "linear"), ("v2", "random_forest")):
        result = training_pipeline(
            data_path=small_csv, model_type=kind, model_name=model,
            model_params=FAST_RF if kind == "random_forest" else None,
        )  # fmt: skip
        configs[label] = DeploymentConfig(
            model_name=model, model_version=result.model_version, model_uri=result.model_uri,
            pipeline_name="p", step_name="s", run_id=result.run_id,
        )  # fmt: skip
    return configs


@pytest.fixture(scope="module")
def features(small_table) -> pd.DataFrame:
    return feature_frame(small_table, "review_score").head(50)


def _in_process(config: DeploymentConfig, frame: pd.DataFrame) -> list[float]:
    return [float(x) for x in mlflow.pyfunc.load_model(config.model_uri).predict(frame)]


def _sdep(kube_api: Any, name: str, namespace: str = NS) -> dict[str, Any]:
    with kube_api.client() as kube:
        found = kube.get(f"{SDEPS.format(ns=namespace)}/{name}")
        assert found.status_code == 200, found.text
        return dict(found.json())


@pytest.mark.parametrize(
    "uri", ["/tmp/model", "file:///tmp/model", "mlflow-artifacts:/1/m/artifacts", "runs:/abc/model"]
)
def test_a_model_the_cluster_cannot_read_is_refused_before_any_api_call(uri) -> None:
    config = DeploymentConfig(
        model_name="m", model_version="1", model_uri=uri, pipeline_name="p", step_name="s"
    )
    nowhere = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }  # fmt: skip
    unreachable = SeldonModelDeployer(
        cluster_config=KubernetesClusterConfig(config=nowhere, context_name="c"),
        base_url="http://127.0.0.1:9",
    )
    with pytest.raises(ModelConfigError) as info:
        unreachable.deploy_model(config)  # a connection error would mean an API call
    message = str(info.value)
    assert uri in message and "s3://" in message and "--default-artifact-root" in message
    assert "Nothing was created on the cluster" in message


def test_deploy_creates_a_seldon_deployment_that_serves_the_model(
    deployer, trained, features, kube_api
) -> None:
    record = deployer.deploy_model(trained["v1"])
    name = record.kube.resource_name
    assert record.status == ServiceState.ACTIVE and record.protocol == "seldon"
    assert record.prediction_url == (f"{deployer.base_url}/seldon/{NS}/{name}/api/v1.0/predictions")
    # What the cluster holds: the CRD-validated resource, its labels and record annotation.
    sdep = _sdep(kube_api, str(name))
    assert sdep["metadata"]["uid"] == record.uuid
    assert sdep["metadata"]["labels"]["ctcd.io/model"] == MODEL
    graph = sdep["spec"]["predictors"][0]["graph"]
    assert graph["modelUri"].startswith(f"s3://{env.BUCKET}/mlflow/")
    assert graph["implementation"] == "MLFLOW_SERVER"
    assert graph["envSecretRefName"] == deployer.secret_name
    annotation = json.loads(sdep["metadata"]["annotations"]["ctcd.io/service-record"])
    assert annotation["model_version"] == trained["v1"].model_version
    # Seldon's own v1 server, through the ingress, answers with the model's own numbers.
    assert record.predict(features) == pytest.approx(_in_process(trained["v1"], features))
    rows = features.head(2)
    body = {"data": {"names": list(rows.columns), "ndarray": rows.values.tolist()}}
    answer = httpx.post(record.prediction_url, json=body).json()
    assert len(answer["data"]["ndarray"]) == 2


def test_a_new_version_patches_in_place_and_readiness_waits_for_the_rollout(
    deployer, trained, features, kube_api, components
) -> None:
    first = deployer.find_model_server("p", "s", MODEL)[0]
    name = str(first.kube.resource_name)
    created = _sdep(kube_api, name)["metadata"]["creationTimestamp"]
    seen: list[tuple[str, bool]] = []  # (status.state, new model serving yet) while deploying
    done = threading.Event()
    v2_uri = ""

    def watch() -> None:
        while not done.is_set():
            state = (_sdep(kube_api, name).get("status") or {}).get("state", "")
            serving = any(v2_uri and v2_uri in event for event in components["operator"].events)
            seen.append((state, serving))
            time.sleep(0.1)

    from blocks.seldon_manifest import storage_uri

    v2_uri = storage_uri(trained["v2"])
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        record = deployer.deploy_model(trained["v2"])
    finally:
        done.set()
        watcher.join()
    # The same resource, patched: same uuid, URL and creation time; the history grew.
    assert (record.uuid, record.prediction_url) == (first.uuid, first.prediction_url)
    assert _sdep(kube_api, name)["metadata"]["creationTimestamp"] == created
    assert record.history == [trained["v1"].model_version, trained["v2"].model_version]
    # The operator left the old `Available` while the new pods rolled out; deploy waited.
    assert ("Available", False) in seen, seen[:5]
    assert record.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_a_fresh_deployer_finds_the_service_by_its_labels(
    components, kube_api, trained, features
) -> None:
    from deployments.lookup import find_service

    _deployer(components, kube_api).save("seldon-test", overwrite=True)
    found = find_service(MODEL, deployer="seldon-model-deployer/seldon-test")
    assert found.backend == "seldon" and found.model_version == trained["v2"].model_version
    assert found.status == ServiceState.ACTIVE and found.kube.resource_name
    assert found.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_cli_stop_start_and_logs_on_a_seldon_service(
    components, kube_api, deployer, features, trained
) -> None:
    from typer.testing import CliRunner

    from ctcd.cli import app

    _deployer(components, kube_api).save("seldon-cli", overwrite=True)
    runner = CliRunner()
    opt = ["--deployer", "seldon-model-deployer/seldon-cli"]

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["models", *args, *opt])
        assert result.exit_code == 0, result.output
        return result.output

    listed = json.loads(cli("list", "--json", "--model", MODEL))
    assert [r["status"] for r in listed] == ["active"]
    uuid, url = listed[0]["uuid"], listed[0]["prediction_url"]
    assert cli("url", uuid[:8]).strip() == url
    assert '"protocol": "seldon"' in cli("describe", uuid[:8], "--json")
    assert "No predictor pods exist" in cli("logs", uuid[:8])  # no kubelet: no pods here
    assert cli("stop", uuid[:8]).startswith("inactive:")
    name = listed[0]["resource_name"]
    assert _sdep(kube_api, name)["spec"]["predictors"][0]["replicas"] == 0
    assert httpx.post(url, json={}).status_code == 503  # no endpoints behind the ingress
    cli("stop", uuid[:8])  # idempotent
    assert cli("start", uuid[:8]).startswith("active:")
    assert _sdep(kube_api, name)["spec"]["predictors"][0]["replicas"] == deployer.replicas
    record = deployer.get_model_server(uuid)
    assert record.prediction_url == url
    assert record.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_a_failing_version_raises_and_the_previous_spec_serves_on(
    deployer, trained, features, kube_api, small_csv
) -> None:
    import boto3

    broken = training_pipeline(data_path=small_csv, model_type="linear", model_name=MODEL)
    config = trained["v2"].model_copy(
        update={"model_version": broken.model_version, "model_uri": broken.model_uri}
    )
    from blocks.seldon_manifest import storage_uri

    bucket_path = storage_uri(config).removeprefix(f"s3://{env.BUCKET}/")
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    s3.put_object(Bucket=env.BUCKET, Key=f"{bucket_path}/model.skops", Body=b"not a model")
    before = deployer.find_model_server("p", "s", MODEL)[0]
    with pytest.raises(ModelServerError, match="Seldon reports Failed: model server did not"):
        deployer.deploy_model(config)
    after = deployer.find_model_server("p", "s", MODEL)[0]
    assert after.model_version == trained["v2"].model_version
    assert "Failed" in str(after.last_error)
    graph = _sdep(kube_api, str(before.kube.resource_name))["spec"]["predictors"][0]["graph"]
    assert graph["modelUri"] == storage_uri(trained["v2"])
    assert after.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_a_timeout_says_what_was_last_seen(deployer, trained, components) -> None:
    config = trained["v1"].model_copy(update={"pipeline_name": "p-timeout"})
    components["operator"].paused = True  # as an operator that is down
    try:
        with pytest.raises(ModelServerError, match="not ready after 2 s; last seen: ") as info:
            deployer.deploy_model(config, timeout=2)
        assert "no predictor Deployment yet" in str(info.value)
    finally:
        for record in deployer.find_model_server(pipeline_name="p-timeout"):
            assert deployer.delete_model_server(record.uuid)
        components["operator"].paused = False


def test_concurrent_deploys_of_one_model_make_one_resource(deployer, trained) -> None:
    config = trained["v1"].model_copy(update={"pipeline_name": "p-concurrent"})
    results: list[Any] = []

    def deploy() -> None:
        try:
            results.append(_deployer_copy(deployer).deploy_model(config))
        except Exception as err:
            results.append(err)

    threads = [threading.Thread(target=deploy) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.uuid for r in results}) == 1
    assert len(deployer.find_model_server(pipeline_name="p-concurrent")) == 1


def _deployer_copy(deployer: SeldonModelDeployer) -> SeldonModelDeployer:
    return deployer.model_copy(deep=True)


def test_credentials_are_only_in_the_secret(deployer, kube_api) -> None:
    planted = [env.ACCESS_KEY, env.SECRET_KEY]
    planted += [base64.b64encode(v.encode()).decode() for v in planted]
    holders = []
    with kube_api.client() as kube:
        for path, kind in _namespaced_lists(kube):
            for item in kube.get(f"{path}/namespaces/{NS}/{kind}").json().get("items", []):
                text = json.dumps(item)
                if any(value in text for value in planted):
                    holders.append(f"{kind}/{item['metadata']['name']}")
    assert holders == [f"secrets/{deployer.secret_name}"]
    for record in deployer.find_model_server():
        assert not any(value in record.model_dump_json() for value in planted)


def _namespaced_lists(kube: httpx.Client) -> Iterator[tuple[str, str]]:
    """Every namespaced resource kind the API server stores (API discovery)."""
    versions = ["/api/v1"]
    for group in kube.get("/apis").json()["groups"]:
        versions.append(f"/apis/{group['preferredVersion']['groupVersion']}")
    for path in versions:
        for resource in kube.get(path).json()["resources"]:
            listable = resource["namespaced"] and "list" in resource["verbs"]
            if listable and "/" not in resource["name"]:
                yield path, resource["name"]


def test_continuous_deployment_pipeline_serves_on_seldon(
    components, kube_api, small_csv, features
) -> None:
    from flows.continuous_deployment import continuous_deployment_pipeline
    from flows.inference import inference_pipeline

    _deployer(components, kube_api).save("prod", overwrite=True)
    result = continuous_deployment_pipeline(
        data_path=small_csv, model_type="linear", model_name="seldon-cd",
        deployer="seldon-model-deployer/prod", criteria={"metric": "r2", "threshold": -10},
    )  # fmt: skip
    assert result.deployed and result.service is not None
    assert f"/seldon/{NS}/" in result.service.prediction_url
    scored = inference_pipeline(
        data_path=small_csv, model_name="seldon-cd", deployer="seldon-model-deployer/prod"
    )
    model = mlflow.pyfunc.load_model(result.model_uri)
    frame = feature_frame(pd.read_csv(small_csv), "review_score")
    assert scored.predictions == pytest.approx([float(x) for x in model.predict(frame)])


def test_delete_removes_the_resource_and_then_the_unused_secret(deployer, kube_api) -> None:
    records = deployer.find_model_server()
    assert len(records) >= 2
    secret = f"/api/v1/namespaces/{NS}/secrets/{deployer.secret_name}"
    with kube_api.client() as kube:
        for i, record in enumerate(records):
            assert deployer.delete_model_server(record.uuid)
            gone = kube.get(f"{SDEPS.format(ns=NS)}/{record.kube.resource_name}").status_code == 404
            assert gone
            last = i == len(records) - 1
            assert kube.get(secret).status_code == (404 if last else 200)
        assert not deployer.delete_model_server(records[0].uuid)  # idempotent
    assert deployer.find_model_server() == []
