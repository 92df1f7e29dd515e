"""Building blocks for L7 tests: an aiohttp backend with test handlers, raw HTTP clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import yaml
from aiohttp import WSMsgType, web

from controlplane.compiler import Snapshot, compile_snapshot
from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table

from .helpers import free_port, service


class HTTPBackend:
    """An aiohttp server with handlers that report what they received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.calls: dict[str, int] = {}
        self.peers: set[tuple[str, int]] = set()

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> HTTPBackend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_route("*", "/flaky/{failures}", self.flaky)
        app.router.add_get("/slow/{ms}", self.slow)
        app.router.add_get("/big/{size}", self.big)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/reset", self.reset)
        app.router.add_get("/ws", self.websocket)
        app.router.add_route("*", "/{prefix:.*}cors-aware", self.cors_aware)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        # Stopped when a test is done: a handler still running then (a /slow/ whose client
        # went away) is cancelled after a moment, not waited for (aiohttp's default: 60 s).
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        self.port = port or free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ssl_context).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _count(self, request: web.Request) -> int:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add((peer[0], peer[1]))
        self.calls[request.path] = self.calls.get(request.path, 0) + 1
        return self.calls[request.path]

    async def echo(self, request: web.Request) -> web.Response:
        self._count(request)
        body = await request.read()
        report = {
            "backend": self.name,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        return web.json_response(report, headers={"x-backend": self.name, "x-remove-me": "1"})

    async def cors_aware(self, request: web.Request) -> web.Response:
        """A backend with its own CORS answer and a cookie, to see what the proxy does with them."""
        self._count(request)
        headers = {"access-control-allow-origin": "*", "x-backend": self.name}
        response = web.Response(text=self.name, headers=headers)
        response.headers.add("set-cookie", "backend=1")
        return response

    async def status(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(status=int(request.match_info["code"]), text=self.name)

    async def flaky(self, request: web.Request) -> web.Response:
        count = self._count(request)
        await request.read()
        if count <= int(request.match_info["failures"]):
            return web.Response(status=503, text="not yet")
        return web.Response(text=f"ok after {count}")

    async def slow(self, request: web.Request) -> web.Response:
        self._count(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text="slow")

    async def big(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"content-length": str(size)})
        await response.prepare(request)
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(f"part {i}\n".encode())
        await response.write_eof()
        return response

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"content-length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
        return ws


def secret(name: str, cert: Any) -> str:
    """A kubernetes.io/tls Secret holding a trustme certificate."""
    data = {
        "tls.crt": base64.b64encode(cert.cert_chain_pems[0].bytes()).decode(),
        "tls.key": base64.b64encode(cert.private_key_pem.bytes()).decode(),
    }
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": "default"},
            "type": "kubernetes.io/tls",
            "data": data,
        }
    )


def route(name: str, port: int, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": name, "namespace": "default", **spec.pop("metadata", {})},
        "spec": {"port": port, "rules": rules, **spec},
    }


def backend_ref(name: str, weight: int = 1) -> dict[str, Any]:
    return {"name": name, "port": 80, "weight": weight}


def l7_table(
    routes: list[dict[str, Any]], backends: dict[str, list[int]], generation: int = 1, extra: str = ""
) -> Table:
    services = "---\n".join(
        service(name, 80, [("127.0.0.1", p) for p in ports]) for name, ports in backends.items()
    )
    documents = [d for d in yaml.safe_load_all(services + "\n---\n" + extra) if d] + routes
    compiled = compile_snapshot(Snapshot.of(documents), generation)
    for key, conditions in compiled.statuses.items():
        assert conditions[0].status == "True", (key, conditions[0].message)
    return compiled.table


@asynccontextmanager
async def serving(table: Table, **settings: Any) -> AsyncIterator[Dataplane]:
    dataplane = Dataplane(Settings(**{"address": "127.0.0.1", "access_log": False, **settings}))
    await dataplane.apply(table)
    assert not dataplane.listener_errors, dataplane.listener_errors
    try:
        yield dataplane
    finally:
        await dataplane.close(0)


async def raw(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send data, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length or chunked body, from a keep-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = b""
    return status, headers, body


def echoed(body: bytes) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(body)
    report["header_map"] = {k: v for k, v in report["headers"]}
    return report
