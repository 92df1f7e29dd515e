"""Request mirroring (Gateway API RequestMirror): copies of requests, fire and forget.

A copy goes to one endpoint of the mirror's cluster, with the request's body streamed as the
client sends it. Nothing about the copy reaches the client or slows the primary exchange:
the copy never pauses the client's reads, its answer is read and dropped, its failures are
counted. What copies may hold is bounded: MAX_COPIES in flight per listener; unsent bytes
(while a copy connects, or in its socket's buffer) at most MIRROR_BUFFER per copy and
MIRROR_BUDGET for all the listener's copies together, so a mirror slower than the clients
loses copies instead of growing the proxy; and once the request is sent the mirror has the
rule's backend timeout (or ANSWER_SECONDS) to answer. A copy that would exceed a bound is
dropped and counted (bilayer_l7_mirror_copies{result="dropped"}).

The copy's Host gets "-shadow" appended to its name, as Envoy does, so a backend or its
logs can tell copies from live traffic.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ..health import EndpointState
from .backend import Backend, BackendRequest
from .config import Cluster
from .dial import Dial
from .framing import BadMessage, Headers, ResponseHead
from .trace import CopySpan
from .upstream import Pool

MIRROR_BUFFER = 1024 * 1024
MIRROR_BUDGET = 32 * 1024 * 1024
MAX_COPIES = 1024
ANSWER_SECONDS = 15.0


class MirrorHost(Protocol):
    """What a copy uses of its listener."""

    loop: asyncio.AbstractEventLoop
    pool: Pool
    mirror_copies: int  # copies in flight
    mirror_held: int  # bytes they hold unsent, as last seen (never less than the truth)

    def connect(self, user: MirrorCopy, endpoint: EndpointState, dial: Dial) -> None: ...


def shadow_host(host: bytes) -> bytes:
    """The Host of a copy: the name with "-shadow" appended, before any port."""
    if host.startswith(b"["):  # an IPv6 literal keeps its brackets
        end = host.find(b"]") + 1
        return host[:end] + b"-shadow" + host[end:]
    name, colon, port = host.partition(b":")
    return name + b"-shadow" + colon + port


class MirrorCopy:
    """One copy of a request on its way to a mirror endpoint."""

    __slots__ = (
        "answer_seconds",
        "batch",
        "cluster",
        "done",
        "ended",
        "held",
        "host",
        "keep_alive",
        "method",
        "pending",
        "pending_bytes",
        "request",
        "span",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        host: MirrorHost,
        cluster: Cluster,
        request: BackendRequest,
        method: str,
        answer_seconds: float | None,
        *,
        span: CopySpan | None = None,
    ) -> None:
        self.host = host
        self.cluster = cluster
        self.method = method
        self.answer_seconds = answer_seconds or ANSWER_SECONDS
        self.request = request
        self.pending: list[bytes] = []  # body bytes for the mirror before it is connected
        # (the head counts as the bytes of its fields: about what it takes on the wire)
        self.pending_bytes = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        self.held = 0  # what this copy counts in host.mirror_held
        self.upstream: Backend | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.batch: list[bytes] | None = None  # (an Upstream's user has one; a copy writes nothing)
        self.ended = False  # the whole request is in
        self.keep_alive = False  # the mirror's answer lets its connection be reused
        self.done = False
        self.span = span  # the copy's CLIENT span, when its request's trace is sampled
        host.mirror_copies += 1
        self._hold(self.pending_bytes)

    def start(self) -> None:
        if self.done:  # dropped as it was made: over the budget
            return
        endpoint = self.cluster.balancer("RoundRobin").pick(b"", time.monotonic())
        if endpoint is None:
            self._finish("failed")
            return
        upstream = self.host.pool.take(endpoint, self.cluster.dial)
        if upstream is not None:
            self._attach(upstream)
        else:
            self.host.connect(self, endpoint, self.cluster.dial)

    # --- from the exchange: the request's body, as the client sent it (unframed) ---

    def body(self, data: bytes) -> None:
        if self.done:
            return
        upstream = self.upstream
        if upstream is None:
            self.pending_bytes += len(data)
            self.pending.append(data)
            self._hold(self.pending_bytes)
            return
        upstream.send(data)
        self._hold(upstream.buffered())

    def _hold(self, held: int) -> None:
        """Count what the copy holds unsent now; drop it when over its bound or the budget.
        A socket's buffer drains unseen between writes, so the count errs high, never low."""
        host = self.host
        host.mirror_held += held - self.held
        self.held = held
        if held > MIRROR_BUFFER or (held and host.mirror_held > MIRROR_BUDGET):
            self._finish("dropped")  # the mirror is slower than the clients

    def end(self) -> None:
        """The whole request is in."""
        self.ended = True
        if self.upstream is not None and not self.done:
            self.upstream.end()
            self._start_timer()

    def cancel(self) -> None:
        """The client's request will not complete: a partial copy is worth nothing."""
        if not self.done and not self.ended:
            self._finish("dropped")

    # --- connecting (the listener's connect task) ---

    def connected(self, upstream: Backend) -> None:
        if self.done:
            upstream.unused()
            return
        self._attach(upstream)

    def connect_failed(self, endpoint: EndpointState, error: str) -> None:
        self._finish("failed")

    def _attach(self, upstream: Backend) -> None:
        self.upstream = upstream
        if self.span is not None:
            self.span.sent(upstream.endpoint)
        pending, self.pending = self.pending, []
        upstream.attach(self, self.request, b"".join(pending), self.ended)
        self._hold(upstream.buffered())
        if self.done:
            return
        if self.ended:
            self._start_timer()

    def _start_timer(self) -> None:
        if self.timer is None:
            self.timer = self.host.loop.call_later(self.answer_seconds, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        self._finish("failed")

    # --- what the upstream reports (its response is read and dropped) ---

    def hold(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def response_head(self, head: ResponseHead) -> None:
        if head.status >= 200:
            self.keep_alive = head.keep_alive
            if self.span is not None:
                self.span.status = head.status

    def response_body(self, data: bytes) -> None:
        pass

    def response_trailers(self, trailers: Headers) -> None:
        pass

    def response_end(self) -> None:
        upstream = self.upstream
        if upstream is None or self.done:
            return
        self.upstream = None
        upstream.done(reusable=self.ended and self.keep_alive)
        self._finish("answered")

    def upstream_failed(self, bad: BadMessage) -> None:
        self._finish("failed")

    def upstream_upgraded(self, rest: bytes) -> None:
        self._finish("failed")

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        self._finish("failed")

    def upstream_refused(self) -> None:
        self.upstream = None
        self._finish("failed")  # a copy is never sent twice

    def backend_full(self, full: bool) -> None:
        """Nothing to pause: the client is never held for a copy. What the socket holds is
        checked against the bounds as each write adds to it (_hold)."""

    def _finish(self, result: str) -> None:
        if self.done:
            return
        self.done = True
        self.host.mirror_copies -= 1
        self.host.mirror_held -= self.held
        self.held = 0
        self.pending = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.discard()
        if self.span is not None:
            self.span.finish(self.method, result)
        stats = self.cluster.stats
        if result == "answered":
            stats.mirrored += 1
        elif result == "dropped":
            stats.mirror_dropped += 1
        else:
            stats.mirror_failed += 1
