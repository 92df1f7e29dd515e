"""Connections to backend endpoints, kept alive in a pool per endpoint.

An upstream serves one exchange at a time: it writes the request the exchange gives it and
reports the response (parsed and bounded by a ResponseReader) back to that exchange. A
connection goes back to the pool only when the exchange says it may (the request was sent
whole, nobody asked to close) and its response ended exactly at the end of the bytes read:
bytes past a response's end, a parse error, or an unfinished response close it instead, so a
backend that frames one response wrongly can never answer another client's request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Final, cast

from ..health import EndpointState
from .backend import Backend, BackendRequest, Connecting, User
from .dial import H2, PLAIN, Dial
from .flow import Flow
from .framing import CHUNKED, LAST_CHUNK, PROTECTED, BadMessage, Headers, chunk, request_bytes, serialize
from .h2upstream import H2Connection
from .reader import NO_SINK, Limits, ResponseReader

__all__ = ["Backend", "Connecting", "Pool", "Upstream", "User"]

log = logging.getLogger("bilayer.dataplane")

IDLE_SECONDS = 60.0
MAX_IDLE_PER_ENDPOINT: Final = 256


class Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an endpoint."""

    __slots__ = (
        "chunked",
        "dial",
        "endpoint",
        "exchange",
        "feeding",
        "flow",
        "idle_since",
        "pool",
        "reader",
        "release",
        "reused",
        "transport",
    )

    def __init__(self, endpoint: EndpointState, pool: Pool, dial: Dial = PLAIN) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.dial = dial
        self.transport: asyncio.Transport | None = None
        self.flow = Flow()  # reading responses pauses while the client's socket is full
        self.exchange: User | None = None
        self.reader = ResponseReader(pool.limits)
        self.idle_since = 0.0  # when it went back to the pool
        self.reused = False
        self.feeding = False
        self.chunked = False  # the current request's body is sent chunked
        self.release: bool | None = None  # set when the exchange let go: may it be pooled?

    # --- what an exchange calls ---

    def attach(self, exchange: User, request: BackendRequest, body: bytes, end: bool) -> None:
        """Serve exchange: write its request head (and whatever body is ready) in one write;
        the response is parsed as the answer to it and reported to the exchange."""
        self.exchange = exchange
        self.reader.expect(exchange, request.method, request.upgrade)
        chunked = self.chunked = request.body == CHUNKED
        data = request_bytes(request.method, request.target, request.authority, request.headers, request.body)
        if body:
            data += chunk(body) if chunked else body
        if end and chunked:
            data += LAST_CHUNK
            self.chunked = False  # ended: nothing more to frame
        self._write(data)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(chunk(data) if self.chunked else data)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def end(self, trailers: Headers | None = None) -> None:
        if self.chunked:
            self.chunked = False
            if trailers:
                kept = [(n, v) for n, v in trailers if n.lower() not in PROTECTED]
                self._write(b"0\r\n%s\r\n" % serialize(kept))
            else:
                self._write(LAST_CHUNK)

    def unused(self) -> None:
        self.pool.give(self)

    def buffered(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def done(self, *, reusable: bool) -> None:
        """The exchange is finished with this connection. Pooled only if reusable and the
        response ended cleanly: decided once the current read is parsed."""
        self.exchange = None
        self.reader.sink = NO_SINK
        self.release = reusable
        if self.flow.reasons:
            self.flow.reset()
        if not self.feeding:
            self._settle()

    def discard(self) -> None:
        """Never reuse: the exchange gave up on it (timeout, retry, client gone)."""
        self.exchange = None
        self.reader.sink = NO_SINK
        self.release = None
        self.abort()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the backend broke the protocol. Drop it.
            self.abort()
            return
        # Everything this read produces for the client (head, body, chunk framing) leaves
        # in one write: each write is a system call.
        exchange.hold()
        self.feeding = True
        try:
            rest = self.reader.feed(data)
        except BadMessage as bad:
            self.feeding = False
            if self.exchange is not None:
                self.exchange.upstream_failed(bad)
            self.abort()
            return
        finally:
            self.feeding = False
            if exchange.batch is not None:
                exchange.flush()
        if rest is not None:
            if self.exchange is not None:
                self.exchange.upstream_upgraded(rest)
            else:
                self.abort()
            return
        if self.reader.skip_body:
            self.reader.after_feed()
        if self.release is not None:
            self._settle()

    def _settle(self) -> None:
        release, self.release = self.release, None
        reader = self.reader
        if release and reader.ended and not reader.dirty and not reader.in_message:
            self.pool.give(self)
        else:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.reader.sink = NO_SINK
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.backend_full(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.backend_full(False)

    # --- life cycle ---

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """Idle HTTP/1.1 connections by endpoint, and HTTP/2 connections with streams to spare.

    Connections are kept apart by their Dial (HTTP/1.1 in clear, TLS with its settings,
    HTTP/2): the same endpoint can be in clusters reached differently.
    """

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.idle: dict[EndpointState, list[Upstream]] = {}  # HTTP/1.1 in clear (the fast path)
        self.idle_by: dict[tuple[EndpointState, Dial], list[Upstream]] = {}  # HTTP/1.1 over TLS
        self.h2: dict[tuple[EndpointState, Dial], list[H2Connection]] = {}
        # What an endpoint chose in ALPN last time (a Dial of "auto"): h2 connections are
        # shared while being made only when h2 is expected.
        self.learned: dict[tuple[EndpointState, Dial], str] = {}
        # Users waiting for an HTTP/2 connection being made: they share it.
        self.waiting: dict[tuple[EndpointState, Dial], list[Connecting]] = {}
        self.connects = 0
        self.clock = now  # loop time of the last expiry sweep: idle times are that coarse

    def take(self, endpoint: EndpointState, dial: Dial = PLAIN) -> Backend | None:
        """A pooled way to endpoint: the most recently used idle HTTP/1.1 connection (the
        least likely to have been closed by the backend's own keep-alive timeout), or a
        stream on an HTTP/2 connection with room."""
        idle = self.idle.get(endpoint) if dial is PLAIN else self._other(endpoint, dial)
        while idle:
            upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.reused = True
                return upstream
        if dial is not PLAIN and self.h2:
            for conn in self.h2.get((endpoint, dial), ()):
                if conn.available():
                    return conn.open_stream()
        return None

    def _other(self, endpoint: EndpointState, dial: Dial) -> list[Upstream] | None:
        return self.idle_by.get((endpoint, dial))

    def expects_h2(self, endpoint: EndpointState, dial: Dial) -> bool:
        return dial.protocol == H2 or self.learned.get((endpoint, dial)) == H2

    def give(self, upstream: Upstream) -> None:
        transport = upstream.transport
        if transport is None or transport.is_closing():
            return
        if upstream.dial is PLAIN:
            idle = self.idle.setdefault(upstream.endpoint, [])
        else:
            idle = self.idle_by.setdefault((upstream.endpoint, upstream.dial), [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            upstream.close()
            return
        idle.append(upstream)
        upstream.idle_since = self.clock

    def expire(self, now: float) -> None:
        """Close connections idle longer than IDLE_SECONDS (oldest first in each list)."""
        self.clock = now
        cutoff = now - IDLE_SECONDS
        for lists in (self.idle, self.idle_by):
            for idle in lists.values():
                while idle and idle[0].idle_since <= cutoff:
                    idle.pop(0).close()
        for conns in self.h2.values():
            for conn in conns:
                conn.tick(now, cutoff)

    def forget(self, upstream: Upstream) -> None:
        idle = (
            self.idle.get(upstream.endpoint)
            if upstream.dial is PLAIN
            else self._other(upstream.endpoint, upstream.dial)
        )
        if idle and upstream in idle:
            idle.remove(upstream)

    def forget_h2(self, conn: H2Connection) -> None:
        conns = self.h2.get((conn.endpoint, conn.dial))
        if conns and conn in conns:
            conns.remove(conn)

    def close(self) -> None:
        for lists in (self.idle, self.idle_by):
            for idle in lists.values():
                for upstream in idle:
                    upstream.close()
            lists.clear()
        for conns in self.h2.values():
            for conn in list(conns):
                conn.close()
        self.h2.clear()

    async def connect(
        self, endpoint: EndpointState, *, limit: float, dial: Dial = PLAIN
    ) -> Upstream | H2Connection:
        """A new connection to endpoint within limit seconds (over TLS and in the protocol
        the dial says, or the server chose in ALPN); raises OSError or TimeoutError. An
        HTTP/2 connection is returned once the server's SETTINGS are in, so its stream limit
        is known before streams are opened."""
        loop = asyncio.get_running_loop()
        if dial.error:
            raise ssl.SSLError(dial.error)
        async with asyncio.timeout(limit):
            if dial.ssl is not None:
                _, chooser = await loop.create_connection(
                    lambda: _Chooser(endpoint, self, dial),
                    endpoint.address,
                    endpoint.port,
                    ssl=dial.ssl,
                    server_hostname=dial.server_name,
                )
                made = chooser.chosen
                assert made is not None
            elif dial.protocol == H2:
                _, made = await loop.create_connection(
                    lambda: H2Connection(endpoint, self, dial), endpoint.address, endpoint.port
                )
            else:
                _, made = await loop.create_connection(
                    lambda: Upstream(endpoint, self), endpoint.address, endpoint.port
                )
            if isinstance(made, H2Connection):
                try:
                    await made.ready
                except BaseException:
                    made.abort()  # (no SETTINGS in time: not left open)
                    raise
        self.connects += 1
        if isinstance(made, H2Connection):
            self.learned[(endpoint, dial)] = H2
            self.h2.setdefault((endpoint, dial), []).append(made)
        elif dial is not PLAIN:
            self.learned[(endpoint, dial)] = "http/1.1"
        return made


class _Chooser(asyncio.Protocol):
    """The protocol of a TLS connection until its handshake is done: then the server's ALPN
    choice says which connection it is, and that one takes the transport over (before any
    byte arrives: the server's SETTINGS may be in the first read)."""

    def __init__(self, endpoint: EndpointState, pool: Pool, dial: Dial) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.dial = dial
        self.chosen: Upstream | H2Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        made: Upstream | H2Connection
        if self.dial.chosen(alpn) == H2:
            made = H2Connection(self.endpoint, self.pool, self.dial)
        else:
            made = Upstream(self.endpoint, self.pool, self.dial)
        self.chosen = made
        transport.set_protocol(made)
        made.connection_made(transport)
