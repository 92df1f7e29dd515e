"""`bilayer explain`: why a request goes where it goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataplane import table
from dataplane.l7.paths import BadPath, normalize, split_target
from dataplane.l7.router import Router, SimpleRequest, normalize_host

MAX_CONSIDERED = 50


@dataclass
class Explanation:
    """The answer, as text lines or as a JSON-able dict."""

    port: int | None = None
    outcome: str = ""
    route: str | None = None
    rule: int | None = None
    rule_name: str | None = None
    match: str | None = None
    backends: list[dict[str, Any]] = field(default_factory=list)
    considered: list[dict[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"listener: port {self.port}" if self.port else "listener: none"]
        if self.route is not None:
            name = f" ({self.rule_name})" if self.rule_name else ""
            out.append(f"route:    L7Route {self.route}, rule {self.rule}{name}, match [{self.match}]")
            for b in self.backends:
                out.append(f"backend:  {b['backend']} weight {b['weight']}: {b['state']}")
        out.append(f"outcome:  {self.outcome}")
        if self.considered:
            out.append("considered first, in precedence order:")
            for c in self.considered:
                out.append(
                    f"  - {c['route']} rule {c['rule']} [{c['match']}] on host {c['host']}: {c['reason']}"
                )
        return out


def explain(
    compiled: table.Table,
    host: str,
    target: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    port: int | None = None,
) -> Explanation:
    """Which listener, route, rule and backend a request takes, and what lost to it."""
    l7_ports = sorted(p for p, listener in compiled.listeners.items() if listener.l7 is not None)
    if port is None:
        if len(l7_ports) != 1:
            have = ", ".join(map(str, l7_ports)) or "none"
            return Explanation(outcome=f"name the listener with --port (HTTP ports: {have})")
        port = l7_ports[0]
    listener = compiled.listeners.get(port)
    if listener is None or listener.l7 is None:
        kind = "an L4 listener" if listener is not None else "no listener"
        return Explanation(port=port, outcome=f"port {port} has {kind}, not HTTP routes")
    raw_path, query = split_target(target)
    try:
        path, encoded_slash = normalize(raw_path)
    except BadPath as err:
        return Explanation(port=port, outcome=f"400 Bad Request: {err}")
    router = Router(listener.l7)
    request = SimpleRequest(headers, query)
    winner, considered = router.explain(normalize_host(host), path, method.upper(), request)
    result = Explanation(port=port)
    for c in considered[:MAX_CONSIDERED]:
        rule = router.rules[c.entry.rule]
        result.considered.append(
            {
                "host": c.group,
                "route": rule.route,
                "rule": str(rule.index),
                "match": c.entry.describe(),
                "reason": c.reason,
            }
        )
    if len(considered) > MAX_CONSIDERED:
        result.considered.append(
            {
                "host": "",
                "route": "...",
                "rule": "",
                "match": "",
                "reason": f"{len(considered) - MAX_CONSIDERED} more",
            }
        )
    if winner is None:
        result.outcome = "404 Not Found: no rule matches"
        return result
    rule = router.rules[winner.rule]
    result.route, result.rule, result.rule_name, result.match = (
        rule.route,
        rule.index,
        rule.name,
        winner.describe(),
    )
    result.backends = [_backend(compiled, b) for b in rule.backends]
    result.outcome = _outcome(rule, result.backends, encoded_slash)
    if path != raw_path:
        result.outcome += f" (path normalized to {path})"
    return result


def _backend(compiled: table.Table, backend: table.Backend) -> dict[str, Any]:
    if backend.cluster is None:
        return {"backend": "(unresolved)", "weight": backend.weight, "state": "requests get 500"}
    cluster = compiled.clusters[backend.cluster]
    endpoints = cluster.endpoints
    state = f"{len(endpoints)} endpoints" if endpoints else "no ready endpoints: requests get 503"
    return {
        "backend": backend.cluster,
        "weight": backend.weight,
        "state": f"{state}, {_speaks(cluster)}",
        "protocol": cluster.protocol,
        "tls": cluster.tls is not None,
    }


def _speaks(cluster: table.Cluster) -> str:
    """How the proxy talks to the cluster's endpoints, in words."""
    if cluster.tls is None:
        return "HTTP/2 cleartext (h2c)" if cluster.protocol == "h2" else "HTTP/1.1"
    tls = cluster.tls
    trust = (
        "not verified (insecureSkipVerify)"
        if tls.insecureSkipVerify
        else f"verified as {tls.serverName} against "
        + ("the route's CA bundle" if tls.caCertificates else "the system roots")
    )
    version = {"h2": "HTTP/2", "auto": "HTTP/2 or HTTP/1.1 by ALPN"}.get(cluster.protocol, "HTTP/1.1")
    return f"{version} over TLS, {trust}"


def _outcome(rule: table.Rule, backends: list[dict[str, Any]], encoded_slash: bool) -> str:
    if encoded_slash and not rule.allowEncodedSlashes:
        return "400 Bad Request: encoded slash (%2F) in the path; the route does not allow it"
    if rule.redirect is not None:
        return f"{rule.redirect.statusCode} redirect"
    if not rule.backends or sum(b.weight for b in rule.backends) == 0:
        return "500: the rule has no backend with weight above 0"
    notes = ["forwarded to a backend chosen by weight"]
    if rule.session is not None:
        notes.append(f"kept on its endpoint by the {rule.session.type.lower()} {rule.session.name}")
    for mirror in rule.mirrors:
        notes.append(f"copied to {mirror.cluster} ({mirror.share:.0%} of requests)")
    if rule.cors is not None:
        notes.append("CORS preflights answered by the proxy")
    return "; ".join(notes)
