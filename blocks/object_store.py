"""Credentials for S3-compatible object stores (AWS S3, MinIO, GCS interoperability), given as
plain secrets or as Vault references resolved only at run time, and the Kubernetes Secrets that
Seldon Core v1's rclone storage initializer and KServe's S3 credential builder read."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, model_validator

from blocks.ui import logo, optional_nested, refuse_masked
from blocks.vault import VaultCredentials, VaultSecret
from ctcd.exceptions import ModelConfigError

MANAGED_BY = {"app.kubernetes.io/managed-by": "ctcd"}


class ObjectStoreKeys(BaseModel):
    """Resolved keys of an object store; `repr()` and `str()` show no value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key_id: SecretStr = Field(description="The access key id.")
    secret_access_key: SecretStr = Field(description="The secret access key.")


class ObjectStoreCredentials(Block):
    """Access keys for an S3-compatible object store, each a secret or a reference to a KV v2
    secret in Vault (resolved with the `vault` block only when used), and the Kubernetes
    Secrets that Seldon Core v1's storage initializer (`envSecretRefName`) and KServe's
    (through a service account) read.

    Example:
        ```python
        from blocks import ObjectStoreCredentials

        credentials = ObjectStoreCredentials.load("BLOCK_NAME")
        keys = credentials.resolve()
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True)  # never echo a secret

    _block_type_name = "Object Store Credentials"
    _block_type_slug = "object-store-credentials"
    _logo_url = logo("aws")
    _description = (
        "Access keys for an S3-compatible object store (AWS S3, MinIO, GCS), "
        "plain or from Vault, and the Secrets Seldon Core v1 and KServe read."
    )
    _documentation_url = HttpUrl(
        "https://docs.seldon.ai/seldon-core-1/configuration/servers/overview"
    )

    access_key_id: SecretStr | VaultSecret = Field(
        description="Access key id: the value, or a Vault reference (path, key, version)."
    )
    secret_access_key: SecretStr | VaultSecret = Field(
        description="Secret access key: the value, or a Vault reference (path, key, version)."
    )
    vault: VaultCredentials | None = optional_nested(
        "Vault", "Vault credentials that resolve the Vault references (none: no Vault)."
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of a store other than AWS, e.g. `http://minio.minio:9000`.",
    )
    region: str | None = Field(default=None, description="Region, e.g. `eu-west-1`.")
    provider: str = Field(
        default="AWS", description="The rclone S3 provider: `AWS`, `Minio`, `GCS`, `Ceph`, ..."
    )

    @model_validator(mode="after")
    def _real_secrets(self) -> ObjectStoreCredentials:
        refuse_masked(self)
        return self

    def resolve(self) -> ObjectStoreKeys:
        """The keys, read from Vault now for the fields that are Vault references."""
        return ObjectStoreKeys(
            access_key_id=self._resolve("access_key_id", self.access_key_id),
            secret_access_key=self._resolve("secret_access_key", self.secret_access_key),
        )

    def _resolve(self, field: str, value: SecretStr | VaultSecret) -> SecretStr:
        if isinstance(value, SecretStr):
            return value
        if self.vault is None:
            raise ModelConfigError(
                f"ObjectStoreCredentials.{field} refers to Vault ({value.where()}) but the block "
                "has no `vault` credentials to read it with. Set "
                f"`vault=VaultCredentials.load(...)`, or give `{field}` as a SecretStr."
            )
        try:
            return value.resolve(self.vault)
        except Exception as err:
            err.add_note(f"(resolving ObjectStoreCredentials.{field})")
            raise

    def kubernetes_secret(self, name: str, namespace: str) -> dict[str, Any]:
        """A `v1 Secret` manifest of rclone environment variables for the `s3` remote, as
        Seldon Core v1's rclone storage initializer reads it: name it in a predictor's
        `envSecretRefName` and use `modelUri: s3://bucket/path`.

        The manifest holds the keys in plain text: send it only to the Kubernetes API server.
        Never log it, print it, return it from a task or put it in a flow parameter or
        artifact."""
        keys = self.resolve()
        env = {
            "RCLONE_CONFIG_S3_TYPE": "s3",
            "RCLONE_CONFIG_S3_PROVIDER": self.provider,
            "RCLONE_CONFIG_S3_ENV_AUTH": "false",
            "RCLONE_CONFIG_S3_ACCESS_KEY_ID": keys.access_key_id.get_secret_value(),
            "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": keys.secret_access_key.get_secret_value(),
        }
        if self.endpoint_url:
            env["RCLONE_CONFIG_S3_ENDPOINT"] = self.endpoint_url
        if self.region:
            env["RCLONE_CONFIG_S3_REGION"] = self.region
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "type": "Opaque",
            "stringData": env,
        }

    def kserve_secret(self, name: str, namespace: str) -> dict[str, Any]:
        """A `v1 Secret` manifest as KServe's S3 credential builder reads it: the keys under
        `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (KServe's default `s3AccessKeyIDName` and
        `s3SecretAccessKeyName`) and the store's location in `serving.kserve.io/s3-*`
        annotations. List it in the predictor's service account: KServe injects it into the
        storage initializer as `secretKeyRef`s.

        The manifest holds the keys in plain text: send it only to the Kubernetes API server.
        Never log it, print it, return it from a task or put it in a flow parameter or
        artifact."""
        keys = self.resolve()
        notes = {}
        if self.endpoint_url:
            endpoint = urlparse(self.endpoint_url)
            notes["serving.kserve.io/s3-endpoint"] = endpoint.netloc
            notes["serving.kserve.io/s3-usehttps"] = "0" if endpoint.scheme == "http" else "1"
        if self.region:
            notes["serving.kserve.io/s3-region"] = self.region
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(MANAGED_BY),
                "annotations": notes,
            },
            "type": "Opaque",
            "stringData": {
                "AWS_ACCESS_KEY_ID": keys.access_key_id.get_secret_value(),
                "AWS_SECRET_ACCESS_KEY": keys.secret_access_key.get_secret_value(),
            },
        }
