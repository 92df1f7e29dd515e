"""Differential fuzzing of request framing: mutated request heads and bodies go through the
proxy to a raw backend whose strict RFC 9112 parser (tests/rawkit.py) is the referee.

For every input, whatever the proxy makes of it, the backend must see exactly the requests
whose answers the client got back, in order, each parsed cleanly, with nothing left over on
a connection the proxy keeps: an extra or missing request is a desync (smuggling), a parse
error is framing the proxy should not have emitted.

Derandomized so CI runs the same inputs every time; BILAYER_FUZZ_EXAMPLES=5000 with
BILAYER_FUZZ_RANDOM=1 explores further by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dataplane.runtime import Dataplane, Settings

from .helpers import free_port
from .l7kit import backend_ref, l7_table, route
from .rawkit import RawBackend, split_responses

T = TypeVar("T")
EXAMPLES = int(os.environ.get("BILAYER_FUZZ_EXAMPLES", "300"))
SENTINEL = b"GET /__end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class ProxyThread:
    """The dataplane and a raw backend on an event loop of their own, so a synchronous
    hypothesis test can drive them with plain sockets."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.backend = self.run(RawBackend().start())
        table = l7_table(
            [route("r", self.port, [{"backendRefs": [backend_ref("raw")]}])], {"raw": [self.backend.port]}
        )
        settings_ = Settings(
            address="127.0.0.1", access_log=False, header_timeout=0.5, idle_timeout=0.3, min_body_rate=0
        )
        self.dataplane = Dataplane(settings_)
        self.run(self.dataplane.apply(table))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _fresh(self) -> None:
        """Forget pooled backend connections, so each example stands alone."""
        listener = self.dataplane.listeners[self.port]
        listener.pool.close()  # type: ignore[attr-defined]
        for _ in range(100):
            if all(c.writer is None or c.writer.is_closing() for c in self.backend.connections):
                break
            await asyncio.sleep(0.005)
        self.backend.connections.clear()

    def fresh(self) -> None:
        self.run(self._fresh())

    def stop(self) -> None:
        self.run(self.dataplane.close(0))
        self.run(self.backend.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyThread]:
    running = ProxyThread()
    yield running
    running.stop()


def send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may close first; what it answered is still read
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


# --- the inputs: a valid request, then one to three mutations of its head or body ---

SMUGGLE = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
LENGTHS = [
    "003",
    "+3",
    "-1",
    " 3",
    "3 ",
    "3,3",
    "3, 4",
    "0x3",
    "99999999999999999999",
    "",
    "3\x00",
    "0",
    "40",
]
CODINGS = [
    "chunked",
    "Chunked",
    " chunked",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "\tchunked",
    "xchunked",
]
TE_NAMES = ["Transfer-Encoding", "Transfer_Encoding", "Transfer-Encoding ", " Transfer-Encoding", "TE"]
CL_NAMES = ["Content-Length", "Content_Length", "Content-Length ", "content-length"]
TOKENS = [
    "close",
    "keep-alive",
    "content-length",
    "Content-Length",
    "transfer-encoding",
    "host",
    "upgrade",
    "te",
]
TARGETS = [
    "/a?x=1",
    "http://h.test/b",
    "http://h.test?x=/y",
    "HTTP://H.test:80/c",
    "//a",
    "/a/../b",
    "*",
    "a",
]
VERSIONS = ["HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/0.9"]
HOSTS = ["", "a.test:80@b.test", "x:99999", "[::1]:8080", "x\ty"]
JUNK = ["X-A: a\r\n b", "X-B: a\x00b", "X-C: a\rb", " X-D: lead", "X-E : space", "Expect: 100-continue"]
CHUNK_SIZES = ["003", "3;ext=1", "3 ", " 3", "-3", "0x3", "ffffffffffffffffff", "A", "4"]
LAST_CHUNKS = [
    "0\n\n",
    "0\r\n",
    "00\r\n\r\n",
    "0;x\r\n\r\n",
    "0\r\nX-T: 1\r\n\r\n",
    "0\r\nContent-Length: 5\r\n\r\n",
]

Request = tuple[list[str], str, str]  # head lines (request line first), framing kind, body


def base(method: str, kind: str) -> Request:
    lines = [f"{method} /a HTTP/1.1", "Host: x"]
    if kind == "length":
        return [*lines, "Content-Length: 3"], kind, "abc"
    if kind == "chunked":
        return [*lines, "Transfer-Encoding: chunked"], kind, "3\r\nabc\r\n0\r\n\r\n"
    return lines, kind, ""


def mutate(request: Request, mutation: tuple[str, str]) -> Request:
    lines, kind, body = request
    op, arg = mutation
    lines = list(lines)
    if op == "connection":
        lines.append(f"Connection: {arg}")
    elif op == "length":
        lines = [ln for ln in lines if not ln.startswith("Content-Length")] + [f"Content-Length: {arg}"]
    elif op == "add-length":
        lines.append(f"{arg}: 3")
    elif op == "coding":
        lines.append(f"{arg.split('|')[0]}: {arg.split('|')[1]}")
    elif op == "version":
        lines[0] = lines[0].rsplit(" ", 1)[0] + " " + arg
    elif op == "target":
        method, _, version = lines[0].split(" ", 2)
        lines[0] = f"{method} {arg} {version}"
    elif op == "host":
        lines = [ln for ln in lines if not ln.startswith("Host")] + (
            [f"Host: {arg}"] if arg != "none" else []
        )
    elif op == "second-host":
        lines.append(f"Host: {arg}")
    elif op == "junk":
        lines.append(arg)
    elif op == "chunk-size" and kind == "chunked":
        body = body.replace("3\r\n", arg + "\r\n", 1)
    elif op == "last-chunk" and kind == "chunked" and "0\r\n" in body:
        body = body[: body.rindex("0\r\n")] + arg
    elif op == "smuggle":
        body += SMUGGLE
    elif op == "upgrade":
        lines += ["Connection: upgrade", f"Upgrade: {arg}"]
    elif op == "bare-lf":
        return lines, kind, body.replace("\r\n", "\n") if arg == "body" else body
    return lines, kind, body


def sep(request: Request, bare_lf: bool) -> bytes:
    lines, _, body = request
    newline = "\n" if bare_lf else "\r\n"
    return (newline.join(lines) + newline + newline + body).encode("latin-1")


MUTATIONS = st.one_of(
    st.tuples(
        st.just("connection"), st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3).map(", ".join)
    ),
    st.tuples(st.just("length"), st.sampled_from(LENGTHS)),
    st.tuples(st.just("add-length"), st.sampled_from(CL_NAMES)),
    st.tuples(
        st.just("coding"), st.tuples(st.sampled_from(TE_NAMES), st.sampled_from(CODINGS)).map("|".join)
    ),
    st.tuples(st.just("version"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("target"), st.sampled_from(TARGETS)),
    st.tuples(st.just("host"), st.sampled_from([*HOSTS, "none"])),
    st.tuples(st.just("second-host"), st.sampled_from(["x", "y"])),
    st.tuples(st.just("junk"), st.sampled_from(JUNK)),
    st.tuples(st.just("chunk-size"), st.sampled_from(CHUNK_SIZES)),
    st.tuples(st.just("last-chunk"), st.sampled_from(LAST_CHUNKS)),
    st.tuples(st.just("smuggle"), st.just("")),
    st.tuples(st.just("upgrade"), st.sampled_from(["websocket", "h2c"])),
    st.tuples(st.just("bare-lf"), st.sampled_from(["body"])),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    request = base(
        draw(st.sampled_from(["GET", "POST", "PUT"])), draw(st.sampled_from(["none", "length", "chunked"]))
    )
    for mutation in draw(st.lists(MUTATIONS, min_size=1, max_size=3)):
        request = mutate(request, mutation)
    data = sep(request, draw(st.booleans().map(lambda b: b and draw(st.integers(0, 9)) == 0)))
    if draw(st.booleans()):
        data += b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    return data


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("BILAYER_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=requests())
@example(
    data=b"POST /public HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: 32\r\n\r\n"
    + SMUGGLE.encode()
)
@example(
    data=b"POST /p HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, content-length\r\n"
    b"Content-Length: 3\r\n\r\nabc"
)
def test_the_backend_sees_exactly_what_the_proxy_answered(proxy: ProxyThread, data: bytes) -> None:
    proxy.fresh()
    before = proxy.backend.count
    answer = send(proxy.port, data + SENTINEL)
    seen = proxy.backend.count - before
    connections = list(proxy.backend.connections)
    assert not [c.malformed for c in connections if c.malformed], (data, [c.received for c in connections])
    from_backend = []
    for _, headers, body in split_responses(answer):
        if headers.get("content-type") == "application/json":
            from_backend.append(json.loads(body)["n"])
    # Every request the backend parsed was answered to this client, in order, and only those.
    assert from_backend == list(range(before + 1, before + seen + 1)), (data, answer[:600])
    # A backend connection the proxy keeps holds no partial request (the next request on it
    # would be read as its continuation); one the proxy gave up on is closed.
    for conn in connections:
        wait_until(lambda conn=conn: not conn.pending or conn.closed)  # type: ignore[misc]
        assert not conn.pending or conn.closed, (data, conn.received)


def wait_until(predicate: Any, seconds: float = 2.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
