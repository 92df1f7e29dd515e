"""An L4 listener: accepts on a port, forwards each connection to an endpoint.

A table swap hands the listener a new configuration (`update`); connections already
established keep their backend, new ones use the new endpoints. A passthrough port
(several L4 routes chosen by TLS SNI) is the same listener with a router; a port can
turn from one to the other without closing its socket.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import shared, table
from ..balancer import Balancer, build
from ..health import EndpointState, HealthRegistry
from ..limits import ClientLimiter
from ..serving import Serving, listen_on
from .connection import Connection, log_connection

if TYPE_CHECKING:
    from ..runtime import Dataplane

BACKLOG = 4096
CLIENT_EXPIRY_PERIOD = 5.0  # seconds between sweeps of the per-client limits' idle state


@dataclass(frozen=True)
class L4Config:
    """What a new connection needs, built once per table swap."""

    source: str
    balancer: Balancer
    reject_share: float  # share of connections that would go to unresolved references
    connect_timeout: float
    idle_timeout: float
    proxy_protocol: str
    max_connections: int


def endpoint_weights(
    backends: Iterable[table.Backend],
    clusters: dict[str, table.Cluster],
    health: HealthRegistry,
    protocol: str = "tcp",
) -> tuple[list[tuple[EndpointState, float]], float]:
    """Each resolved backend's weight split evenly over its endpoints; and the share of
    weight held by unresolved references."""
    weighted: dict[EndpointState, float] = {}
    unresolved = 0.0
    total = 0.0
    for backend in backends:
        total += backend.weight
        if backend.cluster is None:
            unresolved += backend.weight
            continue
        endpoints = clusters[backend.cluster].endpoints
        for e in endpoints:
            state = health.endpoint(e.address, e.port, protocol)
            weighted[state] = weighted.get(state, 0.0) + backend.weight / len(endpoints)
    return list(weighted.items()), (unresolved / total if total else 0.0)


@dataclass(frozen=True)
class Router:
    """A passthrough port's routes and its SNI index (see table.Passthrough)."""

    routes: dict[str, L4Config]
    exact: dict[str, str]
    wildcard: dict[str, str]
    default: str | None


REJECT_REASONS = (
    "max_connections",
    "no_endpoint",
    "connect_failed",
    "unresolved_backend",
    "accept_rate",
    "client_connections",
    "client_rate",
    "bad_hello",
    "hello_timeout",
    "no_route",
)


def build_config(
    listener: table.L4Listener, endpoints: list[tuple[EndpointState, float]], reject_share: float
) -> L4Config:
    return L4Config(
        source=listener.source,
        balancer=build(listener.policy, endpoints),
        reject_share=reject_share,
        connect_timeout=listener.connectTimeout,
        idle_timeout=listener.idleTimeout,
        proxy_protocol=listener.proxyProtocol,
        max_connections=shared.share(listener.maxConnections),  # the pod's cap, split over workers
    )


class ServingL4(Serving[Connection]):
    """A running L4 listener."""

    kind = "l4"

    def __init__(self, dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> None:
        self.port = port
        self.health = dataplane.health
        self.settings = dataplane.settings
        super().__init__()
        self.accepted = 0
        self.connect_failures = 0
        self.rejected: Counter[str] = Counter()
        self.bytes_from_clients = 0
        self.bytes_from_backends = 0
        self._key: object = None
        self.config: L4Config  # the plain port's; on a passthrough port, its first route's
        self.router: Router | None = None
        self.max_connections = 0
        self.limiter: ClientLimiter | None = None
        self.route_active: Counter[str] = Counter()  # connections per passthrough route
        self._expiry: asyncio.TimerHandle | None = None
        self.update(listener, tbl)

    async def start(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self).client, **listen_on(self.settings, address, self.port), backlog=BACKLOG
        )
        self._expiry = loop.call_later(CLIENT_EXPIRY_PERIOD, self.expire_clients)

    def update(self, listener: table.Listener, tbl: table.Table) -> None:
        passthrough = listener.passthrough
        routes = passthrough.routes if passthrough is not None else {"": listener.l4}
        resolved = {}
        for source, l4 in routes.items():
            assert l4 is not None
            endpoints, reject_share = endpoint_weights(l4.backends, tbl.clusters, self.health)
            resolved[source] = (l4, endpoints, reject_share)
        key = (
            passthrough,
            [(s, l4, [(e.key, w) for e, w in eps], r) for s, (l4, eps, r) in resolved.items()],
        )
        if key == self._key:
            return  # unchanged: keep balancer state (round-robin position, Maglev table)
        self._key = key
        configs = {source: build_config(*found) for source, found in resolved.items()}
        self.config = next(iter(configs.values()))
        self.max_connections = sum(c.max_connections for c in configs.values())
        limits = passthrough.limits if passthrough is not None else listener.l4.limits  # type: ignore[union-attr]
        if limits is None:
            self.limiter = None
        elif self.limiter is None or self.limiter.limits != limits:
            self.limiter = ClientLimiter(limits, scope=f"tcp/{self.port}")  # new limits: counts start over
        if passthrough is None:
            self.router = None
            return
        self.router = Router(configs, passthrough.exact, passthrough.wildcard, passthrough.default)

    def closed(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.bytes_from_clients += conn.client.received
        self.bytes_from_backends += conn.backend.received if conn.backend else 0
        if self.settings.connection_log:
            log_connection(conn, self.settings.access_log_sample)
        self.forget(conn)

    def expire_clients(self) -> None:
        """Forget per-client state that carries nothing any more (every few seconds)."""
        if self.limiter is not None:
            self.limiter.expire(time.monotonic())
        if self.server is not None:
            self._expiry = asyncio.get_running_loop().call_later(CLIENT_EXPIRY_PERIOD, self.expire_clients)

    async def drain(self, grace: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await self.wait_idle(grace)
        for conn in list(self.connections):
            conn.abort("drain-timeout")

    @staticmethod
    def collect(listeners: list[ServingL4]) -> Iterator[Metric]:
        labels = ["port", "listener"]
        active = GaugeMetricFamily(
            "bilayer_l4_connections_active", "Open proxied connections.", labels=labels
        )
        total = CounterMetricFamily("bilayer_l4_connections", "Accepted connections.", labels=labels)
        received = CounterMetricFamily(
            "bilayer_l4_client_bytes", "Bytes received from clients.", labels=labels
        )
        sent = CounterMetricFamily("bilayer_l4_backend_bytes", "Bytes received from backends.", labels=labels)
        failures = CounterMetricFamily(
            "bilayer_l4_connect_failures", "Failed backend connects.", labels=labels
        )
        rejected = CounterMetricFamily(
            "bilayer_l4_rejected",
            "Connections closed without forwarding, by reason (" + ", ".join(REJECT_REASONS) + ").",
            labels=[*labels, "reason"],
        )
        limited = GaugeMetricFamily(
            "bilayer_l4_limited_clients", "Clients tracked by the per-client limits.", labels=labels
        )
        for listener in listeners:
            source = "passthrough" if listener.router is not None else listener.config.source
            values = [str(listener.port), source]
            limited.add_metric(values, listener.limiter.tracked if listener.limiter else 0)
            live_in = sum(c.client.received for c in listener.connections)
            live_out = sum(c.backend.received for c in listener.connections if c.backend)
            active.add_metric(values, len(listener.connections))
            total.add_metric(values, listener.accepted)
            received.add_metric(values, listener.bytes_from_clients + live_in)
            sent.add_metric(values, listener.bytes_from_backends + live_out)
            failures.add_metric(values, listener.connect_failures)
            for reason in REJECT_REASONS:
                rejected.add_metric([*values, reason], listener.rejected[reason])
        yield from (active, total, received, sent, failures, rejected, limited)


async def open_l4(dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> ServingL4:
    """The ListenerFactory for L4 listeners."""
    serving = ServingL4(dataplane, port, listener, tbl)
    await serving.start(dataplane.settings.address)
    return serving
