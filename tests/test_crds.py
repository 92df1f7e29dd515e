"""The CRDs: generated from the models, committed, structural, helpful to kubectl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import crdgen
from controlplane.resources.l4listener import L4Listener

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_committed_crds_match_the_models(name: str) -> None:
    expected = crdgen.render(crdgen.all_crds()[name])
    for folder in ("crds", "helm/bilayer/crds"):
        committed = (ROOT / folder / name).read_text()
        assert committed == expected, f"{folder}/{name} is stale: run `make crds`"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += walk(value, f"{path}.{key}")
        if "items" in node:
            found += walk(node["items"], f"{path}[]")
    return found


@pytest.mark.parametrize("name", sorted(crdgen.all_crds()))
def test_schemas_are_structural_and_described(name: str) -> None:
    crd = crdgen.all_crds()[name]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "anyOf", "additionalProperties", "title", "$defs"):
        assert forbidden not in text
    for path, node in walk(schema["properties"]["spec"], "spec"):
        open_ = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert "type" in node or open_, f"{path} has no type"
        scalar_item = path.endswith("[]") and node.get("type") != "object"
        assert node.get("description") or scalar_item, f"{path} has no description for kubectl explain"
    assert version["subresources"] == {"status": {}}
    names = crd["spec"]["names"]
    assert names["categories"] == ["bilayer"]
    assert names["shortNames"] == [{"l4listeners.yaml": "l4l", "l7routes.yaml": "l7r"}[name]]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[0] == "Port" and columns[-3:] == ["Accepted", "Programmed", "Age"]


def with_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """obj with the schema's defaults filled in where absent, as the API server stores it."""
    if not isinstance(obj, dict) or "properties" not in schema:
        if isinstance(obj, list) and "items" in schema:
            return [with_defaults(item, schema["items"]) for item in obj]
        return obj
    out = dict(obj)
    for key, sub in schema["properties"].items():
        if key not in out and "default" in sub:
            out[key] = sub["default"]
        if key in out:
            out[key] = with_defaults(out[key], sub)
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"port": 53, "protocol": "UDP", "backendRefs": [{"name": "dns", "port": 53}]},
        {"port": 53, "backendRefs": [{"name": "dns", "port": 53}]},
        {"port": 443, "hostnames": ["a.example.com"], "backendRefs": [{"name": "web", "port": 443}]},
    ],
    ids=["udp", "tcp", "passthrough"],
)
def test_the_crd_defaults_keep_a_listener_valid(spec: dict[str, Any]) -> None:
    """The API server writes the CRD's defaults into the stored object: they must be valid
    for every protocol (a default maxConnections made every UDP listener Invalid)."""
    schema = crdgen.all_crds()["l4listeners.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stored = with_defaults({"spec": spec}, schema)
    L4Listener.model_validate(
        {"apiVersion": "bilayer.dev/v1alpha1", "kind": "L4Listener", "metadata": {"name": "x"}, **stored}
    )
