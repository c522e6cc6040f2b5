"""ObjectStoreCredentials against a real OpenBao (Vault's API) and a real kube-apiserver: keys
from Vault (latest or a pinned version) or plain SecretStrs reach the Kubernetes Secret that
Seldon Core v1's rclone storage initializer reads, and no value shows in a repr, a saved block
or an error."""

from __future__ import annotations

import base64
import traceback
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
from prefect.client.orchestration import get_client
from pydantic import SecretStr

from blocks.object_store import ObjectStoreCredentials
from blocks.vault import VaultCredentials, VaultSecret
from ctcd.exceptions import VaultError
from tests.processes import stop_group
from tests.test_vault import ROOT_TOKEN, _start_bao

pytestmark = pytest.mark.kubernetes

AK1, SK1 = "AKIA-first-access-id", "first-S3cret-access-key"
AK2, SK2 = "AKIA-second-access-id", "second-S3cret-access-key"
PLAIN_AK, PLAIN_SK = "AKIA-plain-access-id", "plain-S3cret-access-key"
VALUES = (AK1, SK1, AK2, SK2, PLAIN_AK, PLAIN_SK, ROOT_TOKEN)
NAMESPACE = "ctcd-models"


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> Iterator[VaultCredentials]:
    """OpenBao with secret/ctcd/s3 at version 1 (AK1, SK1) and version 2 (AK2, SK2)."""
    proc, address = _start_bao(tmp_path_factory.mktemp("bao"))
    try:
        root = hvac.Client(url=address, token=ROOT_TOKEN)
        for ak, sk in ((AK1, SK1), (AK2, SK2)):
            keys = {"access_key_id": ak, "secret_access_key": sk}
            root.secrets.kv.v2.create_or_update_secret("ctcd/s3", keys)
        yield VaultCredentials(address=address, token=SecretStr(ROOT_TOKEN))
    finally:
        stop_group(proc, 10)


@pytest.fixture(scope="module")
def namespace(kube_api) -> str:
    with kube_api.client() as client:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        created = client.post("/api/v1/namespaces", json=namespace)
        assert created.status_code == 201, created.text
    return NAMESPACE


def _ref(key: str, version: int | None = None, path: str = "ctcd/s3") -> VaultSecret:
    return VaultSecret(path=path, key=key, version=version)


def _apply_and_read_back(kube_api: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """POST the Secret to the API server; return it as read back, `data` base64-decoded."""
    name = manifest["metadata"]["name"]
    with kube_api.client() as client:
        created = client.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", json=manifest)
        assert created.status_code == 201, f"{created.status_code}: {created.json()['message']}"
        stored = client.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}").json()
    stored["data"] = {k: base64.b64decode(v).decode() for k, v in stored["data"].items()}
    return stored


@pytest.mark.usefixtures("namespace")
@pytest.mark.parametrize(("version", "access_key", "secret_key"), [(1, AK1, SK1), (None, AK2, SK2)])
def test_vault_keys_reach_the_secret_seldon_reads(
    vault, kube_api, version, access_key, secret_key
) -> None:
    credentials = ObjectStoreCredentials(
        access_key_id=_ref("access_key_id", version),
        secret_access_key=_ref("secret_access_key", version),
        vault=vault,
        endpoint_url="http://minio.minio-system.svc.cluster.local:9000",
        region="eu-west-1",
        provider="Minio",
    )
    name = f"minio-v{version or 'latest'}"
    stored = _apply_and_read_back(kube_api, credentials.kubernetes_secret(name, NAMESPACE))
    assert stored["data"] == {
        "RCLONE_CONFIG_S3_TYPE": "s3",
        "RCLONE_CONFIG_S3_PROVIDER": "Minio",
        "RCLONE_CONFIG_S3_ENV_AUTH": "false",
        "RCLONE_CONFIG_S3_ACCESS_KEY_ID": access_key,
        "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": secret_key,
        "RCLONE_CONFIG_S3_ENDPOINT": "http://minio.minio-system.svc.cluster.local:9000",
        "RCLONE_CONFIG_S3_REGION": "eu-west-1",
    }
    assert stored["type"] == "Opaque"
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ctcd"


@pytest.mark.usefixtures("namespace")
def test_plain_keys_without_vault_reach_the_secret(kube_api) -> None:
    credentials = ObjectStoreCredentials(
        access_key_id=SecretStr(PLAIN_AK), secret_access_key=SecretStr(PLAIN_SK)
    )
    stored = _apply_and_read_back(kube_api, credentials.kubernetes_secret("aws", NAMESPACE))
    assert stored["data"] == {
        "RCLONE_CONFIG_S3_TYPE": "s3",
        "RCLONE_CONFIG_S3_PROVIDER": "AWS",
        "RCLONE_CONFIG_S3_ENV_AUTH": "false",
        "RCLONE_CONFIG_S3_ACCESS_KEY_ID": PLAIN_AK,
        "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": PLAIN_SK,
    }


def _no_value_in(*texts: str) -> None:
    for text in texts:
        shown = [value for value in VALUES if value in text]
        assert not shown, f"secret values {shown} appear in: {text}"


def test_saved_block_keeps_the_reference_and_shows_no_value(vault) -> None:
    ObjectStoreCredentials(
        access_key_id=_ref("access_key_id", version=1),
        secret_access_key=SecretStr(PLAIN_SK),
        vault=vault,
    ).save("object-store-test", overwrite=True)
    loaded = ObjectStoreCredentials.load("object-store-test")
    assert loaded.access_key_id == _ref("access_key_id", version=1)  # a reference, not a value
    keys = loaded.resolve()
    assert keys.access_key_id.get_secret_value() == AK1
    assert keys.secret_access_key.get_secret_value() == PLAIN_SK
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "object-store-test", "object-store-credentials", include_secrets=False
        )
    _no_value_in(repr(loaded), str(loaded), repr(loaded.model_dump()), repr(keys), str(keys))
    _no_value_in(repr(document), str(document.data))


@pytest.mark.parametrize(
    ("path", "key", "words"),
    [
        ("ctcd/missing", "access_key_id", "secret 'secret/ctcd/missing' key 'access_key_id': no"),
        ("ctcd/s3", "access_key", "key 'access_key': no such key \\(its keys: access_key_id, "),
    ],
)
def test_missing_vault_secret_is_named_without_values(vault, path, key, words) -> None:
    credentials = ObjectStoreCredentials(
        access_key_id=_ref(key, path=path), secret_access_key=SecretStr(PLAIN_SK), vault=vault
    )
    for call in (credentials.resolve, lambda: credentials.kubernetes_secret("s", NAMESPACE)):
        with pytest.raises(VaultError, match=words) as info:
            call()
        shown = "".join(traceback.format_exception(info.value))  # what a Prefect log would show
        assert vault.address in shown and "ObjectStoreCredentials.access_key_id" in shown
        _no_value_in(shown)


def test_vault_reference_without_a_vault_block_is_a_clear_error() -> None:
    credentials = ObjectStoreCredentials(
        access_key_id=SecretStr(PLAIN_AK), secret_access_key=_ref("secret_access_key")
    )
    for call in (credentials.resolve, lambda: credentials.kubernetes_secret("s", NAMESPACE)):
        with pytest.raises(ValueError, match="no `vault` credentials") as info:
            call()
        message = str(info.value)
        assert "secret_access_key refers to Vault (secret 'secret/ctcd/s3'" in message
        _no_value_in(message)
