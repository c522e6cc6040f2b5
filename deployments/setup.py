"""`make deploy`: register ctcd's block types, create the work pools `prefect.yaml` names,
and create every deployment with `prefect deploy --all --no-prompt`, against the Prefect
server in `PREFECT_API_URL`.

    PREFECT_API_URL=http://127.0.0.1:4200/api make deploy
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ctcd.exceptions import DeployError

ROOT = Path(__file__).resolve().parent.parent
POOL_TYPES = {"ctcd-process": "process", "ctcd-kubernetes": "kubernetes"}
# Defaults of the Kubernetes pool's job variables (each can be overridden per deployment). The
# namespace and the flow runs' service account are those of deployments/kubernetes/.
KUBERNETES_DEFAULTS: dict[str, Any] = {
    "image": "ctcd:latest",
    "namespace": "ctcd",
    "service_account_name": "ctcd-flows",
    "image_pull_policy": "IfNotPresent",
    "cpu_request": "1",
    "cpu_limit": "2",
    "memory_request": "2Gi",
    "memory_limit": "4Gi",
    "env": {
        "CTCD_HOME": "/var/lib/ctcd",
        "CTCD_LOCAL_API": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    },
}


def _prefect(*args: str, env: dict[str, str]) -> None:
    """Run the prefect CLI of this environment; stop with its output on failure."""
    cli = Path(sys.executable).with_name("prefect")
    done = subprocess.run([str(cli), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise DeployError(f"`prefect {' '.join(args)}` failed:\n{output[-3000:]}")


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set. Start a server (`.venv/bin/prefect server start`) and "
            "run `PREFECT_API_URL=http://127.0.0.1:4200/api make deploy`."
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if client.api_healthcheck() is not None:
            raise DeployError(f"The Prefect API at {url} is not reachable: is the server running?")
    return str(url)


def _pools(spec: dict[str, Any]) -> list[str]:
    names = {d.get("work_pool", {}).get("name") for d in spec.get("deployments", [])}
    unknown = sorted(n for n in names if n not in POOL_TYPES)
    if unknown:
        raise DeployError(
            f"prefect.yaml names work pool(s) {', '.join(unknown)} that make deploy does not "
            f"know how to create; use one of: {', '.join(POOL_TYPES)}."
        )
    return sorted(n for n in names if n)


def problems(spec: dict[str, Any]) -> list[str]:
    """Everything wrong with prefect.yaml's deployments that can be found before applying
    any of them: entrypoints, parameters (against each flow's own schema), schedules, and
    triggers (their shape, and the deployments they name)."""
    from jsonschema import Draft202012Validator
    from prefect.utilities.callables import parameter_schema

    found: list[str] = []
    names = {d.get("name") for d in spec.get("deployments", [])}
    for deployment in spec.get("deployments", []):
        where = f"deployment '{deployment.get('name')}'"
        try:
            flow = load_flow(deployment["entrypoint"])
        except Exception as err:
            found.append(f"{where}: entrypoint {deployment.get('entrypoint')!r}: {err}")
            continue
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        for error in Draft202012Validator(schema).iter_errors(deployment.get("parameters") or {}):
            # For `X | None` the useful error is the deepest one under the anyOf.
            leaf = max(error.context or [error], key=lambda e: len(e.absolute_path))
            field = leaf.json_path.removeprefix("$.") or "parameters"
            found.append(f"{where}: parameter {field}: {leaf.message}")
        found += _schedule_problems(where, deployment.get("schedules") or [])
        found += _trigger_problems(where, deployment.get("triggers") or [], names)
    return found


def _first_lines(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines()[:3])


def load_flow(entrypoint: str) -> Any:
    """The flow object an entrypoint (`flows/training.py:training_pipeline`) names."""
    import importlib

    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def schedule(spec: dict[str, Any]) -> Any:
    """A Prefect schedule from a prefect.yaml `schedules` entry."""
    from prefect.client.schemas.schedules import construct_schedule

    return construct_schedule(**{k: v for k, v in spec.items() if k != "active"})


def _schedule_problems(where: str, schedules: list[dict[str, Any]]) -> list[str]:
    found = []
    for i, entry in enumerate(schedules):
        try:
            schedule(entry)
        except Exception as err:
            found.append(f"{where}: schedules[{i}]: {_first_lines(err)}")
    return found


def _trigger_problems(where: str, triggers: list[dict[str, Any]], names: set[Any]) -> list[str]:
    from prefect.events import DeploymentEventTrigger

    found = []
    for i, trigger in enumerate(triggers):
        try:
            DeploymentEventTrigger(**trigger)
        except Exception as err:
            found.append(f"{where}: triggers[{i}]: {_first_lines(err)}")
        related = trigger.get("match_related") or {}
        named = related.get("prefect.resource.name")
        if related.get("prefect.resource.role") == "deployment" and named not in names:
            found.append(
                f"{where}: triggers[{i}].match_related names deployment '{named}', "
                "which prefect.yaml does not define"
            )
    return found


def _drop_abstract_block_type() -> None:
    """Earlier ctcd registered the abstract deployer base as a block type (a
    catalog card with a Create button that cannot work); remove it when no block uses it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug("ctcd-model-deployer")
        except ObjectNotFound:
            return
        if not client.read_block_documents_by_type("ctcd-model-deployer"):
            client.delete_block_type(block_type.id)


def _existing_pools() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {pool.name for pool in client.read_work_pools()}


def kubernetes_job_template() -> dict[str, Any]:
    """prefect-kubernetes' base job template with ctcd's defaults filled in."""
    from prefect_kubernetes.worker import KubernetesWorker

    template: dict[str, Any] = KubernetesWorker.get_default_base_job_template()
    for key, value in KUBERNETES_DEFAULTS.items():
        template["variables"]["properties"][key]["default"] = value
    return template


def _create_pool(name: str, env: dict[str, str]) -> None:
    kind = POOL_TYPES[name]
    if kind != "kubernetes":
        _prefect("work-pool", "create", name, "--type", kind, env=env)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(kubernetes_job_template(), handle)
    try:
        _prefect(
            "work-pool", "create", name, "--type", kind, "--base-job-template", handle.name, env=env
        )
    finally:
        os.unlink(handle.name)


def deploy(prefect_file: Path = ROOT / "prefect.yaml") -> None:
    url = _api_url()
    spec = yaml.safe_load(prefect_file.read_text())
    pools = _pools(spec)
    if found := problems(spec):
        lines = "\n".join(f"  - {p}" for p in found)
        raise DeployError(f"{prefect_file} has problems; nothing was applied:\n{lines}")
    env = {**os.environ, "PREFECT_API_URL": url, "CTCD_PROJECT_DIR": str(ROOT)}
    print(f"Prefect API: {url}")
    _prefect("block", "register", "-m", "blocks", env=env)
    _drop_abstract_block_type()
    existing = _existing_pools()
    for name in pools:
        if name not in existing:
            _create_pool(name, env)
            print(f"created work pool {name} ({POOL_TYPES[name]})")
    _prefect("deploy", "--all", "--no-prompt", "--prefect-file", str(prefect_file), env=env)
    print("deployments: " + ", ".join(d["name"] for d in spec["deployments"]))


if __name__ == "__main__":
    try:
        deploy(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "prefect.yaml")
    except DeployError as err:
        sys.exit(f"make deploy: {err}")
