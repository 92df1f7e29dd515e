"""TLS passthrough: which L4Listener serves which SNI name on a shared TCP port.

Gateway API TLSRoute rules: a hostname is exact or ``*.suffix`` (any deeper name, not the
suffix itself); a ClientHello's name takes the exact entry, else the longest wildcard
suffix, else the port's default (its listener without hostnames); none of these: the
connection is closed. Two listeners naming the same hostname: the older keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..resources.l4listener import L4Listener
from .ports import Parsed, Refusal
from .snapshot import ObjectKey

HOSTNAME_CONFLICT = "HostnameConflict"


@dataclass
class SNIIndex:
    """Hostnames to listeners (by source, namespace/name), and who lost what."""

    exact: dict[str, str] = field(default_factory=dict)
    wildcard: dict[str, str] = field(default_factory=dict)  # ".example.com" -> source
    default: str | None = None
    served: dict[ObjectKey, list[str]] = field(default_factory=dict)  # hostnames each one serves
    taken: dict[ObjectKey, list[tuple[str, ObjectKey]]] = field(default_factory=dict)
    refused: dict[ObjectKey, Refusal] = field(default_factory=dict)


def index_hostnames(port: int, owners: list[Parsed]) -> SNIIndex:
    """The SNI index of a port's L4Listeners, oldest first."""
    index = SNIIndex()
    holders: dict[str, ObjectKey] = {}
    default_key: ObjectKey | None = None
    for p in owners:
        assert isinstance(p.model, L4Listener)
        hostnames = p.model.spec.hostnames
        if not hostnames:
            if default_key is None:
                default_key, index.default = p.key, p.key.ref
                index.served[p.key] = []
            else:
                index.refused[p.key] = Refusal(
                    "PortConflict",
                    f"port {port} already has a listener without hostnames (the default for "
                    f"connections no hostname matches), the older {default_key}; give this one "
                    "hostnames or choose another port",
                )
            continue
        mine, lost = [], []
        for name in hostnames:
            holder = holders.get(name)
            if holder is None:
                mine.append(name)
            else:
                lost.append((name, holder))
        if not mine:
            taken = ", ".join(f"{name} by the older {holder}" for name, holder in lost)
            index.refused[p.key] = Refusal(
                HOSTNAME_CONFLICT,
                f"every hostname is taken on port {port}: {taken}; remove them here or there",
            )
            continue
        for name in mine:
            holders[name] = p.key
            if name.startswith("*."):
                index.wildcard[name[1:]] = p.key.ref
            else:
                index.exact[name] = p.key.ref
        index.served[p.key] = mine
        if lost:
            index.taken[p.key] = lost
    return index


def served_message(port: int, hostnames: list[str], taken: list[tuple[str, ObjectKey]]) -> str:
    """The Accepted message of a passthrough listener."""
    if hostnames:
        message = f"serving TLS passthrough on port {port} for {', '.join(hostnames)}"
    else:
        message = (
            f"serving TLS passthrough on port {port} as the default (connections whose SNI "
            "no listener with hostnames on the port names)"
        )
    if taken:
        lost = ", ".join(f"{name} is taken by the older {holder}" for name, holder in taken)
        message += f"; {lost} (remove it here or there)"
    return message
