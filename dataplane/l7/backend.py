"""What an exchange (or a mirrored copy) sends a backend, whatever the protocol on the wire.

The exchange builds a BackendRequest (method, target, authority, end-to-end headers and how
its body is framed), then gives the body as it arrives, then ends it. Each kind of backend
connection writes that in its own framing: an HTTP/1.1 connection as a request head and
content-length or chunked bytes (upstream.Upstream), an HTTP/2 stream as HEADERS and DATA
frames (h2upstream.H2Stream). Responses come back through the User's ResponseSink events.
"""

from __future__ import annotations

from typing import Protocol

from ..health import EndpointState
from .framing import BadMessage, Headers
from .reader import ResponseSink


class BackendRequest:
    """A request for a backend, in no protocol's framing yet (built positionally: it is
    made for every request; an __init__ of its own, which mypyc compiles, as RequestHead)."""

    __slots__ = ("authority", "body", "headers", "method", "target", "te_trailers", "upgrade")

    def __init__(  # noqa: PLR0917 (positional: made for every request)
        self,
        method: str,
        target: bytes,
        authority: bytes,
        headers: Headers,
        body: int,
        upgrade: bytes,
        te_trailers: bool,
    ) -> None:
        self.method = method
        self.target = target  # path and query, as sent on the request line or in :path
        self.authority = authority  # Host, or :authority
        self.headers = headers  # end-to-end fields (no framing, no hop-by-hop)
        self.body = body  # a length >= 0, CHUNKED (length unknown) or NO_BODY
        self.upgrade = upgrade  # b"websocket" or b""
        self.te_trailers = te_trailers  # the client said it accepts trailers (TE: trailers)


class User(ResponseSink, Protocol):
    """Who a backend connection serves, one request at a time: an exchange, or a mirrored copy."""

    batch: list[bytes] | None  # response bytes held until flush (None: not holding)

    def hold(self) -> None: ...

    def flush(self) -> None: ...

    def upstream_failed(self, bad: BadMessage) -> None: ...

    def upstream_upgraded(self, rest: bytes) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def upstream_refused(self) -> None:
        """The backend did not process the request (HTTP/2 REFUSED_STREAM, or a stream above
        a GOAWAY's last stream id): it may be sent again, whatever its method."""

    def backend_full(self, full: bool) -> None: ...


class Reading(Protocol):
    """Pausing the response: flow.Flow for a connection, a stream's window for HTTP/2."""

    reasons: set[str]

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...

    def reset(self) -> None: ...


class Backend(Protocol):
    """One request's way to an endpoint: an HTTP/1.1 connection or an HTTP/2 stream."""

    endpoint: EndpointState
    reused: bool  # on a connection that served before (a failure may be it going stale)

    @property
    def flow(self) -> Reading: ...

    def attach(self, user: User, request: BackendRequest, body: bytes, end: bool) -> None:
        """Serve user: send the request head and the body read so far (end: all of it)."""

    def send(self, data: bytes) -> None:
        """More of the request body (as read from the client, unframed)."""

    def end(self, trailers: Headers | None = None) -> None:
        """The request body is complete (idempotent)."""

    def done(self, *, reusable: bool) -> None:
        """The user is finished; reusable: the request was sent whole and may be followed."""

    def discard(self) -> None:
        """Never reuse: the user gave up on it (timeout, retry, client gone)."""

    def unused(self) -> None:
        """Made for a user that no longer needs it: keep it for another."""

    def buffered(self) -> int:
        """Request bytes held, not yet on the wire."""


class Connecting(Protocol):
    """Who waits for a new backend connection."""

    def connected(self, upstream: Backend) -> None: ...

    def connect_failed(self, endpoint: EndpointState, error: str) -> None: ...
