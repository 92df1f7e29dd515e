"""Hostile-input test kit: raw TCP backends that record every byte and answer from a script,
and a strict RFC 9112 request parser, written here independently of llhttp, that reads the
bytes a backend received the way a strict origin server would.

The strict parser is the referee of the smuggling tests: whatever a client sends, the bytes
the proxy writes to a backend must parse into exactly the requests the proxy answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dataplane.table import Table

from .l7kit import backend_ref, l7_table, route

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/1\.1")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class Malformed(Exception):
    """The bytes are not a valid HTTP/1.1 request stream."""


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]


def parse_requests(data: bytes) -> tuple[list[Request], bytes]:
    """Every complete request in data, strictly, and the bytes left after the last one.

    Strict: CRLF line ends, one SP between request-line parts, HTTP/1.1 only, token field
    names with no space before the colon, no obs-fold, exactly one Host, Content-Length
    digits only and single, Transfer-Encoding exactly "chunked" and never with a
    Content-Length, chunk sizes in hex without extensions or whitespace.
    """
    requests: list[Request] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end == -1:
            return requests, data
        lines = data[:end].split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise Malformed(f"request line {lines[0][:80]!r}")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise Malformed(f"header line {line[:80]!r}")
            value = value.strip(b" \t")
            if _FIELD_VALUE.fullmatch(value) is None:
                raise Malformed(f"header value {value[:80]!r}")
            headers.append((name.decode().lower(), value.decode("latin-1")))
        rest = data[end + 4 :]
        names = [n for n, _ in headers]
        if names.count("host") != 1:
            raise Malformed("not exactly one Host")
        lengths = [v for n, v in headers if n == "content-length"]
        codings = [v for n, v in headers if n == "transfer-encoding"]
        if codings:
            if lengths or codings != ["chunked"]:
                raise Malformed(f"framing {codings} with lengths {lengths}")
            body, rest, complete = _chunked(rest)
            if not complete:
                return requests, data
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit():
                raise Malformed(f"Content-Length {lengths}")
            size = int(lengths[0])
            if len(rest) < size:
                return requests, data
            body, rest = rest[:size], rest[size:]
        else:
            body = b""
        requests.append(Request(match[1].decode(), match[2].decode("latin-1"), headers, body))
        data = rest
    return requests, b""


def _chunked(data: bytes) -> tuple[bytes, bytes, bool]:
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end == -1:
            return body, data, False
        size_text = data[:end]
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_text):
            raise Malformed(f"chunk size {size_text[:40]!r}")
        size = int(size_text, 16)
        data = data[end + 2 :]
        if size == 0:
            if not data.startswith(b"\r\n"):  # the proxy forwards no trailers
                if len(data) < 2:
                    return body, data, False
                raise Malformed("trailers after the last chunk")
            return body, data[2:], True
        if len(data) < size + 2:
            return body, data, False
        if data[size : size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        body += data[:size]
        data = data[size + 2 :]


# What a scripted backend does with each request it parsed: return the response bytes
# (or b"" to answer nothing and leave the connection open, or None to close it).
Script = Callable[["Connection", Request], Awaitable[bytes | None] | bytes | None]


def echo_response(conn: Connection, request: Request) -> bytes:
    """A response naming what the backend parsed: its sequence number, target, body digest."""
    report = {
        "n": conn.backend.count,
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body_sha256": hashlib.sha256(request.body).hexdigest(),
        "body_length": len(request.body),
    }
    body = json.dumps(report).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@dataclass
class Connection:
    backend: RawBackend
    received: bytes = b""
    requests: list[Request] = field(default_factory=list)
    malformed: str | None = None
    writer: asyncio.StreamWriter | None = None
    pending: bytes = b""  # received bytes that are not (yet) a whole request
    closed: bool = False


class RawBackend:
    """A TCP server on 127.0.0.1 that parses requests strictly and answers from a script."""

    def __init__(self, script: Script = echo_response) -> None:
        self.script = script
        self.connections: list[Connection] = []
        self.count = 0  # requests parsed, over all connections
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.connections:
                if conn.writer is not None:
                    conn.writer.close()
            await self.server.wait_closed()

    @property
    def requests(self) -> list[Request]:
        return [r for c in self.connections for r in c.requests]

    @property
    def malformed(self) -> list[str]:
        return [c.malformed for c in self.connections if c.malformed]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, writer=writer)
        self.connections.append(conn)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                conn.received += data
                try:
                    requests, conn.pending = parse_requests(conn.pending + data)
                except Malformed as err:
                    conn.malformed = str(err)
                    break
                for request in requests:
                    conn.requests.append(request)
                    self.count += 1
                    answer = self.script(conn, request)
                    if asyncio.iscoroutine(answer):
                        answer = await answer
                    if answer is None:
                        return
                    if answer:
                        writer.write(answer)
                        await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.closed = True
            writer.close()


def raw_table(port: int, backend: RawBackend, **spec: Any) -> Table:
    """A table with one L7Route on port whose only backend is the raw backend."""
    return l7_table(
        [route("r", port, [{"backendRefs": [backend_ref("raw")]}], **spec)], {"raw": [backend.port]}
    )


async def exchange_raw(port: int, data: bytes, *, seconds: float = 5.0) -> bytes:
    """Send data on a new connection and read until the proxy closes it (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Responses with Content-Length or chunked bodies, strictly; stops at anything else."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end == -1:
            break
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4 :]
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, data = rest[:size], rest[size:]
        elif headers.get("transfer-encoding") == "chunked":
            body, data, complete = _chunked(rest)
            if not complete:
                break
        else:
            body, data = rest, b""
        out.append((status, headers, body))
    return out
