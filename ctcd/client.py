"""One client for the scoring protocols ctcd's model servers speak (as MLflow keeps
`scoring_server/client.py`): the request body for a DataFrame, the predictions in an answer,
and a POST that retries once on a reset keep-alive connection. Used by `ServiceRecord.predict`,
the deployers' probes, the load generator, the app and the benchmarks.

- `mlflow`: MLflow's scoring protocol, `{"dataframe_split": {...}}` -> `{"predictions": [...]}`;
- `seldon`: Seldon Core's v1 protocol, `{"data": {"names", "ndarray"}}` -> `data.ndarray` (or
  `data.tensor.values`);
- `v2`: the Open Inference (V2) protocol, one input per column -> the first output's `data`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import httpx

if TYPE_CHECKING:
    import pandas as pd

Protocol = Literal["mlflow", "seldon", "v2"]
JSON = {"Content-Type": "application/json"}
# Errors on which an idempotent request is sent once more on a new connection: the server
# closed an idle keep-alive connection just as it was used.
RETRIED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)


def v2_datatype(dtype: Any) -> str:
    """The V2 tensor datatype of a pandas/NumPy column type."""
    kind = getattr(dtype, "kind", "O")
    return {"f": "FP64", "i": "INT64", "u": "INT64", "b": "BOOL"}.get(kind, "BYTES")


def request_body(data: pd.DataFrame, protocol: Protocol) -> str:
    """The JSON body a server of `protocol` takes for the rows of `data` (NaN sent as null)."""
    if protocol == "mlflow":
        return '{"dataframe_split": ' + data.to_json(orient="split", index=False) + "}"
    split = json.loads(data.to_json(orient="split", index=False))
    if protocol == "seldon":
        return json.dumps({"data": {"names": split["columns"], "ndarray": split["data"]}})
    columns = [
        {
            "name": str(name),
            "shape": [len(data)],
            "datatype": v2_datatype(data[name].dtype),
            "data": [row[i] for row in split["data"]],
        }
        for i, name in enumerate(split["columns"])
    ]
    return json.dumps({"parameters": {"content_type": "pd"}, "inputs": columns})


def read_predictions(answer: Any, protocol: Protocol) -> list[Any]:
    """The predictions in a server's decoded JSON answer; raises KeyError, TypeError or
    IndexError when the answer has none."""
    if protocol == "mlflow":
        predictions = answer["predictions"]
    elif protocol == "seldon":
        data = answer["data"]
        predictions = data["ndarray"] if "ndarray" in data else data["tensor"]["values"]
    else:
        predictions = answer["outputs"][0]["data"]
    if not isinstance(predictions, list):
        raise TypeError(f"predictions are a {type(predictions).__name__}, not a list")
    return predictions


def rows_in(body: bytes | str, protocol: Protocol = "mlflow") -> int:
    """How many rows a request body carries (so how many predictions to expect)."""
    data = json.loads(body)
    if protocol == "seldon":
        return len(data["data"]["ndarray"])
    if protocol == "v2":
        return int(data["inputs"][0]["shape"][0])
    if "dataframe_split" in data:
        return len(data["dataframe_split"]["data"])
    for key in ("dataframe_records", "instances", "inputs"):
        if key in data:
            return len(data[key])
    raise ValueError(f"not a scoring-protocol body: keys {sorted(data)}")


def answer_problem(response: httpx.Response, rows: int, protocol: Protocol = "mlflow") -> str:
    """'' for an answer with one prediction per row sent, else what was wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    try:
        predictions = read_predictions(response.json(), protocol)
    except (ValueError, KeyError, TypeError, IndexError):
        return "200 without predictions"
    return "" if len(predictions) == rows else f"200 with {len(predictions)} predictions"


def post(
    url: str,
    body: bytes | str,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    client: httpx.Client | None = None,
) -> httpx.Response:
    """POST a JSON body; once more on a new connection if the first one was reset."""
    sent = {**JSON, **(headers or {})}
    for attempt in (1, 2):
        try:
            if client is not None:
                return client.post(url, content=body, headers=sent, timeout=timeout)
            return httpx.post(url, content=body, headers=sent, timeout=timeout)
        except RETRIED:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def predict(
    url: str, data: pd.DataFrame, protocol: Protocol = "mlflow", timeout: float = 30.0
) -> list[Any]:
    """Score `data` at `url` in `protocol`: one prediction per row, or an HTTP error."""
    response = post(url, request_body(data, protocol), timeout=timeout)
    response.raise_for_status()
    return read_predictions(response.json(), protocol)
