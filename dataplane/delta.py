"""Table deltas: the parts that changed between two tables, sent instead of the whole.

At 10,000 routes a table is about 2 MB; a new route changes one rule and one host group.
A delta names the version it applies to (``base``) and the version it produces. The
dataplane validates each new part, checks references only where the delta touched the
table, and refuses the delta unless the result has the promised version, so a pod
patched from any base ends exactly where a full push would have taken it.

Paths are those of ``Table.parts()`` (``dataplane.parts.PartPath``; on the wire, lists
of strings). A port has a TCP face and a UDP face. Setting ``listeners/<port>/l4``,
``.../passthrough`` or ``.../l7`` (an L7 head: its TLS and http2) replaces a TCP listener
of another kind; removing one removes the whole TCP face (an L7
listener's rules and host groups with it). ``listeners/<port>/udp`` sets or removes the
UDP face alone. A delta lists heads before the rules and host groups under them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import ValidationError

from .parts import PartPath, PathError
from .table import (
    HASH_SPACE,
    TLS,
    Cluster,
    HostIndex,
    HostRoutes,
    L4Listener,
    L7Listener,
    Listener,
    Passthrough,
    Table,
    TableError,
    UDPListener,
    _Model,
    check_l4_faces,
    check_part,
    entries_of,
    l7_parts,
    part_hash,
    part_model,
    rule_refs,
    version_of,
)

Change = tuple[PartPath, _Model | None]  # the new value, or None: removed


class BaseMismatch(Exception):
    """The delta applies to another version than the one served: push the whole table."""


@dataclass(frozen=True)
class Delta:
    base: str
    version: str
    generation: int
    changes: tuple[Change, ...]

    def to_json(self) -> bytes:
        changes: list[dict[str, Any]] = []
        for path, value in self.changes:
            if value is None:
                changes.append({"path": list(path.segments())})
                continue
            exclude = {"rules", "hosts"} if isinstance(value, L7Listener) else None
            dumped = value.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude=exclude)
            changes.append({"path": list(path.segments()), "value": dumped})
        document = {"base": self.base, "version": self.version, "generation": self.generation}
        return json.dumps({**document, "changes": changes}, separators=(",", ":")).encode()


# (path, value before, value after, implied): implied changes follow from another one in
# the same delta (the parts of a removed listener) and are not sent.
_Step = tuple[PartPath, _Model | None, _Model | None, bool]


@dataclass(frozen=True)
class Changes:
    """Where two tables may differ, as the producer of the second knows it: only these
    ports, and under a port only these part paths (None: anything under the port). The
    clusters are compared only when clusters is True. base is the first table's version."""

    base: str
    ports: Mapping[int, set[PartPath] | None]
    clusters: bool = False


def diff(old: Table, new: Table, changes: Changes | None = None) -> Delta:
    """The changes that turn old into new (new must be stamped). changes, when it is about
    these two tables, limits the comparison to where they may differ."""
    steps = _steps(old, new, changes if changes is not None and changes.base == old.version else None)
    parts = tuple((path, after) for path, _, after, implied in steps if not implied)
    return Delta(old.version, new.version, new.generation, parts)


def carry_parts_sum(old: Table, new: Table, changes: Changes | None = None) -> None:
    """Give new its version sum from old's and the parts that differ: O(changes), where
    hashing every part of a 10,000-route table is some 20,000 hashes."""
    total = old.parts_sum()
    for path, before, after, _ in _steps(old, new, changes):
        if before is not None:
            total -= part_hash(path, before)
        if after is not None:
            total += part_hash(path, after)
    new.set_parts_sum(total % HASH_SPACE)


def _steps(old: Table, new: Table, changes: Changes | None) -> Iterator[_Step]:
    if changes is None or changes.clusters:
        yield from _diff_map(PartPath.cluster, old.clusters, new.clusters)
    ports = set(old.listeners) | set(new.listeners) if changes is None else set(changes.ports)
    for port in sorted(ports):
        was, now = old.listeners.get(port), new.listeners.get(port)
        if was is now:
            continue
        key = str(port)
        paths = changes.ports.get(port) if changes is not None else None
        if paths is not None and was is not None and now is not None and was.l7 and now.l7:
            yield from _listed(key, was, now, paths)
            continue
        yield from _tcp_steps(key, was, now)
        was_udp = was.udp if was is not None else None
        now_udp = now.udp if now is not None else None
        if was_udp is not now_udp and was_udp != now_udp:
            yield PartPath.head(key, "udp"), was_udp, now_udp, False


def _tcp_head(listener: Listener | None) -> str | None:
    """Which head the TCP face has: l4, passthrough, l7 or None."""
    if listener is None:
        return None
    if listener.l4 is not None:
        return "l4"
    if listener.passthrough is not None:
        return "passthrough"
    return "l7" if listener.l7 is not None else None


def _tcp_steps(key: str, was: Listener | None, now: Listener | None) -> Iterator[_Step]:
    was_head, now_head = _tcp_head(was), _tcp_head(now)
    if was is not None and was_head != now_head:
        # Removed, or replaced by another kind: every old part goes; only the removal of
        # a head with nothing in its place is sent. A port that had only a UDP face has no
        # TCP parts to remove: its new TCP face is all new.
        for i, (path, value) in enumerate(was.tcp_parts(key) if was_head is not None else ()):
            yield path, value, None, now_head is not None or i > 0
        was = None
    if now is None or now_head is None:
        return
    if now_head != "l7":
        path = PartPath.head(key, now_head)
        before = getattr(was, now_head) if was is not None else None
        after = getattr(now, now_head)
        if before is not after and before != after:
            yield path, before, after, False
        return
    assert now.l7 is not None
    if was is None:
        yield from ((path, None, value, False) for path, value in l7_parts(key, now.l7))
        return
    assert was.l7 is not None
    yield from _diff_l7(key, was.l7, now.l7)


def _diff_l7(port: str, was: L7Listener, now: L7Listener) -> Iterator[_Step]:
    if was.tls != now.tls or was.http2 != now.http2:
        yield PartPath.head(port, "l7"), was, now, False
    yield from _diff_map(partial(PartPath.rule, port), was.rules, now.rules)
    for kind in ("exact", "wildcard"):
        groups_was, groups_now = getattr(was.hosts, kind), getattr(now.hosts, kind)
        yield from _diff_map(partial(PartPath.host_group, port, kind), groups_was, groups_now)
    if was.hosts.any is not now.hosts.any and was.hosts.any != now.hosts.any:
        yield PartPath.host_group(port, "any", ""), was.hosts.any, now.hosts.any, False


def _listed(port: str, was_port: Listener, now_port: Listener, paths: set[PartPath]) -> Iterator[_Step]:
    """The steps among the listed part paths of one L7 listener (and the port's UDP face)."""
    was, now = was_port.l7, now_port.l7
    assert was is not None and now is not None
    for path in sorted(paths):
        before: _Model | None
        after: _Model | None
        if path.face == "udp":
            if was_port.udp is not now_port.udp and was_port.udp != now_port.udp:
                yield path, was_port.udp, now_port.udp, False
            continue
        if path.is_head:
            if was.tls != now.tls or was.http2 != now.http2:
                yield path, was, now, False
            continue
        kind, key = path.kind, path.key
        if path.is_rule:
            before, after = was.rules.get(key), now.rules.get(key)
        elif kind == "any":
            before, after = was.hosts.any, now.hosts.any
        else:
            before, after = getattr(was.hosts, kind).get(key), getattr(now.hosts, kind).get(key)
        if before is not after and before != after:
            yield path, before, after, False


def _diff_map(
    path: Callable[[str], PartPath], was: Mapping[str, _Model], now: Mapping[str, _Model]
) -> Iterator[_Step]:
    """The steps between two maps of parts; path makes a key's part path."""
    if was is now:
        return
    for key, value in now.items():
        before = was.get(key)
        # Identity first: the compiler reuses the parts of routes that did not change.
        if before is not value and before != value:
            yield path(key), before, value, False
    for key, value in was.items():
        if key not in now:
            yield path(key), value, None, False


# --- receiving ---


def parse(body: bytes | str) -> Delta:
    """Parse a delta document, validating every value against its part's model."""
    try:
        document = json.loads(body)
    except ValueError as err:
        raise TableError(f"delta: not JSON: {err}") from None
    if not isinstance(document, dict):
        raise TableError("delta: expected an object with base, version, generation, changes")
    base, version, generation = document.get("base"), document.get("version"), document.get("generation")
    if not isinstance(base, str) or not isinstance(version, str) or not version:
        raise TableError("delta: base and version must be strings (the versions before and after)")
    if not isinstance(generation, int) or generation < 0:
        raise TableError("delta.generation: must be a non-negative integer")
    raw = document.get("changes")
    if not isinstance(raw, list):
        raise TableError("delta.changes: must be a list")
    changes = tuple(_change(i, item) for i, item in enumerate(raw))
    return Delta(base, version, generation, changes)


def _change(i: int, item: Any) -> Change:
    where = f"delta.changes.{i}"
    segments = item.get("path") if isinstance(item, dict) else None
    if not isinstance(segments, list) or not all(isinstance(p, str) for p in segments):
        raise TableError(f"{where}.path: must be a list of strings")
    try:
        path = PartPath.from_wire(segments)
    except PathError as err:
        raise TableError(f"{where}.path: {err}") from None
    if "value" not in item or item["value"] is None:
        return path, None
    try:
        value = part_model(path).model_validate(item["value"])
    except ValidationError as err:
        first = err.errors()[0]
        inner = ".".join(str(p) for p in first["loc"])
        raise TableError(f"{where}.value{'.' + inner if inner else ''}: {first['msg']}") from None
    if isinstance(value, L7Listener) and (value.rules or value.hosts != HostIndex()):
        raise TableError(f"{where}.value: an L7 head carries tls and http2 only; rules and hosts are parts")
    assert isinstance(value, _Model)
    return path, value


# --- applying ---


class _L7Draft:
    """An L7 listener being patched: its maps are copied once, then changed in place."""

    def __init__(self, l7: L7Listener) -> None:
        self.tls: TLS | None = l7.tls
        self.http2 = l7.http2
        self.rules = dict(l7.rules)
        self.groups: dict[str, dict[str, HostRoutes]] = {
            "exact": dict(l7.hosts.exact),
            "wildcard": dict(l7.hosts.wildcard),
            "any": {"": l7.hosts.any} if l7.hosts.any is not None else {},
        }
        # How many match entries name each rule, kept up to date as groups change, so
        # that removing a rule is checked without a pass over every group.
        self.rule_refs = Counter(rule_refs(l7))

    def parts(self, port: str) -> Iterable[tuple[PartPath, _Model]]:
        return l7_parts(port, self.freeze())

    def freeze(self) -> L7Listener:
        hosts = HostIndex.build(
            exact=self.groups["exact"], wildcard=self.groups["wildcard"], any=self.groups["any"].get("")
        )
        return L7Listener.build(rules=self.rules, hosts=hosts, tls=self.tls, http2=self.http2)


class _Patch:
    """One delta being applied: copies of what it changes, and the running version sum."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.sum = table.parts_sum()
        self.clusters: dict[str, Cluster] | None = None
        self.listeners = dict(table.listeners)
        self.drafts: dict[int, _L7Draft] = {}
        self.removed_clusters: set[str] = set()
        self.removed_rules: dict[int, set[str]] = {}
        self.touched_rules: dict[int, set[str]] = {}
        self.touched_groups: dict[int, set[tuple[str, str]]] = {}
        self.touched_l4: set[int] = set()
        self.changed: set[PartPath] = set()  # every part path added, replaced or removed

    def apply(self, path: PartPath, value: _Model | None) -> None:
        """Set the part at path to value, or remove it (None): the one way a part changes."""
        if path.is_cluster:
            assert value is None or isinstance(value, Cluster)
            self.cluster(path.name, value)
        elif path.is_head:
            self.head(path.port, path, value)
        else:
            self.sub_part(path.port, path, value)

    def add(self, path: PartPath, value: _Model) -> None:
        self.sum += part_hash(path, value)
        self.changed.add(path)

    def subtract(self, path: PartPath, value: _Model) -> None:
        self.sum -= part_hash(path, value)
        self.changed.add(path)

    def cluster(self, name: str, value: Cluster | None) -> None:
        if self.clusters is None:
            self.clusters = dict(self.table.clusters)
        before = self.clusters.pop(name, None)
        if before is not None:
            self.subtract(PartPath.cluster(name), before)
        if value is None:
            self.removed_clusters.add(name)
            return
        path = PartPath.cluster(name)
        check_part(path, value, self.clusters)
        self.clusters[name] = value
        self.removed_clusters.discard(name)
        self.add(path, value)

    def drop_tcp(self, port: int) -> None:
        """Remove whatever listens on the TCP port, with all its parts; keep its UDP face."""
        key = str(port)
        draft = self.drafts.pop(port, None)
        listener = self.listeners.pop(port, None)
        if draft is not None:
            old: Iterable[tuple[PartPath, _Model]] = draft.parts(key)
        elif listener is not None:
            old = listener.tcp_parts(key)
        else:
            old = []
        for path, value in old:
            self.subtract(path, value)
        udp_only = listener.without_tcp() if listener is not None else None
        if udp_only is not None:
            self.listeners[port] = udp_only

    def set_udp(self, port: int, path: PartPath, value: UDPListener | None) -> None:
        """Set or remove the port's UDP face; its TCP face stays."""
        current = self.listeners.get(port)
        if current is not None and current.udp is not None:
            self.subtract(path, current.udp)
        faces = {k: v for k, v in (current.__dict__ if current is not None else {}).items() if v is not None}
        faces.pop("udp", None)
        if value is not None:
            faces["udp"] = value
            self.add(path, value)
            self.touched_l4.add(port)
        if faces or port in self.drafts:
            self.listeners[port] = Listener.build(**faces)
        else:
            self.listeners.pop(port, None)

    def draft(self, port: int, path: PartPath) -> _L7Draft:
        draft = self.drafts.get(port)
        if draft is None:
            existing = self.listeners.get(port)
            if existing is None or existing.l7 is None:
                raise TableError(f"delta: {path}: port {port} has no L7 listener")
            draft = self.drafts[port] = _L7Draft(existing.l7)
        return draft

    def head(self, port: int, path: PartPath, value: _Model | None) -> None:
        """Set or remove a port's UDP face, or the head of its TCP face (an L4 or
        passthrough listener, an L7 head)."""
        if path.face == "udp":
            assert value is None or isinstance(value, UDPListener)
            self.set_udp(port, path, value)
            return
        current = self.listeners.get(port)
        is_l7 = port in self.drafts or (current is not None and current.l7 is not None)
        if value is None or path.face != "l7" or not is_l7:
            self.drop_tcp(port)
            if isinstance(value, (L4Listener, Passthrough)):
                udp = self.listeners.get(port)
                face = {path.face: value, **({"udp": udp.udp} if udp is not None else {})}
                self.listeners[port] = Listener.build(**face)
                self.touched_l4.add(port)
                self.add(path, value)
            elif isinstance(value, L7Listener):
                self.drafts[port] = _L7Draft(L7Listener.build(tls=value.tls, http2=value.http2))
                self.add(path, value)
            return
        assert isinstance(value, L7Listener)
        draft = self.draft(port, path)
        self.subtract(path, L7Listener.build(tls=draft.tls, http2=draft.http2))
        draft.tls, draft.http2 = value.tls, value.http2
        self.add(path, value)

    def sub_part(self, port: int, path: PartPath, value: _Model | None) -> None:
        """Set or remove a rule or a host group of an L7 listener."""
        draft = self.draft(port, path)
        kind, key = path.kind, path.key
        target: dict[str, Any] = draft.rules if path.is_rule else draft.groups[kind]
        before = target.get(key)
        if before is not None:
            del target[key]
            self.subtract(path, before)
            if not path.is_rule:
                gone = [e.rule for e in entries_of(before)]
                draft.rule_refs.subtract(gone)
                for rid in gone:
                    if draft.rule_refs[rid] <= 0:
                        del draft.rule_refs[rid]
        if value is not None:
            target[key] = value
            self.add(path, value)
            if isinstance(value, HostRoutes):
                draft.rule_refs.update(e.rule for e in entries_of(value))
        if path.is_rule:
            self.touched_rules.setdefault(port, set()).add(key)
            if value is None:
                self.removed_rules.setdefault(port, set()).add(key)
        else:
            self.touched_groups.setdefault(port, set()).add((kind, key))

    def result(self, delta: Delta) -> Table:
        for port, draft in self.drafts.items():
            l7 = draft.freeze()
            l7._rule_refs = draft.rule_refs
            kept = self.listeners.get(port)
            udp = {"udp": kept.udp} if kept is not None and kept.udp is not None else {}
            self.listeners[port] = Listener.build(l7=l7, **udp)
        clusters = self.table.clusters if self.clusters is None else self.clusters
        table = Table.build(
            version=delta.version,
            generation=delta.generation,
            clusters=clusters,
            listeners=self.listeners,
        )
        self._check(table)
        computed = version_of(self.sum % HASH_SPACE)
        if computed != delta.version:
            raise TableError(
                f"version: the delta produces {computed}, not the promised {delta.version}; "
                "push the whole table"
            )
        table.set_parts_sum(self.sum % HASH_SPACE)
        table.set_delta(self.table.version, self.changed)
        return table

    def _check(self, table: Table) -> None:
        """Check references where the delta changed something; the rest held before."""
        for port in self.touched_l4:
            if port in table.listeners:
                check_l4_faces(port, table.listeners[port], table.clusters)
        for port, ids in self.touched_rules.items():
            l7 = table.listeners[port].l7
            assert l7 is not None
            for rid in ids & set(l7.rules):
                check_part(PartPath.rule(port, rid), l7.rules[rid], table.clusters)
        for port, groups in self.touched_groups.items():
            l7 = table.listeners[port].l7
            assert l7 is not None
            for kind, key in groups:
                group = l7.hosts.any if kind == "any" else getattr(l7.hosts, kind).get(key)
                if group is not None:
                    check_part(PartPath.host_group(port, kind, key), group, table.clusters, l7.rules)
        gone_clusters = self.removed_clusters - set(table.clusters)
        if gone_clusters:  # rare (a Service went away): look at every backend once
            for port, listener in table.listeners.items():
                check_l4_faces(port, listener, table.clusters)
                for rid, rule in (listener.l7.rules if listener.l7 is not None else {}).items():
                    check_part(PartPath.rule(port, rid), rule, table.clusters)
        for port, ids in self.removed_rules.items():
            draft = self.drafts.get(port)
            l7 = table.listeners[port].l7 if port in table.listeners else None
            if draft is None or l7 is None:
                continue
            for rid in ids - set(l7.rules):
                if draft.rule_refs[rid] > 0:
                    raise TableError(
                        f"listeners.{port}.l7: the delta removes rule {rid!r}, "
                        f"which {draft.rule_refs[rid]} match entries still refer to"
                    )


def patch(table: Table, delta: Delta) -> Table:
    """The table delta turns table into; raises BaseMismatch or TableError (nothing changes)."""
    if delta.base != table.version:
        raise BaseMismatch(f"the delta applies to {delta.base}, this dataplane serves {table.version}")
    work = _Patch(table)
    for path, value in delta.changes:
        work.apply(path, value)
    return work.result(delta)
