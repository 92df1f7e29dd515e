"""Reading the server name (SNI) from a TLS ClientHello without terminating TLS.

The reader is fed the client's bytes as they arrive and keeps only what it must: the
partial record header and the handshake message being assembled. A ClientHello may be
split across TCP segments and across TLS records (RFC 8446 5.1), so records are joined
before the handshake message is read. Everything is bounded: ``limit`` bytes in all (the
caller also bounds the time). Refused: an SSLv2-style hello (first byte with the high
bit set), any record that is not a handshake, a handshake message that is not a
ClientHello, lengths that do not add up, a duplicated extension, a server name that is
not a DNS name. A hello without the server_name extension has no name: the port's
default listener takes it.
"""

from __future__ import annotations

import re

HELLO_LIMIT = 16 * 1024  # bytes of records read before a ClientHello must be complete

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_MAX_RECORD = 2**14 + 256  # a plaintext record may not exceed 2^14; leave room for lenient clients
_NAME = re.compile(rb"[a-z0-9_]([a-z0-9_-]{0,62}\.)*[a-z0-9_-]{0,63}")


class HelloError(ValueError):
    """Not a TLS ClientHello this proxy will route; the message says what was wrong."""


class NoName:
    """The hello has no server_name: route to the port's default."""


NO_NAME = NoName()


class HelloReader:
    """Feed bytes with ``feed``: None while more are needed, then the server name (lower
    case) or NO_NAME; raises HelloError."""

    __slots__ = ("fed", "handshake", "limit", "pending")

    def __init__(self, limit: int = HELLO_LIMIT) -> None:
        self.limit = limit
        self.fed = 0
        self.pending = bytearray()  # bytes of the record being received
        self.handshake = bytearray()  # handshake fragments joined

    def feed(self, data: bytes | bytearray | memoryview) -> str | NoName | None:
        self.fed += len(data)
        if self.fed > self.limit:
            raise HelloError(f"no complete ClientHello within {self.limit} bytes")
        pending = self.pending
        pending += data
        if self.fed == len(pending) and pending:  # the first bytes of the connection
            first = pending[0]
            if first & 0x80:
                raise HelloError("SSLv2-style ClientHello")
            if first != _HANDSHAKE:
                raise HelloError(f"not a TLS handshake record (first byte 0x{first:02x})")
        while len(pending) >= 5:
            kind, major, length = pending[0], pending[1], int.from_bytes(pending[3:5], "big")
            if kind != _HANDSHAKE:
                raise HelloError(f"record type {kind} before the ClientHello ended")
            if major != 3:
                raise HelloError(f"record version {major}.{pending[2]} is not TLS")
            if length == 0 or length > _MAX_RECORD:
                raise HelloError(f"record length {length}")
            if len(pending) < 5 + length:
                return None
            self.handshake += pending[5 : 5 + length]
            del pending[: 5 + length]
            found = self._message()
            if found is not None:
                return found
        return None

    def _message(self) -> str | NoName | None:
        handshake = self.handshake
        if len(handshake) < 4:
            return None
        if handshake[0] != _CLIENT_HELLO:
            raise HelloError(f"handshake message type {handshake[0]} is not a ClientHello")
        length = int.from_bytes(handshake[1:4], "big")
        if length > self.limit:
            raise HelloError(f"ClientHello of {length} bytes is over {self.limit}")
        if len(handshake) < 4 + length:
            return None
        # What follows (a change_cipher_spec record, early data) is the backend's business.
        return server_name(bytes(handshake[4 : 4 + length]))


def server_name(body: bytes) -> str | NoName:
    """The server name of a ClientHello body (after the handshake header)."""
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1, "session id", most=32)
    suites = reader.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise HelloError("cipher suites: empty or of odd length")
    if not reader.vector(1, "compression methods"):
        raise HelloError("compression methods: empty")
    if reader.done():
        return NO_NAME  # no extensions at all (TLS 1.0-1.2 allow it)
    extensions = _Reader(reader.vector(2, "extensions"))
    if not reader.done():
        raise HelloError("bytes after the extensions")
    seen: set[int] = set()
    name: str | NoName = NO_NAME
    while not extensions.done():
        kind = int.from_bytes(extensions.take(2), "big")
        data = extensions.vector(2, "extension")
        if kind in seen:
            raise HelloError(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: bytes) -> str:
    names = _Reader(data)
    listed = _Reader(names.vector(2, "server name list"))
    if not names.done():
        raise HelloError("bytes after the server name list")
    while not listed.done():
        kind = listed.take(1)[0]
        value = listed.vector(2, "server name")
        if kind != _HOST_NAME:
            continue  # other name types are unknown: skip them (RFC 6066 3)
        host = value.lower()
        if host.endswith(b"."):
            host = host[:-1]  # RFC 6066 says without, some clients send it
        if len(host) > 253 or not _NAME.fullmatch(host):
            raise HelloError(f"server name {value[:64]!r} is not a DNS name")
        return host.decode("ascii")
    raise HelloError("server_name extension without a host name")


class _Reader:
    """Length-checked reads from a byte string."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        end = self.at + n
        if end > len(self.data):
            raise HelloError("a field runs past the end of the ClientHello")
        chunk = self.data[self.at : end]
        self.at = end
        return chunk

    def vector(self, width: int, what: str, most: int | None = None) -> bytes:
        length = int.from_bytes(self.take(width), "big")
        if most is not None and length > most:
            raise HelloError(f"{what}: {length} bytes, at most {most}")
        return self.take(length)

    def done(self) -> bool:
        return self.at == len(self.data)


def route_of(
    name: str | NoName, exact: dict[str, str], wildcard: dict[str, str], default: str | None
) -> str | None:
    """The route (source) a hello goes to: exact name, the longest wildcard suffix, the
    default; None: no route (the connection is closed)."""
    if isinstance(name, NoName):
        return default
    found = exact.get(name)
    if found is not None:
        return found
    dot = name.find(".")
    while dot >= 0:  # ".b.example.com", then ".example.com", ...: longest first
        found = wildcard.get(name[dot:])
        if found is not None:
            return found
        dot = name.find(".", dot + 1)
    return default
