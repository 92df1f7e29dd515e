"""TLS termination: one SSL context per certificate, chosen by SNI.

Python's ssl module loads keys only from files, so each certificate is written to a
private temporary directory, loaded, and removed at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import table
from .hostnames import normalize_host

# Mozilla's "intermediate" profile: TLS 1.2+ with forward-secret AEAD ciphers.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

Contexts = list[tuple[list[str], ssl.SSLContext]]


def context_for(certificate: table.Certificate) -> ssl.SSLContext:
    """A server context for one certificate; raises ssl.SSLError on bad material."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # HTTP/1.1 until the listener sets what it offers (h2 too, unless its http2 is off).
    context.set_alpn_protocols(["http/1.1"])
    directory = tempfile.mkdtemp(prefix="bilayer-tls-")
    try:
        cert_path = Path(directory, "tls.crt")
        key_path = Path(directory, "tls.key")
        for path, text in ((cert_path, certificate.certPem), (key_path, certificate.keyPem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
        context.load_cert_chain(cert_path, key_path)
    finally:
        for name in ("tls.crt", "tls.key"):
            with contextlib.suppress(OSError):
                os.unlink(Path(directory, name))
        os.rmdir(directory)
    return context


def build_contexts(tls: table.TLS) -> Contexts:
    return [(cert.hostnames, context_for(cert)) for cert in tls.certificates]


class Certificates:
    """The certificates of a TLS port, indexed by hostname: which one a server name gets
    (SNI), and whether a request's Host belongs to another one (421)."""

    __slots__ = ("default", "exact", "source", "wildcard")

    def __init__(self, contexts: Contexts) -> None:
        self.source = contexts
        self.default = contexts[0][1]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # ".example.com" for *.example.com
        for hostnames, context in contexts:
            for hostname in hostnames:
                if hostname.startswith("*."):
                    self.wildcard.setdefault(hostname[1:], context)
                else:
                    self.exact.setdefault(hostname, context)

    def covering(self, name: str) -> ssl.SSLContext | None:
        """The certificate for name (normalized): exact, else the longest wildcard."""
        found = self.exact.get(name)
        if found is not None:
            return found
        dot = name.find(".")
        while dot != -1:
            found = self.wildcard.get(name[dot:])
            if found is not None:
                return found
            dot = name.find(".", dot + 1)
        return None

    def for_server_name(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            return self.covering(server_name) or self.default
        return self.default

    def misdirected(self, server_name: str, host: str) -> bool:
        """The Host belongs to another certificate than the one this connection's SNI
        chose: such a request must go on a connection of its own (RFC 9110 15.5.20)."""
        for_host = self.covering(host)
        return for_host is not None and for_host is not self.for_server_name(server_name)


def server_context(current: Callable[[], Certificates | None]) -> ssl.SSLContext:
    """The listener's context: each handshake switches to the certificate that SNI picks
    among the *current* certificates, so certificate changes apply without a restart.
    The server name is kept on the SSL object for the connection (421 checks)."""
    base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    base.minimum_version = ssl.TLSVersion.TLSv1_2
    base.set_ciphers(CIPHERS)

    def pick(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        certificates = current()
        name = normalize_host(server_name) if server_name else None
        sock.bilayer_sni = name  # type: ignore[attr-defined]
        if certificates is not None:
            sock.context = certificates.for_server_name(name)

    base.sni_callback = pick
    return base
