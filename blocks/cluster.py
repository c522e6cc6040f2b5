"""What both cluster deployers ask of a cluster and keep on it: a stable name per (pipeline,
step, model), the labels that find the resources, the model's bucket location (refused before
any API call when a cluster cannot read it), and the service record kept in an annotation."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import urlparse

from blocks.deployer import DeploymentConfig
from blocks.service import ServiceRecord
from ctcd.exceptions import ModelConfigError

RECORD_ANNOTATION = "ctcd.io/service-record"
BUCKET_SCHEMES = ("s3",)


def resource_name(pipeline: str, step: str, model: str) -> str:
    """A stable DNS-1123 name per (pipeline, step, model): readable model part + hash."""
    digest = hashlib.sha1(f"{pipeline}\0{step}\0{model}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:30].strip("-") or "model"
    return f"{slug}-{digest}"


def label_value(text: str) -> str:
    """`text` as a valid label value (<= 63 characters, alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._")


def labels(managed: dict[str, str], config: DeploymentConfig) -> dict[str, str]:
    return {
        **managed,
        "ctcd.io/model": label_value(config.model_name),
        "ctcd.io/pipeline": label_value(config.pipeline_name),
        "ctcd.io/step": label_value(config.step_name),
    }


def check_bucket_uri(uri: str, config: DeploymentConfig, server: str = "Seldon Core") -> str:
    """`uri` if `server`'s storage initializer can fetch it from a bucket; else a refusal."""
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
        f"{server} downloads models from an S3-compatible bucket (an `s3://` URI). Run the "
        "MLflow tracking server with its artifact root in the bucket "
        "(`mlflow server --default-artifact-root s3://BUCKET/mlflow --no-serve-artifacts`, "
        "with MLFLOW_S3_ENDPOINT_URL for a non-AWS store), train and register the model "
        "against it, and deploy again. Nothing was created on the cluster."
    )


def storage_uri(config: DeploymentConfig, server: str = "Seldon Core") -> str:
    """Where the version's files are: a registry URI is resolved through MLflow."""
    if not config.model_uri.startswith("models:/"):
        return check_bucket_uri(config.model_uri, config, server)
    import mlflow

    from ctcd.settings import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    uri = client.get_model_version_download_uri(config.model_name, config.model_version)
    return check_bucket_uri(str(uri), config, server)


def record_annotation(record: ServiceRecord) -> str:
    """What the annotation holds: the record as stored, without the uuid (the uid is it)."""
    stored = record.stored()
    stored.pop("uuid")
    return json.dumps(stored, sort_keys=True)


def stored_record(resource: dict[str, Any]) -> ServiceRecord | None:
    """The record a resource's annotation holds, with the resource's uid as its uuid; None if
    the annotation is missing or unreadable (not one of ctcd's)."""
    meta = resource.get("metadata", {})
    try:
        data = json.loads((meta.get("annotations") or {})[RECORD_ANNOTATION])
        return ServiceRecord.model_validate({**data, "uuid": meta["uid"]})
    except (KeyError, ValueError):
        return None
