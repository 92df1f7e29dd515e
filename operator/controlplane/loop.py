"""The compile loop: batch change events into compiles, then publish the result.

Modelled on Contour's event handler: an event marks the snapshot dirty; the loop waits a
hold-off (default 10 ms) for more events, extended by each new one but never past a
maximum (default 500 ms) after the first, so a burst of a thousand applies (events a few
milliseconds apart) becomes a few compiles, while changes that come one at a time are
compiled at once. Contour waits 100 ms because its rebuild costs the whole graph; a
compile here costs what changed (compiler.cache), so waiting longer buys nothing.
Nothing compiles before the providers report their initial listing complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from dataplane.eventloop import freeze_heap, gc_paused
from dataplane.logs import fields

from .compiler import CompileCache, Compiled, ObjectKey, Snapshot, compile_snapshot
from .compiler.snapshot import Object
from .observe import Metrics

log = logging.getLogger("bilayer.loop")

Publish = Callable[[Compiled], Awaitable[None]]


class CompileLoop:
    """Compiles the current snapshot after changes settle and hands the result to publish."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        publish: Publish,
        *,
        holdoff: float = 0.01,
        max_holdoff: float = 0.5,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self._snapshot = snapshot
        self._publish = publish
        self.holdoff = holdoff
        self.max_holdoff = max_holdoff
        self._dirty = asyncio.Event()
        self._synced = asyncio.Event()
        self.generation = 0
        self.version = ""
        self.compiles = 0
        self.last: Compiled | None = None
        self._cache = CompileCache()  # unchanged objects are not validated again
        # Each route's last version that validated, served while a newer one does not
        # (kept in memory: after a restart an invalid object has nothing to fall back to).
        self._last_valid: Mapping[ObjectKey, Object] = {}
        self._warmed = False  # warm() compiled everything already

    def mark_dirty(self) -> None:
        """Something that may change the table happened."""
        self._dirty.set()

    def mark_synced(self) -> None:
        """The initial listing is complete; compiling may start."""
        self._synced.set()
        self._dirty.set()

    def advance_generation(self, at_least: int) -> None:
        """Make the next new table's generation greater than at_least."""
        self.generation = max(self.generation, at_least)

    async def run(self) -> None:
        await self._synced.wait()
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            first = loop.time()
            while True:
                self._dirty.clear()
                remaining = min(self.holdoff, first + self.max_holdoff - loop.time())
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=remaining)
                except TimeoutError:
                    break
            self._dirty.clear()
            await self.compile_once()

    def warm(self) -> None:
        """Compile everything once, publishing nothing, so that the first table (and every
        one after) costs only what changed since. Run before kopf starts watching, it does
        not compete with kopf's replay of every object; a standby replica stays warm."""
        snapshot = self._snapshot()
        started = time.perf_counter()
        self._compile(snapshot)
        took = time.perf_counter() - started
        freeze_heap()  # the store and the memo live on
        self._warmed = True
        log.info(
            "compiled everything ahead of the first table",
            extra=fields(objects=len(snapshot.objects), seconds=round(took, 4)),
        )

    def _compile(self, snapshot: Snapshot) -> Compiled:
        with gc_paused():
            compiled = compile_snapshot(
                Snapshot(snapshot.objects, self._last_valid), self.generation + 1, self._cache
            )
        self._last_valid = compiled.last_valid
        return compiled

    async def compile_once(self) -> Compiled:
        """Compile now and publish; a table with unchanged content keeps its generation."""
        snapshot = self._snapshot()
        started = time.perf_counter()
        # On the event loop, not in a thread: later compiles cost what changed (about 10 ms
        # at 10,000 routes), and in a thread the GIL hand-offs against the busy loop made
        # them 60 ms; the first compiles everything (about a second) before any push.
        compiled = self._compile(snapshot)
        took = time.perf_counter() - started
        self.compiles += 1
        if self.metrics is not None:
            self.metrics.compiles.inc()
            self.metrics.compile_seconds.observe(took)
        if self.compiles == 1 and not self._warmed:
            freeze_heap()  # the store, the memo and the first table live on
        if compiled.table.version == self.version:
            compiled = dataclasses.replace(
                compiled, table=compiled.table.stamped(self.generation), changes=None
            )
        else:
            self.generation += 1
            self.version = compiled.table.version
            log.info(
                "compiled a new table",
                extra=fields(
                    generation=self.generation,
                    version=self.version,
                    objects=len(snapshot.objects),
                    listeners=len(compiled.table.listeners),
                    seconds=round(took, 4),
                ),
            )
        self.last = compiled
        await self._publish(compiled)
        return compiled
