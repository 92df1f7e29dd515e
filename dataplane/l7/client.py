"""A client connection to an L7 listener: reads requests, runs them one at a time.

Requests are parsed as they arrive (RequestReader: bounded heads and trailers, validated
heads) and run in order. Pipelined requests wait in a queue of at most MAX_PIPELINE, and
reading pauses while one waits, so a client cannot make the proxy hold an unbounded
pipeline. Reading also pauses while a request body has nowhere to go yet, while the
backend's socket is full, and while an upgrade waits for the backend's 101; after a 101 the
two sockets become a byte pair (tunnel.py).

Every state has a deadline, kept as one float checked by the listener's sweep (no timer per
request): a new connection's first request and a head in progress get the header timeout;
an idle keep-alive connection the keep-alive timeout; an exchange in progress is checked
every tick for bytes moving (idle timeout), trailers or a pipelined head taking longer than
the header timeout, a client that stopped reading its response, and a request body slower
than the minimum rate; a connection closing with unsent bytes is aborted after the idle
timeout; one lingering to read the rest of a request it answered early, after LINGER_SECONDS.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from . import responses
from .exchange import CHUNK, Exchange, log_connection_answer
from .flow import Flow
from .framing import FRAMING, HOP_BY_HOP, LAST_CHUNK, NO_BODY, BadMessage, Headers, RequestHead, serialize
from .h2server import PREFACE, H2Client
from .reader import RequestReader, StopReading
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .listener import ServingL7
    from .upstream import Upstream

MAX_PIPELINE: Final = 32  # requests queued behind the current one; more close the connection
LINGER_SECONDS: Final = 2.0  # reading (and dropping) the rest of a request answered early
LINGER_BYTES: Final = 1024 * 1024
BODY_RATE_GRACE = 5.0  # seconds of a request body before its rate is judged
# Never in a trailer section the proxy writes: framing and hop-by-hop fields.
_NOT_TRAILERS: Final = HOP_BY_HOP | FRAMING


class ClientConnection(asyncio.Protocol):
    """One accepted connection."""

    __slots__ = (
        "began",
        "broken",
        "broken_input",
        "client_ip",
        "closing",
        "current",
        "deadline",
        "early",
        "eof",
        "flow",
        "flushing",
        "last",
        "linger_limit",
        "lingering",
        "listener",
        "moved",
        "moved_at",
        "phase",
        "phase_at",
        "queue",
        "rate_bytes",
        "rate_from",
        "reader",
        "received",
        "receiving",
        "refusing",
        "sent",
        "sni",
        "started",
        "transport",
        "tunnel",
        "upgrading",
        "waiting",
        "write_blocked",
        "write_paused_at",
    )

    def __init__(self, listener: ServingL7) -> None:
        self.listener = listener
        self.reader = RequestReader(self, listener.limits)
        self.flow = Flow()  # reading the client's bytes
        self.flushing: list[Exchange] = []  # exchanges with request body bytes of this read
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.sni: str | None = None
        self.receiving: Exchange | None = None  # whose request body is arriving
        self.last: Exchange | None = None  # the exchange of the last head parsed
        self.current: Exchange | None = None  # whose response is being written
        self.queue: deque[Exchange] = deque()
        self.upgrading: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self.broken: tuple[int, str] | None = None  # the error to answer once the queue is done
        self.broken_input = False
        self.closing = False
        self.lingering = False
        self.linger_limit = 0
        self.refusing = False  # the pipeline overflowed: later requests are dropped
        self.eof = False
        self.early = b""  # the first bytes, while they may be the start of the HTTP/2 preface
        self.started = 0.0
        # Deadlines: `deadline` is loop time; `waiting` says what for (see check()).
        self.deadline = 0.0
        self.waiting = ""
        self.began = 0.0
        self.received = 0  # bytes from the client
        self.sent = 0  # bytes to the client
        self.moved = 0
        self.moved_at = 0.0
        self.phase = -1
        self.phase_at = 0.0
        self.write_paused_at = 0.0
        self.write_blocked = False  # the client's socket is full
        self.rate_from = 0.0
        self.rate_bytes = 0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.started = time.monotonic()
        listener = self.listener
        ssl_object = transport.get_extra_info("ssl_object") if listener.tls else None
        if ssl_object is not None:
            self.sni = getattr(ssl_object, "bilayer_sni", None)
        if len(listener.connections) >= listener.settings.max_client_connections:
            listener.rejected += 1
            self.transport.write(responses.local(503, "too many connections", close=True))
            self.transport.close()
            return
        if listener.tls and ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._become_h2(b"")
            return
        listener.connections.add(self)
        self._wait("new", listener.settings.header_timeout)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.lingering:
            if self.received > self.linger_limit and self.transport is not None:
                self.transport.close()
            return
        if self.broken_input:
            return  # bytes already in flight after a protocol error: the parser is done
        upgrading = self.upgrading
        if upgrading is not None:
            upgrading.tunnel_early += data  # reading is paused: at most one read
            return
        waiting = self.waiting
        if waiting == "idle":
            # A request begins: its head must be whole within the header timeout.
            self.began = self.listener.loop.time()
            self.waiting = "head"
            self.deadline = self.began + self.listener.settings.header_timeout
        elif waiting == "new":  # the first request: the deadline set at accept stands
            if (data[:1] == b"P" or self.early) and self.listener.h2c:
                # HTTP/2 with prior knowledge (h2c): the connection preface, maybe in parts.
                data = self.early + data
                if len(data) < len(PREFACE) and PREFACE.startswith(data):
                    self.early = data
                    return
                self.early = b""
                if data.startswith(PREFACE):
                    self._become_h2(data)
                    return
            self.began = self.listener.loop.time()
            self.waiting = "head"
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            rest = self.reader.feed(data)
        except BadMessage as bad:
            self._flush_bodies()
            self._protocol_error(bad.status, bad.message)
            return
        except StopReading:
            rest = None
            self.broken_input = True  # the pipeline overflowed: the rest is never answered
            self.flow.pause("refusing")
        if self.flushing:
            self._flush_bodies()
        if rest is not None:
            self._upgrade_parsed(rest)

    def _become_h2(self, data: bytes) -> None:
        """Hand the socket to an HTTP/2 connection (ALPN chose h2, or the h2c preface
        came); data: what was read already."""
        transport = self.transport
        assert transport is not None
        listener = self.listener
        h2 = H2Client(listener, self.client_ip, self.sni)
        listener.connections.add(h2)
        self.closing = True
        self.deadline = 0.0
        self.waiting = ""
        self.transport = self.flow.transport = None
        listener.forget(self)
        transport.set_protocol(h2)
        h2.connection_made(transport)
        if data:
            h2.data_received(data)

    def flush_after_read(self, exchange: Exchange) -> None:
        """exchange batched request body bytes: write them once this read is parsed."""
        self.flushing.append(exchange)

    def _flush_bodies(self) -> None:
        flushing, self.flushing = self.flushing, []
        for exchange in flushing:
            exchange.flush_body()

    def eof_received(self) -> bool:
        self.eof = True
        if self.reader.in_message:
            # The request being read was cut short (its head or its body): it can never
            # end, so its exchange (and any copy of it) ends now, not at a timeout.
            return False
        busy = (self.current is not None or bool(self.queue)) and not self.lingering
        # A client that half-closes after its request still gets the response (TCP only:
        # TLS has no half-close).
        return busy and not self.listener.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.deadline = 0.0
        self.waiting = ""
        for exchange in (self.current, *self.queue):
            if exchange is not None:
                exchange.client_lost()
        self.queue.clear()
        self.listener.forget(self)

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading the backend.
        self.write_paused_at = self.listener.loop.time()
        self.write_blocked = True
        if self.current is not None:
            self.current.client_full(True)

    def resume_writing(self) -> None:
        self.write_paused_at = 0.0
        self.write_blocked = False
        if self.current is not None:
            self.current.client_full(False)

    # --- RequestSink: the reader's events ---

    def request_head(self, head: RequestHead) -> None:
        if self.closing or self.refusing:
            self.receiving = self.last = None  # after a pipeline overflow or an error: dropped
            return
        exchange = Exchange(self.listener, self, head)
        self.receiving = self.last = exchange
        self.listener.requests += 1
        if self.current is None and not self.queue:
            self.current = exchange
            self._activate()
            exchange.start()
        elif len(self.queue) >= MAX_PIPELINE:
            # Answer what is queued, then close: a pipelining client resends what was
            # not answered (RFC 9112 9.3.2).
            self.listener.pipeline_overflows += 1
            self.refusing = True
            self.queue[-1].close_after = True
            self.receiving = self.last = None
            raise StopReading  # parse no further: nothing more of this stream is answered
        else:
            self.queue.append(exchange)
            self.flow.pause("pipeline")

    def request_body(self, data: bytes) -> None:
        if self.receiving is not None:
            self.receiving.request_body(data)

    def request_end(self) -> None:
        receiving, self.receiving = self.receiving, None
        if receiving is not None:
            receiving.request_end()

    # --- writing (Downstream): HTTP/1.1 framing of the exchange's response ---

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.sent += len(data)
            transport.write(data)

    def send_batch(self, batch: list[bytes]) -> None:
        self.send(batch[0] if len(batch) == 1 else b"".join(batch))

    def send_head(self, exchange: Exchange, status: int, headers: Headers, body: int, length: int) -> None:
        request = exchange.head
        if body == NO_BODY:
            framing_line = b"content-length: %d\r\n" % length if length >= 0 else b""
        elif body >= 0:
            framing_line = b"content-length: %d\r\n" % body
        elif request.version == "1.1":  # chunked or up to the backend's close: re-chunked
            framing_line = b"transfer-encoding: chunked\r\n"
            exchange.resp_mode = CHUNK
        else:
            framing_line = b""  # an HTTP/1.0 client reads up to our close
            exchange.close_after = True
        if exchange.close_after or not request.keep_alive or self.closing:
            exchange.close_after = True
            framing_line += b"connection: close\r\n"
        elif request.version == "1.0":
            framing_line += b"connection: keep-alive\r\n"
        line = responses.STATUS_LINES.get(status) or responses.status_line(status)
        data = b"%s%s%s\r\n" % (line, serialize(headers), framing_line)
        batch = exchange.batch  # this runs for every response: no helper call
        if batch is not None:
            batch.append(data)
        else:
            self.send(data)

    def send_data(self, exchange: Exchange, data: bytes) -> None:
        if exchange.resp_mode == CHUNK:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        batch = exchange.batch  # this runs for every read of a body: no helper call
        if batch is not None:
            batch.append(data)
        else:
            self.send(data)

    def send_end(self, exchange: Exchange, trailers: Headers | None) -> None:
        if exchange.resp_mode != CHUNK:
            return  # a length, or the close, ends the body: trailers have no place
        if trailers:
            # A trailer section after the last chunk; framing and hop-by-hop names never.
            kept = [(n, v) for n, v in trailers if n.lower() not in _NOT_TRAILERS]
            self._out(exchange, b"0\r\n%s\r\n" % serialize(kept))
        else:
            self._out(exchange, LAST_CHUNK)

    def send_interim(self, exchange: Exchange, status: int, headers: Headers) -> None:
        if exchange.head.version == "1.1":  # an HTTP/1.0 client knows no 1xx
            line = b"HTTP/1.1 %d %s\r\n" % (status, responses.reason(status))
            self._out(exchange, line + serialize(headers) + b"\r\n")

    def send_local(self, exchange: Exchange, status: int, message: str, headers: Headers | None) -> int:
        head_only = exchange.head.method == "HEAD"
        head, body = responses.local_parts(
            status, message, close=exchange.close_after, headers=headers, head_only=head_only
        )
        self._out(exchange, head + body)
        return len(body)

    def send_switch(self, exchange: Exchange, headers: Headers) -> None:
        headers = [*headers, (b"connection", b"upgrade")]
        self.send(b"HTTP/1.1 101 Switching Protocols\r\n%s\r\n" % serialize(headers))

    def _out(self, exchange: Exchange, data: bytes) -> None:
        """Write to the client, after what the exchange holds."""
        batch = exchange.batch
        if batch is not None:
            batch.append(data)
        else:
            self.send(data)

    # --- flow control (Downstream) ---

    def pause(self, reason: str) -> None:
        self.flow.pause(reason)

    def resume(self, reason: str) -> None:
        if reason in self.flow.reasons:
            self.flow.resume(reason)

    # --- exchanges ---

    def _activate(self) -> None:
        """An exchange became current: check on it every tick."""
        now = self.began if self.waiting == "head" else self.listener.loop.time()
        self.waiting = "active"
        self.moved = self.received + self.sent
        self.moved_at = now
        self.rate_from = 0.0
        self.deadline = now + self.listener.tick

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if self.tunnel is not None:
            return  # the connection is a byte pair now
        early = b""
        if self.upgrading is exchange:  # the backend declined the upgrade: HTTP goes on
            self.upgrading = None
            early, exchange.tunnel_early = exchange.tunnel_early, b""
            self.reader.restart()
            self.flow.resume("upgrade")
        if exchange.close_after:
            self.close()
            return
        if self.queue:
            # The next request starts on the next loop pass: the backend connection this
            # one used is back in the pool by then (it is settled after its read is parsed).
            self.listener.loop.call_soon(self._start_next)
        else:
            self._idle()
        if early and not self.closing:
            self._feed(early)

    def _start_next(self) -> None:
        if self.current is not None or self.lingering or self.transport is None:
            return
        if not self.queue:
            self._idle()
            return
        nxt = self.current = self.queue.popleft()
        if not self.queue and "pipeline" in self.flow.reasons:
            self.flow.resume("pipeline")  # its body may still be on the way
        self._activate()
        nxt.start()  # a local answer finishes at once and schedules the next

    def _idle(self) -> None:
        """Nothing in progress: answer a pending protocol error, close, or wait for a request."""
        if self.broken is not None:
            status, message = self.broken
            self.broken = None
            self._answer_and_close(status, message)
        elif self.closing or self.eof:
            self.close()
        else:
            if self.flow.reasons:
                self.flow.resume("pipeline")
            if self.reader.in_message:  # the next head has begun: it has the header timeout
                self.began = self.listener.loop.time()
                self.waiting = "head"
                self.deadline = self.began + self.listener.settings.header_timeout
            else:
                self._wait("idle", self.listener.settings.keepalive_timeout)

    def _upgrade_parsed(self, rest: bytes) -> None:
        """llhttp switched to upgrade mode after the last head; rest is what followed it."""
        exchange = self.last
        if exchange is None or exchange.done or not exchange.head.upgrade:
            if self.closing:
                return
            # Refused (or already answered): the bytes after that head are HTTP again.
            self.reader.restart()
            if rest:
                self._feed(rest)
            return
        exchange.tunnel_early = rest
        self.upgrading = exchange
        self.flow.pause("upgrade")

    def start_tunnel(self, exchange: Exchange, upstream: Upstream, backend_early: bytes) -> None:
        transport, backend = self.transport, upstream.transport
        assert transport is not None and backend is not None
        listener = self.listener
        early, exchange.tunnel_early = exchange.tunnel_early, b""
        self.upgrading = None
        self.waiting = ""
        self.deadline = 0.0
        listener.tunnels += 1
        self.tunnel = Tunnel(
            self,
            transport,
            backend,
            client_early=early,
            backend_early=backend_early,
            idle_timeout=listener.settings.idle_timeout,
            endpoint=upstream.endpoint,
        )

    def tunnel_ended(self) -> None:
        self.closing = True
        self.listener.forget(self)

    def _protocol_error(self, status: int, message: str) -> None:
        """The client broke HTTP: answer after the requests before it, then close."""
        self.listener.bad_messages["client"] += 1
        self.closing = True
        self.broken_input = True
        self.flow.pause("broken")
        receiving = self.receiving
        if receiving is not None and not receiving.request_done:
            self.receiving = None
            if receiving is self.current and not receiving.done:
                receiving.fail_request(status, message)  # the error is in its body
                return
            if receiving in self.queue:
                self.queue.remove(receiving)
        if self.current is None and not self.queue:
            self._answer_and_close(status, message)
        else:
            self.broken = (status, message)

    def _answer_and_close(self, status: int, message: str) -> None:
        """Answer a head that never became a request (malformed, too large, too slow), log
        it like any request, and close."""
        self.listener.count_response(status)
        head, body = responses.local_parts(status, message, close=True)
        self.send(head + body)
        log_connection_answer(self.listener, self.client_ip, status, len(body))
        self.close()

    # --- deadlines ---

    def _wait(self, what: str, seconds: float) -> None:
        self.waiting = what
        self.deadline = self.listener.loop.time() + seconds

    def check(self, now: float) -> None:
        """The listener's sweep: `deadline` has passed."""
        waiting = self.waiting
        if waiting == "active":
            self._check_active(now)
            return
        self.waiting, self.deadline = "", 0.0
        listener = self.listener
        if waiting == "head":
            listener.timeouts["header"] += 1
            self._answer_and_close(408, "request headers not received in time")
        elif waiting in ("new", "idle"):
            self.close()
        elif waiting in ("linger", "closing") and self.transport is not None:
            self.transport.abort()

    def _check_active(self, now: float) -> None:
        current = self.current
        listener = self.listener
        settings = listener.settings
        if current is None:
            self.waiting, self.deadline = "", 0.0
            return
        if self.write_paused_at and now - self.write_paused_at >= settings.idle_timeout:
            listener.timeouts["slow_reader"] += 1  # its response has waited that long for it
            self.abort()
            return
        moved = self.received + self.sent
        if moved != self.moved:
            self.moved, self.moved_at = moved, now
        elif now - self.moved_at >= settings.idle_timeout:
            listener.timeouts["idle"] += 1
            waiting_for_client = not current.request_whole and not self.flow.paused
            current.idle_timed_out(waiting_for_client)
            return
        reader = self.reader
        if reader.counting and reader.in_message:  # trailers, or a pipelined head, in progress
            if reader.phase != self.phase:
                self.phase, self.phase_at = reader.phase, now
            elif now - self.phase_at >= settings.header_timeout:
                listener.timeouts["header"] += 1
                self._protocol_error(408, "request headers not received in time")
                return
        if self._body_too_slow(current, now):
            listener.timeouts["body_rate"] += 1
            current.local(408, "the request body arrived too slowly", "client_timeout", close=True)
            return
        self.deadline = now + listener.tick

    def _body_too_slow(self, current: Exchange, now: float) -> bool:
        """A body arriving slower than the minimum rate (while the proxy reads it)."""
        rate = self.listener.settings.min_body_rate
        if not rate or current is not self.receiving or current.request_done or self.flow.paused:
            self.rate_from = 0.0
            return False
        if not self.rate_from:
            self.rate_from, self.rate_bytes = now, self.received
            return False
        elapsed = now - self.rate_from
        return elapsed >= BODY_RATE_GRACE and (self.received - self.rate_bytes) / elapsed < rate

    # --- closing ---

    def close(self) -> None:
        """Close after everything written so far. A client still sending a request we
        answered early is read (and dropped) a while first, so it sees the answer rather
        than a reset; a client that does not read what is left is cut after the idle timeout."""
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        listener = self.listener
        if self.reader.in_message and not self.eof:
            self.lingering = True
            self.linger_limit = self.received + LINGER_BYTES
            if transport.can_write_eof():
                transport.write_eof()
            self.flow.reasons.clear()
            transport.resume_reading()
            self._wait("linger", LINGER_SECONDS)
            return
        unsent = transport.get_write_buffer_size()
        transport.close()
        if unsent:
            self._wait("closing", listener.settings.idle_timeout)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
