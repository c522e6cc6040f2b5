"""Where MLflow runs and models go, and the credentials to get there: a block every flow takes
by name (`tracking=`). Passwords and tokens are `SecretStr`s or `VaultSecret` references,
resolved only when a flow starts, and handed to MLflow through its own environment
variables for the length of the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import requests
from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, HttpUrl, SecretStr, model_validator

from blocks.ui import invalid_saved_block, logo, optional_nested, refuse_masked
from blocks.vault import VaultCredentials, VaultSecret
from ctcd.exceptions import ModelConfigError, TrackingError

# Every variable `activate()` manages; those the block leaves unset are removed meanwhile.
MANAGED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


class MLflowTracking(Block):
    """An MLflow tracking server (or local store), its model registry, the experiment, and
    the credentials: username and password, or a token, each given directly or as a
    reference to a Vault secret. Flows take it by name: `tracking="BLOCK_NAME"`.

    Example:
        ```python
        from blocks import MLflowTracking

        tracking = MLflowTracking.load("BLOCK_NAME")
        with tracking.activate():
            ...  # MLflow calls here use this server and these credentials
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "MLflow Tracking"
    _block_type_slug = "mlflow-tracking"
    _logo_url = logo("webhook")
    _description = "MLflow tracking and registry URIs, experiment, and credentials (or Vault)."
    _documentation_url = HttpUrl(
        "https://mlflow.org/docs/latest/self-hosting/security/basic-http-auth/"
    )

    tracking_uri: str | None = Field(
        default=None,
        description="e.g. `https://mlflow.internal`; default `MLFLOW_TRACKING_URI`, else "
        "SQLite in `CTCD_HOME`. Never put a password in it: use `password`.",
    )
    registry_uri: str | None = Field(
        default=None, description="Model registry URI, if not the tracking server."
    )
    experiment_name: str | None = Field(
        default=None, description="Experiment for runs whose flow names none (default: model)."
    )
    username: str | None = Field(default=None, description="User, for basic authentication.")
    password: SecretStr | VaultSecret | None = Field(
        default=None, description="Password for `username`: the value, or a Vault reference."
    )
    token: SecretStr | VaultSecret | None = Field(
        default=None, description="Bearer token instead of username and password."
    )
    vault: VaultCredentials | None = optional_nested(
        "Vault", "Vault to resolve `VaultSecret` references with (none: no Vault)."
    )
    verify: bool | str = Field(
        default=True, description="Verify TLS: true, false, or the path of a CA bundle."
    )
    request_retries: int = Field(
        default=2, ge=0, description="Retries per MLflow request (MLflow's default is 7, ~4 min)."
    )
    request_timeout: float = Field(default=60, gt=0, description="Seconds per MLflow request.")

    @model_validator(mode="after")
    def _consistent(self) -> MLflowTracking:
        refuse_masked(self)
        for uri, name in ((self.tracking_uri, "tracking_uri"), (self.registry_uri, "registry_uri")):
            if uri and urlparse(uri).password is not None:
                raise ValueError(f"{name} holds a password: remove it and set `password`")
        if self.password is not None and self.token is not None:
            raise ValueError("give either username and password or a token, not both")
        if (self.password is None) != (self.username is None):
            raise ValueError("username and password go together")
        refs = any(isinstance(s, VaultSecret) for s in (self.password, self.token))
        if refs and self.vault is None:
            raise ValueError("a VaultSecret needs the `vault` field (a VaultCredentials block)")
        return self

    def uri(self) -> str:
        from ctcd.settings import tracking_uri

        return self.tracking_uri or tracking_uri()

    def source(self, field: str) -> str:
        """Where a credential comes from, for messages (never its value)."""
        value = getattr(self, field)
        if isinstance(value, VaultSecret) and self.vault is not None:
            return f"the {field} in Vault at {self.vault.address}, {value.where()}"
        return f"the block's `{field}`"

    def _secret(self, value: SecretStr | VaultSecret | None) -> SecretStr | None:
        if isinstance(value, VaultSecret):
            assert self.vault is not None  # checked by _consistent
            return value.resolve(self.vault)
        return value

    def environment(self) -> dict[str, str | None]:
        """MLflow's variables for this block, secrets resolved (None: unset). Only for
        `activate()`: never log or store it."""
        password, token = self._secret(self.password), self._secret(self.token)
        env: dict[str, str | None] = dict.fromkeys(MANAGED)
        env.update(
            MLFLOW_TRACKING_URI=self.uri(),
            MLFLOW_REGISTRY_URI=self.registry_uri,
            MLFLOW_EXPERIMENT_NAME=self.experiment_name,
            MLFLOW_TRACKING_USERNAME=self.username,
            MLFLOW_TRACKING_PASSWORD=password.get_secret_value() if password else None,
            MLFLOW_TRACKING_TOKEN=token.get_secret_value() if token else None,
            MLFLOW_TRACKING_INSECURE_TLS="true" if self.verify is False else None,
            MLFLOW_TRACKING_SERVER_CERT_PATH=self.verify if isinstance(self.verify, str) else None,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(self.request_retries),
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(self.request_timeout)),
        )
        return env

    def check(self, env: dict[str, str | None]) -> None:
        """Fail early and clearly: one authenticated request to an HTTP tracking server."""
        uri = env["MLFLOW_TRACKING_URI"] or ""
        if urlparse(uri).scheme not in ("http", "https"):
            if self.password is not None or self.token is not None:
                raise TrackingError(uri, "credentials need an HTTP(S) server", "`tracking_uri`")
            return
        auth: Any = None
        headers = {}
        if env["MLFLOW_TRACKING_TOKEN"]:
            headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
        elif env["MLFLOW_TRACKING_USERNAME"]:
            auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
        response = probe(uri, self.request_timeout, auth, headers, self.verify)
        who = "the token" if self.token is not None else f"user '{self.username}'"
        what = "token" if self.token is not None else "password"
        if response.status_code == 401:
            problem = f"it refused {who} (401)" if auth or headers else "it needs credentials"
            check = self.source(what) if auth or headers else "`username` and `password`"
            raise TrackingError(uri, problem, check)
        if response.status_code == 403:
            raise TrackingError(uri, f"{who} may not read experiments (403)", "its permissions")
        if response.status_code != 200:
            raise TrackingError(uri, f"it answered HTTP {response.status_code}", "the URI")

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Resolve the credentials, check the server, and point MLflow at it until exit.
        The variables are process-wide: one tracking block per process at a time."""
        env = self.environment()
        self.check(env)
        saved = {name: os.environ.get(name) for name in MANAGED}
        _apply(env)
        try:
            yield
        finally:
            _apply(saved)


PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
PREFLIGHT_TIMEOUT = 10.0


def probe(
    uri: str, timeout: float, auth: Any = None, headers: Any = None, verify: bool | str = True
) -> requests.Response:
    """One request to an HTTP tracking server (no retries); `TrackingError` if none answers."""
    try:
        return requests.get(
            uri.rstrip("/") + PROBE, auth=auth, headers=headers, verify=verify, timeout=timeout
        )
    except requests.RequestException as err:
        raise TrackingError(
            uri,
            f"unreachable (GET {PROBE} with a {timeout:g} s timeout: {type(err).__name__}); "
            "nothing was trained, registered or deployed",
            "that the server runs (start it) and that MLFLOW_TRACKING_URI or the tracking "
            "block's `tracking_uri` names it",
        ) from None


def check_configured() -> None:
    """Before a flow's work, with no tracking block: bound MLflow's retries and make sure the
    HTTP tracking server `MLFLOW_TRACKING_URI` names answers (a local store needs nothing)."""
    from ctcd.settings import tracking_uri

    uri = tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    )
    response = probe(uri, PREFLIGHT_TIMEOUT, verify=verify)
    if response.status_code >= 500:
        raise TrackingError(uri, f"it answered HTTP {response.status_code}", "the server's log")


def _apply(env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def use_tracking(name: str | None) -> Iterator[MLflowTracking | None]:
    """The saved tracking block `name`, checked and active until exit; None keeps
    `MLFLOW_TRACKING_URI` (or local SQLite) as it is, once its server answered."""
    if name is None:
        check_configured()
        yield None
        return
    try:
        block = MLflowTracking.load(name)
        if not isinstance(block, MLflowTracking):
            raise ValueError(name)
    except RuntimeError as err:
        if (why := invalid_saved_block(err, "MLflow tracking block", name)) is None:
            raise
        raise ModelConfigError(why) from err
    except ValueError as err:
        raise ModelConfigError(
            f"No MLflow tracking block named '{name}'. Save one (README, 'Credentials') or "
            "pass tracking=None to use MLFLOW_TRACKING_URI or the local SQLite store."
        ) from err
    with block.activate():
        yield block
