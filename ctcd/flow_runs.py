"""Flow runs called from Python whose process or API server died are not left Running.

A flow called from Python runs in its caller's process, with no worker watching it: SIGKILL
that process and Prefect keeps the run Running forever; kill the API server before the run ends
and the run cannot record its end. ctcd does for such runs what a Prefect worker does for its
own (a worker marks Crashed a run whose process exited without reporting):

- While a ctcd flow runs against ctcd's local server (`ctcd.local_api`), its process keeps a
  record `prefect-server/runs/<flow run id>.json`: the server's API URL, the process's PID and
  that PID's start time, and, if the API stopped answering before the run could record its end,
  how the work itself ended. A run that ends normally removes its record.
- `sweep(api_url)` settles the records of that server: a run whose record says how the work
  ended gets that state (Completed, or Failed with its error); a run whose process is gone gets
  Crashed, saying the process died. It runs whenever a ctcd flow starts against the local server
  and on `ctcd prefect-server start|status`; a run Prefect already ended is left as it is.

Runs of deployments are run by a Prefect worker, which marks its own dead runs Crashed.

`bounded_retries()`: Prefect's client retries a request to a server that stopped answering 5
times with exponential back-off (2+4+8+16+32 s), per request: a run whose server died spent 3-4
minutes before its caller heard. ctcd's flows retry once (~2 s) unless the user set
PREFECT_CLIENT_MAX_RETRIES.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ctcd import processes as procs
from ctcd.files import read_json, write_json

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
CLIENT_RETRIES = 1  # one retry after ~2 s: a blip is bridged, a dead server is said at once


def _user_set(name: str) -> bool:
    """Whether the user set the Prefect setting `name` (environment or active profile)."""
    if name in os.environ:
        return True
    from prefect.context import get_settings_context

    return any(setting.name == name for setting in get_settings_context().profile.settings)


@contextlib.contextmanager
def bounded_retries() -> Iterator[None]:
    """Prefect's client retries at most `CLIENT_RETRIES` times inside, unless the user chose."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if _user_set(PREFECT_CLIENT_MAX_RETRIES.name):
        yield
        return
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: CLIENT_RETRIES}):
        yield


def _folder() -> Path:
    from ctcd.settings import ctcd_home

    folder = ctcd_home() / "prefect-server" / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def started(flow_run_id: str, api_url: str) -> None:
    """Record that this process runs `flow_run_id` against `api_url`."""
    me = procs.ProcessRef.of(os.getpid())
    record = {"api_url": api_url, "pid": me.pid, "started_at": me.started_at}
    write_json(_folder() / f"{flow_run_id}.json", record)


def ended(flow_run_id: str) -> None:
    """The run recorded its own end: nothing to settle."""
    (_folder() / f"{flow_run_id}.json").unlink(missing_ok=True)


def unrecorded_end(flow_run_id: str, state_type: str, message: str) -> None:
    """The run could not record its end (the API stopped answering): keep how the work ended
    (`COMPLETED`, `FAILED` or `CRASHED`) for the next `sweep` of its server."""
    path = _folder() / f"{flow_run_id}.json"
    record = read_json(path) or {}
    write_json(path, {**record, "state_type": state_type, "message": message})


def _settle(record: dict[str, object]) -> str | None:
    """The state this run needs now (None: leave it alone, its process still runs)."""
    if record.get("state_type"):
        return str(record["state_type"])
    ref = procs.ProcessRef(int(str(record.get("pid", 0))), float(str(record.get("started_at", 0))))
    return None if ref.alive() else "CRASHED"


def _crash_message(record: dict[str, object]) -> str:
    return (
        f"The process running this flow run (PID {record.get('pid')}) died before the run "
        "ended (killed or crashed); ctcd marked it Crashed, as a Prefect worker does for a "
        "run whose process died."
    )


def sweep(api_url: str) -> list[tuple[str, str]]:
    """Settle the recorded runs of the server at `api_url` (see the module docstring): the
    (flow run id, state type) of each run it changed. A run it cannot settle now (the server
    did not answer) keeps its record for the next sweep."""
    import httpx

    changed = []
    for path in sorted(_folder().glob("*.json")):
        record = read_json(path) or {}
        if record.get("api_url") != api_url:
            continue
        if (state_type := _settle(record)) is None:
            continue
        try:
            if _mark(api_url, path.stem, state_type, record):
                changed.append((path.stem, state_type))
        except httpx.HTTPError:
            continue
        path.unlink(missing_ok=True)
    return changed


def _mark(api_url: str, flow_run_id: str, state_type: str, record: dict[str, object]) -> bool:
    """Give the run `state_type` unless Prefect already ended it (or forgot it): whether it
    changed."""
    import httpx

    run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10)
    if run.status_code == 404:
        return False
    run.raise_for_status()
    if run.json()["state_type"] in FINAL:
        return False
    message = str(record.get("message") or _crash_message(record))
    state = {"type": state_type, "name": state_type.title(), "message": message}
    url = f"{api_url}/flow_runs/{flow_run_id}/set_state"
    httpx.post(url, json={"state": state, "force": True}, timeout=10).raise_for_status()
    return True
