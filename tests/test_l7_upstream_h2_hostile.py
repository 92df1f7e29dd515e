"""An HTTP/2 backend as an attacker speaks it: a header block (a response head or trailers)
of 1 MiB of Huffman-coded HPACK, or of 10,000 CONTINUATION frames. python-hyper's h2
buffers up to 64 frames of a block (1 MiB at the default frame size) and decodes all of it
before it checks the decoded size, ~0.3 s of event-loop CPU per MiB. The proxy counts the
block's bytes from the frame heads instead and refuses it past the head limit HTTP/1.1
backends get (60 KiB): the request gets 502 (a gRPC call its grpc-status), the backend
connection is closed, and everyone else is served meanwhile."""

from __future__ import annotations

import asyncio
import functools
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

from dataplane.l7 import h2upstream
from dataplane.runtime import Dataplane
from dataplane.table import Table

from .h2backend import server_connection
from .h2kit import poll
from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, l7_table, read_response, route, serving
from .test_l7_grpc import call
from .test_l7_upstream_h2 import ask

FRAME = 16384  # the default SETTINGS_MAX_FRAME_SIZE: the proxy sets no other
MB = 1024 * 1024


def huffman_block(size: int, *, head: bool) -> bytes:
    """A field block of at most size bytes: (:status 200 and) one field whose value is 'a'
    over and over, Huffman-coded (5 bits each: 8 of them are these 5 bytes). Literal, never
    indexed: nothing in it touches the connection's dynamic table."""
    eights = (size - 32) // 5
    value = bytes.fromhex("18c6318c63") * eights
    length = bytearray(hpack.hpack.encode_integer(len(value), 7))
    length[0] |= 0x80  # Huffman-coded
    block = (b"\x88" if head else b"") + b"\x00\x07x-flood" + bytes(length) + value
    assert size - 40 < len(block) <= size
    return block


@functools.cache
def block_frames(stream_id: int, block: bytes, piece: int, *, end_stream: bool = False) -> bytes:
    """block as HEADERS and CONTINUATION frames of piece bytes."""
    pieces = [block[i : i + piece] for i in range(0, len(block), piece)] or [b""]
    head = HeadersFrame(stream_id, pieces[0])
    if end_stream:
        head.flags.add("END_STREAM")
    frames = [head] + [ContinuationFrame(stream_id, p) for p in pieces[1:]]
    frames[-1].flags.add("END_HEADERS")
    return b"".join(f.serialize() for f in frames)


# 64 frames of 16 KiB: the most h2 takes in before it decodes (its CONTINUATION backlog).
HEAD = huffman_block(64 * FRAME, head=True)
TRAILERS = huffman_block(64 * FRAME, head=False)


class HostileBackend:
    """An h2c server answering by path: /head (a 1 MiB response head), /trailers (a small
    head and body, then 1 MiB of trailers), /drip (a head in 10,000 one-byte CONTINUATIONs),
    /fields (a head of 101 fields), /stall (a head whose block never ends), /slow (a normal
    answer once release is set). h2 reads the requests; the answers are written frame by
    frame. One stream per connection unless max_streams says otherwise."""

    def __init__(self, max_streams: int = 1) -> None:
        self.max_streams = max_streams
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.accepted = 0
        self.lost = 0  # connections the proxy closed
        self.release = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> HostileBackend:
        self.port = free_port()
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Hostile(self), "127.0.0.1", self.port
        )
        return self

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()


class _Hostile(asyncio.Protocol):
    def __init__(self, backend: HostileBackend) -> None:
        self.backend = backend
        self.h2 = server_connection(backend.max_streams)
        self.encoder = hpack.Encoder()  # the answers' own: h2's encoder never writes here
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.accepted += 1
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.lost += 1

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            return  # (frames for streams the answers below closed behind h2's back)
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers or [])[":path"]
                self._answer(event.stream_id or 0, str(path))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _answer(self, sid: int, path: str) -> None:
        if path.startswith("/head"):
            self._write(block_frames(sid, HEAD, FRAME))
        elif path.startswith("/drip"):
            self._write(block_frames(sid, self.encoder.encode([(":status", "200")]) + b"\x00" * 9999, 1))
        elif path.startswith("/fields"):
            fields = [(":status", "200")] + [(f"x-{i}", "1") for i in range(101)]
            end = DataFrame(sid, b"")
            end.flags.add("END_STREAM")
            self._write(block_frames(sid, self.encoder.encode(fields), FRAME) + end.serialize())
        elif path.startswith("/stall"):
            self._write(HeadersFrame(sid, self.encoder.encode([(":status", "200")])).serialize())
        elif path.startswith("/trailers"):
            head = self.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
            self._write(block_frames(sid, head, FRAME) + DataFrame(sid, b"\x00\x00\x00\x00\x00").serialize())
            self._write(block_frames(sid, TRAILERS, FRAME, end_stream=True))
        else:
            task = asyncio.get_running_loop().create_task(self._later(sid))
            self.backend.tasks.add(task)
            task.add_done_callback(self.backend.tasks.discard)

    async def _later(self, sid: int) -> None:
        await self.backend.release.wait()
        head = self.encoder.encode([(":status", "200"), ("content-length", "2")])
        data = DataFrame(sid, b"ok")
        data.flags.add("END_STREAM")
        self._write(block_frames(sid, head, FRAME) + data.serialize())


def hostile_table(port: int, hostile: int, web: int) -> Table:
    """/web to an HTTP/1.1 backend, everything else to the hostile h2c one."""
    rules = [
        {"matches": [{"path": {"value": "/web"}}], "backendRefs": [backend_ref("web")]},
        {"backendRefs": [backend_ref("hostile")]},
    ]
    data: dict[str, Any] = l7_table(
        [route("r", port, rules)], {"hostile": [hostile], "web": [web]}
    ).model_dump(by_alias=True)
    for name, cluster in data["clusters"].items():
        if "hostile" in name:
            cluster["protocol"] = "h2"
    return Table.model_validate(data)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[int, HostileBackend, Dataplane]]:
    hostile = await HostileBackend().start()
    web = await HTTPBackend("web").start()
    port = free_port()
    try:
        async with serving(hostile_table(port, hostile.port, web.port)) as dataplane:
            yield port, hostile, dataplane
    finally:
        await hostile.stop()
        await web.stop()


def bad_backend_messages(dataplane: Dataplane, port: int) -> int:
    return int(dataplane.listeners[port].bad_messages["backend"])  # type: ignore[attr-defined]


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: app\r\n\r\n" % path.encode()


@pytest.mark.parametrize("path", ["/head", "/drip"])
async def test_a_response_head_over_the_limit_is_refused_before_it_is_decoded(
    proxy: tuple[int, HostileBackend, Dataplane], path: str
) -> None:
    """/head: 1 MiB in 64 frames, /drip: 10,000 frames of one byte (h2 refuses more than 64
    CONTINUATIONs itself)."""
    port, hostile, dataplane = proxy
    cpu = time.process_time()
    status, _, body = await asyncio.wait_for(ask(port, get(path)), 5)
    cpu = time.process_time() - cpu
    assert status == 502, body
    # A gRPC call gets its status as for any other broken backend answer.
    status, headers, _ = await asyncio.wait_for(ask(port, call(path)), 5)
    assert (status, headers["grpc-status"]) == (200, "13"), headers
    assert hostile.accepted == 2
    await poll(lambda: hostile.lost == 2)  # each backend connection closed
    assert bad_backend_messages(dataplane, port) == 2
    # Decoding 1 MiB of Huffman code is ~0.2 s of CPU here; refusing it from frame heads is not.
    assert cpu < 0.1, cpu


async def test_trailers_over_the_limit_cut_the_response_they_end(
    proxy: tuple[int, HostileBackend, Dataplane],
) -> None:
    """The head and body went out already: the client's response is cut, never ended
    as if whole."""
    port, hostile, dataplane = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cpu = time.process_time()
    writer.write(get("/trailers"))
    received = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    cpu = time.process_time() - cpu
    writer.close()
    assert received.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in received.lower()
    assert not received.endswith(b"0\r\n\r\n"), received
    await poll(lambda: hostile.lost == 1)
    assert bad_backend_messages(dataplane, port) == 1
    assert cpu < 0.1, cpu


async def test_a_stream_beside_the_block_on_its_connection_gets_502(
    proxy: tuple[int, HostileBackend, Dataplane],
) -> None:
    """A header block cannot be refused on its own stream: its HPACK context is the
    connection's, and no other stream's frame may come before it ends. The connection is
    closed with every stream on it, each answered 502."""
    port, hostile, _ = proxy
    hostile.max_streams = 10
    waiting = asyncio.ensure_future(ask(port, get("/slow")))
    await poll(lambda: hostile.accepted == 1)
    status, _, _ = await asyncio.wait_for(ask(port, get("/head")), 5)
    assert status == 502
    status, _, _ = await asyncio.wait_for(waiting, 5)
    assert status == 502
    assert hostile.accepted == 1
    # The backend's next connection serves again.
    hostile.release.set()
    status, _, body = await asyncio.wait_for(ask(port, get("/slow")), 5)
    assert (status, body) == (200, b"ok")


async def test_a_head_of_too_many_fields_is_refused_on_its_own_stream(
    proxy: tuple[int, HostileBackend, Dataplane],
) -> None:
    """Decoded within the byte limit, so the connection's HPACK context is whole: only the
    stream is reset, and the connection serves the next request."""
    port, hostile, dataplane = proxy
    hostile.max_streams = 10  # (its h2 never learns the answers it wrote itself ended)
    status, _, body = await asyncio.wait_for(ask(port, get("/fields")), 5)
    assert status == 502, body
    hostile.release.set()
    status, _, body = await asyncio.wait_for(ask(port, get("/slow")), 5)
    assert (status, body) == (200, b"ok")
    assert (hostile.accepted, hostile.lost) == (1, 0)
    assert bad_backend_messages(dataplane, port) == 1


async def test_a_header_block_left_open_closes_the_connection(
    proxy: tuple[int, HostileBackend, Dataplane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No other stream's frame may come while a block is open: a backend that never ends
    one would hold the connection, and every stream on it, until each one's own timeout."""
    monkeypatch.setattr(h2upstream, "HEADER_BLOCK_SECONDS", 0.5)
    port, hostile, dataplane = proxy
    started = time.monotonic()
    status, _, body = await asyncio.wait_for(ask(port, get("/stall")), 5)
    assert status == 502, body
    assert time.monotonic() - started < 3.0  # (0.5 s, give or take the sweep's 0.25 s)
    await poll(lambda: hostile.lost == 1)
    assert bad_backend_messages(dataplane, port) == 1


async def test_others_are_served_while_a_backend_floods_header_blocks(
    proxy: tuple[int, HostileBackend, Dataplane],
) -> None:
    """Eight clients ask the hostile backend five times each, concurrently (a backend
    connection each: one stream per connection), while another client asks a sound backend
    again and again: its answers keep coming, the flood's clients get their 502s, and the
    proxy's CPU and memory stay bounded. Before the head was counted in front of h2, the 40
    blocks cost 7.5-8 s of CPU, the other client waited up to 1.2 s, and 9.7 MiB were
    allocated at the peak."""
    port, _, _ = proxy
    for _ in range(3):  # warm up: imports, pools, first allocations
        assert (await ask(port, get("/web")))[0] == 200
        assert (await ask(port, get("/drip")))[0] == 502
    tracemalloc.start()  # what the proxy allocates: the backends' frames are made already
    answered: list[int] = []
    flooding = True

    async def attacker() -> None:
        for _ in range(5):
            status, _, _ = await asyncio.wait_for(ask(port, get("/head")), 10)
            answered.append(status)

    async def other() -> list[float]:
        latencies = []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while flooding:
                started = time.monotonic()
                writer.write(get("/web"))
                status, _, _ = await read_response(reader)
                assert status == 200
                latencies.append(time.monotonic() - started)
        finally:
            writer.close()
        return latencies

    cpu = time.process_time()
    others = asyncio.ensure_future(other())
    await asyncio.gather(*(attacker() for _ in range(8)))
    flooding = False
    cpu = time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    latencies = await others
    print(
        f"{len(answered)} flood requests, CPU {cpu:.2f} s; {len(latencies)} other requests, "
        f"max {max(latencies) * 1000:.0f} ms; peak allocated {peak / MB:.1f} MiB"
    )
    assert answered == [502] * 40
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert cpu < 2.0, cpu
    assert peak < 6 * MB, peak  # (the reads of eight connections at once: 1.9-3.2 MiB)
