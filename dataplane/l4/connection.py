"""One proxied TCP connection: two paired protocols that copy bytes straight across.

The hot path is ``Side.buffer_updated``: the kernel reads into a pooled buffer, the bytes
go to the other socket's transport at once, the buffer goes back to the pool. Nothing is
allocated per read in the common case and nothing runs per message.

Flow control: every transport's write high-water mark is 0, so a write is attempted at
once and whatever the kernel does not take immediately calls ``pause_writing``. Then the
reading side stops reading and keeps its buffer (the pending write still refers to it:
uvloop and Python 3.12+ keep a reference, they do not copy) until ``resume_writing``
says the other socket drained. So at most one buffer per direction is in flight, and a
slow reader costs a bounded amount of memory, whatever the sender does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, cast

from ..logs import fields
from . import proxyproto

if TYPE_CHECKING:
    from ..health import EndpointState
    from .listener import L4Config, ServingL4

log = logging.getLogger("bilayer.l4")

READ_SIZE = 64 * 1024
MAX_CONNECT_ATTEMPTS = 8


class BufferPool:
    """Read buffers (with a memoryview each, to slice without copying)."""

    __slots__ = ("free", "limit", "size")

    def __init__(self, size: int = READ_SIZE, limit: int = 64) -> None:
        self.size = size
        self.limit = limit
        self.free: list[tuple[bytearray, memoryview]] = []

    def take(self) -> tuple[bytearray, memoryview]:
        if self.free:
            return self.free.pop()
        buffer = bytearray(self.size)
        return buffer, memoryview(buffer)

    def give(self, pair: tuple[bytearray, memoryview]) -> None:
        if len(self.free) < self.limit:
            self.free.append(pair)


# The event loop is single-threaded; one pool serves every connection of the process.
POOL = BufferPool()


class Side(asyncio.BufferedProtocol):
    """One socket of a connection; what it reads is written to `other`."""

    __slots__ = ("buffer", "conn", "early", "eof", "held", "other", "received", "target", "transport")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.target: asyncio.Transport | None = None  # the other side's transport, once connected
        self.buffer: tuple[bytearray, memoryview] | None = None
        self.early = b""  # bytes read before the backend connected
        self.held = False
        self.received = 0
        self.eof = False

    def _attach(self, base: asyncio.BaseTransport) -> asyncio.Transport:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        return transport

    def get_buffer(self, sizehint: int) -> bytearray:
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = POOL.take()
        return buffer[0]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        buffer = self.buffer
        assert buffer is not None
        target = self.target
        if target is None:
            self._keep_early(buffer[1][:nbytes])
            return
        target.write(buffer[1][:nbytes])
        if not self.held:
            POOL.give(buffer)
            self.buffer = None

    def _keep_early(self, data: memoryview) -> None:
        # The client spoke before the backend answered (uvloop starts reading only after
        # connection_made, so pausing there is too early): keep these bytes, stop reading.
        self.early += data
        assert self.transport is not None and self.buffer is not None
        self.transport.pause_reading()
        POOL.give(self.buffer)
        self.buffer = None

    def pause_writing(self) -> None:
        # Our transport holds unsent bytes that the other side read into its buffer.
        other = self.other
        if other is not None and other.transport is not None:
            other.held = True
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is None:
            return
        other.held = False
        if other.buffer is not None:
            POOL.give(other.buffer)
            other.buffer = None
        if other.transport is not None and not other.eof:
            other.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.conn.half_closed(self)
        return True  # keep the transport open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self, exc)


class ClientSide(Side):
    """The accepted socket."""

    __slots__ = ()

    def __init__(self, listener: ServingL4) -> None:
        super().__init__(Connection(listener, self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.accepted(self._attach(transport))


class BackendSide(Side):
    """The socket to the chosen endpoint."""

    __slots__ = ()

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.other = conn.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)


class Connection:
    """The pair of sides, the endpoint, timers and counters of one proxied connection."""

    __slots__ = (
        "backend",
        "client",
        "client_address",
        "config",
        "connecting",
        "endpoint",
        "finished",
        "idle_bytes",
        "idle_handle",
        "idle_since",
        "listener",
        "reason",
        "started",
    )

    def __init__(self, listener: ServingL4, client: ClientSide) -> None:
        self.listener = listener
        self.client = client
        self.backend: BackendSide | None = None
        self.config: L4Config = listener.config
        self.endpoint: EndpointState | None = None
        self.client_address: tuple[str, int] = ("", 0)
        self.connecting: asyncio.Task[None] | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_bytes = 0
        self.idle_since = 0.0
        self.started = 0.0
        self.reason = ""
        self.finished = False

    def accepted(self, transport: asyncio.Transport) -> None:
        listener = self.listener
        if listener.active_connections >= self.config.max_connections:
            listener.rejected["max_connections"] += 1
            self.finished = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_address = (peer[0], peer[1]) if peer else ("", 0)
        self.started = time.monotonic()
        listener.connections.add(self)
        listener.accepted += 1
        transport.pause_reading()  # nowhere to send bytes until the backend answers
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        config = self.config
        if config.reject_share and random.random() < config.reject_share:
            self.listener.rejected["unresolved_backend"] += 1
            self._close_both("unresolved-backend")
            return
        loop = asyncio.get_running_loop()
        key = self.client_address[0].encode()
        tried: set[EndpointState] = set()
        for _ in range(min(len(config.balancer.endpoints), MAX_CONNECT_ATTEMPTS)):
            endpoint = config.balancer.pick(key, time.monotonic(), frozenset(tried))
            if endpoint is None:
                break
            tried.add(endpoint)
            try:
                async with asyncio.timeout(config.connect_timeout):
                    _, backend = await loop.create_connection(
                        lambda: BackendSide(self), endpoint.address, endpoint.port
                    )
            except (OSError, TimeoutError):
                endpoint.connect_failures += 1
                self.listener.connect_failures += 1
                self.listener.health.report_failure(endpoint)
                continue
            self.listener.health.report_success(endpoint)
            self._established(endpoint, backend)
            return
        self.listener.rejected["no_endpoint" if not tried else "connect_failed"] += 1
        self._close_both("no-endpoint" if not tried else "connect-failed")

    def _established(self, endpoint: EndpointState, backend: BackendSide) -> None:
        self.connecting = None
        client_transport = self.client.transport
        assert backend.transport is not None and client_transport is not None
        if self.finished:  # the client left while we were connecting
            backend.transport.close()
            return
        self.endpoint = endpoint
        endpoint.active += 1
        endpoint.total += 1
        self.backend = backend
        self.client.other = backend
        if self.config.proxy_protocol != "None":
            local = client_transport.get_extra_info("sockname")
            backend.transport.write(proxyproto.header(self.config.proxy_protocol, self.client_address, local))
        self.client.target = backend.transport
        backend.target = client_transport
        # Either side may have spoken before this point (the order of callbacks differs
        # between uvloop and asyncio): replay what was kept, then let both sides read.
        for side in (self.client, backend):
            assert side.target is not None and side.transport is not None
            if side.early:
                side.target.write(side.early)
                side.early = b""
            if side.eof:
                side.target.write_eof()
            elif not side.held:
                side.transport.resume_reading()
        idle = self.config.idle_timeout
        self.idle_since = time.monotonic()
        self.idle_handle = asyncio.get_running_loop().call_later(idle / 4, self._check_idle)

    def _check_idle(self) -> None:
        # Counting bytes is free on the hot path; the timer compares counts instead of
        # being re-armed on every read. A connection closes within 1.25 x idle.
        now = time.monotonic()
        moved = self.client.received + (self.backend.received if self.backend else 0)
        if moved != self.idle_bytes:
            self.idle_bytes = moved
            self.idle_since = now
        idle = self.config.idle_timeout
        if now - self.idle_since >= idle:
            self._close_both("idle-timeout")
            return
        self.idle_handle = asyncio.get_running_loop().call_later(idle / 4, self._check_idle)

    def half_closed(self, side: Side) -> None:
        if self.backend is None:
            return  # not connected yet: _established forwards the EOF after any early bytes
        if not self.reason:
            self.reason = "client-closed" if side is self.client else "backend-closed"  # who went first
        other = side.other
        if other is None or other.transport is None or other.transport.is_closing() or other.eof:
            self._close_both(self.reason)
            return
        if other.transport.can_write_eof():
            other.transport.write_eof()  # sent after anything still buffered

    def lost(self, side: Side, exc: Exception | None) -> None:
        if not self.reason:
            who = "client" if side is self.client else "backend"
            self.reason = f"{who}-reset" if exc is not None else f"{who}-closed"
        other = side.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            if exc is not None:
                other.transport.abort()
            else:
                other.transport.close()
        if side is self.client and self.connecting is not None:
            self.connecting.cancel()
        self._finish()

    def _close_both(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self._finish()

    def abort(self, reason: str) -> None:
        """Close both sockets at once, dropping unsent bytes (drain deadline)."""
        self.reason = reason
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None:
                side.transport.abort()
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.endpoint is not None:
            self.endpoint.active -= 1
        self.listener.closed(self)

    def log_fields(self) -> dict[str, object]:
        return fields(
            client=f"{self.client_address[0]}:{self.client_address[1]}",
            listener=self.listener.port,
            source=self.config.source,
            backend=self.endpoint.key if self.endpoint else None,
            bytes_from_client=self.client.received,
            bytes_from_backend=self.backend.received if self.backend else 0,
            seconds=round(time.monotonic() - self.started, 3),
            reason=self.reason,
        )


def log_connection(conn: Connection, sample: float) -> None:
    if sample >= 1.0 or random.random() < sample:
        log.info("connection closed", extra=conn.log_fields())
