"""Generate the CustomResourceDefinitions in crds/ from the pydantic models.

Kubernetes wants *structural* OpenAPI v3: no ``$ref``, no ``anyOf`` with null, no
``additionalProperties: false``. Pydantic's JSON schema has all three, so this module
inlines references, unwraps optionals and keeps the descriptions that make
``kubectl explain`` useful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .resources import API_GROUP, API_VERSION
from .resources.common import Status
from .resources.l4listener import L4ListenerSpec
from .resources.l7route import L7RouteSpec

_DROP = {"title", "additionalProperties"}
_KEEP_SCALAR_DEFAULT = (str, int, float, bool)


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            outer = {k: v for k, v in node.items() if k != "anyOf"}
            return _structural({**options[0], **outer}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default":
            # Only scalar defaults go in the CRD; the compiler applies the rest. Object
            # defaults in a CRD would be written into every stored object.
            if isinstance(value, _KEEP_SCALAR_DEFAULT) and value is not None:
                out[key] = value
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
            continue
        out[key] = _structural(value, defs)
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _structural(raw, defs)
    return result


def _condition_column(kind: str) -> dict[str, Any]:
    return {
        "name": kind,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{kind}")].status',
        "description": f"The {kind} condition.",
    }


def crd(
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    middle_columns: list[dict[str, Any]],
) -> dict[str, Any]:
    """A CustomResourceDefinition for one kind."""
    schema = {
        "type": "object",
        "description": spec_model.__doc__ or kind,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "bilayer.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind},
            "metadata": {"type": "object"},
            "spec": model_schema(spec_model),
            "status": model_schema(Status),
        },
    }
    columns = [
        {
            "name": "Port",
            "type": "integer",
            "jsonPath": ".spec.port",
            "description": "Listening port.",
        },
        {
            # Empty for objects without className: the default class serves those.
            "name": "Class",
            "type": "string",
            "jsonPath": ".spec.className",
            "description": "The install that serves this object (empty: the default class, bilayer).",
        },
        *middle_columns,
        _condition_column("Accepted"),
        _condition_column("Programmed"),
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["bilayer"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """Every CRD by file name."""
    return {
        "l4listeners.yaml": crd(
            "L4Listener",
            "l4listeners",
            "l4l",
            L4ListenerSpec,
            [
                {
                    "name": "Backends",
                    "type": "string",
                    "jsonPath": ".spec.backendRefs[*].name",
                    "description": "Services receiving the connections.",
                }
            ],
        ),
        "l7routes.yaml": crd(
            "L7Route",
            "l7routes",
            "l7r",
            L7RouteSpec,
            [
                {
                    "name": "Hostnames",
                    "type": "string",
                    "jsonPath": ".spec.hostnames",
                    "description": "Hosts served (empty: any).",
                },
                {
                    "name": "TLS",
                    "type": "string",
                    "jsonPath": ".spec.tls.secretName",
                    "description": "Certificate Secret when TLS is terminated.",
                    "priority": 1,
                },
            ],
        ),
    }


HEADER = "# Generated by `bilayer crds` from the models in operator/controlplane/resources. Do not edit.\n"


def render(document: dict[str, Any]) -> str:
    """A CRD as the YAML text committed in crds/."""
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=100)


def write(directory: Path) -> list[Path]:
    """Write every CRD into directory; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in all_crds().items():
        path = directory / name
        path.write_text(render(document))
        written.append(path)
    return written
