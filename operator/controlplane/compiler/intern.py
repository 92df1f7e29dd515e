"""Small table values shared between the routes that have the same one.

Table models are frozen values; most routes use the same few (a PathPrefix "/", the default
load balancing, a backend of weight 1 on a popular Service). One object each saves about a
dozen allocations per route: time and megabytes at 10,000 routes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from dataplane import table

M = TypeVar("M", bound=table._Model)

LIMIT = 100_000  # distinct values kept; past it, start over (the values stay valid)
_values: dict[tuple[Any, ...], Any] = {}


def interned(cls: type[M], **values: Any) -> M:
    """cls.build(**values), the same object for the same values (which must be hashable)."""
    key = (cls, *values.items())
    found = _values.get(key)
    if found is None:
        if len(_values) >= LIMIT:
            _values.clear()
        found = _values[key] = cls.build(**values)
    return found


# Match entries without header or query conditions share these (never changed in place).
NO_CONDITIONS: list[table.ValueCondition] = []
