"""Compile the L7Routes sharing a port into one HTTP listener with an indexed match table."""

from __future__ import annotations

import hashlib
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dataplane import table
from dataplane.parts import PartPath

from ..resources.common import HeaderKey, parse_duration
from ..resources.l7route import (
    CookieConfig,
    Filter,
    HeaderModifier,
    L7Route,
    PathModifier,
    RouteRule,
    SessionPersistence,
)
from .backends import BackendResolver, Resolution
from .intern import NO_CONDITIONS, interned
from .ports import Parsed
from .precedence import EntryRank, prefix_key, rank, wildcard_key
from .snapshot import ObjectKey
from .tls import SecretIndex

if TYPE_CHECKING:
    from .port import Context

_UNIT_SECONDS = {"Second": 1.0, "Minute": 60.0, "Hour": 3600.0}


@dataclass
class RouteRefs:
    """What one route could not resolve, for its ResolvedRefs condition."""

    problems: list[str] = field(default_factory=list)
    not_permitted: bool = False
    certificate_problem: str | None = None
    ca_problem: bool = False
    unsupported_protocol: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class _RouteOut:
    """What one route contributes, independent of the other routes on its port."""

    rules: dict[str, table.Rule]
    # (host group, precedence rank, entry) for every match in every host group
    entries: list[tuple[tuple[str, str], EntryRank, table.MatchEntry]]
    refs: RouteRefs
    certificate: table.Certificate | None
    clusters: frozenset[str]
    groups: frozenset[tuple[str, str]]  # the host groups its entries are in


def _compile_route(parsed: Parsed, resolver: BackendResolver, secrets: SecretIndex) -> _RouteOut:
    route = parsed.model
    assert isinstance(route, L7Route)
    namespace = parsed.key.namespace
    found = RouteRefs()
    certificate = None
    if route.spec.tls is not None:
        certificate, found.certificate_problem = secrets.certificate(
            namespace, route.spec.tls.secretName, route.spec.hostnames
        )
    rules: dict[str, table.Rule] = {}
    entries: list[tuple[tuple[str, str], EntryRank, table.MatchEntry]] = []
    clusters: set[str] = set()
    groups = _host_groups(route.spec.hostnames)
    for rule_index, rule in enumerate(route.spec.rules):
        where = f"spec.rules[{rule_index}]"
        resolution = resolver.resolve_http(namespace, rule.backendRefs, f"{where}.backendRefs")
        mirrors = _mirrors(rule.filters, namespace, resolver, f"{where}.filters", resolution)
        backends = _with_filters(rule, namespace, resolver, where, resolution)
        found.problems += resolution.problems
        found.notes += resolution.notes
        found.not_permitted |= resolution.not_permitted
        found.ca_problem |= resolution.ca_problem
        found.unsupported_protocol |= resolution.unsupported_protocol
        clusters.update(b.cluster for b in backends if b.cluster is not None)
        clusters.update(m.cluster for m in mirrors)
        for backend in backends:
            if backend.filters is not None:
                clusters.update(m.cluster for m in backend.filters.mirrors)
        rid = table.rule_id(parsed.key.ref, rule_index)
        rules[rid] = _rule(parsed.key.ref, rule_index, rule, route, backends, mirrors)
        for match_index, match in enumerate(rule.matches):
            path = match.request_path()
            entry = table.MatchEntry.build(
                rule=rid,
                path=interned(table.PathCondition, type=path.type, value=path.value),
                method=match.request_method(),
                headers=[
                    table.ValueCondition.build(name=h.name.lower(), type=h.type, value=h.value)
                    for h in match.headers
                ]
                or NO_CONDITIONS,
                queryParams=[
                    table.ValueCondition.build(name=q.name, type=q.type, value=q.value)
                    for q in match.queryParams
                ]
                or NO_CONDITIONS,
            )
            order = rank(match, parsed.age, rule_index, match_index)
            entries += [(group, order, entry) for group in groups]
    return _RouteOut(rules, entries, found, certificate, frozenset(clusters), frozenset(groups))


def _route_signature(parsed: Parsed, resolver: BackendResolver, secrets: SecretIndex) -> tuple[object, ...]:
    """Besides the model (the parse memo keeps the same object while the content is the
    same), what decides the route's compiled rules: how its references resolve."""
    route = parsed.model
    assert isinstance(route, L7Route)
    namespace = parsed.key.namespace
    resolved = tuple(
        resolver.http_lookup(namespace, ref) for rule in route.spec.rules for ref in rule.service_refs()
    )
    tls = route.spec.tls
    cert = secrets.fingerprint(namespace, tls.secretName) if tls is not None else None
    return (resolved, cert)


def _mirrors(
    filters: list[Filter], namespace: str, resolver: BackendResolver, where: str, resolution: Resolution
) -> list[table.Mirror]:
    """The RequestMirror filters whose Service resolves and whose share is not 0. One that
    does not resolve is left out (the spec: not configured) and reported in resolution."""
    mirrors = []
    for index, f in enumerate(filters):
        if f.requestMirror is None:
            continue
        mirror = f.requestMirror
        name = resolver.http_cluster(
            namespace, mirror.backendRef, f"{where}[{index}].requestMirror.backendRef", resolution
        )
        if name is not None and mirror.share > 0:
            mirrors.append(table.Mirror.build(cluster=name, share=mirror.share))
    return mirrors


def _with_filters(
    rule: RouteRule, namespace: str, resolver: BackendResolver, where: str, resolution: Resolution
) -> list[table.Backend]:
    """The resolved backends, with the filters of the backendRefs that have some."""
    backends = resolution.backends
    for index, ref in enumerate(rule.backendRefs):
        if not ref.filters:
            continue
        by_type = {f.type: f for f in ref.filters}
        filters = table.BackendFilters.build(
            requestHeaders=_header_ops(by_type.get("RequestHeaderModifier"), "requestHeaderModifier"),
            responseHeaders=_header_ops(by_type.get("ResponseHeaderModifier"), "responseHeaderModifier"),
            rewrite=_rewrite(by_type.get("URLRewrite")),
            mirrors=_mirrors(
                ref.filters, namespace, resolver, f"{where}.backendRefs[{index}].filters", resolution
            ),
        )
        backends[index] = table.Backend.build(
            cluster=backends[index].cluster, weight=backends[index].weight, filters=filters
        )
    return backends


def _route_out(parsed: Parsed, context: Context) -> _RouteOut:
    resolver, secrets, cache = context.resolver, context.secrets, context.cache
    kept = cache.routes.get(parsed.key)
    # The memo holds the Parsed itself: identity, not id(), so a freed object's id can
    # never be mistaken for a new one's. Same resolver and none of the route's references
    # changed (force): no lookups needed.
    if kept is not None and kept[0] is parsed:
        if kept[1] is resolver and parsed.key not in context.force:
            return kept[3]
        signature = _route_signature(parsed, resolver, secrets)
        if kept[2] == signature:
            cache.routes[parsed.key] = (parsed, resolver, signature, kept[3])
            return kept[3]
    else:
        signature = _route_signature(parsed, resolver, secrets)
    out = _compile_route(parsed, resolver, secrets)
    cache.routes[parsed.key] = (parsed, resolver, signature, out)
    return out


Group = tuple[str, str]  # ("exact", host) | ("wildcard", ".suffix") | ("any", "")


class L7Port:
    """The HTTP listener of one port, kept between compiles and updated route by route.

    update() takes the port's routes and which of them may have changed; it recompiles
    those, rebuilds only the host groups they are in, and reports the table parts that
    changed (``changed``) so the version and the deltas cost as much as the change.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.outs: dict[ObjectKey, _RouteOut] = {}
        self.members: dict[Group, dict[ObjectKey, _RouteOut]] = {}
        # The host groups by kind ("exact", "wildcard", "any"), each map in key order.
        self.groups: dict[str, dict[str, table.HostRoutes]] = {"exact": {}, "wildcard": {}, "any": {}}
        self.rules: dict[str, table.Rule] = {}
        self.clusters: Counter[str] = Counter()
        self.certificates: list[table.Certificate] = []
        self.tls: table.TLS | None = None
        self.listener: table.Listener | None = None
        self.changed: set[PartPath] | None = None  # None: unknown, compare the whole listener

    def update(
        self,
        routes: list[Parsed],
        changed: dict[ObjectKey, Parsed | None] | None,
        context: Context,
    ) -> None:
        """Make the listener serve routes (oldest first). changed names the routes that may
        differ since the last update, with what each is now (None: it left the listener);
        changed None: any may."""
        before = self.listener
        rules = dict(self.rules)  # the last table holds the old dictionaries: copy
        touched: set[Group] = set()
        changed_rules: set[str] = set()
        if changed is None:
            keys = {p.key for p in routes}
            todo: list[tuple[ObjectKey, Parsed | None]] = [(p.key, p) for p in routes]
            todo += [(k, None) for k in self.outs if k not in keys]
        else:
            todo = list(changed.items())
        for key, parsed in todo:
            out = _route_out(parsed, context) if parsed is not None else None
            old = self.outs.get(key)
            if old is out:
                continue
            if old is not None:
                del self.outs[key]
                for rid in old.rules:
                    del rules[rid]
                changed_rules.update(old.rules)
                for group in old.groups:
                    del self.members[group][key]
                touched.update(old.groups)
                self.clusters.subtract(old.clusters)
            if out is not None:
                self.outs[key] = out
                rules.update(out.rules)
                changed_rules.update(out.rules)
                for group in out.groups:
                    self.members.setdefault(group, {})[key] = out
                touched.update(out.groups)
                self.clusters.update(out.clusters)
        self.rules = rules
        self._refreeze(touched)
        self._certificates(routes)
        tls_port = any(isinstance(p.model, L7Route) and p.model.spec.tls for p in routes[:1])
        if tls_port and not self.certificates:
            self.listener = None
        else:
            hosts = table.HostIndex.build(
                exact=self.groups["exact"], wildcard=self.groups["wildcard"], any=self.groups["any"].get("")
            )
            tls = self.tls if tls_port else None
            self.listener = table.Listener.build(
                l7=table.L7Listener.build(rules=self.rules, hosts=hosts, tls=tls, http2=port_http2(routes))
            )
        self.changed = None
        if before is not None and self.listener is not None and changed is not None:
            port = str(self.port)
            self.changed = {PartPath.rule(port, rid) for rid in changed_rules}
            self.changed |= {PartPath.host_group(port, kind, k) for kind, k in touched}
            head = self.listener.l7
            assert head is not None
            if before.l7 is None or before.l7.tls is not head.tls or before.l7.http2 != head.http2:
                self.changed.add(PartPath.head(port, "l7"))

    def _refreeze(self, touched: set[Group]) -> None:
        """Rebuild the host groups in touched; keep the key order of the groups map."""
        for kind in {kind for kind, _ in touched}:
            groups = dict(self.groups[kind])  # the last table holds the old map: copy
            for group in [g for g in touched if g[0] == kind]:
                members = self.members.get(group)
                if not members:
                    self.members.pop(group, None)
                    groups.pop(group[1], None)
                    continue
                groups[group[1]] = _host_routes(members.values(), group)
            self.groups[kind] = groups

    def _certificates(self, routes: list[Parsed]) -> None:
        """The port's certificates in route order (the first is the default one)."""
        if not routes or not (isinstance(routes[0].model, L7Route) and routes[0].model.spec.tls):
            self.certificates, self.tls = [], None
            return
        certificates = [c for p in routes if (c := self.outs[p.key].certificate) is not None]
        if len(certificates) != len(self.certificates) or not all(
            map(operator.is_, certificates, self.certificates)
        ):
            self.certificates = certificates
            self.tls = table.TLS.build(certificates=certificates) if certificates else None

    @property
    def refs(self) -> dict[str, RouteRefs]:
        return {key.ref: out.refs for key, out in self.outs.items()}


def port_http2(routes: list[Parsed]) -> bool:
    """Whether the port serves HTTP/2 beside HTTP/1.1: as its oldest route says (default on)."""
    oldest = routes[0].model if routes else None
    return not (isinstance(oldest, L7Route) and oldest.spec.http2 is False)


def http2_note(p: Parsed, routes: list[Parsed]) -> str:
    """What the Accepted message adds for a route whose http2 the port does not follow, or
    whose gRPC matches HTTP/1.1-only clients cannot use."""
    route = p.model
    if not isinstance(route, L7Route) or not routes:
        return ""
    on, wanted, note = port_http2(routes), route.spec.http2, ""
    if wanted is not None and wanted != on:
        note = (
            f"; its http2: {str(wanted).lower()} is not used: HTTP/2 on port {route.spec.port} is "
            f"{'on' if on else 'off'}, as the oldest route there, {routes[0].key}, says"
        )
    if not on and any(m.grpc is not None for rule in route.spec.rules for m in rule.matches):
        note += f"; its gRPC matches serve no gRPC client: HTTP/2 is off on port {route.spec.port}"
    return note


def _host_routes(outs: Iterable[_RouteOut], group: Group) -> table.HostRoutes:
    """A host group's entries in precedence order (ranks never tie: they hold the route)."""
    ranked = [(order, entry) for out in outs for g, order, entry in out.entries if g == group]
    ranked.sort(key=lambda item: item[0])
    exact: dict[str, list[table.MatchEntry]] = defaultdict(list)
    regex: list[table.MatchEntry] = []
    prefix: dict[str, list[table.MatchEntry]] = defaultdict(list)
    for _, entry in ranked:
        if entry.path.type == "Exact":
            exact[entry.path.value].append(entry)
        elif entry.path.type == "RegularExpression":
            regex.append(entry)
        else:
            prefix[prefix_key(entry.path.value)].append(entry)
    return table.HostRoutes.build(
        exact=dict(sorted(exact.items())), regex=regex, prefix=dict(sorted(prefix.items()))
    )


def _host_groups(hostnames: list[str]) -> list[tuple[str, str]]:
    if not hostnames:
        return [("any", "")]
    return [("wildcard", wildcard_key(h)) if h.startswith("*.") else ("exact", h) for h in hostnames]


def _rule(  # noqa: PLR0917 (the parts of one rule, all needed)
    source: str,
    index: int,
    rule: RouteRule,
    route: L7Route,
    backends: list[table.Backend],
    mirrors: list[table.Mirror],
) -> table.Rule:
    by_type: dict[str, Filter] = {f.type: f for f in rule.filters}
    timeouts = rule.timeouts
    return table.Rule.build(
        route=source,
        index=index,
        name=rule.name,
        backends=backends,
        requestHeaders=_header_ops(by_type.get("RequestHeaderModifier"), "requestHeaderModifier"),
        responseHeaders=_header_ops(by_type.get("ResponseHeaderModifier"), "responseHeaderModifier"),
        rewrite=_rewrite(by_type.get("URLRewrite")),
        redirect=_redirect(by_type.get("RequestRedirect")),
        requestTimeout=_timeout(timeouts.request if timeouts else None),
        backendRequestTimeout=_timeout(timeouts.backendRequest if timeouts else None),
        retry=None
        if rule.retry is None
        else table.Retry.build(
            attempts=rule.retry.attempts,
            codes=sorted(set(rule.retry.codes)),
            backoff=parse_duration(rule.retry.backoff),
            grpcCodes=sorted(set(rule.retry.grpcCodes)),
        ),
        rateLimit=None
        if rule.rateLimit is None
        else table.RateLimit.build(
            rate=rule.rateLimit.requests / _UNIT_SECONDS[rule.rateLimit.unit],
            burst=rule.rateLimit.burst or rule.rateLimit.requests,
            key=_key(rule.rateLimit.key),
        ),
        loadBalancing=interned(
            table.LoadBalancing, policy=rule.loadBalancing.policy, key=_key(rule.loadBalancing.key)
        ),
        allowEncodedSlashes=route.spec.allowEncodedSlashes,
        mirrors=mirrors,
        cors=_cors(by_type.get("CORS")),
        session=_session(rule.sessionPersistence, table.rule_id(source, index)),
    )


def _cors(f: Filter | None) -> table.Cors | None:
    if f is None or f.cors is None:
        return None
    cors = f.cors
    return table.Cors.build(
        allowOrigins=[origin.lower() for origin in cors.allowOrigins],
        allowMethods=list(cors.allowMethods),
        allowHeaders=list(cors.allowHeaders),
        exposeHeaders=list(cors.exposeHeaders),
        allowCredentials=cors.allowCredentials,
        maxAge=cors.maxAge,
    )


def _session(persistence: SessionPersistence | None, rid: str) -> table.Session | None:
    if persistence is None:
        return None
    cookie = persistence.cookie or CookieConfig()
    if persistence.header is not None:
        name = persistence.header.name
    else:
        # The spec: a unique name when none is given. Derived from the rule, so every
        # replica and every compile agree on it.
        name = cookie.name or "bilayer-session-" + hashlib.sha256(rid.encode()).hexdigest()[:12]
    return table.Session.build(
        type=persistence.type,
        name=name,
        path=cookie.path,
        permanent=cookie.lifetimeType == "Permanent",
        absoluteTimeout=_timeout(persistence.absoluteTimeout),
        idleTimeout=_timeout(persistence.idleTimeout),
    )


def _key(key: str | HeaderKey) -> table.RequestKey:
    if isinstance(key, HeaderKey):
        return interned(table.RequestKey, type="Header", header=key.header.lower())
    return interned(table.RequestKey, type="ClientIP")


def _header_ops(f: Filter | None, field_name: str) -> table.HeaderOps | None:
    modifier: HeaderModifier | None = getattr(f, field_name) if f else None
    if modifier is None:
        return None
    return table.HeaderOps.build(
        set=[table.HeaderValue.build(name=h.name, value=h.value) for h in modifier.set],
        add=[table.HeaderValue.build(name=h.name, value=h.value) for h in modifier.add],
        remove=list(modifier.remove),
    )


def _path(path: PathModifier | None) -> table.PathRewrite | None:
    if path is None:
        return None
    value = path.replaceFullPath if path.type == "ReplaceFullPath" else path.replacePrefixMatch
    assert value is not None  # the model guarantees the field of the type is set
    return table.PathRewrite.build(type=path.type, value=value)


def _rewrite(f: Filter | None) -> table.Rewrite | None:
    if f is None or f.urlRewrite is None:
        return None
    return table.Rewrite.build(hostname=f.urlRewrite.hostname, path=_path(f.urlRewrite.path))


def _redirect(f: Filter | None) -> table.Redirect | None:
    if f is None or f.requestRedirect is None:
        return None
    r = f.requestRedirect
    return table.Redirect.build(
        scheme=r.scheme,
        hostname=r.hostname,
        port=r.port,
        path=_path(r.path),
        statusCode=r.statusCode,
    )


def _timeout(duration: str | None) -> float | None:
    """A rule timeout in seconds; None when unset or 0s (the Gateway API: 0s disables it)."""
    seconds = parse_duration(duration) if duration else 0.0
    return seconds or None
