"""Two installs, one cluster: each serves the routes of its class and leaves the rest alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.cli import main
from controlplane.compiler import ObjectKey, compile_snapshot
from controlplane.compiler.snapshot import ROUTE_KINDS
from controlplane.files import FileSource
from controlplane.resources import L4Listener, L7Route
from controlplane.resources.classes import CLASSED_KINDS, DEFAULT_CLASS, class_of, in_class
from controlplane.store import Store

SERVICE = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8081}]},
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8081}],
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
    },
]


def route(name: str, class_name: str | None, port: int = 8080, stamp: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"port": port, "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
    if class_name is not None:
        spec["className"] = class_name
    metadata: dict[str, Any] = {"name": name, "namespace": "shop", "generation": 1}
    if stamp:
        metadata["creationTimestamp"] = stamp
    return {"apiVersion": "bilayer.dev/v1alpha1", "kind": "L7Route", "metadata": metadata, "spec": spec}


def listener(name: str, class_name: str | None, port: int = 8080) -> dict[str, Any]:
    spec: dict[str, Any] = {"port": port, "backendRefs": [{"name": "web", "port": 80}]}
    if class_name is not None:
        spec["className"] = class_name
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": spec,
    }


def test_an_object_without_class_belongs_to_the_default_class_only() -> None:
    assert CLASSED_KINDS == ROUTE_KINDS
    assert class_of(route("a", None)) == DEFAULT_CLASS
    assert in_class(route("a", None), "bilayer") and not in_class(route("a", None), "internal")
    assert in_class(route("a", "internal"), "internal") and not in_class(route("a", "internal"), "bilayer")
    # Services and the rest serve routes of every class.
    assert in_class(SERVICE[0], "internal") and in_class(SERVICE[0], "bilayer")
    # A malformed className (files only: the CRD refuses it) names no class: the default
    # install compiles the object and says it is invalid, rather than skipping it silently.
    assert class_of(route("a", "Not_A_Label")) == DEFAULT_CLASS


@pytest.mark.parametrize("value", ["Internal", "in_ternal", "-x", "x-", "", "a" * 64, "a.b"])
def test_the_models_refuse_a_class_that_is_not_a_dns_label(value: str) -> None:
    with pytest.raises(ValidationError):
        L7Route.model_validate(route("a", value))
    with pytest.raises(ValidationError):
        L4Listener.model_validate(listener("a", value))
    L7Route.model_validate(route("a", "internal-2"))
    L4Listener.model_validate(listener("a", "x"))


def test_each_store_compiles_its_own_class_and_both_own_the_same_port() -> None:
    """Port conflicts are decided within a class: the external and the internal route on
    8080 are each accepted, by their own install."""
    objects = [*SERVICE, route("external", None, stamp="2024-01-01T00:00:00Z"), route("internal", "internal")]
    results = {}
    for class_name in ("bilayer", "internal"):
        store = Store(class_name)
        for obj in objects:
            store.apply(obj["kind"], "ADDED", obj)
        results[class_name] = compile_snapshot(store.snapshot())
    external, internal = results["bilayer"], results["internal"]
    assert set(external.statuses) == {ObjectKey("L7Route", "shop", "external")}
    assert set(internal.statuses) == {ObjectKey("L7Route", "shop", "internal")}
    for compiled in (external, internal):
        (accepted, *_) = next(iter(compiled.statuses.values()))
        assert accepted.status == "True", accepted
        assert list(compiled.table.listeners) == [8080]


def test_an_object_that_moves_to_another_class_leaves_the_table_as_if_deleted() -> None:
    store = Store("bilayer")
    store.apply("L7Route", "ADDED", route("web", None))
    key = ObjectKey("L7Route", "shop", "web")
    assert store.holds(key)
    assert store.apply("L7Route", "MODIFIED", route("web", "internal"))  # the table changes
    assert not store.holds(key) and store.snapshot().objects == ()
    # From then on its events are not news, whatever they change.
    assert not store.apply("L7Route", "MODIFIED", route("web", "internal", port=9090))
    # Back in our class: ours again.
    assert store.apply("L7Route", "MODIFIED", route("web", "bilayer"))
    assert store.holds(key)


def test_a_relist_holds_only_our_class_and_drops_what_left_it() -> None:
    store = Store("internal")
    store.replace_all("L4Listener", [listener("a", "internal"), listener("b", None), listener("c", "x")])
    assert [o["metadata"]["name"] for o in store.snapshot().objects] == ["a"]
    assert store.replace_all("L4Listener", [listener("a", "other")])
    assert store.snapshot().objects == ()


def test_the_file_source_reads_one_class(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        "\n---\n".join(json.dumps(o) for o in [*SERVICE, route("ext", None), route("int", "internal")])
    )
    default = FileSource(tmp_path)
    default.reload()
    assert [o["metadata"]["name"] for o in default.snapshot().of_kind("L7Route")] == ["ext"]
    assert default.other_classes == [ObjectKey("L7Route", "shop", "int")]
    internal = FileSource(tmp_path, "internal")
    internal.reload()
    assert [o["metadata"]["name"] for o in internal.snapshot().of_kind("L7Route")] == ["int"]
    every = FileSource(tmp_path, None)
    every.reload()
    assert len(every.snapshot().of_kind("L7Route")) == 2 and every.other_classes == []


def test_the_cli_takes_a_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "routes.yaml").write_text(
        "\n---\n".join(json.dumps(o) for o in [*SERVICE, route("ext", None), route("int", "internal")])
    )
    assert main(["validate", "-f", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok: 1 objects valid" in out and "1 objects of other classes not checked" in out
    assert main(["compile", "-f", str(tmp_path), "--class", "internal", "--statuses"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["L7Route shop/int"]
    with pytest.raises(SystemExit):
        main(["compile", "-f", str(tmp_path), "--class", "Bad_Class"])
    assert "not a class name" in capsys.readouterr().err
