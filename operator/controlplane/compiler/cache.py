"""Compile memo: work on an object whose content did not change is not done again.

Between two compiles usually a handful of 10,000 routes changed. The memo keeps each
object's last parse (keyed by what identifies its content: the API server's
resourceVersion when there is one, the JSON of its spec otherwise) and each L7Route's
compiled rules (keyed by its parsed model and how its references resolved). Results are
the same as without the memo.
"""

from __future__ import annotations

import json
from typing import Any

from .snapshot import Object, ObjectKey


def fingerprint(obj: Object) -> Any:
    meta = obj.get("metadata") or {}
    version = meta.get("resourceVersion")
    if version:
        return ("rv", meta.get("uid"), version, meta.get("generation"))
    return (
        "content",
        obj.get("apiVersion"),
        json.dumps(obj.get("spec"), sort_keys=True, default=str),
        meta.get("generation"),
    )


class CompileCache:
    """Last parse per object key, and last compiled rules per route."""

    def __init__(self) -> None:
        self._entries: dict[ObjectKey, tuple[Any, Any]] = {}
        self.routes: dict[ObjectKey, tuple[Any, Any, Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: ObjectKey, print_: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == print_:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def put(self, key: ObjectKey, print_: Any, result: Any) -> None:
        self._entries[key] = (print_, result)

    def retain(self, keys: set[ObjectKey]) -> None:
        """Forget objects that are gone."""
        for key in [k for k in self._entries if k not in keys]:
            del self._entries[key]
        for key in [k for k in self.routes if k not in keys]:
            del self.routes[key]
