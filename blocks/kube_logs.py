"""Pod logs for the cluster deployers: the model container's lines from the predictor pods a
label selector finds, and following them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from blocks.kube import Session


async def pod_logs(
    api: AbstractAsyncContextManager[Session],
    selector: str,
    container: str,
    tail: int | None,
    what: str,
) -> list[str]:
    """The log lines of `container` in the pods `selector` finds (each line prefixed with its
    pod when there are several), or one line saying there are none."""
    async with api as session:
        pods = await session.core.list_namespaced_pod(session.namespace, label_selector=selector)
        if not pods.items:
            return [
                f"No predictor pods exist for {what} in namespace {session.namespace} "
                "(stopped, or not scheduled yet): there is no log to show."
            ]
        lines: list[str] = []
        for pod in pods.items:
            lines += await _pod_log(session, pod, container, tail, len(pods.items) > 1)
        return lines


async def _pod_log(
    session: Session, pod: Any, container: str, tail: int | None, prefix: bool
) -> list[str]:
    name = pod.metadata.name
    try:
        text = await session.core.read_namespaced_pod_log(
            name, session.namespace, container=container, tail_lines=tail
        )
    except ApiException as err:
        if err.status in (401, 403):
            raise  # a permission to grant, not a pod without a log
        phase = pod.status.phase if pod.status else "unknown"
        return [f"Pod {name} ({phase}) has no readable log: HTTP {err.status} {err.reason}"]
    return [f"[{name}] {line}" if prefix else line for line in str(text).splitlines()]


def follow(read: Callable[[int | None], list[str]], every: float = 2.0) -> Iterator[str]:
    """New lines as `read(tail)` shows them, until interrupted."""
    seen: set[str] = set(read(None))
    while True:
        time.sleep(every)
        for line in read(200):
            if line not in seen:
                seen.add(line)
                yield line
