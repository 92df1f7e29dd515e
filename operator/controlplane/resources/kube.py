"""The built-in Kubernetes objects the compiler reads: only the fields it needs, extra ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TLS_SECRET_TYPE = "kubernetes.io/tls"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ServicePort(_Lenient):
    name: str | None = None
    port: int
    targetPort: int | str | None = None
    protocol: str = "TCP"
    appProtocol: str | None = None  # what the port speaks (kubernetes.io/h2c, https, ...)


class ServiceSpec(_Lenient):
    ports: list[ServicePort] = Field(default_factory=list)
    type: str = "ClusterIP"


class Service(_Lenient):
    spec: ServiceSpec = Field(default_factory=ServiceSpec)


class EndpointConditions(_Lenient):
    # Kubernetes: a nil condition is read as true.
    ready: bool | None = None


class Endpoint(_Lenient):
    addresses: list[str] = Field(default_factory=list)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)


class EndpointPort(_Lenient):
    name: str | None = None
    port: int | None = None
    protocol: str = "TCP"


class EndpointSlice(_Lenient):
    addressType: str = "IPv4"
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None


class Secret(_Lenient):
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)
