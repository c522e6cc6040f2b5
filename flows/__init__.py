"""ctcd's Prefect flows and their tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from ctcd import warmup


class CtcdFlow(Flow):  # type: ignore[type-arg]
    """A Prefect flow that runs against the temporary API server `ctcd.warmup` started
    during import, when there is one (see that module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with warmup.prefect_api():
            return super().__call__(*args, **kwargs)


def ctcd_flow(**options: Any) -> Callable[[Callable[..., Any]], CtcdFlow]:
    """`@flow(...)`, returning a `CtcdFlow`."""

    def decorate(fn: Callable[..., Any]) -> CtcdFlow:
        return CtcdFlow(fn, **options)

    return decorate


warmup.start()
