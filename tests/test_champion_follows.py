"""The alias follows what serves, and every version gets a decision, after a gating run's
process is SIGKILLed at a named step (`CTCD_TEST_PAUSE`) or two runs of one model overlap:
real flow processes, the suite's MLflow store, real model servers.

- Killed after its deploy returned, before the alias write: the next run moves `champion` to
  what serves before its gate compares (tagging why), and gives the killed run's version the
  decision `interrupted`; so does a run killed before its gate decided.
- Two runs at once, the second landing in the first's deploy -> alias window: they take turns,
  and afterwards `champion` names what serves. Runs that do not share a CTCD_HOME (so not its
  locks): the one overtaken writes no alias and says `deployed: False`.
- A deploy that fails after the gate passed: that failure is the version's decision.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import mlflow
import pytest

from blocks import MLflowModelDeployer
from ctcd.names import CHAMPION_REPAIR_TAG, GATE_TAG
from flows.continuous_deployment import continuous_deployment_pipeline
from tests.interrupt import champion, outcome, paused_at, resume, served, start_flow

pytestmark = pytest.mark.server


def _tags(model_name: str, version: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient().get_model_version(model_name, version).tags or {})


def _killed_at(params: dict, step: str, home: Path, log: Path) -> None:
    proc = start_flow(params, step, log)
    try:
        assert paused_at(proc, home, step, 300), log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (home / f"paused-{step}").unlink(missing_ok=True)


@pytest.mark.timeout(900)
def test_after_a_killed_run_the_champion_is_what_serves_and_every_version_has_a_decision(
    ctcd_home, small_csv, model_name, tmp_path
):
    params = {"data_path": small_csv, "model_name": model_name, "model_type": "linear"}
    first = continuous_deployment_pipeline(**params)
    v1 = first.model_version
    v2, v3, v4 = (str(int(v1) + n) for n in (1, 2, 3))

    _killed_at(params, "deployed", ctcd_home, tmp_path / "run2.log")  # v2 serves, alias v1
    assert served(model_name) == (v2, v2) and champion(model_name) == v1

    _killed_at(params, "champion-reading", ctcd_home, tmp_path / "run3.log")
    # The run gating v3 repaired the alias before it read the champion.
    assert champion(model_name) == v2
    assert f"served v{v2}" in _tags(model_name, v2)[CHAMPION_REPAIR_TAG]

    fourth = continuous_deployment_pipeline(**params)
    assert fourth.model_version == v4
    assert f"champion v{v2}" in fourth.reason  # compared with the model that served
    assert fourth.deployed and champion(model_name) == v4 == served(model_name)[1]
    decided_v2 = _tags(model_name, v2)[GATE_TAG]
    assert decided_v2.startswith("interrupted") and "after deploying it" in decided_v2
    decided_v3 = _tags(model_name, v3)[GATE_TAG]
    assert decided_v3.startswith("interrupted") and "it was not deployed" in decided_v3
    assert not list((ctcd_home / "gates" / model_name).iterdir())  # nothing left to decide


@pytest.mark.timeout(900)
def test_two_runs_at_once_leave_the_champion_naming_what_serves(
    ctcd_home, small_csv, model_name, tmp_path
):
    params = {"data_path": small_csv, "model_name": model_name, "model_type": "linear"}
    continuous_deployment_pipeline(**params)
    logs = tmp_path / "a.log", tmp_path / "b.log"
    a = start_flow(params, "deployed", logs[0])  # pauses between its deploy and its alias
    b = None
    try:
        assert paused_at(a, ctcd_home, "deployed", 300), logs[0].read_text()[-3000:]
        b = start_flow(params, "gate-locking", logs[1])
        if paused_at(b, ctcd_home, "gate-locking", 300):  # registered; about to take turns
            resume(ctcd_home, "gate-locking")
        resume(ctcd_home, "deployed")
        ended = [outcome(a, logs[0], 300), outcome(b, logs[1], 300)]
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert all(line.startswith("RESULT") for line in ended), ended
    recorded, answered = served(model_name)
    assert recorded == answered == champion(model_name), (recorded, answered, ended)


@pytest.mark.timeout(600)
def test_a_deploy_that_fails_after_the_gate_passed_is_the_versions_decision(
    ctcd_home, small_csv, model_name
):
    with socket.socket() as taken:  # the deployer's port is busy: its server cannot start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        MLflowModelDeployer(port=taken.getsockname()[1]).save("busy-port", overwrite=True)
        state = continuous_deployment_pipeline(
            data_path=small_csv,
            model_name=model_name,
            model_type="linear",
            deployer="busy-port",
            return_state=True,
        )
    assert state.is_failed()
    [version] = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}'")
    decision = _tags(model_name, str(version.version))[GATE_TAG]
    assert decision.startswith("passed, but its deploy failed"), decision


@pytest.mark.timeout(900)
def test_a_run_overtaken_by_another_machines_deploy_says_so(
    ctcd_home, small_csv, model_name, tmp_path
):
    """Two runs that share the servers (a deployer's `root_dir`) but not a CTCD_HOME, so not
    its locks, as runs on two machines deploying to one cluster would."""
    deployer = MLflowModelDeployer(root_dir=str(tmp_path / "servers"))
    deployer.save("shared-servers", overwrite=True)
    params = {
        "data_path": small_csv,
        "model_name": model_name,
        "model_type": "linear",
        "deployer": "shared-servers",
    }
    homes = tmp_path / "home-a", tmp_path / "home-b"
    logs = tmp_path / "a.log", tmp_path / "b.log"
    a = b = None
    try:
        v1 = continuous_deployment_pipeline(**params).model_version
        a = start_flow(params, "deployed", logs[0], {"CTCD_HOME": str(homes[0])})
        assert paused_at(a, homes[0], "deployed", 300), logs[0].read_text()[-3000:]
        b = start_flow(params, "", logs[1], {"CTCD_HOME": str(homes[1])})
        ended_b = outcome(b, logs[1], 300)  # deploys after a's deploy, before a's alias
        resume(homes[0], "deployed")
        ended_a = outcome(a, logs[0], 300)
        [record] = deployer.find_model_server(model_name=model_name)
        serving = record.model_version
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for found in deployer.find_model_server():
            deployer.delete_model_server(found.uuid, timeout=5)
    assert ended_b.startswith("RESULT") and '"deployed": true' in ended_b, ended_b
    assert serving == str(int(v1) + 2) == champion(model_name)  # b's version serves
    assert '"deployed": false' in ended_a and "replaced it" in ended_a, ended_a
    assert _tags(model_name, str(int(v1) + 1))[GATE_TAG].startswith("overtaken")
