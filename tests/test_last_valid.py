"""A typo never takes a route down: an object whose newer version does not validate is
compiled from its last valid version (Snapshot.last_valid), and its status says so."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane import status
from controlplane.compiler import CompileCache, Compiled, ObjectKey, Snapshot, compile_snapshot

SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"ports": [{"port": 80}]},
}


def l7(generation: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": "web", "namespace": "shop", "generation": generation},
        "spec": {
            "port": 8080,
            "hostnames": ["shop.example.com"],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
            **spec,
        },
    }


def l4(generation: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": "db", "namespace": "shop", "generation": generation},
        "spec": {"port": 5432, "backendRefs": [{"name": "web", "port": 80}], **spec},
    }


class Operator:
    """What CompileLoop does: hand each compile the last_valid the one before returned."""

    def __init__(self) -> None:
        self.cache = CompileCache()
        self.last_valid: Any = {}
        self.generation = 0

    def compile(self, *objects: dict[str, Any]) -> Compiled:
        self.generation += 1
        snapshot = Snapshot.of([copy.deepcopy(o) for o in (SERVICE, *objects)], self.last_valid)
        compiled = compile_snapshot(snapshot, self.generation, self.cache)
        fresh = compile_snapshot(Snapshot.of(copy.deepcopy(list(snapshot.objects)), self.last_valid))
        assert compiled.table.version == fresh.table.version and compiled.statuses == fresh.statuses
        self.last_valid = compiled.last_valid
        return compiled


def conditions(compiled: Compiled, kind: str, name: str) -> dict[str, Any]:
    return {c.type: c for c in compiled.statuses[ObjectKey(kind, "shop", name)]}


@pytest.mark.parametrize(
    ("make", "kind", "name", "typo"),
    [
        (l7, "L7Route", "web", {"hostname": ["shop.example.com"]}),  # unknown field
        (l4, "L4Listener", "db", {"port": 70000}),  # out of range
    ],
)
def test_an_invalid_update_keeps_the_last_valid_generation_served(
    make: Any, kind: str, name: str, typo: dict[str, Any]
) -> None:
    operator = Operator()
    good = operator.compile(make(1))
    port = next(iter(good.table.listeners))
    broken = operator.compile(make(2, **typo))
    assert broken.table.listeners == good.table.listeners  # still served, as generation 1
    assert ObjectKey(kind, "shop", name) in broken.served
    accepted = conditions(broken, kind, name)["Accepted"]
    assert (accepted.status, accepted.reason, accepted.observedGeneration) == ("False", "Invalid", 2)
    assert accepted.message.endswith("Until this is fixed, generation 1 is still served")
    assert "spec." in accepted.message
    others = [c for c in broken.statuses[ObjectKey(kind, "shop", name)] if c.type != "Accepted"]
    assert others and all(c.observedGeneration == 1 for c in others)
    # Programmed, which the operator adds, speaks of the generation served too.
    programmed = status.programmed(broken, ObjectKey(kind, "shop", name), 1, 1)
    assert (programmed.status, programmed.observedGeneration) == ("True", 1)
    # Broken again differently: still generation 1.
    again = operator.compile(make(3, **typo, extra=1))
    assert again.table.listeners == good.table.listeners
    assert conditions(again, kind, name)["Accepted"].observedGeneration == 3
    # Fixed: the new generation serves, and is the next fallback.
    fixed = operator.compile(make(4))
    assert conditions(fixed, kind, name)["Accepted"].status == "True"
    assert port in fixed.table.listeners
    # Deleted: gone, fallback and all.
    gone = operator.compile()
    assert port not in gone.table.listeners and not gone.last_valid
    # Created invalid: nothing to fall back to.
    new = operator.compile(make(1, **typo))
    assert port not in new.table.listeners
    assert not conditions(new, kind, name)["Accepted"].message.endswith("still served")


def test_without_last_valid_an_invalid_object_is_not_served() -> None:
    """`bilayer validate` and one-shot compiles pass no fallback: they report the object."""
    compiled = compile_snapshot(Snapshot.of([SERVICE, l7(2, hostname=[])]))
    assert not compiled.table.listeners
    assert conditions(compiled, "L7Route", "web")["Accepted"].reason == "Invalid"


def test_a_fallback_that_is_not_served_says_nothing_about_serving() -> None:
    """The last valid version lost its port to an older object: the status does not claim
    it serves."""
    operator = Operator()
    older = l4(1)
    older["metadata"] |= {"name": "first", "creationTimestamp": "2026-01-01T00:00:00Z"}
    route = l7(1, port=5432)
    route["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    operator.compile(route)
    broken_route = l7(2, port=5432, hostname=[])
    broken_route["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    compiled = operator.compile(older, broken_route)
    accepted = conditions(compiled, "L7Route", "web")["Accepted"]
    assert accepted.reason == "Invalid" and not accepted.message.endswith("still served")
    assert ObjectKey("L7Route", "shop", "web") not in compiled.served


def test_a_fallback_handed_by_someone_else_compiles_everything() -> None:
    """The incremental compile trusts only the last_valid it handed out; another mapping
    (a restarted loop, a test) is compiled from scratch, with the same result."""
    operator = Operator()
    operator.compile(l7(1))
    foreign = dict(operator.last_valid)
    snapshot = Snapshot.of([SERVICE, l7(2, hostname=[])], foreign)
    incremental = compile_snapshot(snapshot, 3, operator.cache)
    fresh = compile_snapshot(snapshot, 3)
    assert incremental.table.version == fresh.table.version and incremental.table.listeners
