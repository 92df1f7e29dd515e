"""What the proxy speaks to a backend: the HTTP version from the Service port's appProtocol
(the Kubernetes and Gateway API convention, GEP-1911), TLS from the backendRef.

- ``kubernetes.io/h2c`` (and ``h2c``, ``grpc``, ``http2``, the names Istio and others use):
  HTTP/2 with prior knowledge; over TLS when the backendRef sets tls (ALPN h2).
- unset, ``http``, ``kubernetes.io/ws``: HTTP/1.1 (WebSocket is an HTTP/1.1 upgrade).
- ``https``, ``kubernetes.io/wss``: TLS, so the backendRef must say whom to trust (tls);
  a backend is never served unverified by default.
- TLS without an HTTP/2 value: ALPN offers h2 and http/1.1 and the backend chooses
  ("auto"), except for WebSocket values, which stay on HTTP/1.1.
- anything else: HTTP/1.1, and the route's status names the value.
"""

from __future__ import annotations

from typing import NamedTuple

H2_VALUES = frozenset({"kubernetes.io/h2c", "h2c", "grpc", "http2"})
WEBSOCKET_VALUES = frozenset({"kubernetes.io/ws", "kubernetes.io/wss"})
HTTP1_VALUES = frozenset({"", "http", "kubernetes.io/ws"})
TLS_VALUES = frozenset({"https", "kubernetes.io/wss"})


class Speech(NamedTuple):
    """The protocol for a cluster, or why the backend cannot be served, and a remark."""

    protocol: str  # "http/1.1" | "h2" | "auto" (table.Cluster.protocol)
    problem: str | None = None
    note: str | None = None


def speech(app_protocol: str | None, tls: bool) -> Speech:
    """How to talk to a Service port with this appProtocol, with or without TLS to it."""
    value = (app_protocol or "").lower()
    if value in H2_VALUES:
        return Speech("h2")
    if value in WEBSOCKET_VALUES:
        if value in TLS_VALUES and not tls:
            return Speech("http/1.1", problem=_needs_tls(app_protocol))
        return Speech("http/1.1")
    if value in TLS_VALUES and not tls:
        return Speech("http/1.1", problem=_needs_tls(app_protocol))
    protocol = "auto" if tls else "http/1.1"
    if value in HTTP1_VALUES or value in TLS_VALUES:
        return Speech(protocol)
    note = f"has appProtocol {app_protocol!r}, which Bilayer does not know: it is spoken to as HTTP" + (
        " over TLS (ALPN h2 or http/1.1)" if tls else "/1.1"
    )
    return Speech(protocol, note=note)


def _needs_tls(app_protocol: str | None) -> str:
    return (
        f"has appProtocol {app_protocol}, which needs TLS: set tls on the backendRef "
        "(hostname and caCertificateRefs, wellKnownCACertificates: System, or "
        "insecureSkipVerify: true); it is not served without"
    )
