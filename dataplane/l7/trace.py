"""Traces of L7 exchanges: W3C Trace Context in, spans out, context forwarded.

Trace Context (W3C Recommendation, level 1): a request's `traceparent` continues its
trace when it is valid: version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>` in lower case,
neither id all zeros; a later version (not `ff`) is read by the same first 55 characters,
followed by nothing or by `-`. Anything else (two traceparent fields, upper case, a bad
length) counts as absent: a new trace starts and the request's `tracestate` is dropped
with it (its entries belong to the trace that was not continued). A valid context keeps
its `tracestate`, forwarded untouched. Every request sent to a backend carries a
`traceparent` of this trace whose parent is the proxy's span for that attempt, flags `01`
when the trace is sampled, `00` when not.

Sampling, once per request: a sampled parent (flag 01) is sampled; otherwise the trace id
decides, by the rule of the SDK's TraceIdRatioBased (its low 64 bits against the ratio).
An unsampled request still gets ids (for the forwarded context and the access log line)
but no span is recorded.

Spans follow the OpenTelemetry semantic conventions for HTTP spans (stable since 1.23;
docs/http/http-spans.md, with the registry's `url.*`, `server.*`, `client.*`, `network.*`,
`user_agent.*` and `error.*` attributes). A proxy is both the server of the client's
request and the client of each request it sends, so a sampled exchange is:

- one SERVER span for the request as received, from its routing to its response's end:
  `http.request.method` (`_OTHER` plus `http.request.method_original` for a method outside
  RFC 9110 and PATCH), `url.scheme`, `url.path`, `url.query`, `server.address` and
  `server.port` (from Host, or the port the scheme implies), `client.address` (the
  connection's peer), `network.protocol.version`, `user_agent.original`,
  `http.response.status_code` when a response was sent, and Bilayer's `bilayer.route`
  (`namespace/name`) and `bilayer.rule` (index). `http.route` is left out: the
  conventions define it as the server framework's path template and forbid substituting
  the path, and a Gateway API path match is not such a template. So the span's name is
  the method alone, as the conventions say when there is no route.
- one CLIENT span per request written to a backend (each resend is one more), child of the
  SERVER span: `http.request.method`, `server.address` and `server.port` (the endpoint),
  `network.peer.address` and `network.peer.port`, `url.full` (the request as sent,
  after rewrites), `network.protocol.version` (1.1), `http.request.resend_count` from the
  first resend on, `http.response.status_code` when the backend answered. It starts when
  the request is written (a new connection's connect time is in the SERVER span only; a
  connect that fails sends nothing and has no span, though it counts as a resend) and ends
  when the exchange ends or the attempt fails. Its traceparent is what the backend receives.
- one CLIENT span per mirrored copy (RequestMirror), child of the SERVER span, with the
  attributes of an attempt's span and `bilayer.mirror` true; it starts when the copy is
  written and ends when the copy is answered or given up, often after the exchange (a copy
  is fire and forget). A copy carries this trace's context with the copy's own span id as
  parent, so the mirror's spans sit beside the primary's in the same trace: comparing the
  two is what mirroring is for. Without a context the mirror would start traces of its own,
  and with the client's context forwarded untouched the copy would pose as a second call
  made by the client. A copy that is never written (no endpoint, refused, dropped before a
  connection) has no span, as a failed connect has none.

Status: Error for 5xx on the SERVER span, for 4xx and 5xx on a CLIENT span (the
conventions' rule for each kind), and for the failures below. `error.type` holds the status
as a string when that is the error, otherwise one of Bilayer's values: `reset` (the
backend closed the connection before answering), `timeout` (it did not answer in time),
`invalid_response` (its response was refused, 502), `response_incomplete` (a response
with a Content-Length ended short: cut by either side), `client_closed` (the client left
before a response), `_OTHER`; for a copy, `mirror_dropped` (a bound of mirroring dropped it)
and `mirror_failed` (reset, refused or unanswered in time). `url.query` and `url.full`
redact the values of the query keys the conventions name (AWSAccessKeyId, Signature, sig,
X-Goog-Signature).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from .framing import Headers

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from ..health import EndpointState
    from ..tracing import Tracer
    from .exchange import Exchange

# version-traceid-parentid-flags, then (versions after 00 only) "-" and anything.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_SAMPLED = 0x01
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
REDACTED_KEYS = frozenset({"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"})
_TRACEPARENT_NAME = b"traceparent"
_TRACESTATE_NAME = b"tracestate"
_USER_AGENT_NAME = b"user-agent"


def parse_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """(trace id, parent id, flags) of a valid traceparent value; None when invalid."""
    match = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if match is None:
        return None
    version, trace, parent, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, int(flags, 16)


def traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    """A version 00 traceparent value (only the sampled flag: others are not ours to set)."""
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def redact_query(query: str) -> str:
    """query with the values of credential-bearing keys replaced by REDACTED."""
    if not any(key in query for key in REDACTED_KEYS):  # (a substring test: cheap, and rarely true)
        return query
    parts = []
    for item in query.split("&"):
        key, sep, _ = item.partition("=")
        parts.append(f"{key}=REDACTED" if sep and key in REDACTED_KEYS else item)
    return "&".join(parts)


class Attempt:
    """One request written to a backend, in a sampled trace: a CLIENT span."""

    __slots__ = ("address", "end", "error", "port", "resent", "span_id", "start", "status", "target")

    def __init__(self, span_id: int, endpoint: EndpointState, resent: int, target: str) -> None:
        self.span_id = span_id
        self.start = time.time_ns()
        self.end = 0
        self.address = endpoint.address
        self.port = endpoint.port
        self.resent = resent
        self.target = target
        self.status = 0  # the backend's status, when it answered
        self.error: str | None = None  # error.type


class Trace:
    """The trace of one exchange: its ids, whether it is sampled, and (when sampled) what
    its spans need that the exchange does not keep."""

    __slots__ = (
        "attempt",
        "attempts",
        "continued",
        "forwarding",
        "parent_id",
        "sampled",
        "span_id",
        "start",
        "trace_id",
        "tracer",
        "user_agent",
    )

    def __init__(self, tracer: Tracer, headers: Headers) -> None:
        self.tracer = tracer
        value = None
        parents = 0
        seen = False  # the request has trace context fields, to be replaced
        agent = None
        for name, field in headers:
            size = len(name)  # (a length test first: most fields are neither)
            if size == 11 and name.lower() == _TRACEPARENT_NAME:
                value = field
                parents += 1
                seen = True
            elif size == 10:
                lower = name.lower()
                if lower == _TRACESTATE_NAME:
                    seen = True
                elif lower == _USER_AGENT_NAME:
                    agent = field
        context = parse_traceparent(value) if value is not None and parents == 1 else None
        if context is None:
            self.trace_id = tracer.new_trace_id()
            self.parent_id = 0
            self.sampled = tracer.sample(self.trace_id)
        else:
            self.trace_id, self.parent_id, flags = context
            self.sampled = bool(flags & _SAMPLED) or tracer.sample(self.trace_id)
        self.continued = context is not None
        self.forwarding = seen  # request fields to take out before ours go in
        self.span_id = tracer.new_span_id()
        self.user_agent = agent
        self.attempts: list[Attempt] = []
        self.attempt: Attempt | None = None
        if self.sampled:
            self.start = time.time_ns()
            tracer.counts.started += 1
        else:
            self.start = 0

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    # --- hooks of the exchange ---

    def attempt_begins(
        self, headers: Headers, endpoint: EndpointState, resent: int, target: str, modified: bool
    ) -> None:
        """A request is about to be written to endpoint: put our context in its headers
        (modified: a header modifier ran, and may have added trace context fields)."""
        if self.attempt is not None:  # (every failure path ends its attempt: defensive)
            self.attempt_failed("_OTHER")
        if self.sampled:
            attempt = self.attempt = Attempt(self.tracer.new_span_id(), endpoint, resent, target)
            self.attempts.append(attempt)
            self.tracer.counts.started += 1
            parent = attempt.span_id
        else:
            parent = self.span_id  # no span: the context names the request's own id
        self._put_context(headers, parent, modified)

    def copy_span(self) -> CopySpan | None:
        """The span of a mirrored copy about to be made; None when the trace is not sampled."""
        return CopySpan(self.tracer, self.trace_id, self.span_id) if self.sampled else None

    def copy_begins(self, headers: Headers, span: CopySpan | None, target: str, modified: bool) -> None:
        """A mirrored copy's headers are being made: put our context in them (the copy's
        span as parent; the request's own id when unsampled, as for an attempt)."""
        if span is not None:
            span.target = target
            parent = span.span_id
        else:
            parent = self.span_id
        self._put_context(headers, parent, modified)

    def _put_context(self, headers: Headers, parent: int, modified: bool) -> None:
        if self.forwarding or modified:
            drop = (_TRACEPARENT_NAME,) if self.continued else (_TRACEPARENT_NAME, _TRACESTATE_NAME)
            headers[:] = [(n, v) for n, v in headers if len(n) not in (10, 11) or n.lower() not in drop]
        headers.append((_TRACEPARENT_NAME, traceparent(self.trace_id, parent, self.sampled)))

    def attempt_failed(self, error: str, status: int = 0) -> None:
        """The current attempt failed and will not be answered (resent or given up)."""
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None
            attempt.end = time.time_ns()
            attempt.error = error
            attempt.status = status

    def end(self, exchange: Exchange) -> None:
        """The exchange is over: record its spans, when sampled."""
        if not self.sampled:
            return
        now = time.time_ns()
        status = exchange.status if exchange.status != 499 else 0  # 499: nothing was sent
        resp = exchange.resp_head
        incomplete = resp is not None and resp.body >= 0 and exchange.bytes_out < resp.body
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None
            attempt.end = now
            if resp is not None:
                attempt.status = resp.status
                if incomplete:
                    attempt.error = "response_incomplete"
                elif resp.status >= 400:
                    attempt.error = str(resp.status)
            else:
                attempt.error = _LOCAL_ERRORS.get(exchange.status, "_OTHER")
        tracer = self.tracer
        method = exchange.head.method
        name = method if method in KNOWN_METHODS else "HTTP"
        error = None
        if not status:
            error = "client_closed"
        elif incomplete:
            error = "response_incomplete"
        elif status >= 500:
            error = str(status)
        tracer.record(
            name,
            tracer.SERVER,
            self.trace_id,
            self.span_id,
            self.parent_id,
            start=self.start,
            end=now,
            attributes=self._server_attributes(exchange, status, error),
            error=None if error is None else "",
        )
        for sent in self.attempts:
            attributes = _client_attributes(exchange, sent)
            failed = sent.error is not None or sent.status >= 400
            tracer.record(
                name,
                tracer.CLIENT,
                self.trace_id,
                sent.span_id,
                self.span_id,
                start=sent.start,
                end=sent.end or now,
                attributes=attributes,
                error="" if failed else None,
                remote_parent=False,
            )

    def _server_attributes(
        self, exchange: Exchange, status: int, error: str | None
    ) -> dict[str, AttributeValue]:
        head = exchange.head
        listener = exchange.listener
        attributes = _method_attributes(head.method)
        attributes["url.scheme"] = listener.scheme
        attributes["url.path"] = head.path
        if head.query:
            attributes["url.query"] = redact_query(head.query)
        if head.host_name:
            attributes["server.address"] = head.host_name
            attributes["server.port"] = _host_port(head.host, listener.scheme)
        attributes["client.address"] = exchange.conn.client_ip
        attributes["network.protocol.version"] = head.version
        if self.user_agent is not None:
            attributes["user_agent.original"] = self.user_agent.decode("latin-1")
        if status:
            attributes["http.response.status_code"] = status
        if error is not None:
            attributes["error.type"] = error
        rule = exchange.rule
        if rule is not None:
            attributes["bilayer.route"] = rule.route
            attributes["bilayer.rule"] = rule.index
        return attributes


def _method_attributes(method: str) -> dict[str, AttributeValue]:
    if method in KNOWN_METHODS:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method}


def _client_attributes(exchange: Exchange, attempt: Attempt) -> dict[str, AttributeValue]:
    attributes = _sent_attributes(exchange.head.method, attempt.address, attempt.port, attempt.target)
    if attempt.resent:
        attributes["http.request.resend_count"] = attempt.resent
    if attempt.status:
        attributes["http.response.status_code"] = attempt.status
    if attempt.error is not None:
        attributes["error.type"] = attempt.error
    return attributes


def _sent_attributes(method: str, address: str, port: int, target: str) -> dict[str, AttributeValue]:
    """What a CLIENT span says of the request it stands for: where it went, and how."""
    attributes = _method_attributes(method)
    authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    path, sep, query = target.partition("?")
    attributes["url.full"] = f"http://{authority}{path}" + (f"?{redact_query(query)}" if sep else "")
    attributes["server.address"] = address
    attributes["server.port"] = port
    attributes["network.peer.address"] = address
    attributes["network.peer.port"] = port
    attributes["network.protocol.version"] = "1.1"
    return attributes


class CopySpan:
    """A mirrored copy of a request in a sampled trace: a CLIENT span, recorded by the copy
    itself when it finishes, since it may outlive the exchange."""

    __slots__ = ("address", "parent_id", "port", "span_id", "start", "status", "target", "trace_id", "tracer")

    def __init__(self, tracer: Tracer, trace_id: int, parent_id: int) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.parent_id = parent_id  # the exchange's SERVER span
        self.span_id = tracer.new_span_id()
        self.target = ""  # the request line's target, as sent
        self.address = ""  # the mirror endpoint, once the copy is written to it
        self.port = 0
        self.start = 0
        self.status = 0  # the mirror's status, when it answered

    def sent(self, endpoint: EndpointState) -> None:
        """The copy is written to endpoint: the span starts."""
        self.address = endpoint.address
        self.port = endpoint.port
        self.start = time.time_ns()
        self.tracer.counts.started += 1

    def finish(self, method: str, result: str) -> None:
        """The copy is over (result: answered, dropped or failed): record its span."""
        if not self.start:
            return  # never written: no span, as for a connect that failed
        attributes = _sent_attributes(method, self.address, self.port, self.target)
        attributes["bilayer.mirror"] = True
        if self.status:
            attributes["http.response.status_code"] = self.status
        if result != "answered":
            attributes["error.type"] = f"mirror_{result}"
        elif self.status >= 400:
            attributes["error.type"] = str(self.status)
        tracer = self.tracer
        tracer.record(
            method if method in KNOWN_METHODS else "HTTP",
            tracer.CLIENT,
            self.trace_id,
            self.span_id,
            self.parent_id,
            start=self.start,
            end=time.time_ns(),
            attributes=attributes,
            error="" if "error.type" in attributes else None,
            remote_parent=False,
        )


def _host_port(host: bytes, scheme: str) -> int:
    """The port of a Host value, or the one its scheme implies."""
    end = host.rfind(b"]")  # an IPv6 literal's colons are not the port's
    colon = host.rfind(b":")
    if colon > end and host[colon + 1 :].isdigit():
        return int(host[colon + 1 :])
    return 443 if scheme == "https" else 80


# What an attempt that got no response ended as, by the status the proxy answered.
_LOCAL_ERRORS = {502: "invalid_response", 504: "timeout", 499: "client_closed"}
