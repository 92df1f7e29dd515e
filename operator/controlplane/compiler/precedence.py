"""HTTP match precedence, in one place (Gateway API, as DESIGN.md states it).

Across host groups the dataplane walks: the exact host, then wildcard suffixes from the
longest, then routes without hostnames. Within a group: Exact paths, then regular
expressions, then the longest PathPrefix; the path buckets are the table's index, so
this module orders the entries that share a bucket:

1. a gRPC match with more characters of service matched exactly, then of method, beats
   one with fewer (GRPCRoute's order; HTTP matches count none);
2. a method match beats none (gRPC matches are POST);
3. more header matches beat fewer;
4. more query parameter matches beat fewer;
5. then the oldest route (creationTimestamp, then namespace/name);
6. then rule order, then match order within the rule.

A gRPC match compiles to a path (see resources.l7route.GRPCMatch.path): service and method
exact to an Exact path, a service alone to a PathPrefix, anything else to a regular
expression; so its bucket decides first, as it does in Envoy Gateway. One consequence
differs from GRPCRoute's order: a method-only match (a regular expression) is tried before
a service-only one (a prefix) where both match a call.
"""

from __future__ import annotations

from typing import NamedTuple

from ..resources.l7route import RouteMatch


class EntryRank(NamedTuple):
    """Sort key of one match entry; smaller sorts first (wins)."""

    fewer_grpc_characters: tuple[int, int]
    no_method: bool
    fewer_headers: int
    fewer_query_params: int
    route_age: tuple[str, str, str]
    rule_index: int
    match_index: int


def rank(match: RouteMatch, route_age: tuple[str, str, str], rule_index: int, match_index: int) -> EntryRank:
    service, method = match.grpc.specificity() if match.grpc is not None else (0, 0)
    return EntryRank(
        fewer_grpc_characters=(-service, -method),
        no_method=match.request_method() is None,
        fewer_headers=-len(match.headers),
        fewer_query_params=-len(match.queryParams),
        route_age=route_age,
        rule_index=rule_index,
        match_index=match_index,
    )


def prefix_key(prefix: str) -> str:
    """The bucket of a PathPrefix: trailing slashes do not count, so "/" is ""."""
    return prefix.rstrip("/")


def wildcard_key(hostname: str) -> str:
    """The bucket of a wildcard hostname: "*.example.com" is ".example.com"."""
    return hostname[1:]
