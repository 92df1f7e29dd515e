"""L4 forwarding over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter

import pytest

from dataplane.l4.listener import ServingL4

from .helpers import async_wait_for
from .l4kit import Backend, connect, l4_table, listener_port, read_name, running_dataplane


async def one_backend(name: str = "a") -> Backend:
    return await Backend(name).start()


@pytest.mark.both_loops
async def test_byte_exact_both_ways_with_half_close() -> None:
    """Several MiB up, the client half-closes, several MiB come back, nothing lost or reordered."""
    received_by_backend = bytearray()
    reply = os.urandom(3 * 1024 * 1024 + 7)

    async def sink_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 16):  # until the client's EOF arrives
            received_by_backend.extend(chunk)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(sink_then_reply, "127.0.0.1", 0)
    port = listener_port()
    upload = os.urandom(5 * 1024 * 1024 + 3)
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"b": [server.sockets[0].getsockname()[1]]}))
        reader, writer = await connect(port)
        writer.write(upload)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    server.close()
    assert hashlib.sha256(received_by_backend).digest() == hashlib.sha256(upload).digest()
    assert len(got) == len(reply) and got == reply


@pytest.mark.both_loops
async def test_many_concurrent_connections() -> None:
    backend = await one_backend()
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}))

        async def round_trip(i: int) -> bytes:
            reader, writer = await connect(port)
            assert await read_name(reader) == "a"
            message = f"hello {i}\n".encode() * 100
            writer.write(message)
            data = await reader.readexactly(len(message))
            writer.close()
            return data

        results = await asyncio.gather(*(round_trip(i) for i in range(300)))
        assert all(r.startswith(f"hello {i}\n".encode()) for i, r in enumerate(results))
    await backend.stop()


@pytest.mark.both_loops
async def test_slow_reader_does_not_make_the_proxy_buffer() -> None:
    """100 MiB to a reader that reads slowly: the sender is held back, the proxy holds little."""
    total = 100 * 1024 * 1024
    state = {"read": 0, "max_held": 0}

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(256 * 1024):
            state["read"] += len(chunk)
            await asyncio.sleep(0.002)  # about 100 MB/s at most
        writer.close()

    server = await asyncio.start_server(slow_reader, "127.0.0.1", 0)
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"b": [server.sockets[0].getsockname()[1]]}))
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        _, writer = await connect(port)
        block = b"x" * (1024 * 1024)
        sent = 0
        max_gap = 0
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)
            max_gap = max(max_gap, sent - state["read"])
            for conn in serving.connections:
                held = sum(
                    side.transport.get_write_buffer_size()
                    for side in (conn.client, conn.backend)
                    if side is not None and side.transport is not None
                )
                state["max_held"] = max(state["max_held"], held)
        writer.write_eof()
        await async_wait_for(
            lambda: state["read"] >= total, deadline_s=60, what="the reader to get everything"
        )
        writer.close()
    server.close()
    # What is in flight is bounded by kernel socket buffers, not by the proxy: the proxy
    # holds at most the one read it could not pass on (uvloop and asyncio read 256 KiB).
    assert state["max_held"] <= 256 * 1024, state
    assert max_gap < 40 * 1024 * 1024, max_gap


async def test_redis_pipeline_all_answered_in_order(redis_port: int) -> None:
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"redis": [redis_port]}))
        reader, writer = await connect(port)
        key = f"counter-{os.getpid()}-{time.monotonic_ns()}"
        count = 5000
        writer.write(b"".join(f"INCR {key}\r\n".encode() for _ in range(count)))
        await writer.drain()
        for expected in range(1, count + 1):
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line == f":{expected}\r\n".encode()
        writer.write(f"DEL {key}\r\nQUIT\r\n".encode())
        assert await reader.readline() == b":1\r\n"
        writer.close()


async def test_round_robin_follows_weights_smoothly() -> None:
    a, b = await one_backend("a"), await one_backend("b")
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [a.port], "b": [b.port]}, weights={"a": 3, "b": 1}))
        names = []
        for _ in range(40):
            reader, writer = await connect(port)
            names.append(await read_name(reader))
            writer.close()
    assert Counter(names) == {"a": 30, "b": 10}
    # Smooth: never more than three a's in a row.
    assert "aaaa" not in "".join(names)
    await a.stop()
    await b.stop()


async def test_least_connections_prefers_idle_endpoint() -> None:
    a, b = await one_backend("a"), await one_backend("b")
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"s": [a.port, b.port]}, loadBalancing={"policy": "LeastConnections"}))
        held = []
        for _ in range(6):
            reader, writer = await connect(port)
            held.append((await read_name(reader), writer))
        assert Counter(n for n, _ in held) == {"a": 3, "b": 3}
        for name, writer in held:
            if name == "a":
                writer.close()
        await async_wait_for(lambda: a.connections and not a.open, what="a's connections to close")
        fresh = []
        for _ in range(3):
            reader, writer = await connect(port)
            fresh.append(await read_name(reader))
        assert fresh == ["a", "a", "a"]
    await a.stop()
    await b.stop()


async def test_consistent_hash_keeps_a_client_on_one_endpoint() -> None:
    backends = [await one_backend(n) for n in "abcd"]
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(
            l4_table(port, {"s": [b.port for b in backends]}, loadBalancing={"policy": "ConsistentHash"})
        )
        names = set()
        for _ in range(20):
            reader, writer = await connect(port)
            names.add(await read_name(reader))
            writer.close()
        assert len(names) == 1
    for b in backends:
        await b.stop()


async def test_failover_past_a_refused_endpoint() -> None:
    live = await one_backend("live")
    dead = listener_port()  # nothing listens here: connects are refused
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"s": [dead, live.port]}))
        for _ in range(10):
            reader, writer = await connect(port)
            assert await read_name(reader) == "live"
            writer.close()
        dead_state = dp.health.endpoint("127.0.0.1", dead)
        assert dead_state.connect_failures >= 1
        # Passive ejection: three consecutive refusals take it out for a while.
        assert dead_state.ejections >= 1 and dead_state.ejected_until > time.monotonic()
    await live.stop()


async def test_active_health_checks_follow_the_endpoint() -> None:
    flaky = await one_backend("flaky")
    steady = await one_backend("steady")
    flaky_port = flaky.port
    port = listener_port()
    check = {"interval": "100ms", "timeout": "50ms", "unhealthyThreshold": 2, "healthyThreshold": 1}
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"s": [flaky_port, steady.port]}, healthCheck=check))
        state = dp.health.endpoint("127.0.0.1", flaky_port)
        await flaky.stop()
        await async_wait_for(lambda: not state.healthy, what="flaky to be marked unhealthy")
        for _ in range(6):
            reader, writer = await connect(port)
            assert await read_name(reader) == "steady"
            writer.close()
        assert state.connect_failures == 0  # traffic never tried the unhealthy endpoint
        await flaky.start(flaky_port)
        await async_wait_for(lambda: state.healthy, what="flaky to be healthy again")
        seen = set()
        for _ in range(6):
            reader, writer = await connect(port)
            seen.add(await read_name(reader))
            writer.close()
        assert seen == {"flaky", "steady"}
    await flaky.stop()
    await steady.stop()


@pytest.mark.parametrize("version", ["V1", "V2"])
async def test_proxy_protocol_parsed_by_haproxy(version: str, haproxy_proxy_parser: int) -> None:
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"hap": [haproxy_proxy_parser]}, proxyProtocol=version))
        reader, writer = await connect(port)
        local = writer.get_extra_info("sockname")
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        response = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
    # HAProxy reports the source it read from our PROXY header: the client's own address.
    assert response.endswith(f"{local[0]}:{local[1]} -> 127.0.0.1:{port}\n"), response


async def test_max_connections_closes_the_excess_at_once() -> None:
    backend = await one_backend()
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}, maxConnections=3))
        held = []
        for _ in range(3):
            reader, writer = await connect(port)
            assert await read_name(reader) == "a"
            held.append(writer)
        reader, writer = await connect(port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        assert serving.rejected["max_connections"] == 1
        for w in held:
            w.close()
    await backend.stop()


async def test_idle_connections_are_closed() -> None:
    backend = await one_backend()
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}, timeouts={"idle": "200ms"}))
        reader, writer = await connect(port)
        assert await read_name(reader) == "a"
        for _ in range(4):  # activity keeps it open past the idle time
            await asyncio.sleep(0.1)
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then it is closed
        writer.close()
    await backend.stop()


async def test_swap_keeps_established_connections_on_their_backend() -> None:
    a, b = await one_backend("a"), await one_backend("b")
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"s": [a.port]}, generation=1))
        reader, writer = await connect(port)
        assert await read_name(reader) == "a"
        serving = dp.listeners[port]
        await dp.apply(l4_table(port, {"s": [b.port]}, generation=2))
        assert dp.listeners[port] is serving  # same listener, new endpoints
        writer.write(b"still here\n")
        assert await reader.readline() == b"still here\n"
        r2, w2 = await connect(port)
        assert await read_name(r2) == "b"
        writer.close()
        w2.close()
    await a.stop()
    await b.stop()


async def test_identical_swap_touches_nothing() -> None:
    a = await one_backend("a")
    port = listener_port()
    async with running_dataplane() as dp:
        assert await dp.apply(l4_table(port, {"s": [a.port]}, generation=1))
        serving = dp.listeners[port]
        assert isinstance(serving, ServingL4)
        config = serving.config
        assert not await dp.apply(l4_table(port, {"s": [a.port]}, generation=2))
        assert dp.listeners[port] is serving and serving.config is config
    await a.stop()


async def test_removed_listener_drains_then_closes() -> None:
    a = await one_backend("a")
    port, other = listener_port(), listener_port()
    async with running_dataplane(drain_grace=0.5) as dp:
        await dp.apply(l4_table(port, {"s": [a.port]}, generation=1))
        reader, writer = await connect(port)
        assert await read_name(reader) == "a"
        await dp.apply(l4_table(other, {"s": [a.port]}, generation=2))
        assert port not in dp.listeners
        with pytest.raises(OSError):
            await connect(port)  # no longer accepting
        writer.write(b"during drain\n")  # the established connection still works
        assert await reader.readline() == b"during drain\n"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the grace period
        writer.close()
    await a.stop()


async def test_bind_failure_is_reported_and_others_serve() -> None:
    a = await one_backend("a")
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy_port = busy.sockets[0].getsockname()[1]
    good = listener_port()
    table = l4_table(busy_port, {"s": [a.port]})
    merged = table.model_copy(
        update={"listeners": {**table.listeners, **l4_table(good, {"s": [a.port]}).listeners}}
    )
    async with running_dataplane() as dp:
        await dp.apply(merged.stamped(1))
        assert "cannot listen on 127.0.0.1" in dp.listener_errors[busy_port]
        reader, writer = await connect(good)
        assert await read_name(reader) == "a"
        writer.close()
    busy.close()
    await a.stop()


async def test_metrics_and_connection_log(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane.metrics import DataplaneCollector

    backend = await one_backend()
    port = listener_port()
    async with running_dataplane() as dp:
        await dp.apply(l4_table(port, {"a": [backend.port]}))
        with caplog.at_level("INFO", logger="bilayer.l4"):
            reader, writer = await connect(port)
            assert await read_name(reader) == "a"
            writer.write(b"0123456789\n")
            await reader.readline()
            writer.close()
            await async_wait_for(lambda: not dp.listeners[port].active_connections, what="close")
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
    await backend.stop()
    labels = f'listener="default/l{port}",port="{port}"'
    assert f"bilayer_l4_connections_total{{{labels}}} 1.0" in text
    assert f"bilayer_l4_client_bytes_total{{{labels}}} 11.0" in text
    assert f"bilayer_l4_backend_bytes_total{{{labels}}} 13.0" in text  # "a\n" + the echo
    assert f'bilayer_endpoint_active{{endpoint="127.0.0.1:{backend.port}"}} 0.0' in text
    record = next(r for r in caplog.records if r.getMessage() == "connection closed")
    logged = record.fields  # type: ignore[attr-defined]
    assert logged["backend"] == f"127.0.0.1:{backend.port}"
    assert logged["bytes_from_client"] == 11 and logged["reason"] == "client-closed"
