"""gunicorn settings for ctcd's local model servers (host, port and workers come from argv;
the master is `ctcd.serving.master`, which takes the worker count from `current.json`).

The libraries a worker needs are imported here, in the master, so workers forked for a swap
only load the model (about 0.4 s) instead of importing MLflow and scikit-learn.
"""

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

import fastapi  # noqa: F401
import mlflow.pyfunc.scoring_server  # noqa: F401
import pandas  # noqa: F401
import sklearn.ensemble
import sklearn.pipeline  # noqa: F401
import skops.io  # noqa: F401

worker_class = "uvicorn_worker.UvicornWorker"
control_socket_disable = True  # gunicorn 26 would otherwise write ~/.gunicorn
preload_app = False  # each worker reads current.json when it boots
graceful_timeout = 10
timeout = 120
keepalive = 5
errorlog = "-"
loglevel = "info"

_PR_SET_PDEATHSIG = 1


def post_fork(server: Any, worker: Any) -> None:
    """In a new worker: leave (draining, as on SIGTERM) when the master dies, since uvicorn
    workers do not watch their parent; and drop any announcement a former process with this
    PID left behind."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != server.pid:  # the master died before prctl took effect
            os._exit(0)
    os.environ["CTCD_MASTER_PID"] = str(server.pid)  # whom the app may wake (ctcd.serving.app)
    folder = Path(os.environ["CTCD_SERVICE_DIR"], "workers")
    for suffix in (".json", ".leaving"):
        (folder / f"{os.getpid()}{suffix}").unlink(missing_ok=True)
