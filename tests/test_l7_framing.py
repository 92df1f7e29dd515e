"""Request smuggling and framing, on real sockets: what a backend receives is exactly what the
proxy parsed, whatever framing a client or backend sends.

The backends here are raw TCP servers that read requests with a strict RFC 9112 parser
(tests/rawkit.py), so a desync shows up as an extra request, a malformed stream or a
response that answers the wrong client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from .helpers import free_port
from .l7kit import serving
from .rawkit import Connection, RawBackend, Request, echo_response, exchange_raw, raw_table, split_responses

SMUGGLED = b"GET /admin?smuggled=1 HTTP/1.1\r\nHost: shop.test\r\nX-Smuggled: yes\r\n\r\n"


@pytest.mark.parametrize(
    "connection",
    [b"Content-Length", b"keep-alive, content-length", b"close, Content-Length", b"host, content-length"],
)
async def test_connection_cannot_remove_the_request_framing(raw: RawBackend, connection: bytes) -> None:
    """The critical hole: Connection naming Content-Length made the body a second request."""
    port = free_port()
    attack = b"POST /public HTTP/1.1\r\nHost: shop.test\r\nConnection: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        connection,
        len(SMUGGLED),
        SMUGGLED,
    )
    # A last request that closes the connection ends the read (not the 2 s timeout); a
    # smuggled request would reach the backend before it. (With "close" the proxy closes
    # after the first answer: no last request then.)
    closes = b"close" in connection
    last = [] if closes else [("GET", "/last")]
    if not closes:
        attack += b"GET /last HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
    async with serving(raw_table(port, raw)):
        answer = await exchange_raw(port, attack, seconds=2)
    assert not raw.malformed
    assert [(r.method, r.target) for r in raw.requests] == [("POST", "/public"), *last]
    request = raw.requests[0]
    assert request.body == SMUGGLED and request.header("content-length") == [str(len(SMUGGLED))]
    responses = split_responses(answer)
    assert [status for status, _, _ in responses] == [200] * (1 + len(last))


async def test_a_smuggled_prefix_never_captures_another_clients_request(raw: RawBackend) -> None:
    """The attack in full: smuggle the start of a comment whose body would be the next client's
    request (its Cookie and Authorization); the victim must get its own answer."""
    port = free_port()
    prefix = b"POST /public/comment HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 400\r\n\r\ncomment="
    attack = (
        b"POST /public HTTP/1.1\r\nHost: shop.test\r\nConnection: Content-Length\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(prefix), prefix)
    )
    victim = (  # it closes after its answer: the read ends then, not at the timeout
        b"GET /account HTTP/1.1\r\nHost: shop.test\r\nCookie: session=victim\r\n"
        b"Authorization: Bearer v\r\nConnection: close\r\n\r\n"
    )
    async with serving(raw_table(port, raw)):
        attacker_sees = await exchange_raw(port, attack, seconds=1)
        victim_sees = await exchange_raw(port, victim, seconds=2)
    assert not raw.malformed
    assert [(r.method, r.target) for r in raw.requests] == [("POST", "/public"), ("GET", "/account")]
    assert raw.requests[0].body == prefix
    (status, _, body), *_ = split_responses(victim_sees)
    assert status == 200 and json.loads(body)["target"] == "/account"
    assert b"session=victim" not in attacker_sees


async def test_connection_cannot_remove_chunked_framing(raw: RawBackend) -> None:
    port = free_port()
    body = b"5\r\nhello\r\n0\r\n\r\n"
    request = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    async with serving(raw_table(port, raw)):
        answer = await exchange_raw(port, request, seconds=2)
    assert not raw.malformed
    assert [(r.method, r.target, r.body) for r in raw.requests] == [
        ("POST", "/c", b"hello"),
        ("GET", "/second", b""),
    ]
    assert [s for s, _, _ in split_responses(answer)] == [200, 200]


async def test_a_backends_connection_header_cannot_unframe_its_response() -> None:
    def answer(conn: Connection, request: Request) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: content-length, keep-alive\r\nContent-Length: 5\r\n\r\nhello"

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # the client connection stays usable: the response was framed
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert b"content-length: 5" in head.lower()
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            writer.close()
    finally:
        await backend.stop()


POISONED = [
    pytest.param(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 299 Poisoned\r\nX-Poison: yes\r\nX-Eat: ",
        id="prefix",
    ),
    pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA", id="extra-bytes"),
    pytest.param(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello", id="204-with-body"),
    pytest.param(
        b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 299 Poisoned\r\ncontent-length: 0\r\n\r\n",
        id="304-with-body",
    ),
]


@pytest.mark.parametrize("first", POISONED)
async def test_a_backend_connection_with_bytes_past_a_response_is_never_reused(first: bytes) -> None:
    """Whatever follows a response's end on the same read, the next client (another
    connection) gets its own answer from a clean backend connection."""
    answers = iter([first])

    def answer(conn: Connection, request: Request) -> bytes:
        return next(answers, None) or echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            await exchange_raw(
                port, b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", seconds=2
            )
            second = await exchange_raw(port, b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    (status, headers, body), *_ = split_responses(second)
    assert status == 200 and "x-poison" not in headers
    assert json.loads(body)["target"] == "/second"
    assert len(backend.connections) == 2  # the first connection was closed, not pooled


async def test_a_short_response_body_is_never_reused_nor_passed_as_complete() -> None:
    """A backend announces 10 bytes and sends 5, then answers the next request on the same
    connection: the first client is cut (never a truncated response that looks complete),
    the next client gets its own answer."""

    def answer(conn: Connection, request: Request) -> bytes:
        if backend.count == 1:
            return b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend), idle_timeout=0.5):
            first = await exchange_raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", seconds=5)
            second = await exchange_raw(port, b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"short")  # then cut: incomplete
    (status, _, body), *_ = split_responses(second)
    assert status == 200 and json.loads(body)["target"] == "/b"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a.test:80@b.test\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a.test/b\r\n\r\n", 400),
        (b"GET /a\\b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://user@b.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Forwarded_For: 6.6.6.6\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX_Forwarded-Host: evil\r\n\r\n", 400),
        (b"GET /public/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /public/%2e%2e;x/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a%5C..%5Cadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 3\r\n\r\nabc",
            400,
        ),
    ],
)
async def test_lenient_forms_are_refused(raw: RawBackend, request_bytes: bytes, status: int) -> None:
    port = free_port()
    async with serving(raw_table(port, raw)):
        answer = await exchange_raw(port, request_bytes, seconds=3)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
    assert b"connection: close" in answer.split(b"\r\n\r\n")[0].lower()
    assert not raw.requests


async def test_forwarded_framing_is_the_proxys_own(raw: RawBackend) -> None:
    """Content-Length with leading zeros is sent as the number it means; an absolute-form
    target's authority becomes the Host and its query stays a query."""
    port = free_port()
    async with serving(raw_table(port, raw)):
        await exchange_raw(
            port,
            b"POST /n HTTP/1.1\r\nHost: x\r\nContent-Length: 010\r\n\r\n0123456789"
            b"GET http://b.test?x=/y HTTP/1.1\r\nHost: ignored.test\r\n\r\n"
            b"GET HTTP://C.test:8080/p?q#frag HTTP/1.1\r\nHost: ignored.test\r\nConnection: close\r\n\r\n",
        )
    first, second, third = sorted(raw.requests, key=lambda r: r.method != "POST" and r.target != "/?x=/y")
    assert first.header("content-length") == ["10"] and first.body == b"0123456789"
    assert (second.target, second.header("host")) == ("/?x=/y", ["b.test"])
    assert second.header("x-forwarded-host") == ["b.test"]
    assert (third.target, third.header("host")) == ("/p?q", ["C.test:8080"])


async def test_connect_is_answered_at_once(raw: RawBackend) -> None:
    port = free_port()
    async with serving(raw_table(port, raw), keepalive_timeout=30):
        answer = await exchange_raw(
            port, b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n", seconds=3
        )
    assert answer.startswith(b"HTTP/1.1 405")
    assert not raw.requests


async def test_a_declined_upgrade_goes_on_as_http() -> None:
    """The backend answers 200 to a WebSocket upgrade: the client's next (pipelined) request
    is served at once, not held until the keep-alive timeout."""
    backend = await RawBackend().start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend), keepalive_timeout=30):
            answer = await exchange_raw(
                port,
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                seconds=3,
            )
    finally:
        await backend.stop()
    responses = split_responses(answer)
    assert [json.loads(body)["target"] for _, _, body in responses] == ["/ws", "/next"]
    assert backend.requests[0].header("upgrade") == ["websocket"]


async def test_h2c_and_unknown_upgrades_are_forwarded_as_plain_requests() -> None:
    """Only WebSocket upgrades are tunnelled; h2c (dropped by RFC 9113) and others are plain
    requests to the backend, and a 101 the proxy did not ask for is a 502."""

    def answer(conn: Connection, request: Request) -> bytes:
        if request.target == "/switch":
            return b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            plain = await exchange_raw(
                port,
                b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            switched = await exchange_raw(  # the pipelined /after closes: the read ends then
                port,
                b"GET /switch HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
    finally:
        await backend.stop()
    first = backend.requests[0]
    assert first.header("upgrade") == [] and first.header("http2-settings") == []
    assert [json.loads(b)["target"] for _, _, b in split_responses(plain)] == ["/plain", "/after"]
    assert switched.startswith(b"HTTP/1.1 502")


LATE = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 12\r\n\r\n<script>pwn"


def late_body(first: bytes) -> Callable[[Connection, Request], Awaitable[bytes]]:
    """A backend that answers the first request with `first`, writes 50 ms later what looks
    like another response on the same connection (a HEAD answered like a GET, a 204 with a
    body after all), and answers what comes next on that connection after that."""

    async def answer(conn: Connection, request: Request) -> bytes:
        if conn.backend.count == 1:
            assert conn.writer is not None
            asyncio.get_running_loop().call_later(0.05, conn.writer.write, LATE)
            return first
        if len(conn.requests) > 1:
            await asyncio.sleep(0.1)  # busy with the late body, as a one-thread server is
        return echo_response(conn, request)

    return answer


@pytest.mark.parametrize(
    ("request_line", "first"),
    [
        (b"HEAD /page HTTP/1.1", b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
        (b"GET /nothing HTTP/1.1", b"HTTP/1.1 204 No Content\r\ncontent-length: 12\r\n\r\n"),
    ],
)
async def test_a_connection_a_backend_may_still_write_on_is_not_reused(
    request_line: bytes, first: bytes
) -> None:
    """After a HEAD, or a 204 that announced a body, the backend may write a body late;
    on a reused connection it would be the next client's answer (20/20 before)."""
    backend = await RawBackend(late_body(first)).start()
    port = free_port()
    try:
        async with serving(raw_table(port, backend)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_line + b"\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            victim = await exchange_raw(
                port, b"GET /account HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            writer.close()
    finally:
        await backend.stop()
    (status, _, body), *_ = split_responses(victim)
    assert status == 200 and json.loads(body)["target"] == "/account"


async def test_a_connection_that_carried_a_get_body_is_not_reused(raw: RawBackend) -> None:
    """Many servers never read a GET's body and would read it later as a request of its own
    (CL.0): such a connection is closed after the response."""
    port = free_port()
    async with serving(raw_table(port, raw)):
        await exchange_raw(
            port, b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        await exchange_raw(port, b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await exchange_raw(
            port, b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        await exchange_raw(port, b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    by_connection = [[r.target for r in c.requests] for c in raw.connections]
    assert by_connection == [["/a"], ["/b", "/c", "/d"]]


async def test_a_pipelined_body_that_comes_after_its_head_is_read(raw: RawBackend) -> None:
    port = free_port()
    async with serving(raw_table(port, raw)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
        )
        await asyncio.sleep(0.3)  # the body comes later: the test is about that gap
        writer.write(b"helloGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert [json.loads(b)["target"] for _, _, b in split_responses(answer)] == ["/1", "/2", "/3"]
    assert [r.body for r in raw.requests if r.target == "/2"] == [b"hello"]
