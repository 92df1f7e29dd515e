"""Port ownership: the oldest object on a port decides what the port is.

TCP and UDP port numbers are separate (a Slot each): a UDP L4Listener never conflicts with
what listens on TCP. A UDP port has one L4Listener. On TCP, an L4Listener without
hostnames owns its port alone, except that L4Listeners with hostnames (TLS passthrough,
routed by SNI) may share it; L7Routes on one port merge into one HTTP listener; the port
is TLS when its oldest route says so, and a route that disagrees is refused. L7Routes
and L4Listeners never share a port.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..resources.common import Condition
from ..resources.l4listener import L4Listener
from ..resources.l7route import L7Route
from .snapshot import ObjectKey


class Slot(NamedTuple):
    """A port number on one transport."""

    port: int
    protocol: str  # TCP | UDP


@dataclass(frozen=True)
class Parsed:
    """A valid L4Listener or L7Route with its identity and age.

    superseded, when set, is the Accepted=False condition of a newer version of the object
    that did not validate: this Parsed is the last version that did, compiled in its place."""

    key: ObjectKey
    generation: int | None
    age: tuple[str, str, str]
    model: L4Listener | L7Route
    superseded: Condition | None = None

    @property
    def port(self) -> int:
        return self.model.spec.port

    @property
    def slot(self) -> Slot:
        model = self.model
        protocol = model.spec.protocol if isinstance(model, L4Listener) else "TCP"
        return Slot(model.spec.port, protocol)


@dataclass(frozen=True)
class Invalid:
    """An object that does not validate, with its Accepted=False condition."""

    conditions: list[Condition]


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def references_of(p: Parsed) -> set[tuple[str, str, str]]:
    """The Services, Secrets and ConfigMaps an object names, as (kind, namespace, name)."""
    namespace = p.key.namespace
    refs: list[Any] = list(p.model.spec.backendRefs) if isinstance(p.model, L4Listener) else []
    if isinstance(p.model, L7Route):
        refs = [ref for rule in p.model.spec.rules for ref in rule.service_refs()]
    names = {("Service", ref.namespace or namespace, ref.name) for ref in refs}
    if isinstance(p.model, L7Route) and p.model.spec.tls is not None:
        names.add(("Secret", namespace, p.model.spec.tls.secretName))
    for ref in refs:
        tls = getattr(ref, "tls", None)
        if tls is not None:
            names |= {(ca.kind, namespace, ca.name) for ca in tls.caCertificateRefs}
    return names


def claim_ports(objects: list[Parsed]) -> tuple[dict[Slot, list[Parsed]], dict[ObjectKey, Refusal]]:
    """Owners of each port (oldest first) and the objects refused, with why."""
    by_port: dict[Slot, list[Parsed]] = defaultdict(list)
    for parsed in objects:
        by_port[parsed.slot].append(parsed)
    owners: dict[Slot, list[Parsed]] = {}
    refused: dict[ObjectKey, Refusal] = {}
    for port, claimants in by_port.items():
        claimants.sort(key=claim_order)
        owners[port] = claim_port(claimants, refused)
    return owners, refused


def claim_order(p: Parsed) -> tuple[tuple[str, str, str], str]:
    """Oldest first; an L4Listener and an L7Route of the same age and name by kind."""
    return (p.age, p.key.kind)


def claim_port(claimants: list[Parsed], refused: dict[ObjectKey, Refusal]) -> list[Parsed]:
    """The owners among claimants of one port (oldest first); the rest go to refused."""
    kept = []
    oldest = claimants[0]
    for other in claimants:
        why = verdict(oldest, other)
        if why is None:
            kept.append(other)
        else:
            refused[other.key] = why
    return kept


def verdict(oldest: Parsed, other: Parsed) -> Refusal | None:
    """Why other may not share oldest's port, or None when it may (or is oldest)."""
    if other is oldest:
        return None
    port = oldest.port
    if isinstance(oldest.model, L4Listener):
        if oldest.model.spec.protocol == "UDP":
            return Refusal(
                "PortConflict", f"UDP port {port} is taken by the older {oldest.key}; choose another port"
            )
        if isinstance(other.model, L4Listener) and (
            oldest.model.spec.hostnames or other.model.spec.hostnames
        ):
            return None  # TLS passthrough: listeners share the port by SNI (see compiler.sni)
        if isinstance(other.model, L7Route) and oldest.model.spec.hostnames:
            return Refusal(
                "PortConflict",
                f"port {port} is taken by the older {oldest.key} (TLS passthrough by SNI); an L7Route "
                "cannot share a port with L4Listeners; choose another port",
            )
        return Refusal("PortConflict", f"port {port} is taken by the older {oldest.key}; choose another port")
    if isinstance(other.model, L4Listener):
        if other.model.spec.hostnames:
            return Refusal(
                "PortConflict",
                f"port {port} is taken by the older {oldest.key} (HTTP); TLS passthrough L4Listeners "
                "cannot share a port with L7Routes; choose another port",
            )
        return Refusal(
            "PortConflict", f"port {port} is taken by the older {oldest.key} (HTTP); choose another port"
        )
    tls = _is_tls(oldest.model)
    if _is_tls(other.model) != tls:
        wants = "plain HTTP" if tls else "TLS"
        says = "terminates TLS" if tls else "serves plain HTTP"
        return Refusal(
            "ProtocolConflict",
            f"port {port} {says} (decided by the oldest route, {oldest.key}) "
            f"but this route wants {wants}; use another port or match spec.tls",
        )
    return None


def _is_tls(model: Any) -> bool:
    return isinstance(model, L7Route) and model.spec.tls is not None
