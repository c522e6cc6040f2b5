"""Pre-flight check run in its own process before a model takes traffic.

`python -m ctcd.serving.probe MODEL_PATH` loads the model exactly as the server does and
sends its own input example through MLflow's scoring app. Exit 0: safe to serve.
"""

from __future__ import annotations

import sys


def probe(model_path: str) -> None:
    import pandas as pd
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import load_model, scoring_server

    model = load_model(model_path)
    example = model.input_example
    if example is None:
        raise RuntimeError(f"model at {model_path} has no input example to probe with")
    frame = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
    body = {"dataframe_split": frame.to_dict(orient="split")}
    body["dataframe_split"].pop("index", None)
    response = TestClient(scoring_server.init(model)).post("/invocations", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"probe request answered {response.status_code}: {response.text[:500]}")
    predictions = response.json().get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(frame):
        raise RuntimeError(f"probe got {predictions!r} for {len(frame)} rows")


if __name__ == "__main__":
    probe(sys.argv[1])
    print("probe ok")
