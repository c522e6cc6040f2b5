"""The worker's part of a flow run, acting as ctcd-worker with its own token, through
prefect-kubernetes' own code (tests/test_rbac.py): the real `KubernetesWorker` builds the Job from
the pool's base job template (deployments/setup.py) and creates it; its observer (kopf, started by
the worker itself, limited to the namespace as README says) follows the Job's pod and moves the
flow run to InfrastructurePending; the pod's log is read as the observer reads a crashed run's;
the worker deletes the Job (its cancel call) and the observer, seeing the Job gone under a running
flow run, crashes it.

STAND-IN for the Job controller (no controller manager here): the test makes the Job's pod as
admin, labelled and owned as the Job controller makes it, on the stand-in kubelet's node."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests import rbac_env as env

OBSERVED = ("kopf", "prefect_kubernetes", "prefect.workers", "prefect.flow_runs")


@dataclass
class Outcome:
    job_created: bool = False
    job_account: str = ""
    states: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    crash_message: str = ""
    error: str | None = None
    refusals: list[str] = field(default_factory=list)


def run_part(cluster: Any, namespace: str) -> Outcome:
    """The worker's part as ctcd-worker; refusals (raised or logged) end it early."""
    import prefect_kubernetes.observer as observer
    from kubernetes_asyncio.config import kube_config
    from prefect_kubernetes.settings import KubernetesSettings
    from pytest import MonkeyPatch

    tap, patch = env.LogTap(), MonkeyPatch()
    path = cluster.work / f"worker-{uuid.uuid4().hex[:8]}.kubeconfig"
    path.write_text(yaml.safe_dump(cluster.kubeconfigs["ctcd-worker"]))
    # The observer and kopf load KUBECONFIG (in a pod: the in-cluster account); the worker's
    # own observer limited to the namespace, as README says to run it.
    patch.setenv("KUBECONFIG", str(path))
    patch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    patch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES", namespace)
    patch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_JOB_RETRY_MAX_RETRIES", "1")
    patch.setattr(observer, "settings", KubernetesSettings())
    for name in OBSERVED:
        logging.getLogger(name).addHandler(tap)
    outcome = Outcome()
    try:
        asyncio.run(_part(cluster, namespace, outcome, tap))
    except Exception as err:  # the worker's own error, as its log would show it
        outcome.error = f"{type(err).__name__}: {err} {err.__cause__ or ''}"
    finally:
        for name in OBSERVED:
            logging.getLogger(name).removeHandler(tap)
        patch.undo()
        _clean(cluster, namespace)
    outcome.refusals = tap.refusals()
    return outcome


async def _part(cluster: Any, namespace: str, outcome: Outcome, tap: env.LogTap) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running
    from prefect_kubernetes import observer
    from prefect_kubernetes.credentials import KubernetesClusterConfig
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    from deployments.setup import kubernetes_job_template

    async with get_client() as client:
        flow_run = await client.create_flow_run(_flow(), name=f"rbac-{uuid.uuid4().hex[:6]}")
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
        kubernetes_job_template(), {"image": "ctcd:rbac-test", "namespace": namespace}
    )
    configuration.cluster_config = KubernetesClusterConfig(
        config=cluster.kubeconfigs["ctcd-worker"], context_name="ctcd-worker"
    )
    configuration.prepare_for_flow_run(flow_run)
    async with KubernetesWorker(work_pool_name="ctcd-kubernetes") as worker:
        result = await worker.run(flow_run, configuration)
        outcome.job_created = True
        job = result.identifier.split(":")[1]
        outcome.job_account = _job_pod(cluster, namespace, job)
        if not await _state(flow_run.id, "InfrastructurePending", outcome, tap):
            return
        logger = logging.getLogger("prefect_kubernetes.rbac-test")
        logger.setLevel(logging.DEBUG)  # the observer says why a log was not read at debug
        entries = await observer._fetch_crashed_pod_logs(str(flow_run.id), job, namespace, logger)
        outcome.log = [line for entry in entries or [] for line in entry.lines]
        async with get_client() as client:  # the flow-run engine in the pod would do this
            await client.set_flow_run_state(flow_run.id, Running(), force=True)
        await worker.kill_infrastructure(result.identifier, configuration)
        _collect_garbage(cluster, namespace, job)
        await _state(flow_run.id, "Crashed", outcome, tap)


def _flow() -> Any:
    from prefect import flow

    @flow(name="rbac-flow")
    def rbac_flow() -> None:
        pass

    return rbac_flow


async def _state(flow_run_id: Any, name: str, outcome: Outcome, tap: env.LogTap) -> bool:
    """Wait until the flow run is in state `name` (True), or a refusal was logged (False)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 30
    async with get_client() as client:
        while time.monotonic() < deadline and not tap.refusals():
            state = (await client.read_flow_run(flow_run_id)).state
            if state is not None and state.name == name:
                outcome.states.append(name)
                outcome.crash_message = state.message or "" if name == "Crashed" else ""
                return True
            await asyncio.sleep(0.1)
    return False


def _job_pod(cluster: Any, namespace: str, job_name: str) -> str:
    """STAND-IN for the Job controller: the Job's pod, as it makes it, on the stand-in node.
    Returns the service account the Job's pods run as."""
    with cluster.api.client() as kube:
        job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{job_name}").json()
        meta, template = job["metadata"], job["spec"]["template"]
        labels = {
            **template["metadata"].get("labels", {}),
            "job-name": job_name,
            "controller-uid": meta["uid"],
        }
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job_name,
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        spec = {**template["spec"], "nodeName": cluster.kubelet.node}
        pod = {
            "metadata": {"name": f"{job_name}-pod", "labels": labels, "ownerReferences": [owner]},
            "spec": spec,
        }
        created = kube.post(f"/api/v1/namespaces/{namespace}/pods", json=pod)
        assert created.status_code == 201, created.text
        return str(spec.get("serviceAccountName", ""))


def _collect_garbage(cluster: Any, namespace: str, job_name: str) -> None:
    """STAND-IN for the garbage collector: the worker deletes the Job in the foreground, so the
    Job waits for its pod to go, then for its finalizer to be removed."""
    with cluster.api.client() as kube:
        kube.delete(f"/api/v1/namespaces/{namespace}/pods/{job_name}-pod", params=env.NOW)
        url = f"/apis/batch/v1/namespaces/{namespace}/jobs/{job_name}"
        kube.patch(url, content=json.dumps({"metadata": {"finalizers": None}}), headers=env.MERGE)


def _clean(cluster: Any, namespace: str) -> None:
    with cluster.api.client() as kube:
        selector = {"labelSelector": "prefect.io/flow-run-id", **env.NOW}
        kube.delete(f"/apis/batch/v1/namespaces/{namespace}/jobs", params=selector)
        kube.delete(f"/api/v1/namespaces/{namespace}/pods", params=selector)
