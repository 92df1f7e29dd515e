"""Find the rule for a request in a compiled L7 listener.

The table has done the sorting; a lookup walks host groups from the most specific (exact
host, then wildcard suffixes from the longest, then any host), and within a group tries
the exact-path bucket, the regular expressions, then prefix buckets from the longest.
Cost depends on the request's host labels and path segments, not on the number of
routes (regular expressions excepted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl

from .. import table
from ..regex import Pattern
from .hostnames import normalize_host
from .paths import prefix_matches

__all__ = ["Router", "SimpleRequest", "normalize_host"]


class RequestView(Protocol):
    """What matching reads from a request besides host, path and method."""

    def header(self, name: str) -> str | None:
        """The value of a header (lower-case name), repeated values joined by ','."""

    def query(self, name: str) -> str | None:
        """The first value of a query parameter."""


class SimpleRequest:
    """A RequestView over plain dicts (explain, tests)."""

    def __init__(self, headers: dict[str, str] | None = None, query: str = "") -> None:
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._query: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            self._query.setdefault(name, value)

    def header(self, name: str) -> str | None:
        return self._headers.get(name)

    def query(self, name: str) -> str | None:
        return self._query.get(name)


Condition = tuple[str, str, Pattern | None]


class Entry:
    """One match entry, with its patterns compiled."""

    __slots__ = ("headers", "method", "path_type", "path_value", "query", "regex", "rule")

    def __init__(self, entry: table.MatchEntry) -> None:
        self.rule = entry.rule
        self.method = entry.method
        self.path_type = entry.path.type
        self.path_value = entry.path.value
        self.regex = Pattern(entry.path.value) if entry.path.type == "RegularExpression" else None
        self.headers: tuple[Condition, ...] = tuple(_condition(c) for c in entry.headers)
        self.query: tuple[Condition, ...] = tuple(_condition(c) for c in entry.queryParams)

    def accepts(self, method: str, request: RequestView) -> bool:
        """Whether method, headers and query hold (the path was matched by the index)."""
        if self.method is not None and self.method != method:
            return False
        for name, value, pattern in self.headers:
            got = request.header(name)
            if got is None or (got != value if pattern is None else not pattern.fullmatch(got)):
                return False
        for name, value, pattern in self.query:
            got = request.query(name)
            if got is None or (got != value if pattern is None else not pattern.fullmatch(got)):
                return False
        return True

    def mismatch(self, path: str, method: str, request: RequestView) -> str | None:
        """Why this entry does not match, or None when it does (for explain)."""
        if self.path_type == "Exact" and path != self.path_value:
            return f"path is not exactly {self.path_value}"
        if self.path_type == "PathPrefix" and not prefix_matches(self.path_value, path):
            return f"path is not under {self.path_value}"
        if self.regex is not None and not self.regex.fullmatch(path):
            return f"path does not match {self.path_value!r}"
        if self.method is not None and self.method != method:
            return f"method is {method}, needs {self.method}"
        for kind, conditions in (("header", self.headers), ("query parameter", self.query)):
            for name, value, pattern in conditions:
                got = request.header(name) if kind == "header" else request.query(name)
                if got is None:
                    return f"{kind} {name} is missing"
                if pattern is None and got != value:
                    return f"{kind} {name} is {got!r}, needs {value!r}"
                if pattern is not None and not pattern.fullmatch(got):
                    return f"{kind} {name} is {got!r}, does not match {value!r}"
        return None

    def describe(self) -> str:
        parts = [f"{self.path_type} {self.path_value}"]
        if self.method:
            parts.append(f"method {self.method}")
        parts += [f"header {n}={v}" for n, v, _ in self.headers]
        parts += [f"query {n}={v}" for n, v, _ in self.query]
        return ", ".join(parts)


def _condition(c: table.ValueCondition) -> Condition:
    return (c.name, c.value, Pattern(c.value) if c.type == "RegularExpression" else None)


class Group:
    """The entries of one host group, indexed by path."""

    __slots__ = ("exact", "prefix", "regex")

    def __init__(self, routes: table.HostRoutes) -> None:
        self.exact = {path: tuple(Entry(e) for e in es) for path, es in routes.exact.items()}
        self.regex = tuple(Entry(e) for e in routes.regex)
        self.prefix = {path: tuple(Entry(e) for e in es) for path, es in routes.prefix.items()}

    def match(self, path: str, method: str, request: RequestView) -> Entry | None:
        entries = self.exact.get(path)
        if entries:
            for entry in entries:
                if entry.accepts(method, request):
                    return entry
        for entry in self.regex:
            if entry.regex is not None and entry.regex.fullmatch(path) and entry.accepts(method, request):
                return entry
        prefix = self.prefix
        if prefix:
            key = path[:-1] if path.endswith("/") else path
            while True:
                entries = prefix.get(key)
                if entries:
                    for entry in entries:
                        if entry.accepts(method, request):
                            return entry
                if not key:
                    break
                key = key[: key.rfind("/")]
        return None

    def in_order(self) -> Iterator[Entry]:
        """Every entry in precedence order (for explain)."""
        for entries in self.exact.values():
            yield from entries
        yield from self.regex
        for key in sorted(self.prefix, key=len, reverse=True):
            yield from self.prefix[key]


def _groups(
    now: dict[str, table.HostRoutes], before: dict[str, table.HostRoutes], built: dict[str, Group]
) -> dict[str, Group]:
    groups = {}
    for key, routes in now.items():
        kept = built.get(key)
        groups[key] = kept if kept is not None and before.get(key) is routes else Group(routes)
    return groups


@dataclass(frozen=True)
class Considered:
    group: str
    entry: Entry
    reason: str


class Router:
    """The compiled match structure of one L7 listener."""

    def __init__(
        self,
        listener: table.L7Listener,
        previous: Router | None = None,
        changed: set[tuple[str, str]] | None = None,
    ) -> None:
        """changed: the (exact | wildcard | any, key) host groups that differ from the
        listener previous was built from; None: compare them all."""
        self.rules = listener.rules
        self.source = listener.hosts
        if previous is not None and changed is not None:
            self._patch(listener.hosts, previous, changed)
            return
        # A host group whose table object did not change keeps its compiled Group.
        old = previous.source if previous is not None else table.HostIndex()
        self.exact: dict[str, Group] = _groups(
            listener.hosts.exact, old.exact, previous.exact if previous else {}
        )
        self.wildcard: dict[str, Group] = _groups(
            listener.hosts.wildcard, old.wildcard, previous.wildcard if previous else {}
        )
        self.any: Group | None = None
        if listener.hosts.any is not None:
            same = previous is not None and previous.any is not None and old.any is listener.hosts.any
            self.any = previous.any if same and previous is not None else Group(listener.hosts.any)

    def _patch(self, hosts: table.HostIndex, previous: Router, changed: set[tuple[str, str]]) -> None:
        self.exact = dict(previous.exact) if any(k == "exact" for k, _ in changed) else previous.exact
        self.wildcard = (
            dict(previous.wildcard) if any(k == "wildcard" for k, _ in changed) else previous.wildcard
        )
        self.any = previous.any
        for kind, key in changed:
            if kind == "any":
                self.any = Group(hosts.any) if hosts.any is not None else None
                continue
            groups = self.exact if kind == "exact" else self.wildcard
            routes = (hosts.exact if kind == "exact" else hosts.wildcard).get(key)
            if routes is None:
                groups.pop(key, None)
            else:
                groups[key] = Group(routes)

    def groups(self, host: str) -> Iterator[tuple[str, Group]]:
        """Host groups that apply to host (already normalized), most specific first."""
        group = self.exact.get(host)
        if group is not None:
            yield host, group
        if self.wildcard:
            dot = host.find(".")
            while dot != -1:
                group = self.wildcard.get(host[dot:])
                if group is not None:
                    yield "*" + host[dot:], group
                dot = host.find(".", dot + 1)
        if self.any is not None:
            yield "*", self.any

    def match(self, host: str, path: str, method: str, request: RequestView) -> Entry | None:
        """The winning entry, or None (404). host must be normalized, path normalized."""
        group = self.exact.get(host)
        if group is not None:
            found = group.match(path, method, request)
            if found is not None:
                return found
        if self.wildcard:
            dot = host.find(".")
            while dot != -1:
                group = self.wildcard.get(host[dot:])
                if group is not None:
                    found = group.match(path, method, request)
                    if found is not None:
                        return found
                dot = host.find(".", dot + 1)
        if self.any is not None:
            return self.any.match(path, method, request)
        return None

    def explain(
        self, host: str, path: str, method: str, request: RequestView
    ) -> tuple[Entry | None, list[Considered]]:
        """The winner and, before it in precedence order, every entry and why it lost."""
        considered: list[Considered] = []
        for label, group in self.groups(host):
            winner = group.match(path, method, request)
            for entry in group.in_order():
                if entry is winner:
                    return winner, considered
                reason = entry.mismatch(path, method, request)
                if reason is not None:
                    considered.append(Considered(label, entry, reason))
        return None, considered
