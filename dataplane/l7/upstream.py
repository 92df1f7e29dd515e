"""Connections to backend endpoints, kept alive in a pool per endpoint.

An upstream serves one exchange at a time. Its response parser reports to that exchange;
once the response is complete (and the request was sent whole) the connection goes back
to the pool, where it waits at most IDLE_SECONDS.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from ..health import EndpointState

if TYPE_CHECKING:
    from .exchange import Exchange

IDLE_SECONDS = 60.0
MAX_IDLE_PER_ENDPOINT = 256


class Upstream(asyncio.Protocol):
    """One keep-alive connection to an endpoint."""

    __slots__ = (
        "endpoint",
        "exchange",
        "idle_since",
        "keep_alive",
        "parser",
        "pool",
        "response_headers",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, endpoint: EndpointState, pool: Pool) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0  # when it went back to the pool
        self.keep_alive = True
        self.reused = False
        self.response_headers: list[tuple[bytes, bytes]] = []  # the exchange's list, shared
        self.tunnel: asyncio.Transport | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the server broke the protocol. Drop it.
            self.close()
            return
        # Everything this read produces for the client (head, body, chunk framing) leaves
        # in one write: each write is a system call.
        client = exchange.conn
        client.hold_writes()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange.upstream_upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as err:
            exchange.upstream_failed("bad-response", str(err))
        finally:
            client.flush_writes()

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        self.pool.forget(self)
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.exchange is not None:
            self.exchange.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.pause("upstream-backpressure")
        elif self.tunnel is not None:
            pass

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.resume("upstream-backpressure")

    # httptools callbacks, forwarded to the exchange

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            parser = self.parser
            self.keep_alive = self.keep_alive and parser.should_keep_alive()
            self.exchange.response_headers_complete(parser.get_status_code(), parser.get_http_version())

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.response_complete()

    # Life cycle

    def reset_parser(self) -> None:
        """A fresh parser: after a HEAD response, whose headers announce a body that never comes."""
        self.parser = httptools.HttpResponseParser(self)

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """Idle upstream connections by endpoint."""

    def __init__(self) -> None:
        self.idle: dict[EndpointState, list[Upstream]] = {}
        self.connects = 0

    def take(self, endpoint: EndpointState) -> Upstream | None:
        idle = self.idle.get(endpoint)
        while idle:
            upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.reused = True
                return upstream
        return None

    def give(self, upstream: Upstream, now: float) -> None:
        upstream.exchange = None
        transport = upstream.transport
        if not upstream.keep_alive or transport is None or transport.is_closing():
            upstream.close()
            return
        idle = self.idle.setdefault(upstream.endpoint, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            upstream.close()
            return
        idle.append(upstream)
        upstream.idle_since = now

    def expire(self, now: float) -> None:
        """Close connections idle longer than IDLE_SECONDS (oldest first in each list)."""
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
