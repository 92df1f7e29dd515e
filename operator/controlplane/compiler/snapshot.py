"""The compiler's input: every object it reads, as plain Kubernetes dicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Object = Mapping[str, Any]

# The kinds the compiler reads, by the name used in snapshots and statuses.
ROUTE_KINDS = ("L4Listener", "L7Route")
REFERENCE_KINDS = ("Service", "EndpointSlice", "Secret", "ConfigMap")  # what routes refer to
INPUT_KINDS = (*ROUTE_KINDS, *REFERENCE_KINDS)


class ObjectKey(NamedTuple):
    """Identifies an object: kind, namespace and name.

    A named tuple, not a dataclass: keys are hashed some 100,000 times per compile at
    10,000 routes, and a tuple hashes in C.
    """

    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Object) -> ObjectKey:
        meta = obj.get("metadata") or {}
        return cls(
            str(obj.get("kind", "")),
            str(meta.get("namespace") or "default"),
            str(meta.get("name", "")),
        )

    @property
    def ref(self) -> str:
        """namespace/name, as the table and the logs name an object."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Snapshot:
    """All objects of the kinds in INPUT_KINDS; order carries no meaning.

    last_valid holds, per route key, the last object of that key that validated (what the
    previous compile returned as Compiled.last_valid). When an object's newer version does
    not validate (a typo, a field the schema lacks), that object is compiled instead, so a
    bad edit never takes a route down; its status says so. Empty: no fallback.
    """

    objects: tuple[Object, ...] = field(default_factory=tuple)
    last_valid: Mapping[ObjectKey, Object] = field(default_factory=dict)

    @classmethod
    def of(cls, objects: Iterable[Object], last_valid: Mapping[ObjectKey, Object] | None = None) -> Snapshot:
        return cls(tuple(o for o in objects if o.get("kind") in INPUT_KINDS), last_valid or {})

    def of_kind(self, kind: str) -> list[Object]:
        return [o for o in self.objects if o.get("kind") == kind]


def generation(obj: Object) -> int | None:
    value = (obj.get("metadata") or {}).get("generation")
    return int(value) if isinstance(value, int) else None


def age_key(obj: Object) -> tuple[str, str, str]:
    """Sorts oldest first: creationTimestamp, then namespace/name.

    RFC 3339 timestamps in UTC sort as strings. Objects without one (files) count as
    equally old, older than any stamped object, so ties go to namespace/name.
    """
    key = ObjectKey.of(obj)
    stamp = str((obj.get("metadata") or {}).get("creationTimestamp") or "")
    return (stamp, key.namespace, key.name)
