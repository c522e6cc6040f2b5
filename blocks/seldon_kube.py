"""The Kubernetes calls `SeldonModelDeployer` makes (kubernetes_asyncio, as prefect-kubernetes
uses): one API session per operation, optimistic-concurrency updates, readiness polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import (
    ApiClient,
    AppsV1Api,
    Configuration,
    CoreV1Api,
    CustomObjectsApi,
)
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from prefect_kubernetes.credentials import KubernetesClusterConfig

from blocks.seldon_manifest import GROUP, OWNER_LABEL, PLURAL, SELECTOR, VERSION, readiness
from ctcd.exceptions import ModelServerError

CONFLICT_RETRIES = 10
POLL_SECONDS = 0.5


class SeldonFailed(ModelServerError):
    """The operator reported `Failed` for the resource."""


@dataclass
class Session:
    """Typed clients over one API connection, scoped to a namespace."""

    client: ApiClient
    namespace: str

    @property
    def custom(self) -> Any:
        return CustomObjectsApi(self.client)

    @property
    def apps(self) -> Any:
        return AppsV1Api(self.client)

    @property
    def core(self) -> Any:
        return CoreV1Api(self.client)

    def plain(self, obj: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return result

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            sdep: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return sdep

    async def find(self, selector: str = SELECTOR) -> list[dict[str, Any]]:
        found = await self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=selector
        )
        items: list[dict[str, Any]] = found["items"]
        return items

    async def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create the resource; None when it exists already (another deploy made it)."""
        try:
            sdep: dict[str, Any] = await self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body
            )
        except ApiException as err:
            if err.status == 409:
                return None
            raise
        return sdep

    async def change(
        self, name: str, mutate: Callable[[dict[str, Any]], None]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read, `mutate` and write back with the read `resourceVersion`, again on a conflict
        (someone else wrote in between). Returns (before, after)."""
        for _ in range(CONFLICT_RETRIES):
            before = await self.get(name)
            if before is None:
                raise ModelServerError(f"Updating SeldonDeployment {name}", "it was deleted")
            after = {k: v for k, v in before.items() if k != "status"}
            after = _copy(after)
            mutate(after)
            try:
                written = await self.custom.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, after
                )
            except ApiException as err:
                if err.status == 409:
                    continue
                raise
            return before, written
        raise ModelServerError(
            f"Updating SeldonDeployment {name}",
            f"{CONFLICT_RETRIES} conflicting writes in a row; try again",
        )

    async def delete(self, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as err:
            if err.status != 404:
                raise

    async def predictor_deployments(self, name: str) -> list[dict[str, Any]]:
        found = await self.apps.list_namespaced_deployment(
            self.namespace, label_selector=f"{OWNER_LABEL}={name}"
        )
        return [self.plain(item) for item in found.items]

    async def wait_ready(
        self, name: str, model_uri: str, replicas: int, timeout: float
    ) -> dict[str, Any]:
        """Poll until `readiness` holds; raise on `Failed` or when `timeout` passes."""
        deadline = time.monotonic() + timeout
        seen = "nothing yet"
        while True:
            sdep = await self.get(name)
            if sdep is None:
                raise ModelServerError(f"Waiting for SeldonDeployment {name}", "it was deleted")
            found = await self.predictor_deployments(name)
            ready, seen = readiness(sdep, found, model_uri, replicas)
            if ready:
                return sdep
            status = sdep.get("status") or {}
            if status.get("state") == "Failed":
                raise SeldonFailed(
                    f"Serving {model_uri} with SeldonDeployment {name}",
                    f"Seldon reports Failed: {status.get('description') or 'no description'}",
                )
            if time.monotonic() > deadline:
                raise ModelServerError(
                    f"Waiting for SeldonDeployment {name} in namespace {self.namespace}",
                    f"not ready after {timeout:.0f} s; last seen: {seen}",
                    hint="Check the predictor pods (`kubectl describe pods -l "
                    f"{OWNER_LABEL}={name}`) or raise the deployer's `deploy_timeout`.",
                )
            await asyncio.sleep(POLL_SECONDS)

    async def put_secret(self, body: dict[str, Any]) -> None:
        """Create or replace the Secret. Errors name it but never carry its data."""
        name = body["metadata"]["name"]
        try:
            try:
                await self.core.create_namespaced_secret(self.namespace, body)
            except ApiException as err:
                if err.status != 409:
                    raise
                await self.core.replace_namespaced_secret(name, self.namespace, body)
        except ApiException as err:
            if err.status in (401, 403):
                raise  # the refusal names no data: the deployer says what grants it
            raise ModelServerError(
                f"Writing Secret {name} in namespace {self.namespace}",
                f"HTTP {err.status} {err.reason}",
            ) from None

    async def delete_secret_if_unused(self, secret: str, deleted: str = "") -> bool:
        """Delete the Secret unless a SeldonDeployment in the namespace still names it (one
        being deleted, or `deleted`, does not count)."""
        for sdep in await self.find(selector=""):
            meta = sdep["metadata"]
            if meta["name"] == deleted or meta.get("deletionTimestamp"):
                continue
            for pred in sdep.get("spec", {}).get("predictors", []):
                if pred.get("graph", {}).get("envSecretRefName") == secret:
                    return False
        try:
            await self.core.delete_namespaced_secret(secret, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
        return True


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(data)


@asynccontextmanager
async def session(
    cluster_config: KubernetesClusterConfig | None, namespace: str
) -> AsyncIterator[Session]:
    """An API session: `cluster_config` when given, else in-cluster, else KUBECONFIG (or
    ~/.kube/config), as prefect-kubernetes resolves them."""
    configuration = Configuration()
    if cluster_config is not None:
        await kube_config.load_kube_config_from_dict(
            config_dict=cluster_config.config,
            context=cluster_config.context_name,
            client_configuration=configuration,
        )
    else:
        try:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except ConfigException:
            await kube_config.load_kube_config(client_configuration=configuration)
    async with ApiClient(configuration=configuration) as client:
        yield Session(client, namespace)
