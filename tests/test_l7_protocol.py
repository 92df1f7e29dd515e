"""HTTP/1.1 on the wire through the proxy: bodies, keep-alive, pipelining, upgrades, bad input."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .helpers import async_wait_for, free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, raw, read_response, route, serving


@pytest.fixture
async def web() -> AsyncIterator[HTTPBackend]:
    backend = await HTTPBackend("a").start()
    yield backend
    await backend.stop()


@pytest.fixture
def port() -> int:
    return free_port()


def table_for(port: int, web: HTTPBackend, **spec: object) -> object:
    return l7_table([route("r", port, [{"backendRefs": [backend_ref("a")]}], **spec)], {"a": [web.port]})


async def test_request_bodies_stream_byte_exact(web: HTTPBackend, port: int) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 11)
    async with serving(table_for(port, web)), aiohttp.ClientSession() as client:  # type: ignore[arg-type]
        async with client.post(f"http://127.0.0.1:{port}/up", data=payload) as response:
            assert echoed(await response.read())["body_sha256"] == hashlib.sha256(payload).hexdigest()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        async with client.post(f"http://127.0.0.1:{port}/up", data=chunks()) as response:  # chunked upload
            report = echoed(await response.read())
            assert report["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_response_bodies_stream_both_framings(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web)), aiohttp.ClientSession() as client:  # type: ignore[arg-type]
        async with client.get(f"http://127.0.0.1:{port}/big/{20 * 1024 * 1024}") as response:
            body = await response.read()
        assert len(body) == 20 * 1024 * 1024 and body[:256] == bytes(range(256))
        async with client.get(f"http://127.0.0.1:{port}/chunked") as response:
            assert response.headers["transfer-encoding"] == "chunked"
            assert await response.text() == "".join(f"part {i}\n" for i in range(5))


async def test_slow_client_holds_back_the_backend(web: HTTPBackend, port: int) -> None:
    size = 64 * 1024 * 1024
    async with serving(table_for(port, web)) as dp:  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /big/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        buffered = 0
        while got < size:
            got += len(await reader.read(256 * 1024))
            await asyncio.sleep(0.001)
            for conn in dp.listeners[port].connections:  # type: ignore[attr-defined]
                if conn.transport is not None:
                    buffered = max(buffered, conn.transport.get_write_buffer_size())
        writer.close()
    # The proxy's buffer to the client never grows far past its high-water mark.
    assert buffered < 2 * 1024 * 1024, buffered


async def test_keep_alive_pipelining_and_connection_close(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)))
        paths = []
        for _ in range(5):
            status, _, body = await read_response(reader)
            assert status == 200
            paths.append(echoed(body)["path"])
        assert paths == [f"/p{i}" for i in range(5)]
        writer.write(b"POST /last HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["connection"] == "close" and echoed(body)["body_length"] == 3
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_pipelined_404_and_proxied_requests_keep_order(web: HTTPBackend, port: int) -> None:
    table = l7_table(
        [route("r", port, [{"matches": [{"path": {"value": "/ok"}}], "backendRefs": [backend_ref("a")]}])],
        {"a": [web.port]},
    )
    async with serving(table):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ok/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /slow/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /ok/2 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        results = [await read_response(reader) for _ in range(4)]
        writer.close()
    assert [r[0] for r in results] == [200, 404, 404, 200]
    assert echoed(results[3][2])["path"] == "/ok/2"


async def test_http_1_0_client(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        answer = await raw(port, b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert b"transfer-encoding" not in head.lower()  # 1.0 clients get a close-delimited body
    assert body == b"".join(f"part {i}\n".encode() for i in range(5))


async def test_head_requests(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /big/1000 HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"content-length: 1000" in head.lower()
        status, _, body = await read_response(reader)  # the next response follows directly
        writer.close()
    assert status == 200 and echoed(body)["path"] == "/after"


async def test_websocket_upgrade_is_tunnelled(web: HTTPBackend, port: int) -> None:
    async with (
        serving(table_for(port, web)),  # type: ignore[arg-type]
        aiohttp.ClientSession() as client,
        client.ws_connect(f"http://127.0.0.1:{port}/ws") as ws,
    ):
        for word in ("one", "two", "x" * 100_000):
            await ws.send_str(word)
            assert (await ws.receive_str()) == f"echo: {word}"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"HELLO WORLD\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
        (b"GET /public/../../etc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /files/a%2Fb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)
async def test_bad_requests_get_4xx_and_close(
    web: HTTPBackend, port: int, request_bytes: bytes, status: int
) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        answer = await raw(port, request_bytes)  # returns only once the proxy closes
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
    assert b"Traceback" not in answer
    assert not web.calls  # nothing reached the backend


async def test_encoded_slash_allowed_when_the_route_opts_in(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web, allowEncodedSlashes=True)):  # type: ignore[arg-type]
        _, body = (
            await raw(port, b"GET /files/a%2fb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ).split(b"\r\n\r\n", 1)
    assert echoed(body)["path"] == "/files/a%2Fb"


async def test_dot_segments_never_bypass_a_prefix(web: HTTPBackend, port: int) -> None:
    table = l7_table(
        [
            route(
                "r",
                port,
                [
                    {"matches": [{"path": {"value": "/public"}}], "backendRefs": [backend_ref("a")]},
                ],
            )
        ],
        {"a": [web.port]},
    )
    async with serving(table):
        answer = await raw(port, b"GET /public/../internal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404")
        answer = await raw(port, b"GET /public/./a//b/../c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert echoed(answer.split(b"\r\n\r\n", 1)[1])["path"] == "/public/a/c"


async def test_body_over_the_limit_gets_413(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web), max_body_size=1000):  # type: ignore[arg-type]
        answer = await raw(port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000)
        assert answer.startswith(b"HTTP/1.1 413")
        ok = await raw(
            port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789"
        )
        assert ok.startswith(b"HTTP/1.1 200")


async def test_backend_reset_mid_response_closes_the_client(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"content-length: 100000" in head.lower()
        body = b""
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            body = await asyncio.wait_for(reader.readexactly(100000), 5)
        writer.close()
    assert len(body) < 100000


async def test_slowloris_clients_are_cut_and_do_not_block_others(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web), header_timeout=3.0) as dp:  # type: ignore[arg-type]
        listener = dp.listeners[port]
        dribblers = []
        for _ in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
            dribblers.append(writer)
        await async_wait_for(lambda: listener.active_connections >= 1000, what="all dribblers accepted")
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                async with client.get(f"http://127.0.0.1:{port}/normal") as response:
                    assert response.status == 200
        # Served while every dribbler was still connected and waiting: none was cut yet.
        assert listener.header_timeouts == 0  # type: ignore[attr-defined]
        await async_wait_for(lambda: listener.header_timeouts == 1000, what="every dribbler cut")  # type: ignore[attr-defined]
        for writer in dribblers:
            writer.close()


async def test_a_half_close_ends_a_cut_request_at_once_and_waits_for_a_whole_ones_answer(
    web: HTTPBackend, port: int
) -> None:
    async with serving(table_for(port, web)):  # type: ignore[arg-type]
        # After a whole request the client may half-close: its answer still comes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
        # A request cut short (in its body, in its head) can never end: the proxy closes at
        # once, not when the body rate's check (5-8 s) or a timeout (10-60 s) notices.
        for cut in (
            b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10,
            b"GET /cut HTTP/1.1\r\nHost: x\r\nAcc",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(cut)
            await writer.drain()
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            assert not answer.startswith(b"HTTP/1.1 2"), answer


async def test_idle_keep_alive_connections_are_closed(web: HTTPBackend, port: int) -> None:
    async with serving(table_for(port, web), keepalive_timeout=0.2):  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_expect_100_continue(web: HTTPBackend, port: int) -> None:
    async with (
        serving(table_for(port, web)),  # type: ignore[arg-type]
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{port}/e", data=b"z" * 1000, expect100=True) as response,
    ):
        assert response.status == 200 and echoed(await response.read())["body_length"] == 1000
