"""ctcd's Prefect flows and their tasks.

Importing a module here starts nothing. Calling a flow with no `PREFECT_API_URL` runs it against
the local Prefect server ctcd keeps (`ctcd.local_api`): the call starts that server the first
time (or reuses the running one) and waits until it answers. `ctcd demo` starts it before it
imports the flows, so its start overlaps those imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from ctcd import local_api


class CtcdFlow(Flow):  # type: ignore[type-arg]
    """A Prefect flow that, with no API URL configured, runs against the local Prefect server
    ctcd keeps (see `ctcd.local_api`) instead of a temporary one per process."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with local_api.api():
            return super().__call__(*args, **kwargs)


def ctcd_flow(**options: Any) -> Callable[[Callable[..., Any]], CtcdFlow]:
    """`@flow(...)`, returning a `CtcdFlow`."""

    def decorate(fn: Callable[..., Any]) -> CtcdFlow:
        return CtcdFlow(fn, **options)

    return decorate
