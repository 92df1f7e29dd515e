"""HTTP/2 from clients: ALPN h2 and h2c prior knowledge, streams as exchanges (routing,
filters, bodies both ways, access log, metrics), flow control with bounded memory,
GOAWAY on drain, the listener's switch, real clients (curl, h2load), h2spec, and the
defences the HTTP/2 CVEs call for."""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import h2.errors
import h2.events
import h2.settings
import pytest
import trustme
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame

from dataplane import delta
from dataplane.l7 import h2server
from dataplane.l7.h2server import H2Client
from dataplane.l7.listener import ServingL7
from dataplane.runtime import Dataplane
from dataplane.table import Table

from .h2kit import H2Probe, frames, get, h2spec, poll, tool
from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, route, secret, serving

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def web() -> AsyncIterator[HTTPBackend]:
    backend = await HTTPBackend("a").start()
    yield backend
    await backend.stop()


def plain_table(port: int, web: HTTPBackend, **spec: Any) -> Table:
    rules: list[dict[str, Any]] = [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
            "filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}}],
        },
        {
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"add": [{"name": "x-added", "value": "1"}]},
                },
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["x-remove-me"]}},
            ],
            "backendRefs": [backend_ref("a")],
        },
    ]
    return l7_table([route("r", port, rules, hostnames=["h2.test"], **spec)], {"a": [web.port]})


def tls_table(port: int, web: HTTPBackend, ca: trustme.CA) -> Table:
    cert = ca.issue_cert("h2.test")
    rules = [{"backendRefs": [backend_ref("a")]}]
    made = route("r", port, rules, hostnames=["h2.test"], tls={"secretName": "s"})
    return l7_table([made], {"a": [web.port]}, extra=secret("s", cert))


def client_context(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(alpn)
    return context


def switched(table: Table, port: int, http2: bool) -> Table:
    """The same table with the listener's http2 switch set (a new generation)."""
    listener = table.listeners[port]
    assert listener.l7 is not None
    l7 = listener.l7.model_copy(update={"http2": http2})
    listeners = {**table.listeners, port: listener.model_copy(update={"l7": l7})}
    changed = table.model_copy(update={"listeners": listeners, "generation": table.generation + 1})
    return changed.model_copy(update={"version": changed.content_version()})


def h2_connections(dp: Dataplane, port: int) -> list[H2Client]:
    serving_l7 = dp.listeners[port]
    assert isinstance(serving_l7, ServingL7)
    return [c for c in serving_l7.connections if isinstance(c, H2Client)]


# --- streams as exchanges ---


async def test_h2c_streams_route_filter_and_carry_bodies_both_ways(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        status, headers, body = await get(probe, "/a/../echo?q=1", headers=[("te", "trailers")])
        report = echoed(body)
        assert status == 200
        assert report["path"] == "/echo?q=1"  # :path normalized as HTTP/1.1 paths are
        assert report["header_map"]["host"] == "h2.test"  # :authority became Host
        assert report["header_map"]["x-added"] == "1"
        assert report["header_map"]["x-forwarded-proto"] == "http"
        assert "te" not in report["header_map"]  # hop-by-hop: not forwarded to HTTP/1.1
        assert b"x-remove-me" not in headers and headers[b"x-backend"] == b"a"
        # A body with a content-length, and one without (forwarded chunked), on one connection.
        data = bytes(range(256)) * 1000
        for extra in ([("content-length", str(len(data)))], []):
            status, _, body = await get(probe, "/up", method="POST", headers=extra, body=data)
            report = echoed(body)
            assert status == 200 and report["body_length"] == len(data)
            assert report["body_sha256"] == hashlib.sha256(data).hexdigest()
        # A streamed (chunked) response, a local answer, a redirect, no route.
        assert (await get(probe, "/chunked"))[2] == b"".join(b"part %d\n" % i for i in range(5))
        status, headers, _ = await get(probe, "/old/x")
        assert status == 301 and headers[b"location"].startswith(b"http://h2.test")
        assert (await get(probe, "/", authority="other.test"))[0] == 404
        # A big body through the client's windows.
        status, _, body = await get(probe, "/big/3000000")
        assert status == 200 and len(body) == 3_000_000
        assert probe.goaway() is None
        await probe.close()


async def test_rate_limit_retry_and_timeout_apply_to_streams(web: HTTPBackend) -> None:
    port = free_port()
    rules: list[dict[str, Any]] = [
        {
            "matches": [{"path": {"value": "/limited"}}],
            "rateLimit": {"requests": 1, "unit": "Hour"},
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
            "retry": {"attempts": 3, "codes": [503], "backoff": "1ms"},
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
            "timeouts": {"request": "100ms"},
            "backendRefs": [backend_ref("a")],
        },
    ]
    async with serving(l7_table([route("r", port, rules, hostnames=["h2.test"])], {"a": [web.port]})):
        probe = await H2Probe.open(port)
        assert (await get(probe, "/limited"))[0] == 200
        status, headers, _ = await get(probe, "/limited")
        assert status == 429 and b"retry-after" in headers
        status, _, body = await get(probe, "/flaky/2")
        assert (status, body) == (200, b"ok after 3")
        assert (await get(probe, "/slow/2000"))[0] == 504
        assert probe.goaway() is None
        await probe.close()


async def test_a_small_response_is_one_data_frame_carrying_the_end(web: HTTPBackend) -> None:
    """Body and end from one backend read: one DATA frame with END_STREAM, not DATA and then
    an empty DATA (twice the frames for the client and for h2 to make)."""
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        sid = probe.request("/echo")
        await probe.until(lambda p: p.ended(sid))
        data = [e for e in probe.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid]
        assert len(data) == 1 and data[0].data and data[0].stream_ended is not None
        assert probe.response(sid)[0] == 200
        await probe.close()


def test_response_fields_do_what_h2s_outbound_normalization_did() -> None:
    """h2's outbound normalization and validation are off (for speed): _response_fields keeps
    what they guaranteed, or h2 would send fields a client must treat as malformed."""
    backend = [
        (b"Content-Type", b"text/plain"),
        (b"X-Padded", b" \tvalue\t "),  # RFC 9113 8.2.1: no surrounding whitespace
        (b"Connection", b"close"),  # connection-specific: never in HTTP/2
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"gzip"),
        (b"Upgrade", b"h2c"),
        (b":authority", b"x"),  # no pseudo-header but the caller's :status
        (b"Authorization", b"Bearer secret"),
        (b"Cookie", b"id=1"),
        (b"Cookie", b"long=" + b"x" * 40),
        (b"Empty", b""),
    ]
    fields = h2server._response_fields([(b":status", b"200")], backend)
    assert fields == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-padded", b"value"),
        (b"authorization", b"Bearer secret"),
        (b"cookie", b"id=1"),
        (b"cookie", b"long=" + b"x" * 40),
        (b"empty", b""),
    ]
    # Secrets stay out of HPACK's dynamic table (a compressed size cannot reveal them).
    never = [field for field in fields if isinstance(field, NeverIndexedHeaderTuple)]
    assert never == [(b"authorization", b"Bearer secret"), (b"cookie", b"id=1")]


async def test_malformed_heads_are_refused_per_stream(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        assert (await get(probe, "/%2e%2e/%zz"))[0] == 400  # the path rules of HTTP/1.1
        assert (await get(probe, "/x", authority="bad host"))[0] == 400
        status, _, body = await get(probe, "/x", headers=[("x_forwarded_for", "1.2.3.4")])
        assert status == 400 and b"'_'" in body
        assert (await get(probe, "/echo"))[0] == 200  # the connection goes on
        await probe.close()


async def test_access_log_and_metrics_name_the_protocol(
    web: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    async with serving(plain_table(port, web), access_log=True) as dp:
        with caplog.at_level("INFO", logger="bilayer.access"):
            probe = await H2Probe.open(port)
            await get(probe, "/logged", headers=[("user-agent", "probe/2")])
            await probe.close()
        lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
        assert lines[-1]["protocol"] == "HTTP/2" and lines[-1]["user_agent"] == "probe/2"
        assert lines[-1]["url"] == "http://h2.test/logged" and lines[-1]["status"] == 200
        serving_l7 = dp.listeners[port]
        assert isinstance(serving_l7, ServingL7)
        samples = {
            (s.labels.get("protocol"), s.name): s.value
            for family in ServingL7.collect([serving_l7])
            if family.name == "bilayer_l7_requests"
            for s in family.samples
        }
        assert samples[("HTTP/2", "bilayer_l7_requests_total")] == 1


async def test_alpn_h2_over_tls_and_the_switch_turns_both_off(web: HTTPBackend, ca: trustme.CA) -> None:
    port = free_port()
    table = tls_table(port, web, ca)
    async with serving(table) as dp:
        context = client_context(ca, ["h2", "http/1.1"])
        probe = await H2Probe.open(port, context=context, server_name="h2.test")
        assert probe.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        status, _, body = await get(probe, "/tls")
        assert status == 200 and echoed(body)["header_map"]["x-forwarded-proto"] == "https"
        # http2 off by a whole table: new handshakes offer http/1.1 only; the open
        # connection keeps its streams.
        assert await dp.apply(switched(table, port, False))
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="h2.test")
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
        assert (await get(probe, "/still"))[0] == 200
        await probe.close()
        # On again, by a delta.
        current = dp.table
        assert current is not None
        on = switched(current, port, True)
        assert await dp.apply_delta(delta.parse(delta.diff(current, on).to_json()))
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="h2.test")
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()


async def test_h2c_preface_is_http1_when_the_switch_is_off(web: HTTPBackend) -> None:
    """Off, the preface is what it was before HTTP/2: a malformed HTTP/1.1 request (llhttp
    stops at PRI: 400), answered in HTTP/1.1 and closed."""
    port = free_port()
    table = plain_table(port, web)
    async with serving(table) as dp:
        probe = await H2Probe.open(port)
        assert (await get(probe, "/on"))[0] == 200
        await probe.close()
        current = dp.table
        assert current is not None
        off = switched(current, port, False)
        assert await dp.apply_delta(delta.parse(delta.diff(current, off).to_json()))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(h2server.PREFACE)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(b"Pause on PRI/Upgrade\n")
        writer.close()


async def test_preface_split_across_reads_is_still_h2c(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        probe = H2Probe(reader, writer)
        probe.h2.initiate_connection()
        data = probe.h2.data_to_send()
        for piece in (data[:3], data[3:20], data[20:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        assert (await get(probe, "/split"))[0] == 200
        await probe.close()


# --- streams and connections ---


async def test_backend_cut_resets_only_its_stream(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        sid = probe.request("/reset")
        await probe.until(lambda p: p.ended(sid))
        assert probe.reset_code(sid) == h2.errors.ErrorCodes.INTERNAL_ERROR
        assert (await get(probe, "/after"))[0] == 200
        assert probe.goaway() is None
        await probe.close()


async def test_client_reset_cancels_the_exchange(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)) as dp:
        probe = await H2Probe.open(port)
        sid = probe.request("/slow/3000")
        await poll(lambda: web.calls.get("/slow/3000") == 1)
        probe.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        probe.flush()
        conn = h2_connections(dp, port)[0]
        await poll(lambda: not conn.streams)
        assert (await get(probe, "/after"))[0] == 200
        await probe.close()


async def test_max_concurrent_streams_refuses_the_one_over(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
        # Past the limit the client's own h2 would refuse to open streams: told otherwise.
        probe.h2.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
        probe.h2.remote_settings.acknowledge()
        sids = [probe.request("/slow/1500") for _ in range(h2server.MAX_STREAMS + 1)]
        await probe.until(lambda p: all(p.ended(s) for s in sids), 20)
        assert probe.reset_code(sids[-1]) == h2.errors.ErrorCodes.REFUSED_STREAM
        assert all(probe.response(s)[0] == 200 for s in sids[:-1])
        assert probe.goaway() is None
        await probe.close()


async def test_drain_sends_goaway_and_in_flight_streams_finish(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)) as dp:
        probe = await H2Probe.open(port)
        sid = probe.request("/slow/700")
        await poll(lambda: web.calls.get("/slow/700") == 1)
        closing = asyncio.create_task(dp.close(10))

        def answered(found: list[Frame]) -> bool:
            return any(f.stream_id == sid and "END_STREAM" in f.flags for f in found)

        found = await frames(probe.reader, answered)
        goaways = [f for f in found if isinstance(f, GoAwayFrame)]
        assert goaways and goaways[0].error_code == 0 and goaways[0].last_stream_id == sid
        body = b"".join(f.data for f in found if isinstance(f, DataFrame) and f.stream_id == sid)
        assert body == b"slow" and answered(found)
        assert found.index(goaways[0]) < len(found) - 1  # the response came after the GOAWAY
        await closing
        await probe.close()


async def test_idle_connection_closes_after_the_keepalive_timeout(web: HTTPBackend) -> None:
    port = free_port()
    # HTTP/2 connections are checked every min(idle, header timeout) / 4 (2.5 s by default):
    # a shorter idle timeout makes that 0.5 s.
    async with serving(plain_table(port, web), keepalive_timeout=0.5, idle_timeout=2.0):
        probe = await H2Probe.open(port)
        assert (await get(probe, "/once"))[0] == 200
        await probe.until(lambda p: bool(p.closed), 5)
        assert probe.closed and probe.goaway() is not None


async def test_header_block_without_end_is_cut_after_the_header_timeout(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web), header_timeout=0.5):
        probe = await H2Probe.open(port)
        headers = HeadersFrame(1)
        headers.data = probe.h2.encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http")])
        probe.write(headers.serialize())  # no END_HEADERS, and no CONTINUATION ever
        await probe.until(lambda p: p.closed, 5)
        assert probe.closed


# --- flow control and memory ---


async def test_reader_that_never_opens_its_window_holds_memory_bounded(web: HTTPBackend) -> None:
    """The backend sends 64 MB; the client never gives window back. What the proxy holds
    for the stream stays at the stream's buffer plus a read, and the backend is paused."""
    port = free_port()
    async with serving(plain_table(port, web)) as dp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        probe = H2Probe(reader, writer)
        probe.h2.initiate_connection()
        probe.flush()
        sid = probe.request("/big/67108864")
        # Read frames without acknowledging data: h2 would not send WINDOW_UPDATE unless told.
        await probe.until(
            lambda p: (
                sum(len(e.data or b"") for e in p.events if isinstance(e, h2.events.DataReceived)) >= 65535
            ),
            10,
        )
        conn = h2_connections(dp, port)[0]
        held = []
        for _ in range(10):
            await asyncio.sleep(0.05)  # (the backend keeps trying to send meanwhile)
            stream = conn.streams[sid]
            assert conn.transport is not None
            held.append(stream.out_bytes + conn.transport.get_write_buffer_size())
        assert max(held) <= h2server.STREAM_BUFFER + 256 * 1024, held
        assert conn.streams[sid].client_full
        await probe.close()


async def test_whole_response_waiting_for_a_window_never_opened_is_reset(web: HTTPBackend) -> None:
    """The exchange is over (its backend done) but the client never opens its window for
    the rest: after the idle timeout the stream is reset, so the connection can end."""
    port = free_port()
    async with serving(plain_table(port, web), idle_timeout=0.5):
        probe = await H2Probe.open(port)
        probe.ack = False
        sid = probe.request("/big/100000")  # over the window, under the window and buffer
        await probe.until(lambda p: p.ended(sid), 10)
        assert probe.reset_code(sid) == h2.errors.ErrorCodes.INTERNAL_ERROR
        await probe.close()


async def test_request_body_waits_in_the_stream_window(web: HTTPBackend) -> None:
    """A client that sends more than the stream window before the proxy opens it is a
    FLOW_CONTROL_ERROR; within it, everything arrives."""
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
        sid = probe.request("/up", method="POST", end=False)
        for _ in range(4):  # within the window, before the proxy gives any back
            probe.h2.send_data(sid, b"x" * 15000)
        probe.flush()
        probe.h2.send_data(sid, b"y" * 100, end_stream=True)
        probe.flush()
        await probe.until(lambda p: p.ended(sid))
        assert echoed(probe.response(sid)[2])["body_length"] == 60100
        await probe.close()


async def test_window_overflow_is_a_flow_control_error(web: HTTPBackend) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        from hyperframe.frame import WindowUpdateFrame

        for _ in range(2):
            frame = WindowUpdateFrame(0)
            frame.window_increment = 2**31 - 1
            probe.write(frame.serialize())
        await probe.until(lambda p: p.goaway() is not None, 5)
        goaway = probe.goaway()
        assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


# --- defences ---


async def test_rapid_reset_is_answered_with_goaway(web: HTTPBackend) -> None:
    """CVE-2023-44487: streams opened and reset at once, over and over."""
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
        for _ in range(h2server.MAX_RESETS * 2):
            sid = probe.request("/slow/1000")
            probe.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            probe.flush()
        await probe.until(lambda p: p.goaway() is not None, 10)
        goaway = probe.goaway()
        assert goaway is not None and goaway.error_code == CALM


async def test_continuation_flood_is_cut_before_it_is_buffered(web: HTTPBackend) -> None:
    """CVE-2024-27316 class: one header block in many CONTINUATION frames. h2 alone keeps
    up to 64 frames (1 MiB); the proxy cuts at its header limit."""
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        block = probe.h2.encoder.encode(
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "h2.test")]
        )
        headers = HeadersFrame(1)
        headers.data = block
        probe.write(headers.serialize())
        sent = 0
        try:
            for _ in range(40):  # 640 KiB: under h2's own 64-frame cap
                frame = ContinuationFrame(1)
                frame.data = b"\x00" * 16000  # (never decoded: no END_HEADERS)
                probe.write(frame.serialize())
                await probe.writer.drain()
                sent += 1
        except ConnectionError:
            pass
        await probe.until(lambda p: p.closed, 10)
        assert probe.closed
        goaway = probe.goaway()
        assert goaway is not None and goaway.error_code == CALM


async def test_hpack_bomb_is_refused_on_its_decoded_size(web: HTTPBackend) -> None:
    """A 4 KB field indexed once and referenced many times: a small block, a big list."""
    port = free_port()
    async with serving(plain_table(port, web), max_header_bytes=8192):
        probe = await H2Probe.open(port)
        big = "v" * 4000
        sid = probe.request("/bomb", headers=[("x-bomb", big)] * 10)  # about 40 KB decoded
        await probe.until(lambda p: p.closed or p.ended(sid), 10)
        goaway = probe.goaway()
        assert goaway is not None and goaway.error_code == CALM


@pytest.mark.parametrize("kind", ["ping", "settings", "empty_data", "window_update", "priority"])
async def test_control_frame_floods_are_answered_with_goaway(web: HTTPBackend, kind: str) -> None:
    port = free_port()
    async with serving(plain_table(port, web)):
        probe = await H2Probe.open(port)
        await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
        sid = probe.request("/slow/3000", method="POST", end=False) if kind == "empty_data" else 0
        try:
            for i in range(h2server.MAX_CONTROL_FRAMES + 100):
                if kind == "ping":
                    probe.h2.ping(b"%08d" % i)
                elif kind == "settings":
                    probe.h2.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
                elif kind == "empty_data":
                    probe.h2.send_data(sid, b"")
                elif kind == "window_update":
                    probe.h2.increment_flow_control_window(1)
                else:
                    probe.h2.prioritize(1 + 2 * i, weight=16)
                if i % 100 == 0:
                    probe.flush()
                    await asyncio.wait_for(probe.writer.drain(), 10)
            probe.flush()
        except (ConnectionError, TimeoutError):
            pass
        await probe.until(lambda p: p.goaway() is not None, 10)
        goaway = probe.goaway()
        assert goaway is not None and goaway.error_code == CALM


# --- real clients and conformance ---


async def run(*args: str, seconds: float = 120) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), seconds)
    return process.returncode or 0, out.decode(errors="replace")


async def test_curl_over_tls_and_with_prior_knowledge(
    web: HTTPBackend, ca: trustme.CA, tmp_path: Any
) -> None:
    curl = tool("curl", "curl")
    code, version = await run(curl, "-V")
    if "HTTP2" not in version:
        pytest.skip("this curl has no HTTP/2 support")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls_port, plain_port = free_port(), free_port()
    tls = tls_table(tls_port, web, ca)
    plain = plain_table(plain_port, web)
    both = tls.model_copy(update={"listeners": {**tls.listeners, **plain.listeners}})
    both = both.model_copy(update={"version": both.content_version()})
    async with serving(both):
        out = "%{http_version} %{http_code} %{size_download}"
        code, text = await run(
            curl,
            "-sS",
            "--http2",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"h2.test:{tls_port}:127.0.0.1",
            "-w",
            out,
            "-o",
            "/dev/null",
            f"https://h2.test:{tls_port}/big/100000",
        )
        assert (code, text) == (0, "2 200 100000")
        # One URL per run: curl 7.88 (Debian 12) fails to reuse a prior-knowledge connection
        # for a second URL ("Error in the HTTP2 framing layer", curl/curl#10634, fixed in 8.0).
        code, text = await run(
            curl,
            "-sS",
            "--http2-prior-knowledge",
            "-H",
            "Host: h2.test",
            "-d",
            "x" * 5000,
            "-w",
            out,
            "-o",
            "/dev/null",
            f"http://127.0.0.1:{plain_port}/posted",
        )
        assert code == 0 and text.startswith("2 200 ")


async def test_h2load_burst_of_streams_on_few_connections(web: HTTPBackend) -> None:
    h2load = tool("h2load", "nghttp2-client")
    port = free_port()
    async with serving(plain_table(port, web)):
        code, text = await run(
            h2load,
            "-n",
            "3000",
            "-c",
            "4",
            "-m",
            "50",
            "-H",
            ":authority: h2.test",
            f"http://127.0.0.1:{port}/load",
        )
    assert code == 0, text
    found = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", text)
    assert found is not None, text
    assert found.groups() == ("3000", "3000", "3000", "3000"), text
    assert re.search(r"status codes: (\d+) 2xx", text) and "3000 2xx" in text


async def spec_failures(args: list[str]) -> tuple[str, list[str], str]:
    """h2spec's summary line, the names of the failed cases, and their details."""
    _, text = await run(h2spec(), *args, "-o", "5", seconds=600)
    summary = re.search(r"(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed", text)
    assert summary is not None, text[-3000:]
    details = text.split("Failures:")[-1] if "Failures:" in text else ""
    return summary.group(0), re.findall("\u00d7 (\\d+: .*)", details), details


async def test_h2spec_over_tls_and_h2c(web: HTTPBackend, ca: trustme.CA) -> None:
    """All 146 cases over TLS. On the h2c port one fails by design: "3.5/2 Sends invalid
    connection preface" expects a GOAWAY, but a plaintext port that does not see the
    preface serves HTTP/1.1 (it answers the bytes as a malformed HTTP/1.1 request).

    Every host routes to a backend that reads the whole request: with no route, a 404 would
    end a stream before the malformed frames h2spec sends after its HEADERS arrive."""
    binary = h2spec()
    assert binary
    tls_port, plain_port = free_port(), free_port()
    cert = ca.issue_cert("127.0.0.1")
    rules = [{"backendRefs": [backend_ref("a")]}]
    routes = [route("tls", tls_port, rules, tls={"secretName": "s"}), route("plain", plain_port, rules)]
    both = l7_table(routes, {"a": [web.port]}, extra=secret("s", cert))
    # Over TLS, each of the 13 cases that end in a connection error waits for the close,
    # which comes after the linger (1 s by default): a short one here.
    async with serving(both, h2_shut_linger=0.1):
        # The two runs are independent (two ports, one connection per case each): at once.
        over_tls, over_h2c = await asyncio.gather(
            spec_failures(["-t", "-k", "-h", "127.0.0.1", "-p", str(tls_port)]),
            spec_failures(["-h", "127.0.0.1", "-p", str(plain_port)]),
        )
        summary, failures, details = over_tls
        assert (summary, failures) == ("146 tests, 146 passed, 0 skipped, 0 failed", []), details
        summary, failures, details = over_h2c
        assert failures == ["2: Sends invalid connection preface"], details
        assert summary == "146 tests, 145 passed, 0 skipped, 1 failed"
