"""STAND-IN parts for tests/kserve_standin.py: the shapes KServe's Standard-mode reconciler
gives the predictor Deployment, Service and InferenceService status, the "pod" that runs the
real pieces (kserve-storage's initializer, then MLServer 1.7.1 with mlserver-mlflow), and the
ingress. Kept apart from the controller loop so each stays small."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.processes import loopback_port, start_logged, stop_group

RUNTIME_IMAGE = "docker.io/seldonio/mlserver:1.7.1"  # the kserve-mlserver runtime's image
INITIALIZER_IMAGE = "kserve/storage-initializer:v0.21.0"
MODEL_DIR = "/mnt/models"
VOLUME = "kserve-provision-location"
S3_ANNOTATIONS = "serving.kserve.io/s3-"
# What KServe's storage-initializer image runs (its entrypoint calls Storage.download).
INITIALIZER = """
import sys
from kserve_storage import Storage
Storage.download(sys.argv[1], sys.argv[2])
"""


@dataclass
class Pod:
    proc: subprocess.Popen[bytes]
    port: int
    folder: Path
    template: str = ""


def _labels(name: str) -> dict[str, str]:
    return {
        "serving.kserve.io/inferenceservice": name,
        "component": "predictor",
        "app": f"isvc.{name}-predictor",
    }


def _owner(isvc: dict[str, Any]) -> list[dict[str, Any]]:
    meta = isvc["metadata"]
    return [
        {
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "name": meta["name"], "uid": meta["uid"], "controller": True,
            "blockOwnerDeletion": True,
        }
    ]  # fmt: skip


def s3_env(secret: dict[str, Any]) -> list[dict[str, Any]]:
    """KServe's `BuildSecretEnvs` + `BuildS3EnvVars` for one Secret of its default config
    (`s3AccessKeyIDName: AWS_ACCESS_KEY_ID`, ...): nothing unless it holds the secret key."""
    data = secret.get("data") or {}
    if "AWS_SECRET_ACCESS_KEY" not in data:
        return []
    name = secret["metadata"]["name"]
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    notes = secret["metadata"].get("annotations") or {}

    def note(key: str) -> str | None:
        value = notes.get(S3_ANNOTATIONS + key)
        return str(value) if value is not None else None

    if (endpoint := note("endpoint")) is not None:
        https = note("usehttps")
        if https is not None:
            env.append({"name": "S3_USE_HTTPS", "value": https})
        env.append({"name": "S3_ENDPOINT", "value": endpoint})
        scheme = "http" if https == "0" else "https"
        env.append({"name": "AWS_ENDPOINT_URL", "value": f"{scheme}://{endpoint}"})
    for key, var in (("verifyssl", "S3_VERIFY_SSL"), ("region", "AWS_DEFAULT_REGION")):
        if (value := note(key)) is not None:
            env.append({"name": var, "value": value})
    return env


def predictor_deployment(isvc: dict[str, Any], storage_env: list[dict[str, Any]]) -> dict[str, Any]:
    """The `<name>-predictor` Deployment for an mlflow/v2 model on the kserve-mlserver runtime."""
    name = isvc["metadata"]["name"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    labels = {**(isvc["metadata"].get("labels") or {}), **_labels(name)}
    mount = {"name": VOLUME, "mountPath": MODEL_DIR}
    runtime_env = {
        "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_mlflow.MLflowRuntime",
        "MLSERVER_HTTP_PORT": "8080", "MLSERVER_GRPC_PORT": "9000",
        "MLSERVER_MODEL_NAME": name, "MLSERVER_MODEL_URI": MODEL_DIR,
    }  # fmt: skip
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": RUNTIME_IMAGE,
        "env": [{"name": k, "value": v} for k, v in runtime_env.items()],
        "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
        "volumeMounts": [{**mount, "readOnly": True}],
    }
    if model.get("resources"):
        container["resources"] = model["resources"]
    init = {
        "name": "storage-initializer", "image": INITIALIZER_IMAGE,
        "args": [model["storageUri"], MODEL_DIR], "env": storage_env, "volumeMounts": [mount],
    }  # fmt: skip
    spec: dict[str, Any] = {
        "initContainers": [init], "containers": [container],
        "volumes": [{"name": VOLUME, "emptyDir": {}}],
    }  # fmt: skip
    if predictor.get("serviceAccountName"):
        spec["serviceAccountName"] = predictor["serviceAccountName"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{name}-predictor",
            "namespace": isvc["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": _owner(isvc),
        },
        "spec": {
            "replicas": predictor.get("minReplicas") or 1,
            "selector": {"matchLabels": {"app": labels["app"]}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def predictor_service(isvc: dict[str, Any]) -> dict[str, Any]:
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"{name}-predictor",
            "namespace": isvc["metadata"]["namespace"],
            "labels": _labels(name),
            "ownerReferences": _owner(isvc),
        },
        "spec": {
            "selector": {"app": f"isvc.{name}-predictor"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def fingerprint(template: dict[str, Any]) -> str:
    """What the reconciler sets in a pod template (API-server defaults left out)."""
    import json

    spec = template["spec"]
    init, main = spec["initContainers"][0], spec["containers"][0]
    mine = [init["args"], init.get("env"), main.get("env"), main.get("resources")]
    return json.dumps([*mine, spec.get("serviceAccountName")], sort_keys=True)


def storage_initializer(venv: Path, uri: str, folder: Path, env: dict[str, str]) -> str:
    """KServe's storage-initializer code with the init container's env only. "" or why not."""
    (folder / "initializer.py").write_text(INITIALIZER)
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(folder / "initializer.py"), uri, str(folder / "models")],
        env=env, cwd=folder, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    (folder / "storage-initializer.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return f"storage-initializer exited {done.returncode}: {done.stderr.strip()[-600:]}"
    return ""


def start_mlserver(venv: Path, name: str, folder: Path, spec: dict[str, Any]) -> Pod | str:
    """The kserve-container: `mlserver start` with the runtime's env (ports moved to free
    loopback ports, the model at the initializer's folder). The Pod once it is ready, else the
    termination message (its log's tail)."""
    port = loopback_port()
    env = {item["name"]: str(item.get("value", "")) for item in spec["containers"][0]["env"]}
    env |= {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(folder),
        "MLSERVER_HOST": "127.0.0.1", "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(loopback_port()), "MLSERVER_METRICS_PORT": str(loopback_port()),
        "MLSERVER_MODEL_URI": str(folder / "models"),
    }  # fmt: skip
    log = folder / "kserve-container.log"
    proc = start_logged([str(venv / "bin" / "mlserver"), "start", "."], log, env=env, cwd=folder)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=2)
            if ready.status_code == 200:
                return Pod(proc, port, folder)
        except httpx.HTTPError:
            pass
        if "Traceback" in log.read_text(errors="replace"):
            break  # the model failed to load: the container would exit and crash-loop
        time.sleep(0.3)
    stop_group(proc, 5)
    return f"kserve-container: {log.read_text(errors='replace').strip()[-600:]}"


def rollout_status(deployment: dict[str, Any], progressing: bool, serving: Any) -> dict[str, Any]:
    """`progressing`: the new ReplicaSet exists, its pod not ready (old pods serve, if any);
    else the rollout is complete with `serving` replicas."""
    name, generation = deployment["metadata"]["name"], deployment["metadata"]["generation"]
    rs = f"{name}-{generation:x}"
    if progressing:
        old = 1 if serving is not None else 0
        return {
            "observedGeneration": generation, "replicas": old + 1, "updatedReplicas": 0,
            "readyReplicas": old, "availableReplicas": old,
            "unavailableReplicas": deployment["spec"]["replicas"],
            "conditions": [
                _cond("Available", "True" if old else "False",
                      "MinimumReplicasAvailable" if old else "MinimumReplicasUnavailable"),
                _cond("Progressing", "True", "ReplicaSetUpdated",
                      f'ReplicaSet "{rs}" is progressing.'),
            ],
        }  # fmt: skip
    return {
        "observedGeneration": generation, "replicas": serving, "updatedReplicas": serving,
        "readyReplicas": serving, "availableReplicas": serving,
        "conditions": [
            _cond("Available", "True", "MinimumReplicasAvailable"),
            _cond("Progressing", "True", "NewReplicaSetAvailable",
                  f'ReplicaSet "{rs}" has successfully progressed.'),
        ],
    }  # fmt: skip


def _cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = message or (
        "Deployment has minimum availability."
        if status == "True"
        else "Deployment does not have minimum availability."
    )
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": now, "lastTransitionTime": now}  # fmt: skip


def predictor_ready(deployment: dict[str, Any]) -> dict[str, str]:
    """`PropagateRawStatus`: the component's ready condition from the Deployment's."""
    conditions = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions", [])}
    available, progressing = conditions.get("Available"), conditions.get("Progressing")
    ready = {"status": "False", "reason": ""}
    if available and available["status"] == "True":
        ready = {"status": "True", "reason": available["reason"]}
    if progressing and progressing["status"] == "False" and progressing.get("message"):
        ready = {"status": "False", "reason": progressing["reason"],
                 "message": progressing["message"]}  # fmt: skip
    elif progressing and progressing["status"] == "True":
        state = "True" if progressing["reason"] == "NewReplicaSetAvailable" else "Unknown"
        ready = {"status": state, "reason": progressing["reason"],
                 "message": progressing.get("message", "")}  # fmt: skip
    if available and available["status"] == "False":
        ready = {"status": "False", "reason": available["reason"],
                 "message": available.get("message", "")}  # fmt: skip
    return ready


def raw_status(
    deployment: dict[str, Any], ingress_url: str, namespace: str, name: str, failure: str
) -> dict[str, Any]:
    """The InferenceService status one Standard-mode reconcile writes."""
    predictor = predictor_ready(deployment)
    if predictor["status"] == "True":
        ingress = {"status": "True"}
    else:
        ingress = {"status": "False", "reason": "Predictor ingress not created"}
    parts = [predictor, ingress]
    if all(p["status"] == "True" for p in parts):
        ready: dict[str, str] = {"status": "True"}
    else:
        ready = next((p for p in parts if p["status"] == "False"), predictor)
    url = f"{ingress_url}/serving/{namespace}/{name}"
    status: dict[str, Any] = {
        "conditions": {"PredictorReady": predictor, "IngressReady": ingress, "Ready": dict(ready),
                       "Stopped": {"status": "False"}},
        "observedGeneration": (deployment.get("status") or {}).get("observedGeneration", 0),
        "deploymentMode": "Standard",
        "url": url,
        "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
        "components": {"predictor": {"url": url} if predictor["status"] == "True" else {}},
        "modelStatus": _model_status(predictor, failure, deployment),
    }  # fmt: skip
    return status


def _model_status(predictor: dict[str, str], failure: str, deployment: dict[str, Any]) -> Any:
    """`PropagateModelStatus` from what the pods show."""
    if failure:
        meta = deployment["metadata"]
        return {
            "transitionStatus": "BlockedByFailedLoad",
            "states": {"targetModelState": "FailedToLoad"},
            "lastFailureInfo": {
                "location": f"{meta['name']}-{meta['generation']:x}",
                "reason": "ModelLoadFailed", "message": failure, "exitCode": 1,
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }  # fmt: skip
    if predictor["status"] == "True":
        return {"transitionStatus": "UpToDate",
                "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"}}  # fmt: skip
    return {"transitionStatus": "InProgress", "states": {"targetModelState": "Loading"}}


class StandInIngress:
    """STAND-IN for the ingress: `/serving/{ns}/{name}/REST` -> the pod serving `name`."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], int] = {}
        self.port = loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                parts = self.path.split("/", 4)  # "", "serving", namespace, name, rest
                port = routes.get((parts[2], parts[3])) if len(parts) == 5 else None
                if port is None:
                    self.send_error(503, "no endpoints available for service")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    answer = httpx.request(
                        self.command, f"http://127.0.0.1:{port}/{parts[4]}", content=body,
                        headers={"Content-Type": "application/json"}, timeout=30,
                    )  # fmt: skip
                except httpx.HTTPError as err:
                    self.send_error(502, f"upstream: {type(err).__name__}")
                    return
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "text/plain"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def decode(data: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in data.items()}
