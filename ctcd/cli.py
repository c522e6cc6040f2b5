"""`ctcd`: the demo, and the served-models commands (`ctcd models --help`)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ctcd.exceptions import CtcdError

app = typer.Typer(no_args_is_help=True, help="Continuous training and deployment with Prefect.")
models = typer.Typer(no_args_is_help=True, help="Inspect and manage served models.")
app.add_typer(models, name="models")
rollouts = typer.Typer(
    no_args_is_help=True,
    help="A server's open rollout (canary or shadow): its evidence, and deciding it by hand.",
)
models.add_typer(rollouts, name="rollout")
prefect_server = typer.Typer(
    no_args_is_help=True,
    help="The local Prefect server (UI and API) that runs with no PREFECT_API_URL use.",
)
app.add_typer(prefect_server, name="prefect-server")
console = Console(width=None if sys.stdout.isatty() else 200)
DeployerOpt = Annotated[
    str | None,
    typer.Option(
        "--deployer",
        help="Saved deployer block, e.g. `seldon-model-deployer/prod` or "
        "`kserve-model-deployer/prod`; "
        "default: the local MLflow deployer.",
    ),
]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _deployer(name: str | None):  # type: ignore[no-untyped-def]
    from blocks.lookup import load_deployer

    return load_deployer(name)


def _notes(*records: Any) -> None:
    """Say on stderr where a record and its server differ (`state_differs`), and the fix."""
    for record in records:
        for line in record.observed.state_differs:
            typer.echo(f"Note: server {record.uuid[:8]}: {line}", err=True)


def _get(uuid: str, deployer: str | None):  # type: ignore[no-untyped-def]
    try:
        return _deployer(deployer).get_model_server(uuid)
    except CtcdError as err:
        _fail(str(err))


@models.command("list")
def list_models(
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    pipeline: Annotated[str | None, typer.Option("--pipeline")] = None,
    step: Annotated[str | None, typer.Option("--step")] = None,
    running: Annotated[bool, typer.Option("--running", help="Only active servers.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    deployer: DeployerOpt = None,
) -> None:
    """List model servers with their observed status."""
    records = _deployer(deployer).find_model_server(
        pipeline_name=pipeline, step_name=step, model_name=model, running=True if running else None
    )
    if as_json:
        typer.echo(json.dumps([r.summary() for r in records], indent=2))
        return
    table = Table("status", "uuid", "model", "version", "pipeline", "step", "url")
    for r in records:
        color = {"active": "green", "error": "red", "pending": "yellow"}.get(r.status.value, "")
        table.add_row(
            f"[{color}]{r.status.value}[/]" if color else r.status.value, r.uuid[:8],
            r.model_name, r.model_version, r.pipeline_name, r.step_name, r.prediction_url,
        )  # fmt: skip
    console.print(table if records else "No model servers.")
    _notes(*records)


def _owner(record, deployer: str | None):  # type: ignore[no-untyped-def]
    """The saved deployer block that made the server, else the deployer in use."""
    if record.deployer_block:
        try:
            return _deployer(record.deployer_block)
        except CtcdError:
            pass  # deleted since: compare with the deployer in use
    return _deployer(deployer)


@models.command()
def describe(
    uuid: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    deployer: DeployerOpt = None,
) -> None:
    """Everything recorded about one server, with its observed status and why, and where the
    deployer block that made it now asks for other settings (`settings_differ`)."""
    record = _get(uuid, deployer)
    record = record.seen(settings_differ=_owner(record, deployer).settings_differ(record))
    summary = record.summary() | _rollout_lines(record)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.markup import escape

    if record.rollout is not None:
        summary["rollout"] = record.rollout.describe()
    for key, value in summary.items():
        many = key in ("state_differs", "settings_differ") and value  # one per line
        for n, line in enumerate(value if many else [value]):
            label = f"[bold]{key:>22}[/]" if n == 0 else " " * 22
            console.print(f"{label}  {escape(str(line))}", highlight=False, soft_wrap=True)


@models.command()
def url(uuid: str, deployer: DeployerOpt = None) -> None:
    """Print the prediction URL."""
    typer.echo(_get(uuid, deployer).prediction_url)


@models.command()
def start(uuid: str, deployer: DeployerOpt = None) -> None:
    """Start a stopped or crashed server on its recorded URL; first repair where its record
    and its own files differ (`ctcd models describe`: state_differs)."""
    before = _get(uuid, deployer)
    try:
        record = _deployer(deployer).start_model_server(before.uuid)
    except CtcdError as err:
        _fail(str(err))
    typer.echo(
        f"{record.status.value}: {record.model_name} v{record.model_version} "
        f"at {record.prediction_url}"
    )
    for line in before.observed.state_differs:
        if line not in record.observed.state_differs:
            typer.echo(f"Repaired: {line.split(';')[0]}", err=True)
    _notes(record)


@models.command()
def stop(uuid: str, deployer: DeployerOpt = None) -> None:
    """Stop a server (reversible with `ctcd models start`)."""
    try:
        record = _deployer(deployer).stop_model_server(_get(uuid, deployer).uuid)
    except CtcdError as err:
        _fail(str(err))
    typer.echo(f"{record.status.value}: {record.uuid}")
    _notes(record)


@models.command()
def delete(
    uuid: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    deployer: DeployerOpt = None,
) -> None:
    """Stop a server and delete it: its runtime folder, or its SeldonDeployment or
    InferenceService (irreversible)."""
    dep = _deployer(deployer)
    try:
        record = dep.get_model_server(uuid)
    except CtcdError:
        typer.echo(f"Not found: {uuid} (nothing to delete)")
        return
    _notes(record)
    if not yes and not typer.confirm(f"Delete server {record.uuid}?"):
        _fail("not confirmed")
    try:
        dep.delete_model_server(record.uuid)
    except CtcdError as err:
        _fail(str(err))
    typer.echo(f"Deleted {record.uuid}")


@models.command()
def rollback(
    uuid: str,
    to_version: Annotated[
        str | None, typer.Option("--to-version", help="Registered version to serve.")
    ] = None,
    deployer: DeployerOpt = None,
    tracking: Annotated[
        str | None,
        typer.Option(
            "--tracking",
            help="Saved MLflowTracking block (server and credentials) holding the registry; "
            "default: MLFLOW_TRACKING_URI or local SQLite.",
        ),
    ] = None,
) -> None:
    """Serve the previous (or a given) version on the same URL and make it the champion."""
    from blocks.tracking import use_tracking

    record = _get(uuid, deployer)
    try:
        with use_tracking(tracking):
            record = _deployer(deployer).rollback_model_server(record.uuid, to_version)
    except CtcdError as err:
        _fail(str(err).splitlines()[0])
    typer.echo(f"{record.status.value}: {record.model_name} v{record.model_version} "
               f"at {record.prediction_url} (champion)")  # fmt: skip


@models.command()
def logs(
    uuid: str,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    deployer: DeployerOpt = None,
) -> None:
    """Print the server's log."""
    record = _get(uuid, deployer)
    _notes(record)
    dep = _deployer(deployer)
    for line in dep.get_logs(record.uuid, tail):
        typer.echo(line)
    if follow:
        try:
            for line in dep.follow_logs(record.uuid):
                typer.echo(line)
        except KeyboardInterrupt:
            pass


def _rollout_lines(record: Any, outcomes: str | None = None) -> dict[str, str]:
    """The open rollout's evidence so far, what the analysis would decide, its next run."""
    if record.rollout is None:
        return {}
    from flows.rollout import next_check, preview

    decision, reason, evidence = preview(record, outcomes)
    return {
        "rollout_evidence": evidence.summary() if evidence else "none (the server keeps no log)",
        "rollout_would_decide": f"{decision}: {reason}",
        "rollout_next_check": next_check(record.model_name),
    }


TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking", help="Saved MLflowTracking block holding the registry; default: "
                 "MLFLOW_TRACKING_URI or local SQLite."),
]  # fmt: skip


def _open_rollout(uuid: str, deployer: str | None):  # type: ignore[no-untyped-def]
    record = _get(uuid, deployer)
    if record.rollout is None:
        _fail(f"server {record.uuid[:8]} has no open rollout: it serves {record.model_name} "
              f"v{record.model_version} alone")  # fmt: skip
    return record


@rollouts.command("status")
def rollout_status(
    uuid: str,
    outcomes: Annotated[
        str | None,
        typer.Option("--outcomes", help="Table of labels (request_id, target) to judge on."),
    ] = None,
    deployer: DeployerOpt = None,
) -> None:
    """The open rollout: versions, mode, share, since when, the evidence so far, what
    `rollout-analysis` would decide now, and when it next runs."""

    record = _open_rollout(uuid, deployer)
    rows = {
        "server": f"{record.uuid} ({record.prediction_url})",
        "rollout": record.rollout.describe(),
    }
    lines = _rollout_lines(record, outcomes)
    rows |= {key.removeprefix("rollout_").replace("_", " "): value for key, value in lines.items()}
    for key, value in rows.items():
        console.print(f"[bold]{key:>14}[/]  {value}", highlight=False, soft_wrap=True)


def _decide_by_hand(uuid: str, deployer: str | None, tracking: str | None, how: str) -> None:
    from blocks.tracking import use_tracking
    from flows.rollout import act, evidence_of

    record = _open_rollout(uuid, deployer)
    reason = f"by hand (`ctcd models rollout {'promote' if how == 'promote' else 'abort'}`)"
    from prefect.events.worker import EventsWorker

    from ctcd import local_api

    try:  # the event goes to PREFECT_API_URL, else to ctcd's local server (as flows' runs do)
        with local_api.api(), use_tracking(tracking):
            evidence = evidence_of(record)
            done = act(_deployer(deployer), record, how, reason, evidence)  # type: ignore[arg-type]
            EventsWorker.drain_all(timeout=30, at_exit=False)  # sent before the API goes
    except CtcdError as err:
        _fail(str(err).splitlines()[0])
    role = "champion" if how == "promote" else "champion; the candidate stays challenger"
    typer.echo(f"{done.status.value}: {done.model_name} v{done.model_version} alone at "
               f"{done.prediction_url} ({role})")  # fmt: skip


@rollouts.command("promote")
def rollout_promote(uuid: str, deployer: DeployerOpt = None, tracking: TrackingOpt = None) -> None:
    """The candidate takes every request and becomes champion (the previous champion stays
    in the history for `ctcd models rollback`); emits `ctcd.rollout.promoted`."""
    _decide_by_hand(uuid, deployer, tracking, "promote")


@rollouts.command("abort")
def rollout_abort(uuid: str, deployer: DeployerOpt = None, tracking: TrackingOpt = None) -> None:
    """The candidate is removed; the champion answers every request; emits
    `ctcd.rollout.rolled_back`."""
    _decide_by_hand(uuid, deployer, tracking, "rollback")


@app.command()
def demo(
    rows: Annotated[
        int, typer.Option("--rows", help="Rows of the generated sample table.")
    ] = 115_609,
) -> None:
    """Run continuous deployment on the sample table and leave its server running."""
    from ctcd.demo import run

    try:
        run(rows)
    except CtcdError as err:
        _fail(str(err))


@prefect_server.command("status")
def prefect_server_status() -> None:
    """Say whether the local Prefect server runs, and where."""
    from ctcd import local_api

    server = local_api.recorded()
    if server is None:
        typer.echo("not running (the next flow run with no PREFECT_API_URL starts it)")
        return
    healthy = local_api.healthy(server)
    state = "running" if healthy else "starting (not answering yet)"
    typer.echo(f"{state}: {server.url} (PID {server.pid}, log {server.log})")
    if healthy:
        _settled(local_api.settle(server))


@prefect_server.command("start")
def prefect_server_start() -> None:
    """Start the local Prefect server (a no-op when it runs) and wait until it answers."""
    from ctcd import local_api

    try:
        server = local_api.ensure(say=typer.echo)
        local_api.wait_healthy(server)
    except CtcdError as err:
        _fail(str(err))
    typer.echo(f"running: {server.url} (PID {server.pid})")
    _settled(local_api.settle(server))


def _settled(changed: list[tuple[str, str]]) -> None:
    """Say which runs the server had left unended and what they are now."""
    for flow_run_id, state_type in changed:
        typer.echo(f"flow run {flow_run_id}: marked {state_type.title()} (its end was lost)")


@prefect_server.command("stop")
def prefect_server_stop() -> None:
    """Stop the local Prefect server (its runs stay in PREFECT_HOME's database)."""
    from ctcd import local_api

    server = local_api.recorded()
    if server is None:
        typer.echo("not running")
        return
    local_api.stop(server)
    typer.echo(f"stopped: {server.url} (PID {server.pid})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
