"""What an L7 listener needs per request, built once per table swap.

Counters live in stats objects keyed by route rule and cluster name, kept by the listener
across swaps, so metrics stay monotonic while the configuration changes under them; a rule
or cluster that leaves the table takes its counters (and its metric series) with it.
"""

from __future__ import annotations

import bisect
import math
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .. import shared, table
from ..balancer import Balancer, build
from ..health import EndpointState, HealthRegistry
from ..parts import PartPath
from .cors import CorsPolicy
from .dial import dial_for
from .headers import Modifier
from .router import Router
from .session import SessionPolicy
from .tls import Certificates, Contexts

# Latency histogram buckets (seconds), Prometheus style. tuple[float, ...], not the fixed
# tuple Final infers: compiled, that is kept unboxed and boxed again (13 floats) for each
# bisect per request.
BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MAX_RATE_KEYS: Final = 100_000
# Envoy's default retry budget: retries may add 20 % to active requests, at least 3.
RETRY_BUDGET_SHARE: Final = 0.2
RETRY_BUDGET_MIN: Final = 3


@dataclass
class RuleStats:
    """Counters of one route rule."""

    responses: list[int] = field(default_factory=lambda: [0] * 6)  # by status class 1xx..5xx, [0] unused
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds: float = 0.0
    retries: int = 0
    rate_limited: int = 0

    def observe(self, status: int, seconds: float) -> None:
        self.responses[min(status // 100, 5)] += 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds


@dataclass
class ClusterStats:
    requests: int = 0
    connect_failures: int = 0
    retries: int = 0
    active_requests: int = 0
    active_retries: int = 0
    # Request copies sent to this cluster as a mirror: answered, dropped before or while
    # sending (the copy would have held memory or the mirror was full), or failed.
    mirrored: int = 0
    mirror_dropped: int = 0
    mirror_failed: int = 0

    def may_retry(self) -> bool:
        return self.active_retries < max(RETRY_BUDGET_MIN, RETRY_BUDGET_SHARE * self.active_requests)


class Cluster:
    """Endpoints of one backend Service port, with a balancer per policy used."""

    __slots__ = ("_balancers", "dial", "endpoints", "name", "source", "stats")

    def __init__(
        self, name: str, endpoints: list[EndpointState], stats: ClusterStats, source: table.Cluster
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        self.stats = stats
        self.source = source  # the table's cluster this was built from
        self.dial = dial_for(source)  # HTTP/1.1 or HTTP/2, in clear or TLS
        self._balancers: dict[str, Balancer] = {}

    def balancer(self, policy: str) -> Balancer:
        found = self._balancers.get(policy)
        if found is None:
            found = self._balancers[policy] = build(policy, [(e, 1.0) for e in self.endpoints])
        return found


class TokenBuckets:
    """A local rate limit: one token bucket per key, least recently used keys forgotten."""

    def __init__(self, limit: table.RateLimit, rule: str = "") -> None:
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.key = limit.key
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        # In a worker process the pod's buckets, shared with the other workers; a changed
        # limit starts from full buckets, as a new TokenBuckets here does.
        self.shared = shared.buckets()
        self.rule = zlib.crc32(f"{rule}#{limit.rate}#{limit.burst}".encode())

    def take(self, key: bytes, now: float) -> float:
        """0 when allowed; otherwise seconds until a token is available."""
        if self.shared is not None:
            return self.shared.take(self.rule, key, self.rate, self.burst, now)
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_RATE_KEYS:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """Where copies of a share of a rule's (or a backend's) requests go."""

    cluster: Cluster
    share: float


def _mirrors(mirrors: list[table.Mirror], clusters: dict[str, Cluster]) -> tuple[MirrorTarget, ...]:
    return tuple(MirrorTarget(clusters[m.cluster], m.share) for m in mirrors)


class Target:
    """One backend of a rule: its cluster (None: the reference did not resolve) and the
    filters of its backendRef, applied after the rule's."""

    __slots__ = (
        "cluster",
        "mirrors",
        "own_mirrors",
        "position",
        "request_modifier",
        "response_modifier",
        "rewrite",
    )

    def __init__(
        self,
        backend: table.Backend,
        position: int,
        clusters: dict[str, Cluster],
        rule_mirrors: tuple[MirrorTarget, ...],
    ) -> None:
        self.cluster = clusters[backend.cluster] if backend.cluster is not None else None
        self.position = position  # among the rule's backends (session tokens name it)
        filters = backend.filters
        self.request_modifier = Modifier.of(filters.requestHeaders, request=True) if filters else None
        self.response_modifier = Modifier.of(filters.responseHeaders, request=False) if filters else None
        self.rewrite = filters.rewrite if filters else None
        self.own_mirrors = _mirrors(filters.mirrors, clusters) if filters else ()
        # The rule's mirrors and this backend's: every copy a request sent here makes.
        self.mirrors = rule_mirrors + self.own_mirrors


class BackendChoice:
    """Weighted choice among a rule's backends (smooth weighted round robin)."""

    __slots__ = ("_current", "_single", "all", "backends", "total", "weights")

    def __init__(self, targets: list[tuple[Target, int]]) -> None:
        self.all = [t for t, _ in targets]
        positive = [(t, w) for t, w in targets if w > 0]
        self.backends = [t for t, _ in positive]
        self.weights = [w for _, w in positive]
        self.total = sum(self.weights)
        self._current = [0] * len(positive)
        self._single = len(positive) == 1

    def pick(self) -> Target | None:
        """The chosen backend; None when the rule has none with a weight."""
        if self._single:
            return self.backends[0]
        if not self.backends:
            return None
        best = 0
        current = self._current
        for i, weight in enumerate(self.weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.backends[best]


class Rule:
    """A route rule, ready to serve requests."""

    __slots__ = (
        "allow_encoded_slashes",
        "backend_request_timeout",
        "backends",
        "clusters",
        "cors",
        "index",
        "key_header",
        "limiter",
        "policy",
        "redirect",
        "request_modifier",
        "request_timeout",
        "response_modifier",
        "retry_attempts",
        "retry_backoff",
        "retry_codes",
        "retry_grpc_codes",
        "rewrite",
        "route",
        "session",
        "shapes_response",
        "stats",
    )

    def __init__(
        self, rule: table.Rule, clusters: dict[str, Cluster], stats: RuleStats, limiter: TokenBuckets | None
    ) -> None:
        self.route = rule.route
        self.index = rule.index
        self.stats = stats
        mirrors = _mirrors(rule.mirrors, clusters)
        targets = [Target(b, i, clusters, mirrors) for i, b in enumerate(rule.backends)]
        self.backends = BackendChoice([(t, b.weight) for t, b in zip(targets, rule.backends, strict=True)])
        # Every cluster the rule uses: a rule is rebuilt when one of them is.
        self.clusters = frozenset(
            {b.cluster for b in rule.backends if b.cluster is not None}
            | {m.cluster.name for t in targets for m in t.own_mirrors}
            | {m.cluster.name for m in mirrors}
        )
        self.cors = CorsPolicy(rule.cors) if rule.cors is not None else None
        self.session = (
            SessionPolicy(
                rule.session,
                [(t.cluster.name, t.cluster.endpoints) if t.cluster else ("", []) for t in targets],
            )
            if rule.session is not None
            else None
        )
        self.request_modifier = Modifier.of(rule.requestHeaders, request=True)
        self.response_modifier = Modifier.of(rule.responseHeaders, request=False)
        # Whether a response head is changed on its way: one test per response when not.
        self.shapes_response = (
            self.response_modifier is not None
            or rule.cors is not None
            or rule.session is not None
            or any(t.response_modifier is not None for t in targets)
        )
        self.rewrite = rule.rewrite
        self.redirect = rule.redirect
        self.request_timeout = rule.requestTimeout
        self.backend_request_timeout = rule.backendRequestTimeout
        self.retry_attempts = rule.retry.attempts if rule.retry else 0
        self.retry_codes = frozenset(rule.retry.codes) if rule.retry else frozenset()
        self.retry_grpc_codes = frozenset(rule.retry.grpcCodes) if rule.retry else frozenset()
        self.retry_backoff = rule.retry.backoff if rule.retry else 0.0
        self.limiter = limiter
        self.policy = rule.loadBalancing.policy
        key = rule.loadBalancing.key
        self.key_header = key.header.encode() if key.type == "Header" and key.header else None
        self.allow_encoded_slashes = rule.allowEncodedSlashes

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: base x 2^(attempt-1), randomized."""
        return random.uniform(0, self.retry_backoff * 2 ** (attempt - 1))


@dataclass
class L7Config:
    router: Router
    rules: dict[str, Rule]
    tls: Certificates | None
    source: table.L7Listener
    clusters: dict[str, Cluster]


@dataclass
class Memory:
    """State kept by a listener across swaps: stats and rate-limit buckets."""

    rules: dict[tuple[str, int], RuleStats] = field(default_factory=dict)
    clusters: dict[str, ClusterStats] = field(default_factory=dict)
    limiters: dict[tuple[str, int], tuple[table.RateLimit, TokenBuckets]] = field(default_factory=dict)

    # A rule or cluster leaves the table: its state goes too. Kept, every route ever
    # served would stay a metric series (about 23 per rule) and a bucket set until restart.
    def forget_rule(self, key: tuple[str, int]) -> None:
        self.rules.pop(key, None)
        self.limiters.pop(key, None)

    def forget_rules_but(self, keys: set[tuple[str, int]]) -> None:
        for key in [k for k in self.rules if k not in keys]:
            del self.rules[key]
        for key in [k for k in self.limiters if k not in keys]:
            del self.limiters[key]

    def forget_clusters(self, names: Iterable[str]) -> None:
        kept = set(names)
        for name in [n for n in self.clusters if n not in kept]:
            del self.clusters[name]


def build_config(
    listener: table.L7Listener,
    tbl: table.Table,
    health: HealthRegistry,
    memory: Memory,
    contexts: Contexts | None,
    *,
    previous: L7Config | None = None,
    changed: frozenset[PartPath] | None = None,
) -> L7Config:
    """The serving form of listener. What previous built from the same table objects is
    reused: a table patched by a delta shares every unchanged part with the one before.
    changed, when given, lists the part paths under this listener that differ from the
    table previous was built from: then only those are looked at, and a swap costs work
    in proportion to the change, not to the number of routes."""
    if contexts is None:
        tls = None
    elif previous is not None and previous.tls is not None and previous.tls.source is contexts:
        tls = previous.tls
    else:
        tls = Certificates(contexts)
    old_clusters = previous.clusters if previous is not None else {}
    clusters: dict[str, Cluster] = {}
    rebuilt: set[str] = set()
    for name, source in tbl.clusters.items():
        kept = old_clusters.get(name)
        if kept is not None and (kept.source is source or kept.source == source):
            clusters[name] = kept
            continue
        endpoints = [health.endpoint(e.address, e.port) for e in source.endpoints]
        clusters[name] = Cluster(name, endpoints, memory.clusters.setdefault(name, ClusterStats()), source)
        rebuilt.add(name)
    if len(memory.clusters) > len(clusters):
        memory.forget_clusters(clusters.keys())
    if previous is not None and changed is not None and not rebuilt:
        rules = dict(previous.rules)
        for rid in {path.key for path in changed if path.is_rule}:
            rule = listener.rules.get(rid)
            if rule is None:
                gone = rules.pop(rid, None)
                if gone is not None:
                    memory.forget_rule((gone.route, gone.index))
            else:
                rules[rid] = _rule(rule, clusters, memory)
        groups = {(path.kind, path.key) for path in changed if path.is_host_group}
        router = Router(listener, previous.router, groups)
        return L7Config(router=router, rules=rules, tls=tls, source=listener, clusters=clusters)
    old_rules = previous.rules if previous is not None else {}
    old_sources = previous.source.rules if previous is not None else {}
    rules = {}
    for rid, rule in listener.rules.items():
        kept_rule = old_rules.get(rid)
        same = kept_rule is not None and old_sources.get(rid) is rule
        if same and kept_rule is not None and not (rebuilt and rebuilt & kept_rule.clusters):
            rules[rid] = kept_rule
        else:
            rules[rid] = _rule(rule, clusters, memory)
    if len(memory.rules) > len(rules) or len(memory.limiters) > len(rules):
        memory.forget_rules_but({(r.route, r.index) for r in rules.values()})
    router = Router(listener, previous.router if previous is not None else None)
    return L7Config(router=router, rules=rules, tls=tls, source=listener, clusters=clusters)


def _rule(rule: table.Rule, clusters: dict[str, Cluster], memory: Memory) -> Rule:
    key = (rule.route, rule.index)
    limiter = None
    if rule.rateLimit is not None:
        kept = memory.limiters.get(key)
        if kept is not None and kept[0] == rule.rateLimit:
            limiter = kept[1]  # same limit: keep the buckets' state
        else:
            limiter = TokenBuckets(rule.rateLimit, f"{rule.route}#{rule.index}")
            memory.limiters[key] = (rule.rateLimit, limiter)
    return Rule(rule, clusters, memory.rules.setdefault(key, RuleStats()), limiter)


def retry_after(seconds: float) -> bytes:
    return str(max(1, math.ceil(seconds))).encode()


def now() -> float:
    return time.monotonic()
