"""What `SeldonModelDeployer` asks the cluster for and how it reads the answer: the model's
bucket location, the `SeldonDeployment` manifest (labels find it, an annotation holds the
service record), and readiness judged from what the operator and Kubernetes write."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import urlparse

from blocks.deployer import DeploymentConfig
from blocks.service import ServiceRecord, ServiceState
from ctcd.exceptions import ModelConfigError

GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
RECORD_ANNOTATION = "ctcd.io/service-record"
MANAGED = {"app.kubernetes.io/managed-by": "ctcd", "ctcd.io/deployer": "seldon"}
SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())
OWNER_LABEL = "seldon-deployment-id"  # the operator's label on the Deployments it owns
PREDICTOR, GRAPH = "default", "model"
BUCKET_SCHEMES = ("s3",)


def resource_name(pipeline: str, step: str, model: str) -> str:
    """A stable DNS-1123 name per (pipeline, step, model): readable model part + hash."""
    digest = hashlib.sha1(f"{pipeline}\0{step}\0{model}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:30].strip("-") or "model"
    return f"{slug}-{digest}"


def label_value(text: str) -> str:
    """`text` as a valid label value (<= 63 characters, alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._")


def check_bucket_uri(uri: str, config: DeploymentConfig) -> str:
    """`uri` if Seldon's storage initializer can fetch it from a bucket; else a clear refusal."""
    scheme = urlparse(uri).scheme
    if scheme in BUCKET_SCHEMES:
        return uri
    why = {
        "": "a path on this machine",
        "file": "a path on this machine",
        "mlflow-artifacts": "proxied by the MLflow server, which the cluster cannot read",
        "runs": "a run-relative MLflow URI, not a storage location",
    }.get(scheme, f"a '{scheme}:' location")
    raise ModelConfigError(
        f"{config.model_name} version {config.model_version} is stored at '{uri}' ({why}); "
        "Seldon Core downloads models from an S3-compatible bucket (an `s3://` URI). Run the "
        "MLflow tracking server with its artifact root in the bucket "
        "(`mlflow server --default-artifact-root s3://BUCKET/mlflow --no-serve-artifacts`, "
        "with MLFLOW_S3_ENDPOINT_URL for a non-AWS store), train and register the model "
        "against it, and deploy again. Nothing was created on the cluster."
    )


def storage_uri(config: DeploymentConfig) -> str:
    """Where the version's files are: a registry URI is resolved through MLflow."""
    if not config.model_uri.startswith("models:/"):
        return check_bucket_uri(config.model_uri, config)
    import mlflow

    from ctcd.settings import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    uri = client.get_model_version_download_uri(config.model_name, config.model_version)
    return check_bucket_uri(str(uri), config)


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
) -> dict[str, Any]:
    """The one predictor: a prepackaged server over the model in the bucket."""
    graph: dict[str, Any] = {
        "name": GRAPH,
        "type": "MODEL",
        "implementation": implementation,
        "modelUri": model_uri,
        "children": [],
    }
    if secret:
        graph["envSecretRefName"] = secret
    spec: dict[str, Any] = {"name": PREDICTOR, "replicas": replicas, "graph": graph}
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
    return {
        **MANAGED,
        "ctcd.io/model": label_value(config.model_name),
        "ctcd.io/pipeline": label_value(config.pipeline_name),
        "ctcd.io/step": label_value(config.step_name),
    }


def record_annotation(record: ServiceRecord) -> str:
    stored = record.stored()
    stored.pop("uuid")  # the resource's own uid
    return json.dumps(stored, sort_keys=True)


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
    meta = sdep.get("metadata", {})
    try:
        data = json.loads(meta.get("annotations", {})[RECORD_ANNOTATION])
        record = ServiceRecord.model_validate({**data, "uuid": meta["uid"]})
    except (KeyError, ValueError):
        return None
    status = sdep.get("status") or {}
    state, description = status.get("state", ""), status.get("description", "")
    if record.desired_state == ServiceState.INACTIVE:
        observed, message = ServiceState.INACTIVE, "stopped (scaled to 0 replicas)"
    elif state == "Available":
        observed, message = ServiceState.ACTIVE, f"serving version {record.model_version}"
    elif state == "Failed":
        observed, message = ServiceState.ERROR, f"Seldon reports Failed: {description}"
    else:
        observed = ServiceState.PENDING
        message = f"Seldon reports {state or 'no state yet'}" + (
            f": {description}" if description else ""
        )
    return record.seen(status=observed, status_message=message)


def carries(deployment: dict[str, Any], model_uri: str) -> bool:
    """Whether the Deployment's pod template fetches `model_uri` (storage initializer)."""
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    containers = [*pod.get("initContainers", []), *pod.get("containers", [])]
    return any(model_uri in (c.get("args") or []) for c in containers)


def rolled_out(deployment: dict[str, Any]) -> bool:
    """Kubernetes' own test for a finished rollout (as `kubectl rollout status`)."""
    meta, spec, status = deployment["metadata"], deployment["spec"], deployment.get("status", {})
    want = spec.get("replicas", 1)
    return (
        status.get("observedGeneration", 0) >= meta.get("generation", 1)
        and status.get("updatedReplicas", 0) == want
        and status.get("replicas", 0) == want
        and status.get("availableReplicas", 0) == want
    )


def readiness(
    sdep: dict[str, Any], deployments: list[dict[str, Any]], model_uri: str, replicas: int
) -> tuple[bool, str]:
    """(ready, what was seen): ready once every predictor Deployment the operator owns for
    this resource carries `model_uri` and `replicas` (so the operator has acted on the latest
    spec) and has rolled out, and the operator says Available."""
    uid = sdep["metadata"]["uid"]
    owned = [
        d
        for d in deployments
        if any(ref.get("uid") == uid for ref in d["metadata"].get("ownerReferences", []))
    ]
    status = sdep.get("status") or {}
    seen = [f"SeldonDeployment state {status.get('state') or 'unset'}"]
    if status.get("description"):
        seen[0] += f" ({status['description']})"
    if not owned:
        seen.append("no predictor Deployment yet")
    for d in owned:
        st = d.get("status", {})
        seen.append(
            f"Deployment {d['metadata']['name']}: "
            + ("new model" if carries(d, model_uri) else "still the previous model")
            + f", {st.get('updatedReplicas', 0)} updated / {st.get('availableReplicas', 0)} "
            f"available of {d['spec'].get('replicas', 1)} (want {replicas})"
        )
    ready = (
        bool(owned)
        and all(
            carries(d, model_uri) and d["spec"].get("replicas", 1) == replicas and rolled_out(d)
            for d in owned
        )
        and status.get("state") == "Available"
    )
    return ready, "; ".join(seen)
