"""The header modifier filters (RequestHeaderModifier, ResponseHeaderModifier).

Headers stay as received, a list of (name, value) byte pairs; names compare lower-cased.
A modifier never touches the fields the proxy writes itself (framing, hop-by-hop,
Host): a route cannot change how the next hop reads the byte stream. The compiler refuses
such modifiers with a message; this is the dataplane's own guard.

A request modifier also leaves X-Request-Id alone: the proxy writes it after the filters,
and the id the backend receives is the one in the access log, so their logs join.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .. import table
from .framing import FRAMING, HOP_BY_HOP, REQUEST_ID, Headers

_UNTOUCHABLE: Final = HOP_BY_HOP | FRAMING
_UNTOUCHABLE_REQUEST: Final = _UNTOUCHABLE | {REQUEST_ID}


@dataclass(frozen=True)
class Modifier:
    """A compiled RequestHeaderModifier / ResponseHeaderModifier."""

    set: tuple[tuple[bytes, bytes], ...]
    add: tuple[tuple[bytes, bytes], ...]
    remove: frozenset[bytes]

    @classmethod
    def of(cls, ops: table.HeaderOps | None, *, request: bool) -> Modifier | None:
        """The modifier of a request's headers (request=True) or a response's."""
        if ops is None:
            return None
        untouchable = _UNTOUCHABLE_REQUEST if request else _UNTOUCHABLE

        def allowed(name: str) -> bool:
            return name.lower().encode() not in untouchable

        return cls(
            set=tuple((h.name.encode(), h.value.encode()) for h in ops.set if allowed(h.name)),
            add=tuple((h.name.encode(), h.value.encode()) for h in ops.add if allowed(h.name)),
            remove=frozenset(name.lower().encode() for name in ops.remove if allowed(name)),
        )

    def apply(self, headers: Headers) -> Headers:
        """Gateway API semantics, names compared without case: remove; then set, replacing
        every line of the name; then add, appending to the existing value ("foo" and an
        added "bar" make "foo,bar", as the spec's example: RFC 9110 makes the lines of a
        field one comma-separated list)."""
        replaced = self.remove | {name.lower() for name, _ in self.set}
        out = [(name, value) for name, value in headers if name.lower() not in replaced]
        out.extend(self.set)
        for name, value in self.add:
            _append(out, name, value)
        return out


def _append(headers: Headers, name: bytes, value: bytes) -> None:
    """Add value to the field name: joined to its existing lines, which become one line in
    their place. Set-Cookie is the exception RFC 9110 names: each cookie keeps its line."""
    lower = name.lower()
    found = [i for i, (n, _) in enumerate(headers) if n.lower() == lower]
    if not found or lower == b"set-cookie":
        headers.append((name, value))
        return
    first = found[0]
    joined = b",".join([*(headers[i][1] for i in found), value])
    headers[first] = (headers[first][0], joined)
    for i in reversed(found[1:]):
        del headers[i]
