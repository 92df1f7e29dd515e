"""Part paths: which part of a routing table a hash, a check or a delta change is about.

A table is a flat set of parts (``Table.parts()``), each named by a path. On the wire (a
delta's ``path``) and in the version's part hashes a path is a list of strings:

- ``clusters/<name>``: a cluster;
- ``listeners/<port>/<face>``: the head of a port's face, ``l4``, ``passthrough``,
  ``l7`` (an L7 listener's TLS and http2 only) or ``udp``;
- ``listeners/<port>/l7/rules/<id>``: one rule of an L7 listener;
- ``listeners/<port>/l7/<exact|wildcard|any>/<key>``: one host group (``any`` has the key "").

``PartPath`` holds the same strings as fields, so it hashes and compares as cheaply as the
tuples it replaces, and sorts the same way: a head before the rules and host groups
under it (its empty ``kind`` sorts first), which a delta relies on.
"""

from __future__ import annotations

from typing import NamedTuple

HEADS = ("l4", "passthrough", "l7", "udp")
HOST_KINDS = ("exact", "wildcard", "any")


_new = tuple.__new__


class PathError(ValueError):
    """A list of strings that names no part of a table; the message says why."""


class PartPath(NamedTuple):
    section: str  # "clusters" or "listeners"
    name: str  # the cluster's name, or the port in decimal
    face: str = ""  # one of HEADS under a port; "" for a cluster
    kind: str = ""  # under an L7 head: "rules" or one of HOST_KINDS; "" for a head
    key: str = ""  # the rule's id or the host group's key ("" for any)

    # --- constructors ---

    # The constructors make the tuple directly (tuple.__new__): the generated __new__ is
    # a Python call more, and a whole table's parts are 20,000 paths at 10,000 routes.

    @classmethod
    def cluster(cls, name: str) -> PartPath:
        return _new(cls, ("clusters", name, "", "", ""))

    @classmethod
    def head(cls, port: int | str, face: str) -> PartPath:
        """The head of a port's face: l4, passthrough, l7 or udp."""
        return _new(cls, ("listeners", str(port), face, "", ""))

    @classmethod
    def rule(cls, port: int | str, rule_id: str) -> PartPath:
        return _new(cls, ("listeners", str(port), "l7", "rules", rule_id))

    @classmethod
    def host_group(cls, port: int | str, kind: str, key: str) -> PartPath:
        """An L7 listener's host group: kind exact, wildcard or any (key "")."""
        return _new(cls, ("listeners", str(port), "l7", kind, key))

    @classmethod
    def from_wire(cls, segments: list[str] | tuple[str, ...]) -> PartPath:
        """The path a delta's list of strings names; raises PathError when it names none."""
        if len(segments) == 2 and segments[0] == "clusters":
            return cls.cluster(segments[1])
        if len(segments) >= 3 and segments[0] == "listeners":
            port = segments[1]
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise PathError(f"port must be 1-65535, not {port!r}")
            if len(segments) == 3 and segments[2] in HEADS:
                return cls.head(port, segments[2])
            if len(segments) == 5 and segments[2] == "l7" and segments[3] in ("rules", *HOST_KINDS):
                if segments[3] == "any" and segments[4] != "":
                    raise PathError("the any host group has the key ''")
                return cls("listeners", port, "l7", segments[3], segments[4])
        raise PathError(f"{'/'.join(segments)!r} names no part of a table")

    # --- what it names ---

    @property
    def is_cluster(self) -> bool:
        return self.section == "clusters"

    @property
    def is_head(self) -> bool:
        """A face's head: an L4, passthrough or UDP listener, or an L7 head."""
        return self.section == "listeners" and not self.kind

    @property
    def is_rule(self) -> bool:
        return self.kind == "rules"

    @property
    def is_host_group(self) -> bool:
        return self.kind in HOST_KINDS

    @property
    def port(self) -> int:
        """The port of a listener's part (not for a cluster)."""
        assert self.section == "listeners", self
        return int(self.name)

    @property
    def model_kind(self) -> str:
        """What the value at this path is: clusters, a face (l4, l7, ...), rules, or a host kind."""
        return self.kind or self.face or self.section

    # --- its forms ---

    def segments(self) -> tuple[str, ...]:
        """The strings of the wire form, without the empty fields of shorter paths."""
        if self.kind:
            return self
        return (self.section, self.name, self.face) if self.face else (self.section, self.name)

    def where(self) -> str:
        """Where a problem with this part is, as the dotted field name of the table."""
        if self.is_cluster:
            return f"clusters.{self.name}"
        base = f"listeners.{self.name}.{self.face}"
        if self.is_rule:
            return f"{base}.rules.{self.key}"
        if self.is_host_group:
            return f"{base}.hosts.{self.kind}" + (f".{self.key}" if self.kind != "any" else "")
        return base

    def __str__(self) -> str:
        return "/".join(self.segments())
