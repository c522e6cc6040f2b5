"""VaultCredentials' Kubernetes auth against real components: a loopback kube-apiserver (from
KUBEBUILDER_ASSETS, see tests/kube.py) issues service-account JWTs by the TokenRequest API, and
a real OpenBao dev server checks them by calling the apiserver's TokenReview API with a
reviewer service account bound to `system:auth-delegator`. Nothing is mocked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest

from blocks import VaultCredentials
from ctcd.exceptions import VaultError
from tests.processes import stop_group
from tests.test_vault import ROOT_TOKEN, _start_bao

pytestmark = pytest.mark.kubernetes

NAMESPACE, ROLE = "ctcd-vault", "ctcd-flows"
RUNNER, OTHER, RETIRED, REVIEWER = "flow-runner", "other", "retired", "vault-reviewer"
PASSWORD = "k8s-Pa55word-value"


@dataclass
class Setup:
    address: str
    jwts: dict[str, str]


def _created(response: httpx.Response) -> Any:
    assert response.status_code == 201, response.text
    return response.json()


def _service_accounts(kube: httpx.Client) -> dict[str, str]:
    """A namespace, four service accounts and a JWT of each (TokenRequest API); the reviewer
    may call TokenReview. `retired` is deleted after its JWT is issued."""
    _created(kube.post("/api/v1/namespaces", json={"metadata": {"name": NAMESPACE}}))
    accounts = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts"
    jwts = {}
    for name in (RUNNER, OTHER, RETIRED, REVIEWER):
        _created(kube.post(accounts, json={"metadata": {"name": name}}))
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
        jwts[name] = _created(kube.post(f"{accounts}/{name}/token", json=request))["status"][
            "token"
        ]
    binding = {
        "metadata": {"name": "vault-token-review"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:auth-delegator",
        },
        "subjects": [{"kind": "ServiceAccount", "name": REVIEWER, "namespace": NAMESPACE}],
    }
    _created(kube.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", json=binding))
    assert kube.delete(f"{accounts}/{RETIRED}").status_code == 200
    return jwts


def _configure_bao(address: str, kube_url: str, ca_cert: str, reviewer_jwt: str) -> None:
    """Kubernetes auth as the README sets it up, and a role that may read one secret."""
    root = hvac.Client(url=address, token=ROOT_TOKEN)
    root.secrets.kv.v2.create_or_update_secret("ctcd/mlflow", {"password": PASSWORD})
    root.secrets.kv.v2.create_or_update_secret("ctcd/other", {"password": "not-for-flows"})
    root.sys.create_or_update_policy(
        "ctcd-read", 'path "secret/data/ctcd/mlflow" { capabilities = ["read"] }'
    )
    root.sys.enable_auth_method("kubernetes")
    root.auth.kubernetes.configure(
        kubernetes_host=kube_url,
        kubernetes_ca_cert=ca_cert,
        token_reviewer_jwt=reviewer_jwt,
        disable_local_ca_jwt=True,
    )
    root.auth.kubernetes.create_role(
        ROLE,
        bound_service_account_names=[RUNNER, RETIRED],
        bound_service_account_namespaces=[NAMESPACE],
        policies=["ctcd-read"],
        ttl="10m",
    )


@pytest.fixture(scope="module")
def k8s_vault(kube_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    proc, address = _start_bao(tmp_path_factory.mktemp("bao"))
    try:
        with kube_api.client() as client:
            jwts = _service_accounts(client)
        ca_cert = (kube_api.pki / "ca.crt").read_text()
        _configure_bao(address, kube_api.url, ca_cert, jwts[REVIEWER])
        yield Setup(address, jwts)
    finally:
        stop_group(proc, 10)


def _credentials(k8s_vault: Setup, tmp_path: Path, account: str) -> VaultCredentials:
    jwt_file = tmp_path / f"{account}.jwt"
    jwt_file.write_text(k8s_vault.jwts[account] + "\n")
    return VaultCredentials(
        address=k8s_vault.address, auth_method="kubernetes", role=ROLE, jwt_path=str(jwt_file)
    )


def test_bound_service_account_reads_its_secret_only(k8s_vault: Setup, tmp_path: Path) -> None:
    credentials = _credentials(k8s_vault, tmp_path, RUNNER)
    assert credentials.read_secret("ctcd/mlflow", "password").get_secret_value() == PASSWORD
    client = credentials.get_client()
    assert client.lookup_token()["data"]["meta"]["service_account_name"] == RUNNER
    with pytest.raises(VaultError, match="permission denied"):
        credentials.read_secret("ctcd/other", "password")


@pytest.mark.parametrize(
    "account",
    [
        OTHER,  # a valid JWT of a service account the role is not bound to
        RETIRED,  # bound to the role, but deleted: only the apiserver's TokenReview knows
        REVIEWER,  # may review tokens, but is not bound to the role
    ],
)
def test_refused_jwt_is_named_without_the_jwt(
    k8s_vault: Setup, tmp_path: Path, account: str
) -> None:
    credentials = _credentials(k8s_vault, tmp_path, account)
    with pytest.raises(VaultError) as info:
        credentials.read_secret("ctcd/mlflow", "password")
    message = str(info.value)
    assert f"Vault at {k8s_vault.address}" in message
    assert "kubernetes login failed" in message
    assert k8s_vault.jwts[account] not in message and PASSWORD not in message
    for part in k8s_vault.jwts[account].split("."):
        assert part not in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read the service-account token file"), ("\n", "is empty")],
    ids=["missing", "empty"],
)
def test_unusable_jwt_file_names_the_path(
    k8s_vault: Setup, tmp_path: Path, content: str | None, problem: str
) -> None:
    jwt_file = tmp_path / "serviceaccount" / "token"
    if content is not None:
        jwt_file.parent.mkdir()
        jwt_file.write_text(content)
    credentials = VaultCredentials(
        address=k8s_vault.address, auth_method="kubernetes", role=ROLE, jwt_path=str(jwt_file)
    )
    with pytest.raises(VaultError) as info:
        credentials.get_client()
    message = str(info.value)
    assert message.startswith(f"Vault at {k8s_vault.address}: ")
    assert (
        problem in message
        and str(jwt_file) in message
        and "Check the block's `jwt_path`" in message
    )


def test_kubernetes_auth_without_a_role_is_named(k8s_vault: Setup, tmp_path: Path) -> None:
    credentials = _credentials(k8s_vault, tmp_path, RUNNER).model_copy(update={"role": None})
    with pytest.raises(VaultError, match="Kubernetes auth needs a role. Check the block's `role`"):
        credentials.get_client()
