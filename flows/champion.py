"""Before a gate decides: `champion` names what serves, every earlier version has a decision,
and no other run of the same model deploys or moves the alias meanwhile.

- `gating(model, version)`: while a run gates `version`, it holds a lock file of its own
  (`CTCD_HOME/gates/<model>/<version>.lock`, removed once the decision is recorded; left by
  a run that failed or died before that) and the
  model's lock (`CTCD_HOME/gates/<model>.lock`), so the reading of the champion, the gate, the
  deploy and the alias write of one run are never interleaved with another's (runs that share
  this `CTCD_HOME`). A version lock file left unlocked is a run that ended before its
  decision: its version is tagged `interrupted` by the next run.
- `follow_served(model, deployer)`: if the server of this model serves another version than
  `champion` names (a run killed between its deploy and its alias write), move the alias to
  what serves, tag why, and log it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger

from blocks.lookup import load_deployer
from ctcd.files import is_locked, locked
from ctcd.names import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_REPAIR_TAG,
    DEFAULT_PIPELINE,
    DEFAULT_STEP,
    GATE_TAG,
    INTERRUPTED,
    ROLLOUT_TAG,
)
from ctcd.rollout import OpenRollout
from ctcd.seams import pause_point
from ctcd.serving.desired import main_version
from ctcd.settings import ctcd_home
from flows.gate import champion_version


def _folder(model_name: str) -> Path:
    folder = ctcd_home() / "gates" / model_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _version_lock(path: Path) -> Iterator[None]:
    """Hold `path`'s lock; the file appears only once locked (made under another name and
    renamed), so no other run ever sees it unlocked while this one lives."""
    import fcntl

    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with open(temporary, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        temporary.replace(path)
        yield
        path.unlink(missing_ok=True)  # decided; a run that failed leaves it for the next run


@contextmanager
def gating(model_name: str, version: str, deployer: str | None) -> Iterator[None]:
    """Lock out other runs of `model_name`, tag versions whose runs died before their gate
    decided, and move `champion` to what serves; then gate, deploy and record in the block."""
    folder = _folder(model_name)
    with _version_lock(folder / f"{version}.lock"):
        pause_point("gate-locking", ctcd_home())
        with locked(folder.with_name(f"{model_name}.lock")):
            served = follow_served(model_name, deployer)
            mark_interrupted(model_name, version, served)
            yield


def served_version(model_name: str, deployer: str | None) -> str | None:
    """The version the deployer's server of this model serves (None: no server)."""
    found = load_deployer(deployer).find_model_server(
        pipeline_name=DEFAULT_PIPELINE, step_name=DEFAULT_STEP, model_name=model_name
    )
    if not found:
        return None
    workers = {main_version(named) for named in found[0].worker_versions.values()}
    return workers.pop() if len(workers) == 1 else found[0].model_version


def follow_served(model_name: str, deployer: str | None) -> str | None:
    """Make `champion` name the version that serves; return that version."""
    import mlflow

    served = served_version(model_name, deployer)
    champion = champion_version(model_name)
    if served is None or served == champion:
        return served
    why = (
        f"champion named v{champion} while the server of {model_name} served v{served} (a "
        "run ended between its deploy and its alias write); moved to what serves"
    )
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(model_name, CHAMPION, served)
    client.set_model_version_tag(model_name, served, CHAMPION_REPAIR_TAG, why)
    get_run_logger().warning("Repaired the alias: %s", why)
    return served


def mark_interrupted(model_name: str, current: str, served: str | None) -> None:
    """Give each version whose gating run died (its lock file left unlocked) the decision
    `interrupted`, unless it has one; remove those lock files."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for path in sorted(_folder(model_name).glob("*.lock")):
        version = path.stem
        if version == current or is_locked(path):
            continue
        try:
            tags = client.get_model_version(model_name, version).tags or {}
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            tags = {GATE_TAG: "(the version was deleted)"}
        if GATE_TAG not in tags:
            how = (
                "after deploying it, before recording the decision; it serves, so it is champion"
                if version == served
                else "before its gate decided; it was not deployed"
            )
            decision = f"{INTERRUPTED}: the run gating it ended {how} (found by a later run)"
            client.set_model_version_tag(model_name, version, GATE_TAG, decision)
            get_run_logger().warning("%s v%s: %s", model_name, version, decision)
        path.unlink(missing_ok=True)


def record_deployed(
    model_name: str,
    version: str,
    reason: str,
    deployer: str | None,
    rollout: OpenRollout | None = None,
) -> tuple[bool, str]:
    """After this run's deploy: `champion` and the decision `deployed: ...` if what serves is
    still `version`; else (another run, not sharing this CTCD_HOME's locks, deployed after it)
    no alias and `overtaken: ...`. A version deployed as a rollout's candidate gets
    `challenger` and `rolling out: ...` (promotion makes it champion). Returns whether it
    serves, and the decision recorded."""
    import mlflow

    client = mlflow.MlflowClient()
    if rollout is not None and rollout.candidate_version == version:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        verdict = f"rolling out: {reason}; {rollout.describe()}, until rollout-analysis decides"
        client.set_model_version_tag(model_name, version, GATE_TAG, verdict)
        opened = f"open: {rollout.describe()}"
        client.set_model_version_tag(model_name, version, ROLLOUT_TAG, opened)
        return True, verdict
    now = served_version(model_name, deployer)
    if now == version:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        verdict = f"deployed: {reason}"
    else:
        verdict = (
            f"overtaken: {reason}; deployed, but v{now} replaced it before its alias was "
            "written, so it is not champion"
        )
        get_run_logger().warning("%s v%s %s", model_name, version, verdict)
    client.set_model_version_tag(model_name, version, GATE_TAG, verdict)
    return now == version, verdict
