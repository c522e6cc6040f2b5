"""Where ctcd keeps its local state, and how MLflow tracking is configured.

`CTCD_HOME` (default `.ctcd/` in the working directory) holds MLflow's SQLite database and
artifacts, each local model server's runtime folder and generated sample data.
`MLFLOW_TRACKING_URI` overrides the tracking back end; an `MLflowTracking` block
(blocks/tracking.py) sets it, and MLflow's credential variables, for the length of a flow.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

# MLflow's own HTTP defaults retry an unreachable server for about 4.5 minutes per call (7
# retries, backoff factor 2, 120 s timeout). ctcd's processes use these unless the user (or a
# tracking block, which sets retries and timeout) chose otherwise: a dead server fails a call
# in seconds.
MLFLOW_REQUEST_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def bound_mlflow_requests() -> None:
    """Set `MLFLOW_REQUEST_DEFAULTS` in this process's environment (and so its children's)
    where the variable is not set already."""
    for name, value in MLFLOW_REQUEST_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ctcd_home() -> Path:
    """The folder for all of ctcd's local state, created on first use."""
    home = Path(os.environ.get("CTCD_HOME", ".ctcd")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else SQLite in `CTCD_HOME`. (Bounds MLflow's HTTP
    retries first: whoever asks where MLflow is is about to call it.)"""
    bound_mlflow_requests()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ctcd_home() / 'mlflow.db'}"


def experiment_for(model_name: str, experiment_name: str | None = None) -> str:
    """The flow's `experiment_name`, else `MLFLOW_EXPERIMENT_NAME` (a tracking block sets
    it), else the model's name."""
    return experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or model_name


def is_local_tracking(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")


def configure_mlflow(experiment_name: str) -> str:
    """Point MLflow at the configured back end and return the experiment's id.

    With a local back end, new experiments keep their artifacts in `CTCD_HOME/mlartifacts`
    rather than in whatever folder the process happens to run from.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = (ctcd_home() / "mlartifacts").as_uri() if is_local_tracking(uri) else None
    try:
        return str(mlflow.create_experiment(experiment_name, artifact_location=location))
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        found = mlflow.get_experiment_by_name(experiment_name)
        if found is None:
            raise
        return str(found.experiment_id)


def run_link(run_id: str, experiment_id: str) -> str:
    """A link (remote server) or a command (local back end) to look at an MLflow run."""
    uri = tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (
        f"`mlflow ui --backend-store-uri {uri}` then "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    )
