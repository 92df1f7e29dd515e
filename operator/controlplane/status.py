"""Turning compiler output into the status users read: Programmed, transition times."""

from __future__ import annotations

from collections.abc import Iterable

from .compiler import Compiled, ObjectKey
from .compiler import conditions as c
from .resources.common import Condition


def served_generation(conditions: list[Condition]) -> int | None:
    """The generation the table serves: the Accepted condition's, except for an object
    served from its last valid version (its newer one did not validate), whose other
    conditions speak of the version served."""
    accepted = conditions[0]
    if accepted.status == "False":
        for condition in conditions[1:]:
            if condition.type != c.ACCEPTED:
                return condition.observedGeneration
    return accepted.observedGeneration


def is_udp_error(error: str) -> bool:
    """A port number may have a TCP and a UDP face; a dataplane's bind error names the face
    that failed ("cannot listen on udp ADDRESS:PORT: ..."), so that it marks the listeners
    of that face only."""
    return error.startswith(("cannot listen on udp ", "no udp "))


def programmed(
    compiled: Compiled,
    key: ObjectKey,
    acked: int,
    total: int,
    *,
    port_error: str | None = None,
    unit: str = "every dataplane pod that serves a table",
) -> Condition:
    """The Programmed condition of one object, given how many of the dataplanes serving a
    table serve this object as it is now. The message names no pod count: a count in
    every object's message rewrote all 10,000 statuses on every pod event (about 40,000
    PATCHes for a two-pod rollout); counts are in the operator's metrics."""
    accepted = compiled.statuses[key][0]
    generation = served_generation(compiled.statuses[key])
    if key not in compiled.served:
        reason = accepted.reason if accepted.status == "False" else "NotServed"
        return c.condition(c.PROGRAMMED, False, reason, "not in the routing table: see Accepted", generation)
    if port_error:
        return c.condition(c.PROGRAMMED, False, "ListenerFailed", port_error, generation)
    if total == 0:
        return c.condition(
            c.PROGRAMMED, False, "NoDataplanes", "no dataplane pod serves a table yet", generation
        )
    if acked < total:
        return c.condition(c.PROGRAMMED, False, "Pending", f"not yet served by {unit}", generation)
    return c.condition(c.PROGRAMMED, True, c.PROGRAMMED, f"served by {unit}", generation)


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
