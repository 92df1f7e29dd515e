"""Endpoint choice: each policy's distribution, Maglev's balance and disruption, panic mode."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dataplane.balancer import (
    Balancer,
    ConsistentHash,
    LeastConnections,
    LeastRequest,
    Random,
    RoundRobin,
    maglev_table,
    next_prime,
)
from dataplane.health import EndpointState


def endpoints(n: int, weights: list[float] | None = None) -> list[tuple[EndpointState, float]]:
    weights = weights or [1.0] * n
    return [(EndpointState(f"10.0.0.{i + 1}", 80), w) for i, w in enumerate(weights)]


def picks(balancer: object, count: int, keys: list[bytes] | None = None) -> Counter[str]:
    pick = getattr(balancer, "pick")  # noqa: B009
    keys = keys or [b"k"] * count
    return Counter(pick(keys[i % len(keys)], 0.0).address for i in range(count))


def test_round_robin_weighted_exact_and_smooth() -> None:
    rr = RoundRobin(endpoints(3, [5, 1, 1]))
    sequence = [rr.pick(b"", 0.0).address for _ in range(70)]  # type: ignore[union-attr]
    assert Counter(sequence) == {"10.0.0.1": 50, "10.0.0.2": 10, "10.0.0.3": 10}
    # nginx's smooth WRR for 5:1:1 interleaves: a a b a c a a (never 5 in a row)
    assert sequence[:7] == [
        "10.0.0.1",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.1",
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.1",
    ]


def test_round_robin_skips_unavailable() -> None:
    eps = endpoints(3)
    eps[1][0].healthy = False
    counts = picks(RoundRobin(eps), 30)
    assert counts == {"10.0.0.1": 15, "10.0.0.3": 15}


def test_zero_weight_gets_nothing() -> None:
    counts = picks(RoundRobin(endpoints(2, [1, 0])), 20)
    assert counts == {"10.0.0.1": 20}


def test_least_connections_with_weights() -> None:
    eps = endpoints(2, [2, 1])
    eps[0][0].active = 3  # 3 / 2 = 1.5
    eps[1][0].active = 1  # 1 / 1 = 1.0
    lc = LeastConnections(eps)
    assert lc.pick(b"", 0.0) is eps[1][0]
    eps[0][0].active, eps[1][0].active = 4, 2  # 2.0 each: a tie, broken at random
    random.seed(7)
    assert {lc.pick(b"", 0.0).address for _ in range(50)} == {"10.0.0.1", "10.0.0.2"}  # type: ignore[union-attr]


def test_random_follows_weights() -> None:
    random.seed(1)
    counts = picks(Random(endpoints(2, [3, 1])), 20000)
    share = counts["10.0.0.1"] / 20000
    assert 0.73 < share < 0.77


def test_panic_mode_when_nothing_is_available() -> None:
    eps = endpoints(2)
    for state, _ in eps:
        state.healthy = False
    assert RoundRobin(eps).pick(b"", 0.0) is not None
    assert LeastConnections(eps).pick(b"", 0.0) is not None


@pytest.mark.parametrize("policy", [RoundRobin, LeastConnections, LeastRequest, Random, ConsistentHash])
def test_ejections_are_ignored_below_half_available(policy: type[Balancer]) -> None:
    """Clients can make endpoints answer 5xx and so get them ejected; they must not be able
    to take most of a Service out that way (Envoy's panic threshold, 50 %)."""
    eps = endpoints(3)
    balancer = policy(eps)
    eps[0][0].ejected_until = 100.0  # one of three ejected: skipped
    keys = [b"k%d" % i for i in range(300)]
    assert "10.0.0.1" not in picks(balancer, 300, keys)
    eps[1][0].ejected_until = 100.0  # two of three: below half available, ejections ignored
    balancer.panic_checked = float("-inf")  # (it recounts at most once a second)
    assert set(picks(balancer, 300, keys)) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_exclude_is_respected_for_failover() -> None:
    eps = endpoints(3)
    first = eps[0][0]
    for cls in (RoundRobin, LeastConnections, Random, ConsistentHash):
        balancer = cls(eps)
        for _ in range(20):
            assert balancer.pick(b"key", 0.0, frozenset({first})) is not first
        assert balancer.pick(b"key", 0.0, frozenset(e for e, _ in eps)) is None


def test_maglev_table_size_is_a_prime_at_least_100x() -> None:
    assert next_prime(65537) == 65537
    assert ConsistentHash(endpoints(3)).size == 65537
    big = ConsistentHash(endpoints(700))
    assert big.size >= 70000 and next_prime(big.size) == big.size


@pytest.mark.parametrize("n", [3, 10, 50])
def test_maglev_imbalance_at_most_one_percent(n: int) -> None:
    table = maglev_table([f"10.0.0.{i}:80" for i in range(n)], [1.0] * n, 65537)
    counts = Counter(table)
    ideal = 65537 / n
    assert max(abs(c - ideal) / ideal for c in counts.values()) <= 0.01


def test_maglev_respects_weights() -> None:
    table = maglev_table(["a", "b"], [3.0, 1.0], 65537)
    counts = Counter(table)
    assert abs(counts[0] / 65537 - 0.75) < 0.01


def test_maglev_removing_one_endpoint_moves_few_other_keys() -> None:
    n = 10
    names = [f"10.0.0.{i}:80" for i in range(n)]
    before = maglev_table(names, [1.0] * n, 65537)
    after_names = names[:3] + names[4:]  # endpoint 3 goes away
    after = maglev_table(after_names, [1.0] * (n - 1), 65537)
    moved_others = sum(1 for b, a in zip(before, after, strict=True) if b != 3 and names[b] != after_names[a])
    # The removed endpoint's 10% of slots must move; of the rest, Maglev moves only a few.
    assert moved_others / 65537 < 0.02, moved_others


def test_consistent_hash_is_stable_per_key_and_spreads_keys() -> None:
    eps = endpoints(4)
    ch = ConsistentHash(eps)
    keys = [f"192.168.{i // 256}.{i % 256}".encode() for i in range(4000)]
    first = [ch.pick(k, 0.0) for k in keys]
    assert first == [ch.pick(k, 0.0) for k in keys]
    spread = Counter(e.address for e in first if e is not None)
    assert len(spread) == 4 and min(spread.values()) > 800


def test_consistent_hash_unavailable_endpoint_moves_only_its_keys() -> None:
    eps = endpoints(4)
    ch = ConsistentHash(eps)
    keys = [f"192.168.{i // 256}.{i % 256}".encode() for i in range(4000)]
    before = [ch.pick(k, 0.0) for k in keys]
    eps[2][0].healthy = False
    after = [ch.pick(k, 0.0) for k in keys]
    for b, a in zip(before, after, strict=True):
        if b is not eps[2][0]:
            assert a is b
        else:
            assert a is not eps[2][0]
