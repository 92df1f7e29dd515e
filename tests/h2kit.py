"""HTTP/2 test clients: a raw client on python-hyper's h2 (the frames are the test's own),
and the tools: curl, h2load and h2spec (from ../shared/bin or /work/shared/bin)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from hyperframe.frame import Frame

ROOT = Path(__file__).resolve().parent.parent


class H2Probe:
    """One HTTP/2 connection, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: list[h2.events.Event] = []
        self.closed = False
        self.ack = True  # give window back for the data read (False: a reader that never does)

    @classmethod
    async def open(
        cls, port: int, *, context: ssl.SSLContext | None = None, server_name: str = ""
    ) -> H2Probe:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name or None
        )
        probe = cls(reader, writer)
        probe.h2.initiate_connection()
        probe.flush()
        return probe

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def write(self, raw: bytes) -> None:
        """Bytes of the test's own making, beside h2's."""
        self.flush()
        self.writer.write(raw)

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "h2.test",
        headers: list[tuple[str, str]] | None = None,
        end: bool = True,
    ) -> int:
        sid: int = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "https"), (":authority", authority)]
        fields += headers or []
        self.h2.send_headers(sid, fields, end_stream=end)
        self.flush()
        return sid

    async def send_body(self, sid: int, body: bytes, *, end: bool = True) -> None:
        """body on stream sid, as the proxy's windows allow."""
        while body:
            await self.until(lambda p: p.h2.local_flow_control_window(sid) > 0 or p.ended(sid))
            if self.ended(sid) or self.closed:
                return
            size = min(len(body), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, body[:size], end_stream=end and size == len(body))
            body = body[size:]
            self.flush()

    async def until(self, done: Callable[[H2Probe], bool], seconds: float = 10.0) -> None:
        """Read (answering what h2 answers) until done(self), the close, or timeout."""
        deadline = time.monotonic() + seconds
        while not done(self):
            if self.closed:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the condition was not met in time")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                return
            events = self.h2.receive_data(data)
            self.events += events
            for event in events:
                if self.ack and isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id or 0)
            self.flush()

    def ended(self, sid: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and e.stream_id == sid
            for e in self.events
        )

    def response(self, sid: int) -> tuple[int, dict[bytes, bytes], bytes]:
        """Status, headers and body of a stream's (ended) response."""
        status, headers, body = 0, {}, b""
        for event in self.events:
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers or [])
                status = int(headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data or b""
        return status, headers, body

    def reset_code(self, sid: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                return int(event.error_code or 0)
        return None

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def get(
    probe: H2Probe, path: str, *, body: bytes | None = None, **kwargs: Any
) -> tuple[int, dict[bytes, bytes], bytes]:
    sid = probe.request(path, end=body is None, **kwargs)
    if body is not None:
        await probe.send_body(sid, body)
    await probe.until(lambda p: p.ended(sid))
    return probe.response(sid)


async def frames(
    reader: asyncio.StreamReader, done: Callable[[list[Frame]], bool], seconds: float = 10.0
) -> list[Frame]:
    """Frames as sent, parsed with hyperframe only: h2 as a client refuses every frame after
    a GOAWAY, the in-flight streams' too, so a graceful GOAWAY is read this way."""
    found: list[Frame] = []
    buffer = b""
    deadline = time.monotonic() + seconds
    while not done(found):
        data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
        if not data:
            break
        buffer += data
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            buffer = buffer[9 + length :]
            found.append(frame)
    return found


async def poll(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Until condition() holds (what the proxy or a backend did, not what a read shows)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition was not met in time")
        await asyncio.sleep(0.01)


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return found


def h2spec() -> str:
    for candidate in (ROOT.parent / "shared" / "bin" / "h2spec", Path("/work/shared/bin/h2spec")):
        if candidate.is_file():
            return str(candidate)
    pytest.skip("h2spec not found beside the checkout (../shared/bin/h2spec) nor in /work/shared/bin")
