"""The compiler: a pure function from a snapshot of objects to a routing table and statuses.

No I/O, no kopf, no asyncio, no clock: the same snapshot always compiles to the same
table and the same conditions, whatever order the objects come in.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

from dataplane import table
from dataplane.delta import Changes, carry_parts_sum
from dataplane.parts import PartPath

from ..resources.common import Condition
from .backends import BackendResolver
from .cache import CompileCache
from .parse import entry_of, parse_all, superseded_conditions, with_fallback
from .port import Context, PortResult, compile_port
from .ports import Invalid, Parsed, Slot, claim_order, references_of
from .snapshot import REFERENCE_KINDS, ROUTE_KINDS, Object, ObjectKey, Snapshot
from .tls import SecretIndex

__all__ = ["CompileCache", "Compiled", "ObjectKey", "Snapshot", "compile_snapshot"]


@dataclass(frozen=True)
class Compiled:
    """The table, every route object's conditions, and which objects the table serves.

    changes, when known, says which parts of the table differ from the previous compile's
    (see dataplane.delta.Changes): the version and the deltas to dataplanes are then
    worked out from those parts alone. last_valid is the Snapshot.last_valid to give the
    next compile: per route key, its object if it validated, else the one kept before.
    """

    table: table.Table
    statuses: dict[ObjectKey, list[Condition]]
    served: frozenset[ObjectKey] = field(default_factory=frozenset)
    changes: Changes | None = None
    last_valid: Mapping[ObjectKey, Object] = field(default_factory=dict)


@dataclass
class _State:
    """What the last compile was made of, for the next one to start from."""

    table: table.Table  # unstamped
    statuses: dict[ObjectKey, list[Condition]]
    served: frozenset[ObjectKey]
    results: dict[ObjectKey, Parsed | Invalid]  # the parse that counts, per key
    duplicates: bool  # some key came twice (files): compile everything
    ports: dict[Slot, PortResult]  # a TCP and a UDP slot may share a port number
    objects: dict[int, Object]  # the snapshot's objects by id (held, so ids stay theirs)
    # ("Service" | "Secret", namespace, name) -> the route objects that name it
    users: dict[tuple[str, str, str], set[ObjectKey]]
    last_valid: dict[ObjectKey, Object] = field(default_factory=dict)
    superseded: frozenset[ObjectKey] = frozenset()  # keys served from their last valid version


def compile_snapshot(
    snapshot: Snapshot, generation_number: int = 1, cache: CompileCache | None = None
) -> Compiled:
    """Compile every L4Listener and L7Route in snapshot into one table.

    cache, when given, remembers work between calls; it changes speed, never results. With
    a cache, a compile after a few objects changed costs about what those objects cost.
    """
    cache = cache or CompileCache()
    state: _State | None = cache.state
    compiled = _compile_changes(snapshot, cache, state) if state is not None else None
    if compiled is None:
        compiled = _compile_all(snapshot, cache, state)
    return dataclasses.replace(compiled, table=compiled.table.stamped(generation_number))


def _compile_all(snapshot: Snapshot, cache: CompileCache, state: _State | None) -> Compiled:
    parses = parse_all(snapshot, cache)
    resolver, secrets = _references(snapshot, cache)
    context = Context(resolver, secrets, cache)
    fallback = snapshot.last_valid
    results = {key: with_fallback(key, copies[0], fallback, cache) for key, copies in parses.items()}
    by_port: dict[Slot, list[Parsed]] = {}
    for result in results.values():
        if isinstance(result, Parsed):
            by_port.setdefault(result.slot, []).append(result)
    ports = {}
    previous = state.ports if state is not None else {}
    for port in sorted(by_port):
        claimants = sorted(by_port[port], key=claim_order)
        ports[port] = compile_port(port, claimants, None, context, previous.get(port))
    statuses = {key: r.conditions for key, r in results.items() if isinstance(r, Invalid)}
    served: set[ObjectKey] = set()
    for port_result in ports.values():
        statuses.update(port_result.statuses)
        served |= port_result.served
    duplicates = any(len(copies) > 1 for copies in parses.values())
    objects = dict(zip(map(id, snapshot.objects), snapshot.objects, strict=True))
    # The object each valid result came from (the copy that counts, when a key came twice).
    last_valid: dict[ObjectKey, Object] = {}
    for obj, key, result in cache.by_identity.values():
        if result is results[key] and isinstance(result, Parsed):
            last_valid[key] = obj
    superseded = frozenset(k for k, r in results.items() if isinstance(r, Parsed) and r.superseded)
    for key in superseded:
        last_valid[key] = fallback[key]
    outcome = _State(
        table.Table(),
        statuses,
        frozenset(served),
        results,
        duplicates,
        ports,
        objects,
        _users(results),
        last_valid,
        superseded,
    )
    return _finish(cache, state, outcome, None, resolver)


def _compile_changes(snapshot: Snapshot, cache: CompileCache, state: _State) -> Compiled | None:
    """The compile from the last one and the objects that changed since; None when only a
    compile of everything will do (the first, or a key came twice)."""
    if state.duplicates or cache.references is None:
        return None
    if snapshot.last_valid is not state.last_valid and (snapshot.last_valid or state.superseded):
        return None  # not the fallbacks this compile handed out: start over from them
    # Built in C (no Python loop over 11,000 objects): unchanged objects are the same dicts.
    current = dict(zip(map(id, snapshot.objects), snapshot.objects, strict=True))
    last = state.objects
    added = [current[i] for i in current.keys() - last.keys()]
    gone = [last[i] for i in last.keys() - current.keys()]
    if not added and not gone:
        changes = Changes(state.table.content_version(), {})
        return Compiled(state.table, state.statuses, state.served, changes, state.last_valid)
    known = cache.by_identity
    removed = [known[id(o)] for o in gone if o.get("kind") in ROUTE_KINDS]
    entries = [entry_of(o, cache) for o in added if o.get("kind") in ROUTE_KINDS]
    keys_removed = {entry[1] for entry in removed}
    keys_added = [entry[1] for entry in entries]
    if len(keys_added) != len(set(keys_added)):
        return None  # one key twice among the new objects
    if any(key in state.results and key not in keys_removed for key in keys_added):
        return None  # the key's old object is still there: one key twice

    # Services, EndpointSlices, Secrets and ConfigMaps: update the resolver and the secret index in
    # place, and recompile the routes that name what changed (and only those).
    resolver, secrets = cache.references[1]
    forced: set[ObjectKey] = set()
    references_gone = [o for o in gone if o.get("kind") not in ROUTE_KINDS]
    references_added = [o for o in added if o.get("kind") not in ROUTE_KINDS]
    if references_gone or references_added:
        cache.references = (None, (resolver, secrets))  # a compile of everything rebuilds them
        for name in resolver.update(references_gone, references_added):
            forced |= state.users.get(("Service", *name), set())
        for named in secrets.update(references_gone, references_added):
            forced |= state.users.get(named, set())

    by_identity = dict(known)
    for entry in removed:
        del by_identity[id(entry[0])]
    for entry in entries:
        by_identity[id(entry[0])] = entry
    cache.by_identity = by_identity
    changed = keys_removed | set(keys_added)
    results = dict(state.results)
    statuses = dict(state.statuses)
    users = state.users
    for key in changed:
        statuses.pop(key, None)
    last_valid = dict(state.last_valid)
    superseded = set(state.superseded) - changed
    touched: dict[Slot, set[ObjectKey]] = {}
    for key in keys_removed:
        old = results.pop(key, None)
        last_valid.pop(key, None)
        if isinstance(old, Parsed):
            touched.setdefault(old.slot, set()).add(key)
            _count_users(users, old, -1)
    for obj, key, parsed in entries:
        result = with_fallback(key, parsed, snapshot.last_valid, cache)
        results[key] = result
        if result is parsed:
            if isinstance(parsed, Parsed):
                last_valid[key] = obj
        elif key in snapshot.last_valid:
            last_valid[key] = snapshot.last_valid[key]
            superseded.add(key)
        if isinstance(result, Parsed):
            touched.setdefault(result.slot, set()).add(key)
            _count_users(users, result, +1)
        else:
            statuses[key] = result.conditions
    for key in forced - changed:
        kept = results.get(key)
        if isinstance(kept, Parsed):
            touched.setdefault(kept.slot, set()).add(key)
    cache.forget([key for key in changed if key not in results])
    ports = dict(state.ports)
    served = set(state.served)
    context = Context(resolver, secrets, cache, frozenset(forced))
    for port, keys in sorted(touched.items()):
        before = ports.pop(port, None)
        claimants = list(before.claimants) if before is not None else []
        if before is not None:
            served -= before.served
            for key in keys & changed:
                _remove(claimants, state.results.get(key))
        now_here: dict[ObjectKey, Parsed | None] = dict.fromkeys(keys)
        for key in keys:
            now_parsed = results.get(key)
            if isinstance(now_parsed, Parsed) and now_parsed.slot == port:
                if key in changed:
                    bisect.insort(claimants, now_parsed, key=claim_order)
                now_here[key] = now_parsed
        if claimants:
            ports[port] = compile_port(port, claimants, now_here, context, before)
    for port in touched:
        if port in ports:
            statuses.update(ports[port].statuses)
            served |= ports[port].served
    if len(ports) != len(state.ports) or any(p not in state.ports for p in touched):
        ports = dict(sorted(ports.items()))
    base = state.table.content_version()
    changed_paths: dict[int, set[PartPath] | None] = {}
    for slot in touched:
        paths = ports[slot].changed if slot in ports else None
        if slot.port in changed_paths:  # the TCP and the UDP face of one port both changed
            earlier = changed_paths[slot.port]
            paths = None if paths is None or earlier is None else paths | earlier
        changed_paths[slot.port] = paths
    changes = Changes(base, changed_paths)
    outcome = _State(
        table.Table(),
        statuses,
        frozenset(served),
        results,
        False,
        ports,
        current,
        users,
        last_valid,
        frozenset(superseded),
    )
    return _finish(cache, state, outcome, changes, resolver)


def _users(results: dict[ObjectKey, Parsed | Invalid]) -> dict[tuple[str, str, str], set[ObjectKey]]:
    users: dict[tuple[str, str, str], set[ObjectKey]] = {}
    for result in results.values():
        if isinstance(result, Parsed):
            _count_users(users, result, +1)
    return users


def _count_users(users: dict[tuple[str, str, str], set[ObjectKey]], p: Parsed, sign: int) -> None:
    """Record (sign +1) or forget (-1) that p names its Services and Secret."""
    for name in references_of(p):
        if sign > 0:
            users.setdefault(name, set()).add(p.key)
        else:
            holders = users.get(name)
            if holders is not None:
                holders.discard(p.key)
                if not holders:
                    del users[name]


def _remove(claimants: list[Parsed], old: Parsed | Invalid | None) -> None:
    """Take old out of claimants (sorted by claim order), if it is there."""
    if not isinstance(old, Parsed):
        return
    i = bisect.bisect_left(claimants, claim_order(old), key=claim_order)
    while i < len(claimants) and claim_order(claimants[i]) == claim_order(old):
        if claimants[i] is old:
            del claimants[i]
            return
        i += 1


def _finish(
    cache: CompileCache,
    state: _State | None,
    result: _State,
    changes: Changes | None,
    resolver: BackendResolver,
) -> Compiled:
    """Assemble the table from result's ports; give it its version sum from the last one's."""
    names: set[str] = set()
    for port in result.ports.values():
        names |= port.clusters
    before = state.table.clusters if state is not None else {}
    if names == before.keys() and all(resolver.clusters[n] is before[n] for n in names):
        clusters = before  # the same object: nothing to compare
    else:
        clusters = {name: resolver.clusters[name] for name in sorted(names)}
        if changes is not None:
            changes = Changes(changes.base, changes.ports, clusters=True)
    previous = state.table.listeners if state is not None else {}
    listeners: dict[int, table.Listener] = {}
    for slot, r in result.ports.items():
        if r.listener is None:
            continue
        other = listeners.get(slot.port)
        listeners[slot.port] = (
            r.listener if other is None else _both_faces(slot.port, other, r.listener, previous)
        )
    built = table.Table.build(clusters=clusters, listeners=listeners)
    if state is not None:
        carry_parts_sum(state.table, built, changes)
    for key in result.superseded:
        parsed = result.results[key]
        assert isinstance(parsed, Parsed)
        conditions = result.statuses.get(key, [])
        result.statuses[key] = superseded_conditions(parsed, conditions, key in result.served)
    result.table = built
    cache.state = result
    return Compiled(built, result.statuses, result.served, changes, result.last_valid)


def _both_faces(
    port: int, first: table.Listener, second: table.Listener, previous: dict[int, table.Listener]
) -> table.Listener:
    """One port's TCP and UDP listeners as one table listener: the previous compile's
    object when both faces are the same objects, so unchanged parts stay identical."""
    faces = {k: v for k, v in [*first.__dict__.items(), *second.__dict__.items()] if v is not None}
    kept = previous.get(port)
    same = kept is not None and all(getattr(kept, k) is v for k, v in faces.items())
    if same and kept is not None and sum(v is not None for v in kept.__dict__.values()) == len(faces):
        return kept
    return table.Listener.build(**faces)


def _references(snapshot: Snapshot, cache: CompileCache) -> tuple[BackendResolver, SecretIndex]:
    """The backend resolver and secret index, rebuilt only when a Service, EndpointSlice,
    Secret or ConfigMap changed (they are rarely the objects that change)."""
    objects = tuple(o for o in snapshot.objects if o.get("kind") in REFERENCE_KINDS)
    kept = cache.references
    same = kept is not None and kept[0] is not None and len(kept[0]) == len(objects)
    if same and kept is not None and kept[0] is not None and all(map(operator.is_, kept[0], objects)):
        return kept[1]
    references = Snapshot(objects)
    secrets = SecretIndex(references)
    built = (BackendResolver(references, secrets), secrets)
    cache.references = (objects, built)
    return built
