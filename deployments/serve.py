"""Serve every deployment in `prefect.yaml` from this one process: no work pool, no worker.
For a laptop; the schedules and triggers are the same as with `make deploy`.

    .venv/bin/prefect server start &                       # or any PREFECT_API_URL
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m deployments.serve
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from deployments.setup import ROOT, load_flow, schedule


def build(prefect_file: Path = ROOT / "prefect.yaml") -> list[RunnerDeployment]:
    """The deployments `prefect.yaml` declares (but the Kubernetes pool's), as runner
    deployments of this process."""
    built = []
    for spec in yaml.safe_load(prefect_file.read_text())["deployments"]:
        if spec.get("work_pool", {}).get("name") == "ctcd-kubernetes":
            continue  # runs as a Kubernetes Job through its pool, not in this process
        flow = load_flow(spec["entrypoint"])
        built.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                version=spec.get("version"),
                parameters=spec.get("parameters") or {},
                schedules=[schedule(s) for s in spec.get("schedules") or []],
                triggers=[DeploymentEventTrigger(**t) for t in spec.get("triggers") or []],
            )
        )
    return built


if __name__ == "__main__":
    serve(*build())
