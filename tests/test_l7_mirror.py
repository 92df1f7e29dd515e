"""Request mirroring through the real proxy: the copy is faithful and streamed, and nothing
the mirror does (hang, refuse, fail to read) reaches the client or holds more than its bound."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from dataplane.metrics import DataplaneCollector
from dataplane.runtime import Dataplane

from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, route, serving


class Mirror:
    """A backend that records the copies it receives; it can be told to hold its answers."""

    def __init__(self) -> None:
        self.copies: list[dict[str, Any]] = []
        self.started = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Mirror:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def handle(self, request: web.Request) -> web.Response:
        self.started += 1
        body = await request.read()
        await self.gate.wait()
        self.copies.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "host": request.headers.get("host"),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )
        return web.Response(status=500, text="a mirror's answer goes nowhere")

    async def stop(self) -> None:
        self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def mirror() -> AsyncIterator[Mirror]:
    found = await Mirror().start()
    yield found
    await found.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def mirror_filter(name: str, **share: Any) -> dict[str, Any]:
    return {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": name, "port": 80}, **share}}


async def eventually(condition: Any, what: str, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def copies_of(dataplane: Dataplane, cluster: str) -> dict[str, int]:
    registry = CollectorRegistry()
    registry.register(DataplaneCollector(dataplane))
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("bilayer_l7_mirror_copies_total{") and f'cluster="{cluster}"' in line:
            result = line.split('result="')[1].split('"')[0]
            found[result] = int(float(line.rsplit(" ", 1)[1]))
    return found


async def test_a_copy_carries_the_request_and_its_body_with_a_shadow_host(
    web_a: HTTPBackend, mirror: Mirror, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"filters": [mirror_filter("m")], "backendRefs": [backend_ref("a")]}]
    body = os.urandom(1024 * 1024 + 7)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port], "m": [mirror.port]})) as dp:
        url = f"http://127.0.0.1:{port}/upload?x=1"
        async with client.post(url, data=body, headers={"Host": "shop.test:8080", "X-Trace": "t1"}) as resp:
            assert resp.status == 200  # the primary's answer, not the mirror's 500
            assert echoed(await resp.read())["body_sha256"] == hashlib.sha256(body).hexdigest()
        async with client.put(url, data=chunks(), headers={"Host": "shop.test"}) as resp:  # chunked
            assert resp.status == 200
        async with client.get(url, headers={"Host": "shop.test"}) as resp:
            assert resp.status == 200
            primary_id = echoed(await resp.read())["header_map"]["x-request-id"]
        await eventually(lambda: len(mirror.copies) == 3, "three copies")
        assert copies_of(dp, "default/m:80") == {"answered": 3, "dropped": 0, "failed": 0}
    by_method = {c["method"]: c for c in mirror.copies}
    digest = hashlib.sha256(body).hexdigest()
    assert by_method["POST"]["sha256"] == digest and by_method["PUT"]["sha256"] == digest
    assert by_method["POST"]["host"] == "shop.test-shadow:8080"
    assert by_method["PUT"]["host"] == "shop.test-shadow"
    assert by_method["POST"]["path"] == "/upload?x=1" and by_method["POST"]["headers"]["x-trace"] == "t1"
    assert by_method["PUT"]["headers"]["transfer-encoding"] == "chunked"
    assert by_method["GET"]["headers"]["x-request-id"] == primary_id  # the copy's log joins too


async def test_a_hanging_mirror_never_holds_the_client(
    web_a: HTTPBackend, mirror: Mirror, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"filters": [mirror_filter("m")], "backendRefs": [backend_ref("a")]}]
    mirror.gate.clear()
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port], "m": [mirror.port]})) as dp:
        for i in range(5):
            async with client.post(f"http://127.0.0.1:{port}/p{i}", data=b"x" * 5000) as resp:
                assert resp.status == 200
        # Every client has its answer while the mirror still holds every copy.
        await eventually(lambda: mirror.started == 5, "the mirror to have five copies")
        assert mirror.copies == []
        mirror.gate.set()
        await eventually(lambda: copies_of(dp, "default/m:80").get("answered") == 5, "five answered copies")


async def test_copies_in_flight_are_bounded(
    web_a: HTTPBackend, mirror: Mirror, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dataplane.l7.exchange.MAX_COPIES", 3)
    port = free_port()
    rules = [{"filters": [mirror_filter("m")], "backendRefs": [backend_ref("a")]}]
    mirror.gate.clear()
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port], "m": [mirror.port]})) as dp:
        for i in range(6):
            async with client.get(f"http://127.0.0.1:{port}/g{i}") as resp:
                assert resp.status == 200
        await eventually(lambda: mirror.started == 3, "three copies at the mirror")
        assert copies_of(dp, "default/m:80")["dropped"] == 3
        mirror.gate.set()
        await eventually(lambda: copies_of(dp, "default/m:80")["answered"] == 3, "three answered")


async def test_a_refusing_mirror_is_counted_and_invisible(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"filters": [mirror_filter("dead")], "backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port], "dead": [free_port()]})) as dp:
        for _ in range(3):
            async with client.get(f"http://127.0.0.1:{port}/x") as resp:
                assert resp.status == 200
        await eventually(lambda: copies_of(dp, "default/dead:80").get("failed") == 3, "three failed copies")


async def test_a_mirror_that_stops_reading_loses_its_copies_not_the_clients(
    web_a: HTTPBackend, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror that accepts and never reads: each copy is dropped once it holds more than
    its bound unsent, or the listener's copies together more than the budget; the clients'
    32 MB uploads reach the primary whole, and other clients are served meanwhile."""
    monkeypatch.setattr("dataplane.l7.mirror.MIRROR_BUDGET", 1536 * 1024)  # less than two copies' bound
    monkeypatch.setattr("dataplane.l7.mirror.ANSWER_SECONDS", 1.0)  # the copies it took wait this long
    sink = socket.socket()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    port = free_port()
    rules = [{"filters": [mirror_filter("stuck")], "backendRefs": [backend_ref("a")]}]
    body = os.urandom(256 * 1024) * 128
    digest = hashlib.sha256(body).hexdigest()
    try:
        table = l7_table([route("r", port, rules)], {"a": [web_a.port], "stuck": [sink.getsockname()[1]]})
        async with serving(table) as dp:
            listener: Any = dp.listeners[port]
            held: list[int] = []

            async def upload() -> None:
                async with client.post(f"http://127.0.0.1:{port}/big", data=body) as resp:
                    assert resp.status == 200
                    assert echoed(await resp.read())["body_sha256"] == digest

            async def others() -> int:
                served = 0
                while not uploads.done():
                    async with client.get(f"http://127.0.0.1:{port}/small") as resp:
                        assert resp.status == 200
                        served += 1
                    held.append(listener.mirror_held)
                return served

            uploads = asyncio.ensure_future(asyncio.gather(upload(), upload(), upload()))
            served = await others()
            await uploads
            assert served > 0
            # The big copies were dropped (the small ones may have been sent or dropped).
            counts = copies_of(dp, "default/stuck:80")
            assert counts["dropped"] >= 3 and counts["answered"] == 0
            assert max(held) <= 1536 * 1024 + 256 * 1024  # the budget, and at most one read over it
            await eventually(lambda: listener.mirror_copies == 0, "no copy left")  # they time out
            assert listener.mirror_held == 0
            # Every request made one copy, and every copy ended with exactly one result.
            assert sum(copies_of(dp, "default/stuck:80").values()) == served + 3
    finally:
        sink.close()


async def test_shares_several_mirrors_and_mirrors_on_a_backend(
    web_a: HTTPBackend, web_b: HTTPBackend, mirror: Mirror, client: aiohttp.ClientSession
) -> None:
    second = await Mirror().start()
    port = free_port()
    on_b = {**backend_ref("b"), "filters": [mirror_filter("m2")]}
    rules = [
        {
            "filters": [
                mirror_filter("m", percent=25),
                mirror_filter("m2", fraction={"numerator": 1, "denominator": 1}),
            ],
            "backendRefs": [backend_ref("a"), on_b],
        }
    ]
    backends = {"a": [web_a.port], "b": [web_b.port], "m": [mirror.port], "m2": [second.port]}
    try:
        async with serving(l7_table([route("r", port, rules)], backends)):
            for i in range(400):
                async with client.get(f"http://127.0.0.1:{port}/n{i}") as resp:
                    assert resp.status == 200
            # m2: every request from the rule, and again every request sent to b (half).
            await eventually(lambda: len(second.copies) == 600, "600 copies at m2")
            # m: 25 % of 400, within six standard deviations (8.7 each).
            await asyncio.sleep(0)  # (copies to m are counted as they arrive; bounded below)
            await eventually(lambda: len(mirror.copies) >= 48, "the share of copies at m")
            assert 48 <= len(mirror.copies) <= 152
    finally:
        await second.stop()


async def test_a_client_that_gives_up_mid_body_drops_the_copy(web_a: HTTPBackend, mirror: Mirror) -> None:
    port = free_port()
    rules = [{"filters": [mirror_filter("m")], "backendRefs": [backend_ref("a")]}]
    table = l7_table([route("r", port, rules)], {"a": [web_a.port], "m": [mirror.port]})
    # The abort closes a socket with nothing unread: a FIN in the middle of the body, which
    # ends the exchange at once (test_l7_protocol.py has the half-close on its own).
    async with serving(table) as dp:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"y" * 30000)
        await writer.drain()
        await eventually(lambda: dp.listeners[port].mirror_copies == 1, "a copy in flight")  # type: ignore[attr-defined]
        writer.transport.abort()
        await eventually(lambda: copies_of(dp, "default/m:80").get("dropped") == 1, "the copy dropped")
        assert mirror.copies == []
