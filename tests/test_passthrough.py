"""TLS passthrough routed by SNI, over real sockets: backends terminate TLS with their own
certificates (trustme), clients are Python's ssl and `openssl s_client`, and the bytes,
ClientHello included, reach the backend untouched."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from dataplane.l4.listener import ServingL4

from .helpers import async_wait_for, free_port
from .l4kit import Backend, objects_table, refs, running_dataplane, services_yaml
from .tlskit import TLSBackend, client_hello, hello_in_records


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def backends(ca: trustme.CA) -> AsyncIterator[dict[str, TLSBackend]]:
    started = {
        "a": await TLSBackend("a", ca.issue_cert("a.example.com")).start(),
        "b": await TLSBackend("b", ca.issue_cert("b.example.com", "*.b.example.com")).start(),
    }
    yield started
    for backend in started.values():
        await backend.stop()


def sni_table(
    port: int, backends: dict[str, TLSBackend], default: int | None = None, **extra: object
) -> object:
    ports = {name: [b.port] for name, b in backends.items()}
    listeners: dict[str, dict[str, object]] = {
        "a": {"port": port, "hostnames": ["a.example.com"], "backendRefs": refs("a"), **extra},
        "b": {"port": port, "hostnames": ["b.example.com", "*.b.example.com"], "backendRefs": refs("b")},
    }
    if default is not None:
        ports["plain"] = [default]
        listeners["fallback"] = {"port": port, "backendRefs": refs("plain")}
    return objects_table(listeners, services_yaml(ports))


async def tls_name(port: int, ca: trustme.CA, server_name: str) -> tuple[str, str]:
    """Connect through the proxy with SNI server_name; what the backend said, and the
    subjectAltName of the certificate the client verified."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    said = (await asyncio.wait_for(reader.readline(), 10)).decode().strip().removeprefix("hello from ")
    cert = writer.get_extra_info("peercert")
    writer.close()
    names = ",".join(value for _, value in cert["subjectAltName"])
    return said, names


async def test_each_name_reaches_its_backend_with_its_own_certificate(
    ca: trustme.CA, backends: dict[str, TLSBackend]
) -> None:
    port = free_port()
    async with running_dataplane() as dp:
        await dp.apply(sni_table(port, backends))  # type: ignore[arg-type]
        assert await tls_name(port, ca, "a.example.com") == ("a", "a.example.com")
        assert await tls_name(port, ca, "b.example.com") == ("b", "b.example.com,*.b.example.com")
        assert (await tls_name(port, ca, "deep.b.example.com"))[0] == "b"  # the wildcard
        # The backend terminated TLS: it saw the SNI the client sent.
        assert backends["b"].server_names[-1] == "deep.b.example.com"
        # No listener for this name and no default: closed, counted.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await tls_name(port, ca, "c.example.com")
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        assert serving.rejected["no_route"] == 1


async def test_openssl_s_client_by_servername(
    ca: trustme.CA, backends: dict[str, TLSBackend], tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: `apt-get install openssl` (.ci/run does it)", pytrace=False)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    async with running_dataplane() as dp:
        await dp.apply(sni_table(port, backends))  # type: ignore[arg-type]
        for name, expected in (("a.example.com", "a"), ("b.example.com", "b")):
            process = await asyncio.create_subprocess_exec(
                openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                "-CAfile", str(ca_file), "-verify_hostname", name, "-verify_return_error",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            assert process.stdout is not None and process.stdin is not None
            text = ""
            while f"hello from {expected}" not in text:  # s_client prints what the server sends
                line = await asyncio.wait_for(process.stdout.readline(), 20)
                assert line, text
                text += line.decode(errors="replace")
            process.stdin.close()  # s_client ends at the end of its input
            text += (await asyncio.wait_for(process.stdout.read(), 20)).decode(errors="replace")
            await process.wait()
            assert f"Verified peername: {name}" in text, text
            assert "Verify return code: 0 (ok)" in text, text


async def test_no_sni_and_unknown_names_go_to_the_default(
    ca: trustme.CA, backends: dict[str, TLSBackend]
) -> None:
    plain = await Backend("default").start()
    port = free_port()
    async with running_dataplane() as dp:
        await dp.apply(sni_table(port, backends, default=plain.port))  # type: ignore[arg-type]
        for hello in (client_hello(None), client_hello("unknown.example.com")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            # The default backend echoes: it got the hello byte for byte.
            assert (await asyncio.wait_for(reader.readline(), 10)) == b"default\n"
            assert await asyncio.wait_for(reader.readexactly(len(hello)), 10) == hello
            writer.close()
        assert await tls_name(port, ca, "a.example.com") == ("a", "a.example.com")
    await plain.stop()


async def test_a_hello_split_across_records_and_segments_arrives_untouched() -> None:
    sink = await Backend("sink").start()
    port = free_port()
    table = objects_table(
        {"s": {"port": port, "hostnames": ["split.example.com"], "backendRefs": refs("sink")}},
        services_yaml({"sink": [sink.port]}),
    )
    hello = hello_in_records(client_hello("split.example.com"), record_size=37)
    async with running_dataplane() as dp:
        await dp.apply(table)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(0, len(hello), 11):  # 11-byte segments, each sent on its own
            writer.write(hello[i : i + 11])
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(b"after the hello")
        assert (await asyncio.wait_for(reader.readline(), 10)) == b"sink\n"
        echoed = await asyncio.wait_for(reader.readexactly(len(hello) + 15), 10)
        assert echoed == hello + b"after the hello"
        writer.close()
    await sink.stop()


@pytest.mark.parametrize(
    ("opening", "reason"),
    [
        (b"\x80\x2e\x01\x03\x01" + b"\x00" * 40, "bad_hello"),  # SSLv2-style hello
        (b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n", "bad_hello"),  # not TLS at all
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad_hello"),  # a ServerHello
        (b"\x16\x03\x01\x40\x00", "hello_timeout"),  # a record that never comes
    ],
)
async def test_garbage_and_stalled_hellos_are_refused(
    opening: bytes, reason: str, backends: dict[str, TLSBackend]
) -> None:
    port = free_port()
    async with running_dataplane(header_timeout=0.5) as dp:
        await dp.apply(sni_table(port, backends))  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        assert serving.rejected[reason] == 1
        assert all(b.connections == 0 for b in backends.values())  # no backend was asked


async def test_a_hello_over_16_kib_is_refused(backends: dict[str, TLSBackend]) -> None:
    port = free_port()
    async with running_dataplane() as dp:
        await dp.apply(sni_table(port, backends))  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A handshake message announcing 20 KiB, sent in full records.
        body = b"\x01" + (20 * 1024).to_bytes(3, "big") + b"\x00" * (20 * 1024)
        writer.write(hello_in_records(body, record_size=4096))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        assert serving.rejected["bad_hello"] == 1


async def test_stalled_hellos_do_not_keep_others_from_being_served(
    ca: trustme.CA, backends: dict[str, TLSBackend]
) -> None:
    """200 connections sending one byte of a hello and nothing more: a real client is
    served meanwhile, and the stalled ones are closed after the hello timeout."""
    port = free_port()
    async with running_dataplane(header_timeout=1.0) as dp:
        await dp.apply(sni_table(port, backends))  # type: ignore[arg-type]
        stalled = []
        for _ in range(200):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16")
            stalled.append(writer)
        for _ in range(5):
            assert (await tls_name(port, ca, "a.example.com"))[0] == "a"
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        await async_wait_for(
            lambda: serving.rejected["hello_timeout"] == 200, 10, what="the stalled hellos closed"
        )
        assert not serving.connections
        for writer in stalled:
            writer.close()


async def test_proxy_protocol_in_front_of_passthrough(haproxy_tls_parser: tuple[int, trustme.CA]) -> None:
    """HAProxy terminates TLS after reading our PROXY header: it reports the client's
    own address, and its certificate is the one the client verified."""
    hap_port, hap_ca = haproxy_tls_parser
    port = free_port()
    table = objects_table(
        {
            "hap": {
                "port": port,
                "hostnames": ["hap.example.com"],
                "backendRefs": refs("hap"),
                "proxyProtocol": "V2",
            }
        },
        services_yaml({"hap": [hap_port]}),
    )
    async with running_dataplane() as dp:
        await dp.apply(table)
        context = ssl.create_default_context()
        hap_ca.configure_trust(context)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="hap.example.com"
        )
        local = writer.get_extra_info("sockname")
        writer.write(b"GET / HTTP/1.0\r\nHost: hap.example.com\r\n\r\n")
        response = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
    assert response.endswith(f"{local[0]}:{local[1]} -> 127.0.0.1:{port}\n"), response
