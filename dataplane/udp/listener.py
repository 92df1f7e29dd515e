"""A UDP listener: one socket on the port; each client address and port is a session.

The first datagram of a session picks an endpoint by the listener's policy (the key is the
client's address, so ConsistentHash keeps a client on one endpoint across sessions) and
opens a connected socket to it; later datagrams take the same socket, replies leave from
the listener's socket, so the client sees them come from the address it sent to. A
session ends after the idle timeout without a datagram either way.

A table swap hands new endpoints to new sessions only: a session keeps its endpoint
until it goes idle (the UDP form of a drain). Removing the listener closes its socket,
and with it every session (their replies would have no socket to leave from).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import table
from ..balancer import Balancer, build
from ..l4.listener import endpoint_weights
from ..limits import Client, ClientLimiter
from ..logs import fields
from .session import Address, Session, pause_at_once

if TYPE_CHECKING:
    from ..runtime import Dataplane

log = logging.getLogger("bilayer.udp")

RECEIVE_BUFFER = 4 * 1024 * 1024  # absorbs bursts while the loop is busy (capped by net.core.rmem_max)
DROP_REASONS = (
    "max_sessions",
    "no_endpoint",
    "unresolved_backend",
    "too_large",
    "accept_rate",
    "client_connections",
    "client_rate",
    "backend_refused",
    "backend_busy",
    "client_busy",
    "send_failed",
    "socket_failed",
)


@dataclass(frozen=True)
class UDPConfig:
    """What a new session needs, built once per table swap."""

    source: str
    balancer: Balancer
    reject_share: float
    idle_timeout: float
    max_sessions: int
    max_datagram: int
    limits: table.Limits | None


class ServingUDP(asyncio.DatagramProtocol):
    """A running UDP listener: the protocol of the listening socket."""

    kind = "udp"

    def __init__(self, dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> None:
        self.port = port
        self.health = dataplane.health
        self.settings = dataplane.settings
        self.transport: asyncio.DatagramTransport
        self.busy = False  # the listening socket holds unsent replies
        self.sessions: dict[Address, Session] = {}
        self.starting: set[asyncio.Task[None]] = set()
        # A copy of config.max_datagram: read for every datagram both ways, one lookup fewer.
        self.max_datagram = table.MAX_DATAGRAM
        self.limiter: ClientLimiter | None = None
        self.drops: Counter[str] = Counter()
        self.created = self.expired = 0
        self.closed_totals = [0, 0, 0, 0]  # datagrams in, out, bytes in, out, of ended sessions
        self.sweeper: asyncio.TimerHandle | None = None
        self._key: object = None
        self.config: UDPConfig
        self.update(listener, tbl)

    @property
    def active_connections(self) -> int:
        return len(self.sessions)

    async def start(self, address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # the kernel's default then
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            # Workers (with either --worker-sockets) each bind the port: the kernel hashes
            # a client's address and port to one of them, so its datagrams stay together.
            if self.settings.workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, self.port))
        except BaseException:
            sock.close()
            raise
        self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        pause_at_once(self.transport)
        self._sweep_later()

    def update(self, listener: table.Listener, tbl: table.Table) -> None:
        udp = listener.udp
        assert udp is not None
        endpoints, reject_share = endpoint_weights(udp.backends, tbl.clusters, self.health, "udp")
        key = (udp, [(e.key, w) for e, w in endpoints], reject_share)
        if key == self._key:
            return  # unchanged: keep balancer state
        self._key = key
        self.config = UDPConfig(
            source=udp.source,
            balancer=build(udp.policy, endpoints),
            reject_share=reject_share,
            idle_timeout=udp.idleTimeout,
            max_sessions=udp.maxSessions,
            max_datagram=udp.maxDatagramSize,
            limits=udp.limits,
        )
        self.max_datagram = udp.maxDatagramSize
        if udp.limits is None:
            self.limiter = None
        elif self.limiter is None or self.limiter.limits != udp.limits:
            # New limits: counts start over.
            self.limiter = ClientLimiter(udp.limits, scope=f"udp/{self.port}")

    def datagram_received(self, data: bytes, client: Address) -> None:
        """A datagram from a client, to its session."""
        session = self.sessions.get(client)
        if session is None:
            session = self._open(client)
            if session is None:
                return
        if len(data) > self.max_datagram:
            self.drops["too_large"] += 1
            return
        session.forward(data)

    def error_received(self, exc: Exception) -> None:
        self.drops["send_failed"] += 1  # a reply the kernel refused; the next one may go

    def pause_writing(self) -> None:
        self.busy = True

    def resume_writing(self) -> None:
        self.busy = False

    def _open(self, client: Address) -> Session | None:
        """A new session for client, or None (the datagram is dropped, counted)."""
        config = self.config
        if len(self.sessions) >= config.max_sessions:
            self.drops["max_sessions"] += 1
            return None
        if config.reject_share and random.random() < config.reject_share:
            self.drops["unresolved_backend"] += 1
            return None
        now = time.monotonic()
        limited = None
        if self.limiter is not None:
            admitted = self.limiter.admit(client[0], now)
            if isinstance(admitted, str):
                self.drops[admitted] += 1
                return None
            limited = admitted
        endpoint = config.balancer.pick(client[0].encode(), now)
        if endpoint is None:
            self._release(limited, now)
            self.drops["no_endpoint"] += 1
            return None
        session = Session(self, client, endpoint, limited)
        task = asyncio.get_running_loop().create_task(session.connect())  # per session, not per datagram
        self.starting.add(task)
        task.add_done_callback(self.starting.discard)
        endpoint.active += 1
        endpoint.total += 1
        self.sessions[client] = session
        self.created += 1
        return session

    def socket_failed(self, err: OSError) -> None:
        log.warning("cannot open a session socket", extra=fields(port=self.port, error=str(err)))

    def _release(self, limited: Client | None, now: float) -> None:
        if limited is not None and self.limiter is not None:
            self.limiter.release(limited, now)

    def ended(self, session: Session) -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        session.endpoint.active -= 1
        if session.limited is not None and self.limiter is not None:
            self.limiter.release(session.limited, time.monotonic())
        totals = self.closed_totals
        totals[0] += session.client_datagrams
        totals[1] += session.backend_datagrams
        totals[2] += session.client_bytes
        totals[3] += session.backend_bytes
        if session.reason == "idle-timeout":
            self.expired += 1
        if self.settings.connection_log:
            sample = self.settings.access_log_sample
            if sample >= 1.0 or random.random() < sample:
                log.info("session closed", extra=self._log_fields(session))

    def _log_fields(self, session: Session) -> dict[str, object]:
        return fields(
            client=f"{session.client[0]}:{session.client[1]}",
            listener=self.port,
            protocol="udp",
            source=self.config.source,
            backend=session.endpoint.key,
            datagrams_from_client=session.client_datagrams,
            datagrams_from_backend=session.backend_datagrams,
            bytes_from_client=session.client_bytes,
            bytes_from_backend=session.backend_bytes,
            seconds=round(time.monotonic() - session.started, 3),
            reason=session.reason,
        )

    def _sweep_later(self) -> None:
        # One timer per listener, not one per session: counts are compared as in
        # dataplane.pair, so a session ends within 1.25 x the idle timeout.
        period = max(self.config.idle_timeout / 4, 0.05)
        self.sweeper = asyncio.get_running_loop().call_later(period, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        idle = self.config.idle_timeout
        for session in list(self.sessions.values()):
            moved = session.client_datagrams + session.backend_datagrams
            if moved != session.seen:
                session.seen, session.idle_since = moved, now
            elif now - session.idle_since >= idle:
                session.close("idle-timeout")
        if self.limiter is not None:
            self.limiter.expire(now)
        self._sweep_later()

    def stop_accepting(self) -> None:
        """Close the socket; sessions cannot answer without it, so they end too."""
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for task in self.starting:
            task.cancel()
        for session in list(self.sessions.values()):
            session.close("listener-removed")
        self.transport.close()

    async def drain(self, grace: float) -> None:
        """Nothing to wait for: stop_accepting ended every session."""

    @staticmethod
    def collect(listeners: list[ServingUDP]) -> Iterator[Metric]:
        labels = ["port", "listener"]
        datagrams = CounterMetricFamily(
            "bilayer_udp_datagrams",
            "Datagrams received, by direction (from client, from backend).",
            labels=[*labels, "direction"],
        )
        volume = CounterMetricFamily(
            "bilayer_udp_bytes", "Bytes received, by direction.", labels=[*labels, "direction"]
        )
        active = GaugeMetricFamily("bilayer_udp_sessions_active", "Open sessions.", labels=labels)
        created = CounterMetricFamily("bilayer_udp_sessions_created", "Sessions started.", labels=labels)
        expired = CounterMetricFamily(
            "bilayer_udp_sessions_expired", "Sessions ended by the idle timeout.", labels=labels
        )
        clients = GaugeMetricFamily(
            "bilayer_udp_limited_clients", "Clients tracked by the per-client limits.", labels=labels
        )
        drops = CounterMetricFamily(
            "bilayer_udp_drops", "Datagrams dropped, by reason.", labels=[*labels, "reason"]
        )
        for listener in listeners:
            values = [str(listener.port), listener.config.source]
            live = listener.sessions.values()
            totals = listener.closed_totals
            counts = (
                totals[0] + sum(s.client_datagrams for s in live),
                totals[1] + sum(s.backend_datagrams for s in live),
                totals[2] + sum(s.client_bytes for s in live),
                totals[3] + sum(s.backend_bytes for s in live),
            )
            datagrams.add_metric([*values, "client"], counts[0])
            datagrams.add_metric([*values, "backend"], counts[1])
            volume.add_metric([*values, "client"], counts[2])
            volume.add_metric([*values, "backend"], counts[3])
            active.add_metric(values, len(listener.sessions))
            created.add_metric(values, listener.created)
            expired.add_metric(values, listener.expired)
            clients.add_metric(values, listener.limiter.tracked if listener.limiter else 0)
            for reason in DROP_REASONS:
                drops.add_metric([*values, reason], listener.drops[reason])
        yield from (datagrams, volume, active, created, expired, clients, drops)


async def open_udp(dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> ServingUDP:
    """The ListenerFactory for UDP listeners."""
    serving = ServingUDP(dataplane, port, listener, tbl)
    await serving.start(dataplane.settings.address)
    return serving
