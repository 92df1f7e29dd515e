"""Resolve backendRefs: Service port -> EndpointSlices -> ready endpoint addresses."""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from dataplane import table

from ..resources.common import BackendRef
from ..resources.kube import SERVICE_NAME_LABEL, EndpointSlice, Service, ServicePort
from .snapshot import ObjectKey, Snapshot


@dataclass
class Resolution:
    """The table backends for a list of refs, and what could not be resolved."""

    backends: list[table.Backend] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    not_permitted: bool = False


def cluster_name(namespace: str, service: str, port: int) -> str:
    return f"{namespace}/{service}:{port}"


class BackendResolver:
    """Looks Services and EndpointSlices up by index; collects the clusters it resolves."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._services: dict[tuple[str, str], Service | str] = {}
        for obj in snapshot.of_kind("Service"):
            key = ObjectKey.of(obj)
            try:
                self._services[key.namespace, key.name] = Service.model_validate(obj)
            except ValidationError as err:
                self._services[key.namespace, key.name] = f"is malformed ({err.errors()[0]['msg']})"
        self._slices: dict[tuple[str, str], list[EndpointSlice]] = defaultdict(list)
        for obj in snapshot.of_kind("EndpointSlice"):
            key = ObjectKey.of(obj)
            service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if not service:
                continue
            try:
                self._slices[key.namespace, service].append(EndpointSlice.model_validate(obj))
            except ValidationError:
                continue  # a malformed slice contributes no endpoints
        self.clusters: dict[str, table.Cluster] = {}
        self._resolved: dict[tuple[str, str, int], tuple[str | None, str | None]] = {}

    def resolve(self, namespace: str, refs: Sequence[BackendRef], field_path: str) -> Resolution:
        result = Resolution()
        for i, ref in enumerate(refs):
            where = f"{field_path}[{i}]"
            if ref.namespace is not None and ref.namespace != namespace:
                result.not_permitted = True
                result.problems.append(
                    f"{where}: Service {ref.namespace}/{ref.name} is in another namespace; "
                    f"only Services in {namespace} may be referenced"
                )
                result.backends.append(table.Backend.build(cluster=None, weight=ref.weight))
                continue
            name, problem = self._cluster(namespace, ref)
            if problem:
                result.problems.append(f"{where}: {problem}")
            result.backends.append(table.Backend.build(cluster=name, weight=ref.weight))
        return result

    def lookup(self, namespace: str, ref: BackendRef) -> tuple[str | None, str | None]:
        """How ref resolves: the cluster name or None, and the problem. Registers the
        cluster for this compile's table, as resolve() does."""
        if ref.namespace is not None and ref.namespace != namespace:
            return None, "not permitted"
        return self._cluster(namespace, ref)

    def _cluster(self, namespace: str, ref: BackendRef) -> tuple[str | None, str | None]:
        # Many routes name the same Service port: resolve each once per compile.
        key = (namespace, ref.name, ref.port)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = self._resolve_cluster(namespace, ref)
        return found

    def _resolve_cluster(self, namespace: str, ref: BackendRef) -> tuple[str | None, str | None]:
        service = self._services.get((namespace, ref.name))
        if service is None:
            return None, f"Service {namespace}/{ref.name} not found"
        if isinstance(service, str):
            return None, f"Service {namespace}/{ref.name} {service}"
        port = next((p for p in service.spec.ports if p.port == ref.port), None)
        if port is None:
            have = ", ".join(str(p.port) for p in service.spec.ports) or "none"
            return (
                None,
                f"Service {namespace}/{ref.name} has no port {ref.port} (its ports: {have})",
            )
        name = cluster_name(namespace, ref.name, ref.port)
        if name not in self.clusters:
            self.clusters[name] = table.Cluster.build(endpoints=self._endpoints(namespace, ref.name, port))
        return name, None

    def _endpoints(self, namespace: str, service: str, port: ServicePort) -> list[table.Endpoint]:
        found: set[tuple[str, int]] = set()
        for endpoint_slice in self._slices.get((namespace, service), []):
            if endpoint_slice.addressType not in ("IPv4", "IPv6"):
                continue
            number = _slice_port(endpoint_slice, port)
            if number is None:
                continue
            for endpoint in endpoint_slice.endpoints or []:
                if endpoint.conditions.ready is False:
                    continue
                for address in endpoint.addresses:
                    if _is_ip(address):
                        found.add((address, number))
        return [table.Endpoint.build(address=a, port=p) for a, p in sorted(found)]


def _slice_port(endpoint_slice: EndpointSlice, port: ServicePort) -> int | None:
    """The endpoint port of a slice for a Service port: by name, else the target number."""
    target = port.targetPort if isinstance(port.targetPort, int) else None
    if endpoint_slice.ports is None:
        # No ports listed means "all ports": only a numeric target can be used.
        return target or (port.port if port.targetPort is None else None)
    for candidate in endpoint_slice.ports:
        if (candidate.name or "") == (port.name or "") and candidate.port is not None:
            return candidate.port
    if not port.name and target is not None:
        for candidate in endpoint_slice.ports:
            if candidate.port == target:
                return target
    return None


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
