"""Imports point down: flows never import deployments/, blocks/ imports neither (checked in a
fresh interpreter, so nothing another test imported hides a violation)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CHECK = """
import sys
import blocks, blocks.lookup
assert not [m for m in list(sys.modules) if m.split('.')[0] in ('flows', 'deployments')], 'blocks'
import flows.continuous_deployment, flows.inference, flows.drift, flows.training
bad = sorted(m for m in list(sys.modules) if m.split('.')[0] == 'deployments')
assert not bad, f'flows imported {bad}'
"""


def test_flows_and_blocks_do_not_import_upwards() -> None:
    env = {**os.environ, "CTCD_WARM_START": "0"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
