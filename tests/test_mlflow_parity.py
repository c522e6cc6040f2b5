"""Requests on the edges of the scoring protocol, sent to ctcd's model server and to a real
`mlflow models serve` of the same registered version: both must answer alike (status and body).
Repeated Content-Type headers (MLflow's route reads the first, as starlette's `request.headers`
does) and an empty one (it has a Content-Type: MLflow names what it got)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from blocks import MLflowModelDeployer
from tests.processes import loopback_port, start_logged, stop_group, wait_healthy

pytestmark = pytest.mark.server

JSON, CSV = "application/json", "text/csv"


@pytest.fixture(scope="module")
def servers(versions, tmp_path_factory) -> Iterator[dict[str, str]]:
    """{"ctcd": URL, "mlflow": URL}: the session's linear model served by each."""
    config = versions["good"]
    tmp = tmp_path_factory.mktemp("parity")
    deployer = MLflowModelDeployer(root_dir=str(tmp / "servers"))
    port = loopback_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # it starts uvicorn by name
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", config.model_uri, "--host"]
    cmd += ["127.0.0.1", "--port", str(port), "--env-manager", "local", "--workers", "1"]
    mlflow_serve = start_logged(cmd, tmp / "mlflow-serve.log", env=env)
    try:
        record = deployer.deploy_model(config)
        wait_healthy(mlflow_serve, f"http://127.0.0.1:{port}/ping", tmp / "mlflow-serve.log", 180)
        example = Path(str(record.local.runtime_dir), "models", record.model_version)
        yield {
            "ctcd": str(record.prediction_url),
            "mlflow": f"http://127.0.0.1:{port}/invocations",
            "body": (example / "serving_input_example.json").read_text(),
        }
    finally:
        stop_group(mlflow_serve)
        for record in deployer.find_model_server():
            deployer.delete_model_server(record.uuid)


def _both(servers: dict[str, str], headers: list[tuple[str, str]]) -> dict[str, httpx.Response]:
    return {
        name: httpx.post(servers[name], content=servers["body"], headers=headers, timeout=30)
        for name in ("ctcd", "mlflow")
    }


@pytest.mark.parametrize(
    "content_types",
    [
        [CSV, JSON],  # MLflow parses the JSON body as CSV
        [f"{JSON}; charset=latin-1", JSON],  # MLflow refuses the charset
        [JSON, CSV],  # MLflow reads JSON: scored
        [JSON, JSON],
        [""],  # a Content-Type, empty: not "no Content-Type header"
        ["", JSON],
    ],
    ids=["csv-then-json", "latin1-then-json", "json-then-csv", "json-twice", "empty", "empty-1st"],
)
def test_content_type_headers_are_read_as_mlflow_reads_them(servers, content_types) -> None:
    answers = _both(servers, [("Content-Type", value) for value in content_types])
    ctcd, mlflow = answers["ctcd"], answers["mlflow"]
    assert ctcd.status_code == mlflow.status_code, (ctcd.text[:500], mlflow.text[:500])
    if mlflow.status_code == 200:
        assert ctcd.json() == mlflow.json()
    else:
        assert ctcd.text == mlflow.text
    if content_types[0] == "":
        assert "no Content-Type" not in ctcd.text and "Got ''" in ctcd.text
