"""Credentials from HashiCorp Vault (or OpenBao): a block that authenticates and builds hvac
clients, and references to KV v2 secrets that are resolved only at run time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import hvac
import requests
from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, model_validator

from blocks.ui import logo, refuse_masked
from ctcd.exceptions import VaultError

K8S_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class VaultCredentials(Block):
    """Authenticates to Vault by token, AppRole (role_id + secret_id) or Kubernetes
    service-account JWT, and returns authenticated hvac clients.

    Example:
        ```python
        from blocks import VaultCredentials

        credentials = VaultCredentials.load("BLOCK_NAME")
        client = credentials.get_client()
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True)  # never echo a secret

    _block_type_name = "Vault Credentials"
    _block_type_slug = "vault-credentials"
    _logo_url = logo("secret")
    _description = "Authenticates to HashiCorp Vault or OpenBao and builds hvac clients."
    _documentation_url = HttpUrl("https://python-hvac.org/en/stable/overview.html")

    address: str = Field(description="Vault's address, e.g. `https://vault.internal:8200`.")
    namespace: str | None = Field(default=None, description="Vault Enterprise namespace, if any.")
    verify: bool | str = Field(
        default=True, description="Verify TLS: true, false, or the path of a CA bundle."
    )
    auth_method: Literal["token", "approle", "kubernetes"] = Field(
        default="token", description="How to log in: `token`, `approle` or `kubernetes`."
    )
    token: SecretStr | None = Field(default=None, description="Token, for `token` auth.")
    role_id: str | None = Field(default=None, description="AppRole role id, for `approle` auth.")
    secret_id: SecretStr | None = Field(
        default=None, description="AppRole secret id, for `approle` auth."
    )
    role: str | None = Field(default=None, description="Vault role, for `kubernetes` auth.")
    jwt_path: str = Field(
        default=K8S_JWT, description="Service-account token file, for `kubernetes` auth."
    )
    auth_mount: str | None = Field(
        default=None, description="Mount of the auth method (default: its type's name)."
    )
    timeout: float = Field(default=10.0, gt=0, description="Seconds per request to Vault.")

    @model_validator(mode="after")
    def _real_secrets(self) -> VaultCredentials:
        refuse_masked(self)
        return self

    def get_client(self) -> hvac.Client:
        """An authenticated client. AppRole and Kubernetes log in anew each time, so an
        expired token is replaced; a static token that no longer works is an error."""
        client = hvac.Client(
            url=self.address, namespace=self.namespace, verify=self.verify, timeout=self.timeout
        )
        try:
            self._login(client)
            token = _lookup_self(client)
        except requests.exceptions.RequestException:
            raise VaultError(
                self.address, "unreachable", "the address and that Vault runs"
            ) from None
        except hvac.exceptions.VaultDown:
            raise VaultError(self.address, "sealed", "that Vault is unsealed") from None
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest, OSError) as err:
            raise VaultError(
                self.address,
                f"{self.auth_method} login failed ({type(err).__name__})",
                f"the {self.auth_method} credentials and the auth mount",
            ) from None
        if token is None:
            raise VaultError(
                self.address,
                "the token is invalid, expired or revoked",
                "the token, or use AppRole or Kubernetes auth, which log in anew",
            )
        if self.auth_method == "token":
            _renew(client, token)
        return client

    def _login(self, client: hvac.Client) -> None:
        if self.auth_method == "token":
            if self.token is None:
                raise VaultError(self.address, "no token given", "the block's `token` field")
            client.token = self.token.get_secret_value()
        elif self.auth_method == "approle":
            if self.role_id is None or self.secret_id is None:
                raise VaultError(self.address, "AppRole needs role_id and secret_id", "the block")
            client.auth.approle.login(
                role_id=self.role_id,
                secret_id=self.secret_id.get_secret_value(),
                mount_point=self.auth_mount or "approle",
            )
        else:
            if self.role is None:
                raise VaultError(self.address, "Kubernetes auth needs a role", "the block's `role`")
            try:
                jwt = Path(self.jwt_path).read_text().strip()
            except OSError as err:
                raise VaultError(
                    self.address,
                    f"cannot read the service-account token file {self.jwt_path} "
                    f"({err.strerror or type(err).__name__})",
                    "the block's `jwt_path`, and that the pod mounts its service-account token",
                ) from None
            if not jwt:
                raise VaultError(
                    self.address,
                    f"the service-account token file {self.jwt_path} is empty",
                    "the block's `jwt_path`",
                )
            client.auth.kubernetes.login(
                role=self.role, jwt=jwt, mount_point=self.auth_mount or "kubernetes"
            )

    def read_secret(
        self, path: str, key: str, version: int | None = None, mount_point: str = "secret"
    ) -> SecretStr:
        """The value at `key` of the KV v2 secret `mount_point/path` (latest or `version`)."""
        where = f"{mount_point}/{path}"
        try:
            client = self.get_client()
        except VaultError as err:  # name what was being read, too
            raise VaultError(err.address, err.problem, err.check, where, key) from None
        try:
            response = client.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount_point, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            problem = "no such secret" + (f" version {version}" if version else "")
            raise VaultError(
                self.address,
                problem,
                f"the path, and that '{mount_point}' is a KV "
                "v2 mount (a KV v1 mount has no versions)",
                where,
                key,
            ) from None
        except hvac.exceptions.Forbidden:
            raise VaultError(
                self.address, "permission denied", "the policy of these credentials", where, key
            ) from None
        except requests.exceptions.RequestException:
            raise VaultError(self.address, "unreachable", "that Vault runs", where, key) from None
        data = response["data"]["data"]
        if key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise VaultError(self.address, f"no such key (its keys: {keys})", "the key", where, key)
        return SecretStr(str(data[key]))


def _lookup_self(client: hvac.Client) -> dict[str, Any] | None:
    """The client's token as Vault describes it, or None if Vault refuses it (what hvac's
    `is_authenticated()` checks, keeping the answer for `_renew`)."""
    try:
        return dict(client.auth.token.lookup_self()["data"])
    except (
        hvac.exceptions.Forbidden,
        hvac.exceptions.InvalidPath,
        hvac.exceptions.InvalidRequest,
    ):
        return None


def _renew(client: hvac.Client, token: dict[str, Any]) -> None:
    """Renew a renewable static token once less than half its lifetime is left, so a
    long-lived block keeps working; a token past its maximum TTL cannot be renewed."""
    ttl, lifetime = int(token.get("ttl") or 0), int(token.get("creation_ttl") or 0)
    if token.get("renewable") and 0 < ttl < lifetime / 2:
        client.auth.token.renew_self(increment=lifetime)


class VaultSecret(BaseModel):
    """A reference to a secret, resolved only at run time: where a credential goes, store
    this, never the value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path under the KV v2 mount, e.g. `ctcd/mlflow`.")
    key: str = Field(description="Key within the secret, e.g. `password`.")
    version: int | None = Field(default=None, description="KV v2 version; default the latest.")
    mount_point: str = Field(default="secret", description="The KV v2 mount.")

    def where(self) -> str:
        """Where it lives, for messages: `secret 'MOUNT/PATH' key 'KEY'`."""
        return f"secret '{self.mount_point}/{self.path}' key '{self.key}'"

    def resolve(self, credentials: VaultCredentials) -> SecretStr:
        return credentials.read_secret(self.path, self.key, self.version, self.mount_point)
