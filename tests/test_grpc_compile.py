"""gRPC matches, compiled and then looked up by the dataplane's own router (through
`bilayer explain`): which rule a call to /package.Service/Method takes."""

from __future__ import annotations

import pytest

from controlplane.compiler import Snapshot, compile_snapshot
from controlplane.explain import explain

from .golden import inputs

TABLE = compile_snapshot(Snapshot.of(inputs("grpc-routing"))).table


@pytest.mark.parametrize(
    ("method", "path", "headers", "route", "rule"),
    [
        ("POST", "/helloworld.Greeter/SayHello", {}, "shop/greeter", 0),  # exact service and method
        ("POST", "/helloworld.Greeter/SayGoodbye", {}, "shop/greeter", 1),  # the service's prefix
        ("POST", "/grpc.health.v1.Health/Check", {}, "shop/long-service", 0),  # exact beats method-only
        ("POST", "/other.Service/Check", {}, "shop/greeter", 2),  # method alone
        ("POST", "/other.Service/Check", {"x-canary": "1"}, "shop/greeter", 2),
        ("POST", "/helloworld.v2.Greeter/SayHello", {}, "shop/greeter", 3),  # regular expression
    ],
)
def test_a_call_takes_the_rule_grpcroute_precedence_gives(
    method: str, path: str, headers: dict[str, str], route: str, rule: int
) -> None:
    found = explain(TABLE, "grpc.example.com", path, method=method, headers=headers)
    assert (found.route, found.rule) == (route, rule), found.lines()


def test_more_header_matches_win_among_equal_grpc_matches() -> None:
    canary = {"x-canary": "1"}
    found = explain(TABLE, "grpc.example.com", "/other.Service/Check", method="POST", headers=canary)
    assert found.match is not None and "x-canary" in found.match, found.lines()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/helloworld.Greeter/SayHello"),  # gRPC is POST
        ("POST", "/helloworld.GreeterV2/SayHello"),  # a service prefix is a whole segment
        ("POST", "/helloworld.v2.Greeter/SayHello/extra"),
    ],
)
def test_what_is_not_a_matching_call_is_not_routed(method: str, path: str) -> None:
    found = explain(TABLE, "grpc.example.com", path, method=method)
    assert found.route is None or (found.route, found.rule) != ("shop/greeter", 1), found.lines()
    assert found.outcome.startswith("404"), found.lines()
