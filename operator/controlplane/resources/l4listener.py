"""The L4Listener resource: forward TCP arriving on a port to backends, bytes untouched."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .common import BackendRef, Duration, Model, Port, Status, parse_duration


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
    """Connection timeouts."""

    connect: Duration = Field(default="5s", description="Limit on each connect attempt to a backend.")
    idle: Duration = Field(
        default="1h", description="Close a connection after this long with no bytes either way."
    )


class L4ListenerSpec(Model):
    """Forward TCP connections arriving on port to the backends, bytes untouched."""

    port: Port = Field(description="Port the dataplane listens on (1-65535).")
    protocol: Literal["TCP"] = Field(default="TCP", description="Transport protocol; TCP only.")
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
    maxConnections: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10000,
        description="Connections beyond this many are accepted and closed at once.",
    )


class L4Listener(Model):
    """An L4Listener object as stored in Kubernetes."""

    apiVersion: Literal["bilayer.dev/v1alpha1"] = Field(description="bilayer.dev/v1alpha1")
    kind: Literal["L4Listener"] = Field(description="L4Listener")
    metadata: dict[str, object] = Field(description="Standard object metadata.")
    spec: L4ListenerSpec = Field(description="What to listen on and where to forward.")
    status: Status | None = Field(default=None, description="Conditions set by the operator.")
