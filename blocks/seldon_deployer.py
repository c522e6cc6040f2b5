"""`SeldonModelDeployer`: registered MLflow model versions served by Seldon Core v1."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any, Literal, Self, TypeVar

from prefect_kubernetes.credentials import KubernetesClusterConfig
from pydantic import Field, HttpUrl, model_validator

from blocks import kube
from blocks import seldon_manifest as sm
from blocks import seldon_rollout as sr
from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.kube_logs import follow, pod_logs
from blocks.object_store import ObjectStoreCredentials
from blocks.seldon_kube import Session, session
from blocks.service import KubernetesRuntime, ServiceRecord, ServiceState
from blocks.ui import logo, optional_nested
from ctcd.exceptions import ModelConfigError, ModelServerError, SeldonFailed
from ctcd.rollout import OpenRollout

T = TypeVar("T")


MISSING = "Is Seldon Core v1 (its SeldonDeployment CRD) installed, and the namespace there?"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one API operation; connection and permission failures become clear errors."""
    return kube.run(coro, "seldon", MISSING)


class SeldonModelDeployer(BaseModelDeployer):
    """Serves MLflow model versions on a Kubernetes cluster running Seldon Core v1: one
    `SeldonDeployment` per pipeline, step and model, patched in place for each new version
    (same uuid and URL; Seldon rolls the pods). The cluster is the registry: labels find the
    resources, an annotation on each holds its service record. A canary or shadow rollout is
    a second predictor on the same resource (see `blocks.seldon_rollout`).

    Models must be in an S3-compatible bucket (an MLflow server whose artifact root is the
    bucket); `object_store` keys go only into a Kubernetes Secret that the storage
    initializer reads (`envSecretRefName`).

    Example:
        ```python
        from blocks import SeldonModelDeployer

        deployer = SeldonModelDeployer.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Seldon Model Deployer"
    _block_type_slug = "seldon-model-deployer"
    _logo_url = logo("kubernetes")
    _description = "Serves registered MLflow model versions on Kubernetes with Seldon Core v1."
    _documentation_url = HttpUrl("https://docs.seldon.ai/seldon-core-1")

    cluster_config: KubernetesClusterConfig | None = optional_nested(
        "Cluster Config",
        "The cluster (a prefect-kubernetes block); none: in-cluster config, "
        "else KUBECONFIG or ~/.kube/config.",
    )
    namespace: str = Field(default="default", description="Namespace for the model servers.")
    base_url: str = Field(
        description="The ingress (Istio or Ambassador) URL, e.g. `http://seldon.example.com`; "
        "models answer at `{base_url}/seldon/{namespace}/{name}/...`."
    )
    implementation: Literal["MLFLOW_SERVER", "SKLEARN_SERVER"] = Field(
        default="MLFLOW_SERVER", description="Seldon's prepackaged server for the model."
    )
    protocol: Literal["seldon", "v2"] = Field(
        default="seldon", description="Seldon's v1 protocol, or V2 (Open Inference)."
    )
    replicas: int = Field(default=1, ge=1, le=100, description="Predictor pods per model.")
    cpu_request: str | None = Field(default=None, description="CPU request, e.g. `500m`.")
    cpu_limit: str | None = Field(default=None, description="CPU limit, e.g. `1`.")
    memory_request: str | None = Field(default=None, description="Memory request, e.g. `1Gi`.")
    memory_limit: str | None = Field(default=None, description="Memory limit, e.g. `2Gi`.")
    service_account: str | None = Field(
        default=None, description="Service account the predictor pods run as."
    )
    object_store: ObjectStoreCredentials | None = optional_nested(
        "Object Store",
        "Keys for the bucket holding the models, written only to the Secret "
        "`secret_name` (none: the pods' own identity, e.g. IRSA, reads the bucket).",
    )
    secret_name: str = Field(
        default="ctcd-model-store",
        description="The Secret holding `object_store`'s rclone settings, in `namespace`.",
    )
    deploy_timeout: float = Field(
        default=600.0, gt=0, description="Seconds to wait for a version to roll out."
    )

    @model_validator(mode="after")
    def _seldon_can_roll_out(self) -> Self:
        sr.check(self.rollout_policy())  # e.g. a shadow of 50 %: refused when the block is made
        return self

    def _api(self) -> Any:
        return session(self.cluster_config, self.namespace)

    def _resources(self) -> dict[str, dict[str, str]]:
        given = {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }
        kept = {k: {n: v for n, v in d.items() if v} for k, d in given.items()}
        return {k: d for k, d in kept.items() if d}

    def _predictor(self, model_uri: str, replicas: int, name: str = sm.PREDICTOR) -> dict[str, Any]:
        secret = self.secret_name if self.object_store else None
        return sm.predictor(
            model_uri, replicas, self.implementation, secret, self._resources(),
            self.service_account, name,
        )  # fmt: skip

    def _check_deployable(self, config: DeploymentConfig) -> None:
        sm.storage_uri(config)

    def _lock(self, config: DeploymentConfig) -> AbstractContextManager[object]:
        return nullcontext()  # the API server's resourceVersion checks serialise writes

    def _records(self) -> list[ServiceRecord]:
        async def run() -> list[ServiceRecord]:
            async with self._api() as api:
                found = [sm.read_record(sdep) for sdep in await api.find()]
            return [r for r in found if r is not None]

        return _run(run())

    def _new_record(self, config: DeploymentConfig, name: str) -> ServiceRecord:
        prediction_url, health_url = sm.urls(self.base_url, self.namespace, name, self.protocol)
        return ServiceRecord(
            uuid="",
            backend="seldon",
            **config.model_dump(),
            history=[config.model_version],
            workers=self.replicas,
            deployer_block=self.block_name(),
            prediction_url=prediction_url,
            health_url=health_url,
            protocol=self.protocol,
            runtime=KubernetesRuntime(
                namespace=self.namespace, resource_kind="SeldonDeployment", resource_name=name
            ),
        )

    def _create(self, config: DeploymentConfig, timeout: float | None) -> ServiceRecord:
        uri = sm.storage_uri(config)
        name = sm.resource_name(config.pipeline_name, config.step_name, config.model_name)
        record = self._new_record(config, name)
        body = sm.manifest(
            name, self.namespace, self.protocol, self._predictor(uri, self.replicas), config,
            record,
        )  # fmt: skip

        async def run() -> ServiceRecord | None:
            async with self._api() as api:
                await self._put_secret(api)
                if await api.create(body) is None:
                    return None  # another deploy created it first: update that one
                try:
                    sdep = await api.wait_ready(
                        name, {uri: self.replicas}, timeout or self.deploy_timeout
                    )
                except SeldonFailed:
                    await api.delete(name)
                    await self._drop_secret(api, name)
                    raise
                return sm.read_record(sdep)

        created = _run(run())
        if created is not None:
            return created
        existing = self.find_model_server(config.pipeline_name, config.step_name, config.model_name)
        if not existing:
            raise ModelServerError(f"Deploying {config.model_name}", "the resource vanished")
        return self._update(existing[0], config, timeout)

    def _update(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        timeout: float | None,
        keep_settings: bool = False,
    ) -> ServiceRecord:
        uri = sm.storage_uri(config)
        name = record.kube.resource_name
        replicas = record.workers if keep_settings else self.replicas

        def mutate(sdep: dict[str, Any]) -> None:
            current = sm.read_record(sdep) or record
            history = current.history
            if current.model_version != config.model_version:
                history = [*history, config.model_version][-20:]
            updated = current.model_copy(
                update={
                    **config.model_dump(),
                    "history": history,
                    "workers": replicas,
                    "desired_state": ServiceState.ACTIVE,
                    "rollout": None,  # only this version serves: an open rollout is closed
                    "last_error": None,
                    "updated_at": datetime.now(UTC),
                }
            )
            sdep["spec"]["predictors"] = [self._predictor(uri, replicas)]
            sdep["spec"]["protocol"] = self.protocol
            sm.store(sdep, updated)

        return self._change_and_wait(name, mutate, timeout, restore=(SeldonFailed,))

    def _open_rollout(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        rollout: OpenRollout,
        timeout: float | None,
    ) -> ServiceRecord:
        sr.check(rollout)
        if record.desired_state == ServiceState.INACTIVE:
            raise ModelConfigError(
                f"Server {record.uuid[:8]} is stopped: start it (`ctcd models start "
                f"{record.uuid[:8]}`) before a {rollout.mode} of v{config.model_version} beside it."
            )
        candidate = self._predictor(sm.storage_uri(config), self.replicas, sr.CANDIDATE)
        change = sr.open_change(record, candidate, rollout)
        # Not ready in time counts as failed too: a canary's share would go to no endpoint.
        name, restore = record.kube.resource_name, (ModelServerError,)
        return self._change_and_wait(name, change, timeout, restore=restore)

    def _promote(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        change = sr.promote_change(record, rollout)
        name = record.kube.resource_name
        return self._change_and_wait(name, change, timeout, restore=(SeldonFailed,))

    def _abort(
        self, record: ServiceRecord, rollout: OpenRollout, timeout: float | None
    ) -> ServiceRecord:
        return self._change_and_wait(record.kube.resource_name, sr.abort_change(record), timeout)

    def _change_and_wait(
        self,
        name: str,
        mutate: Any,
        timeout: float | None,
        restore: tuple[type[ModelServerError], ...] = (),
    ) -> ServiceRecord:
        """Write `mutate`'s change, then wait until every predictor it asks for serves; on an
        error of a `restore` type, put the previous spec back before raising it."""

        async def run() -> dict[str, Any]:
            async with self._api() as api:
                await self._put_secret(api)
                before, after = await api.change(name, mutate)
                wait = timeout or self.deploy_timeout
                try:
                    return await api.wait_ready(name, sm.wanted(after), wait)
                except restore as err:
                    await api.change(name, sm.restore(before, str(err)))
                    err.add_note("The previous spec was put back; the previous version serves on.")
                    raise

        record = sm.read_record(_run(run()))
        assert record is not None
        return record

    def _scale(self, record: ServiceRecord, replicas: int, timeout: float | None) -> ServiceRecord:
        state = ServiceState.ACTIVE if replicas else ServiceState.INACTIVE

        def mutate(sdep: dict[str, Any]) -> None:
            for predictor in sdep["spec"]["predictors"]:  # a rollout's candidate too
                predictor["replicas"] = replicas
            current = sm.read_record(sdep) or record
            updated = current.model_copy(
                update={"desired_state": state, "updated_at": datetime.now(UTC)}
            )
            sm.store(sdep, updated)

        return self._change_and_wait(record.kube.resource_name, mutate, timeout)

    def _start(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        return self._scale(record, record.workers, timeout)

    def _stop(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        return self._scale(record, 0, timeout)

    def _delete(self, record: ServiceRecord, timeout: float | None) -> None:
        async def run() -> None:
            async with self._api() as api:
                await api.delete(record.kube.resource_name)
                await self._drop_secret(api, record.kube.resource_name)

        _run(run())

    async def _put_secret(self, api: Session) -> None:
        if self.object_store is not None:
            secret = self.object_store.kubernetes_secret(self.secret_name, api.namespace)
            await api.put_secret(secret)

    async def _drop_secret(self, api: Session, deleted: str) -> None:
        if self.object_store is not None:
            await api.delete_secret_if_unused(self.secret_name, deleted)

    def _logs(self, record: ServiceRecord, tail: int | None) -> list[str]:
        selector = f"{sm.OWNER_LABEL}={record.kube.resource_name}"
        what = f"SeldonDeployment {record.kube.resource_name}"
        return _run(pod_logs(self._api(), selector, sm.GRAPH, tail, what))

    def _follow(self, record: ServiceRecord) -> Iterator[str]:
        return follow(lambda tail: self._logs(record, tail))
