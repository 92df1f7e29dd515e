"""Choosing an endpoint for a new connection (L4) or request (L7).

A balancer is built once per table swap from weighted endpoints (for L4, each backend's
weight split evenly over its endpoints). Endpoints that are unhealthy or
ejected are skipped; when none is available every endpoint is eligible again (Envoy's
"panic mode": a health-check misconfiguration must not become an outage). And when fewer
than half are available, passive ejections are ignored: clients can make an endpoint
answer 5xx, and must not be able to eject most of a Service by doing so (Envoy's panic
threshold).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import zlib
from collections.abc import Callable, Sequence
from itertools import accumulate

from .health import EndpointState

Pick = Callable[[bytes, float, frozenset[EndpointState]], EndpointState | None]

PANIC_SHARE = 0.5  # below this share of available endpoints, ejections are ignored
PANIC_RECHECK_SECONDS = 1.0
_EVERY_EJECTION_OVER = float("inf")  # a time at which every ejection has ended


class Balancer:
    """Base: endpoints with weights, and the policy's pick."""

    def __init__(self, endpoints: Sequence[tuple[EndpointState, float]]) -> None:
        positive = [(e, w) for e, w in endpoints if w > 0]
        self.endpoints = [e for e, _ in positive]
        self.weights = [w for _, w in positive]
        self.panic_checked = float("-inf")
        self.panic = False

    def clock(self, now: float) -> float:
        """The time picks compare ejections with: now, or (in panic) a time at which every
        ejection is over. The share of available endpoints is counted at most once a second."""
        if now - self.panic_checked >= PANIC_RECHECK_SECONDS:
            self.panic_checked = now
            available = sum(1 for e in self.endpoints if e.available(now))
            self.panic = available < PANIC_SHARE * len(self.endpoints)
        return _EVERY_EJECTION_OVER if self.panic else now

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        """An endpoint for a connection from key (the client IP), skipping exclude."""
        raise NotImplementedError

    def _eligible(self, now: float, exclude: frozenset[EndpointState]) -> list[int]:
        indexes = [i for i, e in enumerate(self.endpoints) if e not in exclude and e.available(now)]
        if indexes:
            return indexes
        return [i for i, e in enumerate(self.endpoints) if e not in exclude]  # panic mode


class RoundRobin(Balancer):
    """Smooth weighted round robin (as nginx): weights spread evenly, not in bursts."""

    def __init__(self, endpoints: Sequence[tuple[EndpointState, float]]) -> None:
        super().__init__(endpoints)
        self._current = [0.0] * len(self.endpoints)
        self._equal = len(set(self.weights)) <= 1
        self._next = 0

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        now = self.clock(now)
        n = len(self.endpoints)
        if self._equal:
            # Equal weights: plain rotation, O(1) when the next endpoint is available.
            for _ in range(n):
                endpoint = self.endpoints[self._next]
                self._next = (self._next + 1) % n
                if endpoint not in exclude and endpoint.available(now):
                    return endpoint
        indexes = self._eligible(now, exclude)
        if not indexes:
            return None
        total = 0.0
        best = indexes[0]
        for i in indexes:
            self._current[i] += self.weights[i]
            total += self.weights[i]
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= total
        return self.endpoints[best]


class LeastConnections(Balancer):
    """Fewest active connections per unit of weight; ties broken at random."""

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        indexes = self._eligible(self.clock(now), exclude)
        if not indexes:
            return None
        best: list[int] = []
        lowest = float("inf")
        for i in indexes:
            load = self.endpoints[i].active / self.weights[i]
            if load < lowest:
                lowest, best = load, [i]
            elif load == lowest:
                best.append(i)
        return self.endpoints[random.choice(best)]


class LeastRequest(Balancer):
    """Power of two choices: of two random available endpoints, the less loaded one.

    Nearly as good as scanning for the least loaded, at constant cost per request, and it
    does not herd every request onto one endpoint that just became idle (Envoy's default).
    """

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        endpoints = self.endpoints
        n = len(endpoints)
        if n == 1:  # the common single-endpoint case, panic mode included
            return endpoints[0] if endpoints[0] not in exclude else None
        if n == 0:
            return None
        now = self.clock(now)
        if n > 1:
            a, b = random.sample(range(n), 2)
            first, second = endpoints[a], endpoints[b]
            first_ok = first not in exclude and first.available(now)
            second_ok = second not in exclude and second.available(now)
            if first_ok and second_ok:
                return first if first.active / self.weights[a] <= second.active / self.weights[b] else second
            if first_ok or second_ok:
                return first if first_ok else second
        indexes = self._eligible(now, exclude)
        if not indexes:
            return None
        return endpoints[min(indexes, key=lambda i: endpoints[i].active / self.weights[i])]


class Random(Balancer):
    """Weighted random choice."""

    def __init__(self, endpoints: Sequence[tuple[EndpointState, float]]) -> None:
        super().__init__(endpoints)
        self._cumulative = list(accumulate(self.weights))

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        if not self.endpoints:
            return None
        now = self.clock(now)
        for _ in range(3):  # usually the first draw is available
            i = bisect.bisect(self._cumulative, random.random() * self._cumulative[-1])
            endpoint = self.endpoints[min(i, len(self.endpoints) - 1)]
            if endpoint not in exclude and endpoint.available(now):
                return endpoint
        indexes = self._eligible(now, exclude)
        if not indexes:
            return None
        return self.endpoints[random.choices(indexes, weights=[self.weights[i] for i in indexes])[0]]


def next_prime(n: int) -> int:
    """The smallest prime >= n."""

    def is_prime(k: int) -> bool:
        if k < 2:
            return False
        if k % 2 == 0:
            return k == 2
        f = 3
        while f * f <= k:
            if k % f == 0:
                return False
            f += 2
        return True

    while not is_prime(n):
        n += 1
    return n


MAGLEV_DEFAULT_SIZE = 65537


def maglev_table(names: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """Maglev lookup table (Eisenbud et al., NSDI 2016), weighted as Envoy does it.

    Each endpoint walks its own permutation of the slots (offset and skip from two hashes
    of its name) and claims the next free slot in turn; an endpoint with weight w claims
    in proportion to w. Removing one endpoint moves few keys that were not its own.
    """
    n = len(names)
    table = [-1] * size
    if n == 0:
        return table
    offsets, skips = [], []
    for name in names:
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
    top = max(weights)
    share = [w / top for w in weights]
    nexts = [0] * n
    claimed = [0] * n
    filled = 0
    iteration = 0
    while filled < size:
        iteration += 1
        for i in range(n):
            if claimed[i] >= iteration * share[i]:
                continue  # over its share for this round
            offset, skip, j = offsets[i], skips[i], nexts[i]
            slot = (offset + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = i
            nexts[i] = j + 1
            claimed[i] += 1
            filled += 1
            if filled == size:
                break
    return table


class ConsistentHash(Balancer):
    """Maglev on the client IP: a client keeps its endpoint while the endpoint set holds.

    The table size is a prime >= 100 x endpoints (65537 by default). An unavailable
    endpoint's keys move to the next available slot, so other clients stay put.
    """

    def __init__(self, endpoints: Sequence[tuple[EndpointState, float]], size: int | None = None) -> None:
        super().__init__(endpoints)
        size = size or max(MAGLEV_DEFAULT_SIZE, next_prime(100 * len(self.endpoints)))
        self.size = size
        self.table = maglev_table([e.key for e in self.endpoints], self.weights, size)

    def pick(
        self, key: bytes, now: float, exclude: frozenset[EndpointState] = frozenset()
    ) -> EndpointState | None:
        if not self.endpoints:
            return None
        now = self.clock(now)
        slot = zlib.crc32(key) % self.size
        for probe in range(len(self.endpoints) * 4):
            endpoint = self.endpoints[self.table[(slot + probe) % self.size]]
            if endpoint not in exclude and endpoint.available(now):
                return endpoint
        indexes = self._eligible(now, exclude)
        return self.endpoints[indexes[zlib.crc32(key) % len(indexes)]] if indexes else None


POLICIES: dict[str, type[Balancer]] = {
    "RoundRobin": RoundRobin,
    "LeastConnections": LeastConnections,
    "LeastRequest": LeastRequest,
    "Random": Random,
    "ConsistentHash": ConsistentHash,
}


def build(policy: str, endpoints: Sequence[tuple[EndpointState, float]]) -> Balancer:
    return POLICIES[policy](endpoints)
