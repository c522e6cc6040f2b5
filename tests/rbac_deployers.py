"""Each shipped deployer's lifecycle as ctcd-flows, with that account's own token, for
tests/test_rbac.py (which proves every rule of each deployer's Role with it). Each returns the
steps it finished; whatever it left is removed as admin afterwards.

STAND-IN for the ReplicaSet controller and scheduler: the predictor pod whose log `logs` reads
is made by the test as admin, on the stand-in kubelet's node (tests/rbac_env.KubeletLogs)."""

from __future__ import annotations

from types import SimpleNamespace

from prefect_kubernetes.credentials import KubernetesClusterConfig
from pydantic import SecretStr

from blocks import (
    DeploymentConfig,
    KServeModelDeployer,
    ObjectStoreCredentials,
    SeldonModelDeployer,
)
from tests import rbac_env as env

FLOWS = "ctcd-flows"
STORE = ObjectStoreCredentials(
    access_key_id=SecretStr("AKIA-RBAC"),
    secret_access_key=SecretStr("rbac-secret"),
    endpoint_url="http://127.0.0.1:9",
    provider="Other",
)


def cluster_config(cluster: SimpleNamespace, account: str) -> KubernetesClusterConfig:
    return KubernetesClusterConfig(config=cluster.kubeconfigs[account], context_name=account)


def version(n: int, model: str = "rbac-model") -> DeploymentConfig:
    return DeploymentConfig(
        model_name=model,
        model_version=str(n),
        model_uri=f"s3://models/rbac/{n}",
        pipeline_name="p",
        step_name="s",
    )


def seldon_lifecycle(cluster: SimpleNamespace, namespace: str) -> list[str]:
    """SeldonModelDeployer as ctcd-flows: deploy, update in place, stop, start, logs, delete.
    Returns the steps done; whatever is left is removed as admin afterwards."""
    deployer = SeldonModelDeployer(
        cluster_config=cluster_config(cluster, FLOWS),
        namespace=namespace,
        base_url="http://127.0.0.1:9",
        object_store=STORE,
        deploy_timeout=60,
    )
    done: list[str] = []
    try:
        record = deployer.deploy_model(version(1))
        done.append("deploy")
        record = deployer.deploy_model(version(2))
        assert record.history == ["1", "2"]
        done.append("update")
        assert deployer.stop_model_server(record.uuid).status == "inactive"
        done.append("stop")
        assert deployer.start_model_server(record.uuid).status == "active"
        done.append("start")
        name = str(record.kube.resource_name)
        _predictor_pod(cluster, namespace, name, {"seldon-deployment-id": name}, "model")
        assert deployer.get_logs(record.uuid) == env.KubeletLogs.TEXT.splitlines()
        done.append("logs")
        assert deployer.delete_model_server(record.uuid)
        done.append("delete")
    finally:
        _clean_seldon(cluster, namespace)
    return done


def kserve_lifecycle(cluster: SimpleNamespace, namespace: str) -> list[str]:
    """KServeModelDeployer as ctcd-flows: the whole lifecycle, then a deploy and a delete with
    a service account the platform team made. Returns the steps done; whatever is left is
    removed as admin afterwards."""
    deployer = KServeModelDeployer(
        cluster_config=cluster_config(cluster, FLOWS),
        namespace=namespace,
        base_url="http://127.0.0.1:9",
        object_store=STORE,
        deploy_timeout=60,
    )
    done: list[str] = []
    try:
        record = deployer.deploy_model(version(1))
        done.append("deploy")
        record = deployer.deploy_model(version(2))
        assert record.history == ["1", "2"]
        done.append("update")
        assert deployer.stop_model_server(record.uuid).status == "inactive"
        done.append("stop")
        assert deployer.start_model_server(record.uuid).status == "active"
        done.append("start")
        name = str(record.kube.resource_name)
        labels = {"serving.kserve.io/inferenceservice": name, "component": "predictor"}
        _predictor_pod(cluster, namespace, name, labels, "kserve-container")
        assert deployer.get_logs(record.uuid) == env.KubeletLogs.TEXT.splitlines()
        done.append("logs")
        assert deployer.delete_model_server(record.uuid)
        done.append("delete")
        _with_the_teams_account(cluster, deployer, namespace)
        done.append("the team's account")
    finally:
        _clean_kserve(cluster, namespace)
    return done


def _with_the_teams_account(
    cluster: SimpleNamespace, deployer: KServeModelDeployer, namespace: str
) -> None:
    """The service account exists already, made by the platform team (not ctcd's, e.g. with
    its registry's pull secret): a deploy adds the deployer's Secret to it, the delete takes the
    Secret out again and leaves the account as the team made it."""
    url = f"/api/v1/namespaces/{namespace}/serviceaccounts"
    account = deployer.service_account
    made = {"metadata": {"name": account}, "imagePullSecrets": [{"name": "team-registry"}]}
    with cluster.api.client() as kube:
        assert kube.post(url, json=made).status_code == 201
    record = deployer.deploy_model(version(1, model="rbac-team-model"))
    with cluster.api.client() as kube:
        listed = kube.get(f"{url}/{account}").json()["secrets"]
    assert listed == [{"name": deployer.secret_name}]
    assert deployer.delete_model_server(record.uuid)
    with cluster.api.client() as kube:
        left = kube.get(f"{url}/{account}").json()
    assert not left.get("secrets") and left["imagePullSecrets"] == made["imagePullSecrets"]


def _predictor_pod(
    cluster: SimpleNamespace, namespace: str, name: str, labels: dict[str, str], container: str
) -> None:
    with cluster.api.client() as kube:
        env.predictor_pod(kube, cluster.kubelet.node, namespace, f"{name}-pod", labels, container)


def _clean_seldon(cluster: SimpleNamespace, namespace: str) -> None:
    served = f"/apis/machinelearning.seldon.io/v1/namespaces/{namespace}/seldondeployments"
    secret = f"/api/v1/namespaces/{namespace}/secrets/ctcd-model-store"
    with cluster.api.client() as kube:
        env.clean(kube, namespace, served, [secret], "seldon-deployment-id")


def _clean_kserve(cluster: SimpleNamespace, namespace: str) -> None:
    served = f"/apis/serving.kserve.io/v1beta1/namespaces/{namespace}/inferenceservices"
    core = f"/api/v1/namespaces/{namespace}"
    named = [f"{core}/secrets/ctcd-kserve-s3", f"{core}/serviceaccounts/ctcd-kserve"]
    with cluster.api.client() as kube:
        env.clean(kube, namespace, served, named, "serving.kserve.io/inferenceservice")
