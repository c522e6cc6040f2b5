"""The MLflowTracking block against a real authenticated MLflow server (`mlflow server
--app-name basic-auth`, SQLite back end, proxied artifacts) whose password lives only in a real
OpenBao: the flows and the CLI run end to end through it; a wrong password, an unreachable
server or Vault fail before any work; and a planted password is found nowhere the run wrote."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import pandas as pd
import psutil
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

from blocks import MLflowModelDeployer, MLflowTracking, VaultCredentials, VaultSecret
from ctcd.cli import app
from ctcd.exceptions import TrackingError, VaultError
from flows.continuous_deployment import continuous_deployment_pipeline
from flows.data import feature_frame
from flows.drift import drift_monitor
from flows.training import training_pipeline
from tests.processes import loopback_port, start_logged, stop_group, wait_healthy
from tests.test_vault import ROOT_TOKEN, _start_bao

pytestmark = pytest.mark.server

ADMIN_PASSWORD = "admin-Pa55word-for-tests"
USER = "ctcd"
PASSWORD = f"canary-{uuid.uuid4().hex}"  # planted: must be found nowhere the run wrote
STALE_PASSWORD = "stale-Pa55word-v1"
SECRET_PATH = "ctcd/mlflow-remote"


def _start_mlflow(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = loopback_port()
    uri = f"http://127.0.0.1:{port}"
    (tmp / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--app-name=basic-auth",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{tmp / 'mlflow.db'}",
        f"--artifacts-destination={tmp / 'artifacts'}",
    ]
    proc = start_logged(cmd, tmp / "server.log", env=env, cwd=tmp)
    wait_healthy(proc, f"{uri}/health", tmp / "server.log", 120)
    return proc, uri


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Iterator[dict[str, str]]:
    """An authenticated MLflow server with user `ctcd`, whose password (version 2; version 1
    is a stale one) only OpenBao holds, readable by an AppRole with a one-path policy."""
    tmp = tmp_path_factory.mktemp("remote")
    bao, address = _start_bao(tmp)
    mlflow_server, uri = None, ""
    try:
        mlflow_server, uri = _start_mlflow(tmp)
        created = httpx.post(
            f"{uri}/api/2.0/mlflow/users/create",
            json={"username": USER, "password": PASSWORD},
            auth=("admin", ADMIN_PASSWORD),
            timeout=60,  # the first request pays the auth app's set-up (seconds when loaded)
        )
        created.raise_for_status()
        root = hvac.Client(url=address, token=ROOT_TOKEN)
        for value in (STALE_PASSWORD, PASSWORD):
            root.secrets.kv.v2.create_or_update_secret(SECRET_PATH, {"password": value})
        root.sys.create_or_update_policy(
            "mlflow-read", f'path "secret/data/{SECRET_PATH}" {{ capabilities = ["read"] }}'
        )
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        root.secrets.kv.v1.create_or_update_secret(
            SECRET_PATH, {"password": PASSWORD}, mount_point="kv1"
        )
        root.sys.enable_auth_method("approle")
        root.auth.approle.create_or_update_approle("flows", token_policies=["mlflow-read"])
        VaultCredentials(
            address=address,
            auth_method="approle",
            role_id=root.auth.approle.read_role_id("flows")["data"]["role_id"],
            secret_id=SecretStr(root.auth.approle.generate_secret_id("flows")["data"]["secret_id"]),
        ).save("vault-approle", overwrite=True)
        for name, version in (("remote", None), ("remote-stale", 1)):
            MLflowTracking(
                tracking_uri=uri,
                experiment_name="ctcd-remote",
                username=USER,
                password=VaultSecret(path=SECRET_PATH, key="password", version=version),
                vault=VaultCredentials.load("vault-approle"),
            ).save(name, overwrite=True)
        yield {"uri": uri, "vault": address, "dir": str(tmp)}
    finally:
        if mlflow_server is not None:
            stop_group(mlflow_server, 10)
        stop_group(bao, 10)


def _admin(remote: dict[str, str], path: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{remote['uri']}/api/2.0/mlflow/{path}",
        params=params,
        auth=("admin", ADMIN_PASSWORD),
        timeout=60,
    )


def _hits(roots: list[Path], needle: bytes) -> list[str]:
    """Files under `roots` whose bytes contain `needle` (SQLite WAL files included)."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and needle in path.read_bytes():
                found.append(str(path))
    return found


def _environ_hits(pid: int, needle: bytes) -> list[int]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [p.pid for p in procs if needle in Path(f"/proc/{p.pid}/environ").read_bytes()]


def test_flows_and_cli_run_through_an_authenticated_server_and_leak_nothing(
    remote, small_csv, ctcd_home, model_name, capfd, caplog
) -> None:
    first = continuous_deployment_pipeline(
        data_path=small_csv, model_type="linear", model_name=model_name, tracking="remote"
    )
    second = continuous_deployment_pipeline(
        data_path=small_csv, model_type="linear", model_name=model_name, tracking="remote"
    )
    assert (first.deployed, second.deployed) == (True, True), second.reason
    assert second.service.uuid == first.service.uuid
    rows = feature_frame(pd.read_csv(small_csv).head(3), "review_score")
    assert len(second.service.predict(rows)) == 3
    # What MLflow recorded, asked as the admin: the server holds the versions and the run.
    versions = _admin(remote, "registered-models/get", name=model_name).json()
    assert versions["registered_model"]["latest_versions"][0]["version"] == "2"
    experiment = _admin(remote, "experiments/get-by-name", experiment_name="ctcd-remote")
    assert experiment.status_code == 200
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # restored after the flow

    drift = drift_monitor(data_path=small_csv, model_name=model_name, tracking="remote")
    assert drift.model_version == "2" and not drift.drifted

    cli, short = CliRunner(), first.service.uuid[:8]
    outputs = [
        cli.invoke(app, ["models", "list", "--json"]),
        cli.invoke(app, ["models", "describe", first.service.uuid[:8]]),
        cli.invoke(app, ["models", "logs", first.service.uuid[:8]]),
        cli.invoke(app, ["models", "rollback", short, "--to-version", "1", "--tracking", "remote"]),
    ]
    assert [o.exit_code for o in outputs] == [0, 0, 0, 0], outputs[-1].output
    alias = _admin(remote, "registered-models/alias", name=model_name, alias="champion")
    assert alias.json()["model_version"]["version"] == "1"

    # The leak scan: everything the run wrote or printed, and the model server's environment.
    server_pid = MLflowModelDeployer().get_model_server(first.service.uuid).local.pid
    APILogHandler().flush()
    prefect_db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///")[1]).parent
    roots = [prefect_db, Path(os.environ["PREFECT_HOME"]), Path(remote["dir"]), ctcd_home]
    captured = capfd.readouterr()
    text = "".join([captured.out, captured.err, caplog.text, *(o.output for o in outputs)])
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    for needle in (PASSWORD.encode(), basic):
        assert _hits(roots, needle) == []
        assert needle.decode() not in text
        assert _environ_hits(server_pid, needle) == []
    # The scan reads what it claims to: the run's own words are in each place.
    gate_line = f"Gate for {model_name} v2".encode()
    assert _hits([prefect_db], gate_line), "flow-run logs not in the scanned Prefect database"
    assert _hits([Path(remote["dir"]) / "mlflow.db"], model_name.encode())
    assert _hits([ctcd_home], model_name.encode())
    assert model_name in text


def test_a_stale_password_fails_before_any_work(remote, small_csv, model_name) -> None:
    state = training_pipeline(
        data_path=small_csv, model_name=model_name, tracking="remote-stale", return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TrackingError)
    message = str(error)
    for words in (
        remote["uri"],
        f"refused user '{USER}' (401)",
        f"Vault at {remote['vault']}",
        f"secret 'secret/{SECRET_PATH}' key 'password'",
    ):
        assert words in message
    assert STALE_PASSWORD not in message and PASSWORD not in message
    assert _task_runs(state) == []  # not even the data was read
    assert _admin(remote, "registered-models/get", name=model_name).status_code == 404


def _read_task_runs(state: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )


@task
def _control_task() -> int:
    return 1


@flow
def _control_flow() -> None:
    _control_task()


def _task_runs(state: Any) -> list[Any]:
    """The task runs of `state`'s flow run, read once the server has recorded what came
    before: Prefect 3 writes task runs later, from events, so an empty answer right after a
    flow proves nothing. A control flow that runs one task goes first; its task run must show
    up through the same query before `state`'s are read."""
    control = _control_flow(return_state=True)
    deadline = time.monotonic() + 30
    while not _read_task_runs(control) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_read_task_runs(control)) == 1, "the control flow's task run was never recorded"
    return _read_task_runs(state)


@pytest.mark.parametrize(
    ("path", "key", "mount", "token", "problem"),
    [
        ("ctcd/nothing-here", "password", "secret", ROOT_TOKEN, "no such secret"),
        (SECRET_PATH, "passwd", "secret", ROOT_TOKEN, "no such key (its keys: password)"),
        (SECRET_PATH, "password", "kv1", ROOT_TOKEN, "KV v2 mount"),
        (SECRET_PATH, "password", "secret", "not-a-token", "token is invalid"),
    ],
    ids=["missing-path", "missing-key", "kv1-mount", "wrong-vault-token"],
)
def test_vault_problems_fail_the_flow_before_any_work(
    remote, small_csv, model_name, path, key, mount, token, problem
) -> None:
    MLflowTracking(
        tracking_uri=remote["uri"],
        username=USER,
        password=VaultSecret(path=path, key=key, mount_point=mount),
        vault=VaultCredentials(address=remote["vault"], token=SecretStr(token)),
    ).save("remote-bad-vault", overwrite=True)
    state = training_pipeline(
        data_path=small_csv, model_name=model_name, tracking="remote-bad-vault", return_state=True
    )
    error = state.result(raise_on_failure=False)
    assert isinstance(error, VaultError)
    message = str(error)
    assert f"Vault at {remote['vault']}, secret '{mount}/{path}' key '{key}'" in message
    assert problem in message and PASSWORD not in message and token not in message
    assert _task_runs(state) == []


def test_unreachable_vault_or_server_fail_before_any_work(remote, small_csv, model_name) -> None:
    dead = f"http://127.0.0.1:{loopback_port()}"
    MLflowTracking(
        tracking_uri=remote["uri"],
        username=USER,
        password=VaultSecret(path=SECRET_PATH, key="password"),
        vault=VaultCredentials(address=dead, token=SecretStr("t")),
    ).save("remote-no-vault", overwrite=True)
    with pytest.raises(VaultError, match=f"Vault at {dead}, secret 'secret/{SECRET_PATH}'"):
        training_pipeline(data_path=small_csv, model_name=model_name, tracking="remote-no-vault")

    MLflowTracking(tracking_uri=dead, username=USER, password=SecretStr(PASSWORD)).save(
        "remote-dead", overwrite=True
    )
    with pytest.raises(TrackingError, match=f"at {dead}: unreachable"):
        training_pipeline(data_path=small_csv, model_name=model_name, tracking="remote-dead")

    with pytest.raises(Exception, match="No MLflow tracking block named 'nope'"):
        training_pipeline(data_path=small_csv, model_name=model_name, tracking="nope")


def test_block_refuses_inconsistent_credentials_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as err:
        MLflowTracking(tracking_uri=f"https://ctcd:{PASSWORD}@mlflow.example")
    assert "holds a password" in str(err.value) and PASSWORD not in str(err.value)
    with pytest.raises(ValidationError, match="needs the `vault` field"):
        MLflowTracking(username="u", password=VaultSecret(path="p", key="k"))
    with pytest.raises(ValidationError, match="username and password go together"):
        MLflowTracking(password=SecretStr(PASSWORD))
    block = MLflowTracking(username="u", password=SecretStr(PASSWORD))
    assert PASSWORD not in repr(block) and PASSWORD not in str(block.model_dump())


def test_request_retries_bound_how_long_mlflow_tries_an_unreachable_server(monkeypatch) -> None:
    """The suite sets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 for speed; here it is the block's
    `request_retries` that must stop MLflow's own client from retrying for ~4 minutes."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    dead = f"http://127.0.0.1:{loopback_port()}"
    block = MLflowTracking(tracking_uri=dead, request_retries=1, request_timeout=5)
    env = block.environment()
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    for name, value in env.items():  # what activate() sets, without its up-front check
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(MlflowException):
        mlflow.MlflowClient(dead).search_experiments()
    # MLflow's default (7 retries, backoff factor 2) keeps at it for minutes.
    assert time.monotonic() - started < 60
