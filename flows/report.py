"""The markdown artifact each flow run shows in the Prefect UI."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact

from ctcd.settings import run_link


def publish_report(
    model_name: str,
    model_version: str,
    metrics: dict[str, float],
    run_id: str,
    experiment_id: str,
    data_source: str,
    data_sha256: str,
    decision: str,
    service_url: str | None = None,
) -> None:
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    served = f"\n**Serving at:** {service_url}\n" if service_url else ""
    markdown = (
        f"# {model_name} version {model_version}\n\n"
        f"| metric (held-out 20 %) | value |\n|---|---|\n{rows}\n\n"
        f"**Gate:** {decision}\n{served}\n"
        f"**MLflow run:** `{run_id}`, {run_link(run_id, experiment_id)}\n\n"
        f"**Data:** `{data_source}` (sha256 `{data_sha256[:16]}…`)\n"
    )
    key = re.sub(r"[^a-z0-9-]+", "-", f"ctcd-{model_name}".lower()).strip("-")
    create_markdown_artifact(markdown=markdown, key=key, description=f"{model_name} report")
