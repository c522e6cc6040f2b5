"""The `InferenceService` CRD (serving.kserve.io/v1beta1) for the test API server, its OpenAPI
schema GENERATED from the `kserve` SDK's own typed models (`V1beta1InferenceService` and every
model it references, through `openapi_types` and `attribute_map`; the Kubernetes core types
they name come from the `kubernetes` client's models, which the SDK depends on).

Run with the kserve venv's Python (tests/kserve_env.py does): `python kserve_crd.py OUT.json`.
It imports nothing from ctcd.

Where the SDK's Python shape is not the JSON shape, the schema follows the JSON the API
server sees (KServe's Go types marshal these specially):
- `KnativeURL` is a string (Go's `apis.URL` marshals as one), `KnativeVolatileTime` and
  `V1Time` are date-time strings;
- `ResourceQuantity`, `V1beta1MetricQuantity`, and the values of `limits`, `requests` and
  `overhead` are Kubernetes quantities: `x-kubernetes-int-or-string`;
- `object` (only the IntOrString ports of probes' `httpGet`/`tcpSocket`) is int-or-string;
- `K8sIoApi<Group><Version><Kind>` names the Kubernetes client's `<Version><Kind>`.
`x-kubernetes-preserve-unknown-fields` is used only where the SDK names a type it does not
ship (`KnativeDevServingPkgApisServingV1TrafficTarget`, a Knative status field); the script
lists every such place in the CRD's annotation `ctcd.io/open-schema-at` so it is never hidden.
The root `metadata` is `type: object`, as Kubernetes requires of a CRD schema.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from typing import Any

INT_OR_STRING = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
}
SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string", "format": "date-time"},
    "date": {"type": "string", "format": "date"},
    "KnativeURL": {"type": "string"},
    "KnativeVolatileTime": {"type": "string", "format": "date-time"},
    "V1Time": {"type": "string", "format": "date-time"},
    "ResourceQuantity": INT_OR_STRING,
    "V1beta1MetricQuantity": INT_OR_STRING,
    "object": INT_OR_STRING,
}
QUANTITY_MAPS = {"limits", "requests", "overhead"}


class Generator:
    def __init__(self) -> None:
        import kserve.models as kserve_models
        import kubernetes.client.models as kube_models

        self.modules = [kserve_models, kube_models]
        self.open: list[str] = []

    def model(self, name: str) -> Any:
        name = re.sub(r"^K8sIoApi[A-Z][a-z]+(V\d)", r"\1", name)
        for module in self.modules:
            if (cls := getattr(module, name, None)) is not None:
                return cls
        try:  # some SDK models are not re-exported by kserve.models
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
            return getattr(importlib.import_module(f"kserve.models.{snake}"), name)
        except (ImportError, AttributeError):
            return None

    def schema(self, kind: str, path: str, stack: tuple[str, ...] = ()) -> dict[str, Any]:
        if kind in SCALARS:
            return dict(SCALARS[kind])
        if m := re.fullmatch(r"[Ll]ist\[(.+)\]", kind):
            return {"type": "array", "items": self.schema(m.group(1), f"{path}[]", stack)}
        if m := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", kind):
            value = m.group(1) or m.group(2)
            leaf = path.rsplit(".", 1)[-1]
            inner = (
                INT_OR_STRING if leaf in QUANTITY_MAPS else self.schema(value, f"{path}{{}}", stack)
            )
            return {"type": "object", "additionalProperties": dict(inner)}
        cls = self.model(kind)
        if cls is None or kind in stack:
            self.open.append(f"{path} ({kind})")
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        properties = {
            cls.attribute_map[attr]: self.schema(
                sub, f"{path}.{cls.attribute_map[attr]}", (*stack, kind)
            )
            for attr, sub in cls.openapi_types.items()
        }
        return {"type": "object", "properties": properties}


def crd() -> dict[str, Any]:
    gen = Generator()
    spec = gen.schema("V1beta1InferenceServiceSpec", "spec")
    status = gen.schema("V1beta1InferenceServiceStatus", "status")
    root = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    printer = [
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "inferenceservices.serving.kserve.io",
            "annotations": {"ctcd.io/open-schema-at": "; ".join(gen.open) or "nowhere"},
        },
        "spec": {
            "group": "serving.kserve.io",
            "scope": "Namespaced",
            "names": {
                "kind": "InferenceService",
                "listKind": "InferenceServiceList",
                "plural": "inferenceservices",
                "singular": "inferenceservice",
                "shortNames": ["isvc"],
            },
            "versions": [
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer,
                }
            ],
        },
    }


if __name__ == "__main__":
    with open(sys.argv[1], "w") as out:
        json.dump(crd(), out)
