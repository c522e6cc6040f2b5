"""STAND-IN for what cannot run here: Seldon Core v1's operator, the kubelet running its pods,
and the ingress. Everything else is real.

`StandInSeldonOperator` watches SeldonDeployments on the real kube-apiserver (started without
the controller manager, so it alone writes Deployment status) and does what the real operator
does, in its order: for each predictor it creates or updates the owned Deployment shaped and
named as Seldon's (`<sdep>-<predictor>-0-<container>`, labels `seldon-deployment-id`,
`seldon-app`, `seldon.io/shadow` on a shadow's pods; a storage-initializer init container with
the `modelUri`, `envFrom` the Secret the graph names, the model container), then does with real
parts what that pod would: runs rclone with the Secret's environment to download the
`modelUri` from the bucket, serves the files with Seldon Core's own Python model server
(`seldon-core-microservice`), and only then writes the Deployment's rollout status. Once every
predictor serves it deletes the Deployments of predictors no longer in the spec and writes the
SeldonDeployment's `status` (`Creating` -> `Available`, or `Failed` with a description). Like
the real operator it leaves the old `Available` in place while an update rolls out. Deleting a
SeldonDeployment ends its servers and Deployments (the garbage collector's part).

`StandInIngress` maps `{url}/seldon/{namespace}/{name}/...` to the servers of that
SeldonDeployment's predictors as Istio routes to their services: at random by the predictors'
`traffic` weights, and a copy of each request to a `shadow: true` predictor, its answer dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.processes import loopback_port, start_logged, stop_group

SDEPS = "/apis/machinelearning.seldon.io/v1/namespaces/{ns}/seldondeployments"
DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}
IMAGES = {
    "MLFLOW_SERVER": "seldonio/mlflowserver:1.18.2",
    "SKLEARN_SERVER": "seldonio/sklearnserver:1.18.2",
}
# What Seldon's prepackaged MLflow server does, in the shape seldon-core-microservice loads:
# download is done (rclone, above); load the MLflow model; predict on a DataFrame with the
# request's names as columns.
MLFLOW_SERVER_CLASS = """
import pandas as pd
import mlflow.pyfunc


class MLFlowServer:
    def __init__(self, model_uri):
        self.model_uri = model_uri
        self.model = None

    def load(self):
        self.model = mlflow.pyfunc.load_model(self.model_uri)

    def predict(self, X, feature_names=None, meta=None):
        if self.model is None:
            self.load()
        frame = pd.DataFrame(X, columns=feature_names or None)
        return self.model.predict(frame)
"""


# seldon-core-microservice binds 0.0.0.0 with no option to change it; tests bind loopback only.
# So the stand-in starts it through this launcher, which rewrites the wildcard address of every
# bind (Python sockets: gunicorn, the gRPC port reservation; and gRPC's own server) to 127.0.0.1.
LOOPBACK_LAUNCHER = """
import socket
import sys

_bind = socket.socket.bind


def _loopback(self, address):
    if isinstance(address, tuple) and address[0] in ("", "0.0.0.0", "::"):
        address = ("::1" if self.family == socket.AF_INET6 else "127.0.0.1", *address[1:])
    return _bind(self, address)


socket.socket.bind = _loopback

import grpc._server  # noqa: E402

_add = grpc._server._Server.add_insecure_port


def _add_loopback(self, address):
    return _add(self, address.replace("0.0.0.0", "127.0.0.1"))


grpc._server._Server.add_insecure_port = _add_loopback

from seldon_core.microservice import main  # noqa: E402

sys.argv[0] = "seldon-core-microservice"
sys.exit(main())
"""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    model_uri: str
    log: Path


@dataclass
class StandInSeldonOperator:
    api: Any  # tests.kube.KubeAPI
    namespace: str
    venv: Path | None  # None: pods count as started at once (tests of API permissions only)
    work: Path
    ingress: StandInIngress
    start_timeout: float = 90.0
    servers: dict[str, Server] = field(default_factory=dict)  # by Deployment name
    handled: dict[str, tuple[int, ...]] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)  # Deployment -> generation it serves
    events: list[str] = field(default_factory=list)
    paused: bool = False  # True: do nothing, as an operator that is down
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stand-in-seldon")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        for name in list(self.servers):
            self._end(name)

    def _loop(self) -> None:
        with self.api.client() as kube:
            while not self._stop.is_set():
                try:
                    if not self.paused:
                        self._pass(kube)
                except Exception as err:  # keep watching; the test sees the effect
                    self.events.append(f"error: {type(err).__name__}: {err}")
                self._stop.wait(0.2)

    def _pass(self, kube: httpx.Client) -> None:
        items = kube.get(SDEPS.format(ns=self.namespace)).json()["items"]
        names = {item["metadata"]["name"] for item in items}
        for name in set(self.handled) - names:  # deleted: the garbage collector's part
            self._remove(kube, name, keep=set())
            self.handled.pop(name, None)
        for item in items:
            self._reconcile(kube, item)

    def _reconcile(self, kube: httpx.Client, sdep: dict[str, Any]) -> None:
        name = sdep["metadata"]["name"]
        predictors = sdep["spec"]["predictors"]
        deployments = [self._apply_deployment(kube, sdep, i) for i in range(len(predictors))]
        key = (sdep["metadata"]["generation"], *(d["metadata"]["generation"] for d in deployments))
        if self.handled.get(name) == key:
            return
        if not sdep.get("status", {}).get("state"):
            self._sdep_status(kube, name, "Creating", "")
        errors = []
        for deployment in deployments:
            error = self._roll_out(kube, deployment)
            if error:
                dep = deployment["metadata"]["name"]
                self.events.append(f"{dep}: Failed: {error}")
                errors.append(error if len(deployments) == 1 else f"{dep}: {error}")
        if errors:
            self._sdep_status(kube, name, "Failed", "; ".join(errors))
        else:  # as the real operator: once the graph serves, what it no longer names goes
            self._remove(kube, name, keep={d["metadata"]["name"] for d in deployments})
            self._route(name, predictors, deployments)
            self._sdep_status(kube, name, "Available", "", deployments)
        self.handled[name] = key

    def _roll_out(self, kube: httpx.Client, deployment: dict[str, Any]) -> str:
        """Run the Deployment's pod unless it already serves this generation; "" or why not."""
        dep, generation = deployment["metadata"]["name"], deployment["metadata"]["generation"]
        if self.done.get(dep) == generation:
            return ""
        replicas = deployment["spec"]["replicas"]
        if replicas == 0:
            self._end(dep)
        else:
            error = self._run_pod(kube, dep, deployment["spec"]["template"]["spec"])
            if error:
                return error
        self._deployment_status(kube, deployment, replicas)
        self.done[dep] = generation
        return ""

    def _remove(self, kube: httpx.Client, name: str, keep: set[str]) -> None:
        """End and delete the Deployments of SeldonDeployment `name` not in `keep`."""
        url = DEPLOYMENTS.format(ns=self.namespace)
        found = kube.get(url, params={"labelSelector": f"seldon-deployment-id={name}"})
        listed = {d["metadata"]["name"] for d in found.json().get("items", [])}
        ours = {dep for dep in self.servers if dep.startswith(f"{name}-")}
        for dep in (listed | ours) - keep:
            self._end(dep)
            self.done.pop(dep, None)
            kube.delete(f"{url}/{dep}")
            self.events.append(f"{dep}: deleted")
        if not keep:
            self.ingress.routes.pop((self.namespace, name), None)

    def _route(
        self, name: str, predictors: list[dict[str, Any]], deployments: list[dict[str, Any]]
    ) -> None:
        route = Route()
        for pred, deployment in zip(predictors, deployments, strict=True):
            server = self.servers.get(deployment["metadata"]["name"])
            if server is None:  # scaled to 0
                continue
            if pred.get("shadow"):
                route.mirror = server.port
            else:
                route.ports.append(server.port)
                route.weights.append(pred.get("traffic") or 100)
        if route.ports:
            self.ingress.routes[(self.namespace, name)] = route
        else:
            self.ingress.routes.pop((self.namespace, name), None)

    def _apply_deployment(
        self, kube: httpx.Client, sdep: dict[str, Any], index: int
    ) -> dict[str, Any]:
        desired = predictor_deployment(sdep, index)
        url = f"{DEPLOYMENTS.format(ns=self.namespace)}/{desired['metadata']['name']}"
        current = kube.get(url)
        if current.status_code == 404:
            created = kube.post(DEPLOYMENTS.format(ns=self.namespace), json=desired)
            assert created.status_code == 201, created.text
            return dict(created.json())
        found = current.json()
        if (found["spec"]["replicas"], found["spec"]["template"]["spec"]["initContainers"]) == (
            desired["spec"]["replicas"],
            desired["spec"]["template"]["spec"]["initContainers"],
        ):
            return dict(found)
        found["spec"]["replicas"] = desired["spec"]["replicas"]
        found["spec"]["template"] = desired["spec"]["template"]
        replaced = kube.put(url, json=found)
        assert replaced.status_code == 200, replaced.text
        return dict(replaced.json())

    def _run_pod(self, kube: httpx.Client, name: str, pod: dict[str, Any]) -> str:
        """What the kubelet would do with Deployment `name`'s pod: the init container, then
        the model server. Returns an error description, or "" once the new server answers."""
        if self.venv is None:
            self.events.append(f"{name}: serving {pod['initContainers'][0]['args'][0]} (no pod)")
            return ""
        init = pod["initContainers"][0]
        model_uri = init["args"][0]
        env = {"PATH": "/usr/bin:/bin"}
        for source in init.get("envFrom", []):
            secret = kube.get(
                f"/api/v1/namespaces/{self.namespace}/secrets/{source['secretRef']['name']}"
            )
            if secret.status_code != 200:
                return f"secret {source['secretRef']['name']} not found"
            env.update({k: base64.b64decode(v).decode() for k, v in secret.json()["data"].items()})
        folder = self.work / f"{name}-{time.monotonic_ns()}"
        remote = "s3:" + model_uri.removeprefix("s3://")
        copied = subprocess.run(
            ["rclone", "copy", remote, str(folder / "models"), "--config", "/dev/null"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if copied.returncode != 0 or not any((folder / "models").glob("*")):
            return f"storage initializer: rclone could not copy {model_uri}: {copied.stderr[-500:]}"
        return self._serve(name, folder, model_uri)

    def _serve(self, name: str, folder: Path, model_uri: str) -> str:
        (folder / "MLFlowServer.py").write_text(MLFLOW_SERVER_CLASS)
        (folder / "launch.py").write_text(LOOPBACK_LAUNCHER)
        http, grpc, metrics = loopback_port(), loopback_port(), loopback_port()
        params = [{"name": "model_uri", "value": str(folder / "models"), "type": "STRING"}]
        env = {
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            "PREDICTIVE_UNIT_PARAMETERS": json.dumps(params),
            "HOME": str(folder),
        }
        log = folder / "server.log"
        proc = start_logged(
            [
                str(self.venv / "bin" / "python"), "launch.py", "MLFlowServer",
                "--service-type", "MODEL", "--http-port", str(http), "--grpc-port", str(grpc),
                "--metrics-port", str(metrics), "--workers", "1",
            ],
            log, env=env, cwd=folder,
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            stop_group(proc, 5)
            return f"model server did not start: {log.read_text()[-800:]}"
        old = self.servers.get(name)
        self.servers[name] = Server(proc, http, model_uri, log)
        self._repoint(old, http)
        if old:
            stop_group(old.proc, 10)
        self.events.append(f"{name}: serving {model_uri}")
        return ""

    def _repoint(self, old: Server | None, port: int | None) -> None:
        """The Service in front of a Deployment's pods: routes to its old pod go to `port`
        (its new pod), or nowhere (None: no pod left)."""
        if old is None:
            return
        for key, route in list(self.ingress.routes.items()):
            pairs = [(p, w) for p, w in zip(route.ports, route.weights, strict=True)]
            if port is None:
                pairs = [(p, w) for p, w in pairs if p != old.port]
            else:
                pairs = [(port if p == old.port else p, w) for p, w in pairs]
            route.ports, route.weights = [p for p, _ in pairs], [w for _, w in pairs]
            if route.mirror == old.port:
                route.mirror = port
            if not route.ports:
                self.ingress.routes.pop(key, None)

    def _end(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server:
            self._repoint(server, None)
            stop_group(server.proc, 10)

    def _deployment_status(self, kube: httpx.Client, deployment: dict[str, Any], n: int) -> None:
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": n, "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n,
        }  # fmt: skip
        url = f"{DEPLOYMENTS.format(ns=self.namespace)}/{deployment['metadata']['name']}/status"
        patched = kube.patch(url, content=json.dumps({"status": status}), headers=MERGE)
        assert patched.status_code == 200, patched.text

    def _sdep_status(
        self,
        kube: httpx.Client,
        name: str,
        state: str,
        description: str,
        deployments: list[dict[str, Any]] | None = None,
    ) -> None:
        status: dict[str, Any] = {"state": state, "description": description}
        if deployments:
            status["replicas"] = deployments[0]["spec"]["replicas"]
            status["deploymentStatus"] = {
                d["metadata"]["name"]: {
                    "replicas": d["spec"]["replicas"],
                    "availableReplicas": d["spec"]["replicas"],
                }
                for d in deployments
            }
        url = f"{SDEPS.format(ns=self.namespace)}/{name}/status"
        patched = kube.patch(url, content=json.dumps({"status": status}), headers=MERGE)
        assert patched.status_code in (200, 404), patched.text


def _dep_name(name: str, predictor: str, container: str) -> str:
    """Seldon's `GetDeploymentName`: `<sdep>-<predictor>-<componentSpec index>-<containers>`
    (names over 63 characters become `seldon-<md5>`)."""
    full = f"{name}-{predictor}-0-{container}"
    return full if len(full) <= 63 else "seldon-" + hashlib.md5(full.encode()).hexdigest()


def predictor_deployment(sdep: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """The Deployment Seldon's operator makes for predictor `index` of `sdep`."""
    meta, spec = sdep["metadata"], sdep["spec"]
    pred = spec["predictors"][index]
    graph = pred["graph"]
    name = meta["name"]
    labels = {
        "seldon-deployment-id": name,
        "seldon-app": f"{name}-{pred['name']}",
        "app.kubernetes.io/managed-by": "seldon-core",
    }
    pod_labels = {**labels, **({"seldon.io/shadow": "true"} if pred.get("shadow") else {})}
    component = (pred.get("componentSpecs") or [{"spec": {}}])[0]["spec"]
    user = next((c for c in component.get("containers", []) if c["name"] == graph["name"]), {})
    volume = {"name": f"{graph['name']}-provision-location", "mountPath": "/mnt/models"}
    init: dict[str, Any] = {
        "name": f"{graph['name']}-model-initializer",
        "image": "seldonio/rclone-storage-initializer:1.18.2",
        "args": [graph["modelUri"], "/mnt/models"],
        "volumeMounts": [volume],
    }
    if graph.get("envSecretRefName"):
        init["envFrom"] = [{"secretRef": {"name": graph["envSecretRefName"]}}]
    params = [{"name": "model_uri", "value": "/mnt/models", "type": "STRING"}]
    model: dict[str, Any] = {
        "name": graph["name"],
        "image": IMAGES.get(graph.get("implementation", ""), "unknown"),
        "env": [{"name": "PREDICTIVE_UNIT_PARAMETERS", "value": json.dumps(params)}],
        "volumeMounts": [{**volume, "readOnly": True}],
    }
    if user.get("resources"):
        model["resources"] = user["resources"]
    pod: dict[str, Any] = {
        "initContainers": [init],
        "containers": [model, {"name": "seldon-container-engine", "image": "seldonio/engine"}],
        "volumes": [{"name": volume["name"], "emptyDir": {}}],
    }
    if component.get("serviceAccountName"):
        pod["serviceAccountName"] = component["serviceAccountName"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": _dep_name(name, pred["name"], graph["name"]),
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "machinelearning.seldon.io/v1",
                    "kind": "SeldonDeployment",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": pred.get("replicas", 1),
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


@dataclass
class Route:
    """Where the ingress sends a SeldonDeployment's requests: one of `ports` at random by
    `weights` (the predictors' `traffic`), and a copy to `mirror` (a shadow predictor)."""

    ports: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    mirror: int | None = None
    mirrored: int = 0  # copies the shadow answered

    def pick(self) -> int:
        return random.choices(self.ports, weights=self.weights)[0]


class StandInIngress:
    """STAND-IN for Istio/Ambassador: `/seldon/{ns}/{name}/REST` -> the serving processes."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.port = loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                parts = self.path.split("/", 4)  # "", "seldon", namespace, name, rest
                route = routes.get((parts[2], parts[3])) if len(parts) == 5 else None
                if route is None or not route.ports:
                    self.send_error(503, "no endpoints available for service")
                    return
                port = route.pick()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if route.mirror is not None:
                    mirror = (route, route.mirror, self.command, parts[4], body)
                    threading.Thread(target=_mirror, args=mirror, daemon=True).start()
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


def _mirror(route: Route, port: int, method: str, path: str, body: bytes) -> None:
    """Istio's `mirror`: send a copy, drop the answer (fire and forget)."""
    try:
        answer = httpx.request(
            method, f"http://127.0.0.1:{port}/{path}", content=body,
            headers={"Content-Type": "application/json"}, timeout=30,
        )  # fmt: skip
    except httpx.HTTPError:
        return
    if answer.status_code == 200:
        route.mirrored += 1
