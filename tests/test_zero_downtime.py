"""Swapping model versions under load, on real gunicorn servers: no request may fail
after the one retry a keep-alive HTTP client makes on a reset connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks import MLflowModelDeployer
from blocks import local_process as lp
from ctcd.exceptions import ModelLoadError
from ctcd.serving.loadgen import Load


def _example(record) -> bytes:
    folder = Path(record.runtime_dir, "models", record.model_version)
    return (folder / "serving_input_example.json").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_redeploys_under_load_fail_no_request(versions, ctcd_home, workers):
    deployer = MLflowModelDeployer(workers=workers)
    record = deployer.deploy_model(versions["good"])
    pids_before = {p.pid for p in lp.workers(record)}
    with Load(record.prediction_url, _example(record), clients=4) as load:
        for label in ("better", "good", "better"):
            updated = deployer.deploy_model(versions[label])
            assert lp.served_version(updated) == versions[label].model_version
            assert {p.pid for p in lp.workers(updated)}.isdisjoint(pids_before)
            pids_before = {p.pid for p in lp.workers(updated)}
    stats = load.stats
    assert stats.requests > 100, "the load generator barely ran"
    assert stats.failed == 0, (stats.errors, stats.resets)
    assert len(lp.workers(updated)) == workers and updated.pid == record.pid


def test_broken_version_under_load_fails_no_request(versions, ctcd_home):
    deployer = MLflowModelDeployer(workers=2)
    record = deployer.deploy_model(versions["good"])
    with (
        Load(record.prediction_url, _example(record), clients=2) as load,
        pytest.raises(ModelLoadError),
    ):
        deployer.deploy_model(versions["broken"])
    assert load.stats.failed == 0 and load.stats.requests > 20
    assert lp.served_version(record) == versions["good"].model_version
    assert len(lp.workers(record)) == 2
