"""UDP listeners over real sockets: dnsmasq as the backends, dnspython as the client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator

import dns.exception
import pytest

from dataplane.udp.listener import ServingUDP

from .helpers import async_wait_for
from .l4kit import running_dataplane
from .udpkit import Dnsmasq, free_udp_port, udp_table, whoami


@pytest.fixture
def servers() -> Iterator[dict[str, Dnsmasq]]:
    started = {name: Dnsmasq(name).start() for name in ("a", "b")}
    yield started
    for server in started.values():
        server.stop()


def serving_udp(dp: object, port: int) -> ServingUDP:
    listener = dp.udp_listeners[port]  # type: ignore[attr-defined]
    assert isinstance(listener, ServingUDP)
    return listener


@pytest.mark.both_loops
async def test_queries_are_balanced_and_answered_from_the_listener(servers: dict[str, Dnsmasq]) -> None:
    port = free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [servers["a"].port, servers["b"].port]}))
        # Each query from a fresh port is a session of its own: round robin alternates.
        names = [await whoami(port) for _ in range(10)]
        assert Counter(names) == {"a": 5, "b": 5}
        serving = serving_udp(dp, port)
        assert serving.created == 10


async def test_consistent_hash_keeps_a_client_on_one_endpoint(servers: dict[str, Dnsmasq]) -> None:
    port = free_udp_port()
    async with running_dataplane() as dp:
        table = udp_table(
            port, {"dns": [servers["a"].port, servers["b"].port]}, loadBalancing={"policy": "ConsistentHash"}
        )
        await dp.apply(table)
        assert len({await whoami(port) for _ in range(12)}) == 1  # 12 sessions, one endpoint


async def test_a_session_keeps_its_endpoint_after_a_table_change_until_idle(
    servers: dict[str, Dnsmasq],
) -> None:
    """The UDP drain: an endpoint removed by a table change keeps its live sessions; new
    sessions go elsewhere; once idle, the session ends and the client moves on."""
    port, client_port = free_udp_port(), free_udp_port()
    a, b = servers["a"].port, servers["b"].port
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [a]}, timeouts={"idle": "300ms"}))
        assert await whoami(port, client_port) == "a"
        await dp.apply(udp_table(port, {"dns": [b]}, 2, timeouts={"idle": "300ms"}))
        assert await whoami(port, client_port) == "a"  # the same session: still a
        assert await whoami(port) == "b"  # a new session
        serving = serving_udp(dp, port)
        await async_wait_for(lambda: not serving.sessions, 5, what="the sessions to expire")
        assert serving.expired == 2
        assert await whoami(port, client_port) == "b"


async def test_a_refusing_endpoint_is_marked_and_avoided(servers: dict[str, Dnsmasq]) -> None:
    """Passive health: nothing listens on the dead endpoint, the kernel answers ICMP port
    unreachable, the session ends, the endpoint is ejected after three such failures."""
    port, dead = free_udp_port(), free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [dead, servers["a"].port]}))
        answered = 0
        for _ in range(8):
            # One that went to the dead endpoint times out: the client retries, as DNS clients do.
            with contextlib.suppress(dns.exception.Timeout):
                answered += await whoami(port, wait=0.3) == "a"
        state = dp.health.endpoint("127.0.0.1", dead, "udp")
        assert state.ejections >= 1 and state.ejected_until > time.monotonic()
        assert [await whoami(port) for _ in range(4)] == ["a"] * 4  # ejected: not tried
        assert answered >= 4
        serving = serving_udp(dp, port)
        assert serving.drops["backend_refused"] >= 3


async def test_sessions_are_capped_and_oversized_datagrams_dropped(servers: dict[str, Dnsmasq]) -> None:
    port = free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [servers["a"].port]}, maxSessions=2, maxDatagramSize=100))
        held = [free_udp_port(), free_udp_port()]
        for client_port in held:
            assert await whoami(port, client_port) == "a"
        with pytest.raises(dns.exception.Timeout):
            await whoami(port, wait=0.3)  # a third session: dropped
        for client_port in held:  # the two sessions still work
            assert await whoami(port, client_port) == "a"
        serving = serving_udp(dp, port)
        assert serving.drops["max_sessions"] == 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", held[0]))
            sock.sendto(b"x" * 101, ("127.0.0.1", port))
        await async_wait_for(lambda: serving.drops["too_large"] == 1, 5, what="the big datagram dropped")


async def test_a_new_datagram_size_applies_to_live_sessions(servers: dict[str, Dnsmasq]) -> None:
    """The listener copies maxDatagramSize out of its config (read per datagram, both
    ways): a table swap must update that copy, for sessions already open too."""
    port, client_port = free_udp_port(), free_udp_port()
    a = servers["a"].port
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [a]}, maxDatagramSize=512))
        assert await whoami(port, client_port) == "a"
        await dp.apply(udp_table(port, {"dns": [a]}, 2, maxDatagramSize=20))  # under a query's size
        with pytest.raises(dns.exception.Timeout):
            await whoami(port, client_port, wait=0.3)
        serving = serving_udp(dp, port)
        assert serving.drops["too_large"] == 1
        await dp.apply(udp_table(port, {"dns": [a]}, 3, maxDatagramSize=512))
        assert await whoami(port, client_port) == "a"
        assert serving.created == 1  # one session throughout


async def test_a_silent_backend_holds_only_bounded_sessions_that_expire() -> None:
    """A backend that never answers, 300 client ports: sessions stay within maxSessions
    and all of them expire; nothing is kept per datagram."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(
            udp_table(port, {"void": [silent.getsockname()[1]]}, maxSessions=100, timeouts={"idle": "200ms"})
        )
        serving = serving_udp(dp, port)
        clients = []
        for _ in range(300):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.sendto(b"anyone there?", ("127.0.0.1", port))
            clients.append(sock)
        await async_wait_for(
            lambda: serving.created + serving.drops["max_sessions"] == 300, 5, what="all read"
        )
        assert serving.created == 100 and len(serving.sessions) <= 100
        await async_wait_for(lambda: not serving.sessions, 5, what="the sessions to expire")
        assert serving.expired == 100
        for sock in clients:
            sock.close()
    silent.close()


async def test_metrics_and_a_log_line_per_session(
    servers: dict[str, Dnsmasq], caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane.metrics import DataplaneCollector

    port = free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [servers["a"].port]}, timeouts={"idle": "100ms"}))
        with caplog.at_level("INFO", logger="bilayer.udp"):
            assert await whoami(port) == "a"
            serving = serving_udp(dp, port)
            await async_wait_for(lambda: not serving.sessions, 5, what="the session to expire")
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
    labels = f'listener="default/u{port}",port="{port}"'
    assert f'bilayer_udp_datagrams_total{{direction="client",{labels}}} 1.0' in text
    assert f'bilayer_udp_datagrams_total{{direction="backend",{labels}}} 1.0' in text
    assert f"bilayer_udp_sessions_created_total{{{labels}}} 1.0" in text
    assert f"bilayer_udp_sessions_expired_total{{{labels}}} 1.0" in text
    assert f"bilayer_udp_sessions_active{{{labels}}} 0.0" in text
    assert f'bilayer_listener_up{{kind="udp",port="{port}"}} 1.0' in text
    record = next(r for r in caplog.records if r.getMessage() == "session closed")
    logged = record.fields  # type: ignore[attr-defined]
    assert logged["backend"] == f"127.0.0.1:{servers['a'].port}/udp"
    assert logged["datagrams_from_client"] == 1 and logged["datagrams_from_backend"] == 1
    assert logged["reason"] == "idle-timeout"


async def test_removing_the_listener_closes_its_socket_and_sessions(servers: dict[str, Dnsmasq]) -> None:
    port, other = free_udp_port(), free_udp_port()
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"dns": [servers["a"].port]}))
        assert await whoami(port) == "a"
        serving = serving_udp(dp, port)
        await dp.apply(udp_table(other, {"dns": [servers["a"].port]}, 2))
        assert port not in dp.udp_listeners and not serving.sessions
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", port))  # the port is free again
        assert await whoami(other) == "a"


async def test_a_udp_bind_failure_is_reported_and_tcp_on_the_port_serves() -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    async with running_dataplane() as dp:
        await dp.apply(udp_table(port, {"void": [port]}))
        assert dp.listener_errors[port].startswith("cannot listen on udp 127.0.0.1")
    busy.close()
    await asyncio.sleep(0)
