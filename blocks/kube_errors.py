"""The Kubernetes API server's refusals (HTTP 401, 403) as errors a platform team can act on:
who asked, which verb on which resource (with its API group) in which namespace was refused,
and which Role of `deployments/kubernetes/` grants it. Every deployer's API calls go through
`refused`."""

from __future__ import annotations

import json
import re
from typing import Any

from ctcd.exceptions import KubernetesAccessError

MANIFESTS = "deployments/kubernetes"
# The API server's RBAC message: `secrets "x" is forbidden: User "u" cannot update resource
# "secrets" in API group "" in the namespace "ns"` (or `at the cluster scope`).
_FORBIDDEN = re.compile(
    r'(?:^\S+ "(?P<name>[^"]+)" is forbidden: )?.*User "(?P<user>[^"]*)" cannot (?P<verb>\S+) '
    r'resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]+)")?'
)


def role_of(deployer: str) -> tuple[str, str]:
    """(Role name, folder) granting what `deployer` (`seldon`, `kserve`) needs."""
    return f"ctcd-{deployer}-deployer", f"{MANIFESTS}/{deployer}/"


def refused(err: Any, deployer: str) -> KubernetesAccessError | None:
    """The error to raise for the `ApiException` `err` when the API server refused the request
    (401: the credentials; 403: RBAC), naming the fix in `deployer`'s Role; None otherwise."""
    status = getattr(err, "status", None)
    if status == 401:
        return KubernetesAccessError(
            "the credentials (HTTP 401 Unauthorized: an expired token, or one of another cluster)",
            "Check the deployer's `cluster_config` (or KUBECONFIG, or the pod's service account).",
        )
    if status != 403:
        return None
    message = _message(err)
    found = _FORBIDDEN.search(message)
    if found is None:
        return KubernetesAccessError(f"a request: {message or err}", _fix(deployer, None))
    part = found.groupdict()
    group = part["group"]
    where = f'in namespace "{part["namespace"]}"' if part["namespace"] else "cluster-wide"
    what = f"`{part['verb']}` on {part['resource']} (API group {_group(group)})"
    if part["name"]:
        what += f' named "{part["name"]}"'
    return KubernetesAccessError(
        f"{part['user']} {what} {where}",
        _fix(deployer, part),
        part["verb"],
        part["resource"],
        group,
        part["namespace"] or "",
    )


def _message(err: Any) -> str:
    try:
        return str(json.loads(err.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def _group(group: str) -> str:
    return f'"{group}"' if group else '"" (core)'


def _fix(deployer: str, part: dict[str, str | None] | None) -> str:
    role, folder = role_of(deployer)
    where = f'namespace "{part["namespace"]}"' if part and part["namespace"] else "that namespace"
    fix = (
        f"The Role {role} ({folder}) grants what the {deployer} deployer needs: apply it in "
        f"{where} and bind it to the service account the flow runs as (`kubectl apply -k "
        f"{MANIFESTS}`; {MANIFESTS}/serving-namespace/ when models are served outside the "
        "flows' namespace)."
    )
    if part and part["name"]:
        fix += f' A rule limited to resourceNames must list "{part["name"]}".'
    return fix
