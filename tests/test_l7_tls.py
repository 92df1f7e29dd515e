"""TLS termination: certificates by SNI, TLS 1.2+, certificate changes without a restart."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from dataplane.table import TableError

from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, read_response, route, secret, serving


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def web() -> AsyncIterator[HTTPBackend]:
    backend = await HTTPBackend("a").start()
    yield backend
    await backend.stop()


def tls_table(
    port: int, web: HTTPBackend, secrets: dict[str, trustme.LeafCert], generation: int = 1
) -> object:
    routes = [
        route(
            "shop",
            port,
            [{"backendRefs": [backend_ref("a")]}],
            hostnames=["shop.example.com"],
            tls={"secretName": "shop"},
            metadata={"creationTimestamp": "2026-01-01T00:00:00Z"},
        ),
        route(
            "wild",
            port,
            [{"backendRefs": [backend_ref("a")]}],
            hostnames=["*.api.test"],
            tls={"secretName": "wild"},
            metadata={"creationTimestamp": "2026-02-01T00:00:00Z"},
        ),
    ]
    extra = "---\n".join(secret(name, cert) for name, cert in secrets.items())
    return l7_table(routes, {"a": [web.port]}, generation, extra=extra)


async def fetch(
    port: int, ca: trustme.CA, server_name: str, *, version: ssl.TLSVersion | None = None
) -> tuple[str, dict[str, object]]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    peer = writer.get_extra_info("ssl_object").getpeercert()
    writer.write(f"GET /t HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
    _, _, body = await read_response(reader)
    writer.close()
    sans = [value for kind, value in peer["subjectAltName"]]  # type: ignore[union-attr]
    return sans[0], echoed(body)


async def test_sni_picks_the_certificate(ca: trustme.CA, web: HTTPBackend) -> None:
    port = free_port()
    certs = {"shop": ca.issue_cert("shop.example.com"), "wild": ca.issue_cert("*.api.test")}
    async with serving(tls_table(port, web, certs)):  # type: ignore[arg-type]
        name, seen = await fetch(port, ca, "shop.example.com")
        assert name == "shop.example.com"
        assert seen["header_map"]["x-forwarded-proto"] == "https"
        name, _ = await fetch(port, ca, "v1.api.test")
        assert name == "*.api.test"


async def test_old_tls_versions_are_refused(ca: trustme.CA, web: HTTPBackend) -> None:
    port = free_port()
    certs = {"shop": ca.issue_cert("shop.example.com"), "wild": ca.issue_cert("*.api.test")}
    async with serving(tls_table(port, web, certs)):  # type: ignore[arg-type]
        await fetch(port, ca, "shop.example.com", version=ssl.TLSVersion.TLSv1_2)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await fetch(port, ca, "shop.example.com", version=ssl.TLSVersion.TLSv1_1)


async def test_certificate_change_applies_without_restart(ca: trustme.CA, web: HTTPBackend) -> None:
    port = free_port()
    first = {"shop": ca.issue_cert("shop.example.com"), "wild": ca.issue_cert("*.api.test")}
    async with serving(tls_table(port, web, first, 1)) as dp:  # type: ignore[arg-type]
        listener = dp.listeners[port]
        renewed = {"shop": ca.issue_cert("shop.example.com", "www.shop.example.com"), "wild": first["wild"]}
        await dp.apply(tls_table(port, web, renewed, 2))  # type: ignore[arg-type]
        assert dp.listeners[port] is listener  # same socket, new certificate
        context = ssl.create_default_context()
        ca.configure_trust(context)
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="shop.example.com"
        )
        sans = [v for _, v in writer.get_extra_info("ssl_object").getpeercert()["subjectAltName"]]
        writer.close()
        assert "www.shop.example.com" in sans


async def test_a_certificate_that_does_not_load_refuses_the_table(ca: trustme.CA, web: HTTPBackend) -> None:
    port = free_port()
    certs = {"shop": ca.issue_cert("shop.example.com"), "wild": ca.issue_cert("*.api.test")}
    good = tls_table(port, web, certs, 1)
    async with serving(good) as dp:  # type: ignore[arg-type]
        document = good.model_copy(deep=True)  # type: ignore[attr-defined]
        broken_cert = (
            document.listeners[port].l7.tls.certificates[0].model_copy(update={"keyPem": "not a key"})
        )
        tls = document.listeners[port].l7.tls.model_copy(update={"certificates": [broken_cert]})
        l7 = document.listeners[port].l7.model_copy(update={"tls": tls})
        listeners = {port: document.listeners[port].model_copy(update={"l7": l7})}
        bad = document.model_copy(update={"listeners": listeners, "version": ""}).stamped(2)
        with pytest.raises(TableError, match="does not load"):
            await dp.apply(bad)
        assert dp.table == good
        name, _ = await fetch(port, ca, "shop.example.com")
        assert name == "shop.example.com"
