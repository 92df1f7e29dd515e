"""What the operator knows of the cluster: the compiler's input, kept from watch events.

`apply` answers the loop's question "can this event change the table?", so that status
writes (which come back as MODIFIED events), unrelated Services and unreferenced
Secrets never cause a compile. Only kubernetes.io/tls Secrets are kept, trimmed to what
a certificate needs; their content is never logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .compiler.snapshot import ROUTE_KINDS, ObjectKey, Snapshot
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


class Store:
    """Objects by key, with the references that decide what matters."""

    def __init__(self) -> None:
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self._services: set[tuple[str, str]] = set()  # (namespace, name) referenced by a route
        self._secrets: set[tuple[str, str]] = set()

    def apply(self, kind: str, event: str | None, body: Mapping[str, Any]) -> bool:
        """Record a watch event; True when the table may change because of it."""
        if kind == "Secret" and body.get("type") != TLS_SECRET_TYPE:
            return False
        obj = trim(kind, body)
        key = ObjectKey.of(obj)
        if event == "DELETED":
            old = self.objects.pop(key, None)
            return old is not None and self._matters(key, obj)
        old = self.objects.get(key)
        self.objects[key] = obj
        if old is not None and _table_view(old) == _table_view(obj):
            return False  # e.g. our own status write coming back
        return self._matters(key, obj)

    def replace_all(self, kind: str, bodies: Iterable[Mapping[str, Any]]) -> None:
        """The initial listing of one kind."""
        for key in [k for k in self.objects if k.kind == kind]:
            del self.objects[key]
        for body in bodies:
            self.apply(kind, None, body)
        self.recompute_references()

    def _matters(self, key: ObjectKey, obj: Mapping[str, Any]) -> bool:
        if key.kind in ROUTE_KINDS:
            self.recompute_references()
            return True
        if key.kind == "Service":
            return (key.namespace, key.name) in self._services
        if key.kind == "EndpointSlice":
            service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            return (key.namespace, service) in self._services
        if key.kind == "Secret":
            return (key.namespace, key.name) in self._secrets
        return False

    def recompute_references(self) -> None:
        services: set[tuple[str, str]] = set()
        secrets: set[tuple[str, str]] = set()
        for key, obj in self.objects.items():
            if key.kind not in ROUTE_KINDS:
                continue
            spec = obj.get("spec") or {}
            refs = list(spec.get("backendRefs") or [])
            for rule in spec.get("rules") or []:
                refs += rule.get("backendRefs") or [] if isinstance(rule, dict) else []
            for ref in refs:
                if isinstance(ref, dict) and ref.get("name"):
                    services.add((ref.get("namespace") or key.namespace, ref["name"]))
            tls = spec.get("tls")
            if isinstance(tls, dict) and tls.get("secretName"):
                secrets.add((key.namespace, tls["secretName"]))
        self._services, self._secrets = services, secrets

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self.objects.values()))

    def status_of(self, key: ObjectKey) -> list[dict[str, Any]]:
        obj = self.objects.get(key) or {}
        return list((obj.get("status") or {}).get("conditions") or [])

    def generation_of(self, key: ObjectKey) -> int | None:
        value = ((self.objects.get(key) or {}).get("metadata") or {}).get("generation")
        return value if isinstance(value, int) else None
