"""HTTP/2 from clients: one connection, many streams, each stream an Exchange.

The protocol state machine, HPACK and the frame rules are python-hyper's `h2`; this module
turns its events into exchanges (the same routing, filters, timeouts, retries, limits, logs
and metrics as HTTP/1.1) and the exchanges' response events into frames.

Flow control runs both ways with backpressure into the event loop:
- request bodies: a stream's receive window is opened again only while its exchange takes
  bytes (not paused: no backend yet, the backend's socket full); the connection window is
  opened as bytes arrive, since every stream is bounded by its own window. So what a client
  can make the proxy hold is at most STREAM_WINDOW per stream.
- responses: DATA leaves as the client's windows allow; a stream holding more than
  STREAM_BUFFER unsent bytes (or a full socket) pauses its backend's reads (`client_full`).

Defences, beside what h2 checks itself: streams reset by the client are counted per
connection (rapid reset, CVE-2023-44487); header block bytes are counted across
CONTINUATION frames before h2 buffers them (CVE-2024-27316); the decoded header list is
bounded (HPACK bombs); frames that do no work (PING, SETTINGS, PRIORITY, empty DATA,
WINDOW_UPDATE nothing waited for) have a budget per second. Over a cap: GOAWAY
ENHANCE_YOUR_CALM and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any, Final, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.connection import _decode_headers  # (keeps HPACK in step for a refused stream)
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame

from .exchange import Exchange
from .framing import FRAMING, HOP_BY_HOP, NO_BODY, BadMessage, Headers, RequestHead, request_head
from .h2frames import HeaderBlock

if TYPE_CHECKING:
    from .listener import ServingL7
    from .upstream import Upstream

log = logging.getLogger("bilayer.l7")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS: more at once are refused (REFUSED_STREAM)
STREAM_WINDOW = 65535  # per stream: what a client may send ahead of the backend taking it
CONNECTION_WINDOW = 1024 * 1024  # the connection's receive window (streams bound themselves)
STREAM_BUFFER = 64 * 1024  # unsent response bytes per stream before its backend is paused
MAX_FRAME = 16384
# Rapid reset: streams the client may reset per RESET_SECONDS before GOAWAY.
MAX_RESETS = 200
RESET_SECONDS = 10.0
# Frames that make the proxy work (or answer) without a request moving: per CONTROL_SECONDS.
MAX_CONTROL_FRAMES = 1000
CONTROL_SECONDS = 1.0
# After a connection error, what the client still sends is read and dropped for a while
# (Settings.h2_shut_linger) before the close: closing with unread bytes resets the
# connection, and the reset can overtake the GOAWAY that says why.

# Connection-specific fields (RFC 9113 8.2.2) and framing: never in an HTTP/2 response.
_NOT_FORWARDED = HOP_BY_HOP | FRAMING
_STATUS = {status: b"%d" % status for status in range(100, 600)}
# Kept out of HPACK's dynamic table (what h2's outbound normalization did: CRIME-style
# guessing of a secret through the compressed size).
_SECRETS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})  # cookie: short ones


def _response_fields(fields: list[tuple[bytes, bytes]], headers: Headers) -> list[tuple[bytes, bytes]]:
    """fields plus the headers an HTTP/2 response may carry, as h2 would send them.

    h2's outbound normalization and validation are off (their generator chain cost more per
    response than the HPACK encoding): this does the same in one pass. Names lowercased;
    connection-specific fields and framing dropped (h2 refused connection, keep-alive,
    proxy-connection, transfer-encoding, upgrade and a te other than trailers: all in
    _NOT_FORWARDED); no pseudo-header but the :status put first by the caller; values
    without surrounding whitespace (RFC 9113 8.2.1); secrets never indexed."""
    append = fields.append
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name in _NOT_FORWARDED or name[:1] == b":":
            continue
        value = raw_value.strip(b" \t")  # (the same object when there is nothing to strip)
        if name in _SECRETS and (name != b"cookie" or len(value) < 20):
            append(NeverIndexedHeaderTuple(name, value))
        else:
            append((name, value))
    return fields


# What an HTTP/1.1 backend will read as one request line and one field line. h2 itself only
# refuses NUL, CR and LF (RFC 9113 8.2.1), so a :method or :path with a space, a :path in
# absolute form or a field with another control character would reach an HTTP/1.1 backend
# as bytes llhttp never lets through from an HTTP/1.1 client: a request line another
# parser may split differently, a Host the target's authority overrides.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_NAME = _METHOD
_PATH = re.compile(rb"/[\x21-\x7e\x80-\xff]*")
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _Malformed(h2.exceptions.ProtocolError):
    """One stream's message is malformed (RFC 9113 8.1.1): a stream error, not the connection's."""


class _ServerStream(h2.stream.H2Stream):
    """h2's stream, whose malformed-message errors (field rules, content-length) are told
    apart from the connection errors h2 raises them as."""

    def receive_headers(self, headers: Any, end_stream: bool, header_encoding: Any) -> Any:
        declared = self._expected_content_length
        done = super().receive_headers(headers, end_stream, header_encoding)
        if declared is not None:
            # Trailers: h2 reads content-length from them too, and forgets the request's.
            self._expected_content_length = declared
        # h2 compares content-length with the DATA only when DATA ends the stream: a HEADERS
        # or trailers with END_STREAM after fewer bytes got through, and the backend was
        # sent a content-length whose body never came (its connection held until a timeout).
        expected = self._expected_content_length
        if end_stream and expected is not None and expected != self._actual_content_length:
            raise _Malformed(f"content-length {expected}, {self._actual_content_length} bytes of DATA")
        return done

    def _process_received_headers(self, *args: Any) -> Any:
        try:
            return super()._process_received_headers(*args)
        except h2.exceptions.ProtocolError as err:
            raise _Malformed(str(err)) from err

    def _initialize_content_length(self, *args: Any) -> None:
        try:
            super()._initialize_content_length(*args)
        except h2.exceptions.ProtocolError as err:
            raise _Malformed(str(err)) from err

    def _track_content_length(self, *args: Any) -> None:
        try:
            super()._track_content_length(*args)
        except h2.exceptions.ProtocolError as err:
            raise _Malformed(str(err)) from err


class _ServerConnection(h2.connection.H2Connection):
    """h2's connection, with a stream over SETTINGS_MAX_CONCURRENT_STREAMS refused on its
    own (RST_STREAM REFUSED_STREAM, RFC 9113 5.1.2) rather than the whole connection, and
    a malformed request reset on its own (RST_STREAM PROTOCOL_ERROR, RFC 9113 8.1.1): h2
    makes both connection errors, so one bad stream cut every stream a client (or the
    many users a front proxy multiplexes) had on the connection."""

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _ServerStream  # (h2 builds its own class; this adds no state)
        return stream

    def _malformed(self, stream_id: int) -> Any:
        """Reset the stream, and tell H2Client as a reset (its exchange ends, and the reset
        counts against the rapid-reset cap: resets the client makes us send count too)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        code = h2.errors.ErrorCodes.PROTOCOL_ERROR
        return [], [h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=False)]

    def _receive_data_frame(self, frame: DataFrame) -> Any:
        try:
            return super()._receive_data_frame(frame)
        except _Malformed:
            # The connection window was spent on it and no DataReceived will give it back.
            if frame.flow_controlled_length:
                self.increment_flow_control_window(frame.flow_controlled_length)
            return self._malformed(frame.stream_id)

    def _receive_headers_frame(self, frame: HeadersFrame) -> Any:
        try:
            return super()._receive_headers_frame(frame)
        except _Malformed:
            return self._malformed(frame.stream_id)
        except h2.exceptions.TooManyStreamsError:
            _decode_headers(self.decoder, frame.data)  # the HPACK table must stay in step
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, frame.stream_id)
            # Frames still arriving for it get RST_STREAM, not a connection error.
            self._closed_streams[frame.stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
            reset = RstStreamFrame(frame.stream_id)
            reset.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            return [reset], []


class Stream:
    """One request stream: the Downstream its exchange writes to."""

    __slots__ = (
        "client_full",
        "client_ip",
        "ended",
        "exchange",
        "finished",
        "moved_at",
        "out",
        "out_bytes",
        "owner",
        "paused",
        "request_ended",
        "sni",
        "stream_id",
        "trailers",
        "unacked",
        "write_blocked",
    )

    def __init__(self, owner: H2Client, stream_id: int) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.client_ip = owner.client_ip
        self.sni = owner.sni
        self.exchange: Exchange | None = None
        self.out: list[bytes] = []  # response bytes waiting for the client's window
        self.out_bytes = 0
        self.ended = False  # the response's end is queued (after out)
        self.trailers: Headers | None = None
        self.finished = False  # END_STREAM (or a reset) sent
        self.request_ended = False
        self.paused: set[str] = set()  # why the stream's receive window stays shut
        self.unacked = 0  # body bytes received and not yet given back as window
        self.client_full = False
        self.write_blocked = False  # the connection's socket is full
        self.moved_at = owner.listener.loop.time()

    @property
    def closing(self) -> bool:
        return self.owner.closing

    # --- Downstream: the response ---

    def send_head(self, exchange: Exchange, status: int, headers: Headers, body: int, length: int) -> None:
        fields = _response_fields([(b":status", _STATUS.get(status) or b"%d" % status)], headers)
        if body >= 0:
            fields.append((b"content-length", b"%d" % body))
        elif body == NO_BODY and length >= 0:
            fields.append((b"content-length", b"%d" % length))
        end = body in (NO_BODY, 0)
        if not self._send_headers(fields, end):
            return
        if end:
            self.ended = self.finished = True
        self._written(exchange)

    def send_data(self, exchange: Exchange, data: bytes) -> None:
        if self.finished:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if exchange.batch is None:
            self.pump()
        # else at send_end or send_batch, whichever comes first: a response whose body
        # and end come in one backend read then leaves as one DATA frame with END_STREAM,
        # not a DATA frame and an empty one (each a pass through h2's state machine).
        self._written(exchange)

    def send_end(self, exchange: Exchange, trailers: Headers | None) -> None:
        if self.finished:
            return
        self.ended = True
        if trailers:
            self.trailers = _response_fields([], trailers) or None
        self.pump()
        self._written(exchange)

    def send_interim(self, exchange: Exchange, status: int, headers: Headers) -> None:
        fields = _response_fields([(b":status", b"%d" % status)], headers)
        if self._send_headers(fields, False):
            self._written(exchange)

    def send_local(self, exchange: Exchange, status: int, message: str, headers: Headers | None) -> int:
        body = (message + "\n").encode() if status != 204 else b""
        fields = [(b":status", b"%d" % status)]
        if body:
            fields.append((b"content-type", b"text/plain; charset=utf-8"))
            fields.append((b"content-length", b"%d" % len(body)))
        fields = _response_fields(fields, headers or [])
        if exchange.head.method == "HEAD":
            body = b""
        if not self._send_headers(fields, not body):
            return 0
        if body:
            self.out.append(body)
            self.out_bytes += len(body)
        self.ended = True
        self.finished = not body
        self.pump()
        self._written(exchange)
        return len(body)

    def _send_headers(self, fields: Headers, end: bool) -> bool:
        try:
            self.owner.h2.send_headers(self.stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError:
            # The stream or the connection is gone, or a field h2 will not send: the
            # client must not wait for a response that never comes.
            self.finished = True
            self.owner.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return False
        return True

    def send_switch(self, exchange: Exchange, headers: Headers) -> None:
        self.abort()  # (an HTTP/2 request never asks for an upgrade: never called)

    def send_batch(self, batch: list[bytes]) -> None:
        if self.out:
            self.pump()  # the body send_data held back
        self.owner.write_soon()

    def _written(self, exchange: Exchange) -> None:
        self.moved_at = self.owner.listener.loop.time()
        batch = exchange.batch
        if batch is not None:
            batch.append(b"")  # frames are in h2's buffer: written at flush
        else:
            self.owner.write_soon()

    def pump(self) -> None:
        """Send what the client's windows allow; then the end, when all is out."""
        if self.finished:
            return
        try:
            self._pump()
        except h2.exceptions.ProtocolError:  # the stream or the connection is gone
            self.finished = True
            self.out.clear()
            self.out_bytes = 0
        self._check_full()
        if self.finished:
            self.owner.stream_done(self)

    def _pump(self) -> None:
        conn = self.owner.h2
        sid = self.stream_id
        out = self.out
        while out:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                break
            data = out[0]
            if len(data) <= window:
                out.pop(0)
                last = not out and self.ended and self.trailers is None
                conn.send_data(sid, data, end_stream=last)
                self.out_bytes -= len(data)
                if last:
                    self.finished = True
            else:
                conn.send_data(sid, data[:window])
                out[0] = data[window:]
                self.out_bytes -= window
            self.owner.data_frames += 1
        if not out and self.ended and not self.finished:
            if self.trailers is not None:
                conn.send_headers(sid, self.trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            self.finished = True

    def _check_full(self) -> None:
        full = self.out_bytes > STREAM_BUFFER or self.write_blocked
        if full != self.client_full:
            self.client_full = full
            if self.exchange is not None and not self.exchange.done:
                self.exchange.client_full(full)

    # --- Downstream: the request ---

    def flush_after_read(self, exchange: Exchange) -> None:
        self.owner.flushing.append(exchange)

    def pause(self, reason: str) -> None:
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and self.unacked and not self.request_ended:
            self.owner.open_window(self)

    def abort(self) -> None:
        """Reset this stream only: the response cannot look complete."""
        if not self.finished:
            self.finished = True
            self.out.clear()
            self.out_bytes = 0
            self.owner.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.owner.stream_done(self)

    def exchange_finished(self, exchange: Exchange) -> None:
        self.owner.stream_done(self)

    def start_tunnel(self, exchange: Exchange, upstream: Upstream, backend_early: bytes) -> None:
        raise AssertionError("HTTP/2 streams are never upgraded")


class H2Client(asyncio.Protocol):
    """An HTTP/2 client connection (after ALPN h2, or the h2c preface)."""

    def __init__(self, listener: ServingL7, client_ip: str, sni: str | None) -> None:
        self.listener = listener
        self.client_ip = client_ip
        self.sni = sni
        settings = listener.settings
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # _response_fields does both, in one pass, for every field this side sends.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _ServerConnection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096,
            },
        )
        # Bounded from the first frame, not only once the client acknowledges our SETTINGS.
        self.h2.decoder.max_header_list_size = settings.max_header_bytes
        self.h2.decoder.max_allowed_table_size = 4096
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.flushing: list[Exchange] = []
        self.reading = False  # events of one read are being handled: write once, after
        self.closing = False
        self.goaway_sent = False
        self.shut = False  # a connection error was sent: reading only to close cleanly
        self.last_stream = 0  # the last stream a graceful GOAWAY lets finish
        self.write_blocked = False
        self.write_pending = False  # write_out is called soon (write_soon)
        self.unacked = 0  # connection window bytes not yet given back
        self.data_frames = 0  # DATA frames sent: WINDOW_UPDATEs answering them do work
        self.resets = 0
        self.resets_from = 0.0
        self.control = 0
        self.control_from = 0.0
        # Header block bytes counted in front of h2 (CONTINUATION floods).
        self.scan_skip = len(PREFACE)
        self.scan_head = b""
        self.block = HeaderBlock(settings.max_header_bytes)
        # Deadlines, checked by the listener's sweep (as for HTTP/1.1 connections).
        self.deadline = 0.0
        self.last_active = listener.loop.time()
        self.requests = 0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.write_out()
        self.deadline = self.listener.loop.time() + self.listener.tick

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.shut:
            return
        self.last_active = self.listener.loop.time()
        if not self._scan(data):
            self._calm("header block over the limit (CONTINUATION flood)")
            return
        self.reading = True
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            self.reading = False
            self.listener.bad_messages["client"] += 1
            self._shut(str(err))
            return
        try:
            for event in events:
                self._event(event)
                if self.transport.is_closing():
                    return
            flushing, self.flushing = self.flushing, []
            for exchange in flushing:
                exchange.flush_body()
        finally:
            self.reading = False
        self.write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.deadline = 0.0
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            if exchange is not None and not exchange.done:
                exchange.client_lost()
        self.streams.clear()
        self.listener.forget(self)

    def pause_writing(self) -> None:
        # The client is not reading: nor are we, so what it sends cannot make us answer
        # (PING and SETTINGS acknowledgements) into a buffer that does not drain.
        if self.transport is not None:
            self.transport.pause_reading()
        self.write_blocked = True
        for stream in list(self.streams.values()):
            stream.write_blocked = True
            stream._check_full()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.shut:
            self.transport.resume_reading()
        self.write_blocked = False
        for stream in list(self.streams.values()):
            stream.write_blocked = False
            stream._check_full()

    # --- events ---

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and not stream.request_ended:
                stream.request_ended = True
                if stream.exchange is not None:
                    stream.exchange.request_end()
        elif isinstance(event, h2.events.WindowUpdated):
            if self.data_frames > 0:
                self.data_frames -= 1  # it lets the response go on
            else:
                self._no_work()
            self._window_opened(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._reset_by_client(event)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.exchange is not None:
                stream.request_ended = True
                stream.exchange.request_end()  # (trailers are not forwarded to HTTP/1.1 backends)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._no_work()
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._window_opened(0)
        elif isinstance(event, (h2.events.PingReceived, h2.events.PriorityUpdated)):
            self._no_work()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: h2 sends nothing more after it, so the streams end here.
            self._shut("the client sent GOAWAY")

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id or 0
        if self.goaway_sent and sid > self.last_stream:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.requests += 1
        stream = Stream(self, sid)
        self.streams[sid] = stream
        ended = event.stream_ended is not None
        stream.request_ended = ended
        try:
            head = h2_request_head(event.headers, ended, self.listener.limits.fields)
        except BadMessage as bad:
            self.listener.bad_messages["client"] += 1
            head = _placeholder_head()
            exchange = stream.exchange = Exchange(self.listener, stream, head)
            self.listener.requests += 1
            self.listener.h2_requests += 1
            exchange.local(bad.status, bad.message, "too_large" if bad.status == 431 else "bad_request")
            return
        exchange = stream.exchange = Exchange(self.listener, stream, head)
        self.listener.requests += 1
        self.listener.h2_requests += 1
        exchange.start()

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id or 0
        size = event.flow_controlled_length or 0
        data = event.data or b""
        self.unacked += size
        if self.unacked >= CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self.unacked)
            self.unacked = 0
        if not data and event.stream_ended is None:
            self._no_work()
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.moved_at = self.last_active
        exchange = stream.exchange
        if exchange is None or exchange.done:
            return  # answered early: the rest is read and dropped (its window stays shut)
        stream.unacked += size
        if data:
            exchange.request_body(data)
        if not stream.paused and stream.unacked >= STREAM_WINDOW // 2 and event.stream_ended is None:
            self.open_window(stream)

    def open_window(self, stream: Stream) -> None:
        if stream.finished and stream.exchange is None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.h2.increment_flow_control_window(stream.unacked, stream.stream_id)
        stream.unacked = 0
        if not self.reading:
            self.write_soon()

    def _window_opened(self, stream_id: int | None) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.pump()
        else:
            for stream in list(self.streams.values()):
                if stream.out or stream.ended:
                    stream.pump()
        if not self.reading:
            self.write_soon()

    def _reset_by_client(self, event: h2.events.StreamReset) -> None:
        now = self.listener.loop.time()
        if now - self.resets_from >= RESET_SECONDS:
            self.resets_from, self.resets = now, 0
        self.resets += 1
        stream = self.streams.pop(event.stream_id or 0, None)
        if stream is not None:
            stream.finished = True
            exchange = stream.exchange
            if exchange is not None and not exchange.done:
                exchange.client_lost()
        if self.resets > MAX_RESETS:
            self.listener.h2_defences["rapid_reset"] += 1
            self._calm("too many streams reset by the client (rapid reset)")

    def _no_work(self) -> None:
        now = self.listener.loop.time()
        if now - self.control_from >= CONTROL_SECONDS:
            self.control_from, self.control = now, 0
        self.control += 1
        if self.control > MAX_CONTROL_FRAMES:
            self.listener.h2_defences["control_flood"] += 1
            self._calm("too many frames that do no work (SETTINGS/PING/PRIORITY/WINDOW_UPDATE/empty DATA)")

    # --- streams ending ---

    def stream_done(self, stream: Stream) -> None:
        """A stream's response is all sent (or reset), or its exchange finished."""
        exchange = stream.exchange
        if not stream.finished or (exchange is not None and not exchange.done):
            return
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if not stream.request_ended:
            # Answered before the client finished sending: it may stop (RFC 9113 8.1).
            self.reset(stream, h2.errors.ErrorCodes.NO_ERROR)
        if not self.streams:
            self.last_active = self.listener.loop.time()
            if self.closing:
                self._close_when_done()

    def reset(self, stream: Stream, code: h2.errors.ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.StreamClosedError:
            return
        except h2.exceptions.ProtocolError:
            return
        if not self.reading:
            self.write_soon()

    # --- writing ---

    def write_soon(self) -> None:
        """Write what h2 holds at the end of this turn of the event loop: responses
        finished by different backend reads in one turn then leave in one system call,
        not one each (with many streams in flight, most of the CPU of a write)."""
        if not self.reading and not self.write_pending:
            self.write_pending = True
            self.listener.loop.call_soon(self.write_out)

    def write_out(self) -> None:
        if self.reading:
            return
        self.write_pending = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # --- the CONTINUATION guard ---

    def _scan(self, data: bytes) -> bool:
        """Walk the frame headers in data: False when one header block (HEADERS and its
        CONTINUATIONs) is over the limit. h2 would buffer 64 frames of it first."""
        n = len(data)
        i = self.scan_skip
        if i >= n:
            self.scan_skip = i - n
            return True
        head = self.scan_head
        while True:
            if head:
                need = 9 - len(head)
                head += data[i : i + need]
                i += need
                if len(head) < 9:
                    self.scan_head, self.scan_skip = head, 0
                    return True
                frame, head = head, b""
            elif i + 9 > n:
                self.scan_head, self.scan_skip = data[i:], 0
                return True
            else:
                frame = data[i : i + 9]
                i += 9
            length = int.from_bytes(frame[:3], "big")
            if not self.block.frame(frame[3], frame[4], length, self.last_active):
                return False
            i += length
            if i >= n:
                self.scan_skip, self.scan_head = i - n, b""
                return True

    # --- deadlines (the listener's sweep) ---

    def check(self, now: float) -> None:
        listener = self.listener
        settings = listener.settings
        if self.block.size and now - self.block.began >= settings.header_timeout:
            listener.timeouts["header"] += 1
            self._calm("a header block took too long", code=h2.errors.ErrorCodes.NO_ERROR)
            return
        if not self.streams:
            limit = settings.header_timeout if not self.requests else settings.keepalive_timeout
            if now - self.last_active >= limit:
                if not self.requests:
                    listener.timeouts["header"] += 1
                self.close()
                return
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            if exchange is None or exchange.done:
                # The response is whole but waits for a window the client never opens.
                if not stream.finished and now - stream.moved_at >= settings.idle_timeout:
                    listener.timeouts["slow_reader"] += 1
                    stream.abort()
                continue
            if now - stream.moved_at >= settings.idle_timeout:
                if stream.client_full:
                    listener.timeouts["slow_reader"] += 1
                    stream.abort()
                else:
                    listener.timeouts["idle"] += 1
                    waiting = not exchange.request_whole and not stream.paused
                    exchange.idle_timed_out(waiting)
        self.deadline = now + listener.tick

    # --- closing ---

    def drain(self) -> None:
        """Graceful: GOAWAY naming the last stream taken; in-flight streams finish."""
        self.closing = True
        if not self.goaway_sent and self.transport is not None and not self.transport.is_closing():
            self.goaway_sent = True
            self.last_stream = self.h2.highest_inbound_stream_id
            # Written beside h2, whose state machine would refuse every frame after its own
            # GOAWAY, the in-flight streams' too.
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.last_stream
            frame.error_code = h2.errors.ErrorCodes.NO_ERROR
            self.write_out()
            self.transport.write(frame.serialize())
        self._close_when_done()

    def close(self) -> None:
        self.drain()

    def _close_when_done(self) -> None:
        if self.streams or self.transport is None:
            return
        self.write_out()
        self.transport.close()

    def _calm(self, why: str, *, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        """GOAWAY with code and close: the client's behaviour is refused."""
        self.listener.bad_messages["client"] += 1
        transport = self.transport
        if transport is None:
            return
        self.closing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=code)
        self._shut(why)

    def _shut(self, why: str) -> None:
        """After a connection error (h2 queued the GOAWAY): write it, end every stream's
        exchange (h2 sends nothing more), and close."""
        transport = self.transport
        if transport is None:
            return
        log.debug("HTTP/2 connection closed", extra={"client": self.client_ip, "reason": why})
        self.closing = self.shut = True
        data = self.h2.data_to_send()
        if not data:  # an error h2 raised before it could queue its GOAWAY (a bad preface)
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = h2.errors.ErrorCodes.PROTOCOL_ERROR
            data = frame.serialize()
        if not transport.is_closing():
            transport.write(data)
            if transport.can_write_eof():
                transport.write_eof()
            self.listener.loop.call_later(self.listener.settings.h2_shut_linger, transport.close)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.finished = True
            exchange = stream.exchange
            if exchange is not None and not exchange.done:
                exchange.client_lost()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


def h2_request_head(fields: Headers, ended: bool, max_fields: int) -> RequestHead:
    """The RequestHead of a stream's HEADERS, validated as HTTP/1.1 heads are (h2 has
    checked the pseudo-header rules, connection-specific fields and TE). :authority is the
    Host; a body with no content-length is forwarded chunked to HTTP/1.1 backends."""
    method = path = authority = b""
    regular: Headers = []
    te_trailers = False
    has_length = False
    hosts: list[bytes] = []
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name == b"te":
            te_trailers = True  # (h2 refused any other value)
        elif name == b"host":
            hosts.append(value)
        else:
            if name == b"content-length":
                has_length = True
            regular.append((name, value))
    if len(regular) > max_fields:
        raise BadMessage(431, "too many header fields")
    if _METHOD.fullmatch(method) is None:
        raise BadMessage(400, ":method is not a token (RFC 9110 9.1)")
    if _PATH.fullmatch(path) is None:
        # (also "*" and the absolute form: the target is :scheme and :authority, RFC 9113 8.3.1)
        raise BadMessage(400, ":path must be an absolute path with no space or control character")
    for name, value in regular:
        if _FIELD_NAME.fullmatch(name) is None or _FIELD_CONTROL.search(value) is not None:
            raise BadMessage(400, f"header {name[:64]!r} has a character HTTP/1.1 does not allow")
    if authority:
        if any(h != authority for h in hosts):
            raise BadMessage(400, "the Host header differs from :authority")
        hosts = [authority]
    if not ended and not has_length:
        regular.append((b"transfer-encoding", b"chunked"))
    head = request_head(
        method,
        "1.1",
        path,
        [(b"host", h) for h in hosts[:1]] + regular,
        keep_alive=True,
        upgrading=False,
    )
    head.version = "2"
    head.te_trailers = te_trailers
    return head


def _placeholder_head() -> RequestHead:
    """For a stream refused before it had a valid head: what the access log and the local
    answer need."""
    return RequestHead("GET", "2", b"", "", "/", "", False, [], b"", NO_BODY, True, b"", False, False, b"")


def is_preface_start(data: bytes) -> bool:
    """data is (the beginning of) the HTTP/2 connection preface."""
    return PREFACE.startswith(data[:24]) if len(data) < 24 else data.startswith(PREFACE)
