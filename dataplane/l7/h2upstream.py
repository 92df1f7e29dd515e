"""HTTP/2 to backends (h2c with prior knowledge, or h2 chosen in ALPN over TLS).

One H2Connection per backend connection carries the streams of many exchanges, up to the
server's SETTINGS_MAX_CONCURRENT_STREAMS (and MAX_STREAMS); the pool opens another connection
when every one is full. Each exchange talks to its H2Stream exactly as to an HTTP/1.1
upstream (backend.Backend): the request becomes HEADERS and DATA frames (RFC 9113 8.2/8.3:
Host becomes :authority, connection-specific fields are dropped, TE only as "trailers" and
only when the client sent it), the response comes back as the exchange's response events.

Flow control is honoured both ways with backpressure. Request bytes the stream's window
cannot take yet wait in the stream; above SEND_BUFFER the client's reads pause
(backend_full). Response bytes are acknowledged (the stream's window reopened) only while
the client's socket takes them: a client that does not read stops the backend's stream at
its window, while the connection's window is reopened at once so other streams go on.

A GOAWAY drains the connection: streams above its last stream id were not processed and are
handed back as refused (safe to send again whatever the method), the others finish, and no
new stream starts on it. A stream the server refuses (REFUSED_STREAM) is handed back the same.
(h2 closes its whole state machine on a GOAWAY, after which the streams still being answered
could not be read: so GOAWAY frames are taken out of the bytes before h2 sees them.)

A backend's header blocks (response heads, trailers) are bounded like an HTTP/1.1 backend's
head (reader.Limits): their bytes are counted from the frame heads before h2 buffers and
decodes them (h2frames.HeaderBlock), the decoded list is bounded by h2's decoder, and the
fields are counted. A block over the limit, or one left open for HEADER_BLOCK_SECONDS, closes
the connection (GOAWAY ENHANCE_YOUR_CALM) and fails every stream on it, as any connection
error does: a block cannot be refused on its own stream, since skipping its HPACK would leave
the connection's decoding context behind the backend's (RFC 9113 4.3: a block not decoded is
a connection error), and until it ends no frame of any other stream may come (6.10).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..health import EndpointState
from .backend import BackendRequest, User
from .dial import Dial
from .framing import CHUNKED, NO_BODY, BadMessage, Headers, ResponseHead
from .h2frames import FRAME_HEAD, GOAWAY, HeaderBlock

if TYPE_CHECKING:
    from .upstream import Pool

# Streams per connection when the server sets no limit (its default is unlimited).
MAX_STREAMS = 100
# Request bytes a stream holds beyond its window before the client's reads pause.
SEND_BUFFER = 64 * 1024
# The connection's receive window: large, so one stream held by a slow client (its own
# window stays closed) never starves the others.
CONNECTION_WINDOW = 16 * 1024 * 1024
# A backend writes a header block at once: one still open after this long is a backend
# holding the connection (no other stream's frame may come meanwhile).
HEADER_BLOCK_SECONDS = 10.0
# RFC 9113 8.2.2: fields that are meaningful for one HTTP/1.1 connection only.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"host"}
)


class StreamFlow:
    """Pausing a stream's response: its window is not reopened while any reason holds."""

    __slots__ = ("reasons", "stream")

    def __init__(self, stream: H2Stream) -> None:
        self.stream = stream
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.stream.reopen()

    def reset(self) -> None:
        if self.reasons:
            self.reasons.clear()
            self.stream.reopen()


class H2Stream:
    """One exchange's request and response on an HTTP/2 connection."""

    __slots__ = (
        "answered",
        "conn",
        "end_pending",
        "endpoint",
        "flow",
        "full",
        "id",
        "length",
        "method",
        "pending",
        "pending_bytes",
        "received",
        "reserved",
        "reused",
        "sent_end",
        "trailers",
        "unacked",
        "user",
    )

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.endpoint = conn.endpoint
        # A stream reset is the backend failing (counted for health); only a connection
        # closed under a stream without a GOAWAY may be one that went stale (see lost()).
        self.reused = False
        self.flow = StreamFlow(self)
        self.id = 0
        self.user: User | None = None
        self.method = "GET"
        self.pending: deque[bytes] = deque()  # request bytes waiting for window
        self.pending_bytes = 0
        self.end_pending = False  # the request ends once pending is sent
        self.trailers: Headers | None = None
        self.sent_end = False
        self.full = False  # the user was told the backend is full
        self.answered = False  # a response head arrived
        self.unacked = 0  # response bytes received while paused: the window to reopen
        self.length = -1  # the response's content-length, when the client is told it
        self.received = 0  # response body bytes
        self.reserved = True  # counted in conn.reserved until attached or unused

    # --- backend.Backend ---

    def attach(self, user: User, request: BackendRequest, body: bytes, end: bool) -> None:
        conn = self.conn
        self._unreserve()
        self.user = user
        self.method = request.method
        loop = asyncio.get_running_loop()
        if request.upgrade:
            loop.call_soon(self._fail, "a WebSocket upgrade cannot be sent to an HTTP/2 backend")
            return
        if conn.closed or conn.draining:
            loop.call_soon(self._refused)
            return
        h2c = conn.h2
        try:
            sid = h2c.get_next_available_stream_id()
            self.id = sid
            conn.streams[sid] = self
            conn.opened += 1
            h2c.send_headers(sid, conn.request_headers(request), end_stream=end and not body)
        except h2.exceptions.H2Error:
            conn.streams.pop(self.id, None)
            loop.call_soon(self._refused)
            return
        if end and not body:
            self.sent_end = True
        else:
            if body:
                self._queue(body)
            self.end_pending = end
            conn.pump(self)
        conn.flush()

    def send(self, data: bytes) -> None:
        if self.id and not self.sent_end and not self.end_pending:
            self._queue(data)
            self.conn.pump(self)
            self.conn.flush()

    def end(self, trailers: Headers | None = None) -> None:
        if not self.id or self.sent_end or self.end_pending:
            return
        self.end_pending = True
        if trailers:
            self.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in CONNECTION_SPECIFIC]
        self.conn.pump(self)
        self.conn.flush()

    def done(self, *, reusable: bool) -> None:
        """The exchange is finished: a request still being sent is cancelled."""
        self._close(h2.errors.ErrorCodes.CANCEL if not self.sent_end else None)

    def discard(self) -> None:
        self._close(h2.errors.ErrorCodes.CANCEL)

    def unused(self) -> None:
        self._unreserve()
        self.conn.settle()

    def buffered(self) -> int:
        return self.pending_bytes

    # --- internals ---

    def _unreserve(self) -> None:
        if self.reserved:
            self.reserved = False
            self.conn.reserved -= 1

    def _queue(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > SEND_BUFFER:
            self.set_full()

    def set_full(self) -> None:
        full = self.pending_bytes > SEND_BUFFER or self.conn.write_paused
        if full != self.full and self.user is not None:
            self.full = full
            self.user.backend_full(full)

    def reopen(self) -> None:
        """The client reads again: reopen the stream's window by what it held back."""
        unacked, self.unacked = self.unacked, 0
        if unacked and self.id in self.conn.streams:
            try:
                self.conn.h2.increment_flow_control_window(unacked, self.id)
            except h2.exceptions.H2Error:
                return  # the stream closed meanwhile
            self.conn.flush()

    def _close(self, reset: h2.errors.ErrorCodes | None) -> None:
        self._unreserve()
        self.user = None
        self.pending.clear()
        self.pending_bytes = 0
        conn = self.conn
        if conn.streams.pop(self.id, None) is not None and reset is not None:
            with contextlib.suppress(h2.exceptions.H2Error):  # already closed on the server's side
                conn.h2.reset_stream(self.id, reset)
            conn.flush()
        conn.settle()

    def _fail(self, why: str, reset: h2.errors.ErrorCodes | None = None) -> None:
        user = self.user
        self._close(reset)
        if user is not None:
            user.upstream_failed(BadMessage(502, why))

    def _refused(self) -> None:
        user = self.user
        self._close(None)
        if user is not None:
            user.upstream_refused()

    # --- events from the connection ---

    def response(self, fields: Headers, interim: bool, ended: bool = False) -> None:
        user = self.user
        if user is None:
            return
        if len(fields) > self.conn.pool.limits.fields + 1:  # (+1: :status)
            self._fail(
                f"more than {self.conn.pool.limits.fields} header fields", h2.errors.ErrorCodes.PROTOCOL_ERROR
            )
            return
        status = 0
        length = -1
        headers: Headers = []
        try:
            for name, value in fields:
                if name[:1] == b":":
                    if name == b":status":
                        status = int(value)
                elif name == b"content-length":
                    length = int(value)
                elif name not in CONNECTION_SPECIFIC:
                    headers.append((name, value))
        except ValueError:
            self._fail("the backend sent an invalid :status or content-length")
            return
        # (h2 checks no range: a :status of 2000 went to HTTP/1.1 clients as a status line
        # no client parses, RFC 9110 15 says three digits)
        if status < 100 or status > 599 or (status < 200) != interim or status == 101:
            self._fail(f"the backend answered with status {status}")
            return
        if interim:
            user.response_head(ResponseHead(status, headers, NO_BODY, -1, True))
            return
        self.answered = True
        method = self.method
        if status in (204, 304) or method == "HEAD":
            body, announced = NO_BODY, (length if method == "HEAD" or status == 304 else -1)
        elif ended:
            # END_STREAM on the head: no body follows. A gRPC "trailers-only" answer (its
            # status in the head) must reach an HTTP/2 client as one HEADERS frame with
            # END_STREAM too: grpcio takes a head, then an empty DATA frame, for a stream
            # that lost its status ("Stream removed").
            body, announced = 0, -1
        else:
            body, announced = (length if length >= 0 else CHUNKED), -1
            self.length = length
        user.response_head(ResponseHead(status, headers, body, announced, True))

    def data(self, data: bytes, flow_length: int) -> None:
        h2c = self.conn.h2
        if self.flow.reasons:
            # Held back: the connection's window reopens now, the stream's when the client reads.
            self.unacked += flow_length
            if flow_length:
                h2c.increment_flow_control_window(flow_length)
        else:
            h2c.acknowledge_received_data(flow_length, self.id)
        self.received += len(data)
        if self.user is not None and data:
            self.user.response_body(data)

    def trailers_received(self, fields: Headers) -> None:
        if len(fields) > self.conn.pool.limits.fields:
            self._fail(
                f"more than {self.conn.pool.limits.fields} trailer fields",
                h2.errors.ErrorCodes.PROTOCOL_ERROR,
            )
            return
        if self.user is not None and self._whole():
            self.user.response_trailers([(n, v) for n, v in fields if n[:1] != b":"])

    def ended(self) -> None:
        user = self.user
        if user is not None and self._whole():
            user.response_end()

    def _whole(self) -> bool:
        """The body came to its content-length. h2 checks only DATA that ends the stream and
        forgets the length when trailers come: a short body ended by trailers reached an
        HTTP/1.1 client under the backend's content-length, and the client read the next
        response on its connection as the rest of it. The client's connection is cut instead."""
        if self.length < 0 or self.received == self.length:
            return True
        user = self.user
        self._close(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        if user is not None:
            why = f"the backend's body ended after {self.received} of its content-length {self.length} bytes"
            user.upstream_lost(ConnectionResetError(why))
        return False

    def reset(self, code: int) -> None:
        user = self.user
        self._close(None)
        if user is None:
            return
        if code == h2.errors.ErrorCodes.REFUSED_STREAM and not self.answered:
            user.upstream_refused()
        else:
            user.upstream_lost(ConnectionResetError(f"the backend reset the stream ({_code(code)})"))

    def lost(self, exc: Exception | None, stale: bool) -> None:
        user = self.user
        self.user = None
        self.reused = stale
        if user is not None:
            user.upstream_lost(exc or ConnectionResetError("the backend closed the HTTP/2 connection"))


def _code(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint, shared by the streams of many exchanges."""

    def __init__(self, endpoint: EndpointState, pool: Pool, dial: Dial) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.dial = dial
        self.scheme = b"https" if dial.ssl is not None else b"http"
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        head_bytes = pool.limits.head_bytes
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: head_bytes,
            },
        )
        # Bounded from the first frame, not only once the backend acknowledges our SETTINGS.
        self.h2.decoder.max_header_list_size = head_bytes
        self.block = HeaderBlock(head_bytes)
        self.oversized = False  # a header block went over the limit: the connection closes
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.reserved = 0  # streams handed out, not yet attached
        self.opened = 0
        self.draining = False  # a GOAWAY came: no new stream
        self.closed = False
        self.write_paused = False
        self.idle_since = pool.clock
        self.skip = 0  # bytes of the current frame still to pass to h2 (GOAWAY scanning)
        self.held = b""  # the start of a frame head (or of a GOAWAY frame) not yet whole
        self.goaways: list[int] = []  # last stream ids of GOAWAYs taken out of this read
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- for the pool ---

    def available(self) -> bool:
        if self.draining or self.closed or not self.ready.done():
            return False
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return len(self.streams) + self.reserved < limit

    def open_stream(self) -> H2Stream:
        self.reserved += 1
        return H2Stream(self)

    def tick(self, now: float, cutoff: float) -> None:
        """Close after the pool's idle time without a stream, or with a header block left open."""
        if self.block.size and now - self.block.began >= HEADER_BLOCK_SECONDS:
            self._calm("the backend left a header block unfinished")
            return
        if not self.streams and not self.reserved and self.idle_since <= cutoff:
            self.close()

    def settle(self) -> None:
        """A stream let go: a drained connection closes once empty; an idle one starts its clock."""
        if not self.streams and not self.reserved:
            self.idle_since = self.pool.clock
            if self.draining:
                self.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.draining = True  # (no stream starts on it while it closes)
        if self.transport is not None and not self.transport.is_closing():
            if not self.closed:
                try:
                    self.h2.close_connection()
                    self.flush()
                except h2.exceptions.H2Error:
                    pass
            self.transport.close()

    # --- for streams ---

    def request_headers(self, request: BackendRequest) -> Headers:
        fields: Headers = [(b":method", request.method.encode("ascii")), (b":scheme", self.scheme)]
        if request.authority:
            fields.append((b":authority", request.authority))
        fields.append((b":path", request.target))
        for name, value in request.headers:
            lower = name.lower()
            if lower not in CONNECTION_SPECIFIC:
                fields.append((lower, value))
        if request.body >= 0:
            fields.append((b"content-length", b"%d" % request.body))
        if request.te_trailers:
            fields.append((b"te", b"trailers"))
        return fields

    def pump(self, stream: H2Stream) -> None:
        """Send what the stream has waiting, as far as the windows allow."""
        h2c = self.h2
        sid = stream.id
        pending = stream.pending
        try:
            while pending:
                room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if room <= 0:
                    break
                data = pending[0]
                if len(data) <= room:
                    pending.popleft()
                else:
                    data, pending[0] = data[:room], data[room:]
                stream.pending_bytes -= len(data)
                last = not pending and stream.end_pending and stream.trailers is None
                h2c.send_data(sid, data, end_stream=last)
                stream.sent_end = last
            if not pending and stream.end_pending and not stream.sent_end:
                if stream.trailers is not None:
                    h2c.send_headers(sid, stream.trailers, end_stream=True)
                else:
                    h2c.end_stream(sid)
                stream.sent_end = True
        except h2.exceptions.H2Error:
            pending.clear()  # the stream closed (the server reset it, or answered and left)
            stream.pending_bytes = 0
        if stream.full:
            stream.set_full()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def _screen(self, data: bytes) -> bytes:
        """data as h2 is to read it, from the frame heads only: minus any GOAWAY frame (noted
        in self.goaways), minus an incomplete frame head (or GOAWAY) at its end, held for the next read, and
        cut before a frame that takes a header block over the limit (self.oversized)."""
        if self.held:
            data, self.held = self.held + data, b""
        size = len(data)
        pos = start = 0
        kept: list[bytes] | None = None
        block = self.block
        while pos < size:
            if self.skip:
                step = min(self.skip, size - pos)
                pos += step
                self.skip -= step
                continue
            if size - pos < FRAME_HEAD:
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            kind = data[pos + 3]
            if kind != GOAWAY:
                if not block.frame(kind, data[pos + 4], length, self.pool.clock):
                    self.oversized = True
                    break
                pos += FRAME_HEAD
                self.skip = length
                continue
            if size - pos < FRAME_HEAD + length:
                break  # the GOAWAY is read whole before it is understood
            last = int.from_bytes(data[pos + 9 : pos + 13], "big") & 0x7FFFFFFF
            self.goaways.append(last)
            if kept is None:
                kept = []
            kept.append(data[start:pos])
            pos += FRAME_HEAD + length
            start = pos
        if pos < size and not self.oversized:
            self.held = data[pos:]
        if kept is None:
            return data if start == 0 and pos == size else data[start:pos]
        kept.append(data[start:pos])
        return b"".join(kept)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        data = self._screen(data)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            self.flush()  # the GOAWAY h2 wrote
            self._fail_all(f"the backend broke HTTP/2 ({type(err).__name__}: {err})")
            return
        held: list[User] = []
        streams = self.streams
        for event in events:
            stream = streams.get(getattr(event, "stream_id", 0) or 0)
            if stream is not None:
                user = stream.user
                if user is not None and user.batch is None:
                    user.hold()  # what this read makes for a client leaves in one write
                    held.append(user)
            if isinstance(event, h2.events.DataReceived):
                if stream is not None:
                    stream.data(event.data or b"", event.flow_controlled_length or 0)
                else:  # a stream we let go: its bytes still count against the connection
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
            elif isinstance(event, h2.events.ResponseReceived):
                if stream is not None:
                    ended = event.stream_ended is not None
                    stream.response(cast(Headers, event.headers or []), interim=False, ended=ended)
            elif isinstance(event, h2.events.InformationalResponseReceived):
                if stream is not None:
                    stream.response(cast(Headers, event.headers or []), interim=True)
            elif isinstance(event, h2.events.TrailersReceived):
                if stream is not None:
                    stream.trailers_received(cast(Headers, event.headers or []))
            elif isinstance(event, h2.events.StreamEnded):
                if stream is not None:
                    stream.ended()
            elif isinstance(event, h2.events.StreamReset):
                if stream is not None:
                    stream.reset(event.error_code or 0)
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                if isinstance(event, h2.events.RemoteSettingsChanged) and not self.ready.done():
                    self.ready.set_result(None)
                for waiting in list(streams.values()):
                    if waiting.pending or (waiting.end_pending and not waiting.sent_end):
                        self.pump(waiting)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0)  # (not seen: taken out above)
        goaways, self.goaways = self.goaways, []
        for last_stream_id in goaways:
            self._goaway(last_stream_id)
        for user in held:
            if user.batch is not None:
                user.flush()
        self.flush()
        if self.oversized:  # (after the frames before the block: answers they ended went out)
            self._calm(f"the backend sent a header block over {self.block.limit} bytes")

    def _goaway(self, last_stream_id: int) -> None:
        self.draining = True
        self.pool.forget_h2(self)
        for sid, stream in sorted(self.streams.items()):
            if sid > last_stream_id:
                stream._refused()
        self.settle()

    def _calm(self, why: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM, every stream failed, and close."""
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        self.closed = True
        self.pool.forget_h2(self)
        for stream in list(self.streams.values()):
            stream._fail(why)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget_h2(self)
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("the backend closed before its HTTP/2 SETTINGS"))
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            # Closed without a GOAWAY: a connection that had served before may have gone
            # stale (closed by the backend's idle timeout as the stream was sent).
            stream.lost(exc, stale=self.opened > len(streams))

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.set_full()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.set_full()
