"""Reading HTTP/1.1 from a peer: llhttp (httptools) splits the bytes into messages, and what
a peer can make the proxy hold is bounded while it arrives.

httptools hands a header over only once it is complete, growing it by concatenation until
then; a limit checked in the callback comes too late (one 64 MB header cost seconds of CPU).
So the bytes are counted as they are fed: from the end of one message to the end of the next
head, and from each chunk-size line to the end of the trailers. While counting, no more than
the remaining allowance is fed at once, so the parser never holds more than the limit.

A request reader turns each head into a validated RequestHead (framing.py) for its sink, the
client connection; a response reader does the same for the upstream connection, and knows
whether a response ended exactly at the end of the bytes read (a connection with bytes past
a response's end is never reused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

import httptools

from . import framing
from .framing import BadMessage, RequestHead, ResponseHead

# A chunked body of more than this many chunks must average at least MIN_CHUNK_AVERAGE
# bytes a chunk: a client sending 1-byte chunks made each byte cost a Python callback.
MAX_TINY_CHUNKS: Final = 4096
MIN_CHUNK_AVERAGE: Final = 32


@dataclass(frozen=True)
class Limits:
    """Bounds on one message's head and trailers (Envoy's defaults: 60 KiB, 100 fields)."""

    head_bytes: int = 60 * 1024
    fields: int = 100
    url_bytes: int = 8 * 1024


class StopReading(Exception):
    """Raised by a sink: parse no further (the rest of the stream is dropped)."""


class RequestSink(Protocol):
    def request_head(self, head: RequestHead) -> None: ...

    def request_body(self, data: bytes) -> None: ...

    def request_end(self) -> None: ...


class ResponseSink(Protocol):
    def response_head(self, head: ResponseHead) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_trailers(self, trailers: framing.Headers) -> None:
        """The response ends with these trailers (response_end follows)."""

    def response_end(self) -> None: ...


class Parser(Protocol):
    def feed_data(self, data: bytes | memoryview) -> None: ...


class _NoSink:
    """Where a response goes when no exchange waits for it (an extra one is dropped)."""

    def response_head(self, head: ResponseHead) -> None:
        pass

    def response_body(self, data: bytes) -> None:
        pass

    def response_trailers(self, trailers: framing.Headers) -> None:
        pass

    def response_end(self) -> None:
        pass


NO_SINK: Final = _NoSink()


class Reader:
    """The bounded feeding shared by both directions."""

    __slots__ = (
        "body_bytes",
        "chunks",
        "counted",
        "counting",
        "fields",
        "head_bytes",
        "in_head",
        "in_message",
        "limits",
        "malformed",
        "max_fields",
        "nfields",
        "parser",
        "phase",
        "too_large",
        "trailers",
    )

    def __init__(self, limits: Limits, *, malformed: int, too_large: int) -> None:
        self.limits = limits
        self.head_bytes = limits.head_bytes  # (read on every feed and field: one lookup)
        self.max_fields = limits.fields
        self.malformed = malformed  # the status for a message llhttp cannot parse
        self.too_large = too_large  # the status for a head or trailers over the limits
        self.counting = True  # feeding a head or trailers: bytes count against the limit
        self.counted = 0
        self.phase = 0  # incremented whenever counting starts (a head, trailers)
        self.in_message = False
        self.in_head = False
        self.fields: framing.Headers = []
        self.trailers: framing.Headers | None = None  # after a chunked body
        self.nfields = 0
        self.chunks = 0  # chunks of the current body
        self.body_bytes = 0  # bytes of the current chunked body
        self.parser: Parser

    def feed(self, data: bytes) -> bytes | None:
        """Parse data. Returns the bytes after a head that switched protocols (Upgrade,
        101), else None; raises BadMessage when the peer broke HTTP or a limit."""
        try:
            room = self.head_bytes - self.counted
            if not self.counting or len(data) <= room:
                if self.counting:
                    self.counted += len(data)
                self.parser.feed_data(data)
                return None
            return self._feed_bounded(memoryview(data))
        except httptools.HttpParserUpgrade as upgrade:
            return data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__ or err.__cause__
            if isinstance(cause, (BadMessage, StopReading)):
                raise cause from None
            raise
        except httptools.HttpParserError as err:
            raise BadMessage(self.malformed, f"malformed HTTP: {err}") from None

    def _feed_bounded(self, view: memoryview) -> bytes | None:
        while view:
            if not self.counting:
                self.parser.feed_data(view)
                return None
            room = self.head_bytes - self.counted
            if room <= 0:
                raise BadMessage(self.too_large, self._too_large_message())
            piece, view = view[:room], view[room:]
            self.counted += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                return bytes(piece[upgrade.args[0] :]) + bytes(view)
        return None

    def _too_large_message(self) -> str:
        return "headers too large" if self.in_head or not self.in_message else "trailers too large"

    def _start_counting(self) -> None:
        self.counting = True
        self.counted = 0
        self.phase += 1

    # httptools callbacks shared by both directions

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nfields += 1
        if self.nfields > self.max_fields:
            raise BadMessage(self.too_large, f"more than {self.max_fields} header fields")
        if self.in_head:
            self.fields.append((name, value))
        elif self.trailers is None:  # a trailer after a chunked body (counted like a head)
            self.trailers = [(name, value)]
        else:
            self.trailers.append((name, value))

    def on_chunk_complete(self) -> None:
        # A chunk's data ended: the next chunk-size line (extensions and all) counts, and
        # after the last chunk, the trailers. The chunks of one body are counted too:
        # thousands of tiny ones are a way to make each byte cost the proxy microseconds.
        self._start_counting()
        self.nfields = 0
        self.chunks += 1
        if self.chunks > MAX_TINY_CHUNKS and self.body_bytes < MIN_CHUNK_AVERAGE * self.chunks:
            raise BadMessage(
                self.malformed,
                f"more than {MAX_TINY_CHUNKS} chunks averaging under {MIN_CHUNK_AVERAGE} bytes",
            )

    def _body_begins(self) -> None:
        """A chunked body begins: its first chunk-size line counts like the others."""
        self.chunks = self.body_bytes = 0
        self._start_counting()


class RequestReader(Reader):
    """Requests from a client."""

    __slots__ = ("requests", "sink", "url")

    def __init__(self, sink: RequestSink, limits: Limits) -> None:
        super().__init__(limits, malformed=400, too_large=431)
        self.sink = sink
        self.url = b""
        self.parser = self.requests = httptools.HttpRequestParser(self)

    def restart(self) -> None:
        """A fresh parser, after a head llhttp took for an upgrade the proxy refused."""
        self.parser = self.requests = httptools.HttpRequestParser(self)
        self._start_counting()
        self.in_message = self.in_head = False

    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self.fields = []
        self.trailers = None  # (a request's trailers are not forwarded)
        self.nfields = 0
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.url_bytes:
            raise BadMessage(414, "request line too long")

    def on_headers_complete(self) -> None:
        parser = self.requests
        head = framing.request_head(
            parser.get_method(),
            parser.get_http_version(),
            self.url,
            self.fields,
            keep_alive=parser.should_keep_alive(),
            upgrading=parser.should_upgrade(),
        )
        self.fields = []
        self.in_head = False
        if head.body == framing.CHUNKED:
            self._body_begins()
        else:
            self.counting = False
        self.sink.request_head(head)

    def on_body(self, body: bytes) -> None:
        self.counting = False
        self.body_bytes += len(body)
        self.sink.request_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.counting = True  # the next head starts here
        self.counted = 0
        self.phase += 1
        self.sink.request_end()


class ResponseReader(Reader):
    """Responses from a backend, to the request the upstream connection sent last."""

    __slots__ = ("dirty", "ended", "interim", "method", "responses", "sink", "skip_body", "upgrade")

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits, malformed=502, too_large=502)
        self.sink: ResponseSink = NO_SINK  # the exchange being answered
        self.parser = self.responses = httptools.HttpResponseParser(self)
        self.method = "GET"
        self.upgrade = b""
        self.ended = False  # the response to the current request has ended
        self.dirty = False  # bytes came after its end: the connection cannot be reused
        self.interim = False
        self.skip_body = False  # a HEAD response: no body follows, whatever the head says

    def expect(self, sink: ResponseSink, method: str, upgrade: bytes) -> None:
        """A request was sent: its response goes to sink and is parsed against method and
        upgrade."""
        self.sink = sink
        self.method = method
        self.upgrade = upgrade
        self.ended = False

    def on_message_begin(self) -> None:
        if self.ended:
            self.dirty = True  # a second response with no request: never reuse this connection
        self.in_message = self.in_head = True
        self.fields = []
        self.trailers = None
        self.nfields = 0

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.ended:
            self.counting = False
            return  # the head of an extra response (dirty): nobody asked for it
        parser = self.responses
        status = parser.get_status_code()
        head = framing.response_head(
            status, self.fields, parser.should_keep_alive(), self.method, self.upgrade
        )
        self.fields = []
        if head.body == framing.CHUNKED:
            self._body_begins()
        else:
            self.counting = False
        self.interim = status < 200 and status != 101
        self.sink.response_head(head)
        if self.method == "HEAD" and not self.interim and status != 101:
            # llhttp does not know the request was HEAD and would wait for the body the
            # head announces: the response ends here, and any byte that follows is extra.
            self.skip_body = True
            self._end()

    def on_body(self, body: bytes) -> None:
        self.counting = False
        self.body_bytes += len(body)
        if self.skip_body or self.ended:
            self.dirty = True
            return
        self.sink.response_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.counting = True  # the next head (there should be none) counts from here
        self.counted = 0
        self.phase += 1
        if self.interim:
            self.interim = False  # 100 Continue, 103: the real response follows
        elif not self.skip_body and not self.ended:
            self.ended = True
            trailers = self.trailers
            if trailers is not None:
                self.trailers = None
                # Framing and hop-by-hop names never cross (a trailer cannot frame anything).
                kept = [(n, v) for n, v in trailers if n.lower() not in framing.PROTECTED]
                if kept:
                    self.sink.response_trailers(kept)
            self.sink.response_end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.sink.response_end()

    def after_feed(self) -> None:
        """Once a read is parsed: a HEAD response ended inside llhttp's view of a body."""
        if self.skip_body:
            self.skip_body = False
            self.parser = self.responses = httptools.HttpResponseParser(self)
            self.in_message = False
            self._start_counting()
