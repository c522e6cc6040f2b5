"""The ASGI app each gunicorn worker imports: MLflow's scoring server for the desired model.

Speaks MLflow's scoring protocol (`/invocations`, `/ping`, `/health`, `/version`) and adds
`/metadata`: which model name, version and URI this worker serves.

A worker loads the model `current.json` names and scores its input example before it accepts
a connection. If that fails it serves the one `stable.json` names instead (and says so in the
log), so a bad model never takes traffic and never makes a worker fail to boot (gunicorn's
master would stop). A worker that cannot read `current.json` (garbled, deleted) serves what
`stable.json` names, as the workers already running do. Once loaded, it announces itself in
`workers/<pid>.json`: the version it serves, the generation of `current.json` it read, and
whether it fell back. The master (`ctcd.serving.master`) retires an old worker only after a
new one has announced itself.

Requests are scored through `ctcd.serving.batching`: MLflow's own `invocations` handles each
request, and concurrent requests' rows are scored together in one `predict` call. The served
model's threading is set here, in memory (the registered artifact is unchanged): scikit-learn's
`n_jobs` and the BLAS/OpenMP pools get `CTCD_MODEL_THREADS` threads (default 1), so a
single-row call starts no thread pool and the workers, not the model's threads, use the cores.
What a worker answers is recorded in the server's prediction log (`ctcd.serving.predlog`).

During a rollout (`current.json` names a candidate beside the model) a worker loads both, the
candidate checked the same way, and `ctcd.serving.router` picks which one answers each request
(canary) or has the candidate score copies (shadow). A candidate that fails its check leaves
the worker serving the model alone and announcing the failure, so the master drops the rollout.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from mlflow.pyfunc import PyFuncModel, load_model, scoring_server

from ctcd.exceptions import StateFileError
from ctcd.files import write_json
from ctcd.rollout import OpenRollout
from ctcd.seams import load_delay
from ctcd.serving import desired as ds
from ctcd.serving.batching import BatchingModel, set_threads
from ctcd.serving.fastpath import FastInvocations
from ctcd.serving.limits import RequestGuard
from ctcd.serving.predlog import PredictionLog
from ctcd.serving.router import ROUTERS, Model, RolloutRouter
from ctcd.serving.settings import ServerSettings

SERVICE_DIR = Path(os.environ["CTCD_SERVICE_DIR"])


def _desired() -> tuple[ds.DesiredState | None, str | None]:
    """The desired state, or None and why it cannot be read (missing or garbled)."""
    try:
        current = ds.read_desired(SERVICE_DIR)
    except StateFileError as err:
        return None, str(err)
    return current, None if current else f"{SERVICE_DIR / ds.CURRENT} is missing"


def _settings() -> ServerSettings:
    """The settings the desired state names (those the stable model ran with while it cannot
    be read; else `CTCD_*` variables, else the defaults)."""
    current = _desired()[0] or ds.stable_or_none(SERVICE_DIR)
    return ServerSettings(**(current.settings if current and current.settings else {}))


SETTINGS = _settings()


def _load_checked(path: str) -> PyFuncModel:
    """Load the model and score its own input example: a model that loads but cannot
    predict is as broken as one that does not load."""
    loaded = load_model(path)
    set_threads(loaded, SETTINGS.model_threads)
    example = loaded.input_example
    if example is not None:
        loaded.predict(example if isinstance(example, pd.DataFrame) else pd.DataFrame(example))
    time.sleep(load_delay())  # tests only (ctcd.seams)
    return loaded


Candidate = tuple[ds.ServedModel, PyFuncModel, OpenRollout] | None


def _load() -> tuple[ds.ServedModel, PyFuncModel, dict[str, Any], Candidate]:
    """(what it serves, the model, its announcement, the rollout's candidate and its model)"""
    current, problem = _desired()
    if current is None:
        return *_hold(str(problem)), None
    said = {"pid": os.getpid(), "generation": current.generation, "fallback": False,
            "settings_id": current.settings_id}  # fmt: skip
    try:
        loaded = _load_checked(current.model_path)
    except Exception as err:
        stable = ds.stable_or_none(SERVICE_DIR)
        if stable is None:
            raise
        _say(
            f"version {current.model_version} failed to load or to score its input example; "
            "serving the previous version instead"
        )
        traceback.print_exc()
        said |= {"fallback": True, "error": f"{type(err).__name__}: {err}"[:500]}
        return stable, _load_checked(stable.model_path), said, None
    return current, loaded, said, _candidate(current, said)


def _candidate(current: ds.DesiredState, said: dict[str, Any]) -> Candidate:
    """The rollout's candidate, loaded and checked; None (the failure in `said`) if it fails."""
    rollout = current.rollout
    if rollout is None or current.candidate_path is None:
        return None
    try:
        model = _load_checked(current.candidate_path)
    except Exception as err:
        _say(
            f"candidate version {rollout.candidate_version} failed to load or to score its "
            f"input example; serving version {current.model_version} alone"
        )
        traceback.print_exc()
        said |= {"fallback": True, "error": f"{type(err).__name__}: {err}"[:500],
                 "failed_version": rollout.candidate_version}  # fmt: skip
        return None
    said["rollout"] = current.rollout_key
    served = ds.ServedModel(
        model_name=current.model_name, model_version=rollout.candidate_version,
        model_uri=rollout.candidate_uri, model_path=current.candidate_path,
        run_id=rollout.candidate_run_id,
    )  # fmt: skip
    return served, model, rollout


def _hold(problem: str) -> tuple[ds.ServedModel, PyFuncModel, dict[str, Any]]:
    """The desired state cannot be read: serve the stable model (what the other workers
    serve). With none, leave quietly (exit status 1, not gunicorn's boot error, which would
    stop the master); the master starts no worker until the state is readable again."""
    stable = ds.stable_or_none(SERVICE_DIR)
    if stable is None:
        _say(f"{problem}; there is no stable version to serve instead: this worker leaves")
        sys.exit(1)
    _say(f"{problem}; serving version {stable.model_version}, the stable one, instead")
    said = {"pid": os.getpid(), "generation": stable.generation, "fallback": False,
            "settings_id": stable.settings_id, "held": True}  # fmt: skip
    return stable, _load_checked(stable.model_path), said


def _say(message: str) -> None:
    print(f"[ctcd] worker {os.getpid()}: {message}", file=sys.stderr, flush=True)


def _announce(serving: ds.ServedModel, said: dict[str, Any]) -> None:
    folder = SERVICE_DIR / ds.WORKERS
    folder.mkdir(exist_ok=True)
    write_json(folder / f"{os.getpid()}.json", said | {"model_version": serving.model_version})
    master = int(os.environ.get("CTCD_MASTER_PID", "0"))
    if master and os.getppid() == master:  # wake the master: it acts on announcements
        os.kill(master, signal.SIGWINCH)


def _stack(served: ds.ServedModel, loaded: PyFuncModel, role: str) -> tuple[FastAPI, Model]:
    """One model's scoring app: MLflow's route behind the fast path, and its log."""
    log = PredictionLog(SERVICE_DIR, served.model_version, SETTINGS, role=role)
    atexit.register(log.close)
    batching = BatchingModel(loaded, SETTINGS, log=log)
    scoring = scoring_server.init(batching)  # type: ignore[arg-type]
    scoring.add_middleware(FastInvocations, scorer=batching)
    scoring.state.scorer = batching
    return scoring, Model(scoring, served.model_version, log, scorer=batching)


SERVING, model, _SAID, _CANDIDATE = _load()
ROLLOUT = _CANDIDATE[2] if _CANDIDATE else None
app, champion = _stack(SERVING, model, "champion")
candidate = _stack(_CANDIDATE[0], _CANDIDATE[1], _CANDIDATE[2].role)[1] if _CANDIDATE else None
scorer: BatchingModel = app.state.scorer
predictions = champion.log
app.add_middleware(
    RolloutRouter,
    champion=champion,
    candidate=candidate,
    rollout=ROLLOUT,
    shadow_batch_ms=SETTINGS.shadow_batch_ms,
)
# outermost: its limits apply to every path
app.add_middleware(RequestGuard, max_bytes=SETTINGS.max_body_bytes)


@app.on_event("shutdown")
async def _write_predictions() -> None:
    """A leaving worker (swap, stop) writes the predictions it still holds (its shadow copies
    scored first)."""
    for router in ROUTERS:
        await router.drain()
    predictions.close()
    if candidate is not None:
        candidate.log.close()


@app.on_event("startup")
async def _request_threads() -> None:
    """MLflow scores each request in the event loop's default thread pool; give it enough
    threads that every concurrent request can wait for its batch (the default is 6 here)."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=64))


@app.get("/metadata")
async def metadata() -> JSONResponse:
    keys = ("model_name", "model_version", "model_uri", "uuid")
    batching = {
        "enabled": scorer.enabled,
        "max_batch_size": scorer.settings.max_batch_size,
        "max_batch_wait_ms": scorer.settings.max_batch_wait_ms,
        "predict_calls": scorer.batches,
        "requests": scorer.batched_requests,
    } | scorer.counts
    extra = {"worker_pid": os.getpid(), "model_threads": SETTINGS.model_threads,
             "batching": batching, "settings": SETTINGS.model_dump(mode="json")}  # fmt: skip
    if candidate is not None and ROLLOUT is not None:
        extra["rollout"] = ROLLOUT.model_dump(mode="json") | {
            "candidate_requests": candidate.log.requests,
            "candidate_failures": candidate.log.failures,
            "candidate_skipped": candidate.log.skipped,
        }
    return JSONResponse(SERVING.model_dump(include=set(keys)) | extra)


_announce(SERVING, _SAID)
