"""A rollout on a SeldonDeployment, with Seldon Core v1's own traffic handling: the candidate
is a second predictor (`candidate`) beside the champion's (`default`).

- canary: both predictors carry `traffic` weights (integers summing to 100, as Seldon's
  validating webhook wants): the champion 100 - p, the candidate p. The ingress splits
  requests at random by those weights (Seldon has no sticky split by request id).
- shadow: the candidate has `shadow: true`: the ingress mirrors every request to it and drops
  its answers. Seldon has no share of requests to mirror, so a shadow of less than 100 % is
  refused.

Promotion puts the candidate's predictor in the champion's place (named `default`) and removes
the second one; an abort removes the second one. Each change (`open_change`, `promote_change`,
`abort_change`) writes the spec and the record it leads to in one request."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from blocks import seldon_manifest as sm
from blocks.deployer import candidate_config
from blocks.seldon_manifest import PREDICTOR
from blocks.service import ServiceRecord, ServiceState
from ctcd.exceptions import ModelConfigError, ModelServerError
from ctcd.rollout import OpenRollout, RolloutPolicy

CANDIDATE = "candidate"
_ROUTING = ("traffic", "shadow")
Change = Callable[[dict[str, Any]], None]  # edits a SeldonDeployment before it is written


def canary_weights(percent: float) -> tuple[int, int]:
    """(champion, candidate) traffic weights for a canary of `percent` % of requests."""
    share = math.floor(percent + 0.5)
    if not 0 < share < 100:
        raise ModelConfigError(
            f"A canary of {percent:g} % of requests rounds to {share} %: Seldon Core splits "
            "traffic in whole percent, so the candidate would get "
            + ("no request" if share <= 0 else "every request")
            + ". Use a `traffic_percent` from 1 to 99 (or mode 'replace' to swap at once)."
        )
    return 100 - share, share


def check(rollout: OpenRollout | RolloutPolicy) -> None:
    """Refuse what Seldon Core cannot do, before anything is written."""
    if rollout.mode == "canary":
        canary_weights(rollout.percent)
    elif rollout.mode == "shadow" and rollout.percent < 100:
        raise ModelConfigError(
            f"Seldon Core mirrors every request to a shadow predictor; it cannot copy only "
            f"{rollout.percent:g} % of them. Set `shadow_percent` to 100 (the deployer block's "
            "field, or the flow's `rollout` policy), or run a canary (`traffic_percent`) to "
            "expose only a share of requests."
        )


def plain(predictor: dict[str, Any], name: str = PREDICTOR) -> dict[str, Any]:
    """`predictor` as the only one: named `name`, without traffic weight or shadow flag."""
    kept = {k: v for k, v in predictor.items() if k not in _ROUTING}
    return {**kept, "name": name}


def with_candidate(
    champion: dict[str, Any], candidate: dict[str, Any], rollout: OpenRollout
) -> list[dict[str, Any]]:
    """The champion's predictor and the candidate's beside it, routed as `rollout` says."""
    first, second = plain(champion), plain(candidate, CANDIDATE)
    if rollout.mode == "canary":
        first["traffic"], second["traffic"] = canary_weights(rollout.percent)
    else:
        second["shadow"] = True
    return [first, second]


def candidate_of(predictors: list[dict[str, Any]], rollout: OpenRollout) -> dict[str, Any]:
    """The candidate's predictor, promoted: in the champion's place, as the only one."""
    for predictor in predictors:
        if predictor.get("name") == CANDIDATE:
            return plain(predictor)
    raise ModelServerError(
        f"Promoting v{rollout.candidate_version}",
        f"the SeldonDeployment has no `{CANDIDATE}` predictor any more (edited by hand?); "
        f"abort the rollout and deploy v{rollout.candidate_version} again",
    )


def _stamp(record: ServiceRecord, **update: Any) -> ServiceRecord:
    return record.model_copy(update={**update, "last_error": None, "updated_at": datetime.now(UTC)})


def opened(record: ServiceRecord, rollout: OpenRollout) -> ServiceRecord:
    """The record with `rollout` open: the champion still serves as before."""
    return _stamp(record, rollout=rollout)


def promoted(record: ServiceRecord, rollout: OpenRollout, replicas: int) -> ServiceRecord:
    """The record once the candidate serves alone: its version, history grown (as a deploy)."""
    config = candidate_config(record, rollout)
    history = record.history
    if record.model_version != config.model_version:
        history = [*history, config.model_version][-20:]
    return _stamp(
        record, **config.model_dump(), history=history, workers=replicas, rollout=None,
        desired_state=ServiceState.ACTIVE,
    )  # fmt: skip


def closed(record: ServiceRecord) -> ServiceRecord:
    """The record once the candidate is removed: the champion serves alone."""
    return _stamp(record, rollout=None)


def open_change(record: ServiceRecord, candidate: dict[str, Any], rollout: OpenRollout) -> Change:
    """Keep the champion's predictor, put `candidate` beside it (replacing an earlier one)."""

    def mutate(sdep: dict[str, Any]) -> None:
        current = sm.read_record(sdep) or record
        champion = sdep["spec"]["predictors"][0]
        sdep["spec"]["predictors"] = with_candidate(champion, candidate, rollout)
        sm.store(sdep, opened(current, rollout))

    return mutate


def promote_change(record: ServiceRecord, rollout: OpenRollout) -> Change:
    """The candidate's predictor alone, in the champion's place."""

    def mutate(sdep: dict[str, Any]) -> None:
        current = sm.read_record(sdep) or record
        main = candidate_of(sdep["spec"]["predictors"], rollout)
        sdep["spec"]["predictors"] = [main]
        sm.store(sdep, promoted(current, rollout, int(main.get("replicas", 1))))

    return mutate


def abort_change(record: ServiceRecord) -> Change:
    """The champion's predictor alone."""

    def mutate(sdep: dict[str, Any]) -> None:
        current = sm.read_record(sdep) or record
        sdep["spec"]["predictors"] = [plain(sdep["spec"]["predictors"][0])]
        sm.store(sdep, closed(current))

    return mutate
