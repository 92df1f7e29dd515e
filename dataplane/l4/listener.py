"""An L4 listener: accepts on a port, forwards each connection to an endpoint.

A table swap hands the listener a new configuration (`update`); connections already
established keep their backend, new ones use the new endpoints.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import table
from ..balancer import Balancer, build
from ..health import EndpointState, HealthRegistry
from ..serving import Serving
from .connection import Connection, log_connection

if TYPE_CHECKING:
    from ..runtime import Dataplane

BACKLOG = 4096


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
        max_connections=listener.maxConnections,
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
        self.config: L4Config
        self.update(listener, tbl)

    async def start(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self).client, address, self.port, reuse_address=True, backlog=BACKLOG
        )

    def update(self, listener: table.Listener, tbl: table.Table) -> None:
        l4 = listener.l4
        assert l4 is not None
        endpoints, reject_share = endpoint_weights(l4.backends, tbl.clusters, self.health)
        key = (l4, [(e.key, w) for e, w in endpoints], reject_share)
        if key == self._key:
            return  # unchanged: keep balancer state (round-robin position, Maglev table)
        self._key = key
        self.config = build_config(l4, endpoints, reject_share)

    def closed(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.bytes_from_clients += conn.client.received
        self.bytes_from_backends += conn.backend.received if conn.backend else 0
        if self.settings.connection_log:
            log_connection(conn, self.settings.access_log_sample)
        self.forget(conn)

    async def drain(self, grace: float) -> None:
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
            "Connections closed without forwarding, by reason "
            "(max_connections, no_endpoint, connect_failed, unresolved_backend).",
            labels=[*labels, "reason"],
        )
        for listener in listeners:
            values = [str(listener.port), listener.config.source]
            live_in = sum(c.client.received for c in listener.connections)
            live_out = sum(c.backend.received for c in listener.connections if c.backend)
            active.add_metric(values, len(listener.connections))
            total.add_metric(values, listener.accepted)
            received.add_metric(values, listener.bytes_from_clients + live_in)
            sent.add_metric(values, listener.bytes_from_backends + live_out)
            failures.add_metric(values, listener.connect_failures)
            for reason in ("max_connections", "no_endpoint", "connect_failed", "unresolved_backend"):
                rejected.add_metric([*values, reason], listener.rejected[reason])
        yield from (active, total, received, sent, failures, rejected)


async def open_l4(dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> ServingL4:
    """The ListenerFactory for L4 listeners."""
    serving = ServingL4(dataplane, port, listener, tbl)
    await serving.start(dataplane.settings.address)
    return serving
