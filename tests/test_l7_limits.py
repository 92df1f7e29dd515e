"""What one client or one backend can make the proxy hold, in bytes and in time, on real
sockets: heads and trailers counted as they arrive, deadlines in every state of an exchange,
tunnels with flow control and an idle timeout, patterns that cannot stall the process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time

import aiohttp
import pytest
import trustme

from dataplane.l7 import client as client_module

from .helpers import async_wait_for, free_port
from .l7kit import HTTPBackend, backend_ref, l7_table, route, secret, serving
from .rawkit import Connection, RawBackend, Request, echo_response, exchange_raw, raw_table, split_responses


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> bytes:
    chunks = []
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except ConnectionError:
        pass
    return b"".join(chunks)


async def test_an_unfinished_header_over_the_limit_is_refused_as_it_arrives(raw: RawBackend) -> None:
    """httptools grows a header by concatenation until its end arrives: the proxy must count
    the bytes itself and refuse at the limit, not wait for the end (or the header timeout)."""
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000)  # never ends
        answer = await read_until_closed(reader, 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431")
    assert not raw.requests


async def test_unfinished_trailers_over_the_limit_are_refused(raw: RawBackend) -> None:
    """Counting starts at each chunk-size line, so trailers are bounded too (a 64 MB trailer
    was accepted with 200). What llhttp holds is bounded by the limit plus the rest of the
    read in which the last chunk began (at most 256 KiB)."""
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
        )
        writer.write(b"t" * 400_000)
        answer = await read_until_closed(reader, 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


async def test_trailers_get_the_header_timeout(raw: RawBackend) -> None:
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=0.5, idle_timeout=30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n"
        )
        started = time.monotonic()
        answer = b""
        for _ in range(10):  # a trailer byte every 0.2 s: progress, but no end
            try:  # until the proxy answers (at_eof stays false while its answer is unread)
                answer = await asyncio.wait_for(reader.read(65536), 0.2)
                break
            except TimeoutError:
                writer.write(b"X")
            except ConnectionError:
                break
        answer += await read_until_closed(reader, 5)
        writer.close()
    assert b"408" in answer.split(b"\r\n", 1)[0]
    assert time.monotonic() - started < 4


async def test_backend_heads_are_bounded_in_size_and_fields() -> None:
    def answer(conn: Connection, request: Request) -> bytes:
        if request.target == "/many":
            return b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n"
        if request.target == "/endless":
            return b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 200_000  # never ends
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            # Connection: close, so that the proxy's close ends each read (everything it
            # sends is read), not the 3 s timeout on a kept-alive connection.
            close = b"Host: x\r\nConnection: close\r\n\r\n"
            many = await exchange_raw(port, b"GET /many HTTP/1.1\r\n" + close, seconds=3)
            endless = await exchange_raw(port, b"GET /endless HTTP/1.1\r\n" + close, seconds=3)
    finally:
        await backend.stop()
    assert many.startswith(b"HTTP/1.1 502") and b"X-99" not in many
    assert endless.startswith(b"HTTP/1.1 502")


async def test_a_flooding_client_does_not_stall_others(raw: RawBackend) -> None:
    """One connection sends up to 32 MB of one header while others are served: each of them
    is answered promptly, and the flooder is refused after a bounded number of bytes."""
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=30) as dp:
        _, flood_writer = await asyncio.open_connection("127.0.0.1", port)

        async def flood() -> int:
            sent = 0
            flood_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            try:
                for _ in range(512):
                    flood_writer.write(b"f" * 65536)
                    await asyncio.wait_for(flood_writer.drain(), 2)
                    sent += 65536
            except (ConnectionError, TimeoutError):
                pass
            return sent

        flooding = asyncio.create_task(flood())
        slowest = 0.0
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                started = time.monotonic()
                async with client.get(f"http://127.0.0.1:{port}/normal") as response:
                    assert response.status == 200
                slowest = max(slowest, time.monotonic() - started)
        sent = await flooding
        flood_writer.close()
        listener = dp.listeners[port]
        assert listener.bad_messages["client"] == 1  # type: ignore[attr-defined]
    assert slowest < 1.0, slowest  # 6.4 s when a head was counted only once complete
    # 60 KiB parsed, 1 MiB read and dropped while lingering, the rest in kernel buffers.
    assert sent < 16 * 1024 * 1024, sent


async def test_a_backend_that_never_answers_gets_504_after_the_idle_timeout() -> None:
    backend = await RawBackend(lambda conn, request: b"").start()  # reads, never answers
    port = free_port()
    try:
        async with serving(raw_table(port, backend), idle_timeout=0.5):
            started = time.monotonic()
            answer = await exchange_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    assert answer.startswith(b"HTTP/1.1 504")
    assert time.monotonic() - started < 3


async def test_a_backend_that_stops_mid_body_does_not_hold_the_client() -> None:
    backend = await RawBackend(
        lambda conn, request: b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nbegun"
    ).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend), idle_timeout=0.5):
            started = time.monotonic()
            answer = await exchange_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", seconds=5)
    finally:
        await backend.stop()
    assert answer.endswith(b"begun")  # cut, so the client knows the response is incomplete
    assert time.monotonic() - started < 3


async def test_a_client_that_stops_reading_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    web = await HTTPBackend("a").start()
    port = free_port()
    table = l7_table([route("r", port, [{"backendRefs": [backend_ref("a")]}])], {"a": [web.port]})
    try:
        async with serving(table, idle_timeout=0.5) as dp:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
            listener = dp.listeners[port]
            await async_wait_for(lambda: listener.timeouts["slow_reader"] == 1, 10, what="slow reader cut")  # type: ignore[attr-defined]
            await async_wait_for(lambda: not listener.connections, 5, what="its connection gone")  # type: ignore[attr-defined]
            sock.close()
    finally:
        await web.stop()


async def test_a_body_slower_than_the_minimum_rate_is_cut(
    raw: RawBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body at a few bytes a second makes progress, so no idle timeout fires: the minimum
    rate (after its grace) does."""
    monkeypatch.setattr(client_module, "BODY_RATE_GRACE", 0.5)
    port = free_port()
    async with serving(raw_table(port, raw), min_body_rate=1000, header_timeout=1) as dp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        for _ in range(30):
            await asyncio.sleep(0.1)
            if reader.at_eof() or dp.listeners[port].timeouts["body_rate"]:  # type: ignore[attr-defined]
                break
            writer.write(b"x")
        answer = await read_until_closed(reader, 5)
        writer.close()
        assert dp.listeners[port].timeouts["body_rate"] == 1  # type: ignore[attr-defined]
    assert time.monotonic() - started < 3
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")


async def test_a_tls_connection_that_never_says_hello_is_cut(tmp_path: object) -> None:
    ca = trustme.CA()
    port = free_port()
    web = await HTTPBackend("a").start()
    table = l7_table(
        [
            route(
                "r",
                port,
                [{"backendRefs": [backend_ref("a")]}],
                hostnames=["a.test"],
                tls={"secretName": "cert"},
            )
        ],
        {"a": [web.port]},
        extra=secret("cert", ca.issue_cert("a.test")),
    )
    try:
        async with serving(table, header_timeout=0.5):
            connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
            started = time.monotonic()
            # Each sees the proxy close it (EOF or reset) without a byte: no hello came.
            answers = await asyncio.gather(*(read_until_closed(r, 5) for r, _ in connections))
            elapsed = time.monotonic() - started
            for _, writer in connections:
                writer.close()
    finally:
        await web.stop()
    assert answers == [b""] * 50
    assert elapsed < 3, elapsed  # 60 s (asyncio's default handshake timeout) before


async def test_the_pipeline_a_client_can_queue_is_bounded(raw: RawBackend) -> None:
    port = free_port()
    async with serving(raw_table(port, raw)):
        burst = b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        answer = await exchange_raw(port, burst, seconds=5)
    responses = split_responses(answer)
    assert client_module.MAX_PIPELINE <= len(responses) <= client_module.MAX_PIPELINE + 1
    assert all(status == 200 for status, _, _ in responses)
    assert responses[-1][1].get("connection") == "close"
    assert len(raw.requests) == len(responses)


async def test_a_pathological_pattern_cannot_stall_other_listeners() -> None:
    """`/api/(a+)+/x` took Python's re 77-94 s on a 30-character path; RE2 is linear."""
    web = await HTTPBackend("a").start()
    slow_port, other_port = free_port(), free_port()
    table = l7_table(
        [
            route(
                "regex",
                slow_port,
                [
                    {
                        "matches": [
                            {"path": {"type": "RegularExpression", "value": "/api/(a+)+/x"}},
                            {
                                "path": {"value": "/h"},
                                "headers": [
                                    {
                                        "name": "x-mail",
                                        "type": "RegularExpression",
                                        "value": "([a-z]+)*@example\\.com",
                                    }
                                ],
                            },
                        ],
                        "backendRefs": [backend_ref("a")],
                    }
                ],
            ),
            route("other", other_port, [{"backendRefs": [backend_ref("a")]}]),
        ],
        {"a": [web.port]},
    )
    try:
        async with serving(table), aiohttp.ClientSession() as client:
            evil_path = f"http://127.0.0.1:{slow_port}/api/{'a' * 5000}y"
            evil_header = {"x-mail": "a" * 5000 + "!"}
            attacks = [
                asyncio.create_task(client.get(evil_path)),
                asyncio.create_task(client.get(f"http://127.0.0.1:{slow_port}/h", headers=evil_header)),
            ]
            started = time.monotonic()
            async with client.get(f"http://127.0.0.1:{other_port}/fine") as response:
                assert response.status == 200
            other_latency = time.monotonic() - started
            for attack in attacks:
                async with await attack as response:
                    assert response.status == 404
    finally:
        await web.stop()
    assert other_latency < 1.0, other_latency


async def test_a_misdirected_request_gets_421() -> None:
    """SNI chose a.test's certificate; a request on that connection for b.test (another
    certificate's host) must go on a connection of its own."""
    ca = trustme.CA()
    web = await HTTPBackend("a").start()
    port = free_port()
    secrets, routes = [], []
    for name in ("a", "b"):
        secrets.append(secret(name, ca.issue_cert(f"{name}.test")))
        routes.append(
            route(
                name,
                port,
                [{"backendRefs": [backend_ref("a")]}],
                hostnames=[f"{name}.test"],
                tls={"secretName": name},
                metadata={"creationTimestamp": f"2026-01-0{1 if name == 'a' else 2}T00:00:00Z"},
            )
        )
    table = l7_table(routes, {"a": [web.port]}, extra="---\n".join(secrets))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        async with serving(table):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="a.test"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            ok = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await reader.readexactly(int(ok.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            writer.write(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
            misdirected = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
    finally:
        await web.stop()
    assert ok.startswith(b"HTTP/1.1 200") and misdirected.startswith(b"HTTP/1.1 421")


WS_ACCEPT = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


class TunnelBackend:
    """Answers a WebSocket upgrade with 101, then (optionally) never reads again."""

    def __init__(self, *, reads: bool) -> None:
        self.reads = reads
        self.server: asyncio.Server | None = None
        self.port = 0
        self.received = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []

    async def start(self) -> TunnelBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.readers.append(reader)
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(WS_ACCEPT)
        await writer.drain()
        if not self.reads:
            await asyncio.sleep(3600)
        while data := await reader.read(65536):
            self.received += len(data)

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.close()
        self.server.close()


async def test_a_tunnel_holds_back_a_client_the_backend_does_not_read() -> None:
    """Before: a client writing without reading pushed 256 MB into the proxy in 1.9 s."""
    backend = await TunnelBackend(reads=False).start()
    port = free_port()
    table = l7_table(
        [route("r", port, [{"backendRefs": [backend_ref("ws")]}])],
        {"ws": [backend.port]},
    )
    try:
        async with serving(table):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
            sent = 0
            try:
                while sent < 256 * 1024 * 1024:
                    writer.write(b"w" * 1024 * 1024)
                    await asyncio.wait_for(writer.drain(), 1.0)
                    sent += 1024 * 1024
            except TimeoutError:
                pass
            writer.close()
    finally:
        await backend.stop()
    # Kernel buffers on the way (client send, proxy receive and send, backend receive) hold
    # a few MB; the proxy itself holds one read.
    assert sent < 32 * 1024 * 1024, sent


async def test_a_tunnel_whose_client_left_does_not_keep_bytes_for_a_backend_that_never_reads() -> None:
    """The client writes into a tunnel and leaves; the backend never reads. The proxy's
    socket to the backend, and what it still held for it, are released after the idle
    timeout (before: kept open as long as the backend's socket stayed open, to flush)."""
    backend = await TunnelBackend(reads=False).start()
    port = free_port()
    table = l7_table([route("r", port, [{"backendRefs": [backend_ref("ws")]}])], {"ws": [backend.port]})
    try:
        async with serving(table, idle_timeout=0.5):
            before = open_files()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
            with contextlib.suppress(TimeoutError):
                for _ in range(64):
                    writer.write(b"w" * 1024 * 1024)
                    await asyncio.wait_for(writer.drain(), 0.5)
            writer.transport.abort()
            # Left open: only the backend's own end of its connection (it never reads).
            await async_wait_for(lambda: open_files() == before + 1, 5, what="the proxy's sockets closed")
    finally:
        await backend.stop()


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_idle_tunnel_is_closed() -> None:
    backend = await TunnelBackend(reads=True).start()
    port = free_port()
    table = l7_table([route("r", port, [{"backendRefs": [backend_ref("ws")]}])], {"ws": [backend.port]})
    try:
        async with serving(table, idle_timeout=0.5) as dp:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
            writer.write(b"some frames")
            started = time.monotonic()
            assert await read_until_closed(reader, 5) == b""
            elapsed = time.monotonic() - started
            writer.close()
            await async_wait_for(lambda: not dp.listeners[port].connections, 5, what="the tunnel gone")  # type: ignore[attr-defined]
    finally:
        await backend.stop()
    assert backend.received == len(b"some frames")
    assert elapsed < 2.5, elapsed


async def test_websocket_through_the_tunnel_with_aiohttp() -> None:
    """The tunnel end to end with a real WebSocket client and server, pings included."""
    web = await HTTPBackend("a").start()
    port = free_port()
    table = l7_table([route("r", port, [{"backendRefs": [backend_ref("a")]}])], {"a": [web.port]})
    try:
        async with (
            serving(table),
            aiohttp.ClientSession() as client,
            client.ws_connect(f"http://127.0.0.1:{port}/ws", autoping=True) as ws,
        ):
            for word in ("one", "x" * 300_000):
                await ws.send_str(word)
                assert (await ws.receive_str()) == f"echo: {word}"
    finally:
        await web.stop()


async def test_tiny_chunks_are_coalesced_and_bounded(raw: RawBackend) -> None:
    """A body of 1-byte chunks made each byte a write to the backend (one client stalled all
    the others for 12-26 s): the chunks of one read leave in one write, and a body of more
    than MAX_TINY_CHUNKS chunks averaging under MIN_CHUNK_AVERAGE bytes is refused."""
    from dataplane.l7.reader import MAX_TINY_CHUNKS

    port = free_port()
    async with serving(raw_table(port, raw)):
        body = b"1\r\na\r\n" * 2000 + b"0\r\n\r\n"
        ok = await exchange_raw(
            port,
            b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body,
        )
        flood = await exchange_raw(
            port,
            b"POST /flood HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1\r\na\r\n" * (MAX_TINY_CHUNKS + 100),
        )
    assert ok.startswith(b"HTTP/1.1 200")
    (forwarded,) = [r for r in raw.requests if r.target == "/ok"]
    assert forwarded.body == b"a" * 2000
    (conn,) = [c for c in raw.connections if any(r.target == "/ok" for r in c.requests)]
    assert conn.received.count(b"\r\n") < 100  # a few chunks, not 2,000
    assert flood.startswith(b"HTTP/1.1 400") or b"HTTP/1.1 400" in flood


async def test_an_endless_chunk_extension_is_refused(raw: RawBackend) -> None:
    """A chunk-size line counts like a head: 3.6 GB of one extension went through before."""
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=30) as dp:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;e=")
        sent = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(256):  # up to 16 MB of one chunk-size line
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 1)
                sent += 65536
        writer.close()
        listener = dp.listeners[port]
        assert listener.bad_messages["client"] == 1  # type: ignore[attr-defined]
        await async_wait_for(lambda: not listener.connections, 5, what="the connection closed")  # type: ignore[attr-defined]
    # The line was refused past 60 KiB; what was written after is the 1 MiB read and dropped
    # while lingering, and what the kernels' buffers held.
    assert sent < 12 * 1024 * 1024, sent


async def test_interim_responses_are_bounded() -> None:
    """A backend sending 1xx forever kept the exchange alive past every idle timeout."""
    backend = await RawBackend(lambda conn, request: b"HTTP/1.1 102 Processing\r\n\r\n" * 1000).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            answer = await exchange_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    assert answer.count(b"HTTP/1.1 102") == 32
    assert b"HTTP/1.1 502" in answer


async def test_a_head_begun_during_an_exchange_gets_the_header_timeout(raw: RawBackend) -> None:
    """A pipelined head still arriving when the exchange before it ends must finish within
    the header timeout, not the keep-alive timeout (60 s)."""
    port = free_port()
    async with serving(raw_table(port, raw), header_timeout=0.5, keepalive_timeout=30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")
        started = time.monotonic()
        answer = await read_until_closed(reader, 5)
        writer.close()
    assert time.monotonic() - started < 3
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer
