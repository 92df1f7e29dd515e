"""Session persistence (Gateway API GEP-1619): a client stays on the endpoint that served it.

The proxy gives the client a token naming the endpoint, in a cookie or a response header,
and routes a request that brings a valid token back to that endpoint while it is in the
table and available (healthy, not ejected). Otherwise the request is balanced as usual
and the answer carries a new token: a client whose endpoint went away moves and is told.

A token is ``ID`` or ``ID.CREATED.LAST``: ID is a hash of the cluster and endpoint, so the
token does not show a pod's address and every replica of the dataplane reads it the same
way without sharing state; CREATED and LAST (hex Unix seconds) are there when the session
has an absolute or idle timeout, and LAST is renewed on every answer when there is an idle
timeout. The hash hides the address from casual view only (an IPv4 address space can be
searched); a client that edits its token can only pick another endpoint it could have been
balanced to anyway, or lengthen its own session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import table
from ..health import EndpointState

# A token dated this far in the future is forged or from a clock far off: not trusted.
MAX_CLOCK_SKEW = 60.0


def endpoint_id(cluster: str, endpoint: EndpointState) -> str:
    return hashlib.blake2b(f"{cluster}|{endpoint.key}".encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class Pin:
    """A valid token's endpoint: the backend at position of the rule, and when it began."""

    position: int
    endpoint: EndpointState
    created: int


class SessionPolicy:
    """One rule's session persistence over its backends' endpoints."""

    __slots__ = ("_ids", "_index", "cookie", "name", "session", "timed")

    def __init__(self, session: table.Session, backends: list[tuple[str, list[EndpointState]]]) -> None:
        """backends: the cluster name and endpoints of each of the rule's backends, in order."""
        self.session = session
        self.cookie = session.type == "Cookie"
        self.name = session.name.encode()
        self.timed = session.absoluteTimeout is not None or session.idleTimeout is not None
        self._index: dict[str, tuple[int, EndpointState]] = {}
        self._ids: dict[tuple[int, EndpointState], str] = {}
        for position, (cluster, endpoints) in enumerate(backends):
            for endpoint in endpoints:
                eid = endpoint_id(cluster, endpoint)
                self._index.setdefault(eid, (position, endpoint))
                self._ids[position, endpoint] = eid

    def token(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The token the request brings, if any."""
        lower = self.name.lower()
        if not self.cookie:
            values = [v for n, v in headers if n.lower() == lower]
            return values[0].decode("latin-1").strip() if len(values) == 1 else None
        prefix = self.name + b"="
        for n, v in headers:
            if n.lower() == b"cookie":
                for part in v.split(b";"):
                    pair = part.strip()
                    if pair.startswith(prefix):
                        return pair[len(prefix) :].decode("latin-1")
        return None

    def find(self, token: str | None, now: float) -> Pin | None:
        """The pin of a token that is well formed, known and not expired (now: Unix time)."""
        if not token:
            return None
        eid, _, times = token.partition(".")
        found = self._index.get(eid)
        if found is None:
            return None
        created = 0
        if self.timed:
            created_text, _, last_text = times.partition(".")
            try:
                created, last = int(created_text, 16), int(last_text, 16)
            except ValueError:
                return None
            absolute, idle = self.session.absoluteTimeout, self.session.idleTimeout
            if created > now + MAX_CLOCK_SKEW or last < created or last > now + MAX_CLOCK_SKEW:
                return None
            if absolute is not None and now - created > absolute:
                return None
            if idle is not None and now - last > idle:
                return None
        elif times:
            return None
        return Pin(found[0], found[1], created)

    def issue(
        self, position: int, endpoint: EndpointState, pin: Pin | None, now: float, *, secure: bool
    ) -> tuple[bytes, bytes] | None:
        """The header that gives the client its token after an answer from endpoint; None
        when the token it brought stays valid as it is."""
        eid = self._ids.get((position, endpoint))
        if eid is None:
            return None
        same = pin is not None and pin.position == position and pin.endpoint is endpoint
        if same and self.session.idleTimeout is None:
            return None
        if not self.timed:
            value = eid
            created = int(now)
        else:
            created = pin.created if same and pin is not None else int(now)
            value = f"{eid}.{created:x}.{int(now):x}"
        if not self.cookie:
            return self.name, value.encode()
        attributes = f"; Path={self.session.path}; HttpOnly"
        if secure:
            attributes += "; Secure"
        if self.session.permanent and self.session.absoluteTimeout is not None:
            left = max(1, int(self.session.absoluteTimeout - (now - created)))
            attributes += f"; Max-Age={left}"
        return b"set-cookie", self.name + b"=" + (value + attributes).encode()
