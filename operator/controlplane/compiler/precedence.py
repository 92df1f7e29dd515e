"""HTTP match precedence, in one place (Gateway API, as DESIGN.md states it).

Across host groups the dataplane walks: the exact host, then wildcard suffixes from the
longest, then routes without hostnames. Within a group: Exact paths, then regular
expressions, then the longest PathPrefix; the path buckets are the table's index, so
this module orders the entries that share a bucket:

1. a method match beats none;
2. more header matches beat fewer;
3. more query parameter matches beat fewer;
4. then the oldest route (creationTimestamp, then namespace/name);
5. then rule order, then match order within the rule.
"""

from __future__ import annotations

from typing import NamedTuple

from ..resources.l7route import RouteMatch


class EntryRank(NamedTuple):
    """Sort key of one match entry; smaller sorts first (wins)."""

    no_method: bool
    fewer_headers: int
    fewer_query_params: int
    route_age: tuple[str, str, str]
    rule_index: int
    match_index: int


def rank(match: RouteMatch, route_age: tuple[str, str, str], rule_index: int, match_index: int) -> EntryRank:
    return EntryRank(
        no_method=match.method is None,
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
