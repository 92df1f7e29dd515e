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
from .router import normalize_host

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


def choose(contexts: Contexts, server_name: str | None) -> ssl.SSLContext:
    """Exact hostname, then the longest matching wildcard, then the first certificate."""
    if server_name:
        name = normalize_host(server_name)
        best: tuple[int, ssl.SSLContext] | None = None
        for hostnames, context in contexts:
            for hostname in hostnames:
                if hostname == name:
                    return context
                wildcard = hostname.startswith("*.") and name.endswith(hostname[1:])
                if wildcard and (best is None or len(hostname) > best[0]):
                    best = (len(hostname), context)
        if best is not None:
            return best[1]
    return contexts[0][1]


def server_context(current: Callable[[], Contexts | None]) -> ssl.SSLContext:
    """The listener's context: each handshake switches to the certificate that SNI picks
    among the *current* contexts, so certificate changes apply without a restart."""
    base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    base.minimum_version = ssl.TLSVersion.TLSv1_2
    base.set_ciphers(CIPHERS)

    def pick(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        contexts = current()
        if contexts:
            sock.context = choose(contexts, server_name)

    base.sni_callback = pick
    return base
