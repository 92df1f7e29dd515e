"""TLS to backends (BackendTLSPolicy semantics): the certificate verified against the
cluster's CA bundle and its serverName (also the SNI sent), refused otherwise unless
insecureSkipVerify says so; ALPN picks HTTP/2 or HTTP/1.1 as the server chooses."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from dataplane.l7.dial import dial_for
from dataplane.table import Cluster

from .h2backend import H2Backend
from .helpers import free_port
from .l7kit import HTTPBackend, echoed, serving
from .test_l7_upstream_h2 import ask, h2_table

NAME = "backend.internal"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(NAME)


def server_context(
    cert: trustme.LeafCert, alpn: list[str], names: list[str | None] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    context.set_alpn_protocols(alpn)
    if names is not None:
        context.sni_callback = lambda _obj, name, _ctx: names.append(name)  # type: ignore[assignment, func-returns-value]
    return context


def tls(ca: trustme.CA, server_name: str = NAME, **extra: Any) -> dict[str, Any]:
    return {"serverName": server_name, "caCertificates": ca.cert_pem.bytes().decode(), **extra}


@pytest.fixture
def quiet_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level("WARNING", logger="bilayer.dataplane")
    yield caplog


async def test_a_verified_http1_backend_over_tls(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    names: list[str | None] = []
    backend = await HTTPBackend("tls").start(ssl_context=server_context(cert, ["http/1.1"], names))
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port, protocol="http/1.1", tls=tls(ca))):
            for _ in range(2):  # the second on the pooled TLS connection
                status, _, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
                assert status == 200, body
                assert echoed(body)["header_map"]["host"] == "app"
    finally:
        await backend.stop()
    assert names == [NAME]  # one handshake, with the serverName as SNI
    assert backend.calls["/x"] == 2


@pytest.mark.parametrize(
    ("case", "why"),
    [("wrong_ca", "certificate verify failed"), ("wrong_name", "certificate verify failed")],
)
async def test_a_backend_that_fails_verification_is_refused(
    ca: trustme.CA, cert: trustme.LeafCert, quiet_logs: pytest.LogCaptureFixture, case: str, why: str
) -> None:
    settings = tls(trustme.CA()) if case == "wrong_ca" else tls(ca, "other.internal")
    backend = await HTTPBackend("tls").start(ssl_context=server_context(cert, ["http/1.1"]))
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port, protocol="http/1.1", tls=settings)) as dataplane:
            status, _, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
            stats = next(iter(dataplane.listeners[port].config.clusters.values())).stats  # type: ignore[attr-defined]
            assert stats.connect_failures == 1
    finally:
        await backend.stop()
    assert status == 503
    assert why in body.decode()
    assert backend.calls == {}
    assert any("backend TLS handshake failed" in r.getMessage() for r in quiet_logs.records)


async def test_insecure_skip_verify_accepts_any_certificate(cert: trustme.LeafCert) -> None:
    settings = tls(trustme.CA(), "anything", insecureSkipVerify=True)
    backend = await HTTPBackend("tls").start(ssl_context=server_context(cert, ["http/1.1"]))
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port, protocol="http/1.1", tls=settings)):
            status, _, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
    finally:
        await backend.stop()
    assert status == 200, body


async def test_alpn_auto_speaks_h2_to_an_h2_server(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    backend = await H2Backend(context=server_context(cert, ["h2", "http/1.1"])).start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port, protocol="auto", tls=tls(ca))):
            status, _, body = await ask(port, b"GET /y HTTP/1.1\r\nHost: app\r\n\r\n")
    finally:
        await backend.stop()
    assert status == 200, body
    seen = json.loads(body)
    assert seen["scheme"] == "https" and seen["authority"] == "app"


async def test_alpn_auto_speaks_http1_to_an_http1_only_server(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    backend = await HTTPBackend("tls1").start(ssl_context=server_context(cert, ["http/1.1"]))
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port, protocol="auto", tls=tls(ca))):
            status, _, body = await ask(port, b"GET /z HTTP/1.1\r\nHost: app\r\n\r\n")
    finally:
        await backend.stop()
    assert status == 200, body
    assert echoed(body)["backend"] == "tls1"


def test_ssl_contexts_are_made_once_per_tls_settings(ca: trustme.CA) -> None:
    pem = ca.cert_pem.bytes().decode()
    one = Cluster.model_validate({"protocol": "h2", "tls": {"serverName": NAME, "caCertificates": pem}})
    two = Cluster.model_validate({"protocol": "h2", "tls": {"serverName": NAME, "caCertificates": pem}})
    other = Cluster.model_validate({"protocol": "auto", "tls": {"serverName": NAME, "caCertificates": pem}})
    assert dial_for(one) is dial_for(two)
    assert dial_for(one).ssl is not None and dial_for(one).ssl is dial_for(two).ssl
    assert dial_for(other) is not dial_for(one)
    assert dial_for(other).alpn == ["h2", "http/1.1"]
