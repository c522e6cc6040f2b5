"""`KServeModelDeployer`: registered MLflow model versions served by KServe (Standard mode)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect_kubernetes.credentials import KubernetesClusterConfig
from pydantic import Field, HttpUrl, field_validator

from blocks import cluster, kube
from blocks import kserve_manifest as km
from blocks.deployer import BaseModelDeployer, DeploymentConfig
from blocks.kserve_kube import MISSING, Session, check_kept, session
from blocks.kube_logs import follow, pod_logs
from blocks.object_store import ObjectStoreCredentials
from blocks.service import KubernetesRuntime, ServiceRecord, ServiceState
from blocks.ui import logo, optional_nested
from ctcd.exceptions import KServeFailed, ModelServerError
from ctcd.rollout import RolloutMode

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return kube.run(coro, "kserve", MISSING)


class KServeModelDeployer(BaseModelDeployer):
    """Serves MLflow model versions with KServe in Standard mode (a plain Deployment and
    Service; no Knative): one `InferenceService` per pipeline, step and model, with
    `modelFormat: mlflow` and `protocolVersion: v2` (KServe runs MLServer's MLflow runtime),
    patched in place for each new version (same uuid and URL). The cluster is the registry:
    labels find the resources, an annotation on each holds its service record.

    Models must be in an S3-compatible bucket (an MLflow server whose artifact root is the
    bucket); `object_store` keys go only into a Secret listed by the predictor's service
    account, where KServe's storage initializer finds them.

    Example:
        ```python
        from blocks import KServeModelDeployer

        deployer = KServeModelDeployer.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "KServe Model Deployer"
    _block_type_slug = "kserve-model-deployer"
    _logo_url = logo("kubernetes")
    _description = "Serves registered MLflow model versions on Kubernetes with KServe (V2)."
    _documentation_url = HttpUrl("https://kserve.github.io/website/")

    cluster_config: KubernetesClusterConfig | None = optional_nested(
        "Cluster Config",
        "The cluster (a prefect-kubernetes block); none: in-cluster config, "
        "else KUBECONFIG or ~/.kube/config.",
    )
    namespace: str = Field(default="default", description="Namespace for the model servers.")
    base_url: str = Field(
        description="The ingress URL, e.g. `http://kserve.example.com`; with KServe's "
        "path-based routing (`pathTemplate: /serving/{{ .Namespace }}/{{ .Name }}`) models "
        "answer at `{base_url}/serving/{namespace}/{name}/v2/models/{name}/infer`."
    )
    replicas: int = Field(default=1, ge=1, le=100, description="Predictor pods per model.")
    cpu_request: str | None = Field(default=None, description="CPU request, e.g. `500m`.")
    cpu_limit: str | None = Field(default=None, description="CPU limit, e.g. `1`.")
    memory_request: str | None = Field(default=None, description="Memory request, e.g. `1Gi`.")
    memory_limit: str | None = Field(default=None, description="Memory limit, e.g. `2Gi`.")
    object_store: ObjectStoreCredentials | None = optional_nested(
        "Object Store",
        "Keys for the bucket holding the models, written only to the Secret "
        "`secret_name` (none: the pods' own identity, e.g. IRSA, reads the bucket).",
    )
    service_account: str = Field(
        default="ctcd-kserve",
        description="Service account the predictor pods run as; the deployer creates it (or "
        "adds the Secret to an existing one) and lists `secret_name` in it.",
    )
    secret_name: str = Field(
        default="ctcd-kserve-s3",
        description="The Secret holding `object_store`'s keys with KServe's "
        "`serving.kserve.io/s3-*` annotations, in `namespace`.",
    )
    predictor_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="More fields of KServe's PredictorSpec (camelCase), e.g. `nodeSelector`, "
        "`tolerations`; a field the API server's schema would drop is refused by name.",
    )
    rollout: RolloutMode = Field(
        default="replace",
        description="How a new version takes traffic: `replace` (the whole predictor rolls "
        "to it). KServe has no shadow traffic; canary comes with the progressive rollout.",
    )
    deploy_timeout: float = Field(
        default=600.0, gt=0, description="Seconds to wait for a version to roll out."
    )

    @field_validator("rollout")
    @classmethod
    def _known_rollout(cls, value: RolloutMode) -> RolloutMode:
        if value == "shadow":
            raise ValueError(
                "KServe cannot shadow (mirror) traffic to a candidate (kserve#2978): use "
                "rollout='replace', or the local or Seldon deployer for a shadow rollout."
            )
        if value != "replace":
            raise ValueError(
                f"rollout {value!r} is not supported by the KServe deployer yet: use 'replace' "
                "(canary through KServe's spec.canary comes with the progressive rollout)."
            )
        return value

    def _api(self) -> Any:
        return session(self.cluster_config, self.namespace)

    def _resources(self) -> dict[str, dict[str, str]]:
        given = {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }
        kept = {k: {n: v for n, v in d.items() if v} for k, d in given.items()}
        return {k: d for k, d in kept.items() if d}

    def _predictor(self, model_uri: str, replicas: int) -> dict[str, Any]:
        account = self.service_account if self.object_store else None
        return km.predictor(
            model_uri, replicas, account, self._resources(), self.predictor_overrides
        )

    def _check_deployable(self, config: DeploymentConfig) -> None:
        cluster.storage_uri(config, km.SERVER)

    def _lock(self, config: DeploymentConfig) -> AbstractContextManager[object]:
        return nullcontext()  # the API server's resourceVersion checks serialise writes

    def _records(self) -> list[ServiceRecord]:
        async def run() -> list[ServiceRecord]:
            async with self._api() as api:
                found = [km.read_record(i) for i in await api.find()]
            return [r for r in found if r is not None]

        return _run(run())

    def _new_record(self, config: DeploymentConfig, name: str) -> ServiceRecord:
        prediction_url, health_url = km.urls(self.base_url, self.namespace, name)
        return ServiceRecord(
            uuid="", backend="kserve", **config.model_dump(), history=[config.model_version],
            workers=self.replicas, deployer_block=self.block_name(),
            prediction_url=prediction_url, health_url=health_url, protocol="v2",
            runtime=KubernetesRuntime(
                namespace=self.namespace, resource_kind=km.KIND, resource_name=name
            ),
        )  # fmt: skip

    def _create(self, config: DeploymentConfig, timeout: float | None) -> ServiceRecord:
        uri = cluster.storage_uri(config, km.SERVER)
        name = cluster.resource_name(config.pipeline_name, config.step_name, config.model_name)
        body = km.manifest(
            name,
            self.namespace,
            self._predictor(uri, self.replicas),
            config,
            self._new_record(config, name),
        )

        async def run() -> ServiceRecord | None:
            async with self._api() as api:
                if await api.create_checked(body) is None:
                    return None  # another deploy created it first: update that one
                await self._put_credentials(api)
                try:
                    isvc = await api.wait_ready(name, uri, self.replicas, self._wait(timeout))
                except KServeFailed:
                    await api.delete(name)
                    await self._drop_credentials(api, name)
                    raise
                return km.read_record(isvc)

        created = _run(run())
        if created is not None:
            return created
        existing = self.find_model_server(config.pipeline_name, config.step_name, config.model_name)
        if not existing:
            raise ModelServerError(
                f"Deploying {config.model_name}",
                f"InferenceService {name} is being deleted; deploy again once it is gone",
            )
        return self._update(existing[0], config, timeout)

    def _wait(self, timeout: float | None) -> float:
        return timeout or self.deploy_timeout

    def _update(
        self,
        record: ServiceRecord,
        config: DeploymentConfig,
        timeout: float | None,
        keep_settings: bool = False,
    ) -> ServiceRecord:
        """A new version in place; `keep_settings` (a rollback) keeps the replicas."""
        uri = cluster.storage_uri(config, km.SERVER)
        replicas = record.workers if keep_settings else self.replicas

        def mutate(isvc: dict[str, Any]) -> None:
            current = km.read_record(isvc) or record
            history = current.history
            if current.model_version != config.model_version:
                history = [*history, config.model_version][-20:]
            updated = current.model_copy(
                update={
                    **config.model_dump(), "history": history, "workers": replicas,
                    "desired_state": ServiceState.ACTIVE, "last_error": None,
                    "updated_at": datetime.now(UTC),
                }
            )  # fmt: skip
            isvc["spec"]["predictor"] = self._predictor(uri, replicas)
            km.annotate(isvc, updated, stop=False)

        return self._change_and_wait(record.kube.resource_name, uri, mutate, timeout, True)

    def _change_and_wait(
        self,
        name: str,
        uri: str | None,
        mutate: Callable[[dict[str, Any]], None],
        timeout: float | None,
        restore_on_failure: bool = False,
    ) -> ServiceRecord:
        async def run() -> dict[str, Any]:
            async with self._api() as api:
                await self._put_credentials(api)
                before, after = await api.change(name, mutate, check_kept)
                if uri is None:
                    return await api.wait_stopped(name, self._wait(timeout))
                predictor = after["spec"]["predictor"]
                try:
                    return await api.wait_ready(
                        name, uri, predictor["minReplicas"], self._wait(timeout)
                    )
                except KServeFailed as err:
                    if restore_on_failure:
                        await api.change(name, km.restore(before, str(err)))
                        err.add_note(
                            "The previous spec was put back; the previous version serves on."
                        )
                    raise

        record = km.read_record(_run(run()))
        assert record is not None
        return record

    def _start(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        async def uri() -> str:
            async with self._api() as api:
                isvc = await api.get(record.kube.resource_name)
            if isvc is None:
                raise ModelServerError(f"Starting {record.kube.resource_name}", "it was deleted")
            return str(isvc["spec"]["predictor"]["model"]["storageUri"])

        def mutate(isvc: dict[str, Any]) -> None:
            current = km.read_record(isvc) or record
            km.annotate(isvc, _desired(current, ServiceState.ACTIVE), stop=False)

        return self._change_and_wait(record.kube.resource_name, _run(uri()), mutate, timeout)

    def _stop(self, record: ServiceRecord, timeout: float | None) -> ServiceRecord:
        def mutate(isvc: dict[str, Any]) -> None:
            current = km.read_record(isvc) or record
            km.annotate(isvc, _desired(current, ServiceState.INACTIVE), stop=True)

        return self._change_and_wait(record.kube.resource_name, None, mutate, timeout)

    def _delete(self, record: ServiceRecord, timeout: float | None) -> None:
        async def run() -> None:
            async with self._api() as api:
                await api.delete(record.kube.resource_name)
                await self._drop_credentials(api, record.kube.resource_name)

        _run(run())

    async def _put_credentials(self, api: Session) -> None:
        if self.object_store is not None:
            await api.put_secret(self.object_store.kserve_secret(self.secret_name, api.namespace))
            await api.put_service_account(self.service_account, self.secret_name)

    async def _drop_credentials(self, api: Session, deleted: str) -> None:
        if self.object_store is not None:
            await api.drop_credentials_if_unused(self.service_account, self.secret_name, deleted)

    def _logs(self, record: ServiceRecord, tail: int | None) -> list[str]:
        selector = f"{km.OWNER_LABEL}={record.kube.resource_name}"
        what = f"InferenceService {record.kube.resource_name}"
        return _run(pod_logs(self._api(), selector, km.CONTAINER, tail, what))

    def _follow(self, record: ServiceRecord) -> Iterator[str]:
        return follow(lambda tail: self._logs(record, tail))


def _desired(record: ServiceRecord, state: ServiceState) -> ServiceRecord:
    return record.model_copy(update={"desired_state": state, "updated_at": datetime.now(UTC)})
