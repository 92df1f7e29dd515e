"""Endpoint health, shared by every listener (L4 and L7) that uses an endpoint.

Two signals decide whether an endpoint gets new traffic:

- active checks: a TCP connect every ``interval``; ``unhealthyThreshold`` consecutive
  failures mark it down, ``healthyThreshold`` successes mark it up again;
- passive ejection: consecutive failures seen by real traffic (refused connects, and for
  HTTP 5xx answers) eject it for a back-off that doubles with each ejection.

State is keyed by (address, port, protocol) and survives table swaps for endpoints that
remain. A UDP endpoint is its own state (a TCP and a UDP service on one port number fail
apart); its active check is a TCP connect to the same port, where the Service has TCP too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .logs import fields
from .table import Backend, HealthCheck, Listener, Table

log = logging.getLogger("bilayer.health")

# Passive ejection, in the spirit of Envoy's outlier detection defaults.
EJECT_AFTER_FAILURES = 3
EJECT_BASE_SECONDS = 5.0
EJECT_MAX_SECONDS = 300.0


class EndpointState:
    """What the dataplane knows about one endpoint."""

    __slots__ = (
        "active",
        "address",
        "check_streak",
        "connect_failures",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "key",
        "port",
        "total",
    )

    def __init__(self, address: str, port: int, protocol: str = "tcp") -> None:
        self.address = address
        self.port = port
        self.key = f"{address}:{port}" if ":" not in address else f"[{address}]:{port}"
        if protocol != "tcp":
            self.key += f"/{protocol}"
        self.active = 0  # connections or requests in flight
        self.total = 0
        self.healthy = True  # from active checks
        self.check_streak = 0  # consecutive active-check results against the current state
        self.failures = 0  # consecutive passive failures
        self.ejected_until = 0.0
        self.ejections = 0
        self.connect_failures = 0

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now


@dataclass
class _Check:
    config: HealthCheck
    task: asyncio.Task[None]


class HealthRegistry:
    """Health state per endpoint; active checks run as one task per checked endpoint."""

    def __init__(
        self,
        eject_after: int = EJECT_AFTER_FAILURES,
        eject_base: float = EJECT_BASE_SECONDS,
        clock: Callable[[], float] | None = None,
        *,
        active_checks: bool = True,
    ) -> None:
        self.endpoints: dict[tuple[str, int, str], EndpointState] = {}
        self.eject_after = eject_after
        self.eject_base = eject_base
        self._checks: dict[tuple[str, int, str], _Check] = {}
        self.clock = clock or time.monotonic
        # A worker process runs no checks: the supervisor runs them once for the pod and
        # tells every worker (on_health there, mark here).
        self.active_checks = active_checks
        self.on_health: Callable[[EndpointState], None] | None = None  # an active verdict changed
        self.on_eject: Callable[[EndpointState], None] | None = None  # traffic ejected an endpoint

    def endpoint(self, address: str, port: int, protocol: str = "tcp") -> EndpointState:
        key = (address, port, protocol)
        state = self.endpoints.get(key)
        if state is None:
            state = self.endpoints[key] = EndpointState(address, port, protocol)
        return state

    def retain(self, table: Table) -> None:
        """Forget endpoints the table no longer has; start and stop active checks."""
        wanted: dict[tuple[str, int, str], HealthCheck] = {}
        present: set[tuple[str, int, str]] = set()
        for name, cluster in table.clusters.items():
            protocol = "udp" if name.endswith("/udp") else "tcp"
            present.update((e.address, e.port, protocol) for e in cluster.endpoints)
        for listener in table.listeners.values():
            for config, backends, protocol in _checked(listener):
                for backend in backends:
                    if backend.cluster is None:
                        continue
                    for e in table.clusters[backend.cluster].endpoints:
                        key = (e.address, e.port, protocol)
                        # Two listeners checking one endpoint: the more frequent check wins.
                        if key not in wanted or config.interval < wanted[key].interval:
                            wanted[key] = config
        for key in list(self.endpoints):
            if key not in present and self.endpoints[key].active == 0:
                del self.endpoints[key]
        if not self.active_checks:
            return
        for key, check in list(self._checks.items()):
            if wanted.get(key) != check.config:
                check.task.cancel()
                del self._checks[key]
                if key not in wanted and key in self.endpoints:
                    self.endpoints[key].healthy = True  # no checks: trust it again
                    if self.on_health is not None:
                        self.on_health(self.endpoints[key])
        loop = asyncio.get_running_loop()
        for key, config in wanted.items():
            if key not in self._checks:
                state = self.endpoint(*key)
                self._checks[key] = _Check(config, loop.create_task(self._check_loop(state, config)))

    # Passive signals from traffic.

    def report_failure(self, state: EndpointState) -> None:
        state.failures += 1
        if state.failures >= self.eject_after and state.ejected_until <= self.clock():
            state.ejections += 1
            backoff = min(self.eject_base * 2 ** (state.ejections - 1), EJECT_MAX_SECONDS)
            state.ejected_until = self.clock() + backoff
            state.failures = 0
            log.warning(
                "endpoint ejected",
                extra=fields(endpoint=state.key, seconds=backoff, ejections=state.ejections),
            )
            if self.on_eject is not None:
                self.on_eject(state)

    def mark(
        self, address: str, port: int, protocol: str, *, healthy: bool | None, ejected_until: float
    ) -> None:
        """What another process of the pod found: an active check's verdict (healthy; None:
        unchanged), or an ejection until ejected_until (time.monotonic, one clock for
        every process of the machine). An endpoint this table does not have is ignored."""
        state = self.endpoints.get((address, port, protocol))
        if state is None:
            return
        if healthy is not None:
            state.healthy = healthy
            if healthy:
                state.ejected_until = 0.0
        # The ejecting worker counts the ejection (bilayer_endpoint_ejections sums them).
        state.ejected_until = max(state.ejected_until, ejected_until)

    @staticmethod
    def report_success(state: EndpointState) -> None:
        state.failures = 0

    # Active checks.

    async def _check_loop(self, state: EndpointState, config: HealthCheck) -> None:
        while True:
            ok = await probe(state.address, state.port, limit=config.timeout)
            if self._record(state, ok, config) and self.on_health is not None:
                self.on_health(state)
            await asyncio.sleep(config.interval)

    @staticmethod
    def _record(state: EndpointState, ok: bool, config: HealthCheck) -> bool:
        """Count one check's result; True when the endpoint's verdict changed."""
        if ok == state.healthy:
            state.check_streak = 0
            return False
        state.check_streak += 1
        needed = config.healthyThreshold if ok else config.unhealthyThreshold
        if state.check_streak >= needed:
            state.healthy = ok
            state.check_streak = 0
            if ok:
                state.ejected_until = 0.0
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "endpoint " + ("healthy" if ok else "unhealthy"), extra=fields(endpoint=state.key))
            return True
        return False

    async def close(self) -> None:
        for check in self._checks.values():
            check.task.cancel()
        for check in self._checks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await check.task
        self._checks.clear()

    def collect(self) -> Iterator[Metric]:
        """Per-endpoint health metrics."""
        labels = ["endpoint"]
        healthy = GaugeMetricFamily(
            "bilayer_endpoint_healthy",
            "1 when the endpoint may receive traffic (checks pass, not ejected).",
            labels=labels,
        )
        active = GaugeMetricFamily(
            "bilayer_endpoint_active", "Connections or requests in flight.", labels=labels
        )
        ejections = CounterMetricFamily("bilayer_endpoint_ejections", "Passive ejections.", labels=labels)
        failures = CounterMetricFamily("bilayer_endpoint_connect_failures", "Failed connects.", labels=labels)
        now = self.clock()
        for state in sorted(self.endpoints.values(), key=lambda s: s.key):
            healthy.add_metric([state.key], 1 if state.available(now) else 0)
            active.add_metric([state.key], state.active)
            ejections.add_metric([state.key], state.ejections)
            failures.add_metric([state.key], state.connect_failures)
        yield from (healthy, active, ejections, failures)


def _checked(listener: Listener) -> Iterator[tuple[HealthCheck, list[Backend], str]]:
    """Each L4 face of a port with a health check: the check, its backends, the protocol."""
    routes = list(listener.passthrough.routes.values()) if listener.passthrough is not None else []
    for l4 in [listener.l4, *routes]:
        if l4 is not None and l4.healthCheck is not None:
            yield l4.healthCheck, l4.backends, "tcp"
    if listener.udp is not None and listener.udp.healthCheck is not None:
        yield listener.udp.healthCheck, listener.udp.backends, "udp"


async def probe(address: str, port: int, *, limit: float) -> bool:
    """One TCP connect check, failed when it takes longer than limit seconds."""
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(address, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
