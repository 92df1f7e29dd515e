"""Header handling on the request path: hop-by-hop removal and the modifier filters.

Headers stay as received, a list of (name, value) byte pairs; names compare lower-cased.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import table

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded. Headers named in
# Connection are added per message.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


def connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


@dataclass(frozen=True)
class Modifier:
    """A compiled RequestHeaderModifier / ResponseHeaderModifier."""

    set: tuple[tuple[bytes, bytes], ...]
    add: tuple[tuple[bytes, bytes], ...]
    remove: frozenset[bytes]

    @classmethod
    def of(cls, ops: table.HeaderOps | None) -> Modifier | None:
        if ops is None:
            return None
        return cls(
            set=tuple((h.name.encode(), h.value.encode()) for h in ops.set),
            add=tuple((h.name.encode(), h.value.encode()) for h in ops.add),
            remove=frozenset(name.lower().encode() for name in ops.remove),
        )

    def apply(self, headers: Headers) -> Headers:
        """Gateway API semantics: remove, then set (replacing any), then add (appending)."""
        replaced = self.remove | {name.lower() for name, _ in self.set}
        out = [(name, value) for name, value in headers if name.lower() not in replaced]
        out.extend(self.set)
        out.extend(self.add)
        return out


def serialize(headers: Headers) -> bytes:
    parts: list[bytes] = []
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)
