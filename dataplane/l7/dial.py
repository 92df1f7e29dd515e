"""How the proxy reaches a cluster's endpoints: HTTP/1.1 or HTTP/2, in clear or over TLS.

A Dial is made once per distinct (protocol, TLS settings) and shared by every cluster with the
same settings, so an SSL context (loading a CA bundle costs milliseconds) is built once, not
per connection, and pooled connections are kept apart by what they were dialled with: an
endpoint can sit in two clusters, one in clear and one over TLS.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

from .. import table

log = logging.getLogger("bilayer.dataplane")

HTTP1, H2 = "http/1.1", "h2"


class Dial:
    """The protocol and TLS settings a connection to an endpoint is made with."""

    __slots__ = ("alpn", "error", "protocol", "server_name", "ssl")

    def __init__(self, protocol: str, tls: table.UpstreamTLS | None) -> None:
        self.protocol = protocol  # "http/1.1", "h2" or "auto"
        self.ssl: ssl.SSLContext | None = None
        self.server_name: str | None = None
        self.error = ""  # why the TLS settings cannot make a context (every connect fails so)
        self.alpn: list[str] = []
        if tls is not None:
            self.server_name = tls.serverName
            self.alpn = {"h2": [H2], "auto": [H2, HTTP1]}.get(protocol, [HTTP1])
            try:
                self.ssl = _context(tls, self.alpn)
            except (ssl.SSLError, ValueError) as err:
                self.error = f"the cluster's tls.caCertificates could not be loaded ({err})"
                log.warning("upstream TLS settings refused", extra={"error": self.error})

    @property
    def plain(self) -> bool:
        """HTTP/1.1 in clear: the pool's fast path."""
        return self.ssl is None and self.protocol == HTTP1 and not self.error

    def chosen(self, alpn: str | None) -> str:
        """The protocol a connection speaks, from what the server chose in ALPN (None: it
        chose nothing; "h2" then means prior knowledge, anything else HTTP/1.1)."""
        if alpn in (H2, HTTP1):
            return alpn
        return H2 if self.protocol == H2 else HTTP1


def _context(tls: table.UpstreamTLS, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecureSkipVerify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.caCertificates:
        context.load_verify_locations(cadata=tls.caCertificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.set_alpn_protocols(alpn)
    return context


PLAIN: Final = Dial(HTTP1, None)
_DIALS: Final[dict[tuple[str, str], Dial]] = {(HTTP1, ""): PLAIN}


def dial_for(cluster: table.Cluster) -> Dial:
    """The shared Dial for a cluster's protocol and TLS settings."""
    tls = cluster.tls
    key = (cluster.protocol, tls.model_dump_json() if tls is not None else "")
    found = _DIALS.get(key)
    if found is None:
        found = _DIALS[key] = Dial(cluster.protocol, tls)
    return found
