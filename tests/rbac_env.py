"""What tests/test_rbac.py needs around the real kube-apiserver: the shipped manifests (read as
kustomize lists them, applied with kubectl), a token of each service account (TokenRequest API)
in a kubeconfig of its own, editing one Role and waiting until the API server's authorizer acts
on the edit, and a TEST-SIDE STAND-IN for the one part of a kubelet the API server calls to read a
container's log (there is no kubelet here)."""

from __future__ import annotations

import copy
import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deployments" / "kubernetes"
MERGE = {"Content-Type": "application/merge-patch+json"}
NOW = {"gracePeriodSeconds": "0"}  # a pod on a node waits for its kubelet to confirm otherwise


def documents(folder: Path = MANIFESTS) -> Iterator[dict[str, Any]]:
    """Every object the kustomization in `folder` lists (files and folders, recursively)."""
    listed = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for entry in listed.get("resources", []):
        path = folder / entry
        if path.is_dir():
            yield from documents(path)
        else:
            yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def rules(folder: Path = MANIFESTS) -> list[tuple[str, int, str]]:
    """(Role, index of the rule, verb): every verb of every rule the manifests grant."""
    found = []
    for doc in documents(folder):
        if doc["kind"] == "Role":
            for index, rule in enumerate(doc["rules"]):
                found += [(doc["metadata"]["name"], index, verb) for verb in rule["verbs"]]
    return found


def kubectl_apply(kubeconfig: Path, folder: Path) -> str:
    """`kubectl apply -k FOLDER`, as README says; returns its output."""
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-k", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def token_kubeconfig(kube: httpx.Client, api: Any, namespace: str, account: str) -> dict[str, Any]:
    """A kubeconfig that authenticates with a fresh token of the service account (what a pod
    running as it holds)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    url = f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"
    answer = kube.post(url, json=request)
    assert answer.status_code == 201, answer.text
    cluster = {"server": api.url, "certificate-authority": str(api.pki / "ca.crt")}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": account,
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": answer.json()["status"]["token"]}}],
        "contexts": [{"name": account, "context": {"cluster": "test", "user": account}}],
    }


def role_url(namespace: str, name: str) -> str:
    return f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}"


def without(role: dict[str, Any], index: int, verb: str) -> dict[str, Any]:
    """`role` with `verb` taken out of rule `index` (the rule goes when no verb is left)."""
    edited = copy.deepcopy(role)
    rule = edited["rules"][index]
    rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    if not rule["verbs"]:
        del edited["rules"][index]
    return edited


def put_role(kube: httpx.Client, role: dict[str, Any], user: str) -> None:
    """Replace the Role and wait until the authorizer answers by it, for every verb of every rule
    of the stored Role and the new one (RBAC's cache follows a watch: not at once)."""
    meta = role["metadata"]
    url = role_url(meta["namespace"], meta["name"])
    current = kube.get(url).json()
    body = {**role, "metadata": {**current["metadata"], "labels": meta.get("labels", {})}}
    answer = kube.put(url, json=body)
    assert answer.status_code == 200, answer.text
    granted = {_key(r, v) for r in role["rules"] for v in r["verbs"]}
    checks = granted | {_key(r, v) for r in current["rules"] for v in r["verbs"]}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(allowed(kube, user, meta["namespace"], *k) == (k in granted) for k in checks):
            return
        time.sleep(0.05)
    raise AssertionError(f"the authorizer did not follow the edit of Role {meta['name']}")


def unbind_others(
    kube: httpx.Client, namespace: str, role: str, account: str
) -> list[dict[str, Any]]:
    """Delete the RoleBindings in `namespace` that give `account` any Role but `role` (another
    deployer's Role may grant the same verb); returns them for `rebind`."""
    url = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"
    removed = []
    for binding in kube.get(url).json()["items"]:
        names = {s["name"] for s in binding.get("subjects") or [] if s["kind"] == "ServiceAccount"}
        if account in names and binding["roleRef"]["name"] != role:
            kube.delete(f"{url}/{binding['metadata']['name']}")
            meta = binding["metadata"]
            kept = {"name": meta["name"], "namespace": namespace, "labels": meta.get("labels", {})}
            removed.append({**binding, "metadata": kept})
    return removed


def rebind(kube: httpx.Client, bindings: list[dict[str, Any]]) -> None:
    for binding in bindings:
        url = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{binding['metadata']['namespace']}"
        created = kube.post(f"{url}/rolebindings", json=binding)
        assert created.status_code == 201, created.text


def _key(rule: dict[str, Any], verb: str) -> tuple[str, str, str, str]:
    name = (rule.get("resourceNames") or [""])[0]
    return verb, rule["resources"][0], rule["apiGroups"][0], name


def allowed(
    kube: httpx.Client,
    user: str,
    namespace: str,
    verb: str,
    resource: str,
    group: str,
    name: str = "",
) -> bool:
    """What the API server's authorizer answers for `user` (a SubjectAccessReview)."""
    resource, _, sub = resource.partition("/")
    attributes = {
        "namespace": namespace,
        "verb": verb,
        "resource": resource,
        "group": group,
        "subresource": sub,
        "name": name,
    }
    groups = [
        "system:serviceaccounts",
        f"system:serviceaccounts:{user.split(':')[2]}",
        "system:authenticated",
    ]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": attributes},
    }
    answer = kube.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    return bool(answer.json()["status"].get("allowed"))


def predictor_pod(
    kube: httpx.Client, node: str, namespace: str, name: str, labels: dict[str, str], container: str
) -> None:
    """STAND-IN for the ReplicaSet controller and scheduler: a predictor pod `name` on the
    stand-in kubelet's `node`, labelled as the serving controller labels its Deployment's pods,
    with the model container the deployer reads the log of."""
    pod = {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": container, "image": "model-server"}]},
    }
    created = kube.post(f"/api/v1/namespaces/{namespace}/pods", json=pod)
    assert created.status_code == 201, created.text


def clean(kube: httpx.Client, namespace: str, served: str, named: list[str], label: str) -> None:
    """As admin, after a lifecycle: delete every serving resource (`served`, its collection's
    URL), the `named` objects (URLs) and the pods labelled `label`; then wait until the stand-in
    controller has finished with them (a finalizer gone, the Deployments it made, labelled
    `label`, removed), so the next lifecycle's resource of the same name is a new one to it."""
    for item in kube.get(served).json()["items"]:
        kube.delete(f"{served}/{item['metadata']['name']}")
    for url in named:
        kube.delete(url)
    kube.delete(f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": label, **NOW})
    deployments = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    deadline = time.monotonic() + 30
    while (
        kube.get(served).json()["items"]
        or kube.get(deployments, params={"labelSelector": label}).json()["items"]
    ):
        assert time.monotonic() < deadline, f"the stand-in controller left {served} or Deployments"
        time.sleep(0.1)


class LogTap(logging.Handler):
    """Keeps every log record of the loggers it is added to (the worker's and kopf's)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]}"
        self.lines.append(text)

    def refusals(self) -> list[str]:
        return [line for line in self.lines if "forbidden" in line.lower()]


class KubeletLogs:
    """TEST-SIDE KUBELET STAND-IN, the log endpoint only: a Node whose kubelet address is this
    HTTPS server on 127.0.0.1, answering `/containerLogs/{namespace}/{pod}/{container}` with a
    fixed text, as the API server proxies `pods/log` to the pod's kubelet."""

    TEXT = "flow run started\nflow run crashed: the pod's own words\n"

    def __init__(self, kube: httpx.Client, pki: Path, node: str = "ctcd-standin") -> None:
        self.node, self.requests = node, []
        requests, text = self.requests, self.TEXT.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / "server.crt", pki / "server.key")  # SAN 127.0.0.1
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.server.server_address[1]}},
        }
        created = kube.post("/api/v1/nodes", json={"metadata": {"name": node}})
        assert created.status_code in (201, 409), created.text
        url = f"/api/v1/nodes/{node}/status"
        patched = kube.patch(url, content=json.dumps({"status": status}), headers=MERGE)
        assert patched.status_code == 200, patched.text

    def stop(self, kube: httpx.Client) -> None:
        kube.delete(f"/api/v1/nodes/{self.node}")
        self.server.shutdown()
        self.server.server_close()
