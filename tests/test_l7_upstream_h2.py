"""HTTP/2 to backends: HTTP/1.1 clients through Bilayer to an h2c backend (RFC 9113 8.2/8.3
translation), streams multiplexed on few connections, a GOAWAY drained with nothing lost,
refused streams sent again."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from dataplane.l7 import upstream
from dataplane.table import Table

from .h2backend import H2Backend
from .helpers import async_wait_for, free_port
from .l7kit import HTTPBackend, backend_ref, l7_table, read_response, route, serving


def h2_table(
    port: int, backend_port: int, *, protocol: str = "h2", tls: dict[str, Any] | None = None, **rule: Any
) -> Table:
    """One route to one cluster reached by protocol (and TLS), as the compiler will make it."""
    compiled = l7_table(
        [route("r", port, [{"backendRefs": [backend_ref("h2")], **rule}])], {"h2": [backend_port]}
    )
    data = compiled.model_dump(by_alias=True)
    for cluster in data["clusters"].values():
        cluster["protocol"] = protocol
        cluster["tls"] = tls
    return Table.model_validate(data)


async def ask(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await read_response(reader)
    finally:
        writer.close()


async def test_an_http1_request_reaches_an_h2c_backend_translated() -> None:
    """Host becomes :authority, connection-specific fields and the ones Connection names are
    dropped, TE: trailers passes only when the client sent it; the response comes back as
    HTTP/1.1."""
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            status, headers, body = await ask(
                port,
                b"GET /hello?x=1 HTTP/1.1\r\nHost: app.example:8080\r\nConnection: keep-alive, x-hop\r\n"
                b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n",
            )
            assert status == 200, body
            seen = json.loads(body)
            names = [n for n, _ in seen["headers"]]
            assert seen["method"] == "GET" and seen["path"] == "/hello?x=1"
            assert seen["authority"] == "app.example:8080" and seen["scheme"] == "http"
            assert ["x-kept", "yes"] in seen["headers"]
            assert ["te", "trailers"] in seen["headers"]
            for dropped in ("host", "connection", "keep-alive", "x-hop"):
                assert dropped not in names
            assert headers["content-type"] == "application/json"

            _, _, body = await ask(port, b"GET /plain HTTP/1.1\r\nHost: app.example\r\n\r\n")
            assert "te" not in [n for n, _ in json.loads(body)["headers"]]
    finally:
        await backend.stop()


async def test_a_chunked_request_body_becomes_data_frames() -> None:
    backend = await H2Backend().start()
    port = free_port()
    parts = [b"a" * 1000, b"b" * 70000, b"c" * 5]  # more than one stream window
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    try:
        async with serving(h2_table(port, backend.port)):
            status, _, body = await ask(
                port, b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
            )
    finally:
        await backend.stop()
    assert status == 200, body
    seen = json.loads(body)
    assert seen["body_length"] == 71005
    assert "content-length" not in [n for n, _ in seen["headers"]]


async def test_a_response_with_trailers_reaches_an_http1_client_whole() -> None:
    """An h2 response without a length and with trailers: chunked to the HTTP/1.1 client."""
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            status, headers, body = await ask(port, b"GET /trailers HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        await backend.stop()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert json.loads(body)["path"] == "/trailers"


async def test_concurrent_requests_share_connections_up_to_the_stream_limit() -> None:
    requests, max_streams = 12, 4
    backend = await H2Backend(max_streams=max_streams).start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            await ask(port, b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")  # the first connection
            answers = await asyncio.gather(
                *(ask(port, b"GET /slow/300 HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(requests))
            )
    finally:
        await backend.stop()
    assert [status for status, _, _ in answers] == [200] * requests
    assert backend.most_streams <= max_streams
    assert backend.accepted <= math.ceil(requests / max_streams)
    assert backend.refused == 0


async def test_a_goaway_mid_load_loses_no_request() -> None:
    """The backend takes 3 streams and says GOAWAY: the others (POSTs, not idempotent) were
    not processed, so they go again on a new connection; the 3 finish where they are."""
    requests = 10
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            await ask(port, b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
            calls = [
                asyncio.create_task(
                    ask(port, b"POST /slow/400 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
                )
                for _ in range(requests)
            ]
            await async_wait_for(
                lambda: sum(len(c.calls) for c in backend.connections) == requests, what="all streams open"
            )
            backend.goaway_all(keep=3)
            answers = await asyncio.gather(*calls)
            assert [status for status, _, _ in answers] == [200] * requests, [
                b for s, _, b in answers if s != 200
            ]
            after = await ask(port, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        await backend.stop()
    connections = [json.loads(body)["connection"] for _, _, body in answers]
    assert connections.count(0) == 3  # kept by the first connection
    assert all(c > 0 for c in connections if c != 0)
    assert after[0] == 200 and json.loads(after[2])["connection"] > 0
    assert backend.accepted == 2


async def test_a_refused_stream_is_sent_again_even_for_a_post() -> None:
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            status, _, body = await ask(
                port, b"POST /refuse/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            )
    finally:
        await backend.stop()
    assert status == 200, body
    assert backend.refused == 1
    assert json.loads(body)["body_length"] == 3


async def test_a_client_that_does_not_read_holds_the_backends_stream_at_its_window() -> None:
    """The client reads nothing: the proxy stops reopening the stream's window, so the
    backend blocks with most of the answer unsent; once the client reads, all of it comes."""
    size = 64 * 1024 * 1024
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)) as dataplane:
            pool = dataplane.listeners[port].pool  # type: ignore[attr-defined]

            def held_back() -> bool:
                """The proxy holds the stream's window closed (bytes received, not reopened)
                and the backend has bytes it cannot send."""
                streams = [s for conns in pool.h2.values() for c in conns for s in c.streams.values()]
                return backend.blocked and any(s.unacked > 0 and s.flow.reasons for s in streams)

            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            writer.write(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
            await async_wait_for(held_back, what="the stream held at its window")
            assert backend.big_sent < size // 2
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"content-length: %d" % size in head.lower()
            got = 0
            while got < size:
                got += len(await asyncio.wait_for(reader.read(1 << 20), 10))
            writer.close()
    finally:
        await backend.stop()
    assert got == size


async def test_a_backend_that_does_not_open_its_window_pauses_the_clients_reads() -> None:
    """The backend never acknowledges the request body: what the proxy holds for the stream
    stays bounded and it stops reading the client, instead of buffering the whole body."""
    size = 32 * 1024 * 1024
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)) as dataplane:
            listener = dataplane.listeners[port]  # type: ignore[attr-defined]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /hold/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"y" * size)  # (buffered by the client's transport: never drained)

            def paused() -> bool:
                return any("backend-full" in c.flow.reasons for c in listener.connections)

            await async_wait_for(paused, what="the client's reads paused")
            streams = [s for conns in listener.pool.h2.values() for c in conns for s in c.streams.values()]
            assert [s.full for s in streams] == [True]
            assert streams[0].buffered() < 1024 * 1024
            writer.transport.abort()  # type: ignore[attr-defined]
    finally:
        await backend.stop()


async def test_a_dead_h2c_endpoint_is_a_503() -> None:
    port = free_port()
    async with serving(h2_table(port, free_port())):
        # Concurrent requests wait for one connection being made: each gets the failure.
        answers = await asyncio.gather(*(ask(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(5)))
    assert [status for status, _, _ in answers] == [503] * 5


async def test_a_mirror_reached_over_h2c_gets_its_copy() -> None:
    """Mirrors use the same neutral request: a copy (with its chunked body and shadow host)
    goes to an h2c mirror while the primary is HTTP/1.1."""
    primary = await HTTPBackend("a").start()
    mirror = await H2Backend().start()
    port = free_port()
    mirrored = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "m", "port": 80}}}
    rules = [{"filters": [mirrored], "backendRefs": [backend_ref("a")]}]
    data = l7_table([route("r", port, rules)], {"a": [primary.port], "m": [mirror.port]}).model_dump(
        by_alias=True
    )
    data["clusters"]["default/m:80"]["protocol"] = "h2"
    body = b"0123456789" * 10_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:30_000], body[30_000:])) + b"0\r\n\r\n"
    try:
        async with serving(Table.model_validate(data)):
            status, _, _ = await ask(
                port, b"PUT /put HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
            )
            assert status == 200
            await async_wait_for(lambda: len(mirror.calls) == 1, what="the copy")
    finally:
        await primary.stop()
        await mirror.stop()
    copy = mirror.calls[0]
    assert copy.header(":authority") == "shop.test-shadow" and copy.header(":method") == "PUT"
    assert bytes(copy.body) == body


async def test_an_idle_h2_connection_closes_after_the_pools_idle_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.0)
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            status, _, _ = await ask(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200 and backend.accepted == 1
            await async_wait_for(lambda: not backend.connections, what="the idle connection closed")
    finally:
        await backend.stop()
