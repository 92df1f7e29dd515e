"""HTTP/2 as an attacker speaks it, to an HTTP/1.1 backend that records every byte
(rawkit's strict parser is the referee): a stream the client sends is at most one request
the backend parses, with no line or field the client could inject, and a malformed stream
is refused on its own (4xx or RST_STREAM) while the connection's other streams go on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

from dataplane.l7 import h2server

from .h2kit import H2Probe, get, poll
from .helpers import free_port
from .l7kit import serving
from .rawkit import RawBackend, raw_table
from .test_l7_upstream_h2 import ask, h2_table


@pytest.fixture
async def backend() -> AsyncIterator[RawBackend]:
    raw = await RawBackend().start()
    yield raw
    await raw.stop()


async def hostile_probe(port: int) -> H2Probe:
    """A client whose own h2 sends whatever the test asks, valid or not."""
    probe = await H2Probe.open(port)
    probe.h2.config.validate_outbound_headers = False
    probe.h2.config.normalize_outbound_headers = False
    return probe


# Heads h2 lets through (it refuses only NUL, CR, LF, uppercase and the RFC 9113 8.2 rules)
# but that an HTTP/1.1 backend must never read: each one answered 400 by the proxy.
REFUSED_400: dict[str, dict[str, Any]] = {
    "method not a token": {"method": "G(T"},
    "method with a space": {"method": "GET /evil"},
    "path with a space": {"path": "/a HTTP/1.1 /b"},
    "path in absolute form, Host overridden": {"path": "http://evil.test/x"},
    "path that is not a path": {"path": "x"},
    "asterisk form": {"path": "*", "method": "OPTIONS"},
    "DEL in a value": {"headers": [("x-a", "1\x7f2")]},
    "control character in a value": {"headers": [("x-a", "1\x012")]},
    "vertical tab in a value": {"headers": [("x-a", "1\x0b2")]},
    "name not a token": {"headers": [("x-a(b)", "1")]},
}


@pytest.mark.parametrize("name", sorted(REFUSED_400))
async def test_heads_http1_cannot_carry_are_refused_before_the_backend(
    backend: RawBackend, name: str
) -> None:
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        attack = dict(REFUSED_400[name])
        status, _, _ = await get(probe, attack.pop("path", "/x"), **attack)
        assert status == 400
        assert backend.count == 0 and not backend.malformed
        assert b"evil" not in b"".join(c.received for c in backend.connections)
        # The connection goes on, and the backend parses the next stream as sent.
        status, _, _ = await get(probe, "/after")
        assert status == 200 and [r.target for r in backend.requests] == ["/after"]
        assert probe.goaway() is None
        await probe.close()


# Heads RFC 9113 calls malformed (8.1.1, 8.2, 8.3), which h2 refuses: each must reset its
# own stream (PROTOCOL_ERROR), never the connection with the other streams on it.
MALFORMED: dict[str, list[tuple[str, str]]] = {
    "CRLF in a value": [("x-a", "1\r\nx-injected: 1")],
    "LF in a value": [("x-a", "1\nx-injected: 1")],
    "NUL in a value": [("x-a", "1\x00x")],
    "CRLF in a name": [("x-a\r\nx-injected", "1")],
    "colon in a name": [("x-a:b", "1")],
    "space in a name": [("x-a b", "1")],
    "uppercase name": [("X-A", "1")],
    "leading space in a value": [("x-a", " 1")],
    "transfer-encoding": [("transfer-encoding", "chunked")],
    "connection": [("connection", "close")],
    "keep-alive": [("keep-alive", "timeout=5")],
    "upgrade": [("upgrade", "websocket")],
    "te other than trailers": [("te", "gzip")],
    "host differing from :authority": [("host", "evil.test")],
    "content-length list": [("content-length", "0, 0")],
    "content-length signed": [("content-length", "+0")],
    "unknown pseudo-header": [(":foo", "1")],
    "pseudo-header after a field": [("x-a", "1"), (":path", "/again")],
    ":protocol without the setting": [(":protocol", "websocket")],
}


async def in_flight(probe: H2Probe) -> tuple[int, bytes]:
    """A POST whose body is half sent: a stream the malformed one must not take down."""
    body = b"0123456789" * 100
    sid = probe.request("/in-flight", method="POST", headers=[("content-length", str(len(body)))], end=False)
    await probe.send_body(sid, body[:500], end=False)
    return sid, body


async def finish(probe: H2Probe, backend: RawBackend, sid: int, body: bytes) -> None:
    await probe.send_body(sid, body[500:])
    await probe.until(lambda p: p.ended(sid))
    status, _, echoed = probe.response(sid)
    assert status == 200 and b'"body_length": 1000' in echoed
    assert probe.goaway() is None and not backend.malformed


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_head_resets_its_stream_only(backend: RawBackend, name: str) -> None:
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        sid, body = await in_flight(probe)
        bad = probe.h2.get_next_available_stream_id()
        fields = [(":method", "GET"), (":path", "/bad"), (":scheme", "http"), (":authority", "h2.test")]
        probe.h2.send_headers(bad, fields + MALFORMED[name], end_stream=True)
        probe.flush()
        await probe.until(lambda p: p.ended(bad))
        assert probe.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await finish(probe, backend, sid, body)
        assert [r.target for r in backend.requests] == ["/in-flight"]
        assert b"injected" not in b"".join(c.received for c in backend.connections)
        await probe.close()


@pytest.mark.parametrize(("declared", "sent"), [(10, 5), (3, 5), (10, 15)])
async def test_content_length_disagreeing_with_data_resets_the_stream_and_smuggles_nothing(
    backend: RawBackend, declared: int, sent: int
) -> None:
    """Less DATA than content-length, more, and more in a second frame (the first forwarded):
    the stream is reset, the backend connection that took a partial body is not reused (the
    next request would be read as the rest of it), the other streams go on."""
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        sid, body = await in_flight(probe)
        bad = probe.request("/lying", method="POST", headers=[("content-length", str(declared))], end=False)
        first = min(sent, declared - 1)
        probe.h2.send_data(bad, b"GET /smuggled HTTP/1.1\r\n"[:first])
        probe.flush()
        probe.h2.send_data(bad, b"x" * (sent - first), end_stream=True)
        probe.flush()
        await probe.until(lambda p: p.ended(bad))
        assert probe.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await finish(probe, backend, sid, body)
        for _ in range(3):
            assert (await get(probe, "/after"))[0] == 200
        targets = [r.target for r in backend.requests]
        assert "/smuggled" not in targets and targets.count("/after") == 3
        assert all(r.target != "/lying" or len(r.body) == declared for r in backend.requests)
        await probe.close()


# --- a hostile h2c backend ---


class HostileBackend(asyncio.Protocol):
    """An h2c server that answers every request with what `answer` writes, valid or not."""

    def __init__(self, answer: Callable[[h2.connection.H2Connection, int], None], max_streams: int) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
        )
        self.answer = answer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.StreamEnded) and event.stream_id:
                self.answer(self.h2, event.stream_id)
        self.transport.write(self.h2.data_to_send())


@contextlib.asynccontextmanager
async def hostile_backend(
    answer: Callable[[h2.connection.H2Connection, int], None], *, max_streams: int = 100
) -> AsyncIterator[tuple[int, list[HostileBackend]]]:
    made: list[HostileBackend] = []

    def protocol() -> HostileBackend:
        made.append(HostileBackend(answer, max_streams))
        return made[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], made
    finally:
        server.close()
        for conn in made:
            if conn.transport is not None:
                conn.transport.close()


def head_only(*fields: tuple[bytes, bytes]) -> Callable[[h2.connection.H2Connection, int], None]:
    def answer(conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, list(fields), end_stream=True)

    return answer


def pseudo_trailers(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.send_headers(sid, [(b":status", b"200")])
    conn.send_data(sid, b"ok")
    conn.send_headers(sid, [(b":status", b"500"), (b"x-t", b"1")], end_stream=True)


def short_body(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
    conn.send_data(sid, b"ok", end_stream=True)


HOSTILE_ANSWERS: dict[str, Callable[[h2.connection.H2Connection, int], None]] = {
    "a pseudo-header in trailers": pseudo_trailers,
    "ten thousand fields": head_only((b":status", b"200"), *[(b"x-%d" % n, b"1") for n in range(10_000)]),
    "a body shorter than its content-length": short_body,
    "a status of four digits": head_only((b":status", b"2000")),
    "a status under 100": head_only((b":status", b"099")),
    "a status that is no number": head_only((b":status", b"2x0")),
    "no status": head_only((b"x-a", b"1")),
    "connection-specific fields": head_only((b":status", b"200"), (b"transfer-encoding", b"chunked")),
    "CRLF in a field": head_only((b":status", b"200"), (b"x-a", b"1\r\nx-injected: 1")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ANSWERS))
async def test_a_broken_h2c_response_is_a_502(name: str) -> None:
    async with hostile_backend(HOSTILE_ANSWERS[name]) as (backend_port, _):
        port = free_port()
        async with serving(h2_table(port, backend_port)):
            status, headers, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status == 502, (status, headers, body)
            assert "x-injected" not in headers and "transfer-encoding" not in headers


async def test_a_backend_that_allows_no_stream_is_a_502_without_a_connection_storm() -> None:
    async with hostile_backend(head_only((b":status", b"200")), max_streams=0) as (backend_port, made):
        port = free_port()
        async with serving(h2_table(port, backend_port)):
            status, _, body = await ask(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status in (502, 503), body
            assert len(made) <= 2  # (it was one connection per SETTINGS, in a loop, until a timeout)


# --- resource exhaustion ---


async def test_resets_the_client_makes_the_server_send_count_too(backend: RawBackend) -> None:
    """MadeYouReset (CVE-2025-8671): DATA on a stream the client already ended makes the
    server reset it (STREAM_CLOSED); a cap counting only the client's RST_STREAM frames
    would let it start backend requests without bound. The backend never holds more than
    MAX_STREAMS of its requests at once, and the connection gets GOAWAY ENHANCE_YOUR_CALM."""
    never = RawBackend(lambda conn, request: b"")  # holds every request
    await never.start()
    port = free_port()
    try:
        async with serving(raw_table(port, never)):
            probe = await H2Probe.open(port)
            await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
            probe.h2.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100_000
            probe.h2.remote_settings.acknowledge()
            for n in range(h2server.MAX_RESETS * 2):
                sid = probe.request(f"/held/{n}")
                frame = DataFrame(sid)
                frame.data = b"x"
                probe.write(frame.serialize())
                if probe.writer.is_closing():
                    break
                with contextlib.suppress(ConnectionError):
                    await probe.writer.drain()
            await probe.until(lambda p: p.goaway() is not None, 10)
            goaway = probe.goaway()
            assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert never.count <= h2server.MAX_STREAMS
    finally:
        await never.stop()


async def test_empty_continuation_frames_cannot_hold_a_header_block_open(backend: RawBackend) -> None:
    """Zero-length CONTINUATION frames add nothing to the block's size: h2's cap on their
    number ends the connection."""
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await H2Probe.open(port)
        headers = HeadersFrame(1)
        headers.data = probe.h2.encoder.encode([(":method", "GET"), (":path", "/")])
        probe.write(headers.serialize())
        empty = ContinuationFrame(1).serialize()
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                probe.write(empty * 100)
                await probe.writer.drain()
        await probe.until(lambda p: p.closed or p.goaway() is not None, 10)
        assert probe.closed or probe.goaway() is not None
        assert backend.count == 0


async def test_pseudo_header_in_request_trailers_resets_that_stream_only(backend: RawBackend) -> None:
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        sid, body = await in_flight(probe)
        bad = probe.request("/trailing", method="POST", end=False)
        await probe.send_body(bad, b"abc", end=False)
        probe.h2.send_headers(bad, [(":path", "/evil"), ("x-t", "1")], end_stream=True)
        probe.flush()
        await probe.until(lambda p: p.ended(bad))
        assert probe.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await finish(probe, backend, sid, body)
        assert b"evil" not in b"".join(c.received for c in backend.connections)
        await probe.close()


async def test_a_body_still_coming_after_the_backend_answered_never_reaches_a_reused_connection() -> None:
    """The backend answers after the head; the client's DATA goes on. The backend connection
    holding half a body is never given another request (it would be read as the body)."""
    received: list[bytearray] = []

    async def answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        received.append(seen)
        answered = 0
        while data := await reader.read(65536):
            seen += data
            while seen.count(b"\r\n\r\n") > answered:
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        writer.close()

    server = await asyncio.start_server(answer_at_once, "127.0.0.1", 0)
    origin = RawBackend()
    origin.port = server.sockets[0].getsockname()[1]
    port = free_port()
    try:
        async with serving(raw_table(port, origin)):
            probe = await H2Probe.open(port)
            for fields in ([("content-length", "100")], []):  # forwarded with a length, and chunked
                sid = probe.request("/early", method="POST", headers=fields, end=False)
                await probe.send_body(sid, b"a" * 10, end=False)
                await probe.until(lambda p, sid=sid: p.response(sid)[0] != 0 or p.ended(sid))
                assert probe.response(sid)[0] == 200
                await probe.send_body(
                    sid, b"GET /smuggled HTTP/1.1\r\nhost: h2.test\r\n\r\n".ljust(90), end=True
                )
                for _ in range(2):
                    assert (await get(probe, "/after"))[0] == 200
            for seen in received:
                if b"POST /early" in seen:  # its connection carries nothing after that request
                    assert (
                        seen.count(b"HTTP/1.1\r\n")
                        == seen[: seen.index(b"POST /early")].count(b"HTTP/1.1\r\n") + 1
                    )
            assert not any(b"/smuggled" in seen for seen in received)
            await probe.close()
    finally:
        server.close()


def refuse_every_stream(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)


def goaway_every_stream(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.close_connection(last_stream_id=0)


def overflow_the_window(conn: h2.connection.H2Connection, sid: int) -> None:
    # A connection WINDOW_UPDATE taking the proxy's send window past 2^31-1 (RFC 9113 6.9.1),
    # written past h2, which would refuse to send it.
    increment = (2**31 - 1).to_bytes(4, "big")
    conn._data_to_send += (4).to_bytes(3, "big") + bytes([8, 0]) + bytes(4) + increment
    conn.send_headers(sid, [(b":status", b"200")], end_stream=True)


@pytest.mark.parametrize(
    ("answer", "status"),
    [(refuse_every_stream, 503), (goaway_every_stream, 503), (overflow_the_window, 502)],
)
async def test_an_h2c_backend_that_refuses_everything_is_tried_a_bounded_number_of_times(
    answer: Callable[[h2.connection.H2Connection, int], None], status: int
) -> None:
    """A request refused (REFUSED_STREAM, or above a GOAWAY's last stream) is safe to send
    again: it is, once, never in a loop; a window overflow is the backend's broken HTTP/2."""
    streams: list[int] = []

    def counted(conn: h2.connection.H2Connection, sid: int) -> None:
        streams.append(sid)
        answer(conn, sid)

    async with hostile_backend(counted) as (backend_port, made):
        port = free_port()
        async with serving(h2_table(port, backend_port)):
            assert (await ask(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"))[0] == status
            assert len(streams) <= 2 and len(made) <= 2


async def test_a_grpc_call_to_a_broken_h2c_backend_ends_internal() -> None:
    """h2 end to end: the client's gRPC call gets a gRPC status (13 INTERNAL), not a bare 502."""
    async with hostile_backend(HOSTILE_ANSWERS["a status of four digits"]) as (backend_port, _):
        port = free_port()
        async with serving(h2_table(port, backend_port)):
            probe = await H2Probe.open(port)
            grpc = [("content-type", "application/grpc"), ("te", "trailers")]
            status, headers, _ = await get(probe, "/pkg.Svc/Call", method="POST", headers=grpc, body=bytes(5))
            assert status == 200 and headers.get(b"grpc-status") == b"13", headers
            assert probe.goaway() is None
            await probe.close()


@pytest.mark.parametrize("sent", [0, 3])
async def test_a_stream_ending_short_of_its_content_length_without_data_is_reset(
    backend: RawBackend, sent: int
) -> None:
    """END_STREAM on the HEADERS (0 bytes), or on trailers after 3 bytes, of a request whose
    content-length is 5: h2 checks only DATA that ends a stream, and the backend was left
    waiting for a body that never came (stream and backend connection held to the timeout)."""
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        sid, body = await in_flight(probe)
        bad = probe.request("/short", method="POST", headers=[("content-length", "5")], end=not sent)
        if sent:
            await probe.send_body(bad, b"x" * sent, end=False)
            probe.h2.send_headers(bad, [("x-t", "1")], end_stream=True)
            probe.flush()
        await probe.until(lambda p: p.ended(bad), 5)
        assert probe.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await finish(probe, backend, sid, body)
        assert (await get(probe, "/after"))[0] == 200
        assert all(len(r.body) == 5 for r in backend.requests if r.target == "/short")
        await probe.close()


def short_body_then_trailers(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
    conn.send_data(sid, b"ok")
    conn.send_headers(sid, [(b"x-t", b"1")], end_stream=True)


async def test_an_h2c_body_short_of_its_content_length_ended_by_trailers_cuts_the_client() -> None:
    """The HTTP/1.1 client was told content-length 100 and given 2 bytes; its connection went
    on, and it read the next response on it as the other 98 (response queue poisoning)."""
    async with hostile_backend(short_body_then_trailers) as (backend_port, _):
        port = free_port()
        async with serving(h2_table(port, backend_port)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            received = b""
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    received += chunk
            writer.close()
            assert b"okHTTP/1.1" not in received  # (the connection is closed: the loop ended)


async def test_streams_that_never_end_their_request_are_timed_out_and_free_the_backend(
    backend: RawBackend,
) -> None:
    """A full connection of streams whose request never ends (no END_STREAM, no DATA): each
    one is answered (408) or reset after the idle timeout, and no backend connection stays
    open for them."""
    port = free_port()
    async with serving(raw_table(port, backend), idle_timeout=0.5):
        probe = await H2Probe.open(port)
        await probe.until(lambda p: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in p.events))
        sids = [
            probe.request(f"/open/{n}", method="POST", headers=[("content-length", "10")], end=False)
            for n in range(h2server.MAX_STREAMS)
        ]
        await probe.until(lambda p: all(p.ended(s) for s in sids), 20)
        assert all(probe.response(s)[0] in (408, 504) or probe.reset_code(s) is not None for s in sids)
        await poll(lambda: all(c.closed for c in backend.connections))
        assert len(backend.connections) == h2server.MAX_STREAMS  # (the heads were forwarded)
        assert probe.goaway() is None
        await probe.close()
