"""Serve every deployment in `prefect.yaml` from this one process: no work pool, no worker.
For a laptop; the schedules and triggers are the same as with `make deploy`.

    .venv/bin/prefect server start &                       # or any PREFECT_API_URL
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m deployments.serve
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.schedules import construct_schedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

ROOT = Path(__file__).resolve().parent.parent


def _schedule(spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    spec.pop("active", None)
    if "interval" in spec:
        spec["interval"] = float(spec["interval"])
    return construct_schedule(**spec)


def build(prefect_file: Path = ROOT / "prefect.yaml") -> list[RunnerDeployment]:
    """The deployments `prefect.yaml` declares (but the Kubernetes pool's), as runner
    deployments of this process."""
    built = []
    for spec in yaml.safe_load(prefect_file.read_text())["deployments"]:
        if spec.get("work_pool", {}).get("name") == "ctcd-kubernetes":
            continue  # runs as a Kubernetes Job through its pool, not in this process
        path, name = spec["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        built.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                version=spec.get("version"),
                parameters=spec.get("parameters") or {},
                schedules=[_schedule(s) for s in spec.get("schedules") or []],
                triggers=[DeploymentEventTrigger(**t) for t in spec.get("triggers") or []],
            )
        )
    return built


if __name__ == "__main__":
    serve(*build())
