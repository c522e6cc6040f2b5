"""TEST-SIDE KUBELET STAND-IN: this machine's kube-apiserver has no kubelet, so nothing would run
the pods the controller manager makes from Jobs. `KubeletStandIn` does that one part of a
kubelet's work, for tests only: it watches the pods of one namespace, runs each pod's container
with podman exactly as the pod spec says (image, command, args, env, working dir; host network,
so the container reaches loopback servers) and reports the pod's phase and container state back
to the API server's status subresource, as a kubelet does. A missing image is reported as a
kubelet reports a failed pull (`ErrImagePull`; the pod stays Pending). Not done: resource
limits, volumes, probes, `valueFrom` env, init containers, restarts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.kube import KubeAPI

MERGE = {"Content-Type": "application/merge-patch+json"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def podman_run_args(pod: dict[str, Any], name: str) -> list[str]:
    """`podman run` for the pod's only container, as a kubelet would start it."""
    [container] = pod["spec"]["containers"]
    cmd = ["podman", "run", "--name", name, "--network", "host", "--pull", "never"]
    for var in container.get("env") or []:
        if "value" not in var:
            raise ValueError(f"env {var['name']}: valueFrom is not supported by the stand-in")
        cmd += ["--env", f"{var['name']}={var['value']}"]
    if container.get("workingDir"):
        cmd += ["--workdir", container["workingDir"]]
    if container.get("command"):  # Kubernetes' command replaces the image's ENTRYPOINT
        cmd += ["--entrypoint", json.dumps(container["command"])]
    return [*cmd, container["image"], *(container.get("args") or [])]


class KubeletStandIn:
    """Runs the pods of `namespace` with podman; `logs` holds each container's output."""

    def __init__(self, api: KubeAPI, namespace: str, logs: Path) -> None:
        self.api, self.namespace, self.logs = api, namespace, logs
        self.seen: set[str] = set()
        self.containers: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> KubeletStandIn:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join(10)
        for name in self.containers:  # stop whatever still runs, then wait for the reporters
            subprocess.run(["podman", "rm", "--force", "--time", "2", name], capture_output=True)
        for thread in self._threads:
            thread.join(30)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                with self.api.client() as kube:
                    pods = kube.get(f"/api/v1/namespaces/{self.namespace}/pods").json()
            except httpx.HTTPError:
                pods = {}
            for pod in pods.get("items", []):
                uid = pod["metadata"]["uid"]
                if uid not in self.seen and pod.get("status", {}).get("phase") == "Pending":
                    self.seen.add(uid)
                    thread = threading.Thread(target=self._run_pod, args=(pod,), daemon=True)
                    self._threads.append(thread)
                    thread.start()
            self._stop.wait(0.5)

    def _report(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        with self.api.client() as kube:
            done = kube.patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{name}/status",
                content=json.dumps({"status": status}),
                headers=MERGE,
            )
        done.raise_for_status()

    def _container_status(self, pod: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        [container] = pod["spec"]["containers"]
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "restartCount": 0,
            "ready": "running" in state,
            "started": "running" in state,
            "state": state,
        }

    def _run_pod(self, pod: dict[str, Any]) -> None:
        [container] = pod["spec"]["containers"]
        image = container["image"]
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            message = f'Failed to pull image "{image}": not found locally, no registry reachable'
            waiting = {"waiting": {"reason": "ErrImagePull", "message": message}}
            self._report(pod, {"containerStatuses": [self._container_status(pod, waiting)]})
            return
        name = f"kubelet-stand-in-{pod['metadata']['uid']}"
        self.containers.append(name)
        started = _now()
        running = {"running": {"startedAt": started}}
        self._report(
            pod,
            {
                "phase": "Running",
                "startTime": started,
                "podIP": "127.0.0.1",
                "containerStatuses": [self._container_status(pod, running)],
            },
        )
        log = self.logs / f"{pod['metadata']['name']}.log"
        with open(log, "wb") as out:
            code = subprocess.run(
                podman_run_args(pod, name), stdout=out, stderr=subprocess.STDOUT
            ).returncode
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)
        reason = "Completed" if code == 0 else "Error"
        terminated = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": _now(),
            }
        }
        phase = "Succeeded" if code == 0 else "Failed"
        self._report(
            pod, {"phase": phase, "containerStatuses": [self._container_status(pod, terminated)]}
        )

    def wait_idle(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
