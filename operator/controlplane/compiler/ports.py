"""Port ownership: the oldest object on a port decides what the port is.

An L4Listener owns its port alone. L7Routes on one port merge into one HTTP listener;
the port is TLS when its oldest route says so, and a route that disagrees is refused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..resources.l4listener import L4Listener
from ..resources.l7route import L7Route
from .snapshot import ObjectKey


@dataclass(frozen=True)
class Parsed:
    """A valid L4Listener or L7Route with its identity and age."""

    key: ObjectKey
    generation: int | None
    age: tuple[str, str, str]
    model: L4Listener | L7Route

    @property
    def port(self) -> int:
        return self.model.spec.port


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def claim_ports(objects: list[Parsed]) -> tuple[dict[int, list[Parsed]], dict[ObjectKey, Refusal]]:
    """Owners of each port (oldest first) and the objects refused, with why."""
    by_port: dict[int, list[Parsed]] = defaultdict(list)
    for parsed in objects:
        by_port[parsed.port].append(parsed)
    owners: dict[int, list[Parsed]] = {}
    refused: dict[ObjectKey, Refusal] = {}
    for port, claimants in by_port.items():
        claimants.sort(key=lambda p: p.age)
        oldest = claimants[0]
        if isinstance(oldest.model, L4Listener):
            owners[port] = [oldest]
            for other in claimants[1:]:
                refused[other.key] = Refusal(
                    "PortConflict",
                    f"port {port} is taken by the older {oldest.key}; choose another port",
                )
            continue
        tls = _is_tls(oldest.model)
        kept = []
        for other in claimants:
            if isinstance(other.model, L4Listener):
                refused[other.key] = Refusal(
                    "PortConflict",
                    f"port {port} is taken by the older {oldest.key} (HTTP); choose another port",
                )
            elif _is_tls(other.model) != tls:
                wants = "plain HTTP" if tls else "TLS"
                says = "terminates TLS" if tls else "serves plain HTTP"
                refused[other.key] = Refusal(
                    "ProtocolConflict",
                    f"port {port} {says} (decided by the oldest route, {oldest.key}) "
                    f"but this route wants {wants}; use another port or match spec.tls",
                )
            else:
                kept.append(other)
        owners[port] = kept
    return owners, refused


def _is_tls(model: Any) -> bool:
    return isinstance(model, L7Route) and model.spec.tls is not None
