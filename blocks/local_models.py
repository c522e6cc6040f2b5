"""The model copies in a local server's runtime folder (`models/<version>/`): staged from the
registry before a version is asked for, pruned after a swap."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from blocks.deployer import DeploymentConfig
from blocks.service import ServiceRecord
from ctcd.seams import pause_point

KEEP_MODEL_COPIES = 3
STAGING = ".staging-"  # a model copy being downloaded (models/.staging-*)


def stage(runtime: Path, config: DeploymentConfig) -> Path:
    """Copy the version into the runtime folder (`models/<version>`): downloaded into a
    temporary folder, then renamed into place. Copies an interrupted deploy left half done go
    first (the caller holds the server's deploy lock, so no other copy is in progress)."""
    import mlflow

    from ctcd.settings import tracking_uri

    dest = runtime / "models" / config.model_version
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f"{STAGING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not (dest / "MLmodel").exists():
        mlflow.set_tracking_uri(tracking_uri())
        with tempfile.TemporaryDirectory(prefix=STAGING, dir=dest.parent) as tmp:
            path = mlflow.artifacts.download_artifacts(config.model_uri, dst_path=tmp)
            pause_point("staging", runtime)
            shutil.rmtree(dest, ignore_errors=True)
            Path(path).rename(dest)
    return dest


def prune(runtime: Path, keep: set[str]) -> None:
    """Keep the newest `KEEP_MODEL_COPIES` copies, and those named in `keep`."""
    copies = [path for path in (runtime / "models").iterdir() if not path.name.startswith(".")]
    copies.sort(key=lambda p: p.stat().st_mtime)
    for path in copies[:-KEEP_MODEL_COPIES]:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def config_of(record: ServiceRecord) -> DeploymentConfig:
    """What `record` serves, as a deploy would ask for it."""
    return DeploymentConfig.model_validate(
        record.model_dump(include=set(DeploymentConfig.model_fields))
    )
