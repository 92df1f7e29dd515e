"""The CRDs: generated from the models, committed, structural, helpful to kubectl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import crdgen

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
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        scalar_item = path.endswith("[]") and node.get("type") != "object"
        assert node.get("description") or scalar_item, f"{path} has no description for kubectl explain"
    assert version["subresources"] == {"status": {}}
    names = crd["spec"]["names"]
    assert names["categories"] == ["bilayer"]
    assert names["shortNames"] == [{"l4listeners.yaml": "l4l", "l7routes.yaml": "l7r"}[name]]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[0] == "Port" and columns[-3:] == ["Accepted", "Programmed", "Age"]
