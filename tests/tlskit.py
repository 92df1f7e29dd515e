"""TLS pieces for passthrough tests: backends that terminate TLS with their own
certificate, and ClientHellos made by Python's own TLS stack."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import trustme


class TLSBackend:
    """A TLS server on loopback: says "hello from NAME" after the handshake, then echoes."""

    def __init__(self, name: str, cert: trustme.LeafCert) -> None:
        self.name = name
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.server_names: list[str | None] = []
        self.context.sni_callback = self._sni
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0

    def _sni(self, _: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        self.server_names.append(name)

    async def start(self) -> TLSBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(f"hello from {self.name}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def client_hello(server_name: str | None) -> bytes:
    """The first flight of Python's TLS client for server_name (None: no SNI)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def hello_in_records(hello: bytes, record_size: int) -> bytes:
    """The handshake messages of hello (whole TLS records, or a bare handshake message)
    framed again in records of at most record_size bytes: one message split across
    several records, as RFC 8446 allows."""
    if hello[:1] == b"\x16":
        message, at = b"", 0
        while at < len(hello):
            length = int.from_bytes(hello[at + 3 : at + 5], "big")
            message += hello[at + 5 : at + 5 + length]
            at += 5 + length
    else:
        message = hello
    records = []
    for i in range(0, len(message), record_size):
        chunk = message[i : i + record_size]
        records.append(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk)
    return b"".join(records)
