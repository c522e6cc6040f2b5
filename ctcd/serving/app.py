"""The ASGI app each gunicorn worker imports: MLflow's scoring server for the current model.

Speaks MLflow's scoring protocol (`/invocations`, `/ping`, `/health`, `/version`) and adds
`/metadata`: which model name, version and URI this worker serves.

A worker loads the model `current.json` names and scores its input example before it accepts
a connection. If that fails it serves the one `previous.json` names instead (and says so in
the log), so a bad model never takes traffic and never makes a worker fail to boot (gunicorn's
master would stop). Once loaded, it announces itself and its version in `workers/<pid>.json`;
the deployer's rolling swap waits for that before it retires an old worker.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi.responses import JSONResponse
from mlflow.pyfunc import PyFuncModel, load_model, scoring_server

from ctcd.serving.limits import RequestGuard

SERVICE_DIR = Path(os.environ["CTCD_SERVICE_DIR"])


def _load_checked(path: str) -> PyFuncModel:
    """Load the model and score its own input example: a model that loads but cannot
    predict is as broken as one that does not load."""
    loaded = load_model(path)
    example = loaded.input_example
    if example is not None:
        loaded.predict(example if isinstance(example, pd.DataFrame) else pd.DataFrame(example))
    return loaded


def _load() -> tuple[dict[str, Any], PyFuncModel]:
    current = json.loads((SERVICE_DIR / "current.json").read_text())
    try:
        return current, _load_checked(current["model_path"])
    except Exception:
        previous = SERVICE_DIR / "previous.json"
        if not previous.exists():
            raise
        print(
            f"[ctcd] worker {os.getpid()}: version {current['model_version']} failed to load "
            "or to score its input example; serving the previous version instead",
            file=sys.stderr,
        )
        traceback.print_exc()
        fallback = json.loads(previous.read_text())
        return fallback, _load_checked(fallback["model_path"])


def _announce(serving: dict[str, Any]) -> None:
    folder = SERVICE_DIR / "workers"
    folder.mkdir(exist_ok=True)
    path = folder / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "model_version": serving["model_version"]}))
    tmp.replace(path)


SERVING, model = _load()
app = scoring_server.init(model)
app.add_middleware(RequestGuard)


@app.get("/metadata")  # type: ignore[untyped-decorator]
async def metadata() -> JSONResponse:
    keys = ("model_name", "model_version", "model_uri", "uuid")
    return JSONResponse({key: SERVING[key] for key in keys} | {"worker_pid": os.getpid()})


_announce(SERVING)
