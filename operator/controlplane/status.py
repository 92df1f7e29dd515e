"""Turning compiler output into the status users read: Programmed, transition times."""

from __future__ import annotations

from collections.abc import Iterable

from .compiler import Compiled, ObjectKey
from .compiler import conditions as c
from .resources.common import Condition


def programmed(
    compiled: Compiled,
    key: ObjectKey,
    acked: int,
    total: int,
    *,
    port_error: str | None = None,
    unit: str = "dataplane pods",
) -> Condition:
    """The Programmed condition of one object, given how many dataplanes acknowledged."""
    accepted = compiled.statuses[key][0]
    generation = accepted.observedGeneration
    if key not in compiled.served:
        reason = accepted.reason if accepted.status == "False" else "NotServed"
        return c.condition(c.PROGRAMMED, False, reason, "not in the routing table: see Accepted", generation)
    if port_error:
        return c.condition(c.PROGRAMMED, False, "ListenerFailed", port_error, generation)
    message = f"{acked}/{total} {unit}"
    if total == 0:
        return c.condition(c.PROGRAMMED, False, "NoDataplanes", "no ready dataplane pods", generation)
    if acked < total:
        return c.condition(c.PROGRAMMED, False, "Pending", message, generation)
    return c.condition(c.PROGRAMMED, True, c.PROGRAMMED, message, generation)


def merge(old: Iterable[Condition], new: Iterable[Condition], now: str) -> list[Condition]:
    """New conditions, keeping lastTransitionTime where a condition's status did not change."""
    previous = {cond.type: cond for cond in old}
    merged = []
    for cond in new:
        before = previous.get(cond.type)
        stamp = before.lastTransitionTime if before and before.status == cond.status else None
        merged.append(cond.model_copy(update={"lastTransitionTime": stamp or now}))
    return merged


def same(a: Iterable[Condition], b: Iterable[Condition]) -> bool:
    """Equal but for transition times: then no status write is needed."""

    def strip(conds: Iterable[Condition]) -> list[Condition]:
        return [cond.model_copy(update={"lastTransitionTime": None}) for cond in conds]

    return strip(a) == strip(b)
