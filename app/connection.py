"""Which server the app talks to, and asking it for scores, with messages a person can act on.

Every page load looks the server up again through `find_service`, so a swap to a new
version (same URL) or a server that stopped is noticed on the next request.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pandas as pd

from blocks.service import ServiceRecord
from ctcd.exceptions import CtcdError, PredictionError, ServiceNotFoundError
from deployments.lookup import find_service

CHUNK_ROWS = 10_000  # rows per request: keeps a batch well under the server's body limit


@dataclass(frozen=True)
class Connection:
    """The running server for the model, or why there is none."""

    service: ServiceRecord | None
    problem: str = ""


def _flag(deployer: str | None) -> str:
    return f" --deployer {deployer}" if deployer else ""


def deploy_command(model_name: str, deployer: str | None) -> str:
    """The command that trains, gates and deploys the model (what to run when none serves)."""
    if model_name == "customer-satisfaction" and not deployer:
        return "make demo"
    call = f"continuous_deployment_pipeline(model_name={model_name!r}, deployer={deployer!r})"
    return (
        '.venv/bin/python -c "from flows.continuous_deployment import '
        f'continuous_deployment_pipeline; {call}"'
    )


def connect(model_name: str, deployer: str | None) -> Connection:
    """Find the newest running server for `model_name`; explain when there is none."""
    try:
        return Connection(find_service(model_name, deployer=deployer))
    except ServiceNotFoundError:
        pass
    except CtcdError as err:  # e.g. no saved deployer block of that name
        return Connection(None, str(err))
    try:
        idle = find_service(model_name, deployer=deployer, running=False)
    except ServiceNotFoundError:
        return Connection(
            None,
            f"No model server is running for '{model_name}'. Deploy one with:\n\n"
            f"    {deploy_command(model_name, deployer)}",
        )
    why = f" ({idle.status_message})" if idle.status_message else ""
    return Connection(
        None,
        f"The server for '{model_name}' version {idle.model_version} at {idle.prediction_url} "
        f"is {idle.status.value}{why}. Start it again with:\n\n"
        f"    .venv/bin/ctcd models start {idle.uuid[:8]}{_flag(deployer)}",
    )


def predict(service: ServiceRecord, frame: pd.DataFrame) -> list[float]:
    """Scores for every row of `frame`, in chunks; a `PredictionError` says what went wrong."""
    scores: list[float] = []
    try:
        for start in range(0, len(frame), CHUNK_ROWS):
            scores += [float(s) for s in service.predict(frame.iloc[start : start + CHUNK_ROWS])]
    except httpx.HTTPStatusError as err:
        body = err.response.text[:400]
        raise PredictionError(
            f"The model server at {service.prediction_url} answered "
            f"{err.response.status_code}: {body}"
        ) from err
    except httpx.HTTPError as err:
        raise PredictionError(
            f"The model server at {service.prediction_url} did not answer "
            f"({type(err).__name__}: {err}); it may have stopped. See its state with "
            f"`.venv/bin/ctcd models describe {service.uuid[:8]}`."
        ) from err
    return scores
