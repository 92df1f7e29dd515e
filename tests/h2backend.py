"""An HTTP/2 backend for upstream tests, on python-hyper's h2: h2c with prior knowledge, or
over TLS with ALPN h2. What it does is chosen by the request path:

- /grpc/fail/N/CODE: a trailers-only gRPC answer with grpc-status CODE to the first N calls of
  that path, then a gRPC answer with a body and grpc-status 0 in trailers
- /grpc/late/N/CODE: the same, but the status of the first N comes in trailers after the head
- /grpc/slow/MS: a gRPC answer after MS milliseconds (reports the grpc-timeout it got)
- /refuse/N: the first N streams on this path are reset with REFUSED_STREAM
- /big/N: N bytes, sent as the stream's window allows (big_sent counts them; blocked says
  the window is closed with bytes still to send)
- /hold/...: the request body is never acknowledged (the stream's window stays closed)
- /slow/MS: an echo after MS milliseconds
- /trailers: an echo that ends with trailers
- anything else: a JSON echo of what arrived (method, path, authority, fields, body).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .helpers import free_port


@dataclass
class Call:
    """One request as the backend saw it."""

    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    connection: int = 0

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Backend:
    """An HTTP/2 server on loopback."""

    def __init__(self, *, max_streams: int = 100, context: ssl.SSLContext | None = None) -> None:
        self.max_streams = max_streams
        self.context = context
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections: list[_ServerConnection] = []
        self.calls: list[Call] = []
        self.counts: dict[str, int] = {}
        self.most_streams = 0  # the most streams open at once on one connection
        self.refused = 0
        self.accepted = 0  # connections ever made
        self.big_sent = 0
        self.blocked = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> H2Backend:
        self.port = free_port()
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _ServerConnection(self), "127.0.0.1", self.port, ssl=self.context
        )
        return self

    async def stop(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
            self.server = None

    def goaway_all(self, keep: int) -> None:
        """GOAWAY on every connection, naming its keep-th open stream as the last it takes:
        the streams above are never answered (not processed). A connection closes once the
        streams it kept are answered."""
        for conn in list(self.connections):
            conn.goaway(keep)

    def count(self, path: str) -> int:
        self.counts[path] = self.counts.get(path, 0) + 1
        return self.counts[path]


def server_connection(max_streams: int) -> h2.connection.H2Connection:
    """The server side of an h2c connection that announces max_streams concurrent streams."""
    config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
    connection = h2.connection.H2Connection(config)
    connection.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
    )
    return connection


class _ServerConnection(asyncio.Protocol):
    def __init__(self, backend: H2Backend) -> None:
        self.backend = backend
        self.h2 = server_connection(backend.max_streams)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, Call] = {}
        self.open = 0
        self.going_away = False
        self.last_ok = 2**31
        self.big: dict[int, int] = {}  # stream -> bytes of a /big/N answer still to send
        self.number = backend.accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections.append(self)
        self.backend.accepted += 1
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def goaway(self, keep: int) -> None:
        # Written by hand: h2 closes its state machine on its own GOAWAY, and the kept
        # streams are still to be answered.
        ids = sorted(self.calls)
        last = ids[keep - 1] if len(ids) >= keep else (ids[-1] if ids else 0)
        self.going_away = True
        for stream_id in ids:
            if stream_id > last:
                self._closed(stream_id)
        self.last_ok = last
        frame = (8).to_bytes(3, "big") + bytes([7, 0]) + bytes(4) + last.to_bytes(4, "big") + bytes(4)
        self.flush()
        if self.transport is not None:
            self.transport.write(frame)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.going_away and not self.open and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                if event.stream_id > self.last_ok:
                    continue  # after our GOAWAY: never processed
                headers = [(str(n), str(v)) for n, v in event.headers or []]
                self.calls[event.stream_id] = Call(headers, connection=self.number)
                self.open += 1
                self.backend.most_streams = max(self.backend.most_streams, self.open)
            elif isinstance(event, h2.events.DataReceived):
                assert event.stream_id is not None
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.body += event.data or b""
                    if (call.header(":path") or "").startswith("/hold/"):
                        continue
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                assert event.stream_id is not None
                call = self.calls.get(event.stream_id)
                if call is not None:
                    self._answer(event.stream_id, call)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id in self.calls:
                self._closed(event.stream_id or 0)
        self._pump_big()
        self.flush()

    def _pump_big(self) -> None:
        block = b"x" * self.h2.max_outbound_frame_size
        for stream_id, to_send in list(self.big.items()):
            left = to_send
            while left:
                room = min(self.h2.local_flow_control_window(stream_id), len(block), left)
                if room <= 0:
                    break
                left -= room
                self.backend.big_sent += room
                self.h2.send_data(stream_id, block[:room], end_stream=not left)
            self.backend.blocked = bool(left)
            if left:
                self.big[stream_id] = left
            else:
                del self.big[stream_id]
                self._closed(stream_id)

    def _closed(self, stream_id: int) -> None:
        if self.calls.pop(stream_id, None) is not None:
            self.open -= 1
        self._maybe_close()

    def _answer(self, stream_id: int, call: Call) -> None:
        self.backend.calls.append(call)
        path = call.header(":path") or "/"
        parts = path.split("/")
        if path.startswith("/refuse/") and self.backend.count(path) <= int(parts[2]):
            self.backend.refused += 1
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._closed(stream_id)
            return
        if path.startswith("/big/"):
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", parts[2])])
            self.big[stream_id] = int(parts[2])
            return
        if path.startswith("/grpc/late/"):  # a head, then the status in trailers
            if self.backend.count(path) <= int(parts[3]):
                self._send(
                    stream_id,
                    [(":status", "200"), ("content-type", "application/grpc")],
                    b"",
                    [("grpc-status", parts[4])],
                )
            else:
                self._send(
                    stream_id,
                    [(":status", "200"), ("content-type", "application/grpc")],
                    b"\x00\x00\x00\x00\x02hi",
                    [("grpc-status", "0")],
                )
            return
        if path.startswith("/grpc/fail/"):
            if self.backend.count(path) <= int(parts[3]):
                self._send(
                    stream_id,
                    [
                        (":status", "200"),
                        ("content-type", "application/grpc"),
                        ("grpc-status", parts[4]),
                        ("grpc-message", "try again"),
                    ],
                    b"",
                    None,
                )
            else:
                self._send(
                    stream_id,
                    [(":status", "200"), ("content-type", "application/grpc")],
                    b"\x00\x00\x00\x00\x02hi",
                    [("grpc-status", "0")],
                )
            return
        if path.startswith(("/grpc/slow/", "/slow/")):
            delay = int(parts[-1]) / 1000
            task = asyncio.get_running_loop().create_task(self._later(delay, stream_id, call))
            self.backend.tasks.add(task)
            task.add_done_callback(self.backend.tasks.discard)
            return
        self._echo(stream_id, call)

    async def _later(self, delay: float, stream_id: int, call: Call) -> None:
        await asyncio.sleep(delay)
        if stream_id in self.calls:
            self._echo(stream_id, call)
            self.flush()

    def _echo(self, stream_id: int, call: Call) -> None:
        path = call.header(":path") or "/"
        report = {
            "method": call.header(":method"),
            "path": path,
            "authority": call.header(":authority"),
            "scheme": call.header(":scheme"),
            "headers": call.headers,
            "body_length": len(call.body),
            "body_sha256": hashlib.sha256(call.body).hexdigest(),
            "connection": call.connection,
        }
        body = json.dumps(report).encode()
        trailers = [("x-checksum", report["body_sha256"])] if path == "/trailers" else None
        if path.startswith("/grpc/"):
            self._send(
                stream_id,
                [(":status", "200"), ("content-type", "application/grpc")],
                b"\x00" + len(body).to_bytes(4, "big") + body,
                [("grpc-status", "0")],
            )
            return
        self._send(
            stream_id,
            [(":status", "200"), ("content-type", "application/json"), ("content-length", str(len(body)))]
            if trailers is None
            else [(":status", "200"), ("content-type", "application/json")],
            body,
            trailers,
        )

    def _send(
        self,
        stream_id: int,
        headers: list[tuple[str, str]],
        body: bytes,
        trailers: list[tuple[str, str]] | None,
    ) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.send_headers(stream_id, headers, end_stream=not body and trailers is None)
            if body:
                # Small bodies only in these tests: within the default windows.
                self.h2.send_data(stream_id, body, end_stream=trailers is None)
            if trailers is not None:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
        self.flush()
        self._closed(stream_id)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.backend.connections:
            self.backend.connections.remove(self)
