"""The named seams where a test reaches into a running process, in one place.

- `pause_point(step, folder)`: with `CTCD_TEST_PAUSE=<step>` (or a comma-separated list of
  steps), the process that reaches `step` writes `paused-<step>` (its PID) into `folder` and
  sleeps until killed, so a test can kill it at exactly that moment (a deploy after writing the
  desired state, the master after retiring a worker, ...), or until the test removes that file:
  then it goes on (to kill or restart something else meanwhile, e.g. the Prefect or MLflow
  server). The steps are listed in `STEPS`.
- `load_delay()`: with `CTCD_TEST_LOAD_DELAY_S`, a model-server worker spends that many seconds
  more loading its model, so a test can see whether any request waits for a loading worker.

Unset (always, outside tests), both do nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "CTCD_TEST_PAUSE"
LOAD_DELAY_ENV = "CTCD_TEST_LOAD_DELAY_S"
STEPS = (
    "staging",  # a deploy downloaded a model copy, before moving it into place
    "desired-written",  # a deploy wrote the desired state, before it waits for the swap
    "worker-announced",  # a deploy saw a new worker announce the desired version
    "worker-leaving",  # a deploy saw an old worker told to leave
    "master-retired",  # the master told a worker to leave
    "champion-reading",  # a gating run, before it reads the champion (folder: CTCD_HOME)
    "gate-decided",  # a gating run decided, before it deploys or records (folder: CTCD_HOME)
    "gate-locking",  # a gating run registered its version, before the model's lock (CTCD_HOME)
    "deployed",  # a gating run's deploy returned, before it writes the alias (CTCD_HOME)
)


def pause_point(step: str, folder: Path) -> None:
    """Stop here until killed or resumed when `CTCD_TEST_PAUSE` names `step` (see the module
    docstring)."""
    if step not in os.environ.get(PAUSE_ENV, "").split(","):
        return
    marker = folder / f"paused-{step}"
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.2)


def pausing() -> bool:
    """Whether a test asked any process to pause (lets callers skip observing otherwise)."""
    return bool(os.environ.get(PAUSE_ENV))


def load_delay() -> float:
    """Extra seconds a worker spends loading its model (0 outside tests)."""
    return float(os.environ.get(LOAD_DELAY_ENV, "0"))
