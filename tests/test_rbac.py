"""deployments/kubernetes/ against the real kube-apiserver (RBAC on): applied with `kubectl apply
-k` as README says, each service account acting with a token of its own (TokenRequest API):
- ctcd-flows runs each deployer's whole lifecycle (deploy, update, stop, start, logs, delete;
  KServe's also with a service account the platform team made) in the flows' namespace and,
  through serving-namespace/, in another one;
- ctcd-worker does what prefect-kubernetes' worker does for a flow run: the real KubernetesWorker
  creates the Job from the pool's base job template, its observer (started by the worker, kopf)
  follows the Job's pod and reads its log, the worker deletes the Job and the observer crashes
  the flow run;
- every verb of every rule is taken out of its Role in turn: the part that needs it then fails,
  naming the refused verb, resource, API group and namespace (for the deployers: a ctcd error
  naming the Role that grants it);
- each account is refused what it must not do.

STAND-INS (named in their modules): the Seldon operator (tests/seldon_standin.py) and KServe's
controller (tests/kserve_standin.py), both here with no pods run (only API permissions are under
test), the Job and ReplicaSet controllers' pods (made by the test as admin), and a kubelet's log
endpoint (tests/rbac_env.KubeletLogs)."""

from __future__ import annotations

import itertools
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prefect_kubernetes.credentials import KubernetesClusterConfig

from blocks import KServeModelDeployer, SeldonModelDeployer
from blocks.kube_errors import role_of
from ctcd.exceptions import KubernetesAccessError
from tests import kserve_env, kserve_pod, rbac_worker
from tests import rbac_env as env
from tests.kserve_standin import StandInKServeController
from tests.processes import missing
from tests.rbac_deployers import FLOWS, kserve_lifecycle, seldon_lifecycle
from tests.seldon_standin import StandInIngress, StandInSeldonOperator
from tests.test_seldon import _install_crd

pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(900)]
NS, SERVING = "ctcd", "models"
WORKER = "ctcd-worker"


def user(account: str) -> str:
    return f"system:serviceaccount:{NS}:{account}"


@pytest.fixture(scope="module")
def cluster(kube_api, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The manifests applied with kubectl (the base, then the serving-namespace variant), a
    token kubeconfig per account, the stand-in operators (one per namespace) and kubelet."""
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed (Debian: kubernetes-client)")
    with kube_api.client() as kube:
        _install_crd(kube)
        kserve_env.install_crd(kube)
        started = time.monotonic()
        applied = env.kubectl_apply(kube_api.kubeconfig, env.MANIFESTS)
        applied += env.kubectl_apply(kube_api.kubeconfig, env.MANIFESTS / "serving-namespace")
        print(f"\nkubectl apply -k, twice: {time.monotonic() - started:.1f} s")
        configs = {a: env.token_kubeconfig(kube, kube_api, NS, a) for a in (FLOWS, WORKER)}
        kubelet = env.KubeletLogs(kube, kube_api.pki)
    ingress, kserve_ingress = StandInIngress(), kserve_pod.StandInIngress()
    work = tmp_path_factory.mktemp("rbac")
    operators: list[Any] = [  # one of each per namespace, running no pods
        *(StandInSeldonOperator(kube_api, ns, None, work, ingress) for ns in (NS, SERVING)),
        *(
            StandInKServeController(kube_api, ns, None, None, work, kserve_ingress)
            for ns in (NS, SERVING)
        ),
    ]
    for operator in operators:
        operator.start()
    try:
        yield SimpleNamespace(
            api=kube_api, kubeconfigs=configs, applied=applied, kubelet=kubelet, work=work
        )
    finally:
        for operator in operators:
            operator.stop()
        ingress.stop()
        kserve_ingress.stop()
        with kube_api.client() as kube:
            kubelet.stop(kube)


# Each deployer's Role is proven with that deployer's lifecycle, run as ctcd-flows: a new
# deployer (its folder in deployments/kubernetes/ and kustomization.yaml) is one entry here.
LIFECYCLES: dict[str, Callable[[SimpleNamespace, str], list[str]]] = {
    "ctcd-seldon-deployer": seldon_lifecycle,
    "ctcd-kserve-deployer": kserve_lifecycle,
}
WHOLE = ["deploy", "update", "stop", "start", "logs", "delete"]
# Steps a lifecycle takes beyond WHOLE, for a verb only they call.
MORE = {"ctcd-kserve-deployer": ["the team's account"]}


def test_kubectl_applies_the_manifests_and_nothing_is_cluster_wide(cluster) -> None:
    kinds = [(d["kind"], d["metadata"].get("namespace")) for d in env.documents()]
    assert not [k for k, _ in kinds if k.startswith("Cluster")]
    assert all(ns == NS for kind, ns in kinds if kind != "Namespace")
    roles = {d["metadata"]["name"] for d in env.documents() if d["kind"] == "Role"}
    assert roles == {"ctcd-worker", *LIFECYCLES}  # every deployer's Role is proven below
    for line in (
        "namespace/ctcd",
        "namespace/models",
        "serviceaccount/ctcd-worker",
        "serviceaccount/ctcd-flows",
        "role.rbac.authorization.k8s.io/ctcd-worker",
        *(f"role.rbac.authorization.k8s.io/{role}" for role in LIFECYCLES),
    ):
        assert line in cluster.applied
    with cluster.api.client() as kube:
        for ns, role in itertools.product((NS, SERVING), LIFECYCLES):  # the variant moved them
            binding = kube.get(
                f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/{role}"
            ).json()
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": FLOWS, "namespace": NS}
            ]


@pytest.mark.parametrize("namespace", [NS, SERVING])
@pytest.mark.parametrize("role", list(LIFECYCLES))
def test_the_flows_account_runs_each_deployers_lifecycle(cluster, role, namespace) -> None:
    started = time.monotonic()
    assert LIFECYCLES[role](cluster, namespace) == [*WHOLE, *MORE.get(role, [])]
    print(f"\n{role} lifecycle as {FLOWS} in {namespace}: {time.monotonic() - started:.1f} s")


def test_the_worker_account_runs_the_job_and_reads_its_pods_log(cluster) -> None:
    started = time.monotonic()
    outcome = rbac_worker.run_part(cluster, NS)
    print(f"\nworker part as {WORKER}: {time.monotonic() - started:.1f} s")
    assert outcome.error is None and outcome.refusals == [], outcome
    assert outcome.job_created and outcome.job_account == FLOWS  # the pool's base job template
    assert outcome.log == env.KubeletLogs.TEXT.splitlines()
    assert outcome.states == ["InfrastructurePending", "Crashed"], outcome
    assert outcome.crash_message == "Kubernetes job was deleted"


@pytest.mark.parametrize("kind", [SeldonModelDeployer, KServeModelDeployer])
def test_a_bad_token_says_the_credentials_were_refused(cluster, kind) -> None:
    config = {**cluster.kubeconfigs[FLOWS]}
    config["users"] = [{"name": FLOWS, "user": {"token": "not-a-token"}}]
    deployer = kind(
        cluster_config=KubernetesClusterConfig(config=config, context_name=FLOWS),
        namespace=NS,
        base_url="http://127.0.0.1:9",
    )
    with pytest.raises(KubernetesAccessError, match="HTTP 401 Unauthorized") as info:
        deployer.find_model_server()
    assert "cluster_config" in str(info.value) and "not-a-token" not in str(info.value)


@pytest.mark.parametrize(
    ("role", "index", "verb"), env.rules(), ids=[f"{r}-{i}-{v}" for r, i, v in env.rules()]
)
def test_every_verb_of_every_rule_is_needed(cluster, role, index, verb) -> None:
    """Take the verb out of the Role: the part that needs it fails, saying what was refused."""
    granted = next(
        d for d in env.documents() if d["kind"] == "Role" and d["metadata"]["name"] == role
    )
    rule = granted["rules"][index]
    resource, group = rule["resources"][0], rule["apiGroups"][0]
    account = WORKER if role == "ctcd-worker" else FLOWS
    with cluster.api.client() as kube:
        others = env.unbind_others(kube, NS, role, account)  # their rules would grant it too
        env.put_role(kube, env.without(granted, index, verb), user(account))
    started = time.monotonic()
    try:
        if role == "ctcd-worker":
            _worker_fails(cluster, verb, resource, group)
        else:
            _lifecycle_fails(cluster, role, verb, resource, group)
    finally:
        with cluster.api.client() as kube:
            env.rebind(kube, others)
            env.put_role(kube, granted, user(account))
    print(f"\nwithout {verb} {resource} ({role}): failed in {time.monotonic() - started:.1f} s")


def _lifecycle_fails(cluster: Any, role: str, verb: str, resource: str, group: str) -> None:
    with pytest.raises(KubernetesAccessError) as info:
        LIFECYCLES[role](cluster, NS)
    err = info.value
    assert (err.verb, err.resource, err.group, err.namespace) == (verb, resource, group, NS)
    name, folder = role_of(role.removeprefix("ctcd-").removesuffix("-deployer"))
    assert name == role and (env.ROOT / folder / "kustomization.yaml").exists()
    message = str(err)
    assert f"`{verb}` on {resource} (API group " in message and f'namespace "{NS}"' in message
    assert user(FLOWS) in message and f"The Role {role} ({folder})" in message
    assert "{" not in message  # not the API server's raw JSON body


def _worker_fails(cluster: Any, verb: str, resource: str, group: str) -> None:
    outcome = rbac_worker.run_part(cluster, NS)
    said = [text.replace('\\"', '"') for text in [outcome.error or "", *outcome.refusals]]
    refused = f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{NS}"'
    assert any(refused in text and user(WORKER) in text for text in said), outcome
    assert outcome.states != ["InfrastructurePending", "Crashed"] or not outcome.log, outcome


REFUSED = {
    FLOWS: [
        ("GET", f"/api/v1/namespaces/{NS}/secrets/ctcd-model-store"),  # written, never read
        ("GET", f"/api/v1/namespaces/{NS}/secrets"),
        ("PUT", f"/api/v1/namespaces/{NS}/secrets/another-apps-secret"),
        ("DELETE", f"/api/v1/namespaces/{NS}/secrets/another-apps-secret"),
        ("GET", "/api/v1/namespaces/kube-system/secrets"),
        ("GET", "/apis/machinelearning.seldon.io/v1/namespaces/default/seldondeployments"),
        ("GET", f"/api/v1/namespaces/{NS}/secrets/ctcd-kserve-s3"),  # written, never read
        ("GET", "/apis/serving.kserve.io/v1beta1/namespaces/default/inferenceservices"),
        ("PATCH", f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/x"),
        ("PUT", f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/x/status"),
        ("GET", f"/api/v1/namespaces/{NS}/serviceaccounts"),
        ("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/{WORKER}"),
        ("PUT", f"/api/v1/namespaces/{NS}/serviceaccounts/{WORKER}"),
        ("DELETE", f"/api/v1/namespaces/{NS}/serviceaccounts/{FLOWS}"),
        ("POST", f"/api/v1/namespaces/{NS}/serviceaccounts/ctcd-kserve/token"),  # no tokens
        ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/x"),
        ("POST", f"/api/v1/namespaces/{NS}/pods"),
        ("POST", f"/api/v1/namespaces/{NS}/pods/x/exec"),
        ("POST", f"/apis/batch/v1/namespaces/{NS}/jobs"),
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/namespaces"),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles"),
        ("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings"),
    ],
    WORKER: [
        ("GET", f"/api/v1/namespaces/{NS}/secrets"),
        ("POST", f"/api/v1/namespaces/{NS}/secrets"),
        ("GET", "/api/v1/pods"),  # cluster-wide: why the observer is limited to ctcd
        ("GET", "/apis/batch/v1/jobs"),
        ("GET", "/api/v1/namespaces/default/pods"),
        ("POST", f"/api/v1/namespaces/{NS}/pods"),
        ("POST", f"/api/v1/namespaces/{NS}/pods/x/exec"),
        ("PUT", f"/apis/batch/v1/namespaces/{NS}/jobs/x"),
        ("POST", f"/api/v1/namespaces/{NS}/events"),
        ("GET", f"/apis/machinelearning.seldon.io/v1/namespaces/{NS}/seldondeployments"),
        ("GET", f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"),
        ("POST", f"/api/v1/namespaces/{NS}/serviceaccounts"),
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/namespaces/kube-system"),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles"),
    ],
}


@pytest.mark.parametrize("account", [FLOWS, WORKER])
def test_each_account_is_refused_what_it_does_not_need(cluster, account) -> None:
    token = cluster.kubeconfigs[account]["users"][0]["user"]["token"]
    verify = ssl.create_default_context(cafile=str(cluster.api.pki / "ca.crt"))  # no client cert
    with httpx.Client(base_url=cluster.api.url, verify=verify, timeout=10) as kube:
        for method, path in REFUSED[account]:
            answer = kube.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, json={}
            )
            assert answer.status_code == 403, (method, path, answer.text)
            assert user(account) in answer.json()["message"]
