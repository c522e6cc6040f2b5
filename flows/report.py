"""The markdown artifact each flow run shows in the Prefect UI: the metrics (the champion's
beside the candidate's on the same held-out rows), the gate decision, the evaluation plots
the MLflow run holds, the data set's hash and links to the run."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx
from prefect.artifacts import create_markdown_artifact

from blocks.service import ServiceRecord
from ctcd.names import EVALUATION_DIR, IMPORTANCE_TAG
from ctcd.settings import run_link
from flows.gate import ChampionScore
from flows.model import RegisteredModel


@dataclass(frozen=True)
class RunFacts:
    """What the report says about the candidate and where its data came from."""

    registered: RegisteredModel
    metrics: dict[str, float]
    data_source: str
    data_sha256: str
    held_out_rows: int | None = None


def report_key(model_name: str) -> str:
    """The artifact key: one per model, so the Prefect UI shows its history."""
    return re.sub(r"[^a-z0-9-]+", "-", f"ctcd-{model_name}".lower()).strip("-")


def _metrics_table(facts: RunFacts, champion: ChampionScore | None) -> str:
    rows = f"{facts.held_out_rows:,} rows" if facts.held_out_rows else "20 %"
    theirs = champion.metrics if champion is not None else None
    head = f"| metric (held-out {rows}) | candidate v{facts.registered.model_version} |"
    rule = "|---|---|"
    if theirs is not None and champion is not None:
        head += f" champion v{champion.version} (same rows) |"
        rule += "---|"
    lines = [head, rule]
    for name, value in facts.metrics.items():
        line = f"| {name} | {value:.4f} |"
        if theirs is not None:
            line += f" {theirs[name]:.4f} |" if name in theirs else " n/a |"
        lines.append(line)
    return "\n".join(lines)


def _plots(run_id: str) -> str:
    """The evaluation images the run holds (read back from MLflow, so the report never
    names a plot that was not logged)."""
    import mlflow

    client = mlflow.MlflowClient()
    names = [a.path for a in client.list_artifacts(run_id, EVALUATION_DIR) if not a.is_dir]
    if not names:
        return "none logged"
    kind = client.get_run(run_id).data.tags.get(IMPORTANCE_TAG)
    listed = ", ".join(f"`{name}`" for name in names)
    return listed + (f"; feature importance: {kind}" if kind else "")


def _serving(service: ServiceRecord) -> str:
    """Where the model serves. The prediction URL takes POST only (a browser's GET gets 405),
    so it is shown as code to POST to, with a link that opens in a browser: what the server
    serves (MLflow protocol: /metadata) or its health."""
    url = service.prediction_url
    page = url.removesuffix("/invocations") + "/metadata"
    if service.protocol != "mlflow" or not url.endswith("/invocations"):
        page = service.health_url
    return (
        f"**Serving:** POST requests to `{url}` (e.g. `curl -X POST {url} -H "
        "'Content-Type: application/json' -d '{\"dataframe_split\": ...}'`); "
        f"what it serves: [{page}]({page})\n\n"
    )


def publish_report(
    facts: RunFacts,
    decision: str,
    champion: ChampionScore | None = None,
    service: ServiceRecord | None = None,
) -> str:
    """Create the run's markdown artifact and return its text."""
    reg = facts.registered
    champion_note = ""
    if champion is not None and champion.metrics is None:
        champion_note = f"\n\n_{champion.note}_"
    served = _serving(service) if service is not None else ""
    markdown = (
        f"# {reg.model_name} version {reg.model_version}\n\n"
        f"{_metrics_table(facts, champion)}{champion_note}\n\n"
        f"**Gate:** {decision}\n\n{served}"
        f"**Evaluation plots** (artifacts of the MLflow run): {_plots(reg.run_id)}\n\n"
        f"**MLflow run:** `{reg.run_id}`: {run_link(reg.run_id, reg.experiment_id)}\n\n"
        f"**Data:** `{facts.data_source}`, sha256 `{facts.data_sha256}`\n"
    )
    try:
        create_markdown_artifact(
            markdown=markdown,
            key=report_key(reg.model_name),
            description=f"{reg.model_name} report",
        )
    except httpx.TransportError as err:  # the work is done: losing its report must not fail it
        print(f"The run's report could not be saved: the Prefect API did not answer ({err}).")
    return markdown
