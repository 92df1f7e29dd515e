"""One request and its response, through the proxy.

An exchange is created from a validated request head (framing.RequestHead). Once it is its
connection's current exchange (`start`), it is routed, filtered, sent to an endpoint of the
chosen backend, and the response streams back. Everything is callbacks on the two
connections' protocols and `call_later` timers; a task exists only while a new upstream
connection is being made.

What the exchange uses of its client connection is `Downstream` below; of its backend
connection, the Upstream methods attach/send/done/discard; the upstream's response reader
reports to the exchange directly (it is a ResponseSink). Framing, in both directions,
is written from the proxy's own parse (framing.py), never copied from a peer.

Resends follow retry.may_resend: never once the client has seen a byte of the response,
never for a non-idempotent request that may have reached a backend, and only while every
body byte read so far is still held (at most KEEP_BODY bytes are kept for that).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Final, Literal, Protocol
from urllib.parse import parse_qsl

from ..health import EndpointState
from ..logs import fields
from ..table import PathRewrite
from . import framing, grpc
from .backend import Backend, BackendRequest
from .config import Cluster, Rule, Target, retry_after
from .cors import CorsPolicy
from .framing import (
    NO_BODY,
    REQUEST_ID,
    UNTIL_CLOSE,
    BadMessage,
    RequestHead,
    ResponseHead,
)
from .mirror import MAX_COPIES, MirrorCopy, shadow_host
from .retry import Failure, give_up_status, may_resend
from .session import Pin
from .trace import CopySpan, Trace
from .upstream import Upstream

if TYPE_CHECKING:
    from .listener import ServingL7

log = logging.getLogger("bilayer.access")

KEEP_BODY: Final = 64 * 1024
# Interim responses (1xx) passed on per request: each one moves bytes, so a backend sending
# them forever would otherwise hold the exchange past every idle timeout.
MAX_INTERIM: Final = 32

# How the response body goes to the client (the HTTP/1.1 writer's choice, kept per exchange).
IDENTITY: Final = 0
CHUNK: Final = 1

# Why the proxy answered a request itself, or ended its exchange, as the access log says.
Reason = Literal[
    "misdirected",  # 421: the TLS certificate of the connection does not cover the host
    "no_route",  # 404
    "bad_request",  # 400 (or another 4xx/5xx) for a request the proxy refuses
    "too_large",  # 413: the body is over --max-body-size
    "cors_preflight",  # 204: a CORS preflight answered
    "cors_rejected",  # 403: a CORS preflight from an origin not allowed
    "rate_limited",  # 429
    "redirect",  # 3xx: a RequestRedirect filter
    "no_backend",  # 500: the rule has no backend with weight
    "unresolved_backend",  # 500: the backend names no Service port the table knows
    "no_endpoint",  # 503: no ready endpoint
    "connect_failed",  # 503: no connection to an endpoint, not resent
    "upstream_reset",  # 503 (or a cut response): the backend closed before or while answering
    "bad_response",  # 502 (or a cut response): the backend's response was refused
    "timeout",  # 504 (or a cut response): the request or the backend took too long
    "client_timeout",  # 408: the client's body or trailers came too slowly
    "client_closed",  # 499 (or a cut response): the client went away first
]
_GIVE_UP: Final[dict[Failure, Reason]] = {
    Failure.CONNECT: "connect_failed",
    Failure.RESET: "upstream_reset",
    Failure.REFUSED: "upstream_reset",
    Failure.GRPC_STATUS: "bad_response",  # (forwarded, never given up on)
    Failure.TIMEOUT: "timeout",
    Failure.STATUS: "bad_response",  # (a retried status is forwarded, never given up on)
}
_PROTOCOLS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2"}

# Request ids (128 random bits as 32 hex digits) are made 256 at a time: per request, a
# list pop, where os.urandom(16).hex() is a system call and formatting a random 128-bit
# int costs more than either (callgrind).
_REQUEST_IDS: Final[list[bytes]] = []


def _more_request_ids() -> bytes:
    """A new request id, and the stock refilled."""
    block = os.urandom(16 * 256).hex().encode()
    _REQUEST_IDS.extend([block[i : i + 32] for i in range(32, len(block), 32)])
    return block[:32]


os.register_at_fork(after_in_child=_REQUEST_IDS.clear)  # a child never repeats its parent's ids


def log_connection_answer(listener: ServingL7, client: str, status: int, body_bytes: int) -> None:
    """The access-log line of a response the connection made before any request was
    parsed: a malformed or oversized head (400, 431, 505...) or a head that came too slowly
    (408). No method or URL is known; the reason says which it was."""
    settings = listener.settings
    if not settings.access_log or (
        settings.access_log_sample < 1.0 and random.random() >= settings.access_log_sample
    ):
        return
    reason: Reason = (
        "client_timeout" if status == 408 else "too_large" if status in (413, 431) else "bad_request"
    )
    request_id = _REQUEST_IDS.pop() if _REQUEST_IDS else _more_request_ids()
    log.info(
        "request",
        extra=fields(
            request_id=request_id.decode("ascii"),
            client=client,
            method=None,
            url=None,
            protocol=None,
            user_agent=None,
            status=status,
            reason=reason,
            bytes=body_bytes,
            seconds=None,
            upstream=None,
            route=None,
            rule=None,
            retries=0,
            trace_id=None,
        ),
    )


class Downstream(Protocol):
    """What an exchange uses of the client connection it belongs to (an HTTP/1.1
    connection, or one stream of an HTTP/2 connection).

    The response goes to the client as events (a head, body data, an end, interims, a
    local answer), never as bytes: each protocol frames them itself. While the exchange
    holds its writes (`hold`), a writer may collect what it writes in `exchange.batch`
    and gets the batch back in `send_batch` at `flush`: one write per backend read."""

    client_ip: str
    sni: str | None  # the TLS server name the client asked for, if any

    @property
    def closing(self) -> bool:
        """The connection closes (or, for HTTP/2, sent GOAWAY) after what is in flight."""

    def send_head(
        self, exchange: Exchange, status: int, headers: framing.Headers, body: int, length: int
    ) -> None:
        """The response head (status >= 200, not 101). body: a length >= 0, CHUNKED or
        UNTIL_CLOSE (a body of unknown length follows), or NO_BODY (length: the
        Content-Length to announce, for HEAD and 304, or -1)."""

    def send_data(self, exchange: Exchange, data: bytes) -> None:
        """Response body bytes (never empty)."""

    def send_end(self, exchange: Exchange, trailers: framing.Headers | None) -> None:
        """The response body is complete; trailers: the backend's, to pass on if the
        client's protocol can carry them."""

    def send_interim(self, exchange: Exchange, status: int, headers: framing.Headers) -> None:
        """An interim response (1xx other than 101): the real one follows."""

    def send_local(
        self, exchange: Exchange, status: int, message: str, headers: framing.Headers | None
    ) -> int:
        """A whole response the proxy makes (message: its one-line body); returns the
        body bytes sent."""

    def send_switch(self, exchange: Exchange, headers: framing.Headers) -> None:
        """101 Switching Protocols, written at once (the sockets change hands next)."""

    def send_batch(self, batch: list[bytes]) -> None:
        """What the writer collected in exchange.batch while writes were held."""

    write_blocked: bool  # the client's socket is full (its reader is slower than the backend)

    def flush_after_read(self, exchange: Exchange) -> None:
        """Call exchange.flush_body() once the client's current read is parsed."""

    def pause(self, reason: str) -> None:
        """Stop reading the client's request bytes for this reason."""

    def resume(self, reason: str) -> None: ...

    def abort(self) -> None:
        """Cut the connection: a response already started can never look complete."""

    def exchange_finished(self, exchange: Exchange) -> None: ...

    def start_tunnel(self, exchange: Exchange, upstream: Upstream, backend_early: bytes) -> None:
        """Hand the client's socket and the backend's to a byte pair (after a 101)."""


class Exchange:
    """A request from the client and the response that goes back."""

    __slots__ = (
        "_query_values",
        "attempt_timer",
        "batch",
        "body_out",
        "bytes_out",
        "close_after",
        "cluster",
        "conn",
        "copies",
        "deadline",
        "done",
        "endpoint",
        "entry_prefix",
        "fresh",
        "grpc",
        "head",
        "held",
        "interims",
        "listener",
        "pending",
        "pin",
        "reason",
        "received",
        "request_done",
        "request_id",
        "request_timer",
        "request_whole",
        "resent",
        "resp_head",
        "resp_mode",
        "resp_started",
        "resp_trailers",
        "rule",
        "sent",
        "started",
        "status",
        "target",
        "trace",
        "tried",
        "tunnel_early",
        "upstream",
    )

    def __init__(self, listener: ServingL7, conn: Downstream, head: RequestHead) -> None:
        self.listener = listener
        self.conn = conn
        self.head = head
        self.request_done = False
        self.request_whole = not head.has_body  # the client has sent the whole request
        self.received = 0  # body bytes from the client
        self.pending: list[bytes] = []  # body bytes not yet written to the current upstream
        self.sent: list[bytes] | None = []  # body bytes written and kept for a resend; None: dropped
        self.tunnel_early = b""  # client bytes after an upgrade request, held until the 101
        self.batch: list[bytes] | None = None  # response bytes of the current read
        self.body_out: list[bytes] | None = None  # request body bytes of the client's current read
        self.rule: Rule | None = None
        self.entry_prefix = ""
        self.target: Target | None = None  # the rule's backend chosen for this request
        self.cluster: Cluster | None = None
        self.pin: Pin | None = None  # the endpoint a session token keeps this client on
        self.copies: list[MirrorCopy] | None = None  # mirrored copies still taking the body
        self.upstream: Backend | None = None
        self.endpoint: EndpointState | None = None
        self.tried: set[EndpointState] = set()
        self.resent = 0
        self.interims = 0
        self.fresh = False  # the next attempt opens a new connection (a pooled one went stale)
        self.resp_head: ResponseHead | None = None
        self.resp_started = False
        self.resp_trailers: framing.Headers | None = None  # the backend's trailers, for the client
        self.resp_mode = IDENTITY
        self.close_after = False
        self.done = False
        self.status = 0
        self.bytes_out = 0
        self.started = 0.0
        self.request_timer: asyncio.TimerHandle | None = None
        self.attempt_timer: asyncio.TimerHandle | None = None
        self._query_values: dict[str, str] | None = None
        self.trace: Trace | None = None  # when tracing is on (listener.tracer)
        self.request_id = head.request_id  # the client's, or b"" until one is made (request_id())
        self.reason: Reason | None = None  # set when the proxy answers or ends it itself
        self.grpc = False  # a gRPC call (content-type application/grpc*): answered gRPC-style
        self.deadline: float | None = None  # from its grpc-timeout (monotonic)
        self.held: ResponseHead | None = None  # a gRPC head held until its status is known

    # --- the request body, from the client connection ---

    def request_body(self, data: bytes) -> None:
        if self.done:
            return
        self.received += len(data)
        limit = self.listener.settings.max_body_size
        if limit and self.received > limit:
            self._fail(413, "request body too large", "too_large", close=True)
            return
        copies = self.copies
        if copies is not None:
            for copy in copies:
                copy.body(data)
        if self.upstream is not None:
            out = self.body_out
            if out is None:
                # What this read of the client holds for the body leaves in one write (and
                # one chunk), when the connection flushes after parsing the read.
                self.body_out = [data]
                self.conn.flush_after_read(self)
            else:
                out.append(data)
        else:
            self.pending.append(data)  # no backend yet: sent on attach
            self.conn.pause("waiting-upstream")

    def flush_body(self) -> None:
        out, self.body_out = self.body_out, None
        upstream = self.upstream
        if out and upstream is not None:
            data = out[0] if len(out) == 1 else b"".join(out)
            upstream.send(data)
            self._keep(data)

    def request_end(self) -> None:
        self.request_done = self.request_whole = True
        if self.body_out:
            self.flush_body()
        if self.upstream is not None:
            self.upstream.end()
        copies, self.copies = self.copies, None
        if copies is not None:
            for copy in copies:
                copy.end()

    def _keep(self, data: bytes) -> None:
        sent = self.sent
        if sent is not None:
            if self.received <= KEEP_BODY:
                sent.append(data)
            else:
                self.sent = None  # too big to keep: this request can no longer be resent

    # --- RequestView, for matching ---

    def header(self, name: str) -> str | None:
        wanted = name.encode()
        values = [v for n, v in self.head.headers if n.lower() == wanted]
        return b",".join(values).decode("latin-1") if values else None

    def query(self, name: str) -> str | None:
        if self._query_values is None:
            self._query_values = {}
            for key, value in parse_qsl(self.head.query, keep_blank_values=True):
                self._query_values.setdefault(key, value)
        return self._query_values.get(name)

    # --- routing ---

    def start(self) -> None:
        """Route and send; the exchange is now the connection's current one."""
        self.started = time.monotonic()
        head = self.head
        if head.method == "POST" and head.headers:  # (every gRPC call is a POST)
            self.grpc, timeout = grpc.call_of(head.headers)
            if timeout is not None:
                self.deadline = self.started + timeout
        listener = self.listener
        if listener.tracer is not None:
            self.trace = Trace(listener.tracer, head.headers)
        config = listener.config
        host = head.host_name
        sni = self.conn.sni
        if sni is not None and config.tls is not None and config.tls.misdirected(sni, host):
            self.local(421, "this connection's certificate does not cover the requested host", "misdirected")
            return
        entry = config.router.match(host, head.path, head.method, self)
        if entry is None:
            self.local(404, "no route for this host and path", "no_route")
            return
        rule = self.rule = config.rules[entry.rule]
        if entry.path_type == "PathPrefix":
            self.entry_prefix = entry.path_value
        if head.encoded_slash and not rule.allow_encoded_slashes:
            self.local(400, "encoded slash (%2F) or backslash (%5C) in the path", "bad_request", close=True)
            return
        if rule.cors is not None and head.method == "OPTIONS" and self._preflight(rule.cors):
            return
        if rule.limiter is not None and self._rate_limited(rule):
            return
        if rule.redirect is not None:
            self._redirect(rule)
            return
        target = self._session_target(rule) if rule.session is not None else None
        if target is None:
            target = rule.backends.pick()
            if target is None:
                self.local(500, "the matched rule has no backend", "no_backend")
                return
        cluster = target.cluster
        if cluster is None:
            self.local(500, "the chosen backend does not resolve to a Service", "unresolved_backend")
            return
        if not cluster.endpoints:
            self.local(503, "no ready endpoint", "no_endpoint")
            return
        limit = listener.settings.max_body_size
        if limit and head.body > limit:  # announced too big: refused before any backend sees it
            self.local(413, "request body too large", "too_large", close=True)
            return
        self.target = target
        if target.mirrors and not head.upgrade:
            self._mirror(rule, target)
        self.cluster = cluster
        cluster.stats.requests += 1
        cluster.stats.active_requests += 1
        timeout = rule.request_timeout
        if self.deadline is not None:  # the call's own deadline, if sooner
            timeout = (
                min(timeout, self.deadline - self.started)
                if timeout is not None
                else self.deadline - self.started
            )
        if timeout is not None:
            self.request_timer = listener.loop.call_later(timeout, self._request_timed_out)
        if not self.request_whole:
            self.conn.pause("waiting-upstream")
        self._attempt()

    def _preflight(self, cors: CorsPolicy) -> bool:
        """Answer a CORS preflight (True), or leave an ordinary OPTIONS request alone."""
        origin = self.header("origin")
        method = self.header("access-control-request-method")
        if origin is None or method is None:
            return False
        if not cors.allows(origin):
            self.local(403, "CORS: this origin is not allowed", "cors_rejected")
            return True
        requested = self.header("access-control-request-headers")
        headers = cors.preflight(
            origin.encode("latin-1"),
            method.encode("latin-1"),
            requested.encode("latin-1") if requested is not None else None,
        )
        self.local(204, "", "cors_preflight", headers=headers)
        return True

    def _session_target(self, rule: Rule) -> Target | None:
        """The backend of a valid session token whose endpoint is available; None: balance."""
        session = rule.session
        assert session is not None
        pin = session.find(session.token(self.head.headers), time.time())
        if pin is None:
            return None
        target = rule.backends.all[pin.position]
        if target.cluster is None or not pin.endpoint.available(time.monotonic()):
            return None
        self.pin = pin
        return target

    def _mirror(self, rule: Rule, target: Target) -> None:
        """Start the copies of this request that the rule's and the backend's mirrors take."""
        listener = self.listener
        head: BackendRequest | None = None
        trace = self.trace
        for mirror in target.mirrors:
            if mirror.share < 1.0 and random.random() >= mirror.share:
                continue
            if listener.mirror_copies >= MAX_COPIES:
                mirror.cluster.stats.mirror_dropped += 1
                continue
            # A sampled copy names its own span in its traceparent: a head each. Otherwise
            # the copies of one request are alike and share one.
            span = trace.copy_span() if trace is not None else None
            if head is None or span is not None:
                head = self._request_head(rule, None, span)
            copy = MirrorCopy(
                listener, mirror.cluster, head, self.head.method, rule.backend_request_timeout, span=span
            )
            for data in self.pending:  # body bytes read before the exchange started
                copy.body(data)
            if self.request_whole:
                copy.end()
            else:
                if self.copies is None:
                    self.copies = []
                self.copies.append(copy)
            copy.start()

    def _rate_limited(self, rule: Rule) -> bool:
        limiter = rule.limiter
        assert limiter is not None
        if limiter.key.type == "Header" and limiter.key.header:
            key = (self.header(limiter.key.header) or "").encode()
        else:
            key = self.conn.client_ip.encode()
        wait = limiter.take(key, time.monotonic())
        if wait <= 0:
            return False
        rule.stats.rate_limited += 1
        self.local(429, "rate limit exceeded", "rate_limited", headers=[(b"retry-after", retry_after(wait))])
        return True

    def _redirect(self, rule: Rule) -> None:
        redirect = rule.redirect
        assert redirect is not None
        listener = self.listener
        scheme = redirect.scheme or listener.scheme
        host = self.head.host_name if redirect.hostname is None else redirect.hostname
        if redirect.port is not None:
            port = redirect.port
        elif redirect.scheme is not None:
            port = 443 if scheme == "https" else 80
        else:
            port = listener.port
        default = 443 if scheme == "https" else 80
        authority = host if port == default else f"{host}:{port}"
        path = self._rewritten_path(redirect.path)
        query = self.head.query
        location = f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")
        self.local(
            redirect.statusCode,
            f"moved to {location}",
            "redirect",
            headers=[(b"location", location.encode("latin-1"))],
        )

    def _rewritten_path(self, rewrite: PathRewrite | None) -> str:
        path = self.head.path
        if rewrite is None:
            return path
        if rewrite.type == "ReplaceFullPath":
            return rewrite.value
        # ReplacePrefixMatch: the matched prefix, by whole segments, becomes the value.
        prefix = self.entry_prefix.rstrip("/")
        replaced = rewrite.value.rstrip("/") + path[len(prefix) :]
        return replaced if replaced.startswith("/") else "/" + replaced

    # --- upstream attempts ---

    def _attempt(self) -> None:
        cluster, rule = self.cluster, self.rule
        assert cluster is not None and rule is not None
        pin = self.pin
        if pin is not None and pin.endpoint not in self.tried and pin.endpoint.available(time.monotonic()):
            endpoint: EndpointState | None = pin.endpoint
        else:
            key = self._hash_key(rule) if rule.policy == "ConsistentHash" else b""
            balancer = cluster.balancer(rule.policy)
            now = time.monotonic()
            # A first attempt has tried nothing: no set to copy (a frozenset per request).
            endpoint = balancer.pick(key, now, frozenset(self.tried)) if self.tried else None
            if endpoint is None:
                endpoint = balancer.pick(key, now)  # all tried (or none yet): any
        if endpoint is None:
            self.local(503, "no ready endpoint", "no_endpoint")
            return
        self.tried.add(endpoint)
        listener = self.listener
        upstream = listener.pool.take(endpoint, cluster.dial) if not self.fresh else None
        if upstream is not None:
            self._attach(upstream)
            return
        listener.connect(self, endpoint, cluster.dial)

    def _hash_key(self, rule: Rule) -> bytes:
        if rule.key_header is not None:
            return (self.header(rule.key_header.decode()) or "").encode()
        return self.conn.client_ip.encode()

    def connected(self, upstream: Backend) -> None:
        """A new upstream connection for this exchange is ready."""
        if self.done:
            upstream.unused()
            return
        self._attach(upstream)

    def connect_failed(self, endpoint: EndpointState, error: str) -> None:
        if self.done:
            return
        endpoint.connect_failures += 1
        self.listener.health.report_failure(endpoint)
        assert self.cluster is not None
        self.cluster.stats.connect_failures += 1
        self._failed(Failure.CONNECT, f"could not connect to the backend ({error})", reused=False)

    def _attach(self, upstream: Backend) -> None:
        rule = self.rule
        assert rule is not None
        self.upstream = upstream
        self.endpoint = upstream.endpoint
        upstream.endpoint.active += 1
        upstream.endpoint.total += 1
        self.resp_head = None
        head = self.head
        request = self._request_head(rule, self.target)
        body = b""
        if self.pending:
            pending, self.pending = self.pending, []
            body = pending[0] if len(pending) == 1 else b"".join(pending)
            sent = self.sent
            if sent is not None:
                if self.received <= KEEP_BODY:
                    sent.extend(pending)
                else:
                    self.sent = None
        upstream.attach(self, request, body, self.request_whole)
        if self.conn.write_blocked:
            upstream.flow.pause("client-full")
        if rule.backend_request_timeout is not None:
            self.attempt_timer = self.listener.loop.call_later(
                rule.backend_request_timeout, self._attempt_timed_out
            )
        if not head.upgrade:
            self.conn.resume("waiting-upstream")  # an upgrade's client bytes wait for the 101

    def _request_head(
        self, rule: Rule, target: Target | None, copy: CopySpan | None = None
    ) -> BackendRequest:
        """The request for the backend target (None: for a mirror, which
        gets the rule's filters only, and a shadow Host; copy: its span, when sampled)."""
        head = self.head
        listener = self.listener
        client = self.conn.client_ip.encode()
        headers = list(head.headers)
        forwarded_for = head.forwarded_for
        headers.append((b"x-forwarded-for", forwarded_for + b", " + client if forwarded_for else client))
        headers.append((b"x-forwarded-proto", listener.scheme_bytes))
        if head.host:
            headers.append((b"x-forwarded-host", head.host))
        if listener.settings.via:
            headers.append((b"via", b"1.1 bilayer"))
        if rule.request_modifier is not None:
            headers = rule.request_modifier.apply(headers)
        if target is not None and target.request_modifier is not None:
            headers = target.request_modifier.apply(headers)
        if head.upgrade:
            headers.append((b"connection", b"upgrade"))
            headers.append((b"upgrade", head.upgrade))
        # After the filters (which cannot name it): the id the backend logs is the one we log.
        request_id = self.request_id
        if not request_id:
            request_id = self.request_id = _REQUEST_IDS.pop() if _REQUEST_IDS else _more_request_ids()
        headers.append((REQUEST_ID, request_id))
        host = head.host
        path = head.path
        # One of the two at most: the compiler refuses a URLRewrite on both.
        rewrite = target.rewrite if target is not None and target.rewrite is not None else rule.rewrite
        if self.deadline is not None:  # what remains of the call's deadline
            headers = grpc.with_timeout(headers, self.deadline - time.monotonic())
        if rewrite is not None:
            if rewrite.hostname is not None:
                host = rewrite.hostname.encode()
            if rewrite.path is not None:
                path = self._rewritten_path(rewrite.path)
        if target is None:
            host = shadow_host(host)
        line_target = path + "?" + head.query if head.query else path
        trace = self.trace
        if trace is not None:
            # A header modifier may have added trace context fields: ours replace them.
            modified = rule.request_modifier is not None
            if target is None:
                trace.copy_begins(headers, copy, line_target, modified)
            elif self.endpoint is not None:
                modified = modified or target.request_modifier is not None
                trace.attempt_begins(headers, self.endpoint, self.resent, line_target, modified)
        return BackendRequest(
            head.method,
            line_target.encode("latin-1"),
            host,
            headers,
            head.body,
            head.upgrade,
            head.te_trailers,
        )

    def _may_resend(self, failure: Failure, *, reused: bool) -> bool:
        rule, cluster = self.rule, self.cluster
        assert rule is not None and cluster is not None
        if failure is Failure.TIMEOUT and 504 not in rule.retry_codes:
            return False
        return may_resend(
            failure,
            idempotent=self.head.idempotent,
            reused=reused,
            resent=self.resent,
            attempts=rule.retry_attempts,
            replayable=self.sent is not None,
            response_started=self.resp_started,
            budget=cluster.stats.may_retry(),
        )

    def _failed(self, failure: Failure, why: str, *, reused: bool) -> None:
        """An attempt failed before any response reached the client: resend or answer."""
        if self.trace is not None:
            self.trace.attempt_failed(failure.value)
        if self._may_resend(failure, reused=reused):
            self._resend(why, stale=failure is Failure.RESET and reused, now=failure is Failure.REFUSED)
        else:
            self._fail(give_up_status(failure), why, _GIVE_UP[failure])

    def _resend(self, why: str, *, stale: bool, now: bool = False) -> None:
        rule, cluster = self.rule, self.cluster
        assert rule is not None and cluster is not None
        self._drop_upstream()
        self.resent += 1
        self.fresh = stale
        if self.sent:
            self.pending = self.sent + self.pending
            self.sent = []
        rule.stats.retries += 1
        cluster.stats.retries += 1
        cluster.stats.active_retries += 1
        log.debug("resending", extra=fields(reason=why, attempt=self.resent))
        # A stale pooled connection, or a stream the backend did not process, is not the
        # backend failing: resend at once.
        delay = 0.0 if stale or now else rule.backoff(self.resent)
        self.listener.loop.call_later(delay, self._resend_now)

    def _resend_now(self) -> None:
        if self.cluster is not None:
            self.cluster.stats.active_retries -= 1
        if not self.done:
            self._attempt()

    def _drop_upstream(self) -> None:
        """Let go of the current upstream connection, which is not reused."""
        self.held = None  # (a held gRPC head is never sent once its attempt is dropped)
        self.resp_trailers = None
        out, self.body_out = self.body_out, None
        if out:
            self.pending.extend(out)  # read but never written: held for the next attempt
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.endpoint.active -= 1
            upstream.discard()
        if self.attempt_timer is not None:
            self.attempt_timer.cancel()
            self.attempt_timer = None

    def backend_full(self, full: bool) -> None:
        """The backend's socket stopped (or resumed) taking request bytes."""
        if full:
            self.conn.pause("backend-full")
        else:
            self.conn.resume("backend-full")

    def client_full(self, full: bool) -> None:
        """The client's socket stopped (or resumed) taking response bytes."""
        upstream = self.upstream
        if upstream is not None:
            if full:
                upstream.flow.pause("client-full")
            else:
                upstream.flow.resume("client-full")

    # --- the response (upstream reader events) ---

    def hold(self) -> None:
        """Collect what this read of the response produces (head, body, chunk framing)
        until flush: one write, one system call, instead of several."""
        self.batch = []

    def flush(self) -> None:
        batch, self.batch = self.batch, None
        if batch:
            self.conn.send_batch(batch)

    def response_head(self, head: ResponseHead) -> None:
        status = head.status
        if status < 200:
            if status == 101:
                self.resp_head = head  # the tunnel starts when the reader hands over the rest
            else:
                self.interims += 1
                if self.interims > MAX_INTERIM:
                    self.upstream_failed(BadMessage(502, "too many interim responses"))
                else:
                    # Interim (100 Continue, 103 Early Hints): passed on, the real response follows.
                    self.conn.send_interim(self, status, head.headers)
            return
        if self.attempt_timer is not None:
            self.attempt_timer.cancel()
            self.attempt_timer = None
        rule, endpoint = self.rule, self.endpoint
        assert rule is not None and endpoint is not None
        if status in rule.retry_codes and not self.head.upgrade:
            self.listener.health.report_failure(endpoint)
            if self._may_resend(Failure.STATUS, reused=False):
                if self.trace is not None:
                    self.trace.attempt_failed(str(status), status)
                self._resend(f"backend answered {status}", stale=False)
                return
        elif status in (502, 503, 504):
            self.listener.health.report_failure(endpoint)
        elif endpoint.failures:  # (most answers find nothing to reset)
            self.listener.health.report_success(endpoint)
        self.resp_head = head
        if self.grpc and rule.retry_grpc_codes and self._grpc_held(rule, head):
            return
        self._send_response_head(head)

    def _grpc_held(self, rule: Rule, head: ResponseHead) -> bool:
        """A gRPC answer to a rule retrying gRPC statuses: resent when trailers-only with
        a listed status; otherwise held (True) until its first body byte or its trailers
        say whether it is one to resend."""
        code = grpc.status_of(head.headers)
        if code is None:
            self.held = head
            return True
        if code in rule.retry_grpc_codes and self._may_resend(Failure.GRPC_STATUS, reused=False):
            self._resend_grpc(code)
            return True
        return False

    def _resend_grpc(self, code: int) -> None:
        if self.trace is not None:
            self.trace.attempt_failed(f"grpc-status {code}")
        self._resend(f"backend answered grpc-status {code}", stale=False)

    def _release_held(self) -> None:
        head, self.held = self.held, None
        if head is not None:
            self._send_response_head(head)

    def _send_response_head(self, head: ResponseHead) -> None:
        rule = self.rule  # (None for a gRPC answer the proxy makes before routing)
        headers = (
            self._shape_response(rule, head.headers)
            if rule is not None and rule.shapes_response
            else head.headers
        )
        self.resp_started = True
        self.status = head.status
        self.conn.send_head(self, head.status, headers, head.body, head.length)

    def _shape_response(self, rule: Rule, headers: framing.Headers) -> framing.Headers:
        """The response filters: the rule's header modifier, the backend's, CORS, the
        session token."""
        if rule.response_modifier is not None:
            headers = rule.response_modifier.apply(headers)
        target = self.target
        if target is not None and target.response_modifier is not None:
            headers = target.response_modifier.apply(headers)
        if rule.cors is not None:
            origin = self.header("origin")
            headers = rule.cors.response_headers(
                headers, origin.encode("latin-1") if origin is not None else None
            )
        if rule.session is not None and target is not None and self.endpoint is not None:
            token = rule.session.issue(
                target.position, self.endpoint, self.pin, time.time(), secure=self.listener.tls
            )
            if token is not None:
                headers = [*headers, token]
        return headers

    def response_body(self, data: bytes) -> None:
        if self.held is not None:
            self._release_held()
        if not self.resp_started or self.done:
            return
        self.bytes_out += len(data)
        self.conn.send_data(self, data)

    def response_end(self) -> None:
        if self.held is not None:
            self._release_held()
        if not self.resp_started or self.done:
            return
        self.conn.send_end(self, self.resp_trailers)
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.endpoint.active -= 1
            resp = self.resp_head
            reusable = (
                self.request_whole
                and resp is not None
                and resp.keep_alive
                and not self.head.upgrade
                and not (self.head.has_body and self.head.method in framing.BODYLESS_METHODS)
            )
            upstream.done(reusable=reusable)
            if not self.request_whole:
                self.close_after = True  # the rest of the request body would be read as a request
        self.finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        """The backend switched protocols (101): bytes now flow both ways untouched."""
        upstream, head = self.upstream, self.resp_head
        if not self.head.upgrade or upstream is None or head is None or head.status != 101:
            self.upstream_failed(BadMessage(502, "the backend switched protocols unasked"))
            return
        if self.attempt_timer is not None:
            self.attempt_timer.cancel()
            self.attempt_timer = None
        self.resp_started = True
        self.status = 101
        self.flush()  # what is held goes first
        self.conn.send_switch(self, head.headers)  # before the sockets change hands
        assert isinstance(upstream, Upstream)  # (an HTTP/2 stream never switches protocols)
        self.upstream = None
        upstream.exchange = None
        self.listener.health.report_success(upstream.endpoint)
        self.conn.start_tunnel(self, upstream, rest)  # the endpoint stays active until it ends
        self.finish()

    def upstream_failed(self, bad: BadMessage) -> None:
        log.debug("invalid backend response", extra=fields(error=bad.message))
        self.listener.bad_messages["backend"] += 1
        if self.endpoint is not None:
            self.listener.health.report_failure(self.endpoint)
        self._fail(502, "the backend sent an invalid response", "bad_response")

    def response_trailers(self, trailers: framing.Headers) -> None:
        if self.held is not None:  # nothing of this gRPC answer has left: it may go again
            code = grpc.status_of(trailers)
            rule = self.rule
            assert rule is not None
            if (
                code is not None
                and code in rule.retry_grpc_codes
                and self._may_resend(Failure.GRPC_STATUS, reused=False)
            ):
                self._resend_grpc(code)
                return
        self.resp_trailers = trailers

    def upstream_refused(self) -> None:
        """The backend did not process the request (an HTTP/2 stream refused, or above a
        GOAWAY's last stream id): sending it again is safe whatever the method."""
        if self.upstream is None or self.done:
            return
        self._failed(Failure.REFUSED, "the backend did not process the request", reused=False)

    def upstream_lost(self, exc: Exception | None) -> None:
        """The backend's connection closed while this exchange used it."""
        upstream = self.upstream
        if upstream is None or self.done:
            return
        if self.resp_started:
            resp = self.resp_head
            if resp is not None and resp.body == UNTIL_CLOSE and exc is None:
                self.upstream = None
                upstream.endpoint.active -= 1
                self.conn.send_end(self, None)
                self.finish()
                return
            # Cut, never truncated.
            self._fail(502, "the backend closed the connection mid-response", "upstream_reset")
            return
        reused = upstream.reused
        if self.endpoint is not None and not reused:
            self.listener.health.report_failure(self.endpoint)
        self._failed(Failure.RESET, "the backend closed the connection before answering", reused=reused)

    # --- timeouts ---

    def _attempt_timed_out(self) -> None:
        self.attempt_timer = None
        if self.done or self.resp_started:
            return
        self._failed(Failure.TIMEOUT, "the backend did not answer in time", reused=False)

    def _request_timed_out(self) -> None:
        self.request_timer = None
        if not self.done:
            self._fail(504, "the request timed out", "timeout")

    def idle_timed_out(self, waiting_for_client: bool) -> None:
        """Nothing moved for the idle timeout (the connection's check)."""
        if waiting_for_client:
            self._fail(408, "the request body stopped arriving", "client_timeout", close=True)
        else:
            self._fail(504, "the backend did not answer in time", "timeout")

    # --- ending ---

    def local(
        self,
        status: int,
        message: str,
        reason: Reason,
        *,
        close: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the client ourselves (reason: why, for the access log)."""
        if self.done:
            return
        if self.grpc and not self.resp_started:
            self._grpc_local(status, message, reason, close=close, headers=headers)
            return
        # Unread body bytes would be taken for the next request: close instead.
        close = close or not self.head.keep_alive or not self.request_whole or self.conn.closing
        self.close_after = self.close_after or close
        self.status = status
        self.reason = reason
        self.resp_started = True
        self.bytes_out += self.conn.send_local(self, status, message, headers)  # body bytes, as proxied
        self.finish()

    def _grpc_local(
        self, status: int, message: str, reason: Reason, *, close: bool, headers: framing.Headers | None
    ) -> None:
        """A gRPC call's answer from the proxy: trailers-only (HTTP 200, the gRPC status and
        message in the head, no body), sent by the client's writer like any response head."""
        close = close or not self.head.keep_alive or not self.request_whole or self.conn.closing
        self.close_after = self.close_after or close
        self.reason = reason
        answer = grpc.trailers_only(grpc.status_for(status, reason), message)
        self._send_response_head(ResponseHead(200, [*answer, *(headers or [])], NO_BODY, 0, True))
        self.finish()

    def fail_request(self, status: int, message: str) -> None:
        """The client broke HTTP in this request's body or trailers."""
        reason: Reason = (
            "too_large" if status == 413 else "client_timeout" if status == 408 else "bad_request"
        )
        self._fail(status, message, reason, close=True)

    def _fail(self, status: int, message: str, reason: Reason, *, close: bool = False) -> None:
        """End on an error: answer status, or, once the client has seen part of a response,
        cut the connection, so a truncated response never looks complete."""
        self._drop_upstream()
        if self.resp_started:
            self.reason = reason  # the status logged stays the backend's
            self.conn.abort()
            self.finish()
            return
        self.local(status, message, reason, close=close)

    def client_lost(self) -> None:
        """The client went away mid-exchange."""
        if self.done:
            return
        self._drop_upstream()
        if not self.status:
            self.status = 499  # as nginx logs it: client closed request
        self.reason = "client_closed"
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        copies, self.copies = self.copies, None
        if copies is not None:  # the request did not complete: its copies are dropped
            for copy in copies:
                copy.cancel()
        if self.batch:
            self.flush()  # before the connection may close or start the next exchange
        for timer in (self.request_timer, self.attempt_timer):
            if timer is not None:
                timer.cancel()
        if self.upstream is not None:
            self._drop_upstream()
        if self.cluster is not None:
            self.cluster.stats.active_requests -= 1
        seconds = time.monotonic() - self.started if self.started else 0.0
        status = self.status or 499
        if self.rule is not None:
            self.rule.stats.observe(status, seconds)
        if self.trace is not None:
            self.trace.end(self)
        listener = self.listener
        listener.count_response(status)
        settings = listener.settings
        if settings.access_log and (
            settings.access_log_sample >= 1.0 or random.random() < settings.access_log_sample
        ):
            self._log(seconds, status)
        self.conn.exchange_finished(self)

    def _log(self, seconds: float, status: int) -> None:
        listener = self.listener
        head = self.head
        host = head.host.decode("latin-1")
        url = f"{listener.scheme}://{host}{head.path}" + (f"?{head.query}" if head.query else "")
        rule = self.rule
        # A request answered before any backend was asked has no id yet: made here, so
        # every line has one.
        request_id = self.request_id
        if not request_id:
            request_id = self.request_id = _REQUEST_IDS.pop() if _REQUEST_IDS else _more_request_ids()
        log.info(
            "request",
            extra=fields(
                request_id=request_id.decode("ascii"),
                client=self.conn.client_ip,
                method=head.method,
                url=url,
                protocol=_PROTOCOLS.get(head.version, head.version),
                user_agent=self.header("user-agent"),
                status=status,
                reason=self.reason,
                bytes=self.bytes_out,
                seconds=round(seconds, 6),
                upstream=self.endpoint.key if self.endpoint else None,
                route=rule.route if rule else None,
                rule=rule.index if rule else None,
                retries=self.resent,
                trace_id=self.trace.trace_hex if self.trace is not None else None,
            ),
        )
