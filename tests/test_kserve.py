"""KServeModelDeployer against real components: the real kube-apiserver and etcd (the session
`kube_api`, no controller manager) with an InferenceService CRD whose schema is generated from
the `kserve` SDK's typed models (tests/kserve_crd.py); a real S3 API (moto_server) as the
artifact root of a real MLflow tracking server, where the flows log the models; KServe's own
storage-initializer code (`kserve-storage`) downloading each model with the keys KServe's
credential builder takes from the Secret the deployer wrote; MLServer 1.7.1 + mlserver-mlflow
(KServe's `kserve-mlserver` runtime) answering V2.

STAND-IN (tests/kserve_standin.py): KServe's controller, the Kubernetes deployment controller
and kubelet, and the ingress, which cannot run here. The controller stand-in writes what
KServe's Standard-mode reconciler writes, in its order, including the stale `Ready` right after
a spec change."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
from prefect_kubernetes.credentials import KubernetesClusterConfig
from pydantic import SecretStr, ValidationError

from blocks import DeploymentConfig, KServeModelDeployer, ObjectStoreCredentials, ServiceState
from blocks.cluster import storage_uri
from ctcd.exceptions import ModelConfigError, ModelServerError
from flows.data import feature_frame
from flows.training import training_pipeline
from tests import kserve_env as kenv
from tests import seldon_env as s3env
from tests.conftest import FAST_RF
from tests.kserve_pod import StandInIngress
from tests.kserve_standin import STOP, StandInKServeController
from tests.processes import loopback_port, stop_group

NS = "ctcd-kserve"
MODEL = "kserve-model"
ISVCS = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def components(kube_api, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """moto S3 + an MLflow server with its artifact root in the bucket (this module's tracking
    URI), the generated CRD and a namespace on the real API server, the stand-ins."""
    sdk, mlserver = kenv.sdk_venv(), kenv.mlserver_venv()
    with kube_api.client() as kube:
        kenv.install_crd(kube)
        created = kube.post("/api/v1/namespaces", json={"metadata": {"name": NS}})
        assert created.status_code in (201, 409), created.text
    work = tmp_path_factory.mktemp("kserve")
    moto, s3_url = s3env.start_moto(work)
    tracking, patch = None, pytest.MonkeyPatch()
    try:
        tracking, tracking_uri = s3env.start_mlflow(work, s3_url, f"s3://{s3env.BUCKET}/mlflow")
        for key, value in {
            **s3env.s3_environment(s3_url),
            "MLFLOW_TRACKING_URI": tracking_uri,
        }.items():
            patch.setenv(key, value)
        ingress = StandInIngress()
        (work / "pods").mkdir()
        controller = StandInKServeController(kube_api, NS, sdk, mlserver, work / "pods", ingress)
        controller.start()
        try:
            yield {"s3": s3_url, "controller": controller, "ingress": ingress, "work": work}
        finally:
            controller.stop()
            ingress.stop()
    finally:
        patch.undo()
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        if tracking is not None:
            stop_group(tracking, 10)
        stop_group(moto, 10)


def _store(components: dict[str, Any]) -> ObjectStoreCredentials:
    return ObjectStoreCredentials(
        access_key_id=SecretStr(kenv.ACCESS_KEY), secret_access_key=SecretStr(kenv.SECRET_KEY),
        endpoint_url=components["s3"], region="us-east-1",
    )  # fmt: skip


def _deployer(components: dict[str, Any], kube_api: Any, **changes: Any) -> KServeModelDeployer:
    options: dict[str, Any] = {
        "cluster_config": KubernetesClusterConfig.from_file(kube_api.kubeconfig),
        "namespace": NS, "base_url": components["ingress"].url,
        "object_store": _store(components), "deploy_timeout": 240,
        "cpu_request": "100m", "memory_limit": "1Gi", **changes,
    }  # fmt: skip
    return KServeModelDeployer(**options)


@pytest.fixture(scope="module")
def deployer(components, kube_api) -> KServeModelDeployer:
    return _deployer(components, kube_api)


@pytest.fixture(scope="module")
def trained(components, small_csv, prefect_harness) -> dict[str, DeploymentConfig]:
    """v1 linear, v2 a random forest: logged to the bucket by `training_pipeline` (with the
    session's Prefect harness: a module fixture is set up before the per-test one asks for it)."""
    configs = {}
    for label, kind in (("v1", "linear"), ("v2", "random_forest")):
        result = training_pipeline(
            data_path=small_csv, model_type=kind, model_name=MODEL,
            model_params=FAST_RF if kind == "random_forest" else None,
        )  # fmt: skip
        configs[label] = DeploymentConfig(
            model_name=MODEL, model_version=result.model_version, model_uri=result.model_uri,
            pipeline_name="p", step_name="s", run_id=result.run_id,
        )  # fmt: skip
    return configs


@pytest.fixture(scope="module")
def features(small_table) -> pd.DataFrame:
    return feature_frame(small_table, "review_score").head(50)


def _in_process(config: DeploymentConfig, frame: pd.DataFrame) -> list[float]:
    return [float(x) for x in mlflow.pyfunc.load_model(config.model_uri).predict(frame)]


def _get(kube_api: Any, path: str) -> dict[str, Any]:
    with kube_api.client() as kube:
        found = kube.get(path)
        assert found.status_code == 200, found.text
        return dict(found.json())


def _conditions(isvc: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in (isvc.get("status") or {}).get("conditions", [])}


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def _any(self) -> None:
        _Counter.hits.append(f"{self.command} {self.path}")
        self.send_error(500)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("uri", ["/tmp/model", "file:///tmp/m", "mlflow-artifacts:/1/m/artifacts"])
def test_a_model_the_cluster_cannot_read_is_refused_before_any_api_call(uri) -> None:
    port = loopback_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Counter.hits.clear()
    counted = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }  # fmt: skip
    config = DeploymentConfig(
        model_name="m", model_version="1", model_uri=uri, pipeline_name="p", step_name="s"
    )
    deployer = KServeModelDeployer(
        cluster_config=KubernetesClusterConfig(config=counted, context_name="c"),
        base_url="http://127.0.0.1:9",
    )
    try:
        with pytest.raises(ModelConfigError) as info:
            deployer.deploy_model(config)
        assert _Counter.hits == []  # not one request reached the API
        message = str(info.value)
        assert uri in message and "s3://" in message and "KServe's storage initializer" in message
        assert "Nothing was created on the cluster" in message
        with pytest.raises(Exception):  # noqa: B017 - the counter answers 500 to anything
            deployer.find_model_server()
        assert _Counter.hits  # the same deployer does reach the counting server
    finally:
        server.shutdown()
        server.server_close()


def test_shadow_and_canary_rollouts_are_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="KServe cannot shadow"):
        KServeModelDeployer(base_url="http://x", rollout="shadow")
    with pytest.raises(ValidationError, match="canary through KServe's spec.canary"):
        KServeModelDeployer(base_url="http://x", rollout="canary")


def test_deploy_creates_an_inference_service_that_serves_the_model(
    deployer, trained, features, kube_api
) -> None:
    record = deployer.deploy_model(trained["v1"])
    name = record.kube.resource_name
    assert record.status == ServiceState.ACTIVE and record.protocol == "v2"
    assert record.prediction_url == (
        f"{deployer.base_url}/serving/{NS}/{name}/v2/models/{name}/infer"
    )
    isvc = _get(kube_api, f"{ISVCS}/{name}")
    assert isvc["metadata"]["uid"] == record.uuid
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["modelFormat"] == {"name": "mlflow"}
    assert predictor["model"]["protocolVersion"] == "v2"
    assert predictor["model"]["storageUri"] == storage_uri(trained["v1"])
    assert predictor["model"]["storageUri"].startswith(f"s3://{s3env.BUCKET}/mlflow/")
    assert predictor["serviceAccountName"] == deployer.service_account
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 1)
    account = _get(kube_api, f"/api/v1/namespaces/{NS}/serviceaccounts/{deployer.service_account}")
    assert account["secrets"] == [{"name": deployer.secret_name}]
    secret = _get(kube_api, f"/api/v1/namespaces/{NS}/secrets/{deployer.secret_name}")
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"
    # MLServer's MLflow runtime, through the ingress, answers with the model's own numbers.
    assert record.predict(features) == pytest.approx(_in_process(trained["v1"], features))


def test_a_new_version_patches_in_place_and_a_stale_ready_does_not_count(
    deployer, trained, features, kube_api, components
) -> None:
    first = deployer.find_model_server("p", "s", MODEL)[0]
    name = first.kube.resource_name
    created = _get(kube_api, f"{ISVCS}/{name}")["metadata"]["creationTimestamp"]
    controller = components["controller"]
    controller.hold_rollouts = True  # KServe acts on the spec; no new pod comes up
    try:
        with pytest.raises(ModelServerError, match="not ready after 8 s; last seen: ") as info:
            deployer.deploy_model(trained["v2"], timeout=8)
        isvc = _get(kube_api, f"{ISVCS}/{name}")
        predictor = _get(kube_api, f"/apis/apps/v1/namespaces/{NS}/deployments/{name}-predictor")
        # What KServe shows right after the change: the previous Ready, the new URI.
        assert _conditions(isvc)["Ready"] == "True"
        assert predictor["spec"]["template"]["spec"]["initContainers"][0]["args"][0] == (
            storage_uri(trained["v2"])
        )
        assert "Ready True" in str(info.value) and "new model" in str(info.value)
    finally:
        controller.hold_rollouts = False
    record = deployer.deploy_model(trained["v2"])  # returns once the rollout is real
    assert (record.uuid, record.prediction_url) == (first.uuid, first.prediction_url)
    assert _get(kube_api, f"{ISVCS}/{name}")["metadata"]["creationTimestamp"] == created
    assert record.history == [trained["v1"].model_version, trained["v2"].model_version]
    assert record.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_cli_finds_stops_and_starts_a_kserve_service(
    components, kube_api, deployer, features, trained
) -> None:
    from typer.testing import CliRunner

    from blocks.lookup import find_service, load_deployer
    from ctcd.cli import app

    _deployer(components, kube_api).save("kserve-cli", overwrite=True)
    slug = "kserve-model-deployer/kserve-cli"
    assert isinstance(load_deployer(slug), KServeModelDeployer)
    found = find_service(MODEL, deployer=slug)
    assert found.backend == "kserve" and found.model_version == trained["v2"].model_version
    runner, opt = CliRunner(), ["--deployer", slug]

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["models", *args, *opt])
        assert result.exit_code == 0, result.output
        return result.output

    listed = json.loads(cli("list", "--json", "--model", MODEL))
    assert [r["status"] for r in listed] == ["active"]
    uuid, url, name = listed[0]["uuid"], listed[0]["prediction_url"], listed[0]["resource_name"]
    assert '"protocol": "v2"' in cli("describe", uuid[:8], "--json")
    assert "No predictor pods exist" in cli("logs", uuid[:8])  # no kubelet: no pods here
    assert cli("stop", uuid[:8]).startswith("inactive:")
    isvc = _get(kube_api, f"{ISVCS}/{name}")
    assert isvc["metadata"]["annotations"][STOP] == "true"
    assert _conditions(isvc)["Stopped"] == "True" and _conditions(isvc)["Ready"] == "False"
    with kube_api.client() as kube:  # KServe removed the predictor's workloads
        assert (
            kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}-predictor").status_code
            == 404
        )
    assert httpx.post(url, json={}).status_code == 503
    cli("stop", uuid[:8])  # idempotent
    assert cli("start", uuid[:8]).startswith("active:")
    assert STOP not in _get(kube_api, f"{ISVCS}/{name}")["metadata"]["annotations"]
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
    path = storage_uri(config).removeprefix(f"s3://{s3env.BUCKET}/")
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    s3.put_object(Bucket=s3env.BUCKET, Key=f"{path}/model.skops", Body=b"not a model")
    before = deployer.find_model_server("p", "s", MODEL)[0]
    with pytest.raises(ModelServerError, match="KServe reports ModelLoadFailed in ") as info:
        deployer.deploy_model(config)
    assert "previous spec was put back" in "".join(info.value.__notes__)
    after = deployer.find_model_server("p", "s", MODEL)[0]
    assert after.model_version == trained["v2"].model_version
    assert "ModelLoadFailed" in str(after.last_error)
    isvc = _get(kube_api, f"{ISVCS}/{before.kube.resource_name}")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == storage_uri(trained["v2"])
    assert after.predict(features) == pytest.approx(_in_process(trained["v2"], features))


def test_a_timeout_says_what_was_last_seen(deployer, trained, components) -> None:
    config = trained["v1"].model_copy(update={"pipeline_name": "p-timeout"})
    components["controller"].paused = True  # as a KServe controller that is down
    try:
        with pytest.raises(ModelServerError, match="not ready after 2 s; last seen: ") as info:
            deployer.deploy_model(config, timeout=2)
        assert "Ready unset" in str(info.value) and "no predictor Deployment yet" in str(info.value)
    finally:
        components["controller"].paused = False
        for record in deployer.find_model_server(pipeline_name="p-timeout"):
            assert deployer.delete_model_server(record.uuid)


def test_a_field_the_schema_does_not_know_is_refused_by_name(components, kube_api, trained) -> None:
    config = trained["v1"].model_copy(update={"pipeline_name": "p-typo"})
    misspelt = _deployer(components, kube_api, predictor_overrides={"nodeSelectr": {"a": "b"}})
    with pytest.raises(ModelConfigError, match=r"does not know spec\.predictor\.nodeSelectr"):
        misspelt.deploy_model(config)
    wrong_type = _deployer(components, kube_api, predictor_overrides={"timeout": "fast"})
    with pytest.raises(ModelConfigError, match="spec.predictor.timeout in body must be of type"):
        wrong_type.deploy_model(config)
    assert misspelt.find_model_server(pipeline_name="p-typo") == []  # nothing was created
    # The generated schema is what decides: it keeps the real field and prunes the typo.
    body = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": "schema-probe"},
        "spec": {"predictor": {"nodeSelector": {"a": "b"}, "nodeSelectr": {"a": "b"},
                               "model": {"modelFormat": {"name": "mlflow"}}}},
    }  # fmt: skip
    with kube_api.client() as kube:
        kept = kube.post(f"{ISVCS}?dryRun=All", json=body).json()["spec"]["predictor"]
    assert "nodeSelector" in kept and "nodeSelectr" not in kept


def test_credentials_are_only_in_the_secret(deployer, kube_api, components) -> None:
    planted = [kenv.ACCESS_KEY, kenv.SECRET_KEY]
    planted += [base64.b64encode(v.encode()).decode() for v in planted]
    holders = []
    with kube_api.client() as kube:
        for path, kind in _namespaced_lists(kube):
            for item in kube.get(f"{path}/namespaces/{NS}/{kind}").json().get("items", []):
                if any(value in json.dumps(item) for value in planted):
                    holders.append(f"{kind}/{item['metadata']['name']}")
    assert holders == [f"secrets/{deployer.secret_name}"]
    for record in deployer.find_model_server():
        assert not any(value in record.model_dump_json() for value in planted)
    logs = [*components["work"].rglob("*.log"), *(kube_api.pki.parent / "logs").glob("*.log")]
    assert any(p.name == "storage-initializer.log" for p in logs)
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(value in text for value in planted), log


def _namespaced_lists(kube: httpx.Client) -> Iterator[tuple[str, str]]:
    """Every namespaced resource kind the API server stores (API discovery)."""
    versions = ["/api/v1"]
    for group in kube.get("/apis").json()["groups"]:
        versions.append(f"/apis/{group['preferredVersion']['groupVersion']}")
    for path in versions:
        for resource in kube.get(path).json()["resources"]:
            if (
                resource["namespaced"]
                and "list" in resource["verbs"]
                and "/" not in resource["name"]
            ):
                yield path, resource["name"]


def test_continuous_deployment_pipeline_serves_on_kserve(components, kube_api, small_csv) -> None:
    from flows.continuous_deployment import continuous_deployment_pipeline
    from flows.inference import inference_pipeline

    _deployer(components, kube_api).save("prod", overwrite=True)
    result = continuous_deployment_pipeline(
        data_path=small_csv, model_type="linear", model_name="kserve-cd",
        deployer="kserve-model-deployer/prod", criteria={"metric": "r2", "threshold": -10},
    )  # fmt: skip
    assert result.deployed and result.service is not None
    assert f"/serving/{NS}/" in result.service.prediction_url
    scored = inference_pipeline(
        data_path=small_csv, model_name="kserve-cd", deployer="kserve-model-deployer/prod"
    )
    model = mlflow.pyfunc.load_model(result.model_uri)
    frame = feature_frame(pd.read_csv(small_csv), "review_score")
    assert scored.predictions == pytest.approx([float(x) for x in model.predict(frame)])


def test_delete_removes_the_resource_and_then_the_unused_credentials(deployer, kube_api) -> None:
    records = deployer.find_model_server()
    assert len(records) >= 2
    secret = f"/api/v1/namespaces/{NS}/secrets/{deployer.secret_name}"
    account = f"/api/v1/namespaces/{NS}/serviceaccounts/{deployer.service_account}"
    with kube_api.client() as kube:
        for i, record in enumerate(records):
            assert deployer.delete_model_server(record.uuid)
            _gone(kube, f"{ISVCS}/{record.kube.resource_name}")  # after KServe's finalizer
            last = i == len(records) - 1
            assert kube.get(secret).status_code == (404 if last else 200)
            assert kube.get(account).status_code == (404 if last else 200)
        assert not deployer.delete_model_server(records[0].uuid)  # idempotent
    assert deployer.find_model_server() == []


def _gone(kube: httpx.Client, path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while kube.get(path).status_code != 404:
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.2)
