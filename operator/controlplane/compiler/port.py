"""One port's share of a compile: who owns it, its listener, its objects' conditions.

A port is compiled from scratch, or from its previous result and the objects that
changed on it: while the oldest claimant stays, the verdicts on the others stand, and an
HTTP port's listener is updated route by route (l7.L7Port).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dataplane import table
from dataplane.parts import PartPath

from ..resources.common import Condition
from ..resources.l4listener import L4Listener
from ..resources.l7route import L7Route
from . import conditions as c
from .backends import BackendResolver, Resolution
from .cache import CompileCache
from .l4 import build_l4, build_udp
from .l7 import L7Port, RouteRefs, http2_note
from .ports import Parsed, Refusal, Slot, claim_port, verdict
from .snapshot import ObjectKey
from .sni import HOSTNAME_CONFLICT, index_hostnames, served_message
from .tls import SecretIndex


@dataclass
class PortResult:
    """What a port contributes to the table and to the statuses."""

    claimants: list[Parsed]  # every valid object naming the port, oldest first
    refused: dict[ObjectKey, Refusal]
    listener: table.Listener | None
    statuses: dict[ObjectKey, list[Condition]]
    served: set[ObjectKey]
    clusters: frozenset[str]  # the clusters the listener names
    message: str = ""  # the Accepted message of its owners
    l7: L7Port | None = None
    # The table parts under this port that changed since the previous result; None when
    # not known (compare the whole listener).
    changed: set[PartPath] | None = field(default=None)


@dataclass(frozen=True)
class Context:
    """What every port of one compile reads: references and the memo."""

    resolver: BackendResolver
    secrets: SecretIndex
    cache: CompileCache
    # Objects whose references changed: their memoized results must be checked again.
    force: frozenset[ObjectKey] = frozenset()


def compile_port(
    slot: Slot,
    claimants: list[Parsed],
    changed: dict[ObjectKey, Parsed | None] | None,
    context: Context,
    previous: PortResult | None,
) -> PortResult:
    """The port's result. changed names the objects that may differ from previous, with
    what each is now on this port (None: it left); changed None: any may. The result
    equals a compile from scratch either way."""
    port = slot.port
    cache = context.cache
    oldest = claimants[0]
    incremental = (
        changed is not None
        and previous is not None
        and previous.l7 is not None
        and previous.claimants[0] is oldest
        and isinstance(oldest.model, L7Route)
    )
    if incremental:
        assert previous is not None and changed is not None
        refused = {k: why for k, why in previous.refused.items() if k not in changed}
        for p in changed.values():
            if p is not None and (why := verdict(oldest, p)) is not None:
                refused[p.key] = why
        owners = [p for p in claimants if p.key not in refused] if refused else claimants
    else:
        refused = {}
        owners = claim_port(claimants, refused)
    if isinstance(oldest.model, L4Listener):
        if any(isinstance(p.model, L4Listener) and p.model.spec.hostnames for p in owners):
            return _passthrough_port(port, claimants, refused, context)
        return _l4_port(port, claimants, refused, context)
    l7 = previous.l7 if previous is not None and previous.l7 is not None else L7Port(port)
    # The listener serves owners only: a changed object refused on this port leaves it.
    l7_changed = (
        {k: None if k in refused else p for k, p in changed.items()} if incremental and changed else None
    )
    l7.update(owners, l7_changed, context)
    scheme = "HTTPS" if oldest.model.spec.tls else "HTTP"
    message = f"serving {scheme} on port {port}"
    if l7.listener is None:
        message = f"valid, but port {port} is not served until a certificate resolves"
    dropped = l7.listener is None
    if incremental and previous is not None and previous.message == message and changed is not None:
        statuses = dict(previous.statuses)
        for key in changed:
            statuses.pop(key, None)
        served = previous.served - changed.keys()
        todo = [p for p in changed.values() if p is not None]
    else:
        statuses, served, todo = {}, set(), claimants
    for p in todo:
        if p.key in refused:
            statuses[p.key] = memo_status(cache, _refused_conditions, p, refused[p.key])
            continue
        refs = l7.outs[p.key].refs
        own = message + http2_note(p, owners)
        statuses[p.key] = memo_status(cache, _l7_conditions, p, own, refs, dropped)
        if not dropped:
            served.add(p.key)
    clusters = frozenset(n for n, count in l7.clusters.items() if count > 0 and not dropped)
    return PortResult(claimants, refused, l7.listener, statuses, served, clusters, message, l7, l7.changed)


def _l4_port(
    port: int, claimants: list[Parsed], refused: dict[ObjectKey, Refusal], context: Context
) -> PortResult:
    """A port of one L4Listener, on TCP or UDP."""
    cache = context.cache
    owner = claimants[0]
    listener, resolution = l4_listener(owner, context.resolver, cache, owner.key in context.force)
    statuses = {owner.key: memo_status(cache, _l4_conditions, owner, port, resolution)}
    for p in claimants[1:]:
        statuses[p.key] = memo_status(cache, _refused_conditions, p, refused[p.key])
    clusters = frozenset(b.cluster for b in resolution.backends if b.cluster is not None)
    return PortResult(claimants, refused, listener, statuses, {owner.key}, clusters)


def _passthrough_port(
    port: int, claimants: list[Parsed], refused: dict[ObjectKey, Refusal], context: Context
) -> PortResult:
    """A TCP port shared by L4Listeners with hostnames: routes chosen by SNI."""
    cache = context.cache
    owners = [p for p in claimants if p.key not in refused]
    index = index_hostnames(port, owners)
    refused = {**refused, **index.refused}
    routes: dict[str, table.L4Listener] = {}
    statuses: dict[ObjectKey, list[Condition]] = {}
    clusters: set[str] = set()
    port_owner = next(p for p in owners if p.key in index.served)
    for p in owners:
        if p.key in refused:
            continue
        listener, resolution = l4_listener(p, context.resolver, cache, p.key in context.force)
        route = listener.l4
        assert route is not None
        # Limits apply at accept, before a ClientHello names a route: the port's come
        # from its oldest listener (Passthrough.limits).
        routes[p.key.ref] = table.L4Listener.build(**{**route.__dict__, "limits": None})
        clusters.update(b.cluster for b in resolution.backends if b.cluster is not None)
        message = served_message(port, index.served[p.key], index.taken.get(p.key, []))
        if route.limits is not None and p is not port_owner:
            message += (
                f"; its limits are not used: connections on port {port} are limited at accept "
                f"by those of the oldest listener, {port_owner.key}"
            )
        reason = HOSTNAME_CONFLICT if p.key in index.taken else None
        statuses[p.key] = memo_status(cache, _passthrough_conditions, p, message, reason, resolution)
    for p in claimants:
        if p.key in refused:
            statuses[p.key] = memo_status(cache, _refused_conditions, p, refused[p.key])
    owner_limits = l4_listener(port_owner, context.resolver, cache, False)[0].l4
    passthrough = table.Passthrough.build(
        routes=dict(sorted(routes.items())),
        exact=dict(sorted(index.exact.items())),
        wildcard=dict(sorted(index.wildcard.items())),
        default=index.default,
        limits=owner_limits.limits if owner_limits is not None else None,
    )
    served = {p.key for p in owners if p.key not in refused}
    listener = table.Listener.build(passthrough=passthrough)
    return PortResult(claimants, refused, listener, statuses, served, frozenset(clusters))


def _passthrough_conditions(
    p: Parsed, message: str, reason: str | None, resolution: Resolution
) -> list[Condition]:
    accepted = c.condition(c.ACCEPTED, True, reason or c.ACCEPTED, message, p.generation)
    return [accepted, refs_condition(p, resolution)]


def l4_listener(
    p: Parsed, resolver: BackendResolver, cache: CompileCache, force: bool
) -> tuple[table.Listener, Resolution]:
    """The table listener of one L4Listener (its l4 or its udp face), remembered."""
    assert isinstance(p.model, L4Listener)
    kept = cache.l4.get(p.key)
    if kept is not None and kept[0] is p and kept[1] is resolver and not force:
        return kept[2]
    spec = p.model.spec
    resolution = resolver.resolve(p.key.namespace, spec.backendRefs, "spec.backendRefs", spec.protocol)
    if spec.protocol == "UDP":
        unchecked = [
            ref.name
            for ref in spec.backendRefs
            if spec.healthCheck is not None
            and not resolver.has_port(p.key.namespace, ref.name, ref.port, "TCP")
        ]
        for name in unchecked:
            resolution.problems.append(
                f"spec.healthCheck: Service {p.key.namespace}/{name} has no TCP port {spec.port} to check "
                "(checks are TCP connects); health checks are off: add the TCP port or remove healthCheck"
            )
        udp = build_udp(p.model, p.key.ref, resolution, checked=not unchecked)
        listener = table.Listener.build(udp=udp)
    else:
        listener = table.Listener.build(l4=build_l4(p.model, p.key.ref, resolution))
    result = (listener, resolution)
    cache.l4[p.key] = (p, resolver, result)
    return result


def memo_status(
    cache: CompileCache, make: Callable[..., list[Condition]], p: Parsed, *inputs: object
) -> list[Condition]:
    """make(p, *inputs), or what it returned last time for the same inputs: conditions are
    pydantic objects, 22,000 of them per compile at 10,000 routes. The same list object
    comes back, which tells the operator the status did not change."""
    kept = cache.statuses.get(p.key)
    if kept is not None and kept[0][0] is make and kept[0][1] is p and kept[0][2:] == inputs:
        return kept[1]
    conditions = make(p, *inputs)
    cache.statuses[p.key] = ((make, p, *inputs), conditions)
    return conditions


def _refused_conditions(p: Parsed, why: Refusal) -> list[Condition]:
    return [c.condition(c.ACCEPTED, False, why.reason, why.message, p.generation)]


def _l4_conditions(p: Parsed, port: int, resolution: Resolution) -> list[Condition]:
    protocol = p.model.spec.protocol if isinstance(p.model, L4Listener) else "TCP"
    return _accepted(p, f"serving {protocol} on port {port}", refs_condition(p, resolution))


def _l7_conditions(p: Parsed, message: str, refs: RouteRefs, dropped: bool) -> list[Condition]:
    return _accepted(p, message, _route_refs_condition(p, refs, dropped))


def _accepted(p: Parsed, message: str, refs: Condition) -> list[Condition]:
    return [c.condition(c.ACCEPTED, True, c.ACCEPTED, message, p.generation), refs]


def refs_condition(p: Parsed, resolution: Resolution) -> Condition:
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
    elif refs.ca_problem:
        reason = c.INVALID_CA_CERTIFICATE_REF
    elif refs.unsupported_protocol:
        reason = c.UNSUPPORTED_PROTOCOL
    elif refs.not_permitted:
        reason = c.REF_NOT_PERMITTED
    else:
        reason = c.BACKEND_NOT_FOUND
    if not problems:
        message = "; ".join(["all references resolved", *refs.notes])
        return c.condition(c.RESOLVED_REFS, True, c.RESOLVED_REFS, message, p.generation)
    return c.condition(c.RESOLVED_REFS, False, reason, "; ".join(problems + refs.notes), p.generation)
