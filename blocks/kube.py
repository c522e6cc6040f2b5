"""The Kubernetes plumbing both cluster deployers share (kubernetes_asyncio, as
prefect-kubernetes uses): one API session per operation, scoped to a namespace and a custom
resource; read-modify-write with the read `resourceVersion`, retried on conflicts; the Secrets
a deployer writes; the Deployments a controller owns and Kubernetes' own test of their rollout;
readiness polling; and API failures turned into errors that say what to do."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

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
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_kubernetes.credentials import KubernetesClusterConfig

from ctcd.exceptions import ModelServerError, RolloutFailed

CONFLICT_RETRIES = 10
POLL_SECONDS = 0.5
T = TypeVar("T")
S = TypeVar("S", bound="Session")
# (ready, what was seen, why it failed or None): a deployer's reading of its resource and the
# Deployments its controller owns.
Judge = Callable[[dict[str, Any], list[dict[str, Any]]], tuple[bool, str, str | None]]


@dataclass(frozen=True)
class Resource:
    """A namespaced custom resource kind."""

    group: str
    version: str
    plural: str
    kind: str


@dataclass
class Session:
    """Typed clients over one API connection, scoped to a namespace and a custom resource;
    `selector` finds the resources a deployer manages."""

    client: ApiClient
    namespace: str
    resource: Resource
    selector: str = ""

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

    def _where(self) -> tuple[str, str, str, str]:
        r = self.resource
        return r.group, r.version, self.namespace, r.plural

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                *self._where(), name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return found

    async def find(self, selector: str | None = None) -> list[dict[str, Any]]:
        """The resources matching `selector` (default: the deployer's own)."""
        label_selector = self.selector if selector is None else selector
        found = await self.custom.list_namespaced_custom_object(
            *self._where(), label_selector=label_selector
        )
        items: list[dict[str, Any]] = found["items"]
        return items

    async def create(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any] | None:
        """Create the resource; None when it exists already (another deploy made it). With
        `dry_run` the API server validates and returns what it would store, storing nothing."""
        options = {"dry_run": "All"} if dry_run else {}
        try:
            made: dict[str, Any] = await self.custom.create_namespaced_custom_object(
                *self._where(), body, **options
            )
        except ApiException as err:
            if err.status == 409:
                return None
            raise
        return made

    async def replace(self, name: str, body: dict[str, Any], dry_run: bool = False) -> Any:
        options = {"dry_run": "All"} if dry_run else {}
        return await self.custom.replace_namespaced_custom_object(
            *self._where(), name, body, **options
        )

    async def change(
        self,
        name: str,
        mutate: Callable[[dict[str, Any]], None],
        check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read, `mutate` and write back with the read `resourceVersion`, again on a conflict
        (someone else wrote in between). `check(sent, kept)` first sees what a dry run of the
        write would store. Returns (before, after)."""
        kind = self.resource.kind
        for _ in range(CONFLICT_RETRIES):
            before = await self.get(name)
            if before is None:
                raise ModelServerError(f"Updating {kind} {name}", "it was deleted")
            after = copy.deepcopy({k: v for k, v in before.items() if k != "status"})
            mutate(after)
            try:
                if check is not None:
                    check(after, await self.replace(name, after, dry_run=True))
                written: dict[str, Any] = await self.replace(name, after)
            except ApiException as err:
                if err.status == 409:
                    continue
                raise
            return before, written
        raise ModelServerError(
            f"Updating {kind} {name}", f"{CONFLICT_RETRIES} conflicting writes in a row; try again"
        )

    async def delete(self, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(*self._where(), name)
        except ApiException as err:
            if err.status != 404:
                raise

    async def deployments(self, selector: str) -> list[dict[str, Any]]:
        found = await self.apps.list_namespaced_deployment(self.namespace, label_selector=selector)
        return [self.plain(item) for item in found.items]

    async def wait(
        self,
        name: str,
        judge: Judge,
        selector: str,
        timeout: float,
        failed: type[RolloutFailed],
        hint: str,
    ) -> dict[str, Any]:
        """Poll the resource and the Deployments `selector` finds until `judge` says ready;
        raise `failed` when it says why not, or a timeout with what was last seen."""
        kind, deadline = self.resource.kind, time.monotonic() + timeout
        while True:
            found = await self.get(name)
            if found is None:
                raise ModelServerError(f"Waiting for {kind} {name}", "it was deleted")
            ready, seen, failure = judge(found, await self.deployments(selector))
            if ready:
                return found
            if failure is not None:
                raise failed(f"Serving {kind} {name}", failure)
            if time.monotonic() > deadline:
                raise ModelServerError(
                    f"Waiting for {kind} {name} in namespace {self.namespace}",
                    f"not ready after {timeout:.0f} s; last seen: {seen}",
                    hint=hint,
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

    async def unused(self, uses: Callable[[dict[str, Any]], bool], deleted: str = "") -> bool:
        """Whether no resource of this kind in the namespace `uses` something (one being
        deleted, or `deleted`, does not count)."""
        for item in await self.find(selector=""):
            meta = item["metadata"]
            if meta["name"] == deleted or meta.get("deletionTimestamp"):
                continue
            if uses(item):
                return False
        return True

    async def delete_secret(self, name: str) -> None:
        try:
            await self.core.delete_namespaced_secret(name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise


def owned(deployments: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """The Deployments whose owner reference names the resource with `uid`."""
    return [
        d
        for d in deployments
        if any(ref.get("uid") == uid for ref in d["metadata"].get("ownerReferences") or [])
    ]


def carries(deployment: dict[str, Any], model_uri: str) -> bool:
    """Whether the Deployment's pod template fetches `model_uri` (a storage initializer)."""
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
    return any(model_uri in (c.get("args") or []) for c in containers)


def rolled_out(deployment: dict[str, Any]) -> bool:
    """Kubernetes' own test for a finished rollout (as `kubectl rollout status`)."""
    meta, spec = deployment["metadata"], deployment["spec"]
    status = deployment.get("status") or {}
    want = spec.get("replicas", 1)
    return (
        (status.get("observedGeneration") or 0) >= meta.get("generation", 1)
        and (status.get("updatedReplicas") or 0) == want
        and (status.get("replicas") or 0) == want
        and (status.get("availableReplicas") or 0) == want
    )


@asynccontextmanager
async def session(
    cluster_config: KubernetesClusterConfig | None, namespace: str, make: Callable[[ApiClient], S]
) -> AsyncIterator[S]:
    """An API session made by `make`: `cluster_config` when given, else in-cluster, else
    KUBECONFIG (or ~/.kube/config), as prefect-kubernetes resolves them."""
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
        yield make(client)


def run(coro: Coroutine[Any, Any, T], deployer: str, missing: str) -> T:
    """Run one API operation; connection failures, refusals (401/403, through
    `kube_errors.refused`, naming the verb, resource and the Role that grants it) and a 404
    (`missing` says what may not be installed) become clear errors."""
    from aiohttp import ClientConnectionError

    from blocks.kube_errors import refused

    try:
        result: T = run_coro_as_sync(coro)
    except ClientConnectionError as err:
        raise ModelServerError(
            "Reaching the Kubernetes API", str(err),
            hint="Check the deployer's `cluster_config` (or KUBECONFIG / the in-cluster config).",
        ) from err  # fmt: skip
    except ApiException as err:
        if (clear := refused(err, deployer)) is not None:
            raise clear from None
        if err.status != 404:
            raise
        raise ModelServerError(
            "Calling the Kubernetes API", f"HTTP {err.status} {err.reason}", hint=missing
        ) from None
    return result
