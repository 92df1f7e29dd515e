"""What the operator knows of the cluster: the compiler's input, kept from watch events.

`apply` answers the loop's question "can this event change the table?", so that status
writes (which come back as MODIFIED events), unrelated Services and unreferenced
Secrets never cause a compile. Only kubernetes.io/tls Secrets are kept, trimmed to what
a certificate needs; their content is never logged. ConfigMaps (CA bundles for TLS to
backends) are kept with only their entries that hold a PEM certificate: a cluster has
many ConfigMaps, few hold certificates, and the operator keeps what it may need.

The store holds the routes of its install's class only (resources.classes): the compiler
never sees another install's objects, so ports are decided within a class, and the
status writer, which writes only what the store holds, never touches them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .compiler.snapshot import ROUTE_KINDS, ObjectKey, Snapshot
from .compiler.tls import PEM_CERTIFICATE
from .resources.classes import DEFAULT_CLASS, in_class
from .resources.kube import SERVICE_NAME_LABEL, TLS_SECRET_TYPE


@dataclass(frozen=True)
class Kind:
    """A watched kind and its API coordinates."""

    kind: str
    group: str
    version: str
    plural: str


KINDS = (
    Kind("L4Listener", "bilayer.dev", "v1alpha1", "l4listeners"),
    Kind("L7Route", "bilayer.dev", "v1alpha1", "l7routes"),
    Kind("Service", "", "v1", "services"),
    Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    Kind("Secret", "", "v1", "secrets"),
    Kind("ConfigMap", "", "v1", "configmaps"),
)
BY_KIND = {k.kind: k for k in KINDS}

_METADATA_KEPT = ("name", "namespace", "uid", "generation", "creationTimestamp", "labels", "resourceVersion")


def trim(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an object the compiler and the status writer read."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": kind,
        "metadata": {k: meta[k] for k in _METADATA_KEPT if k in meta},
    }
    for field in ("spec", "status", "addressType", "endpoints", "ports", "type", "data"):
        if field in body:
            out[field] = body[field]
    if kind == "ConfigMap":
        data = body.get("data") or {}
        out["data"] = {k: v for k, v in data.items() if isinstance(v, str) and PEM_CERTIFICATE in v}
    return out


def _table_view(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of an object can change the table: not its status, not its resourceVersion."""
    meta = obj.get("metadata") or {}
    rest = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
    return (
        repr(rest),
        meta.get("generation"),
        meta.get("creationTimestamp"),
        repr(meta.get("labels")) if obj.get("kind") == "EndpointSlice" else None,
    )


def _older(obj: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether obj is an older state of the same object. resourceVersions are opaque to
    clients in general; the kube-apiserver's are etcd revisions, numbers that only grow,
    and only those are compared (anything else is never older)."""
    a = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    b = str((than.get("metadata") or {}).get("resourceVersion") or "")
    return a.isdigit() and b.isdigit() and int(a) < int(b)


def _references(
    key: ObjectKey, obj: Mapping[str, Any]
) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    """The Services a route object names, as (namespace, name), and the Secrets and
    ConfigMaps, as (kind, namespace, name)."""
    services: set[tuple[str, str]] = set()
    secrets: set[tuple[str, str, str]] = set()
    spec = obj.get("spec") or {}
    refs = list(spec.get("backendRefs") or [])
    for rule in spec.get("rules") or []:
        if isinstance(rule, dict):
            refs += rule.get("backendRefs") or []
    for ref in refs:
        if isinstance(ref, dict) and ref.get("name"):
            services.add((ref.get("namespace") or key.namespace, ref["name"]))
        backend_tls = ref.get("tls") if isinstance(ref, dict) else None
        for ca in (backend_tls.get("caCertificateRefs") or []) if isinstance(backend_tls, dict) else []:
            if isinstance(ca, dict) and ca.get("name"):
                secrets.add((str(ca.get("kind") or "ConfigMap"), key.namespace, ca["name"]))
    tls = spec.get("tls")
    if isinstance(tls, dict) and tls.get("secretName"):
        secrets.add(("Secret", key.namespace, tls["secretName"]))
    return services, secrets


def _uncount(counts: Counter[Any], names: Iterable[Any]) -> None:
    for name in names:
        counts[name] -= 1
        if counts[name] <= 0:
            del counts[name]  # Counter.subtract keeps zeros: one per name ever seen


class Store:
    """Objects by key, with the references that decide what matters.

    References are counted per route, so an event costs O(its own references), not a
    pass over every route: at 10,000 routes the initial watch replay is 10,000 events.
    """

    def __init__(self, class_name: str = DEFAULT_CLASS) -> None:
        self.class_name = class_name
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self._services: Counter[tuple[str, str]] = Counter()  # (namespace, name) -> routes naming it
        self._secrets: Counter[tuple[str, str, str]] = Counter()  # Secrets and ConfigMaps, by kind
        self._named: dict[ObjectKey, tuple[set[tuple[str, str]], set[tuple[str, str, str]]]] = {}

    def apply(self, kind: str, event: str | None, body: Mapping[str, Any]) -> bool:
        """Record a watch event; True when the table may change because of it."""
        if kind == "Secret" and body.get("type") != TLS_SECRET_TYPE:
            return False
        obj = trim(kind, body)
        key = ObjectKey.of(obj)
        if event != "DELETED" and not in_class(obj, self.class_name):
            # Another install's object. One that was ours until this edit leaves our table
            # as if deleted; its status stays as it is, for the other install to write.
            event = "DELETED"
        if event == "DELETED":
            old = self.objects.pop(key, None)
            if key.kind in ROUTE_KINDS:
                self._count(key, None)
            return old is not None and self._matters(key, obj)
        old = self.objects.get(key)
        if old is not None and _older(obj, old):
            # A late watch event of our own earlier status write, after the answer to a
            # later one (StatusWriter records its resourceVersion): its status is stale.
            # Taken as news, it made the operator write the newer status once more.
            if _table_view(old) == _table_view(obj):
                return False
            obj["status"] = old.get("status")
            obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if old is not None and _table_view(old) == _table_view(obj):
            # E.g. our own status write coming back. The compiler knows unchanged objects by
            # identity (compiler.cache): keep the dict it knows, with the news in it.
            old["metadata"] = obj["metadata"]
            old.pop("status", None)
            if "status" in obj:
                old["status"] = obj["status"]
            return False
        self.objects[key] = obj
        if key.kind in ROUTE_KINDS:
            self._count(key, obj)
        return self._matters(key, obj)

    def _count(self, key: ObjectKey, obj: Mapping[str, Any] | None) -> None:
        old_services, old_secrets = self._named.pop(key, (set(), set()))
        _uncount(self._services, old_services)
        _uncount(self._secrets, old_secrets)
        if obj is not None:
            services, secrets = self._named[key] = _references(key, obj)
            self._services.update(services)
            self._secrets.update(secrets)

    def replace_all(
        self, kind: str, bodies: Iterable[Mapping[str, Any]], namespace: str | None = None
    ) -> bool:
        """A (re)list of one kind (in one namespace, when given): afterwards the store holds
        exactly these objects of it. Objects missing from the list were deleted while no
        watch saw it. True when the table may change."""
        changed = False
        listed: set[ObjectKey] = set()
        for body in bodies:
            if kind == "Secret" and body.get("type") != TLS_SECRET_TYPE:
                continue
            changed |= self.apply(kind, None, body)
            listed.add(ObjectKey.of(trim(kind, body)))
        gone = [
            key
            for key in self.objects
            if key.kind == kind and key not in listed and (namespace is None or key.namespace == namespace)
        ]
        for key in gone:
            changed |= self.apply(kind, "DELETED", self.objects[key])
        return changed

    def _matters(self, key: ObjectKey, obj: Mapping[str, Any]) -> bool:
        if key.kind in ROUTE_KINDS:
            return True
        if key.kind == "Service":
            return self._services[(key.namespace, key.name)] > 0
        if key.kind == "EndpointSlice":
            service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            return self._services[(key.namespace, str(service))] > 0
        if key.kind in ("Secret", "ConfigMap"):
            return self._secrets[(key.kind, key.namespace, key.name)] > 0
        return False

    def holds(self, key: ObjectKey) -> bool:
        """Whether the object is of this install's class and not deleted (routes), or known."""
        return key in self.objects

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self.objects.values()))

    def status_of(self, key: ObjectKey) -> list[dict[str, Any]]:
        obj = self.objects.get(key) or {}
        return list((obj.get("status") or {}).get("conditions") or [])

    def generation_of(self, key: ObjectKey) -> int | None:
        value = ((self.objects.get(key) or {}).get("metadata") or {}).get("generation")
        return value if isinstance(value, int) else None
