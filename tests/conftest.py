"""Real components: Prefect's test harness (one per session), MLflow on SQLite in a temp
folder, real gunicorn model servers (each test's servers are deleted after it)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ctcd-tests-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["CTCD_WARM_START"] = "0"  # the harness provides the API; no ephemeral server
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["CTCD_HOME"] = str(_SESSION_DIR / "home")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from ctcd.sample import generate  # noqa: E402

SMALL_ROWS = 2_000
FAST_RF = {"n_estimators": 10, "max_depth": 6}


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def small_table() -> pd.DataFrame:
    return generate(n_rows=SMALL_ROWS, seed=3)


@pytest.fixture(scope="session")
def small_csv(small_table: pd.DataFrame, session_dir: Path) -> str:
    path = session_dir / "small.csv"
    small_table.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def ctcd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh CTCD_HOME (servers, sample data) per test; its servers are deleted after."""
    home = tmp_path / "home"
    monkeypatch.setenv("CTCD_HOME", str(home))
    yield home
    from blocks import MLflowModelDeployer

    deployer = MLflowModelDeployer()
    for record in deployer.find_model_server():
        deployer.delete_model_server(record.uuid, timeout=5)


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name of the test's own, so tests share one MLflow database."""
    return "m-" + request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]
