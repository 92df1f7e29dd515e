"""The compiler: a pure function from a snapshot of objects to a routing table and statuses.

No I/O, no kopf, no asyncio, no clock: the same snapshot always compiles to the same
table and the same conditions, whatever order the objects come in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from dataplane import table

from ..resources.common import Condition
from ..resources.l4listener import L4Listener
from ..resources.l7route import L7Route
from . import conditions as c
from .backends import BackendResolver, Resolution
from .cache import CompileCache, fingerprint
from .l4 import build_l4
from .l7 import RouteRefs, build_l7
from .ports import Parsed, claim_ports
from .snapshot import ROUTE_KINDS, Object, ObjectKey, Snapshot, age_key, generation
from .tls import SecretIndex

__all__ = ["CompileCache", "Compiled", "ObjectKey", "Snapshot", "compile_snapshot"]

_MODELS: dict[str, type[L4Listener] | type[L7Route]] = {
    "L4Listener": L4Listener,
    "L7Route": L7Route,
}


@dataclass(frozen=True)
class Compiled:
    """The table, every route object's conditions, and which objects the table serves."""

    table: table.Table
    statuses: dict[ObjectKey, list[Condition]]
    served: frozenset[ObjectKey] = field(default_factory=frozenset)


def compile_snapshot(
    snapshot: Snapshot, generation_number: int = 1, cache: CompileCache | None = None
) -> Compiled:
    """Compile every L4Listener and L7Route in snapshot into one table.

    cache, when given, remembers parses between calls; it changes speed, never results.
    """
    statuses: dict[ObjectKey, list[Condition]] = {}
    cache = cache or CompileCache()
    parsed = _parse_all(snapshot, statuses, cache)
    owners, refused = claim_ports(parsed)
    for p in parsed:
        if p.key in refused:
            why = refused[p.key]
            statuses[p.key] = [c.condition(c.ACCEPTED, False, why.reason, why.message, p.generation)]

    resolver = BackendResolver(snapshot)
    secrets = SecretIndex(snapshot)
    listeners: dict[int, table.Listener] = {}
    served: set[ObjectKey] = set()
    for port in sorted(owners):
        claimants = owners[port]
        if not claimants:
            continue
        first = claimants[0]
        if isinstance(first.model, L4Listener):
            resolution = resolver.resolve(
                first.key.namespace, first.model.spec.backendRefs, "spec.backendRefs"
            )
            listeners[port] = build_l4(first.model, first.key.ref, resolution)
            statuses[first.key] = _accepted(
                first, f"serving TCP on port {port}", _refs_condition(first, resolution)
            )
            served.add(first.key)
            continue
        listener, refs = build_l7(claimants, resolver, secrets, cache)
        scheme = "HTTPS" if isinstance(first.model, L7Route) and first.model.spec.tls else "HTTP"
        served_message = f"serving {scheme} on port {port}"
        if listener is None:
            served_message = f"valid, but port {port} is not served until a certificate resolves"
        for p in claimants:
            refs_condition = _route_refs_condition(p, refs[p.key.ref], listener is None)
            statuses[p.key] = _accepted(p, served_message, refs_condition)
            if listener is not None:
                served.add(p.key)
        if listener is not None:
            listeners[port] = listener

    # Built from parts that are valid by construction; the dataplane validates on receipt.
    compiled_table = table.Table.build(
        clusters=dict(sorted(resolver.clusters.items())), listeners=listeners
    ).stamped(generation_number)
    return Compiled(compiled_table, dict(sorted(statuses.items())), frozenset(served))


def _parse_all(
    snapshot: Snapshot, statuses: dict[ObjectKey, list[Condition]], cache: CompileCache
) -> list[Parsed]:
    """Valid route objects, oldest first; the invalid ones get Accepted=False."""
    by_key: dict[ObjectKey, list[Object]] = {}
    for kind in ROUTE_KINDS:
        for obj in snapshot.of_kind(kind):
            by_key.setdefault(ObjectKey.of(obj), []).append(obj)
    parsed: list[Parsed] = []
    for key, copies in by_key.items():
        # The same key twice (files): the choice must not depend on input order.
        obj = (
            copies[0]
            if len(copies) == 1
            else min(copies, key=lambda o: json.dumps(o, sort_keys=True, default=str))
        )
        print_ = fingerprint(obj)
        result = cache.get(key, print_)
        if result is None:
            try:
                result = _MODELS[key.kind].model_validate(_without_status(obj))
            except ValidationError as err:
                result = "; ".join(c.describe_validation_error(err))
            cache.put(key, print_, result)
        if isinstance(result, str):
            statuses[key] = [c.condition(c.ACCEPTED, False, c.INVALID, result, generation(obj))]
            continue
        parsed.append(Parsed(key=key, generation=generation(obj), age=age_key(obj), model=result))
    cache.retain(set(by_key))
    parsed.sort(key=lambda p: (p.age, p.key.kind))
    return parsed


def _without_status(obj: Object) -> dict[str, object]:
    return {k: v for k, v in obj.items() if k != "status"}


def _accepted(p: Parsed, message: str, refs: Condition) -> list[Condition]:
    return [c.condition(c.ACCEPTED, True, c.ACCEPTED, message, p.generation), refs]


def _refs_condition(p: Parsed, resolution: Resolution) -> Condition:
    if not resolution.problems:
        return c.condition(c.RESOLVED_REFS, True, c.RESOLVED_REFS, "all backendRefs resolved", p.generation)
    reason = c.REF_NOT_PERMITTED if resolution.not_permitted else c.BACKEND_NOT_FOUND
    return c.condition(c.RESOLVED_REFS, False, reason, "; ".join(resolution.problems), p.generation)


def _route_refs_condition(p: Parsed, refs: RouteRefs, port_dropped: bool) -> Condition:
    problems = list(refs.problems)
    if refs.certificate_problem:
        consequence = (
            "port not served: no route on it has a usable certificate"
            if port_dropped
            else "its hostnames get the port's default certificate"
        )
        problems.insert(0, f"{refs.certificate_problem} ({consequence})")
        reason = c.INVALID_CERTIFICATE_REF
    elif refs.not_permitted:
        reason = c.REF_NOT_PERMITTED
    else:
        reason = c.BACKEND_NOT_FOUND
    if not problems:
        return c.condition(c.RESOLVED_REFS, True, c.RESOLVED_REFS, "all references resolved", p.generation)
    return c.condition(c.RESOLVED_REFS, False, reason, "; ".join(problems), p.generation)
