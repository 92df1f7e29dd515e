"""The compile loop's batching, on looptime's fake clock: exact, no sleeping."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from controlplane.compiler import Compiled, Snapshot
from controlplane.loop import CompileLoop

from .helpers import load_yaml

ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {name: r%d, namespace: default}
spec: {port: %d, backendRefs: [{name: s, port: 80}]}
"""


class Recorder:
    def __init__(self) -> None:
        self.objects: list[dict[str, object]] = []
        self.published: list[tuple[float, Compiled]] = []

    def snapshot(self) -> Snapshot:
        return Snapshot.of(self.objects)

    async def publish(self, compiled: Compiled) -> None:
        self.published.append((asyncio.get_running_loop().time(), compiled))


def make(recorder: Recorder) -> CompileLoop:
    return CompileLoop(recorder.snapshot, recorder.publish, holdoff=0.05, max_holdoff=0.5)


@pytest.mark.looptime
async def test_nothing_compiles_before_the_initial_listing() -> None:
    recorder = Recorder()
    loop = make(recorder)
    task = asyncio.create_task(loop.run())
    loop.mark_dirty()
    await asyncio.sleep(10)
    assert recorder.published == []
    loop.mark_synced()
    await asyncio.sleep(0.1)
    assert len(recorder.published) == 1
    task.cancel()


@pytest.mark.looptime
async def test_a_burst_becomes_one_compile_after_the_holdoff() -> None:
    recorder = Recorder()
    loop = make(recorder)
    task = asyncio.create_task(loop.run())
    loop.mark_synced()
    await asyncio.sleep(1)
    start = asyncio.get_running_loop().time()
    for i in range(1000):  # a thousand applies within 10 ms
        recorder.objects += load_yaml(ROUTE % (i, 10000 + i))
        loop.mark_dirty()
        if i % 100 == 0:
            await asyncio.sleep(0.001)
    await asyncio.sleep(1)
    compiles = recorder.published[1:]
    assert len(compiles) == 1
    assert compiles[0][0] - start == pytest.approx(0.06, abs=0.02)  # burst end + 50 ms hold-off
    assert len(compiles[0][1].table.listeners) == 1000
    task.cancel()


@pytest.mark.looptime
async def test_continuous_churn_still_publishes_at_the_cap() -> None:
    recorder = Recorder()
    loop = make(recorder)
    task = asyncio.create_task(loop.run())
    loop.mark_synced()
    await asyncio.sleep(1)
    start = asyncio.get_running_loop().time()
    for _ in range(300):  # an event every 10 ms for 3 s: the hold-off never ends on its own
        loop.mark_dirty()
        await asyncio.sleep(0.01)
    times = [t - start for t, _ in recorder.published[1:]]
    assert len(times) >= 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(0.5, abs=0.03) for gap in gaps)  # capped at max_holdoff
    task.cancel()


@pytest.mark.looptime
async def test_same_content_keeps_its_generation() -> None:
    recorder = Recorder()
    recorder.objects = load_yaml(ROUTE % (1, 10001))
    loop = make(recorder)
    first = await loop.compile_once()
    second = await loop.compile_once()
    assert first.table.generation == second.table.generation == 1
    recorder.objects = load_yaml(ROUTE % (1, 10002))
    third = await loop.compile_once()
    assert third.table.generation == 2 and third.table.version != first.table.version
