"""Parsing route objects into models, remembered per object between compiles."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from pydantic import ValidationError

from ..resources.common import Condition
from ..resources.l4listener import L4Listener
from ..resources.l7route import L7Route
from . import conditions as c
from .cache import CompileCache, fingerprint
from .ports import Invalid, Parsed
from .snapshot import ROUTE_KINDS, Object, ObjectKey, Snapshot, age_key, generation

_MODELS: dict[str, type[L4Listener] | type[L7Route]] = {
    "L4Listener": L4Listener,
    "L7Route": L7Route,
}

Entry = tuple[Object, ObjectKey, "Parsed | Invalid"]


def parse_all(snapshot: Snapshot, cache: CompileCache) -> dict[ObjectKey, list[Parsed | Invalid]]:
    """Every route object's parse, by key (the same key twice happens with files).

    Remembers each object's parse by identity in cache.by_identity for the next compile."""
    seen: dict[int, Entry] = {}
    by_key: dict[ObjectKey, list[tuple[Object, Parsed | Invalid]]] = {}
    for obj in snapshot.objects:
        if obj.get("kind") not in ROUTE_KINDS:
            continue
        entry = entry_of(obj, cache)
        seen[id(obj)] = entry
        by_key.setdefault(entry[1], []).append((obj, entry[2]))
    cache.by_identity = seen
    cache.retain(set(by_key))
    return {key: [result for _, result in choose(copies)] for key, copies in by_key.items()}


def choose(
    copies: list[tuple[Object, Parsed | Invalid]],
) -> list[tuple[Object, Parsed | Invalid]]:
    """The copies of one key with the one that counts first: the choice must not depend on
    input order."""
    if len(copies) == 1:
        return copies
    return sorted(copies, key=lambda o: json.dumps(o[0], sort_keys=True, default=str))


def entry_of(obj: Object, cache: CompileCache) -> Entry:
    """The object's key and parse: remembered by identity, else by fingerprint, else new."""
    entry = cache.by_identity.get(id(obj))
    if entry is not None and entry[0] is obj:
        return entry
    key = ObjectKey.of(obj)
    return (obj, key, _parse(key, obj, cache))


def with_fallback(
    key: ObjectKey, result: Parsed | Invalid, last_valid: Mapping[ObjectKey, Object], cache: CompileCache
) -> Parsed | Invalid:
    """result, or when it is Invalid and the key had a valid version, that version marked
    as superseded by result's condition."""
    if isinstance(result, Parsed):
        return result
    previous = last_valid.get(key)
    if previous is None:
        return result
    kept = _parse(key, previous, cache)
    if not isinstance(kept, Parsed):
        return result  # not valid either (a caller's mistake): nothing to fall back to
    return dataclasses.replace(kept, superseded=result.conditions[0])


def superseded_conditions(parsed: Parsed, conditions: list[Condition], served: bool) -> list[Condition]:
    """The conditions of an object served from its last valid version: the newer version's
    Accepted=False (saying what still serves) in place of the old version's Accepted; the
    other conditions are the old version's, with its observedGeneration."""
    invalid = parsed.superseded
    assert invalid is not None
    if served:
        generation = parsed.generation
        kept = f"generation {generation}" if generation is not None else "the last valid version"
        message = f"{invalid.message}. Until this is fixed, {kept} is still served"
        invalid = c.condition(c.ACCEPTED, False, c.INVALID, message, invalid.observedGeneration)
    if conditions and conditions[0] is invalid:
        return conditions  # already in place (kept from the last compile)
    return [invalid, *(cond for cond in conditions if cond.type != c.ACCEPTED)]


def _parse(key: ObjectKey, obj: Object, cache: CompileCache) -> Parsed | Invalid:
    """The object's model with its identity and age, or why it is invalid."""
    print_ = fingerprint(obj)
    result = cache.get(key, print_)
    if result is None:
        try:
            model = _MODELS[key.kind].model_validate(_without_status(obj))
            result = Parsed(key=key, generation=generation(obj), age=age_key(obj), model=model)
        except ValidationError as err:
            message = "; ".join(c.describe_validation_error(err))
            result = Invalid([c.condition(c.ACCEPTED, False, c.INVALID, message, generation(obj))])
        cache.put(key, print_, result)
    return result


def _without_status(obj: Object) -> dict[str, object]:
    return {k: v for k, v in obj.items() if k != "status"}
