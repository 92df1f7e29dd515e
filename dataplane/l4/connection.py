"""One proxied TCP connection: accept, pick an endpoint, connect, then a pair of protocols
that copy bytes straight across (dataplane/pair.py: flow control, half-close, idle timeout).

On a TLS passthrough port the client side first reads the ClientHello (bounded in bytes
by the reader, in time by the hello timer), the server name picks the route, and the
hello goes to the backend with everything after it, untouched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, cast

from ..logs import fields
from ..pair import Pair, Side
from . import proxyproto
from .sni import HelloError, HelloReader, NoName, route_of

if TYPE_CHECKING:
    from ..health import EndpointState
    from ..limits import Client
    from .listener import L4Config, ServingL4

log = logging.getLogger("bilayer.l4")

MAX_CONNECT_ATTEMPTS = 8


class ClientSide(Side):
    """The accepted socket."""

    __slots__ = ()

    def connection(self) -> Connection:
        # Side.pair is typed Pair: a compiled class cannot narrow an attribute's type.
        return cast(Connection, self.pair)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection().accepted(self.attach(transport))


class HelloSide(ClientSide):
    """The accepted socket of a passthrough port: reads the ClientHello first."""

    __slots__ = ("reader",)

    def __init__(self, pair: Connection) -> None:
        super().__init__(pair)
        self.reader: HelloReader | None = HelloReader()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            super().data_received(data)
            return
        self.received += len(data)
        self.early += data  # replayed to the backend once connected
        try:
            found = reader.feed(data)
        except HelloError as err:
            self.reader = None
            self.connection().refuse("bad_hello", str(err))
            return
        if found is not None:
            self.reader = None
            self.connection().hello_read(found)


class BackendSide(Side):
    """The socket to the chosen endpoint."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)


class Connection(Pair):
    """One proxied connection: its endpoint, its connect task, its listener's accounting."""

    __slots__ = (
        "client_address",
        "config",
        "connecting",
        "endpoint",
        "hello_timer",
        "limited",
        "listener",
        "route",
        "started",
    )

    def __init__(self, listener: ServingL4) -> None:
        self.listener = listener
        self.config: L4Config = listener.config
        super().__init__(self.config.idle_timeout)
        self.endpoint: EndpointState | None = None
        self.client_address: tuple[str, int] = ("", 0)
        self.connecting: asyncio.Task[None] | None = None
        self.started = 0.0
        self.limited: Client | None = None  # what the per-client limits count for us
        self.route: str | None = None  # the passthrough route, once the hello chose it
        self.hello_timer: asyncio.TimerHandle | None = None

    def new_side(self) -> Side:
        return HelloSide(self) if self.listener.router is not None else ClientSide(self)

    def accepted(self, transport: asyncio.Transport) -> None:
        listener = self.listener
        if listener.active_connections >= listener.max_connections:
            listener.rejected["max_connections"] += 1
            self.finished = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_address = (peer[0], peer[1]) if peer else ("", 0)
        self.started = time.monotonic()
        if listener.limiter is not None:
            # Refused before any backend is asked, with a reset: the cheapest close.
            admitted = listener.limiter.admit(self.client_address[0], self.started)
            if isinstance(admitted, str):
                listener.rejected[admitted] += 1
                self.finished = True
                transport.abort()
                return
            self.limited = admitted
        listener.connections.add(self)
        listener.accepted += 1
        loop = asyncio.get_running_loop()
        if listener.router is not None:  # read the ClientHello first, within the time allowed
            self.hello_timer = loop.call_later(listener.settings.header_timeout, self._hello_late)
            return
        transport.pause_reading()  # nowhere to send bytes until the backend answers
        self.connecting = loop.create_task(self._connect())

    def hello_read(self, name: str | NoName) -> None:
        """The ClientHello named a server (or none): connect to its route's backend."""
        listener = self.listener
        router = listener.router
        assert router is not None and self.client.transport is not None
        self._stop_hello_timer()
        self.client.transport.pause_reading()
        source = route_of(name, router.exact, router.wildcard, router.default)
        if source is None:
            self.refuse("no_route", f"no listener for server name {name!r} and no default")
            return
        config = router.routes[source]
        if listener.route_active[source] >= config.max_connections:
            self.refuse("max_connections", f"{source} has {config.max_connections} connections")
            return
        self.config, self.idle_timeout, self.route = config, config.idle_timeout, source
        listener.route_active[source] += 1
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    def _hello_late(self) -> None:
        self.hello_timer = None
        self.refuse("hello_timeout", "no complete ClientHello in time")

    def _stop_hello_timer(self) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None

    def refuse(self, reason: str, detail: str) -> None:
        """Close a passthrough connection before any backend was asked."""
        self.listener.rejected[reason] += 1
        log.debug("connection refused", extra=fields(client=self.client_address[0], reason=detail))
        self.abort(reason.replace("_", "-"))

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
        self._stop_hello_timer()
        if self.endpoint is not None:
            self.endpoint.active -= 1
        listener = self.listener
        if self.route is not None:
            listener.route_active[self.route] -= 1
        if self.limited is not None and listener.limiter is not None:
            listener.limiter.release(self.limited, time.monotonic())
        listener.closed(self)

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
