"""The Kubernetes calls `KServeModelDeployer` makes, on the shared plumbing (blocks/kube.py):
a session scoped to InferenceServices, readiness and stop as KServe's Standard mode reports
them, the manifest checked by a server-side dry run, and the S3 Secret with the service
account that lists it, removed once no InferenceService runs as that account."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from prefect_kubernetes.credentials import KubernetesClusterConfig

from blocks import kserve_manifest as km
from blocks import kube
from ctcd.exceptions import KServeFailed, ModelConfigError

KSERVE = kube.Resource(km.GROUP, km.VERSION, km.PLURAL, km.KIND)
WAIT_HINT = "Check the predictor pods (`kubectl describe pods -l {label}={name}`) or raise the "
WAIT_HINT += "deployer's `deploy_timeout`."

MISSING = "Is KServe (its InferenceService CRD) installed, and the namespace there?"


def check_kept(sent: dict[str, Any], kept: dict[str, Any]) -> None:
    """Refuse a manifest the API server would store without some of its fields (its schema,
    generated from KServe's API, does not know them: a misspelt or unsupported field)."""
    lost = km.dropped(sent.get("spec"), kept.get("spec"), "spec")
    meta_sent, meta_kept = sent.get("metadata", {}), kept.get("metadata", {})
    for part in ("labels", "annotations"):
        lost += km.dropped(meta_sent.get(part), meta_kept.get(part), f"metadata.{part}")
    if lost:
        raise ModelConfigError(
            f"The API server's InferenceService schema (KServe's CRD) does not know "
            f"{', '.join(lost)} and would drop it silently. Check the spelling in the "
            "deployer's `predictor_overrides` (fields of KServe's PredictorSpec, camelCase) "
            "and deploy again. Nothing was created or changed."
        )


def refused(err: ApiException) -> ModelConfigError:
    """The API server's validation refusal (422) as a clear error, naming what it said."""
    try:
        said = json.loads(err.body or "")["message"]
    except (TypeError, ValueError, KeyError):
        said = f"HTTP {err.status} {err.reason}"
    return ModelConfigError(
        f"The API server refused the InferenceService: {said}. Fix the deployer's "
        "`predictor_overrides` and deploy again. Nothing was created or changed."
    )


class Session(kube.Session):
    """A session on InferenceServices (the ones ctcd manages, by its labels)."""

    async def create_checked(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create after a dry run shows every field would be kept; None if it exists."""
        try:
            kept = await self.create(body, dry_run=True)
            if kept is not None:
                check_kept(body, kept)
            return await self.create(body)
        except ApiException as err:
            if err.status == 422:
                raise refused(err) from None
            raise

    async def wait_ready(
        self, name: str, model_uri: str, replicas: int, timeout: float
    ) -> dict[str, Any]:
        def judge(isvc: dict[str, Any], found: list[dict[str, Any]]) -> Any:
            return km.readiness(isvc, found, model_uri, replicas)

        return await self._wait(name, judge, timeout)

    async def wait_stopped(self, name: str, timeout: float) -> dict[str, Any]:
        return await self._wait(name, km.stopped, timeout)

    async def _wait(self, name: str, judge: kube.Judge, timeout: float) -> dict[str, Any]:
        selector = f"{km.OWNER_LABEL}={name}"
        hint = WAIT_HINT.format(label=km.OWNER_LABEL, name=name)
        return await self.wait(name, judge, selector, timeout, KServeFailed, hint)

    async def put_service_account(self, name: str, secret: str) -> None:
        """Create the service account listing `secret`, or add `secret` to an existing one."""
        body = km.service_account(name, secret)
        try:
            await self.core.create_namespaced_service_account(self.namespace, body)
            return
        except ApiException as err:
            if err.status != 409:
                raise
        for _ in range(kube.CONFLICT_RETRIES):
            found = self.plain(
                await self.core.read_namespaced_service_account(name, self.namespace)
            )
            listed = found.get("secrets") or []
            if any(ref.get("name") == secret for ref in listed):
                return
            found["secrets"] = [*listed, {"name": secret}]
            try:
                await self.core.replace_namespaced_service_account(name, self.namespace, found)
                return
            except ApiException as err:
                if err.status != 409:
                    raise

    async def drop_credentials_if_unused(self, account: str, secret: str, deleted: str) -> bool:
        """Remove the Secret, and the service account if ctcd made it (else only its
        reference to the Secret), once no other InferenceService runs as that account."""

        def uses(isvc: dict[str, Any]) -> bool:
            return bool(
                isvc.get("spec", {}).get("predictor", {}).get("serviceAccountName") == account
            )

        if not await self.unused(uses, deleted):
            return False
        try:
            found = self.plain(
                await self.core.read_namespaced_service_account(account, self.namespace)
            )
        except ApiException as err:
            if err.status != 404:
                raise
            found = None
        if found is not None:
            await self._release_account(found, secret)
        await self.delete_secret(secret)
        return True

    async def _release_account(self, found: dict[str, Any], secret: str) -> None:
        name = found["metadata"]["name"]
        mine = (found["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "ctcd"
        try:
            if mine:
                await self.core.delete_namespaced_service_account(name, self.namespace)
            else:
                refs = [r for r in found.get("secrets") or [] if r.get("name") != secret]
                found["secrets"] = refs
                await self.core.replace_namespaced_service_account(name, self.namespace, found)
        except ApiException as err:
            if err.status not in (404, 409):
                raise


@asynccontextmanager
async def session(
    cluster_config: KubernetesClusterConfig | None, namespace: str
) -> AsyncIterator[Session]:
    def make(client: ApiClient) -> Session:
        return Session(client, namespace, KSERVE, km.SELECTOR)

    async with kube.session(cluster_config, namespace, make) as api:
        yield api
