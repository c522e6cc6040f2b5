"""Every ctcd block created AND edited through the Prefect UI's form in a real browser (Debian's
chromium, tests/browser.py; the V1 UI the run links open, and the V2 UI the UI's root opens for
the blocks with optional nested blocks), against a real `prefect server start` with the block
types registered as `make deploy` registers them; then loaded with `Block.load` and used in a
flow run: Vault secrets read from a real OpenBao, MLflow runs logged to SQLite, Kubernetes Secret
manifests built from keys resolved through Vault. Before ctcd listed `null` first for optional
nested blocks, the V1 form saved `{}` for them and the block failed to load (issue 20)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from prefect import flow
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr
from selenium.webdriver.common.by import By

from blocks import (
    KServeModelDeployer,
    MLflowModelDeployer,
    MLflowTracking,
    ObjectStoreCredentials,
    SeldonModelDeployer,
    VaultCredentials,
    VaultSecret,
)
from blocks.lookup import load_deployer
from blocks.tracking import use_tracking
from tests.browser import body_text, browser, open_page, wait_for
from tests.prefect_forms import NONE, BlockForm
from tests.processes import loopback_port, start_logged, stop_group, wait_healthy
from tests.test_vault import ROOT_TOKEN, _start_bao

pytestmark = pytest.mark.server

BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = "AKIAFORMS0000000", "forms-Secret-Key-0000"


def _digest(value: SecretStr | str) -> str:
    """Compare secrets by digest: no value leaves the flow run."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return hashlib.sha256(raw.encode()).hexdigest()


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server with its UI, and ctcd's block types registered as `make deploy`
    does (`prefect block register -m blocks`)."""
    home = tmp_path_factory.mktemp("prefect-ui")
    port = loopback_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_UI_API_URL=f"{url}/api")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_logged(cmd, home / "server.log", env=env)
    try:
        wait_healthy(proc, f"{url}/api/health", home / "server.log", 180)
        register = [str(BIN / "prefect"), "block", "register", "-m", "blocks"]
        env["PREFECT_API_URL"] = f"{url}/api"
        subprocess.run(register, env=env, check=True, capture_output=True, timeout=120)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with browser(tmp_path_factory.mktemp("browser")) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """OpenBao with the object store's keys at secret/ctcd/store."""
    proc, address = _start_bao(tmp_path_factory.mktemp("bao"))
    try:
        client = hvac.Client(url=address, token=ROOT_TOKEN)
        keys = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}
        client.secrets.kv.v2.create_or_update_secret("ctcd/store", keys)
        yield address
    finally:
        stop_group(proc, 10)


@pytest.fixture
def api(ui: str) -> Iterator[str]:
    """Block.load, saves and flow runs go to the UI's server (not the session's harness).
    Prefect's events and log workers are per process and keep the API URL they started with:
    drain them while this server still runs, so later tests' events reach the harness (left
    running, they send every later event to this server after it stops, and the session hangs
    at exit draining them)."""
    with temporary_settings(updates={PREFECT_API_URL: f"{ui}/api"}):
        try:
            yield ui
        finally:
            for worker in (EventsWorker, APILogWorker):
                worker.drain_all(timeout=30, at_exit=False)


def in_a_flow(check: Callable[[], Any]) -> Any:
    """Run `check` as a flow run, as ctcd's flows load blocks."""
    return flow(name="use-blocks-saved-in-the-ui")(check)()


def reopened_and_saved(
    form: BlockForm, block_id: str, use: Callable[[], Any], reopens_on: tuple[str, str]
) -> Any:
    """Open the block's Edit form, save it unchanged, and `use` the block in a flow run. The V2
    UI of Prefect 3.9.1 saves a nested block as a copy whose secrets are Prefect's mask (the
    reference is lost; no schema avoids it): ctcd refuses such a block, saying so.
    `reopens_on`: a nested field and the tab the form must show for it."""
    form.edit(block_id)
    field, tab = reopens_on
    assert form.tabs(field)[tab], form.tabs(field)
    form.save()
    if form.version == "v1":
        return in_a_flow(use)
    with pytest.raises(Exception) as refused:
        in_a_flow(use)
    said = f"{refused.value} {refused.value.__cause__}"
    assert "Prefect's mask" in said and "V1 UI" in said, said
    return None


def _name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def _vault(bao: str) -> str:
    name = _name("vault")
    VaultCredentials(address=bao, token=SecretStr(ROOT_TOKEN)).save(name)
    return name


def test_vault_credentials(driver, api, bao) -> None:
    form, name = BlockForm(driver, api, "v1"), _name("vault")
    form.create("vault-credentials", name)
    form.text("Address", bao)
    form.secret("Token", ROOT_TOKEN)
    block_id = form.save()

    def read() -> str:
        return _digest(VaultCredentials.load(name).read_secret("ctcd/store", "access_key_id"))

    assert in_a_flow(read) == _digest(ACCESS_KEY)
    form.edit(block_id)
    form.type("Timeout", "5")
    form.save()
    assert in_a_flow(read) == _digest(ACCESS_KEY)
    assert VaultCredentials.load(name).timeout == 5


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mlflow_tracking(driver, api, bao, version, tmp_path) -> None:
    form, name, vault = BlockForm(driver, api, version), _name("tracking"), _vault(bao)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    form.create("mlflow-tracking", name)
    assert form.tabs("Vault")[NONE[version]]  # a new form starts with no Vault
    form.text("Tracking Uri", uri)
    block_id = form.save()

    def log_a_run() -> tuple[str, bool]:
        import mlflow

        with use_tracking(name) as tracking:
            assert tracking is not None
            mlflow.set_experiment(tracking.experiment_name or "forms")
            with mlflow.start_run() as run:
                mlflow.log_metric("rmse", 1.0)
            return run.info.experiment_id, tracking.vault is not None

    assert in_a_flow(log_a_run)[1] is False
    # Edit: an experiment, and the Vault that resolves VaultSecret references.
    form.edit(block_id)
    assert form.tabs("Vault")[NONE[version]]  # reopened on "no Vault", as saved
    form.text("Experiment Name", "from-the-ui")
    form.block("Vault", "VaultCredentials", vault)
    form.save()
    assert in_a_flow(log_a_run)[1] is True
    assert MLflowTracking.load(name).vault.read_secret("ctcd/store", "secret_access_key")
    # Reopened (on the chosen Vault) and saved unchanged: the same Vault, still working.
    if reopened_and_saved(form, block_id, log_a_run, ("Vault", "VaultCredentials")):
        vault = MLflowTracking.load(name).vault
        assert vault.read_secret("ctcd/store", "secret_access_key")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_object_store_credentials(driver, api, bao, version) -> None:
    form, name, vault = BlockForm(driver, api, version), _name("store"), _vault(bao)
    form.create("object-store-credentials", name)
    form.secret("Access Key Id", "plain-access-key")
    form.secret("Secret Access Key", "plain-secret-key")
    block_id = form.save()

    def keys() -> tuple[str, str]:
        resolved = ObjectStoreCredentials.load(name).resolve()
        return _digest(resolved.access_key_id), _digest(resolved.secret_access_key)

    assert in_a_flow(keys) == (_digest("plain-access-key"), _digest("plain-secret-key"))
    # Edit: both keys become references to Vault, read with the Vault block chosen here.
    form.edit(block_id)
    form.vault_secret("Access Key Id", "ctcd/store", "access_key_id")
    form.vault_secret("Secret Access Key", "ctcd/store", "secret_access_key")
    form.block("Vault", "VaultCredentials", vault)
    form.save()
    assert in_a_flow(keys) == (_digest(ACCESS_KEY), _digest(SECRET_KEY))
    if version == "v1":
        assert reopened_and_saved(form, block_id, keys, ("Vault", "VaultCredentials")) == (
            _digest(ACCESS_KEY), _digest(SECRET_KEY)
        )  # fmt: skip
    else:
        reopened_and_saved(form, block_id, keys, ("Vault", "VaultCredentials"))


# The cluster deployers: block type slug, class, and how each puts the bucket's secret key in the
# Secret it sends (Seldon: an rclone config; KServe: the AWS names its credential builder reads).
CLUSTER_DEPLOYERS = {
    "seldon-model-deployer": (
        SeldonModelDeployer,
        lambda store, ns: store.kubernetes_secret("ctcd-model-store", ns)["stringData"][
            "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY"
        ],
    ),
    "kserve-model-deployer": (
        KServeModelDeployer,
        lambda store, ns: store.kserve_secret("ctcd-kserve-s3", ns)["stringData"][
            "AWS_SECRET_ACCESS_KEY"
        ],
    ),
}


@pytest.mark.parametrize("slug", list(CLUSTER_DEPLOYERS))
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cluster_model_deployer(driver, api, bao, version, slug) -> None:
    kind, secret_key = CLUSTER_DEPLOYERS[slug]
    form, name = BlockForm(driver, api, version), _name(slug.split("-")[0])
    store = _name("store")
    ObjectStoreCredentials(
        access_key_id=VaultSecret(path="ctcd/store", key="access_key_id"),
        secret_access_key=VaultSecret(path="ctcd/store", key="secret_access_key"),
        vault=VaultCredentials.load(_vault(bao)),
    ).save(store)
    form.create(slug, name)
    assert form.tabs("Cluster Config")[NONE[version]]
    assert form.tabs("Object Store")[NONE[version]]
    form.text("Base Url", "http://models.example.internal")
    form.text("Namespace", "models")
    block_id = form.save()

    def secret_keys() -> tuple[bool, str | None]:
        deployer = load_deployer(f"{slug}/{name}")
        assert isinstance(deployer, kind)
        assert deployer.namespace == "models"
        if deployer.object_store is None:
            return deployer.cluster_config is None, None
        return deployer.cluster_config is None, _digest(
            secret_key(deployer.object_store, deployer.namespace)
        )

    assert in_a_flow(secret_keys) == (True, None)
    form.edit(block_id)
    form.block("Object Store", "ObjectStoreCredentials", store)
    form.save()
    assert in_a_flow(secret_keys) == (True, _digest(SECRET_KEY))
    reopens = ("Object Store", "ObjectStoreCredentials")
    saved = reopened_and_saved(form, block_id, secret_keys, reopens)
    assert saved == ((True, _digest(SECRET_KEY)) if version == "v1" else None)


def test_mlflow_model_deployer(driver, api, tmp_path) -> None:
    form, name = BlockForm(driver, api, "v1"), _name("local")
    form.create("mlflow-model-deployer", name)
    form.text("Root Dir", str(tmp_path / "servers"))
    block_id = form.save()

    def servers() -> tuple[int, list[Any]]:
        deployer = load_deployer(name)
        assert isinstance(deployer, MLflowModelDeployer)
        return deployer.workers, deployer.find_model_server()

    assert in_a_flow(servers) == (1, [])
    form.edit(block_id)
    form.type("Workers", "2")
    form.save()
    assert in_a_flow(servers) == (2, [])
    assert (tmp_path / "servers").is_dir()


LOGOS = {
    "MLflow Model Deployer": "process.png",
    "MLflow Tracking": "webhook.png",
    "Object Store Credentials": "aws.png",
    "KServe Model Deployer": "kubernetes.png",
    "Seldon Model Deployer": "kubernetes.png",
    "Vault Credentials": "secret.png",
}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_catalog_offers_ctcds_blocks_with_logos_and_not_the_abstract_deployer(
    driver, api, version
) -> None:
    open_page(driver, f"{api}{'/v2' if version == 'v2' else ''}/blocks/catalog")
    for name, logo in LOGOS.items():
        card = f"//h4[normalize-space(.)='{name}']/ancestor::*[.//img][1]//img"
        image = wait_for(
            driver, lambda d, card=card: d.find_element(By.XPATH, card), f"{name}'s card"
        )
        assert image.get_attribute("src").endswith(f"/assets/block-logos/{logo}"), name
    assert "BaseModelDeployer" not in body_text(driver)  # no card, so no Create button for it
