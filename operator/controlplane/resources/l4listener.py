"""The L4Listener resource: forward TCP connections or UDP datagrams arriving on a port to
backends, bytes untouched; TCP listeners with hostnames share a port, routed by TLS SNI."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .classes import ClassName
from .common import BackendRef, Duration, Model, Port, Status, parse_duration
from .l7route import Hostname

# The largest UDP payload an IPv4 datagram can carry.
MAX_DATAGRAM = 65507


class LoadBalancing(Model):
    """How a backend endpoint is chosen for each new connection."""

    policy: Literal["RoundRobin", "LeastConnections", "Random", "ConsistentHash"] = Field(
        default="RoundRobin",
        description=(
            "RoundRobin (smooth, weighted), LeastConnections (weighted), Random (weighted) "
            "or ConsistentHash (Maglev on the client IP)."
        ),
    )


class HealthCheck(Model):
    """Active TCP connect checks against every endpoint."""

    interval: Duration = Field(default="5s", description="Time between two checks of an endpoint.")
    timeout: Duration = Field(default="1s", description="How long a connect may take to count as healthy.")
    unhealthyThreshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="Consecutive failures that mark an endpoint unhealthy."
    )
    healthyThreshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=1, description="Consecutive successes that mark an endpoint healthy again."
    )

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheck:
        if parse_duration(self.timeout) > parse_duration(self.interval):
            raise ValueError(
                f"timeout {self.timeout} is longer than interval {self.interval}; "
                "make the timeout at most the interval"
            )
        return self


class L4Timeouts(Model):
    """Connection and session timeouts."""

    connect: Duration = Field(default="5s", description="Limit on each connect attempt to a backend (TCP).")
    idle: Duration | None = Field(
        default=None,
        description=(
            "Close a connection (end a UDP session) after this long with no bytes either way; "
            "default 1h for TCP, 10s for UDP (longer than a DNS client's retry interval)."
        ),
    )


class ConnectionRate(Model):
    """A token bucket: connections (UDP: sessions) allowed per unit, in bursts of burst."""

    connections: Annotated[int, Field(ge=1, le=1_000_000_000)] = Field(
        description="New connections (UDP: sessions) allowed per unit."
    )
    unit: Literal["Second", "Minute", "Hour"] = Field(default="Second", description="Second, Minute or Hour.")
    burst: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = Field(
        default=None, description="How many may come at once after a quiet spell; defaults to connections."
    )


class ClientLimits(Model):
    """What one client may hold (like HAProxy's sc_conn_cur and sc_conn_rate). A client is
    an IPv4 address or an IPv6 /64 (one host usually has a whole /64)."""

    maxConnections: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None, description="Connections (UDP: sessions) one client may have open at once."
    )
    connectionRate: ConnectionRate | None = Field(
        default=None, description="New connections (UDP: sessions) one client may open, as a token bucket."
    )


class L4Limits(Model):
    """Limits that absorb floods at the edge: the excess is closed (UDP: dropped) before
    any backend is contacted, and counted in bilayer_l4_rejected / bilayer_udp_drops."""

    perClient: ClientLimits | None = Field(default=None, description="Limits per client address.")
    acceptRate: ConnectionRate | None = Field(
        default=None, description="New connections (UDP: sessions) the whole listener takes."
    )


class L4ListenerSpec(Model):
    """Forward TCP connections or UDP datagrams arriving on port to the backends, bytes untouched."""

    port: Port = Field(description="Port the dataplane listens on (1-65535).")
    className: ClassName | None = Field(
        default=None,
        description=(
            "The install that serves this object (its operator's --class, the chart's className). "
            "Absent: the default class, bilayer. Installs of other classes ignore the object."
        ),
    )
    protocol: Literal["TCP", "UDP"] = Field(
        default="TCP",
        description="TCP or UDP. A TCP and a UDP listener may share a port number (DNS on 53).",
    )
    hostnames: list[Hostname] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "TLS passthrough (TCP): serve only connections whose ClientHello names one of these "
            "(SNI; exact, or *.suffix). Listeners with hostnames share their port; one without "
            "hostnames on that port is the default. TLS is not terminated."
        ),
    )
    backendRefs: list[BackendRef] = Field(
        min_length=1, max_length=16, description="Services that receive the connections."
    )
    loadBalancing: LoadBalancing = Field(
        default_factory=LoadBalancing, description="How an endpoint is chosen per connection."
    )
    healthCheck: HealthCheck | None = Field(
        default=None, description="Active TCP connect health checks; off when absent."
    )
    timeouts: L4Timeouts = Field(default_factory=L4Timeouts, description="Connect and idle timeouts.")
    proxyProtocol: Literal["None", "V1", "V2"] = Field(
        default="None",
        description="Send a PROXY protocol header (V1 text, V2 binary) with the client address.",
    )
    # No default in the schema: the API server would write it into UDP listeners too, where
    # maxConnections is refused (the compiler applies the table's 10000 for TCP).
    maxConnections: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None,
        description="TCP connections beyond this many are accepted and closed at once. Default 10000.",
    )
    maxSessions: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None,
        description=(
            "UDP: sessions (client address and port) at once; datagrams that would start "
            "another are dropped. Each holds a socket. Default 10000."
        ),
    )
    maxDatagramSize: Annotated[int, Field(ge=1, le=MAX_DATAGRAM)] | None = Field(
        default=None,
        description="UDP: larger datagrams, either way, are dropped and counted. Default 65507 (any).",
    )
    limits: L4Limits | None = Field(
        default=None, description="Per-client and accept limits; none when absent."
    )

    @field_validator("hostnames")
    @classmethod
    def _unique_hostnames(cls, hostnames: list[str]) -> list[str]:
        if len(set(hostnames)) != len(hostnames):
            raise ValueError("hostnames must be unique")
        return hostnames

    @model_validator(mode="after")
    def _fields_of_protocol(self) -> L4ListenerSpec:
        given = self.model_fields_set
        if self.protocol == "UDP":
            if self.hostnames:
                raise ValueError(
                    "hostnames: TLS passthrough is TCP only; remove hostnames or use protocol TCP"
                )
            if self.proxyProtocol != "None":
                raise ValueError("proxyProtocol: PROXY headers are sent on TCP only; remove it for UDP")
            if "maxConnections" in given:
                raise ValueError("maxConnections: counts TCP connections; use maxSessions for UDP")
        else:
            for name in ("maxSessions", "maxDatagramSize"):
                if name in given:
                    raise ValueError(f"{name}: applies to UDP only; remove it or set protocol: UDP")
        return self


class L4Listener(Model):
    """An L4Listener object as stored in Kubernetes."""

    apiVersion: Literal["bilayer.dev/v1alpha1"] = Field(description="bilayer.dev/v1alpha1")
    kind: Literal["L4Listener"] = Field(description="L4Listener")
    metadata: dict[str, object] = Field(description="Standard object metadata.")
    spec: L4ListenerSpec = Field(description="What to listen on and where to forward.")
    status: Status | None = Field(default=None, description="Conditions set by the operator.")
