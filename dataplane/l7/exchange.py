"""One request and its response, through the proxy.

An exchange is created when the client's request line starts. Once it is the
connection's current exchange (`start`), it is routed, filtered, sent to an endpoint of
the chosen backend, and the response streams back. Everything is callbacks on the two
connections' protocols and `call_later` timers; a task exists only while a new upstream
connection is being made.

Retries happen only before the client has seen a byte of the response, and only for
requests that can be replayed: the whole body was kept (at most KEEP_BODY bytes) and the
method is idempotent, or nothing was sent at all (connect failures).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ..health import EndpointState
from ..logs import fields
from ..table import PathRewrite
from . import responses
from .config import Cluster, Rule, retry_after
from .headers import HOP_BY_HOP, Headers, connection_tokens, serialize
from .paths import BadPath, normalize, split_target
from .router import normalize_host
from .upstream import Upstream

if TYPE_CHECKING:
    from .client import ClientConnection

log = logging.getLogger("bilayer.access")

KEEP_BODY = 64 * 1024
# Request headers never forwarded as received: hop-by-hop ones, and those the proxy sets.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
REQUEST_DROP_UPGRADE = REQUEST_DROP - {b"connection", b"upgrade"}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
NO_BODY_STATUS = frozenset({204, 304})
MAX_URL = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100


class RequestTooLarge(Exception):
    """Raised from a parser callback: the request line or headers are over the limits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    """A request from the client and the response that goes back."""

    # Scalar state starts at these class-level defaults, so creating an exchange (once
    # per request) sets only the few mutable fields.
    url = b""
    header_bytes = 0
    head_parsed = False
    body_expected = False
    method = "GET"
    version = "1.1"
    keep_alive = True
    host = b""
    path = "/"
    qs = ""
    _query_values: dict[str, str] | None = None
    reject: tuple[int, str] | None = None
    chunked = False
    upgrade = False
    connection_named: frozenset[bytes] = frozenset()  # headers the client's Connection names
    tunnel_early = b""
    body_size = 0
    body_kept = True
    request_done = False
    rule: Rule | None = None
    entry_prefix = ""
    cluster: Cluster | None = None
    upstream: Upstream | None = None
    endpoint: EndpointState | None = None
    attempt = 0
    retries = 0
    sent_head = False
    resp_status = 0
    resp_started = False
    resp_chunked = False
    resp_close_delimited = False
    close_after = False
    done = False
    status = 0
    bytes_out = 0
    started = 0.0
    request_timer: asyncio.TimerHandle | None = None
    try_timer: asyncio.TimerHandle | None = None

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.tried: set[EndpointState] = set()
        self.resp_headers: Headers = []

    # --- receiving the request (parser callbacks, through the client connection) ---

    def head_complete(self, method: bytes, version: str, keep_alive: bool) -> None:
        self.head_parsed = True
        self.method = method.decode("ascii", "replace")
        self.version = version
        self.keep_alive = keep_alive
        hosts = []
        connection = b""
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"host":
                hosts.append(value)
            elif lower == b"content-length":
                self.body_expected = self.body_expected or int(value) > 0
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    self.reject = (501, "only the chunked transfer coding is supported")
                self.chunked = True
                self.body_expected = True
            elif lower == b"connection":
                connection += b"," + value
        if len(hosts) > 1:
            self.reject = (400, "more than one Host header")
        self.host = hosts[0] if hosts else b""
        if not self.host and version == "1.1":
            self.reject = (400, "the Host header is missing")
        if connection:
            tokens = connection_tokens(connection)
            self.upgrade = b"upgrade" in tokens and any(
                name.lower() == b"upgrade" for name, _ in self.headers
            )
            self.connection_named = tokens - HOP_BY_HOP

    def request_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        limit = self.conn.listener.settings.max_body_size
        if limit and self.body_size > limit:
            self._too_large()
            return
        upstream = self.upstream
        if upstream is not None and self.sent_head and upstream.transport is not None:
            upstream.transport.write(self._encode(chunk))
            self._keep(chunk)
        elif not self.done:
            self.body.append(chunk)  # not connected yet: sent on attach
            self.conn.pause("waiting-upstream")

    def request_complete(self) -> None:
        self.request_done = True
        if (
            self.upstream is not None
            and self.sent_head
            and self.chunked
            and self.upstream.transport is not None
        ):
            self.upstream.transport.write(b"0\r\n\r\n")

    def _keep(self, chunk: bytes) -> None:
        if self.body_kept:
            if self.body_size <= KEEP_BODY:
                self.body.append(chunk)
            else:
                self.body_kept = False
                self.body = []

    def _encode(self, chunk: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.chunked else chunk

    def _too_large(self) -> None:
        self._fail(413, "request body too large", close=True)

    # --- RequestView, for matching ---

    def header(self, name: str) -> str | None:
        wanted = name.encode()
        values = [v for n, v in self.headers if n.lower() == wanted]
        return b",".join(values).decode("latin-1") if values else None

    def query(self, name: str) -> str | None:
        if self._query_values is None:
            self._query_values = {}
            for key, value in parse_qsl(self.qs, keep_blank_values=True):
                self._query_values.setdefault(key, value)
        return self._query_values.get(name)

    # --- routing ---

    def start(self) -> None:
        """Route and send; the exchange is now the connection's current one."""
        conn = self.conn
        self.started = time.monotonic()
        if self.reject is not None:
            self.local(*self.reject, close=True)
            return
        raw_target = self.url.decode("latin-1")
        if raw_target.startswith(("http://", "https://")):  # absolute form
            rest = raw_target.split("://", 1)[1]
            slash = rest.find("/")
            self.host = rest[: slash if slash != -1 else len(rest)].encode("latin-1")
            raw_target = rest[slash:] if slash != -1 else "/"
        raw_path, self.qs = split_target(raw_target)
        try:
            self.path, encoded_slash = normalize(raw_path)
        except BadPath as err:
            self.local(400, str(err), close=True)
            return
        config = conn.listener.config
        entry = config.router.match(normalize_host(self.host.decode("latin-1")), self.path, self.method, self)
        if entry is None:
            self.local(404, "no route for this host and path")
            return
        rule = self.rule = config.rules[entry.rule]
        if entry.path_type == "PathPrefix":
            self.entry_prefix = entry.path_value
        if encoded_slash and not rule.allow_encoded_slashes:
            self.local(400, "encoded slash (%2F) in the path", close=True)
            return
        if rule.limiter is not None and self._rate_limited(rule):
            return
        if rule.redirect is not None:
            self._redirect(rule)
            return
        any_backend, cluster = rule.backends.pick()
        if not any_backend:
            self.local(500, "the matched rule has no backend")
            return
        if cluster is None:
            self.local(500, "the chosen backend does not resolve to a Service")
            return
        if not cluster.endpoints:
            self.local(503, "no ready endpoint")
            return
        self.cluster = cluster
        cluster.stats.requests += 1
        cluster.stats.active_requests += 1
        if rule.request_timeout is not None:
            self.request_timer = conn.listener.loop.call_later(rule.request_timeout, self._request_timed_out)
        if not self.request_whole:
            conn.pause("waiting-upstream")
        self._attempt()

    @property
    def request_whole(self) -> bool:
        """The client has sent the whole request (a request without a body is whole at once)."""
        return self.request_done or not self.body_expected

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
        self.local(429, "rate limit exceeded", headers=[(b"retry-after", retry_after(wait))])
        return True

    def _redirect(self, rule: Rule) -> None:
        redirect = rule.redirect
        assert redirect is not None
        listener = self.conn.listener
        scheme = redirect.scheme or listener.scheme
        host = normalize_host(self.host.decode("latin-1")) if redirect.hostname is None else redirect.hostname
        if redirect.port is not None:
            port = redirect.port
        elif redirect.scheme is not None:
            port = 443 if scheme == "https" else 80
        else:
            port = listener.port
        default = 443 if scheme == "https" else 80
        authority = host if port == default else f"{host}:{port}"
        path = self._rewritten_path(redirect.path)
        location = f"{scheme}://{authority}{path}" + (f"?{self.qs}" if self.qs else "")
        self.local(
            redirect.statusCode,
            f"moved to {location}",
            headers=[(b"location", location.encode("latin-1"))],
        )

    def _rewritten_path(self, rewrite: PathRewrite | None) -> str:
        if rewrite is None:
            return self.path
        if rewrite.type == "ReplaceFullPath":
            return rewrite.value
        # ReplacePrefixMatch: the matched prefix, by whole segments, becomes the value.
        prefix = self.entry_prefix.rstrip("/")
        rest = self.path[len(prefix) :]
        replaced = rewrite.value.rstrip("/") + rest
        if not replaced.startswith("/"):
            replaced = "/" + replaced
        return replaced

    # --- upstream attempts ---

    def _attempt(self) -> None:
        cluster, rule = self.cluster, self.rule
        assert cluster is not None and rule is not None
        self.attempt += 1
        key = self._hash_key(rule)
        endpoint = cluster.balancer(rule.policy).pick(key, time.monotonic(), frozenset(self.tried))
        if endpoint is None:
            endpoint = cluster.balancer(rule.policy).pick(key, time.monotonic())  # all tried: any again
        if endpoint is None:
            self.local(503, "no ready endpoint")
            return
        self.tried.add(endpoint)
        listener = self.conn.listener
        upstream = listener.pool.take(endpoint)
        if upstream is not None:
            self._attach(upstream)
            return
        listener.connect(self, endpoint)

    def _hash_key(self, rule: Rule) -> bytes:
        if rule.policy != "ConsistentHash":
            return b""
        if rule.key_header is not None:
            return (self.header(rule.key_header.decode()) or "").encode()
        return self.conn.client_ip.encode()

    def connected(self, upstream: Upstream) -> None:
        """A new upstream connection for this exchange is ready."""
        if self.done:
            self.conn.listener.pool.give(upstream, self.conn.listener.loop.time())
            return
        self._attach(upstream)

    def connect_failed(self, endpoint: EndpointState, error: str) -> None:
        if self.done:
            return
        endpoint.connect_failures += 1
        self.conn.listener.health.report_failure(endpoint)
        assert self.cluster is not None
        self.cluster.stats.connect_failures += 1
        # Nothing was sent: a retry is safe whatever the method, if the body is whole.
        if self._may_retry(idempotent_only=False):
            self._retry(f"connect to {endpoint.key} failed: {error}")
            return
        self.local(502, "could not connect to the backend")

    def _attach(self, upstream: Upstream) -> None:
        rule = self.rule
        assert rule is not None and upstream.transport is not None
        self.upstream = upstream
        self.endpoint = upstream.endpoint
        upstream.endpoint.active += 1
        upstream.endpoint.total += 1
        upstream.exchange = self
        self.resp_headers = upstream.response_headers = []
        self.resp_status = 0
        head = self._request_head(rule)
        body = self.body
        if body:
            upstream.transport.write(head + b"".join(self._encode(c) for c in body))
            if not self.body_kept or not self._replayable_method():
                self.body = []
        else:
            upstream.transport.write(head)
        self.sent_head = True
        if self.request_done and self.chunked:
            upstream.transport.write(b"0\r\n\r\n")
        if rule.backend_request_timeout is not None:
            self.try_timer = asyncio.get_running_loop().call_later(
                rule.backend_request_timeout, self._try_timed_out
            )
        if self.upgrade:
            return  # the client stays paused until the backend answers 101
        self.conn.resume("waiting-upstream")

    def _request_head(self, rule: Rule) -> bytes:
        """The request line and headers for the backend, in one pass over the headers."""
        conn = self.conn
        drop = REQUEST_DROP if not self.upgrade else REQUEST_DROP_UPGRADE
        named = self.connection_named
        kept: Headers = []
        forwarded_for = b""
        for name, value in self.headers:
            lower = name.lower()
            if lower in drop or lower in named:
                if lower == b"x-forwarded-for":
                    forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
                continue
            kept.append((name, value))
        client = conn.client_ip.encode()
        kept.append((b"x-forwarded-for", forwarded_for + b", " + client if forwarded_for else client))
        kept.append((b"x-forwarded-proto", conn.listener.scheme_bytes))
        if self.host:
            kept.append((b"x-forwarded-host", self.host))
        if conn.listener.settings.via:
            kept.append((b"via", b"1.1 bilayer"))
        if rule.request_modifier is not None:
            kept = rule.request_modifier.apply(kept)
        if self.chunked:
            kept.append((b"transfer-encoding", b"chunked"))
        rewrite = rule.rewrite
        host = self.host
        path = self.path
        if rewrite is not None:
            if rewrite.hostname is not None:
                host = rewrite.hostname.encode()
            if rewrite.path is not None:
                path = self._rewritten_path(rewrite.path)
        target = path + "?" + self.qs if self.qs else path
        return b"%s %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (
            self.method.encode(),
            target.encode("latin-1"),
            host,
            serialize(kept),
        )

    def _replayable_method(self) -> bool:
        return self.method in IDEMPOTENT

    def _may_retry(self, *, idempotent_only: bool = True) -> bool:
        rule, cluster = self.rule, self.cluster
        if rule is None or cluster is None or self.resp_started or self.done:
            return False
        if self.retries >= rule.retry_attempts:
            return False
        if not self.body_kept or (idempotent_only and not self._replayable_method()):
            return False
        if self.upgrade and self.sent_head:
            return False
        return cluster.stats.may_retry()

    def _retry(self, why: str) -> None:
        rule, cluster = self.rule, self.cluster
        assert rule is not None and cluster is not None
        self._drop_upstream(abort=True)
        self.retries += 1
        rule.stats.retries += 1
        cluster.stats.retries += 1
        cluster.stats.active_retries += 1
        log.debug("retrying", extra=fields(reason=why, attempt=self.retries))
        delay = rule.backoff(self.retries)
        asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        if self.cluster is not None:
            self.cluster.stats.active_retries -= 1
        if not self.done:
            self._attempt()

    def _drop_upstream(self, *, abort: bool = False) -> None:
        """Detach from the current upstream connection, which cannot be reused."""
        upstream = self.upstream
        if upstream is not None:
            upstream.exchange = None
            upstream.abort() if abort else upstream.close()
            upstream.endpoint.active -= 1
            self.upstream = None
        self.sent_head = False
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    # --- the response (upstream parser callbacks) ---

    def response_headers_complete(self, status: int, version: str) -> None:
        self.resp_status = status
        if status < 200:
            if status != 101:
                # Interim (100 Continue, 103): pass it on, the real response follows.
                self._write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, responses.reason(status)))
                self.resp_headers.clear()  # shared with the upstream, which appends the next ones
            return
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        rule = self.rule
        assert rule is not None and self.endpoint is not None
        if status in rule.retry_codes and self._may_retry():
            self.conn.listener.health.report_failure(self.endpoint)
            self._retry(f"backend answered {status}")
            return
        if status in (502, 503, 504):
            self.conn.listener.health.report_failure(self.endpoint)
        else:
            self.conn.listener.health.report_success(self.endpoint)
        self._send_response_head(status, version)
        if self.method == "HEAD":
            assert self.upstream is not None
            self.upstream.reset_parser()  # the announced body never comes
            self.response_complete()

    def _send_response_head(self, status: int, version: str) -> None:
        rule = self.rule
        assert rule is not None
        named: frozenset[bytes] = frozenset()
        length = False
        upstream_chunked = False
        headers: Headers = []
        for name, value in self.resp_headers:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == b"connection":
                    named |= connection_tokens(value)
                elif lower == b"transfer-encoding":
                    upstream_chunked = True
                continue
            if lower == b"content-length":
                length = True
            headers.append((name, value))
        named -= HOP_BY_HOP
        if named:  # rare: the backend's Connection names further headers
            headers = [(n, v) for n, v in headers if n.lower() not in named]
        if rule.response_modifier is not None:
            headers = rule.response_modifier.apply(headers)
        no_body = status in NO_BODY_STATUS or self.method == "HEAD"
        if not length and not no_body:
            if not upstream_chunked:
                self.resp_close_delimited = True  # the body ends when the backend closes
            if self.version == "1.1":
                self.resp_chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                self.close_after = True
        if self.close_after or not self.keep_alive or self.conn.closing:
            self.close_after = True
            headers.append((b"connection", b"close"))
        elif self.version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        self.resp_started = True
        self.status = status
        self._write(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, responses.reason(status), serialize(headers)))

    def response_body(self, body: bytes) -> None:
        if not self.resp_started:
            return
        self.bytes_out += len(body)
        self._write(b"%x\r\n%s\r\n" % (len(body), body) if self.resp_chunked else body)

    def response_complete(self) -> None:
        if not self.resp_started:
            return  # an interim response, or one we are retrying past
        if self.resp_chunked:
            self._write(b"0\r\n\r\n")
        upstream = self.upstream
        if upstream is not None:
            upstream.exchange = None
            upstream.endpoint.active -= 1
            self.upstream = None
            if self.request_whole and not self.upgrade:
                self.conn.listener.pool.give(upstream, self.conn.listener.loop.time())
            else:
                upstream.close()  # the request is not fully sent: this connection cannot be reused
                self.close_after = self.close_after or not self.request_whole
        self.finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        """The backend switched protocols (101): from now on, bytes flow both ways untouched."""
        upstream = self.upstream
        if not self.upgrade or self.resp_status != 101 or upstream is None or upstream.transport is None:
            self.upstream_failed("bad-response", "101 without an upgrade request")
            return
        headers = [(n, v) for n, v in self.resp_headers if n.lower() not in HOP_BY_HOP]
        headers.append((b"connection", b"upgrade"))
        headers += [(n, v) for n, v in self.resp_headers if n.lower() == b"upgrade"]
        self.resp_started = True
        self.status = 101
        self._write(b"HTTP/1.1 101 Switching Protocols\r\n%s\r\n" % serialize(headers))
        conn_transport = self.conn.transport
        assert conn_transport is not None
        upstream.tunnel = conn_transport
        upstream.exchange = None
        self.conn.start_tunnel(upstream.transport)
        if rest:
            self.conn.write(rest)  # after the 101 head, which may still be held
        if self.tunnel_early:
            upstream.transport.write(self.tunnel_early)
        self.upstream = None
        self.finish(tunnel=True)

    def upstream_failed(self, kind: str, message: str) -> None:
        log.debug("invalid backend response", extra=fields(kind=kind, error=message))
        self._fail(502, "the backend sent an invalid response")

    def upstream_lost(self, exc: Exception | None) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        if self.resp_started:
            if self.resp_close_delimited and exc is None:
                upstream.exchange = None
                self.upstream = None
                upstream.endpoint.active -= 1
                if self.resp_chunked:
                    self._write(b"0\r\n\r\n")
                self.finish()
                return
            self._fail(502, "the backend closed the connection")  # mid-response: cut, never truncated
            return
        reused = upstream.reused
        self._drop_upstream(abort=True)
        if (
            reused
            and self.body_kept
            and self.resp_status == 0
            and (self._replayable_method() or not self.body_expected)
        ):
            # A pooled connection the backend had just closed: not the backend's fault.
            self.tried.discard(upstream.endpoint)
            self._attempt()
            return
        if self.endpoint is not None:
            self.conn.listener.health.report_failure(self.endpoint)
        if self._may_retry():
            self._retry("backend closed the connection")
            return
        self.local(502, "the backend closed the connection")

    # --- timeouts ---

    def _try_timed_out(self) -> None:
        self.try_timer = None
        if self.done or self.resp_started:
            return
        rule = self.rule
        if rule is not None and 504 in rule.retry_codes and self._may_retry():
            self._retry("backend request timeout")
            return
        self._fail(504, "the backend did not answer in time")

    def _request_timed_out(self) -> None:
        self.request_timer = None
        if not self.done:
            self._fail(504, "the request timed out")

    # --- ending ---

    def _write(self, data: bytes) -> None:
        self.conn.write(data)

    def local(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the client ourselves."""
        if self.done:
            return
        # Unread body bytes would be taken for the next request: close instead.
        close = close or not self.keep_alive or not self.request_whole or self.conn.closing
        self.close_after = self.close_after or close
        self.status = status
        self.resp_started = True
        data = responses.local(
            status, message, close=self.close_after, headers=headers, head_only=self.method == "HEAD"
        )
        self.bytes_out += len(data)
        self._write(data)
        self.finish()

    def fail_request(self, status: int, message: str) -> None:
        """The client's request turned out malformed after it was started."""
        self._fail(status, message, close=True)

    def _fail(self, status: int, message: str, *, close: bool = False) -> None:
        """End on an error: answer status, or, once the client has seen part of a response,
        cut the connection, so a truncated response never looks complete."""
        self._drop_upstream(abort=True)
        if self.resp_started:
            self.conn.abort()
            self.finish()
            return
        self.local(status, message, close=close)

    def client_lost(self) -> None:
        """The client went away mid-exchange."""
        if self.done:
            return
        self._drop_upstream(abort=True)
        if not self.status:
            self.status = 499  # as nginx logs it: client closed request
        self.finish()

    def finish(self, *, tunnel: bool = False) -> None:
        if self.done:
            return
        self.done = True
        for timer in (self.request_timer, self.try_timer):
            if timer is not None:
                timer.cancel()
        if self.upstream is not None:
            self._drop_upstream(abort=True)
        if self.cluster is not None:
            self.cluster.stats.active_requests -= 1
        seconds = time.monotonic() - self.started if self.started else 0.0
        if self.rule is not None:
            self.rule.stats.observe(self.status or 499, seconds)
        listener = self.conn.listener
        listener.count_response(self.status or 499)
        settings = listener.settings
        if settings.access_log and (
            settings.access_log_sample >= 1.0 or random.random() < settings.access_log_sample
        ):
            self._log(seconds)
        self.conn.exchange_finished(self, tunnel=tunnel)

    def _log(self, seconds: float) -> None:
        listener = self.conn.listener
        host = self.host.decode("latin-1")
        url = f"{listener.scheme}://{host}{self.path}" + (f"?{self.qs}" if self.qs else "")
        rule = self.rule
        log.info(
            "request",
            extra=fields(
                client=self.conn.client_ip,
                method=self.method,
                url=url,
                status=self.status or 499,
                bytes=self.bytes_out,
                seconds=round(seconds, 6),
                upstream=self.endpoint.key if self.endpoint else None,
                route=rule.route if rule else None,
                rule=rule.index if rule else None,
                retries=self.retries,
            ),
        )
