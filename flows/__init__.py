"""ctcd's Prefect flows and their tasks.

Importing a module here starts nothing. Calling a flow with no `PREFECT_API_URL` runs it against
the local Prefect server ctcd keeps (`ctcd.local_api`): the call starts that server the first
time (or reuses the running one) and waits until it answers. `ctcd demo` starts it before it
imports the flows, so its start overlaps those imports.

A call also keeps its run from staying Running when its process or the API server dies
(`ctcd.flow_runs`): Prefect's client retries a dead server for seconds, not minutes, and an API
that stops answering before the run could record its end gives the caller a `PrefectApiLost`
saying whether the work finished and how to bring the server back.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx
from prefect import Flow

from ctcd import flow_runs, local_api
from ctcd import processes as procs
from ctcd.exceptions import PrefectApiLost


@dataclass
class _Call:
    """One call of a ctcd flow: where it runs, its run, and how its work ended."""

    api_url: str | None
    local: bool
    flow_run_id: str | None = None
    name: str = ""
    outcome: str | None = None  # COMPLETED or FAILED once the flow's function returned/raised
    error: str = ""
    result: Any = None


_call: ContextVar[_Call | None] = ContextVar("ctcd_flow_call", default=None)


def _tracked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, noting on the current call its flow run and how the work ended. The wrapper has
    `fn`'s globals: Prefect resolves a flow's (string) annotations in its function's globals."""
    body = _run_tracked

    def run(*args: Any, **kwargs: Any) -> Any:
        return body(fn, args, kwargs)

    rebound = types.FunctionType(run.__code__, fn.__globals__, fn.__name__, None, run.__closure__)
    return functools.wraps(fn)(rebound)


def _run_tracked(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    from prefect.context import FlowRunContext

    call, context = _call.get(), FlowRunContext.get()
    if call is None or context is None or context.flow_run is None:
        return fn(*args, **kwargs)  # `flow.fn()`, or run by a worker
    call.flow_run_id, call.name = str(context.flow_run.id), context.flow_run.name
    if call.local and call.api_url:
        flow_runs.started(call.flow_run_id, call.api_url)
    try:
        call.result = fn(*args, **kwargs)
    except BaseException as err:
        call.outcome, call.error = "FAILED", f"{type(err).__name__}: {err}"
        raise
    call.outcome = "COMPLETED"
    return call.result


def _lost(call: _Call, err: Exception) -> PrefectApiLost:
    """The caller's error when the API stopped answering (and the record the sweep settles)."""
    api_url = call.api_url or "(the configured PREFECT_API_URL)"
    run = f"'{call.name}' ({call.flow_run_id})" if call.flow_run_id else "(not created)"
    ends = {"COMPLETED": "Completed", "FAILED": "Failed"}
    if call.outcome == "COMPLETED":
        work = "The work itself finished (its result is this error's `result`)."
    elif call.outcome == "FAILED":
        work = f"The work itself failed: {call.error}."
    else:
        work = f"The work did not finish: it needed the API ({type(err).__name__})."
    if call.local:
        state = ends.get(call.outcome or "", "Crashed")
        fix = f"Run `ctcd prefect-server start` to bring it back: the run is then marked {state}."
        if call.flow_run_id:
            message = f"{work} The Prefect API stopped answering before the run recorded it."
            flow_runs.unrecorded_end(call.flow_run_id, state.upper(), message)
    else:
        fix = f"Start the Prefect server at {api_url} again; the run stays Running there."
    return PrefectApiLost(api_url, run, work, fix, call.result)


class CtcdFlow(Flow):  # type: ignore[type-arg]
    """A Prefect flow that, with no API URL configured, runs against the local Prefect server
    ctcd keeps (see `ctcd.local_api`) instead of a temporary one per process, and whose runs
    are not left Running when their process or API server dies (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        super().__init__(fn, **options)
        self.fn = _tracked(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from prefect.settings import PREFECT_API_URL

        with local_api.api() as local_url, flow_runs.bounded_retries():
            call = _Call(local_url or PREFECT_API_URL.value(), local_url is not None)
            token, lost = _call.set(call), False
            try:
                return super().__call__(*args, **kwargs)
            except httpx.TransportError as err:
                if not call.api_url or procs.answers(f"{call.api_url}/health"):
                    raise  # the work's own connection failed, not Prefect's API
                lost = True
                raise _lost(call, err) from err
            finally:
                _call.reset(token)
                if call.local and call.flow_run_id and not lost:
                    flow_runs.ended(call.flow_run_id)


def ctcd_flow(**options: Any) -> Callable[[Callable[..., Any]], CtcdFlow]:
    """`@flow(...)`, returning a `CtcdFlow`."""

    def decorate(fn: Callable[..., Any]) -> CtcdFlow:
        return CtcdFlow(fn, **options)

    return decorate
