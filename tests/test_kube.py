"""The API client against a fake API server that misbehaves: 429, 401, 5xx, pages."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from controlplane.kube import Credentials, KubeClient, KubeError

from .helpers import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_api() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_429_with_retry_after_is_retried_after_that_delay(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    """The first LIST of a custom resource right after its CRD is created answers 429
    "storage is (re)initializing", Retry-After: 1. Before, the operator's start failed and
    kopf ran it again 60 s later."""
    calls: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.json_response(
                {"message": "storage is (re)initializing"}, status=429, headers={"Retry-After": "1"}
            )
        return web.json_response(
            {"items": [{"metadata": {"name": "a"}}], "metadata": {"resourceVersion": "7"}}
        )

    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        items, version = await client.list("/apis/bilayer.dev/v1alpha1/l7routes")
    finally:
        await client.close()
    assert [i["metadata"]["name"] for i in items] == ["a"] and version == "7"
    assert 0.9 < calls[1] - calls[0] < 3
    assert client.throttled == 1


async def test_lists_are_paginated(fake_api: Callable[[Handler], Awaitable[str]]) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        page = int(request.query.get("continue", "0"))
        more = {"continue": str(page + 1)} if page < 2 else {}
        return web.json_response({"items": [{"n": page}], "metadata": {"resourceVersion": "9", **more}})

    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        items, _ = await client.list("/api/v1/secrets", {"fieldSelector": "type=kubernetes.io/tls"})
    finally:
        await client.close()
    assert [i["n"] for i in items] == [0, 1, 2]
    assert all(q["limit"] == "500" and q["fieldSelector"] == "type=kubernetes.io/tls" for q in seen)


async def test_a_401_reads_the_token_file_again_and_retries_once(
    fake_api: Callable[[Handler], Awaitable[str]], tmp_path: Path
) -> None:
    """The kubelet rotates the projected token; a client that read it once fails an hour later."""
    tokens: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        tokens.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "Bearer new":
            return web.json_response({"message": "Unauthorized"}, status=401)
        return web.json_response({"metadata": {"name": "x"}})

    token_file = tmp_path / "token"
    token_file.write_text("old")
    client = KubeClient(Credentials(server=await fake_api(handler), token="old", token_file=str(token_file)))
    try:
        with pytest.raises(KubeError) as refused:  # the file still holds the old token: no loop
            await client.get("/api/v1/namespaces/a")
        assert refused.value.status == 401 and tokens == ["Bearer old"]
        token_file.write_text("new\n")
        assert await client.get("/api/v1/namespaces/a") == {"metadata": {"name": "x"}}
        assert tokens[1:] == ["Bearer old", "Bearer new"] and client.token_reloads == 1
    finally:
        await client.close()


async def test_server_errors_and_dropped_connections_are_retried(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response({"message": "etcd leader changed"}, status=500)
        if calls == 2:
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-request
            return web.Response()
        return web.json_response({"ok": True})

    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        assert await client.patch("/apis/x", {"status": {}}) == {"ok": True}
    finally:
        await client.close()
    assert calls == 3 and client.retries == 2


async def test_the_rate_limit_spaces_calls_beyond_the_burst(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    client = KubeClient(Credentials(server=await fake_api(handler)), qps=20, burst=5)
    try:
        started = time.monotonic()
        for _ in range(15):  # 5 at once, then 10 at 20 a second
            await client.get("/api/v1/x")
        took = time.monotonic() - started
    finally:
        await client.close()
    assert 0.4 < took < 2.0, took


async def test_watch_events_larger_than_the_limit_are_refused(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    from controlplane import kube

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"type": "ADDED", "object": {"a": 1}}\n')
        await response.write(b'{"type": "ADDED", "object": "' + b"x" * 4096)  # no end of line
        return response

    client = KubeClient(Credentials(server=await fake_api(handler)))
    limit = kube.MAX_EVENT_BYTES
    kube.MAX_EVENT_BYTES = 1024
    try:
        events = []
        with pytest.raises(KubeError, match="larger than 1024 bytes"):
            async for event in client.watch("/api/v1/pods", "1"):
                events.append(event)
        assert events == [{"type": "ADDED", "object": {"a": 1}}]
    finally:
        kube.MAX_EVENT_BYTES = limit
        await client.close()


async def test_a_watch_refused_with_429_says_how_long_to_wait(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"message": "too many requests"}, status=429, headers={"Retry-After": "2"})

    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        with pytest.raises(KubeError) as refused:
            async for _ in client.watch("/api/v1/pods", "1"):
                pass
        assert (
            refused.value.status == 429 and refused.value.retry_after == 2.0
        )  # the informer waits that long
    finally:
        await client.close()


async def test_every_attempt_of_a_retried_write_carries_its_content_type(
    fake_api: Callable[[Handler], Awaitable[str]],
) -> None:
    """A write retried after a dropped connection went without its Content-Type (the
    headers were put back only when the request did not raise), and the real API server
    answers such a PATCH 415."""
    content_types: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        content_types.append(request.headers.get("Content-Type"))
        if len(content_types) == 1:
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-request
            return web.Response()
        if len(content_types) == 2:
            return web.json_response({"message": "etcd leader changed"}, status=500)
        if request.headers.get("Content-Type") != "application/merge-patch+json":
            return web.json_response({"message": "unsupported media type"}, status=415)
        return web.json_response({"ok": True})

    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        assert await client.patch("/apis/x", {"status": {}}) == {"ok": True}
    finally:
        await client.close()
    assert content_types == ["application/merge-patch+json"] * 3


async def test_429_after_the_last_retry_says_how_long_to_wait_and_retry_after_0_is_not_immediate(
    fake_api: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the retries run out, the caller (an informer) must still know the server's
    Retry-After; and `Retry-After: 0` must not turn the retries into a busy loop."""
    from controlplane import kube

    calls: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        wait = "0" if len(calls) < 3 else "2"
        return web.json_response({"message": "too many requests"}, status=429, headers={"Retry-After": wait})

    monkeypatch.setattr(kube, "RETRIES", 2)
    client = KubeClient(Credentials(server=await fake_api(handler)))
    try:
        with pytest.raises(KubeError) as refused:
            await client.get("/api/v1/pods")
    finally:
        await client.close()
    assert refused.value.status == 429 and refused.value.retry_after == 2.0
    assert len(calls) == 3
    # Retry-After: 0 waits a floor (0.2 s), not nothing.
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(calls)), calls


def test_credentials_never_show_their_secrets_in_a_repr() -> None:
    """A repr reaches logs (an exception's locals, a debug line): no token, no key."""
    credentials = Credentials(
        server="https://api:6443",
        token="s3cret-token",
        certificate_data=b"CERT-DATA",
        private_key_data=b"PRIVATE-KEY-DATA",
    )
    text = repr(credentials)
    assert "https://api:6443" in text
    assert "s3cret-token" not in text and "PRIVATE-KEY-DATA" not in text


async def test_with_a_cluster_ca_only_that_ca_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's CA is the one authority for the API server: a certificate from a
    CA the system trusts (here SSL_CERT_FILE plays the system store) must not do."""
    import asyncio
    import ssl

    import trustme

    cluster_ca, system_ca = trustme.CA(), trustme.CA()
    system_file = tmp_path / "system.pem"
    system_ca.cert_pem.write_to_path(str(system_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))
    cluster_file = tmp_path / "cluster.pem"
    cluster_ca.cert_pem.write_to_path(str(cluster_file))

    async def handshake(issuer: trustme.CA) -> bool:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        issuer.issue_cert("localhost").configure_cert(server_context)
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        context = Credentials(server=f"https://localhost:{port}", ca_path=str(cluster_file)).ssl_context()
        assert isinstance(context, ssl.SSLContext)
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
            writer.close()
            return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            server.close()

    assert await handshake(cluster_ca)
    assert not await handshake(system_ca)
