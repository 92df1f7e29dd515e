"""Compile memo: work on what did not change is not done again.

Between two compiles a handful of 10,000 routes usually changed. The memo remembers, for
each piece of a compile, the inputs it was computed from and the result; a compile
reuses a result when the inputs are the same objects (identity: the operator's store
keeps an unchanged object's dict, and the memo holds the objects so their ids stay
theirs) or, for objects read again from files, the same content. Results are always
those of a compile without the memo; a hypothesis test checks that over random change
sequences.

Reused results are also the same objects, so the table a compile produces shares every
unchanged part with the previous one: diffing two tables (dataplane.delta) and summing
their part hashes cost work in proportion to what changed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .snapshot import Object, ObjectKey

if TYPE_CHECKING:
    from dataplane import table

    from ..resources.common import Condition
    from . import _State
    from .backends import BackendResolver, Resolution
    from .l7 import _RouteOut
    from .ports import Invalid, Parsed
    from .tls import SecretIndex

# What a fingerprint is made of: hashable values that compare by content.
Fingerprint = tuple[object, ...]


def fingerprint(obj: Object) -> Fingerprint:
    meta = obj.get("metadata") or {}
    version = meta.get("resourceVersion")
    if version:
        return ("rv", meta.get("uid"), version, meta.get("generation"))
    return (
        "content",
        obj.get("apiVersion"),
        json.dumps(obj.get("spec"), sort_keys=True, default=str),
        meta.get("generation"),
        meta.get("creationTimestamp"),
    )


class CompileCache:
    """What earlier compiles computed, keyed by what they computed it from."""

    def __init__(self) -> None:
        # id(obj) -> (obj, key, Parsed or the validation error), for objects seen last time
        self.by_identity: dict[int, tuple[Object, ObjectKey, Parsed | Invalid]] = {}
        # key -> (fingerprint, Parsed or the validation error), for objects read again
        self._entries: dict[ObjectKey, tuple[Fingerprint, Parsed | Invalid]] = {}
        # The Services, EndpointSlices and Secrets of the last compile, and what was
        # built from them (the backend resolver and the secret index).
        self.references: tuple[tuple[Object, ...] | None, tuple[BackendResolver, SecretIndex]] | None = None
        # L7Route -> (its parse, the resolver and the signature of its references it was
        # compiled with, its compiled output)
        self.routes: dict[ObjectKey, tuple[Parsed, BackendResolver, tuple[object, ...], _RouteOut]] = {}
        # L4Listener -> (its parse, the resolver, its listener and how its backends resolved)
        self.l4: dict[ObjectKey, tuple[Parsed, BackendResolver, tuple[table.Listener, Resolution]]] = {}
        # object -> ((the function that made its conditions, its parse, its other inputs),
        # the conditions); see port.memo_status
        self.statuses: dict[ObjectKey, tuple[tuple[object, ...], list[Condition]]] = {}
        self.state: _State | None = None  # the last compile's result and ports, to start the next from
        self.hits = 0
        self.misses = 0

    def get(self, key: ObjectKey, print_: Fingerprint) -> Parsed | Invalid | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == print_:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def put(self, key: ObjectKey, print_: Fingerprint, result: Parsed | Invalid) -> None:
        self._entries[key] = (print_, result)

    def retain(self, keys: set[ObjectKey]) -> None:
        """Forget objects that are gone: every key not in keys."""
        if len(self._entries) > len(keys):  # every key has an entry: else nothing is gone
            self.forget([k for k in self._entries if k not in keys])

    def forget(self, keys: list[ObjectKey]) -> None:
        """Forget these objects (they are gone)."""
        for memo in (self._entries, self.routes, self.l4, self.statuses):
            for key in keys:
                memo.pop(key, None)
