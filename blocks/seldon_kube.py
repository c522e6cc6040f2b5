"""The Kubernetes calls `SeldonModelDeployer` makes, on the shared plumbing (blocks/kube.py):
a session scoped to SeldonDeployments, readiness as Seldon's operator reports it, and the
rclone Secret removed once no SeldonDeployment names it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kubernetes_asyncio.client import ApiClient
from prefect_kubernetes.credentials import KubernetesClusterConfig

from blocks import kube
from blocks.seldon_manifest import GROUP, OWNER_LABEL, PLURAL, SELECTOR, VERSION, readiness
from ctcd.exceptions import SeldonFailed

SELDON = kube.Resource(GROUP, VERSION, PLURAL, "SeldonDeployment")


class Session(kube.Session):
    """A session on SeldonDeployments (the ones ctcd manages, by its labels)."""

    async def wait_ready(self, name: str, want: dict[str, int], timeout: float) -> dict[str, Any]:
        """Poll until `readiness` holds for `want` (model URI -> replicas, one per predictor);
        raise on `Failed` or when `timeout` passes."""

        def judge(sdep: dict[str, Any], found: list[dict[str, Any]]) -> tuple[bool, str, Any]:
            ready, seen = readiness(sdep, found, want)
            status = sdep.get("status") or {}
            failure = None
            if not ready and status.get("state") == "Failed":
                failure = f"Seldon reports Failed: {status.get('description') or 'no description'}"
            return ready, seen, failure

        hint = (
            f"Check the predictor pods (`kubectl describe pods -l {OWNER_LABEL}={name}`) "
            "or raise the deployer's `deploy_timeout`."
        )
        selector = f"{OWNER_LABEL}={name}"
        return await self.wait(name, judge, selector, timeout, SeldonFailed, hint)

    async def delete_secret_if_unused(self, secret: str, deleted: str = "") -> bool:
        """Delete the Secret unless a SeldonDeployment in the namespace still names it (one
        being deleted, or `deleted`, does not count)."""

        def uses(sdep: dict[str, Any]) -> bool:
            predictors = sdep.get("spec", {}).get("predictors", [])
            return any(p.get("graph", {}).get("envSecretRefName") == secret for p in predictors)

        if not await self.unused(uses, deleted):
            return False
        await self.delete_secret(secret)
        return True


@asynccontextmanager
async def session(
    cluster_config: KubernetesClusterConfig | None, namespace: str
) -> AsyncIterator[Session]:
    def make(client: ApiClient) -> Session:
        return Session(client, namespace, SELDON, SELECTOR)

    async with kube.session(cluster_config, namespace, make) as api:
        yield api
