"""A client connection to an L7 listener: parses requests, runs them one at a time.

Pipelined requests are parsed as they arrive but wait in a queue, and reading pauses
while one waits, so a client cannot make the proxy buffer an unbounded pipeline.
Reading also pauses while a request body has nowhere to go yet, and while the backend
is not taking body bytes as fast as the client sends them.

Timeouts are deadlines, not timers: the idle keep-alive timeout between requests and the
header timeout from a request's first byte to its last header (slowloris). Setting a
float costs nothing per request; the listener's sweep closes connections past theirs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from . import responses
from .exchange import MAX_HEADER_BYTES, MAX_HEADERS, MAX_URL, Exchange, RequestTooLarge

if TYPE_CHECKING:
    from .listener import ServingL7


class ClientConnection(asyncio.Protocol):
    """One accepted connection."""

    __slots__ = (
        "broken",
        "client_ip",
        "closing",
        "current",
        "deadline",
        "held",
        "listener",
        "parser",
        "parsing",
        "paused",
        "queue",
        "started",
        "transport",
        "tunnel",
        "upgrading",
        "waiting",
    )

    def __init__(self, listener: ServingL7) -> None:
        self.listener = listener
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused: set[str] = set()
        self.tunnel: asyncio.Transport | None = None
        self.upgrading: Exchange | None = None
        self.broken: tuple[int, str] | None = None
        self.closing = False
        self.held: list[bytes] | None = None  # writes collected while hold_writes is on
        self.deadline = 0.0  # loop time at which `waiting` times out; 0: none
        self.waiting = ""  # "idle" (for a request) or "header" (for the end of its headers)
        self.started = 0.0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.started = time.monotonic()
        listener = self.listener
        if len(listener.connections) >= listener.settings.max_client_connections:
            listener.rejected += 1
            self.transport.write(responses.local(503, "too many connections", close=True))
            self.transport.close()
            return
        listener.connections.add(self)
        # A new connection must send its first request within the header timeout.
        self.waiting = "idle"
        self.deadline = listener.loop.time() + listener.settings.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrading is not None:
            self.upgrading.tunnel_early += data  # before the backend's 101 arrives
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.parsing
            if exchange is not None:
                exchange.tunnel_early += data[upgrade.args[0] :]
                self.upgrading = exchange
                self.pause("upgrade")
        except httptools.HttpParserCallbackError as err:
            cause = err.__cause__ or err.__context__
            if isinstance(cause, RequestTooLarge):
                self._protocol_error(cause.status, cause.message)
            else:
                raise
        except httptools.HttpParserError as err:
            self._protocol_error(400, f"malformed request: {err}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.deadline = 0.0
        if self.tunnel is not None:
            self.tunnel.close()
        for exchange in (self.current, *self.queue):
            if exchange is not None:
                exchange.client_lost()
        self.queue.clear()
        self.listener.forget(self)

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading the backend.
        current = self.current
        if current is not None and current.upstream is not None and current.upstream.transport is not None:
            current.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        current = self.current
        if current is not None and current.upstream is not None and current.upstream.transport is not None:
            current.upstream.transport.resume_reading()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        if self.waiting != "header":
            self.waiting = "header"
            self.deadline = self.listener.loop.time() + self.listener.settings.header_timeout

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.url += url
        if len(exchange.url) > MAX_URL:
            raise RequestTooLarge(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Inlined (called per header): limits on count and size, trailers dropped.
        exchange = self.parsing
        assert exchange is not None
        if exchange.head_parsed:
            return  # a trailer after a chunked body: not forwarded
        exchange.header_bytes += len(name) + len(value) + 4
        headers = exchange.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS or exchange.header_bytes > MAX_HEADER_BYTES:
            raise RequestTooLarge(431, "request headers too large")

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.waiting = ""
        self.deadline = 0.0
        parser = self.parser
        exchange.head_complete(parser.get_method(), parser.get_http_version(), parser.should_keep_alive())
        self.listener.requests += 1
        if self.current is None:
            self.current = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        assert self.parsing is not None
        self.parsing.request_complete()

    # --- writing ---

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def hold_writes(self) -> None:
        """Collect writes until flush_writes: one system call instead of several."""
        if self.held is None:
            self.held = []

    def flush_writes(self) -> None:
        held, self.held = self.held, None
        if held:
            self.write(held[0] if len(held) == 1 else b"".join(held))

    # --- flow control ---

    def pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.paused:
            return
        self.paused.discard(reason)
        if not self.paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # --- exchanges ---

    def exchange_finished(self, exchange: Exchange, *, tunnel: bool = False) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if tunnel:
            return
        if exchange.close_after or self.closing:
            self.close()
            return
        while self.queue and self.current is None:
            nxt = self.queue.popleft()
            self.current = nxt
            nxt.start()  # may finish at once (a local answer), then the loop goes on
        if self.current is None:
            if self.broken is not None:
                status, message = self.broken
                self.broken = None
                self._answer_and_close(status, message)
                return
            self.resume("pipeline")
            if not self.waiting:
                self.waiting = "idle"
                self.deadline = self.listener.loop.time() + self.listener.settings.keepalive_timeout

    def start_tunnel(self, upstream: asyncio.Transport) -> None:
        self.tunnel = upstream
        self.upgrading = None
        self.listener.tunnels += 1
        self.resume("upgrade")
        self.resume("waiting-upstream")

    def _protocol_error(self, status: int, message: str) -> None:
        """The client broke HTTP: answer after the requests before it, then close."""
        self.closing = True
        if self.transport is not None:
            self.transport.pause_reading()
        broken = self.parsing
        if broken is not None and broken is self.current and not broken.request_done:
            broken.fail_request(status, message)  # the error is in the current request's body
            return
        if broken is not None and broken in self.queue:
            self.queue.remove(broken)
        if self.current is None and not self.queue:
            self._answer_and_close(status, message)
        else:
            self.broken = (status, message)

    def _answer_and_close(self, status: int, message: str) -> None:
        self.listener.count_response(status)
        self.write(responses.local(status, message, close=True))
        self.close()

    def deadline_passed(self) -> None:
        """Called by the listener's sweep once `deadline` is past."""
        waiting, self.waiting, self.deadline = self.waiting, "", 0.0
        if waiting == "header":
            self.listener.header_timeouts += 1
            if self.current is None:
                self._answer_and_close(408, "request headers not received in time")
            else:
                self.broken = (408, "request headers not received in time")
        elif waiting == "idle" and self.current is None and not self.queue:
            self.close()

    def close(self) -> None:
        """Close after everything written so far, held writes included."""
        self.closing = True
        self.flush_writes()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self.held = None
        if self.transport is not None:
            self.transport.abort()
