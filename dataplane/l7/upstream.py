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
from typing import Protocol, cast

from ..health import EndpointState
from .flow import Flow
from .framing import BadMessage
from .reader import NO_SINK, Limits, ResponseReader, ResponseSink

IDLE_SECONDS = 60.0
MAX_IDLE_PER_ENDPOINT = 256


class User(ResponseSink, Protocol):
    """Who an upstream serves, one request at a time: an exchange, or a mirrored copy."""

    batch: list[bytes] | None  # response bytes held until flush (None: not holding)

    def hold(self) -> None: ...

    def flush(self) -> None: ...

    def upstream_failed(self, bad: BadMessage) -> None: ...

    def upstream_upgraded(self, rest: bytes) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def backend_full(self, full: bool) -> None: ...


class Connecting(Protocol):
    """Who waits for a new upstream connection."""

    def connected(self, upstream: Upstream) -> None: ...

    def connect_failed(self, endpoint: EndpointState, error: str) -> None: ...


class Upstream(asyncio.Protocol):
    """One keep-alive connection to an endpoint."""

    __slots__ = (
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

    def __init__(self, endpoint: EndpointState, pool: Pool) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.flow = Flow()  # reading responses pauses while the client's socket is full
        self.exchange: User | None = None
        self.reader = ResponseReader(pool.limits)
        self.idle_since = 0.0  # when it went back to the pool
        self.reused = False
        self.feeding = False
        self.release: bool | None = None  # set when the exchange let go: may it be pooled?

    # --- what an exchange calls ---

    def attach(self, exchange: User, data: bytes, method: str, upgrade: bytes) -> None:
        """Serve exchange: write its request head (and whatever body is ready); the
        response is parsed as the answer to it and reported to the exchange."""
        self.exchange = exchange
        self.reader.expect(exchange, method, upgrade)
        self.send(data)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

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
    """Idle upstream connections by endpoint."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.idle: dict[EndpointState, list[Upstream]] = {}
        self.connects = 0
        self.clock = now  # loop time of the last expiry sweep: idle times are that coarse

    def take(self, endpoint: EndpointState) -> Upstream | None:
        """The most recently used idle connection to endpoint (the least likely to have
        been closed by the backend's own keep-alive timeout)."""
        idle = self.idle.get(endpoint)
        while idle:
            upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.reused = True
                return upstream
        return None

    def give(self, upstream: Upstream) -> None:
        transport = upstream.transport
        if transport is None or transport.is_closing():
            return
        idle = self.idle.setdefault(upstream.endpoint, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            upstream.close()
            return
        idle.append(upstream)
        upstream.idle_since = self.clock

    def expire(self, now: float) -> None:
        """Close connections idle longer than IDLE_SECONDS (oldest first in each list)."""
        self.clock = now
        cutoff = now - IDLE_SECONDS
        for idle in self.idle.values():
            while idle and idle[0].idle_since <= cutoff:
                idle.pop(0).close()

    def forget(self, upstream: Upstream) -> None:
        idle = self.idle.get(upstream.endpoint)
        if idle and upstream in idle:
            idle.remove(upstream)

    def close(self) -> None:
        for idle in self.idle.values():
            for upstream in idle:
                upstream.close()
        self.idle.clear()

    async def connect(self, endpoint: EndpointState, *, limit: float) -> Upstream:
        """A new connection to endpoint within limit seconds; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit):
            _, upstream = await loop.create_connection(
                lambda: Upstream(endpoint, self), endpoint.address, endpoint.port
            )
        self.connects += 1
        return upstream
