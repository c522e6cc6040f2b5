"""What `SeldonModelDeployer` asks the cluster for and how it reads the answer: the model's
bucket location, the `SeldonDeployment` manifest (labels find it, an annotation holds the
service record), and readiness judged from what the operator and Kubernetes write. The
predictors of a rollout (a candidate beside the champion) are in `blocks/seldon_rollout.py`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocks import cluster
from blocks.cluster import (
    RECORD_ANNOTATION,
    check_bucket_uri,
    label_value,
    record_annotation,
    resource_name,
    stored_record,
)
from blocks.deployer import DeploymentConfig
from blocks.kube import carries, owned, rolled_out
from blocks.service import ServiceRecord, ServiceState

GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
MANAGED = {"app.kubernetes.io/managed-by": "ctcd", "ctcd.io/deployer": "seldon"}
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())
OWNER_LABEL = "seldon-deployment-id"  # the operator's label on the Deployments it owns
PREDICTOR, GRAPH = "default", "model"  # the champion's predictor and its one graph node
__all__ = [
    "RECORD_ANNOTATION",
    "check_bucket_uri",
    "label_value",
    "record_annotation",
    "resource_name",
]


def storage_uri(config: DeploymentConfig) -> str:
    """Where the version's files are (an `s3://` URI), or a refusal saying why not."""
    return cluster.storage_uri(config, "Seldon Core")


def urls(base_url: str, namespace: str, name: str, protocol: str) -> tuple[str, str]:
    """(prediction URL, health URL) behind the ingress at `base_url`."""
    root = f"{base_url.rstrip('/')}/seldon/{namespace}/{name}"
    if protocol == "v2":
        return f"{root}/v2/models/{name}/infer", f"{root}/v2/health/ready"
    return f"{root}/api/v1.0/predictions", f"{root}/api/v1.0/health/status"


def predictor(
    model_uri: str,
    replicas: int,
    implementation: str,
    secret: str | None,
    resources: dict[str, dict[str, str]],
    service_account: str | None,
    name: str = PREDICTOR,
) -> dict[str, Any]:
    """A predictor: a prepackaged server over the model in the bucket."""
    graph: dict[str, Any] = {
        "name": GRAPH,
        "type": "MODEL",
        "implementation": implementation,
        "modelUri": model_uri,
        "children": [],
    }
    if secret:
        graph["envSecretRefName"] = secret
    spec: dict[str, Any] = {"name": name, "replicas": replicas, "graph": graph}
    pod: dict[str, Any] = {}
    if resources:
        pod["containers"] = [{"name": GRAPH, "resources": resources}]
    if service_account:
        pod.setdefault("containers", [{"name": GRAPH}])
        pod["serviceAccountName"] = service_account
    if pod:
        spec["componentSpecs"] = [{"spec": pod}]
    return spec


def labels(config: DeploymentConfig) -> dict[str, str]:
    return cluster.labels(MANAGED, config)


def manifest(
    name: str,
    namespace: str,
    protocol: str,
    pred: dict[str, Any],
    config: DeploymentConfig,
    record: ServiceRecord,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SeldonDeployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels(config),
            "annotations": {RECORD_ANNOTATION: record_annotation(record)},
        },
        "spec": {"protocol": protocol, "predictors": [pred]},
    }


def read_record(sdep: dict[str, Any]) -> ServiceRecord | None:
    """The record the resource carries, with its uuid and observed status; None if the
    annotation is missing or unreadable (not one of ctcd's)."""
    record = stored_record(sdep)
    if record is None:
        return None
    status = sdep.get("status") or {}
    state, description = status.get("state", ""), status.get("description", "")
    if record.desired_state == ServiceState.INACTIVE:
        observed, message = ServiceState.INACTIVE, "stopped (scaled to 0 replicas)"
    elif state == "Available":
        observed, message = ServiceState.ACTIVE, f"serving version {record.model_version}"
        if record.rollout is not None:
            message += f"; {record.rollout.describe()}"
    elif state == "Failed":
        observed, message = ServiceState.ERROR, f"Seldon reports Failed: {description}"
    else:
        observed = ServiceState.PENDING
        message = f"Seldon reports {state or 'no state yet'}" + (
            f": {description}" if description else ""
        )
    return record.seen(status=observed, status_message=message)


def store(sdep: dict[str, Any], record: ServiceRecord) -> None:
    """Put `record` on the resource (written with its spec, in one request)."""
    sdep["metadata"]["annotations"][RECORD_ANNOTATION] = record_annotation(record)


def restore(before: dict[str, Any], error: str) -> Callable[[dict[str, Any]], None]:
    """A change putting back `before`'s spec and record (with the error noted)."""

    def mutate(sdep: dict[str, Any]) -> None:
        sdep["spec"] = before["spec"]
        annotations = dict(before["metadata"].get("annotations", {}))
        record = read_record({**before, "metadata": {**before["metadata"]}})
        if record is not None:
            failed = record.model_copy(update={"last_error": error.splitlines()[0]})
            annotations[RECORD_ANNOTATION] = record_annotation(failed)
        sdep["metadata"]["annotations"] = annotations

    return mutate


def wanted(sdep: dict[str, Any]) -> dict[str, int]:
    """What each predictor of `sdep` asks for: its model's URI and replica count."""
    return {
        str(p["graph"]["modelUri"]): int(p.get("replicas", 1)) for p in sdep["spec"]["predictors"]
    }


def readiness(
    sdep: dict[str, Any], deployments: list[dict[str, Any]], want: dict[str, int]
) -> tuple[bool, str]:
    """(ready, what was seen): ready once the operator owns one predictor Deployment per
    model URI in `want` (`wanted`: one per predictor), each carrying its URI and replica count
    (so the operator has acted on the latest spec) and rolled out, none left over from a
    removed predictor, and the operator says Available."""
    mine = owned(deployments, sdep["metadata"]["uid"])
    status = sdep.get("status") or {}
    seen = [f"SeldonDeployment state {status.get('state') or 'unset'}"]
    if status.get("description"):
        seen[0] += f" ({status['description']})"
    if not mine:
        seen.append("no predictor Deployment yet")
    matched: dict[str, dict[str, Any]] = {}
    for d in mine:
        st = d.get("status", {})
        uri = next((u for u in want if carries(d, u)), None)
        if uri is None:
            what = "still the previous model" if len(mine) == len(want) == 1 else (
                "a model the spec no longer asks for (the previous one, or a removed predictor's)"
            )  # fmt: skip
        else:
            what = "new model" if len(want) == 1 else f"model {uri}"
        if uri is not None:
            matched[uri] = d
            what += f", want {want[uri]} replicas"
        seen.append(
            f"Deployment {d['metadata']['name']}: {what}, {st.get('updatedReplicas', 0)} "
            f"updated / {st.get('availableReplicas', 0)} available of "
            f"{d['spec'].get('replicas', 1)}"
        )
    if mine and len(want) > 1:
        seen += [f"no Deployment with {uri} yet" for uri in want if uri not in matched]
    ready = (
        len(mine) == len(want) == len(matched)
        and all(
            d["spec"].get("replicas", 1) == want[uri] and rolled_out(d)
            for uri, d in matched.items()
        )
        and status.get("state") == "Available"
    )
    return ready, "; ".join(seen)
