"""Per-client limits that absorb floods at the edge: what a flooding source gets, what
everyone else suffers meanwhile, and that the per-client state stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from dataplane import limits as limits_module
from dataplane.l4 import listener as l4_listener
from dataplane.l4.listener import ServingL4
from dataplane.limits import ClientLimiter, client_key
from dataplane.table import Limits
from dataplane.udp.listener import ServingUDP

from .helpers import async_wait_for
from .l4kit import Backend, l4_table, listener_port, read_name, running_dataplane
from .udpkit import Dnsmasq, free_udp_port, udp_table, whoami

# A flooder in a process of its own: connects from its source address as fast as it can,
# holds up to 200 connections (oldest closed first), for `seconds` or `most` attempts.
FLOODER = """
import json, socket, sys, time
port, source, seconds, most = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
held, attempts, failed = [], 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end and attempts < most:
    attempts += 1
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=1, source_address=(source, 0)))
    except OSError:
        failed += 1
    if len(held) > 200:
        held.pop(0).close()
print(json.dumps({"attempts": attempts, "connect_failed": failed}))
"""


async def victim_round_trips(port: int, count: int, source: str) -> list[float]:
    """count connections from source, one after another: connect, read the backend's name."""
    took = []
    for _ in range(count):
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        assert await read_name(reader) == "a"
        took.append(time.monotonic() - start)
        writer.close()
        await asyncio.sleep(0.07)  # about 14 a second: within its own rate limit
    return took


async def test_a_connection_flood_from_one_source_does_not_keep_another_from_being_served() -> None:
    backend = await Backend("a").start()
    port = listener_port()
    limits = {"perClient": {"maxConnections": 10, "connectionRate": {"connections": 20, "burst": 20}}}
    async with running_dataplane(connection_log=False) as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}, limits=limits))
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        began = time.monotonic()
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, str(port), "127.0.0.2", "3", "50000", stdout=subprocess.PIPE
        )
        await async_wait_for(
            lambda: serving.accepted + sum(serving.rejected.values()) > 100, 10, what="a flood"
        )
        took = await victim_round_trips(port, 50, "127.0.0.3")
        output, _ = await asyncio.wait_for(flooder.communicate(), 30)
        flood = json.loads(output)
        await async_wait_for(lambda: not serving.connections, 10, what="the flood's connections to end")
        elapsed = time.monotonic() - began
        refused = {k: v for k, v in serving.rejected.items() if v}
        from_flooder = serving.accepted - 50
    await backend.stop()
    p50, p99 = statistics.median(took), sorted(took)[int(len(took) * 0.99) - 1]
    print(
        f"\nflood: {flood['attempts']} connects from 127.0.0.2 in 3 s, {from_flooder} forwarded, "
        f"refused {refused}; victim 127.0.0.3: 50/50 served, "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    # The flooder got its burst and what the rate refilled meanwhile, no more.
    assert from_flooder <= 20 + 20 * elapsed
    assert (
        refused.get("client_rate", 0) + refused.get("client_connections", 0)
        >= flood["attempts"] - from_flooder - flood["connect_failed"] - 5
    )
    assert len(took) == 50  # every victim connection was served


async def test_the_accept_rate_caps_the_whole_listener() -> None:
    backend = await Backend("a").start()
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}, limits={"acceptRate": {"connections": 5}}))
        served = 0
        for i in range(20):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(f"127.0.0.{10 + i}", 0)
            )
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):  # refused: a reset
                served += await read_name(reader) == "a"
            writer.close()
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
    await backend.stop()
    assert 5 <= served <= 7  # the burst, and what refilled meanwhile
    assert serving.rejected["accept_rate"] == 20 - served


@pytest.fixture
def small_client_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(limits_module, "IDLE_CLIENTS", 100)
    monkeypatch.setattr(l4_listener, "CLIENT_EXPIRY_PERIOD", 0.1)
    yield


@pytest.mark.usefixtures("small_client_table")
async def test_per_client_state_is_bounded_and_expires() -> None:
    """600 sources, one connection each: at most 100 idle clients are remembered, and
    none once their buckets are full again."""
    backend = await Backend("a").start()
    port = listener_port()
    limits = {"perClient": {"connectionRate": {"connections": 10, "burst": 5}}}  # full again after 0.5 s
    async with running_dataplane(connection_log=False) as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}, limits=limits))
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4) and serving.limiter is not None
        most = 0
        for i in range(600):
            source = f"127.1.{i // 250}.{i % 250 + 1}"
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            assert await read_name(reader) == "a"
            writer.close()
            most = max(most, serving.limiter.tracked)
        limiter = serving.limiter
        await async_wait_for(lambda: limiter.tracked == 0, 5, what="the client state to expire")
    await backend.stop()
    assert most <= 100 + 2  # the idle ones, plus those still connected


async def test_a_session_flood_from_one_source_does_not_keep_another_from_being_answered() -> None:
    server = Dnsmasq("a").start()
    port = free_udp_port()
    limits = {"perClient": {"maxConnections": 30, "connectionRate": {"connections": 50, "burst": 20}}}
    try:
        async with running_dataplane(connection_log=False) as dp:
            await dp.apply(udp_table(port, {"dns": [server.port]}, limits=limits, timeouts={"idle": "500ms"}))
            serving = dp.udp_listeners[port]
            assert isinstance(serving, ServingUDP)
            flood = """
import socket, sys, time
port = int(sys.argv[1])
end = time.monotonic() + 2
sent = 0
while time.monotonic() < end:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.2", 0))
    s.sendto(b"\\x00" * 40, ("127.0.0.1", port))  # a new port: a new session each
    s.close()
    sent += 1
print(sent)
"""
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", flood, str(port), stdout=subprocess.PIPE
            )
            answered = 0
            for _ in range(40):  # a stub resolver: a new port per query, 25 a second
                answered += await whoami(port) == "a"
                await asyncio.sleep(0.04)
            output, _ = await asyncio.wait_for(flooder.communicate(), 30)
            drops = {k: v for k, v in serving.drops.items() if v}
            print(
                f"\nUDP flood: {int(output)} datagrams from new ports of 127.0.0.2, "
                f"{serving.created - 40} sessions made, drops {drops}; victim: {answered}/40 answered"
            )
            assert answered == 40
            assert serving.created - 40 <= 20 + 50 * 3
            assert drops.get("client_rate", 0) + drops.get("client_connections", 0) > 0
    finally:
        server.stop()


def test_a_client_is_an_ipv4_address_or_an_ipv6_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")


def test_the_limiter_counts_and_refills() -> None:
    limiter = ClientLimiter(Limits(clientConnections=2, clientRate=1.0, clientBurst=3))
    first = limiter.admit("10.0.0.1", 0.0)
    second = limiter.admit("10.0.0.1", 0.0)
    assert not isinstance(first, str) and not isinstance(second, str)
    assert limiter.admit("10.0.0.1", 0.0) == "client_connections"
    limiter.release(first, 0.0)
    assert not isinstance(limiter.admit("10.0.0.1", 0.0), str)  # the third token
    limiter.release(second, 0.0)
    assert limiter.admit("10.0.0.1", 0.5) == "client_rate"  # half a token refilled
    assert not isinstance(limiter.admit("10.0.0.1", 1.0), str)
    assert not isinstance(limiter.admit("10.0.0.2", 1.0), str)  # another client, its own bucket
