"""Two sockets copying bytes straight across: the mechanism under every L4 connection and
every L7 tunnel (WebSocket after a 101).

The hot path is ``Side.data_received``: the event loop reads into its own buffer (one for
the whole loop), hands over the bytes, and they go to the other socket's transport at once.
That is one call into Python per read and a bytes object the transport writes without
another copy or view. A BufferedProtocol reading into pooled buffers, tried first, costs
twice the instructions per read (two calls, a memoryview per read, and uvloop's views over
it: bench/README.md, "L4 CPU per request, compiled"), and its smaller reads (64 KiB against
256 KiB) cost more per MB too.

Flow control: every transport's write high-water mark is 0, so a write is attempted at
once and whatever the kernel does not take immediately calls ``pause_writing``. Then the
reading side stops reading until ``resume_writing`` says the other socket drained. So at
most one read per direction is in flight (256 KiB, the read size of uvloop and of asyncio),
and a slow reader costs a bounded amount of memory, whatever the sender does.

Time is bounded by an idle timeout: a pair that moves no byte for that long is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast


class Side(asyncio.Protocol):
    """One socket of a pair; what it reads is written to `other`."""

    __slots__ = ("early", "eof", "held", "other", "pair", "received", "target", "transport")

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.target: asyncio.Transport | None = None  # the other side's transport, once connected
        self.early = b""  # bytes read before the other side was connected
        self.held = False
        self.received = 0
        self.eof = False

    def attach(self, base: asyncio.BaseTransport) -> asyncio.Transport:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        return transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        target = self.target
        if target is None:
            self._keep_early(data)
            return
        target.write(data)

    def _keep_early(self, data: bytes) -> None:
        # The client spoke before the backend answered (uvloop starts reading only after
        # connection_made, so pausing there is too early): keep these bytes, stop reading.
        self.early += data
        assert self.transport is not None
        self.transport.pause_reading()

    def pause_writing(self) -> None:
        # Our transport holds unsent bytes the other side read: it stops reading until they go.
        other = self.other
        if other is not None and other.transport is not None:
            other.held = True
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is None:
            return
        other.held = False
        if other.transport is not None and not other.eof:
            other.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.pair.half_closed(self)
        return True  # keep the transport open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)


class Pair:
    """A client side and a backend side, and the timer and bookkeeping that end them."""

    __slots__ = (
        "backend",
        "client",
        "finished",
        "idle_bytes",
        "idle_handle",
        "idle_since",
        "idle_timeout",
        "reason",
    )

    # Whether an idle pair is reset rather than closed: a close leaves whatever the kernel
    # still holds for a peer that stopped reading in its send buffer for minutes.
    ABORT_WHEN_IDLE = False

    def __init__(self, idle_timeout: float) -> None:
        self.client = self.new_side()
        self.backend: Side | None = None
        self.idle_timeout = idle_timeout
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_bytes = 0
        self.idle_since = 0.0
        self.reason = ""
        self.finished = False

    def new_side(self) -> Side:
        return Side(self)

    def start(self, backend: Side) -> None:
        """Both sides are connected: replay what each said early, let both read, start
        the idle clock."""
        self.backend = backend
        client = self.client
        client.other, backend.other = backend, client
        client.target, backend.target = backend.transport, client.transport
        # Either side may have spoken before this point (the order of callbacks differs
        # between uvloop and asyncio): replay what was kept, then let both sides read.
        for side in (client, backend):
            assert side.target is not None and side.transport is not None
            if side.early:
                side.target.write(side.early)
                side.early = b""
            if side.eof:
                side.target.write_eof()
            elif not side.held:
                side.transport.resume_reading()
        self.idle_since = time.monotonic()
        self.idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout / 4, self._check_idle)

    def _check_idle(self) -> None:
        # Counting bytes is free on the hot path; the timer compares counts instead of
        # being re-armed on every read. A pair closes within 1.25 x idle.
        now = time.monotonic()
        moved = self.client.received + (self.backend.received if self.backend else 0)
        if moved != self.idle_bytes:
            self.idle_bytes = moved
            self.idle_since = now
        if now - self.idle_since >= self.idle_timeout:
            if self.ABORT_WHEN_IDLE:
                self.abort("idle-timeout")
            else:
                self.close("idle-timeout")
            return
        self.idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout / 4, self._check_idle)

    def half_closed(self, side: Side) -> None:
        if self.backend is None:
            return  # not connected yet: start() forwards the EOF after any early bytes
        if not self.reason:
            self.reason = "client-closed" if side is self.client else "backend-closed"  # who went first
        other = side.other
        if other is None or other.transport is None or other.transport.is_closing() or other.eof:
            self.close(self.reason)
            return
        if other.transport.can_write_eof():
            other.transport.write_eof()  # sent after anything still buffered
        else:
            self.close(self.reason)  # TLS has no half-close

    def lost(self, side: Side, exc: Exception | None) -> None:
        if not self.reason:
            who = "client" if side is self.client else "backend"
            self.reason = f"{who}-reset" if exc is not None else f"{who}-closed"
        other = side.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            if exc is not None:
                other.transport.abort()
            else:
                self._close_soon(other.transport)
        self.lost_side(side)
        self._finish()

    def lost_side(self, side: Side) -> None:
        """A side's socket closed (subclasses stop what they started for it)."""

    def close(self, reason: str) -> None:
        """Close both sockets after what is buffered. A socket whose peer does not take
        those bytes within the idle timeout is aborted: it cannot hold the pair open."""
        if not self.reason:
            self.reason = reason
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None and not side.transport.is_closing():
                self._close_soon(side.transport)
        self._finish()

    def _close_soon(self, transport: asyncio.Transport) -> None:
        """Close after what is buffered; abort if the peer has not taken it within the
        idle timeout (a peer that never reads cannot hold the socket and its bytes)."""
        unsent = transport.get_write_buffer_size()
        transport.close()
        if unsent:
            asyncio.get_running_loop().call_later(self.idle_timeout, transport.abort)

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
        self.ended()

    def ended(self) -> None:
        """Both sides are done or going (subclasses account for it)."""
