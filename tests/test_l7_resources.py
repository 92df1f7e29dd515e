"""What the others suffer while one peer floods: a `bilayer run` process serves normal
requests while three connections flood it, with a header without end, trailers without end
and a WebSocket tunnel whose backend never reads. The process's memory (RSS, from /proc)
and the latency of the normal requests are measured throughout, and both stay bounded.

Before the L7 rebuild, a 64 MB header cost 5.4 s of CPU and stalled every other
connection for up to 6.4 s, a 64 MB trailer 8.9 s, and a tunnel whose backend did not read
took 256 MB into the proxy in 1.9 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .helpers import BilayerRun, free_port, service
from .l7kit import HTTPBackend, backend_ref, route
from .test_l7_limits import TunnelBackend

FLOOD_SECONDS = 3.0
MB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def flood(port: int, head: bytes, piece: bytes, until: float) -> int:
    """Write head, then piece after piece without reading, until the proxy stops taking
    them or time is up; returns the bytes written."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    sent = 0
    try:
        while time.monotonic() < until:
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), max(0.05, until - time.monotonic()))
            sent += len(piece)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return sent


@pytest.fixture
async def backends() -> AsyncIterator[tuple[HTTPBackend, TunnelBackend]]:
    web = await HTTPBackend("web").start()
    tunnel = await TunnelBackend(reads=False).start()
    yield web, tunnel
    await web.stop()
    await tunnel.stop()


async def test_floods_leave_memory_and_others_latency_bounded(
    tmp_path: Path, backends: tuple[HTTPBackend, TunnelBackend]
) -> None:
    web, tunnel = backends
    port = free_port()
    documents = [
        service("web", 80, [("127.0.0.1", web.port)]),
        service("ws", 80, [("127.0.0.1", tunnel.port)]),
        json.dumps(
            route(
                "r",
                port,
                [
                    {"matches": [{"path": {"value": "/ws"}}], "backendRefs": [backend_ref("ws")]},
                    {"backendRefs": [backend_ref("web")]},
                ],
            )
        ),
    ]
    (tmp_path / "objects.yaml").write_text("\n---\n".join(documents))
    run = BilayerRun(str(tmp_path), "--no-access-log", "--header-timeout", "30")
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(20):  # warm up: imports, pools, first allocations
                async with client.get(f"http://127.0.0.1:{port}/warm") as response:
                    await response.read()
            baseline = rss(run.process.pid)

            # The tunnel: upgrade, then write without reading to a backend that never reads.
            tunnel_reader, tunnel_writer = await asyncio.open_connection("127.0.0.1", port)
            tunnel_writer.write(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            assert (await asyncio.wait_for(tunnel_reader.readuntil(b"\r\n\r\n"), 5)).startswith(
                b"HTTP/1.1 101"
            )
            tunnel_writer.close()

            until = time.monotonic() + FLOOD_SECONDS
            floods = [
                flood(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: ", b"h" * 65536, until),
                flood(
                    port,
                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: ",
                    b"t" * 65536,
                    until,
                ),
                flood(
                    port,
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                    b"w" * 65536,
                    until,
                ),
            ]
            flooding = asyncio.gather(*floods)
            latencies, peak = [], baseline
            while time.monotonic() < until:
                started = time.monotonic()
                async with client.get(f"http://127.0.0.1:{port}/normal") as response:
                    assert response.status == 200
                    await response.read()
                latencies.append(time.monotonic() - started)
                peak = max(peak, rss(run.process.pid))
                await asyncio.sleep(0.02)
            header_sent, trailer_sent, tunnel_sent = await flooding
            peak = max(peak, rss(run.process.pid))
    finally:
        assert run.stop() == 0, run.output()
    latencies.sort()
    print(
        f"RSS baseline {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB; "
        f"{len(latencies)} normal requests, median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms; flooders wrote {header_sent / MB:.1f} / "
        f"{trailer_sent / MB:.1f} / {tunnel_sent / MB:.1f} MB"
    )
    assert peak - baseline < 40 * MB, (baseline, peak)
    assert latencies[-1] < 1.0, latencies[-5:]
    assert tunnel_sent < 64 * MB, tunnel_sent  # held back: the backend never reads
