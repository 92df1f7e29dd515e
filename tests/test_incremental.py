"""The incremental compile and table deltas against compiles from scratch.

An operator keeps one CompileCache and hands the compiler a snapshot in which unchanged
objects are the same dicts as last time; the compiler then starts from its last result.
These tests drive that path with random changes drawn from every golden case and check
each result against a fresh compile: the same statuses, the same table, the same
version; and the delta between consecutive tables turns the first into the second.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.compiler import CompileCache, ObjectKey, Snapshot, compile_snapshot
from dataplane import delta
from dataplane.table import Table

from .golden import cases, inputs, render


def _pool() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for case in cases():
        for obj in inputs(case):
            seen.setdefault(json.dumps(obj, sort_keys=True), obj)
    return [seen[k] for k in sorted(seen)]


POOL = _pool()

# A step: put pool object i (replacing the object with its key: op 0), delete that key
# (op 1), or put it with a typo (op 2: an unknown field; its last valid version serves).
PUT, DELETE, BREAK = 0, 1, 2
steps = st.lists(
    st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 2)), min_size=1, max_size=4),
    min_size=1,
    max_size=12,
)


@settings(max_examples=120, deadline=None)
@given(batches=steps)
def test_incremental_compiles_equal_fresh_ones(batches: list[list[tuple[int, int]]]) -> None:
    store: dict[ObjectKey, dict[str, Any]] = {}
    cache = CompileCache()
    previous: Table | None = None
    last_valid: Any = {}
    for generation, batch in enumerate(batches, start=1):
        for index, op in batch:
            obj = POOL[index]
            key = ObjectKey.of(obj)
            if op == DELETE:
                store.pop(key, None)
            else:
                store[key] = copy.deepcopy(obj)  # a new object, as a watch event brings
                if op == BREAK and key.kind in ("L4Listener", "L7Route"):
                    store[key]["spec"] = {**(store[key].get("spec") or {}), "typo": True}
        snapshot = Snapshot.of(store.values(), last_valid)
        compiled = compile_snapshot(snapshot, generation, cache)
        fresh = compile_snapshot(Snapshot.of(copy.deepcopy(list(store.values())), last_valid), generation)
        assert render(compiled) == render(fresh)
        assert compiled.last_valid == fresh.last_valid
        last_valid = compiled.last_valid
        table = compiled.table
        if previous is not None:
            change = delta.diff(previous, table, compiled.changes)
            patched = delta.patch(previous, delta.parse(change.to_json()))
            assert patched.to_dict() == table.to_dict()
            assert patched.version == table.version
        previous = table


def _find(predicate: Any) -> int:
    return next(i for i, obj in enumerate(POOL) if predicate(obj))


def _is(kind: str, name: str, port: int) -> Any:
    def check(obj: dict[str, Any]) -> bool:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        return bool(obj["kind"] == kind and meta["name"] == name and spec.get("port") == port)

    return check


def test_regressions_found_by_the_random_sequences() -> None:
    """Sequences that once made the incremental compile differ from a fresh one: a route
    moving to another port; an older route's port gaining an L4Listener it refuses; a
    Service that only a RequestMirror names appearing after the route; a TCP face added
    to a port that had only a UDP one."""
    moves = [[(_find(_is("L7Route", "plain", 8443)), False)], [(_find(_is("L7Route", "plain", 8080)), False)]]
    beta = _find(lambda o: o["kind"] == "L7Route" and o["metadata"]["name"] == "beta")
    joins = [[(beta, False)], [(_find(_is("L4Listener", "tcp", 8080)), False)]]
    shadow = _find(lambda o: o["kind"] == "L7Route" and o["metadata"]["name"] == "shadow")
    canary = _find(lambda o: o["kind"] == "Service" and o["metadata"]["name"] == "canary")
    mirrored = [[(shadow, False)], [(canary, False)]]
    # A port with only a UDP listener gains an L7Route: the delta tried to diff the new
    # TCP face against an old one that did not exist.
    udp = _find(lambda o: o["kind"] == "L4Listener" and (o.get("spec") or {}).get("protocol") == "UDP")
    port = POOL[udp]["spec"]["port"]
    route = _find(lambda o: o["kind"] == "L7Route" and (o.get("spec") or {}).get("port") == port)
    tcp_joins_udp = [[(udp, False)], [(route, False)]]
    for batches in (moves, joins, mirrored, tcp_joins_udp):
        test_incremental_compiles_equal_fresh_ones.hypothesis.inner_test(batches=batches)  # type: ignore[attr-defined]


def test_an_unchanged_snapshot_compiles_to_the_same_objects() -> None:
    objects = [copy.deepcopy(o) for o in inputs("l7-basic")]
    cache = CompileCache()
    first = compile_snapshot(Snapshot.of(objects), 1, cache)
    again = compile_snapshot(Snapshot.of(objects), 2, cache)
    assert again.table.listeners is first.table.listeners or again.table.listeners == first.table.listeners
    assert again.statuses == first.statuses
    assert all(again.statuses[k] is first.statuses[k] for k in first.statuses)
    assert again.changes is not None and not again.changes.ports


def test_a_new_route_changes_only_its_own_parts() -> None:
    """Among 200 routes on one port, adding one changes one rule and one host group."""
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"port": 80}]},
        }
    ]
    objects += [_route(i) for i in range(200)]
    cache = CompileCache()
    first = compile_snapshot(Snapshot.of(objects), 1, cache)
    objects.append(_route(200))
    second = compile_snapshot(Snapshot.of(objects), 2, cache)
    change = delta.diff(first.table, second.table, second.changes)
    assert sorted(str(path) for path, _ in change.changes) == [
        "listeners/8080/l7/exact/h200.example.com",
        "listeners/8080/l7/rules/shop/r200/0",
    ]
    # The unchanged parts are the same objects: nothing was rebuilt for them.
    before, after = first.table.listeners[8080].l7, second.table.listeners[8080].l7
    assert before is not None and after is not None
    assert after.rules["shop/r7/0"] is before.rules["shop/r7/0"]
    assert after.hosts.exact["h7.example.com"] is before.hosts.exact["h7.example.com"]
    assert second.table.version == Table.parse(second.table.to_json()).version


def _route(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": f"r{i}", "namespace": "shop"},
        "spec": {
            "port": 8080,
            "hostnames": [f"h{i}.example.com"],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
        },
    }
