"""Resolve backendRefs: Service port -> EndpointSlices -> ready endpoint addresses."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ValidationError

from dataplane import table

from ..resources.common import BackendRef
from ..resources.kube import SERVICE_NAME_LABEL, EndpointSlice, Service, ServicePort
from ..resources.l7route import BackendTLS
from . import upstream
from .intern import interned
from .snapshot import Object, ObjectKey, Snapshot
from .tls import SecretIndex


@dataclass
class Resolution:
    """The table backends for a list of refs, and what could not be resolved."""

    backends: list[table.Backend] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    not_permitted: bool = False
    ca_problem: bool = False  # a backendRef's tls names a CA bundle that is missing or bad
    unsupported_protocol: bool = False  # a Service port's appProtocol needs what the ref lacks
    notes: list[str] = field(default_factory=list)  # served, but worth saying (unknown appProtocol)


class ServiceRef(Protocol):
    """A reference to a Service port: a backendRef, or a mirror's."""

    @property
    def name(self) -> str: ...

    @property
    def namespace(self) -> str | None: ...

    @property
    def port(self) -> int: ...


def cluster_name(namespace: str, service: str, port: int, protocol: str = "TCP") -> str:
    """A cluster's name: ``namespace/service:port``, with ``/udp`` for a UDP port (a Service
    may have port 53 on TCP and on UDP, each with its own endpoints)."""
    return f"{namespace}/{service}:{port}" + ("/udp" if protocol == "UDP" else "")


def tls_cluster_name(base: str, tls: BackendTLS) -> str:
    """The cluster of a Service port reached over TLS with these settings:
    ``namespace/service:port/tls/<hostname>/<digest>``. Routes naming one Service port with
    different TLS settings get a cluster each (the same endpoints, verified differently);
    the digest of the settings keeps the name stable and distinct."""
    settings = json.dumps(tls.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return f"{base}/tls/{tls.hostname or 'insecure'}/{digest}"


class BackendResolver:
    """Looks Services and EndpointSlices up by index; collects the clusters it resolves."""

    def __init__(self, snapshot: Snapshot, secrets: SecretIndex | None = None) -> None:
        self.secrets = secrets if secrets is not None else SecretIndex(Snapshot())
        self._services: dict[tuple[str, str], Service | str] = {}
        # (namespace, service) -> slice name -> the slice (None: malformed, no endpoints)
        self._slices: dict[tuple[str, str], dict[str, EndpointSlice | None]] = defaultdict(dict)
        self.clusters: dict[str, table.Cluster] = {}
        self._resolved: dict[tuple[str, str, int, str], tuple[str | None, str | None]] = {}
        self._app_protocols: dict[str, str | None] = {}  # cluster name -> its port's appProtocol
        # TLS cluster name -> (the base cluster, its protocol and TLS, the cluster): the same
        # object while those are the same, so an unchanged table keeps its parts.
        self._tls_clusters: dict[str, tuple[table.Cluster, tuple[str, table.UpstreamTLS], table.Cluster]] = {}
        self.update([], [o for o in snapshot.objects if o.get("kind") in ("Service", "EndpointSlice")])

    def update(self, removed: Sequence[Object], added: Sequence[Object]) -> set[tuple[str, str]]:
        """Take Services and EndpointSlices away and in (other kinds are ignored); returns the
        (namespace, Service) names whose resolution may now differ."""
        affected: set[tuple[str, str]] = set()
        for obj, present in [(o, False) for o in removed] + [(o, True) for o in added]:
            key = ObjectKey.of(obj)
            if key.kind == "Service":
                name = (key.namespace, key.name)
                self._services.pop(name, None)
                if present:
                    self._services[name] = _service(obj)
            elif key.kind == "EndpointSlice":
                service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
                if not service:
                    continue
                name = (key.namespace, str(service))
                self._slices[name].pop(key.name, None)
                if present:
                    self._slices[name][key.name] = _endpoint_slice(obj)
            else:
                continue
            affected.add(name)
        if affected:  # forget what was resolved from them
            for resolved in [k for k in self._resolved if (k[0], k[1]) in affected]:
                del self._resolved[resolved]
                self.clusters.pop(cluster_name(*resolved), None)
                self._app_protocols.pop(cluster_name(*resolved), None)
            # The routes using them are recompiled (their Service changed) and register
            # their TLS clusters again, from the new endpoints.
            for stale in [n for n in self._tls_clusters if n.split("/tls/", 1)[0] not in self.clusters]:
                del self._tls_clusters[stale]
                self.clusters.pop(stale, None)
        return affected

    def resolve(
        self, namespace: str, refs: Sequence[BackendRef], field_path: str, protocol: str = "TCP"
    ) -> Resolution:
        """The backends of refs to Service ports of protocol (TCP or UDP)."""
        result = Resolution()
        for i, ref in enumerate(refs):
            name = self.resolve_one(namespace, ref, f"{field_path}[{i}]", result, protocol)
            result.backends.append(interned(table.Backend, cluster=name, weight=ref.weight))
        return result

    def resolve_one(
        self, namespace: str, ref: ServiceRef, where: str, result: Resolution, protocol: str = "TCP"
    ) -> str | None:
        """The cluster of one reference to a Service port of protocol, or None; what is
        wrong goes into result."""
        if ref.namespace is not None and ref.namespace != namespace:
            result.not_permitted = True
            result.problems.append(
                f"{where}: Service {ref.namespace}/{ref.name} is in another namespace; "
                f"only Services in {namespace} may be referenced"
            )
            return None
        name, problem = self._cluster(namespace, ref, protocol)
        if problem:
            result.problems.append(f"{where}: {problem}")
        return name

    def resolve_http(self, namespace: str, refs: Sequence[BackendRef], field_path: str) -> Resolution:
        """The backends of an L7 rule's refs: clusters speak what each Service port's
        appProtocol says, over TLS where the ref sets tls."""
        result = Resolution()
        for i, ref in enumerate(refs):
            name = self.http_cluster(namespace, ref, f"{field_path}[{i}]", result)
            result.backends.append(interned(table.Backend, cluster=name, weight=ref.weight))
        return result

    def http_cluster(self, namespace: str, ref: ServiceRef, where: str, result: Resolution) -> str | None:
        """The cluster HTTP requests for ref go to (a TLS one when ref sets tls), or None;
        what is wrong goes into result."""
        name = self.resolve_one(namespace, ref, where, result)
        if name is None:
            return None
        tls: BackendTLS | None = getattr(ref, "tls", None)
        said = upstream.speech(self._app_protocols.get(name), tls is not None)
        service = f"Service {namespace}/{ref.name} port {ref.port}"
        if said.note is not None:
            result.notes.append(f"{where}: {service} {said.note}")
        if said.problem is not None:
            problem = said.problem
            if not hasattr(ref, "tls"):  # a mirror's backendRef has no TLS settings
                problem = (
                    problem.split(":", 1)[0] + ": a RequestMirror cannot set tls; mirror to a plaintext port"
                )
            result.problems.append(f"{where}: {service} {problem}")
            result.unsupported_protocol = True
            return None
        if tls is None:
            return name
        ca_pem = None
        if tls.caCertificateRefs:
            ca_pem, ca_problem = self.secrets.ca_bundle(namespace, tls.caCertificateRefs, f"{where}.tls")
            if ca_problem is not None:
                result.problems.append(f"{ca_problem} (not served unverified)")
                result.ca_problem = True
                return None
        settings = (
            said.protocol,
            table.UpstreamTLS.build(
                # Without verification the name only goes into SNI: the Service's own.
                serverName=tls.hostname or f"{ref.name}.{namespace}.svc",
                caCertificates=ca_pem,
                insecureSkipVerify=tls.insecureSkipVerify,
            ),
        )
        tls_name = tls_cluster_name(name, tls)
        base = self.clusters[name]
        kept = self._tls_clusters.get(tls_name)
        if kept is None or kept[0] is not base or kept[1] != settings:
            cluster = table.Cluster.build(endpoints=base.endpoints, protocol=settings[0], tls=settings[1])
            kept = self._tls_clusters[tls_name] = (base, settings, cluster)
        self.clusters[tls_name] = kept[2]
        return tls_name

    def http_lookup(self, namespace: str, ref: ServiceRef) -> tuple[object, ...]:
        """What decides how ref resolves for HTTP (for memo signatures); registers its
        cluster for this compile's table, as http_cluster() does."""
        scratch = Resolution()
        name = self.http_cluster(namespace, ref, "", scratch)
        return (name, tuple(scratch.problems), tuple(scratch.notes))

    def lookup(self, namespace: str, ref: ServiceRef) -> tuple[str | None, str | None]:
        """How ref resolves: the cluster name or None, and the problem. Registers the
        cluster for this compile's table, as resolve() does."""
        if ref.namespace is not None and ref.namespace != namespace:
            return None, "not permitted"
        return self._cluster(namespace, ref)

    def _cluster(
        self, namespace: str, ref: ServiceRef, protocol: str = "TCP"
    ) -> tuple[str | None, str | None]:
        # Many routes name the same Service port: resolve each once per compile.
        key = (namespace, ref.name, ref.port, protocol)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = self._resolve_cluster(namespace, ref, protocol)
        return found

    def has_port(self, namespace: str, name: str, port: int, protocol: str) -> bool:
        """Whether the Service has this port number on this protocol."""
        service = self._services.get((namespace, name))
        if service is None or isinstance(service, str):
            return False
        return any(p.port == port and p.protocol == protocol for p in service.spec.ports)

    def _resolve_cluster(
        self, namespace: str, ref: ServiceRef, protocol: str
    ) -> tuple[str | None, str | None]:
        service = self._services.get((namespace, ref.name))
        if service is None:
            return None, f"Service {namespace}/{ref.name} not found"
        if isinstance(service, str):
            return None, f"Service {namespace}/{ref.name} {service}"
        port = next((p for p in service.spec.ports if p.port == ref.port and p.protocol == protocol), None)
        if port is None:
            have = ", ".join(_port_text(p) for p in service.spec.ports) or "none"
            return (
                None,
                f"Service {namespace}/{ref.name} has no {protocol} port {ref.port} (its ports: {have})",
            )
        name = cluster_name(namespace, ref.name, ref.port, protocol)
        if name not in self.clusters:
            # The protocol HTTP requests use without TLS (L4 listeners pass bytes, whatever it says).
            speaks = (
                upstream.speech(port.appProtocol, tls=False).protocol if protocol == "TCP" else "http/1.1"
            )
            self.clusters[name] = table.Cluster.build(
                endpoints=self._endpoints(namespace, ref.name, port), protocol=speaks
            )
            self._app_protocols[name] = port.appProtocol
        return name, None

    def _endpoints(self, namespace: str, service: str, port: ServicePort) -> list[table.Endpoint]:
        found: set[tuple[str, int]] = set()
        slices = self._slices.get((namespace, service), {})
        for _, endpoint_slice in sorted(slices.items()):
            if endpoint_slice is None or endpoint_slice.addressType not in ("IPv4", "IPv6"):
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


def _port_text(port: ServicePort) -> str:
    return f"{port.port}" if port.protocol == "TCP" else f"{port.port}/{port.protocol}"


def _service(obj: Object) -> Service | str:
    try:
        return Service.model_validate(obj)
    except ValidationError as err:
        return f"is malformed ({err.errors()[0]['msg']})"


def _endpoint_slice(obj: Object) -> EndpointSlice | None:
    try:
        return EndpointSlice.model_validate(obj)
    except ValidationError:
        return None  # a malformed slice contributes no endpoints


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
