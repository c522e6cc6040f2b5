"""The Prefect UI of the server ctcd starts by itself (`ctcd/local_api.py`), in a real browser
(Debian's chromium through selenium, tests/browser.py): the "View at" link a plain Python run
prints opens a page that shows that run, and the UI talks to ITS OWN API, not to another Prefect
server that runs at the same time on the port Prefect's settings name (a user's own server,
`PREFECT_SERVER_API_PORT`, 4200 by default). Real processes throughout: `prefect server start`
twice, MLflow on SQLite, chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser import body_text, browser, open_page, requested_urls, wait_for, wait_text
from tests.processes import loopback_port, start_logged, stop_group, wait_healthy

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with browser(tmp_path_factory.mktemp("browser")) as chromium:
        yield chromium


def _clean_env(tmp: Path) -> dict[str, str]:
    """A user's shell: none of the suite's Prefect, MLflow or ctcd settings."""
    ours = ("PREFECT_", "MLFLOW_", "CTCD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=f"{VENV_BIN}:{env['PATH']}")
    return env


class OtherServer:
    """Another Prefect server, as a user starts theirs (`prefect server start`, no --port: the
    port comes from PREFECT_SERVER_API_PORT). `ready()` waits for it and adds a flow run of its
    own; it starts meanwhile."""

    def __init__(self, tmp: Path) -> None:
        self.port = loopback_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {**_clean_env(tmp), "PREFECT_HOME": str(tmp / "other-prefect")}
        env["PREFECT_SERVER_API_PORT"] = str(self.port)
        self.log = tmp / "other-server.log"
        cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
        self.proc = start_logged(cmd, self.log, env=env, cwd=tmp)

    def ready(self) -> None:
        wait_healthy(self.proc, f"{self.api}/health", self.log, 180)
        flow = httpx.post(f"{self.api}/flows/", json={"name": "other-servers-flow"}, timeout=10)
        run = {"name": "other-servers-run", "flow_id": flow.json()["id"]}
        httpx.post(f"{self.api}/flow_runs/", json=run, timeout=10).raise_for_status()


@pytest.fixture
def other_server(tmp_path: Path) -> Iterator[OtherServer]:
    other = OtherServer(tmp_path)
    try:
        yield other
    finally:
        stop_group(other.proc)


@pytest.fixture
def user_env(tmp_path: Path, other_server: OtherServer) -> Iterator[dict[str, str]]:
    """The shell of a user whose Prefect settings name the other server's port as the
    server port (as the default 4200 does when their own server runs there)."""
    env = _clean_env(tmp_path)
    env.update(
        CTCD_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_API_PORT=str(other_server.port),
    )
    yield env
    stop = "from ctcd import local_api\ns = local_api.recorded()\nif s: local_api.stop(s)\n"
    subprocess.run([sys.executable, "-c", stop], cwd=ROOT, env=env, timeout=120, check=False)


def _api_calls(driver: object) -> set[str]:
    """The servers (scheme://host:port) the page called the API on."""
    return {url.split("/api/")[0] for url in requested_urls(driver) if "/api/" in url}


def test_the_run_link_opens_the_run_on_ctcds_own_server(
    driver, user_env, other_server, small_csv, tmp_path
) -> None:
    script = (
        "from flows.training import training_pipeline\n"
        f"training_pipeline(data_path={small_csv!r}, model_type='linear')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=user_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    link = next(word for word in output.split() if "/runs/flow-run/" in word)
    ui = link.split("/runs/")[0]
    assert ui != f"http://127.0.0.1:{other_server.port}"
    other_server.ready()
    run = httpx.get(f"{ui}/api/flow_runs/{link.rsplit('/', 1)[-1]}", timeout=10).json()

    # The link opens the run: its name, its flow and its tasks, read from ctcd's server.
    open_page(driver, link)
    wait_text(driver, run["name"])
    wait_text(driver, "training-pipeline")
    wait_text(driver, "register_model")
    assert _api_calls(driver) == {ui}

    # The UI's root opens the V1 UI, as the run links do (its block Edit form keeps nested
    # blocks: blocks/ui.py); its runs list and V2's show this server's runs, not the other's.
    open_page(driver, f"{ui}/")
    wait_text(driver, "Switch to V2 UI")
    for page in (f"{ui}/runs", f"{ui}/v2/runs"):
        open_page(driver, page)
        wait_text(driver, run["name"])
        assert "other-servers-run" not in body_text(driver)
        wait_for(driver, lambda d: _api_calls(d) == {ui}, f"only {ui}'s API called")
