"""A client connection to an L7 listener: parses requests, runs them one at a time.

Pipelined requests are parsed as they arrive but wait in a queue, and reading pauses
while one waits, so a client cannot make the proxy buffer an unbounded pipeline.
Reading also pauses while a request body has nowhere to go yet, and while the backend
is not taking body bytes as fast as the client sends them.

Timeouts are `call_later` handles: the idle keep-alive timeout between requests, and
the header timeout from a request's first byte to its last header (slowloris).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from . import responses
from .exchange import Exchange, RequestTooLarge

if TYPE_CHECKING:
    from .listener import ServingL7


class ClientConnection(asyncio.Protocol):
    """One accepted connection."""

    __slots__ = (
        "broken",
        "client_ip",
        "closing",
        "current",
        "header_timer",
        "idle_timer",
        "listener",
        "parser",
        "parsing",
        "paused",
        "queue",
        "started",
        "transport",
        "tunnel",
        "upgrading",
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
        self.idle_timer: asyncio.TimerHandle | None = None
        self.header_timer: asyncio.TimerHandle | None = None
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
        self.idle_timer = asyncio.get_running_loop().call_later(
            listener.settings.header_timeout, self._idle_timeout
        )

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
        for timer in (self.idle_timer, self.header_timer):
            if timer is not None:
                timer.cancel()
        if self.tunnel is not None:
            self.tunnel.close()
        for exchange in (self.current, *self.queue):
            if exchange is not None:
                exchange.client_lost()
        self.queue.clear()
        self.listener.connections.discard(self)
        self.listener.connection_closed()

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
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.header_timer is None:
            self.header_timer = asyncio.get_running_loop().call_later(
                self.listener.settings.header_timeout, self._header_timeout
            )

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.add_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        self.parsing.add_header(name, value)

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
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
            if self.idle_timer is None and self.header_timer is None:
                self.idle_timer = asyncio.get_running_loop().call_later(
                    self.listener.settings.keepalive_timeout, self._idle_timeout
                )

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
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(responses.local(status, message, close=True))
        self.close()

    def _header_timeout(self) -> None:
        self.header_timer = None
        self.listener.header_timeouts += 1
        if self.current is None:
            self._answer_and_close(408, "request headers not received in time")
        else:
            self.broken = (408, "request headers not received in time")

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        if self.current is None and not self.queue:
            self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
