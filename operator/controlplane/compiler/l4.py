"""Compile an L4Listener into a table listener: plain TCP, a TLS passthrough route, or UDP."""

from __future__ import annotations

from dataplane import table

from ..resources.common import parse_duration
from ..resources.l4listener import ConnectionRate, L4Limits, L4Listener, L4ListenerSpec
from .backends import Resolution

_UNIT_SECONDS = {"Second": 1.0, "Minute": 60.0, "Hour": 3600.0}
TCP_IDLE_DEFAULT = 3600.0
# Longer than a DNS client's retry interval (5 s for glibc, dig, dnsperf), so a retry from
# the same port finds its session; short enough that one-off queries from fresh ports
# (one session each) do not pile up: sessions ~ new client ports per second x 10.
UDP_IDLE_DEFAULT = 10.0


def build_l4(listener: L4Listener, source: str, resolution: Resolution) -> table.L4Listener:
    """The table's L4 listener (a plain TCP port, or one route of a passthrough port)."""
    spec = listener.spec
    idle = spec.timeouts.idle
    values: dict[str, object] = {
        "source": source,
        "backends": resolution.backends,
        "policy": spec.loadBalancing.policy,
        "healthCheck": health_check(spec),
        "connectTimeout": parse_duration(spec.timeouts.connect),
        "idleTimeout": parse_duration(idle) if idle is not None else TCP_IDLE_DEFAULT,
        "proxyProtocol": spec.proxyProtocol,
        "limits": build_limits(spec.limits),
    }
    if spec.maxConnections is not None:  # else the table's default
        values["maxConnections"] = spec.maxConnections
    return table.L4Listener.model_validate(values)


def build_udp(listener: L4Listener, source: str, resolution: Resolution, checked: bool) -> table.UDPListener:
    """The table's UDP listener; checked False drops the health check (a Service without
    TCP on the port cannot be checked by a TCP connect)."""
    spec = listener.spec
    idle = spec.timeouts.idle
    values: dict[str, object] = {
        "source": source,
        "backends": resolution.backends,
        "policy": spec.loadBalancing.policy,
        "healthCheck": health_check(spec) if checked else None,
        "idleTimeout": parse_duration(idle) if idle is not None else UDP_IDLE_DEFAULT,
        "limits": build_limits(spec.limits),
    }
    if spec.maxSessions is not None:
        values["maxSessions"] = spec.maxSessions
    if spec.maxDatagramSize is not None:
        values["maxDatagramSize"] = spec.maxDatagramSize
    return table.UDPListener.model_validate(values)


def health_check(spec: L4ListenerSpec) -> table.HealthCheck | None:
    check = spec.healthCheck
    if check is None:
        return None
    return table.HealthCheck.build(
        interval=parse_duration(check.interval),
        timeout=parse_duration(check.timeout),
        unhealthyThreshold=check.unhealthyThreshold,
        healthyThreshold=check.healthyThreshold,
    )


def build_limits(limits: L4Limits | None) -> table.Limits | None:
    if limits is None:
        return None
    values: dict[str, object] = {}
    per_client = limits.perClient
    if per_client is not None and per_client.maxConnections is not None:
        values["clientConnections"] = per_client.maxConnections
    if per_client is not None and per_client.connectionRate is not None:
        values["clientRate"], values["clientBurst"] = _bucket(per_client.connectionRate)
    if limits.acceptRate is not None:
        values["acceptRate"], values["acceptBurst"] = _bucket(limits.acceptRate)
    return table.Limits.build(**values) if values else None


def _bucket(rate: ConnectionRate) -> tuple[float, int]:
    """Tokens per second and bucket size."""
    return rate.connections / _UNIT_SECONDS[rate.unit], rate.burst or rate.connections
