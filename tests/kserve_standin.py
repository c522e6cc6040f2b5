"""STAND-IN for what cannot run here: KServe's controller (Go, needs cert-manager), the
Kubernetes deployment controller and kubelet that run its predictor pods, and the ingress.
Everything they touch is real: the kube-apiserver (started without the controller manager,
so this alone writes Deployment status), the generated InferenceService CRD, the Secret and
service account the deployer made, KServe's own storage-initializer code (`kserve-storage`)
downloading from a real S3 API, and MLServer 1.7.1 with mlserver-mlflow serving V2.

`StandInKServeController` watches InferenceServices and does what KServe's Standard-mode
(RawDeployment) reconciler does, in its order (pkg/controller/v1beta1/inferenceservice:
controller.go, components/predictor, reconcilers/raw, deployment and service; status from
pkg/apis/serving/v1beta1/inference_service_status.go `PropagateRawStatus`):
- adds the `inferenceservice.finalizers` finalizer, and on deletion removes what the
  InferenceService owned (the garbage collector's part) and then the finalizer;
- creates or updates the owned `<name>-predictor` Deployment and Service (owner reference,
  labels, the `storage-initializer` init container carrying `storageUri` with the env KServe's
  credential builder injects from the predictor's service account's annotated S3 Secret,
  and the `kserve-container` of the `kserve-mlserver` runtime), replicas = `minReplicas` (what
  an HPA with min = max settles on);
- writes the InferenceService's status from the Deployment as it is at that moment, as
  `PropagateRawStatus` does: `PredictorReady` from the Deployment's `Available`/`Progressing`
  conditions, `IngressReady`, `Ready` (both), and `observedGeneration` COPIED FROM THE
  DEPLOYMENT'S `status.observedGeneration` (KServe does that in Standard mode). Right after a
  spec change it therefore writes a stale `Ready` True beside a Deployment whose template has
  the new URI and whose rollout has not been observed yet — as the real one does;
- `serving.kserve.io/stop: "true"` deletes the Deployment and Service (KServe 0.15+ removes a
  stopped service's workloads) and sets `Stopped` True and `PredictorReady`/`IngressReady`/
  `Ready` False with reason `Stopped`; removing it recreates them.

The deployment-controller-and-kubelet part then runs the pod with real parts: the storage
initializer (`kserve_storage.Storage.download`) with exactly the init container's env
(secretKeyRefs resolved from the Secret, nothing inherited), then `mlserver start` with the
runtime's env, and writes the Deployment's rollout status (`ReplicaSetUpdated`, then
`NewReplicaSetAvailable`). A pod that fails leaves the previous pod serving and the Deployment
`Progressing` (as Kubernetes would, until the progress deadline), and the InferenceService's
`modelStatus` says `BlockedByFailedLoad` with the pod's termination message, as KServe's
`PropagateModelStatus` writes from a crash-looping pod.

With no venvs (`sdk_venv=None, mlserver_venv=None`, tests of API permissions only, as the
Seldon stand-in's `venv=None`) no pod runs: a rollout completes as soon as it is observed.

`StandInIngress` maps `{url}/serving/{namespace}/{name}/...` (KServe's path-based routing,
`pathTemplate: /serving/{{ .Namespace }}/{{ .Name }}`) to the pod serving that name."""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests import kserve_pod as pod
from tests.processes import stop_group

ISVCS = "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices"
DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"
SERVICES = "/api/v1/namespaces/{ns}/services"
MERGE = {"Content-Type": "application/merge-patch+json"}
FINALIZER = "inferenceservice.finalizers"
STOP = "serving.kserve.io/stop"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StandInKServeController:
    api: Any  # tests.kube.KubeAPI
    namespace: str
    sdk_venv: Path | None  # both None: no pod runs, a rollout completes at once
    mlserver_venv: Path | None
    work: Path
    ingress: pod.StandInIngress
    pods: dict[str, pod.Pod] = field(default_factory=dict)
    rolled: dict[str, tuple[str, int]] = field(default_factory=dict)
    # The rollout whose pod failed, and why: every later reconcile reports it again, as
    # KServe reads it from the crash-looping pod each time (until the Deployment changes).
    failed: dict[str, tuple[tuple[str, int], str]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    paused: bool = False  # True: the controller is down (nothing is reconciled)
    hold_rollouts: bool = False  # True: no pod starts and no rollout is observed
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stand-in-kserve")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(60)
        for name in list(self.pods):
            self._end(name)

    def url(self, kind: str, name: str = "") -> str:
        base = {"isvc": ISVCS, "deploy": DEPLOYMENTS, "svc": SERVICES}[kind]
        return base.format(ns=self.namespace) + (f"/{name}" if name else "")

    def note(self, event: str) -> None:
        """Keep what happened (in `events` and `work/events.log`, for a failing test's
        post-mortem)."""
        self.events.append(event)
        with open(self.work / "events.log", "a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {event}\n")

    def _loop(self) -> None:
        with self.api.client() as kube:
            while not self._stop.is_set():
                try:
                    if not self.paused:
                        self._pass(kube)
                except Exception as err:  # keep watching; the test sees the effect
                    self.note(f"error: {type(err).__name__}: {err}")
                self._stop.wait(0.2)

    def _pass(self, kube: httpx.Client) -> None:
        items = kube.get(self.url("isvc")).json()["items"]
        names = {item["metadata"]["name"] for item in items}
        for name in set(self.pods) - names:
            self._end(name)  # deleted outright (no finalizer yet)
        for item in items:
            self._reconcile(kube, item)

    def _reconcile(self, kube: httpx.Client, isvc: dict[str, Any]) -> None:
        meta = isvc["metadata"]
        if meta.get("deletionTimestamp"):
            self._finalize(kube, isvc)
        elif FINALIZER not in meta.get("finalizers", []):
            meta["finalizers"] = [*meta.get("finalizers", []), FINALIZER]
            kube.put(self.url("isvc", meta["name"]), json=isvc)  # 409: next pass
        elif str(meta.get("annotations", {}).get(STOP, "")).lower() == "true":
            self._stopped(kube, isvc)
        else:
            deployment = self._apply(kube, isvc)
            self._write_status(kube, isvc, deployment)
            if not self.hold_rollouts:
                self._roll(kube, isvc, deployment)

    def _finalize(self, kube: httpx.Client, isvc: dict[str, Any]) -> None:
        name = isvc["metadata"]["name"]
        self._remove_workloads(kube, name)
        isvc["metadata"]["finalizers"] = [
            f for f in isvc["metadata"].get("finalizers", []) if f != FINALIZER
        ]
        kube.put(self.url("isvc", name), json=isvc)
        self.note(f"{name}: finalized")

    def _remove_workloads(self, kube: httpx.Client, name: str) -> None:
        self._end(name)
        self.rolled.pop(name, None)
        self.failed.pop(name, None)
        kube.delete(self.url("deploy", f"{name}-predictor"))
        kube.delete(self.url("svc", f"{name}-predictor"))

    def _stopped(self, kube: httpx.Client, isvc: dict[str, Any]) -> None:
        name = isvc["metadata"]["name"]
        if (
            kube.get(self.url("deploy", f"{name}-predictor")).status_code == 200
            or name in self.pods
        ):
            self._remove_workloads(kube, name)
            self.note(f"{name}: stopped")
        stopped = {"status": "False", "reason": "Stopped"}
        conditions = {
            "PredictorReady": stopped, "IngressReady": stopped, "Ready": stopped,
            "Stopped": {"status": "True"},
        }  # fmt: skip
        self._put_status(kube, isvc, {"conditions": conditions})

    def _apply(self, kube: httpx.Client, isvc: dict[str, Any]) -> dict[str, Any]:
        """The owned Deployment and Service as KServe's raw reconciler makes them."""
        desired = pod.predictor_deployment(isvc, self._storage_env(kube, isvc))
        name = desired["metadata"]["name"]
        service = pod.predictor_service(isvc)
        if kube.get(self.url("svc", name)).status_code == 404:
            kube.post(self.url("svc"), json=service)
        current = kube.get(self.url("deploy", name))
        if current.status_code == 404:
            created = kube.post(self.url("deploy"), json=desired)
            assert created.status_code == 201, created.text
            return dict(created.json())
        found = current.json()
        same = pod.fingerprint(found["spec"]["template"]) == pod.fingerprint(
            desired["spec"]["template"]
        )
        if same and found["spec"]["replicas"] == desired["spec"]["replicas"]:
            return dict(found)
        found["spec"]["replicas"] = desired["spec"]["replicas"]
        found["spec"]["template"] = desired["spec"]["template"]
        replaced = kube.put(self.url("deploy", name), json=found)
        assert replaced.status_code == 200, replaced.text
        return dict(replaced.json())

    def _storage_env(self, kube: httpx.Client, isvc: dict[str, Any]) -> list[dict[str, Any]]:
        """KServe's credential builder: the S3 Secret listed by the predictor's service account
        becomes secretKeyRefs for the keys and plain values for its `s3-*` annotations."""
        account = isvc["spec"]["predictor"].get("serviceAccountName") or "default"
        found = kube.get(f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}")
        if found.status_code != 200:
            return []  # KServe logs "Failed to find service account" and goes on
        env: list[dict[str, Any]] = []
        for ref in found.json().get("secrets") or []:
            secret = kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{ref['name']}")
            if secret.status_code == 200:
                env += pod.s3_env(secret.json())
        return env

    def _roll(self, kube: httpx.Client, isvc: dict[str, Any], deployment: dict[str, Any]) -> None:
        """The deployment controller and kubelet: observe the new generation, run its pod."""
        name = isvc["metadata"]["name"]
        key = (deployment["metadata"]["uid"], deployment["metadata"]["generation"])
        if self.rolled.get(name) == key:
            return
        self.rolled[name] = key
        replicas = deployment["spec"]["replicas"]
        old = self.pods.get(name)
        deployment = self._deployment_status(kube, deployment, progressing=True, serving=old)
        self._write_status(kube, isvc, deployment)
        if old is not None and old.template == pod.fingerprint(deployment["spec"]["template"]):
            error = ""  # the previous ReplicaSet scaled back: its pods already serve
        elif self.mlserver_venv is None:
            error = ""  # no pods (API permissions only): the rollout completes at once
        else:
            try:
                error = self._run_pod(kube, name, deployment["spec"]["template"])
            except Exception as err:  # a pod that cannot run fails its rollout, as in a cluster
                error = f"pod did not start: {type(err).__name__}: {err}"
        if error:
            self.note(f"{name}: FailedToLoad: {error[:200]}")
            self.failed[name] = (key, error)
            self._write_status(kube, isvc, deployment)
            return
        deployment = self._deployment_status(kube, deployment, progressing=False, serving=replicas)
        self._write_status(kube, isvc, deployment)

    def _run_pod(self, kube: httpx.Client, name: str, template: dict[str, Any]) -> str:
        spec = template["spec"]
        folder = self.work / f"{name}-{time.monotonic_ns()}"
        folder.mkdir(parents=True)
        init = spec["initContainers"][0]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder)}
        for item in init.get("env", []):
            env[item["name"]] = self._env_value(kube, item)
        downloaded = pod.storage_initializer(self.sdk_venv, init["args"][0], folder, env)
        if downloaded:
            return downloaded
        started = pod.start_mlserver(self.mlserver_venv, name, folder, spec)
        if isinstance(started, str):
            return started
        started.template = pod.fingerprint(template)
        old = self.pods.get(name)
        self.pods[name] = started
        self.ingress.routes[(self.namespace, name)] = started.port
        if old:
            stop_group(old.proc, 10)
        self.note(f"{name}: serving {init['args'][0]}")
        return ""

    def _env_value(self, kube: httpx.Client, item: dict[str, Any]) -> str:
        """What the kubelet puts in the container's environment for one env entry."""
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        secret = kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{ref['name']}")
        if secret.status_code != 200:
            return ""
        return base64.b64decode(secret.json()["data"][ref["key"]]).decode()

    def _end(self, name: str) -> None:
        self.ingress.routes.pop((self.namespace, name), None)
        running = self.pods.pop(name, None)
        if running:
            stop_group(running.proc, 10)

    def _deployment_status(
        self, kube: httpx.Client, deployment: dict[str, Any], progressing: bool, serving: Any
    ) -> dict[str, Any]:
        """The rollout status the deployment controller writes (`kubectl rollout status`)."""
        status = pod.rollout_status(deployment, progressing, serving)
        url = self.url("deploy", f"{deployment['metadata']['name']}/status")
        patched = kube.patch(url, content=json.dumps({"status": status}), headers=MERGE)
        assert patched.status_code == 200, patched.text
        return dict(patched.json())

    def _write_status(
        self, kube: httpx.Client, isvc: dict[str, Any], deployment: dict[str, Any]
    ) -> None:
        name = isvc["metadata"]["name"]
        key = (deployment["metadata"]["uid"], deployment["metadata"]["generation"])
        failed_key, error = self.failed.get(name, ((), ""))
        failure = error if failed_key == key else ""
        status = pod.raw_status(deployment, self.ingress.url, self.namespace, name, failure)
        self._put_status(kube, isvc, status)

    def _put_status(self, kube: httpx.Client, isvc: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge the conditions as knative's condition set does (a transition time changes
        only with the status) and write the status subresource."""
        name = isvc["metadata"]["name"]
        current = kube.get(self.url("isvc", name))
        if current.status_code != 200:
            return
        before = {c["type"]: c for c in (current.json().get("status") or {}).get("conditions", [])}
        conditions = []
        for kind, cond in status.pop("conditions").items():
            same = before.get(kind, {}).get("status") == cond["status"]
            when = before[kind]["lastTransitionTime"] if same else _now()
            conditions.append({"type": kind, **cond, "lastTransitionTime": when})
        body = {"status": {**status, "conditions": conditions}}
        if _same(current.json().get("status") or {}, body["status"]):
            return  # KServe writes status only when it changed (inferenceServiceStatusEqual)
        patched = kube.patch(
            f"{self.url('isvc', name)}/status", content=json.dumps(body), headers=MERGE
        )
        assert patched.status_code in (200, 404, 409), patched.text


def _same(current: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether writing `new` (a merge patch) would leave `current` as it is."""
    for key, value in new.items():
        if key == "conditions":
            have = {c["type"]: c for c in current.get("conditions") or []}
            if any(have.get(c["type"]) != c for c in value):
                return False
        elif isinstance(value, dict) and isinstance(current.get(key), dict):
            if not _same(current[key], value):
                return False
        elif current.get(key) != value:
            return False
    return True
