"""VaultCredentials and VaultSecret against a real OpenBao server (Vault's API), dev mode on
loopback: token and AppRole auth, least privilege, KV v2 versions, and every failure named
without the secret's value."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from pydantic import SecretStr

from blocks import VaultCredentials, VaultSecret
from ctcd.exceptions import VaultError
from tests.processes import loopback_port, start_logged, stop_group, wait_healthy

pytestmark = pytest.mark.server

BAO = Path(sys.executable).with_name("bao")
ROOT_TOKEN = "ctcd-test-root"
OLD, NEW = "first-Pa55word-value", "second-Pa55word-value"


def _start_bao(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = loopback_port()
    address = f"http://127.0.0.1:{port}"
    cmd = [str(BAO), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}"]
    cmd.append(f"-dev-listen-address=127.0.0.1:{port}")
    proc = start_logged(cmd, tmp / "bao.log", env={**os.environ, "HOME": str(tmp)})
    wait_healthy(proc, f"{address}/v1/sys/health", tmp / "bao.log", 10)
    return proc, address


@pytest.fixture(scope="module")
def bao(tmp_path_factory) -> Iterator[dict[str, str]]:
    """OpenBao with secret/ctcd/mlflow at two versions, a KV v1 mount, and an AppRole that
    may only read that one secret."""
    proc, address = _start_bao(tmp_path_factory.mktemp("bao"))
    try:
        root = hvac.Client(url=address, token=ROOT_TOKEN)
        root.secrets.kv.v2.create_or_update_secret("ctcd/mlflow", {"password": OLD, "user": "ci"})
        root.secrets.kv.v2.create_or_update_secret("ctcd/mlflow", {"password": NEW, "user": "ci"})
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        root.secrets.kv.v1.create_or_update_secret(
            "ctcd/mlflow", {"password": NEW}, mount_point="kv1"
        )
        root.sys.create_or_update_policy(
            "ctcd-read", 'path "secret/data/ctcd/mlflow" { capabilities = ["read"] }'
        )
        root.sys.enable_auth_method("approle")
        root.auth.approle.create_or_update_approle("ctcd", token_policies=["ctcd-read"])
        role_id = root.auth.approle.read_role_id("ctcd")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id("ctcd")["data"]["secret_id"]
        yield {"address": address, "role_id": role_id, "secret_id": secret_id}
    finally:
        stop_group(proc, 10)


def _token(bao: dict[str, str], token: str = ROOT_TOKEN) -> VaultCredentials:
    return VaultCredentials(address=bao["address"], token=SecretStr(token))


def test_token_auth_reads_the_latest_and_a_given_version(bao) -> None:
    credentials = _token(bao)
    latest = VaultSecret(path="ctcd/mlflow", key="password").resolve(credentials)
    assert isinstance(latest, SecretStr) and latest.get_secret_value() == NEW
    assert NEW not in repr(latest) and NEW not in str(latest)
    first = VaultSecret(path="ctcd/mlflow", key="password", version=1).resolve(credentials)
    assert first.get_secret_value() == OLD
    assert ROOT_TOKEN not in repr(credentials) and ROOT_TOKEN not in str(credentials.model_dump())


def test_approle_reads_its_one_path_and_may_not_write(bao) -> None:
    credentials = VaultCredentials(
        address=bao["address"],
        auth_method="approle",
        role_id=bao["role_id"],
        secret_id=SecretStr(bao["secret_id"]),
    )
    assert credentials.read_secret("ctcd/mlflow", "user").get_secret_value() == "ci"
    with pytest.raises(hvac.exceptions.Forbidden):
        credentials.get_client().secrets.kv.v2.create_or_update_secret("ctcd/mlflow", {"x": "y"})
    with pytest.raises(VaultError, match="permission denied.*policy"):
        credentials.read_secret("ctcd/other", "password")
    assert bao["secret_id"] not in repr(credentials)


@pytest.mark.parametrize(
    ("path", "key", "version", "mount", "words"),
    [
        (
            "ctcd/missing",
            "password",
            None,
            "secret",
            "secret 'secret/ctcd/missing' key 'password': no such secret",
        ),
        (
            "ctcd/mlflow",
            "passwd",
            None,
            "secret",
            "key 'passwd': no such key \\(its keys: password, user\\)",
        ),
        ("ctcd/mlflow", "password", 9, "secret", "no such secret version 9"),
        ("ctcd/mlflow", "password", None, "kv1", "KV v1 mount has no versions"),
    ],
)
def test_missing_secrets_are_named_without_values(bao, path, key, version, mount, words) -> None:
    with pytest.raises(VaultError, match=words) as info:
        _token(bao).read_secret(path, key, version, mount)
    message = str(info.value)
    assert bao["address"] in message and NEW not in message and OLD not in message


def test_wrong_token_and_unreachable_vault(bao) -> None:
    with pytest.raises(VaultError, match="token is invalid, expired or revoked"):
        _token(bao, "not-a-token").get_client()
    nowhere = f"http://127.0.0.1:{loopback_port()}"
    with pytest.raises(VaultError, match=f"Vault at {nowhere}: unreachable"):
        VaultCredentials(address=nowhere, token=SecretStr("x"), timeout=2).get_client()


def test_sealed_vault_is_named(tmp_path) -> None:
    proc, address = _start_bao(tmp_path)
    try:
        hvac.Client(url=address, token=ROOT_TOKEN).sys.seal()
        with pytest.raises(VaultError, match="sealed"):
            VaultCredentials(address=address, token=SecretStr(ROOT_TOKEN)).read_secret("a", "b")
    finally:
        stop_group(proc, 10)


def test_a_renewable_token_is_renewed_and_a_revoked_one_is_named(bao) -> None:
    # Waits are driven by what Vault reports, with ~10 s of slack for a stalled machine.
    lifetime = 20
    root = hvac.Client(url=bao["address"], token=ROOT_TOKEN)
    short = root.auth.token.create(policies=["ctcd-read"], ttl=f"{lifetime}s", renewable=True)
    expires = time.monotonic() + lifetime
    token = short["auth"]["client_token"]
    credentials = _token(bao, token)

    def ttl() -> int:
        return int(root.auth.token.lookup(token)["data"]["ttl"])

    assert credentials.read_secret("ctcd/mlflow", "password").get_secret_value() == NEW
    assert ttl() > lifetime / 2, "the machine stalled: half the lifetime passed already"
    while (before := ttl()) >= lifetime / 2:  # until under half its lifetime is left
        time.sleep(0.2)
    assert credentials.read_secret("ctcd/mlflow", "password").get_secret_value() == NEW
    assert ttl() > before, f"not renewed: {ttl()} s left, {before} s before the read"
    time.sleep(max(0.0, expires - time.monotonic()) + 1)  # past the original expiry
    assert credentials.read_secret("ctcd/mlflow", "password").get_secret_value() == NEW

    root.auth.token.revoke(token)
    with pytest.raises(VaultError, match="invalid, expired or revoked") as err:
        credentials.read_secret("ctcd/mlflow", "password")
    assert "secret 'secret/ctcd/mlflow' key 'password'" in str(err.value)
    assert token not in str(err.value)


def test_unreachable_vault_names_the_secret_it_was_reading() -> None:
    nowhere = f"http://127.0.0.1:{loopback_port()}"
    credentials = VaultCredentials(address=nowhere, token=SecretStr("x"), timeout=2)
    with pytest.raises(VaultError) as err:
        credentials.read_secret("ctcd/mlflow", "password")
    assert str(err.value).startswith(
        f"Vault at {nowhere}, secret 'secret/ctcd/mlflow' key 'password': unreachable."
    )
