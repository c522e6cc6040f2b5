"""Real components: Prefect's test harness (one per session), MLflow on SQLite in a temp
folder, real gunicorn model servers (each test's servers are deleted after it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import skops.io

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ctcd-tests-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["CTCD_LOCAL_API"] = "0"  # the harness provides the API; no ephemeral server
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["CTCD_HOME"] = str(_SESSION_DIR / "home")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

import mlflow  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks import DeploymentConfig  # noqa: E402
from ctcd.sample import generate  # noqa: E402
from ctcd.settings import configure_mlflow  # noqa: E402
from flows.data import Dataset, clean_data  # noqa: E402
from flows.evaluation import plot_evaluation  # noqa: E402
from flows.model import evaluate_model, register_model, train_model  # noqa: E402

SMALL_ROWS = 2_000
FAST_RF = {"n_estimators": 10, "max_depth": 6}


# What a test starts, by marker (pyproject.toml registers them). `make test-fast` runs `unit`.
KINDS = ("unit", "server", "kubernetes", "image")
# Whether the tests selected need Prefect's API (any that is not `unit`): set at collection.
_NEEDS_API: list[bool] = [True]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test says what it starts (a module's `pytestmark` or the test's own marker)."""
    unmarked = [i.nodeid for i in items if not any(i.get_closest_marker(k) for k in KINDS)]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a kind marker ({', '.join(KINDS)}): {', '.join(unmarked[:5])}. "
            "Add `pytestmark = pytest.mark.<kind>` to the module (see tests/conftest.py)."
        )
    _NEEDS_API[0] = any(item.get_closest_marker("unit") is None for item in items)


@pytest.fixture(scope="session", autouse=True)
def _session_cleanup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Afterwards, whatever happened: end any process the session left in its temp folders
    (e.g. a model server a timed-out test was still deploying) and remove the session folder."""
    from tests.processes import end_processes_under

    try:
        yield
    finally:
        for folder in (tmp_path_factory.getbasetemp(), _SESSION_DIR):
            if left := end_processes_under(folder):
                print(f"\nended processes the tests left in {folder}: {left}")
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness, one for the session (it takes ~8 s to start)."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session", autouse=True)
def _prefect_api(_session_cleanup: None, request: pytest.FixtureRequest) -> None:
    """A session with any test that is not `unit` runs with Prefect's harness, started before
    every other fixture (module fixtures that run flows included). Only the unit tests
    (`make test-fast`) run without one, so a `unit` test that needs Prefect's API fails there
    instead of hiding it."""
    if _NEEDS_API[0]:
        request.getfixturevalue("prefect_harness")


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real kube-apiserver + etcd from KUBEBUILDER_ASSETS for the session (tests/kube.py);
    each test module works in namespaces of its own. Skips, saying why, when that is unset
    (fails under CI=true)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        from tests.processes import missing

        missing(
            "KUBEBUILDER_ASSETS is unset: no kube-apiserver/etcd binaries to test against "
            "(.ci/run sets it from ../shared/k8s/assets.sh)"
        )
    from tests import kube

    api = kube.start(Path(assets), tmp_path_factory.mktemp("kube"))
    try:
        yield api
    finally:
        api.stop()


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
    from tests.processes import end_processes_under

    deployer = MLflowModelDeployer()
    for record in deployer.find_model_server():
        deployer.delete_model_server(record.uuid, timeout=5)
    end_processes_under(home)


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name of the test's own, so tests share one MLflow database."""
    return "m-" + request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]


SERVED_MODEL = "served-model"


@pytest.fixture(scope="session")
def versions(small_table) -> dict[str, DeploymentConfig]:
    """v1 linear, v2 random forest, v3 a random forest whose saved file is corrupt (fails to
    load), v4 a linear model that loads but fails to score any input (its coefficients were
    cut to 3 after training, as a bad export would)."""
    data = clean_data.fn(Dataset(frame=small_table, source="s.csv", sha256="00" * 32))
    experiment = configure_mlflow(SERVED_MODEL)
    configs = {}
    for label, kind, params in [
        ("good", "linear", None),
        ("better", "random_forest", {"n_estimators": 5}),
        ("broken", "random_forest", {"n_estimators": 5}),
        ("unscorable", "linear", None),
    ]:
        model = train_model.fn(data, kind, params)
        metrics = evaluate_model.fn(model, data)
        reg = register_model.fn(
            model,
            data,
            Dataset(frame=small_table, source="s.csv", sha256="00" * 32),
            metrics,
            SERVED_MODEL,
            kind,
            params,
            "review_score",
            experiment,
            plots=plot_evaluation.fn(model, data, "review_score"),
        )
        configs[label] = DeploymentConfig(
            model_name=SERVED_MODEL,
            model_version=reg.model_version,
            model_uri=reg.model_uri,
            pipeline_name="p",
            step_name="s",
            run_id=reg.run_id,
        )
    _model_file(configs["broken"]).write_bytes(b"not a model")
    unscorable = _model_file(configs["unscorable"])
    pipeline = skops.io.load(unscorable, trusted=skops.io.get_untrusted_types(file=unscorable))
    pipeline.steps[-1][1].coef_ = pipeline.steps[-1][1].coef_[:3]
    skops.io.dump(pipeline, unscorable)
    return configs


def _model_file(config: DeploymentConfig) -> Path:
    """The saved model file of a registered version, in MLflow's artifact store."""
    source = mlflow.MlflowClient().get_model_version(SERVED_MODEL, config.model_version).source
    location = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(location.removeprefix("file://")) / "model.skops"


# A value of `product_photos_qty` the `raising_version` never saw in training: it raises on
# every row that has it (and scores every other row).
RAISING_COLUMN = "product_photos_qty"
UNSEEN_VALUE = 99.0


@pytest.fixture(scope="session")
def raising_version(small_table, versions) -> DeploymentConfig:
    """A version of SERVED_MODEL that loads and scores its input example but raises on rows
    whose `RAISING_COLUMN` holds a value it did not see in training (`UNSEEN_VALUE`): a
    one-hot encoder that refuses unknown categories, then a linear regression. Registered
    after `versions`."""
    from importlib.metadata import version

    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    data = clean_data.fn(Dataset(frame=small_table, source="s.csv", sha256="00" * 32))
    train = data.x_train.dropna().astype("float64")
    encode = ColumnTransformer(
        [("photos", OneHotEncoder(handle_unknown="error"), [RAISING_COLUMN])],
        remainder="passthrough",
    )
    model = Pipeline([("encode", encode), ("model", LinearRegression())])
    model.fit(train, data.y_train.loc[train.index])
    assert UNSEEN_VALUE not in set(train[RAISING_COLUMN])
    example = train.head(5)
    with mlflow.start_run(experiment_id=configure_mlflow(SERVED_MODEL)) as run:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example)),
            input_example=example,
            pip_requirements=[f"{n}=={version(n)}" for n in ("mlflow", "scikit-learn", "skops")],
            serialization_format="skops",
            skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(model)),
            registered_model_name=SERVED_MODEL,
        )
    registered = str(info.registered_model_version)
    return DeploymentConfig(
        model_name=SERVED_MODEL,
        model_version=registered,
        model_uri=f"models:/{SERVED_MODEL}/{registered}",
        pipeline_name="p",
        step_name="s",
        run_id=run.info.run_id,
    )
