"""An L7 listener: accepts HTTP (or HTTPS) on a port and routes each request."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .. import table
from ..health import EndpointState
from ..logs import fields
from ..serving import Serving, listen_on
from .client import ClientConnection
from .config import BUCKETS, L7Config, Memory, build_config
from .dial import PLAIN, Dial
from .h2server import H2Client
from .h2upstream import MAX_STREAMS, H2Connection
from .reader import Limits
from .tls import Certificates, server_context
from .upstream import Connecting, Pool, Upstream

if TYPE_CHECKING:
    from ..runtime import Dataplane

log = logging.getLogger("bilayer.dataplane")

BACKLOG = 4096
# How often deadlines (header, keep-alive, pooled upstreams) are checked: they fire up
# to this late, and no timer is created or cancelled per request.
SWEEP_SECONDS = 0.25


class ServingL7(Serving[ClientConnection | H2Client]):
    """A running HTTP listener."""

    kind = "l7"

    def __init__(self, dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> None:
        super().__init__()
        self.dataplane = dataplane
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.settings = dataplane.settings
        self.health = dataplane.health
        self.tracer = dataplane.tracer  # None: tracing is off
        self.memory = Memory()
        settings = self.settings
        self.limits = Limits(head_bytes=settings.max_header_bytes, fields=settings.max_headers)
        self.pool = Pool(self.limits, self.loop.time())
        # How often an exchange in progress is checked (idle, trailers, slow reader, body rate).
        self.tick = max(0.05, min(settings.idle_timeout, settings.header_timeout) / 4)
        self.tls = listener.l7 is not None and listener.l7.tls is not None
        self.scheme = "https" if self.tls else "http"
        self.scheme_bytes = self.scheme.encode()
        self.requests = 0
        self.h2_requests = 0  # of which on HTTP/2 streams
        self.h2_defences: Counter[str] = Counter()  # HTTP/2 connections closed by a defence
        self.http2 = True  # the table's switch: ALPN h2 (TLS) and the h2c preface (plaintext)
        self.rejected = 0
        self.timeouts: Counter[str] = Counter()  # header, idle, slow_reader, body_rate
        self.pipeline_overflows = 0
        self.bad_messages: Counter[str] = Counter()  # refused heads and bodies: client, backend
        self.tunnels = 0
        self.mirror_copies = 0  # request copies in flight to mirrors (mirror.MAX_COPIES)
        self.mirror_held = 0  # bytes those copies hold unsent (mirror.MIRROR_BUDGET)
        self.responses = [0] * 6
        self._connects: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.config: L7Config
        self._built_from = ""  # the version of the table config was built from
        self.update(listener, tbl)

    async def start(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        context = server_context(self._contexts) if self.tls else None
        self.server = await loop.create_server(
            lambda: ClientConnection(self),
            **listen_on(self.settings, address, self.port),
            backlog=BACKLOG,
            ssl=context,
            # A TLS client that never finishes its handshake is cut like a slow head.
            ssl_handshake_timeout=self.settings.header_timeout if context is not None else None,
        )
        self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self.connections if c.deadline and c.deadline <= now]:
            conn.check(now)
        self.pool.expire(now)
        self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    @property
    def h2c(self) -> bool:
        """A plaintext connection opening with the HTTP/2 preface is served as HTTP/2."""
        return self.http2 and not self.tls

    @property
    def header_timeouts(self) -> int:
        return self.timeouts["header"]

    def _contexts(self) -> Certificates | None:
        return self.config.tls

    def update(self, listener: table.Listener, tbl: table.Table) -> None:
        l7 = listener.l7
        assert l7 is not None
        contexts = self.dataplane.tls_contexts.get(self.port)
        previous = getattr(self, "config", None)
        changed = None
        if previous is not None:
            paths = tbl.changed_since(self._built_from)
            if paths is not None:
                port = str(self.port)
                changed = frozenset(p for p in paths if p.is_cluster or p.name == port)
        self.config = build_config(
            l7, tbl, self.health, self.memory, contexts, previous=previous, changed=changed
        )
        self._built_from = tbl.version
        self.http2 = l7.http2
        # What ALPN offers is set on this port's certificate contexts: the handshakes that
        # follow offer it, and a change of the switch reaches new connections at once.
        protocols = ["h2", "http/1.1"] if l7.http2 else ["http/1.1"]
        for _, context in contexts or ():
            context.set_alpn_protocols(protocols)

    # --- bookkeeping called by connections and exchanges ---

    def connect(self, user: Connecting, endpoint: EndpointState, dial: Dial = PLAIN) -> None:
        """Make a connection for user. Users of HTTP/2 share a connection being made (up to
        the streams it is expected to take) instead of each making their own."""
        shared = False
        if dial is not PLAIN and self.pool.expects_h2(endpoint, dial):
            waiting = self.pool.waiting.get((endpoint, dial))
            if waiting is not None and len(waiting) < MAX_STREAMS:
                waiting.append(user)
                return
            if waiting is None:
                self.pool.waiting[(endpoint, dial)] = [user]
                shared = True
        task = self.loop.create_task(self._connect(user, endpoint, dial, shared))
        self._connects.add(task)
        task.add_done_callback(self._connects.discard)

    async def _connect(self, user: Connecting, endpoint: EndpointState, dial: Dial, shared: bool) -> None:
        users = [user]
        failure: OSError | TimeoutError | None = None
        made: Upstream | H2Connection | None = None
        try:
            made = await self.pool.connect(endpoint, limit=self.settings.connect_timeout, dial=dial)
        except (OSError, TimeoutError) as err:
            failure = err
        finally:  # (also when cancelled: a later connect must not join a dead list)
            if shared:
                users = self.pool.waiting.pop((endpoint, dial), users)
        if made is None:
            error = str(failure) or type(failure).__name__
            if isinstance(failure, ssl.SSLError):
                error = f"TLS to {dial.server_name} failed: {error}"
                log.warning(
                    "backend TLS handshake failed",
                    extra=fields(endpoint=endpoint.key, server_name=dial.server_name, error=error),
                )
            for waiting in users:
                waiting.connect_failed(endpoint, error)
            return
        if not isinstance(made, H2Connection):
            user.connected(made)
            for waiting in users:
                if waiting is not user:
                    self.connect(waiting, endpoint, dial)
            return
        if made.h2.remote_settings.max_concurrent_streams == 0:
            # A server that takes no stream: asking another connection for one would open
            # connections to it in a loop, one per SETTINGS, for as long as the requests wait.
            made.close()
            for waiting in users:
                waiting.connect_failed(
                    endpoint, "the backend allows no HTTP/2 stream (SETTINGS_MAX_CONCURRENT_STREAMS 0)"
                )
            return
        for waiting in users:
            stream = made.open_stream() if made.available() else self.pool.take(endpoint, dial)
            if stream is not None:
                waiting.connected(stream)
            else:  # more users than the server takes streams: another connection
                self.connect(waiting, endpoint, dial)

    def count_response(self, status: int) -> None:
        self.responses[min(status // 100, 5)] += 1

    # --- ServingListener ---

    async def drain(self, grace: float) -> None:
        # Idle keep-alive connections close now; busy ones finish their exchange first.
        for conn in list(self.connections):
            if isinstance(conn, H2Client):
                conn.drain()  # GOAWAY: the streams in flight finish
            elif conn.tunnel is not None:
                conn.tunnel.close("drain")
            elif conn.current is None and not conn.queue:
                conn.close()
            else:
                conn.closing = True
        await self.wait_idle(grace)
        for conn in list(self.connections):
            if isinstance(conn, H2Client):
                conn.abort()
            elif conn.tunnel is not None:
                conn.tunnel.abort("drain-timeout")
            else:
                conn.abort()
        for task in list(self._connects):
            task.cancel()
        self.pool.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    @staticmethod
    def collect(listeners: list[ServingL7]) -> Iterator[Metric]:
        """The L7 metric families; the per rule ones only while settings.route_metrics
        (the rules' counters count either way: turning it on needs a restart, and a
        restart starts counters from zero anyway)."""
        port_labels = ["port"]
        connections = GaugeMetricFamily(
            "bilayer_l7_connections_active", "Open client connections.", labels=port_labels
        )
        responses = CounterMetricFamily(
            "bilayer_l7_responses", "Responses by status class, all routes.", labels=[*port_labels, "code"]
        )
        rule_labels = ["port", "route", "rule"]
        by_route = CounterMetricFamily(
            "bilayer_l7_route_responses",
            "Responses by route rule and status class.",
            labels=[*rule_labels, "code"],
        )
        latency = HistogramMetricFamily(
            "bilayer_l7_route_duration_seconds", "Request duration by route rule.", labels=rule_labels
        )
        retries = CounterMetricFamily(
            "bilayer_l7_route_retries", "Retries by route rule.", labels=rule_labels
        )
        limited = CounterMetricFamily(
            "bilayer_l7_route_rate_limited", "429s by route rule.", labels=rule_labels
        )
        cluster_labels = ["port", "cluster"]
        cluster_requests = CounterMetricFamily(
            "bilayer_l7_cluster_requests", "Requests sent.", labels=cluster_labels
        )
        cluster_failures = CounterMetricFamily(
            "bilayer_l7_cluster_connect_failures", "Failed connects.", labels=cluster_labels
        )
        cluster_retries = CounterMetricFamily("bilayer_l7_cluster_retries", "Retries.", labels=cluster_labels)
        timeouts = CounterMetricFamily(
            "bilayer_l7_header_timeouts", "Connections cut for slow request headers.", labels=port_labels
        )
        tunnels = CounterMetricFamily(
            "bilayer_l7_upgrades", "Connections upgraded (WebSocket) and tunnelled.", labels=port_labels
        )
        rejected = CounterMetricFamily(
            "bilayer_l7_connections_rejected",
            "Connections refused over the connection limit.",
            labels=port_labels,
        )
        deadlines = CounterMetricFamily(
            "bilayer_l7_timeouts",
            "Exchanges and connections cut by a deadline, by kind (header: a head or trailers "
            "too slow; idle: no byte moved; slow_reader: a client not reading its response; "
            "body_rate: a request body under the minimum rate).",
            labels=[*port_labels, "kind"],
        )
        bad = CounterMetricFamily(
            "bilayer_l7_bad_messages",
            "Messages refused as malformed or over a limit, by who sent them (client, backend).",
            labels=[*port_labels, "peer"],
        )
        mirror_copies = CounterMetricFamily(
            "bilayer_l7_mirror_copies",
            "Request copies sent to a mirror cluster, by result (answered; dropped: over a bound, "
            "or the client's request did not complete; failed: no endpoint, connect or answer failed).",
            labels=[*cluster_labels, "result"],
        )
        requests = CounterMetricFamily(
            "bilayer_l7_requests", "Requests by client protocol.", labels=[*port_labels, "protocol"]
        )
        defences = CounterMetricFamily(
            "bilayer_l7_http2_defences",
            "HTTP/2 connections closed with ENHANCE_YOUR_CALM, by defence (rapid_reset, control_flood).",
            labels=[*port_labels, "defence"],
        )
        overflows = CounterMetricFamily(
            "bilayer_l7_pipeline_overflows",
            "Connections closed for pipelining more requests than are queued.",
            labels=port_labels,
        )
        for listener in listeners:
            port = str(listener.port)
            connections.add_metric([port], len(listener.connections))
            timeouts.add_metric([port], listener.header_timeouts)
            tunnels.add_metric([port], listener.tunnels)
            rejected.add_metric([port], listener.rejected)
            overflows.add_metric([port], listener.pipeline_overflows)
            requests.add_metric([port, "HTTP/1.x"], listener.requests - listener.h2_requests)
            requests.add_metric([port, "HTTP/2"], listener.h2_requests)
            for defence in ("rapid_reset", "control_flood"):
                defences.add_metric([port, defence], listener.h2_defences[defence])
            for kind in ("header", "idle", "slow_reader", "body_rate"):
                deadlines.add_metric([port, kind], listener.timeouts[kind])
            for peer in ("client", "backend"):
                bad.add_metric([port, peer], listener.bad_messages[peer])
            for code in range(1, 6):
                responses.add_metric([port, f"{code}xx"], listener.responses[code])
            if listener.settings.route_metrics:
                for (route, index), stats in sorted(listener.memory.rules.items()):
                    labels = [port, route, str(index)]
                    for code in range(1, 6):
                        by_route.add_metric([*labels, f"{code}xx"], stats.responses[code])
                    cumulative, buckets = 0, []
                    for bound, count in zip((*BUCKETS, float("inf")), stats.buckets, strict=True):
                        cumulative += count
                        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                    latency.add_metric(labels, buckets, stats.seconds)
                    retries.add_metric(labels, stats.retries)
                    limited.add_metric(labels, stats.rate_limited)
            for name, cstats in sorted(listener.memory.clusters.items()):
                cluster_requests.add_metric([port, name], cstats.requests)
                cluster_failures.add_metric([port, name], cstats.connect_failures)
                cluster_retries.add_metric([port, name], cstats.retries)
                if cstats.mirrored or cstats.mirror_dropped or cstats.mirror_failed:
                    mirror_copies.add_metric([port, name, "answered"], cstats.mirrored)
                    mirror_copies.add_metric([port, name, "dropped"], cstats.mirror_dropped)
                    mirror_copies.add_metric([port, name, "failed"], cstats.mirror_failed)
        yield from (connections, responses)
        if any(listener.settings.route_metrics for listener in listeners):
            yield from (by_route, latency, retries, limited)
        yield from (cluster_requests, cluster_failures, cluster_retries, timeouts, tunnels, rejected)
        yield from (deadlines, bad, overflows, mirror_copies, requests, defences)


async def open_l7(dataplane: Dataplane, port: int, listener: table.Listener, tbl: table.Table) -> ServingL7:
    """The ListenerFactory for L7 listeners."""
    serving = ServingL7(dataplane, port, listener, tbl)
    await serving.start(dataplane.settings.address)
    return serving
