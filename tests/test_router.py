"""Matching requests against compiled routes: the precedence rules of DESIGN.md."""

from __future__ import annotations

import pytest

from dataplane.l7.router import Router, SimpleRequest, normalize_host

from .helpers import compile_yaml, service

BACKENDS = service("a", 80, [("10.0.0.1", 80)]) + "---\n" + service("b", 80, [("10.0.0.2", 80)])


def route(name: str, spec: str, created: str | None = None) -> str:
    stamp = f", creationTimestamp: '{created}'" if created else ""
    return f"""---
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: {name}, namespace: default{stamp}}}
spec:
  port: 8080
{spec}
"""


def router_for(*routes: str) -> Router:
    compiled = compile_yaml(BACKENDS + "".join(routes))
    listener = compiled.table.listeners[8080].l7
    assert listener is not None
    return Router(listener)


def winner(
    r: Router,
    host: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    query: str = "",
) -> str | None:
    entry = r.match(normalize_host(host), path, method, SimpleRequest(headers, query))
    if entry is None:
        return None
    rule = r.rules[entry.rule]
    return rule.name or f"{rule.route}#{rule.index}"


def named(name: str, match: str) -> str:
    return f"""  - name: {name}
    matches: [{match}]
    backendRefs: [{{name: a, port: 80}}]
"""


def test_exact_host_beats_wildcard_and_wildcard_beats_any() -> None:
    r = router_for(
        route("exact", "  hostnames: [api.example.com]\n  rules:\n" + named("exact", "{}")),
        route("wild", "  hostnames: ['*.example.com']\n  rules:\n" + named("wild", "{}")),
        route("any", "  rules:\n" + named("any", "{}")),
    )
    assert winner(r, "api.example.com", "/") == "exact"
    assert winner(r, "www.example.com", "/") == "wild"
    assert winner(r, "deep.www.example.com", "/") == "wild"
    assert winner(r, "example.com", "/") == "any"  # *.example.com never matches the apex
    assert winner(r, "other.org", "/") == "any"


def test_longer_wildcard_suffix_first() -> None:
    r = router_for(
        route("short", "  hostnames: ['*.example.com']\n  rules:\n" + named("short", "{}")),
        route("long", "  hostnames: ['*.eu.example.com']\n  rules:\n" + named("long", "{}")),
    )
    assert winner(r, "shop.eu.example.com", "/") == "long"
    assert winner(r, "shop.us.example.com", "/") == "short"


def test_host_ignores_case_port_and_trailing_dot() -> None:
    r = router_for(route("exact", "  hostnames: [api.example.com]\n  rules:\n" + named("exact", "{}")))
    assert winner(r, "API.Example.COM:8080", "/") == "exact"
    assert winner(r, "api.example.com.", "/") == "exact"
    assert winner(r, "[::1]:8080", "/") is None


def test_falls_through_to_less_specific_host_when_no_rule_matches() -> None:
    r = router_for(
        route("exact", "  hostnames: [api.example.com]\n  rules:\n" + named("exact", "{path: {value: /v1}}")),
        route("wild", "  hostnames: ['*.example.com']\n  rules:\n" + named("wild", "{path: {value: /v2}}")),
    )
    assert winner(r, "api.example.com", "/v1/x") == "exact"
    assert winner(r, "api.example.com", "/v2/x") == "wild"
    assert winner(r, "api.example.com", "/v3") is None


def test_exact_path_beats_regex_beats_prefix() -> None:
    r = router_for(
        route(
            "paths",
            "  rules:\n"
            + named("prefix", "{path: {type: PathPrefix, value: /users}}")
            + named("regex", "{path: {type: RegularExpression, value: '/users/[0-9]+'}}")
            + named("exact", "{path: {type: Exact, value: /users/42}}"),
        )
    )
    assert winner(r, "h", "/users/42") == "exact"
    assert winner(r, "h", "/users/7") == "regex"
    assert winner(r, "h", "/users/me") == "prefix"
    assert winner(r, "h", "/users") == "prefix"
    assert winner(r, "h", "/usersx") is None


def test_longest_prefix_wins_on_segment_boundaries() -> None:
    r = router_for(
        route(
            "p",
            "  rules:\n"
            + named("root", "{path: {value: /}}")
            + named("api", "{path: {value: /api}}")
            + named("v2", "{path: {value: /api/v2/}}"),
        )
    )
    assert winner(r, "h", "/api/v2/users") == "v2"
    assert winner(r, "h", "/api/v2") == "v2"
    assert winner(r, "h", "/api/v20") == "api"
    assert winner(r, "h", "/apix") == "root"


def test_method_then_headers_then_query() -> None:
    r = router_for(
        route(
            "fine",
            "  rules:\n"
            + named("plain", "{path: {value: /x}}")
            + named("query", "{path: {value: /x}, queryParams: [{name: v, value: '2'}]}")
            + named("header", "{path: {value: /x}, headers: [{name: X-Canary, value: 'true'}]}")
            + named("method", "{path: {value: /x}, method: POST}")
            + named(
                "regex-header",
                "{path: {value: /x}, headers: [{name: x-user, type: RegularExpression, value: 'adm.*'}]}",
            ),
        )
    )
    assert winner(r, "h", "/x", method="POST", headers={"x-canary": "true"}) == "method"
    assert winner(r, "h", "/x", headers={"X-CANARY": "true"}, query="v=2") == "header"
    assert winner(r, "h", "/x", query="a=1&v=2") == "query"
    assert winner(r, "h", "/x", headers={"x-user": "admin"}) == "regex-header"
    assert winner(r, "h", "/x", headers={"x-user": "xadmin"}) == "plain"
    assert winner(r, "h", "/x", headers={"x-canary": "false"}) == "plain"


def test_ties_go_to_oldest_route_then_name_then_rule_order() -> None:
    r = router_for(
        route("newer", "  rules:\n" + named("newer", "{path: {value: /same}}"), "2026-06-01T00:00:00Z"),
        route("older", "  rules:\n" + named("older", "{path: {value: /same}}"), "2026-01-01T00:00:00Z"),
    )
    assert winner(r, "h", "/same") == "older"
    r = router_for(
        route(
            "beta",
            "  rules:\n"
            + named("beta-0", "{path: {value: /same}}")
            + named("beta-1", "{path: {value: /same}}"),
        ),
        route("alpha", "  rules:\n" + named("alpha-0", "{path: {value: /same}}")),
    )
    assert winner(r, "h", "/same") == "alpha-0"


def test_no_route_is_none() -> None:
    r = router_for(route("only", "  hostnames: [a.example.com]\n  rules:\n" + named("only", "{}")))
    assert winner(r, "b.example.com", "/") is None


@pytest.mark.parametrize("count", [10, 1000])
def test_many_routes_all_reachable(count: int) -> None:
    routes = "".join(
        route(
            f"r{i}",
            f"  hostnames: [h{i}.example.com]\n  rules:\n" + named(f"n{i}", f"{{path: {{value: /p{i}}}}}"),
        )
        for i in range(count)
    )
    r = router_for(routes)
    for i in range(0, count, max(1, count // 50)):
        assert winner(r, f"h{i}.example.com", f"/p{i}/x") == f"n{i}"
        assert winner(r, f"h{i}.example.com", f"/p{i + 1}") is None


def test_explain_lists_what_lost_and_why() -> None:
    r = router_for(
        route(
            "fine",
            "  rules:\n"
            + named("canary", "{path: {value: /x}, headers: [{name: x-canary, value: 'true'}]}")
            + named("post", "{path: {value: /x}, method: POST}")
            + named("plain", "{path: {value: /x}}"),
        )
    )
    entry, considered = r.explain("h", "/x", "GET", SimpleRequest({"x-canary": "no"}))
    assert entry is not None
    assert r.rules[entry.rule].name == "plain"
    reasons = [c.reason for c in considered]
    assert reasons == ["method is GET, needs POST", "header x-canary is 'no', needs 'true'"]
