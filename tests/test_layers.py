"""Imports point down the layers: ground (`ctcd/`, but the CLI and the demo) <- `blocks/` <-
`flows/` <- `deployments/`; the CLI, the demo, the app and the benchmarks sit on top. Every
import statement of every module is read (those inside functions too), so a lazy import that
breaks a layer is caught as well as a top-level one. And importing ctcd's modules has no side
effect: no server starts."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
TOP = ("ctcd.cli", "ctcd.demo")  # the CLI and the demo: on top, though they live in ctcd/


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules(package: str) -> dict[str, set[str]]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): _imports(path)
        for path in (ROOT / package).rglob("*.py")
    }


def _breaks(modules: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in modules.items()
        for name in names
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    )


def test_ground_imports_nothing_above_it() -> None:
    ground = {m: i for m, i in _modules("ctcd").items() if not m.startswith(TOP)}
    assert _breaks(ground, ("blocks", "flows", "deployments", "app", "bench")) == []


def test_the_model_server_imports_no_block_and_no_prefect() -> None:
    assert _breaks(_modules("ctcd/serving"), ("blocks", "flows", "deployments", "prefect")) == []


def test_blocks_import_neither_flows_nor_deployments() -> None:
    assert _breaks(_modules("blocks"), ("flows", "deployments", "app", "ctcd.cli")) == []


def test_flows_never_import_deployments() -> None:
    assert _breaks(_modules("flows"), ("deployments", "app", "ctcd.cli", "ctcd.demo")) == []


def test_deployments_import_neither_the_app_nor_the_cli() -> None:
    assert _breaks(_modules("deployments"), ("app", "ctcd.cli", "ctcd.demo", "bench")) == []


CHECK = """
import sys
import ctcd.names, ctcd.files, ctcd.processes, ctcd.client, ctcd.reference
import blocks, blocks.lookup
import flows.data, flows.model, flows.gate
import flows.training, flows.continuous_deployment, flows.inference, flows.drift, flows.outcomes
import deployments.lookup
from ctcd import local_api
assert local_api._chosen is None, 'an import chose or started the local Prefect server'
"""


def test_importing_the_modules_starts_no_server(tmp_path: Path) -> None:
    """With ctcd's local Prefect server on (no API URL), importing every module, flows
    included, starts nothing: no server process, no record of one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"CTCD_LOCAL_API": "1", "CTCD_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "prefect-server" / "server.json").exists()
