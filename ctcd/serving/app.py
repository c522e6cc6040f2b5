"""The ASGI app each gunicorn worker imports: MLflow's scoring server for the current model.

Speaks MLflow's scoring protocol (`/invocations`, `/ping`, `/health`, `/version`) and adds
`/metadata`: which model name, version and URI this worker serves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi.responses import JSONResponse
from mlflow.pyfunc import load_model, scoring_server

SERVICE_DIR = Path(os.environ["CTCD_SERVICE_DIR"])
CURRENT = json.loads((SERVICE_DIR / "current.json").read_text())

model = load_model(CURRENT["model_path"])
app = scoring_server.init(model)


@app.get("/metadata")  # type: ignore[untyped-decorator]
async def metadata() -> JSONResponse:
    return JSONResponse(
        {key: CURRENT[key] for key in ("model_name", "model_version", "model_uri", "uuid")}
    )
