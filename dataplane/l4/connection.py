"""One proxied TCP connection: accept, pick an endpoint, connect, then a pair of protocols
that copy bytes straight across (dataplane/pair.py: flow control, half-close, idle timeout).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from ..logs import fields
from ..pair import Pair, Side
from . import proxyproto

if TYPE_CHECKING:
    from ..health import EndpointState
    from .listener import L4Config, ServingL4

log = logging.getLogger("bilayer.l4")

MAX_CONNECT_ATTEMPTS = 8


class ClientSide(Side):
    """The accepted socket."""

    __slots__ = ()

    pair: Connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pair.accepted(self.attach(transport))


class BackendSide(Side):
    """The socket to the chosen endpoint."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)


class Connection(Pair):
    """One proxied connection: its endpoint, its connect task, its listener's accounting."""

    __slots__ = ("client_address", "config", "connecting", "endpoint", "listener", "started")

    def __init__(self, listener: ServingL4) -> None:
        self.listener = listener
        self.config: L4Config = listener.config
        super().__init__(self.config.idle_timeout)
        self.endpoint: EndpointState | None = None
        self.client_address: tuple[str, int] = ("", 0)
        self.connecting: asyncio.Task[None] | None = None
        self.started = 0.0

    def new_side(self) -> Side:
        return ClientSide(self)

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
            self.close("unresolved-backend")
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
        self.close("no-endpoint" if not tried else "connect-failed")

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
        if self.config.proxy_protocol != "None":
            local = client_transport.get_extra_info("sockname")
            backend.transport.write(proxyproto.header(self.config.proxy_protocol, self.client_address, local))
        self.start(backend)

    def lost_side(self, side: Side) -> None:
        if side is self.client and self.connecting is not None:
            self.connecting.cancel()

    def ended(self) -> None:
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
