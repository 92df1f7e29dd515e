"""Host names as routing compares them."""

from __future__ import annotations


def normalize_host(host: str) -> str:
    """Lower case, without port and trailing dot: host comparison ignores both."""
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        return host[: end + 1].lower() if end != -1 else host.lower()
    colon = host.rfind(":")
    if colon != -1:
        host = host[:colon]
    return host.rstrip(".").lower()
