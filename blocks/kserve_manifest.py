"""What `KServeModelDeployer` asks the cluster for and how it reads the answer: the
`InferenceService` manifest (Standard mode, mlflow model format, V2), the service account that
lists the S3 Secret, the fields the API server would drop, and readiness judged from what
KServe's Standard-mode reconciler and Kubernetes write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocks import cluster
from blocks.cluster import RECORD_ANNOTATION, record_annotation
from blocks.deployer import DeploymentConfig
from blocks.kube import carries, owned, rolled_out
from blocks.service import ServiceRecord, ServiceState

GROUP, VERSION, PLURAL, KIND = (
    "serving.kserve.io",
    "v1beta1",
    "inferenceservices",
    "InferenceService",
)
MANAGED = {"app.kubernetes.io/managed-by": "ctcd", "ctcd.io/deployer": "kserve"}
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())
OWNER_LABEL = "serving.kserve.io/inferenceservice"  # KServe's label on what it makes
STOP = "serving.kserve.io/stop"
MODE = "serving.kserve.io/deploymentMode"
CONTAINER = "kserve-container"
SERVER = "KServe's storage initializer"
# KServe's reasons for a predictor that will not come up (the Deployment's own conditions).
FAILED_REASONS = ("ProgressDeadlineExceeded", "ReplicaFailure")


def urls(base_url: str, namespace: str, name: str) -> tuple[str, str]:
    """(prediction URL, health URL) behind the ingress, with KServe's path-based routing
    (`pathTemplate: /serving/{{ .Namespace }}/{{ .Name }}`) and the V2 protocol."""
    root = f"{base_url.rstrip('/')}/serving/{namespace}/{name}"
    return f"{root}/v2/models/{name}/infer", f"{root}/v2/models/{name}/ready"


def predictor(
    model_uri: str,
    replicas: int,
    service_account: str | None,
    resources: dict[str, dict[str, str]],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """The predictor: an MLflow model served by the runtime KServe picks for it
    (`kserve-mlserver`) over V2, `replicas` pods (HPA min = max)."""
    model: dict[str, Any] = {
        "modelFormat": {"name": "mlflow"},
        "protocolVersion": "v2",
        "storageUri": model_uri,
    }
    if resources:
        model["resources"] = resources
    spec: dict[str, Any] = {**overrides, "minReplicas": replicas, "maxReplicas": max(replicas, 1)}
    if service_account:
        spec["serviceAccountName"] = service_account
    spec["model"] = model
    return spec


def manifest(
    name: str, namespace: str, pred: dict[str, Any], config: DeploymentConfig, record: ServiceRecord
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": cluster.labels(MANAGED, config),
            "annotations": {MODE: "Standard", RECORD_ANNOTATION: record_annotation(record)},
        },
        "spec": {"predictor": pred},
    }


def service_account(name: str, secret: str) -> dict[str, Any]:
    """The predictor pods' service account; KServe's credential builder reads the S3 Secret
    it lists and injects the keys into the storage initializer."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "ctcd"}},
        "secrets": [{"name": secret}],
    }


def dropped(sent: Any, kept: Any, path: str) -> list[str]:
    """The fields of `sent` that `kept` (what the API server would store) lost: a schema
    that does not know a field prunes it silently (Kubernetes before 1.25 refuses nothing)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        lost: list[str] = []
        for key, value in sent.items():
            where = f"{path}.{key}"
            lost += [where] if key not in kept else dropped(value, kept[key], where)
        return lost
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [
            p
            for i, (s, k) in enumerate(zip(sent, kept, strict=True))
            for p in dropped(s, k, f"{path}[{i}]")
        ]
    return []


def conditions(isvc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (isvc.get("status") or {}).get("conditions") or []}


def _show(conds: dict[str, dict[str, Any]], kind: str) -> str:
    cond = conds.get(kind)
    if cond is None:
        return f"{kind} unset"
    why = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    return f"{kind} {cond.get('status')}" + (f" ({why})" if why else "")


def read_record(isvc: dict[str, Any]) -> ServiceRecord | None:
    """The record the InferenceService carries, with its uid and the observed status."""
    record = cluster.stored_record(isvc)
    if record is None:
        return None
    conds = conditions(isvc)
    ready = conds.get("Ready", {})
    model = (isvc.get("status") or {}).get("modelStatus") or {}
    if record.desired_state == ServiceState.INACTIVE:
        observed, message = ServiceState.INACTIVE, f"stopped ({STOP})"
    elif ready.get("status") == "True":
        observed, message = ServiceState.ACTIVE, f"serving version {record.model_version}"
    elif model.get("transitionStatus") == "BlockedByFailedLoad":
        info = model.get("lastFailureInfo") or {}
        observed = ServiceState.ERROR
        message = f"KServe reports the model failed to load: {info.get('message', '')}"
    else:
        observed, message = ServiceState.PENDING, f"KServe reports {_show(conds, 'Ready')}"
    return record.seen(status=observed, status_message=message)


def readiness(
    isvc: dict[str, Any], deployments: list[dict[str, Any]], model_uri: str, replicas: int
) -> tuple[bool, str, str | None]:
    """(ready, what was seen, failure): ready once every predictor Deployment KServe owns for
    this InferenceService carries `model_uri` and `replicas` (so KServe acted on the current
    spec), has rolled out, and the InferenceService's status was written from that rollout
    (KServe's Standard mode copies the Deployment's `observedGeneration` into it) with
    `PredictorReady` and `Ready` True. Right after a change KServe still shows the previous
    `Ready` True: alone it proves nothing."""
    mine = owned(deployments, isvc["metadata"]["uid"])
    status, conds = isvc.get("status") or {}, conditions(isvc)
    observed = status.get("observedGeneration")
    seen = [f"{_show(conds, 'PredictorReady')}, {_show(conds, 'Ready')}, status written from "
            f"Deployment generation {observed}"]  # fmt: skip
    if not mine:
        seen.append("no predictor Deployment yet")
    for d in mine:
        st = d.get("status") or {}
        seen.append(
            f"Deployment {d['metadata']['name']} (generation {d['metadata'].get('generation')}, "
            f"observed {st.get('observedGeneration')}): "
            + ("new model" if carries(d, model_uri) else "still the previous model")
            + f", {st.get('updatedReplicas', 0)} updated / {st.get('availableReplicas', 0)} "
            f"available of {d['spec'].get('replicas', 1)} (want {replicas})"
        )
    current = bool(mine) and all(
        carries(d, model_uri) and d["spec"].get("replicas", 1) == replicas for d in mine
    )
    ready = (
        current
        and all(rolled_out(d) for d in mine)
        and observed == max(d["metadata"].get("generation", 1) for d in mine)
        and all(conds.get(k, {}).get("status") == "True" for k in ("PredictorReady", "Ready"))
    )
    return ready, "; ".join(seen), None if ready or not current else _failure(status, conds)


def _failure(status: dict[str, Any], conds: dict[str, dict[str, Any]]) -> str | None:
    """What KServe reports about a current predictor that will not serve, if anything."""
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") == "BlockedByFailedLoad":
        info = model.get("lastFailureInfo") or {}
        return (
            f"KServe reports {info.get('reason') or 'a failed load'} in "
            f"{info.get('location') or 'a predictor pod'}: {info.get('message', '')}"
        )
    predictor = conds.get("PredictorReady", {})
    if predictor.get("status") == "False" and predictor.get("reason") in FAILED_REASONS:
        return f"KServe reports {_show(conds, 'PredictorReady')}"
    return None


def stopped(isvc: dict[str, Any], deployments: list[dict[str, Any]]) -> tuple[bool, str, None]:
    """Stopped once KServe removed the predictor's workloads and says `Stopped`."""
    mine = owned(deployments, isvc["metadata"]["uid"])
    conds = conditions(isvc)
    done = not mine and conds.get("Stopped", {}).get("status") == "True"
    left = f"; {len(mine)} predictor Deployment(s) left" if mine else ""
    return done, f"{_show(conds, 'Stopped')}, {_show(conds, 'Ready')}{left}", None


def annotate(isvc: dict[str, Any], record: ServiceRecord, stop: bool) -> None:
    """The record annotation, and KServe's stop annotation set (stop) or removed (start)."""
    annotations = isvc["metadata"].setdefault("annotations", {})
    annotations[RECORD_ANNOTATION] = record_annotation(record)
    if stop:
        annotations[STOP] = "true"
    else:
        annotations.pop(STOP, None)


def restore(before: dict[str, Any], error: str) -> Callable[[dict[str, Any]], None]:
    """A mutation putting back `before`'s spec and record (with the error noted)."""

    def mutate(isvc: dict[str, Any]) -> None:
        isvc["spec"] = before["spec"]
        annotations = dict(before["metadata"].get("annotations") or {})
        record = read_record(before)
        if record is not None:
            failed = record.model_copy(update={"last_error": error.splitlines()[0]})
            annotations[RECORD_ANNOTATION] = record_annotation(failed)
        isvc["metadata"]["annotations"] = annotations

    return mutate
