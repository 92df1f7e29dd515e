"""Compile the L7Routes sharing a port into one HTTP listener with an indexed match table."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from dataplane import table

from ..resources.common import HeaderKey, parse_duration
from ..resources.l7route import Filter, HeaderModifier, L7Route, PathModifier, RouteRule
from .backends import BackendResolver
from .cache import CompileCache
from .ports import Parsed
from .precedence import EntryRank, prefix_key, rank, wildcard_key
from .tls import SecretIndex

_UNIT_SECONDS = {"Second": 1.0, "Minute": 60.0, "Hour": 3600.0}


@dataclass
class RouteRefs:
    """What one route could not resolve, for its ResolvedRefs condition."""

    problems: list[str] = field(default_factory=list)
    not_permitted: bool = False
    certificate_problem: str | None = None


@dataclass
class _Group:
    """Match entries of one host group before sorting."""

    exact: dict[str, list[tuple[EntryRank, table.MatchEntry]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    regex: list[tuple[EntryRank, table.MatchEntry]] = field(default_factory=list)
    prefix: dict[str, list[tuple[EntryRank, table.MatchEntry]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def add(self, order: EntryRank, entry: table.MatchEntry) -> None:
        if entry.path.type == "Exact":
            self.exact[entry.path.value].append((order, entry))
        elif entry.path.type == "RegularExpression":
            self.regex.append((order, entry))
        else:
            self.prefix[prefix_key(entry.path.value)].append((order, entry))

    def freeze(self) -> table.HostRoutes:
        def ordered(items: list[tuple[EntryRank, table.MatchEntry]]) -> list[table.MatchEntry]:
            return [entry for _, entry in sorted(items, key=lambda item: item[0])]

        return table.HostRoutes.build(
            exact={path: ordered(items) for path, items in sorted(self.exact.items())},
            regex=ordered(self.regex),
            prefix={path: ordered(items) for path, items in sorted(self.prefix.items())},
        )


@dataclass
class _RouteOut:
    """What one route contributes, independent of where it sits in the listener."""

    rules: list[table.Rule]
    # (rule position in the route, precedence rank, the entry's fields but its rule index)
    entries: list[tuple[int, EntryRank, dict[str, object]]]
    refs: RouteRefs
    certificate: table.Certificate | None


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
    rules: list[table.Rule] = []
    entries: list[tuple[int, EntryRank, dict[str, object]]] = []
    for rule_index, rule in enumerate(route.spec.rules):
        resolution = resolver.resolve(namespace, rule.backendRefs, f"spec.rules[{rule_index}].backendRefs")
        found.problems += resolution.problems
        found.not_permitted |= resolution.not_permitted
        rules.append(_rule(parsed.key.ref, rule_index, rule, route, resolution.backends))
        for match_index, match in enumerate(rule.matches):
            fields: dict[str, object] = {
                "path": table.PathCondition.build(type=match.path.type, value=match.path.value),
                "method": match.method,
                "headers": [
                    table.ValueCondition.build(name=h.name.lower(), type=h.type, value=h.value)
                    for h in match.headers
                ],
                "queryParams": [
                    table.ValueCondition.build(name=q.name, type=q.type, value=q.value)
                    for q in match.queryParams
                ],
            }
            entries.append((rule_index, rank(match, parsed.age, rule_index, match_index), fields))
    return _RouteOut(rules, entries, found, certificate)


def _route_signature(parsed: Parsed, resolver: BackendResolver, secrets: SecretIndex) -> tuple[object, ...]:
    """With the model's identity (the parse memo keeps the same object while the content
    is the same), what decides the route's compiled rules: its age and how its references
    resolve. Resolving here also registers the route's clusters in this compile's table."""
    route = parsed.model
    assert isinstance(route, L7Route)
    namespace = parsed.key.namespace
    resolved = tuple(resolver.lookup(namespace, ref) for rule in route.spec.rules for ref in rule.backendRefs)
    tls = route.spec.tls
    cert = secrets.fingerprint(namespace, tls.secretName) if tls is not None else None
    return (parsed.age, resolved, cert)


def build_l7(
    routes: list[Parsed], resolver: BackendResolver, secrets: SecretIndex, cache: CompileCache | None = None
) -> tuple[table.Listener | None, dict[str, RouteRefs]]:
    """The listener for routes (oldest first) and each route's unresolved references.

    Returns no listener for a TLS port none of whose routes has a usable certificate:
    serving it would fail every handshake.
    """
    rules: list[table.Rule] = []
    groups: dict[tuple[str, str], _Group] = defaultdict(_Group)
    refs: dict[str, RouteRefs] = {}
    certificates: list[table.Certificate] = []
    for parsed in routes:
        route = parsed.model
        assert isinstance(route, L7Route)
        signature = _route_signature(parsed, resolver, secrets)
        kept = cache.routes.get(parsed.key) if cache is not None else None
        # The entry holds the model itself: identity, not id(), so a freed model's id can
        # never be mistaken for a new one's.
        if kept is not None and kept[0] is route and kept[1] == signature:
            out: _RouteOut = kept[2]
        else:
            out = _compile_route(parsed, resolver, secrets)
            if cache is not None:
                cache.routes[parsed.key] = (route, signature, out)
        refs[parsed.key.ref] = out.refs
        if out.certificate is not None:
            certificates.append(out.certificate)
        offset = len(rules)
        rules += out.rules
        host_groups = _host_groups(route.spec.hostnames)
        for rule_index, order, fields in out.entries:
            entry = table.MatchEntry.build(rule=offset + rule_index, **fields)
            for group in host_groups:
                groups[group].add(order, entry)
    tls_port = any(isinstance(p.model, L7Route) and p.model.spec.tls for p in routes)
    if tls_port and not certificates:
        return None, refs
    hosts = table.HostIndex.build(
        exact={key: g.freeze() for (kind, key), g in sorted(groups.items()) if kind == "exact"},
        wildcard={key: g.freeze() for (kind, key), g in sorted(groups.items()) if kind == "wildcard"},
        any=groups[("any", "")].freeze() if ("any", "") in groups else None,
    )
    tls = table.TLS.build(certificates=certificates) if tls_port else None
    return table.Listener.build(l7=table.L7Listener(rules=rules, hosts=hosts, tls=tls)), refs


def _host_groups(hostnames: list[str]) -> list[tuple[str, str]]:
    if not hostnames:
        return [("any", "")]
    return [("wildcard", wildcard_key(h)) if h.startswith("*.") else ("exact", h) for h in hostnames]


def _rule(
    source: str, index: int, rule: RouteRule, route: L7Route, backends: list[table.Backend]
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
        requestTimeout=parse_duration(timeouts.request) if timeouts and timeouts.request else None,
        backendRequestTimeout=(
            parse_duration(timeouts.backendRequest) if timeouts and timeouts.backendRequest else None
        ),
        retry=None
        if rule.retry is None
        else table.Retry.build(
            attempts=rule.retry.attempts,
            codes=sorted(set(rule.retry.codes)),
            backoff=parse_duration(rule.retry.backoff),
        ),
        rateLimit=None
        if rule.rateLimit is None
        else table.RateLimit.build(
            rate=rule.rateLimit.requests / _UNIT_SECONDS[rule.rateLimit.unit],
            burst=rule.rateLimit.burst or rule.rateLimit.requests,
            key=_key(rule.rateLimit.key),
        ),
        loadBalancing=table.LoadBalancing.build(
            policy=rule.loadBalancing.policy, key=_key(rule.loadBalancing.key)
        ),
        allowEncodedSlashes=route.spec.allowEncodedSlashes,
    )


def _key(key: str | HeaderKey) -> table.RequestKey:
    if isinstance(key, HeaderKey):
        return table.RequestKey.build(type="Header", header=key.header.lower())
    return table.RequestKey.build(type="ClientIP")


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
