"""Rollouts on a local server: a candidate served beside the model, then promoted or aborted.

The desired state (`current.json`) is the truth here as for a swap: opening a rollout writes
the model it serves now plus the candidate (`rollout`, `candidate_path`), and every worker is
replaced, one at a time, by one that has loaded and checked both. Aborting writes the model
alone again; promoting writes the candidate alone (a swap, health-gated like a deploy). A
process killed at any point leaves the server converging on what was written, and the record
(`service.json`) follows the desired state when it is next read (`local_records.observe`).
"""

from __future__ import annotations

import contextlib

from blocks import local_process as lp
from blocks import local_records as store
from blocks.deployer import DeploymentConfig, config_of
from blocks.service import ServiceRecord, ServiceState
from ctcd.exceptions import ModelLoadError, ModelServerError, StateFileError
from ctcd.rollout import OpenRollout
from ctcd.seams import pause_point
from ctcd.serving import desired as ds


def _serving(record: ServiceRecord) -> ds.ServedModel:
    """The model the server serves every request with now (its copy staged)."""
    runtime = record.local.runtime_dir
    with contextlib.suppress(StateFileError):
        want = ds.read_desired(runtime)
        if want is not None:
            return want.served()
    config = config_of(record)
    path = store.stage(runtime, config)
    return ds.ServedModel(**config.model_dump(), uuid=record.uuid, model_path=str(path))


def _converge(
    record: ServiceRecord, generation: int, timeout: float, stop_timeout: float, what: str
) -> ServiceRecord:
    """Wait until the workers serve `generation`; on failure, record why and raise (a
    candidate a worker could not load was dropped by the master: the model serves alone)."""
    try:
        if lp.process(record) is None:
            raise ModelServerError(what, "the server is not running", hint=(
                f"`ctcd models start {record.uuid[:8]}` starts it with this state"
            ))  # fmt: skip
        lp.wake(record)
        lp.wait_converged(record, generation, timeout)
    except ModelLoadError as err:
        store.write(record, rollout=None, last_error=str(err))
        with contextlib.suppress(ModelServerError):  # the master retires the extra worker
            lp.wait_converged(record, generation + 1, stop_timeout)
        raise
    except ModelServerError as err:
        store.write(record, last_error=str(err))
        raise
    return store.write(record, last_error=None)


def open_rollout(
    record: ServiceRecord,
    config: DeploymentConfig,
    rollout: OpenRollout,
    timeout: float,
    stop_timeout: float,
) -> ServiceRecord:
    """Serve `config` as the candidate of `rollout` beside the model the server serves."""
    runtime = record.local.runtime_dir
    champion = _serving(record)
    candidate_path = store.stage(runtime, config)
    generation = ds.set_desired(
        runtime, champion, record.workers, rollout=(rollout, str(candidate_path))
    )
    assert generation is not None  # unconditional writes always happen
    pause_point("desired-written", runtime)
    record = store.write(record, rollout=rollout, desired_state=ServiceState.ACTIVE)
    what = f"Opening the {rollout.mode} of {config.model_name} v{config.model_version}"
    return _converge(record, generation, timeout, stop_timeout, what)


def abort(
    record: ServiceRecord, rollout: OpenRollout, timeout: float, stop_timeout: float
) -> ServiceRecord:
    """The model alone again; the candidate's copy is removed."""
    runtime = record.local.runtime_dir
    generation = ds.set_desired(runtime, _serving(record), record.workers)
    assert generation is not None
    pause_point("desired-written", runtime)
    record = store.write(record, rollout=None)
    what = f"Rolling back the {rollout.mode} of {record.model_name} v{rollout.candidate_version}"
    done = _converge(record, generation, timeout, stop_timeout, what)
    store.prune(runtime, keep={record.model_version})
    return done
