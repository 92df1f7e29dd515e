"""Compile an L4Listener into a table listener."""

from __future__ import annotations

from dataplane import table

from ..resources.common import parse_duration
from ..resources.l4listener import L4Listener
from .backends import Resolution


def build_l4(listener: L4Listener, source: str, resolution: Resolution) -> table.Listener:
    spec = listener.spec
    check = spec.healthCheck
    return table.Listener.build(
        l4=table.L4Listener(
            source=source,
            backends=resolution.backends,
            policy=spec.loadBalancing.policy,
            healthCheck=None
            if check is None
            else table.HealthCheck.build(
                interval=parse_duration(check.interval),
                timeout=parse_duration(check.timeout),
                unhealthyThreshold=check.unhealthyThreshold,
                healthyThreshold=check.healthyThreshold,
            ),
            connectTimeout=parse_duration(spec.timeouts.connect),
            idleTimeout=parse_duration(spec.timeouts.idle),
            proxyProtocol=spec.proxyProtocol,
            maxConnections=spec.maxConnections,
        )
    )
