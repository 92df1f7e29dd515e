"""Long-lived operator tasks that must not die quietly.

Each task runs under a keeper: an exception is logged and the task started again after a
capped backoff (a dropped connection, a bug hit once); a task that returns, which none
should, marks the process unhealthy so that /healthz fails and the kubelet restarts it.
Before this, the compile loop, the leader loop and the pod watch could end for good on
one ServerDisconnectedError while liveness still said 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from dataplane.logs import fields

from .kube import backoff
from .observe import Metrics

log = logging.getLogger("bilayer.supervisor")

STABLE_AFTER = 60.0  # seconds: a task that ran this long starts its backoff again from the bottom


class Supervisor:
    """Runs named tasks, restarting those that fail; knows whether all are alive."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: Counter[str] = Counter()
        self.ended: list[str] = []  # tasks that returned: the process is unhealthy

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, once: bool = False) -> None:
        """Run run() for good (once: until it returns), restarting it after errors."""
        previous = self.tasks.get(name)
        if previous is not None and not previous.done():
            previous.cancel()
        self.tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, run, once), name=name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]], once: bool) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.restarts[name] += 1
                if self.metrics is not None:
                    self.metrics.task_restarts.labels(name).inc()
                attempt = 0 if loop.time() - started > STABLE_AFTER else attempt + 1
                delay = backoff(attempt, base=0.5, cap=30.0)
                log.error(
                    "task failed; restarting it",
                    exc_info=True,
                    extra=fields(task=name, error=repr(err), retry_in=round(delay, 2)),
                )
                await asyncio.sleep(delay)
                continue
            if once:
                if self.tasks.get(name) is asyncio.current_task():
                    del self.tasks[name]
                return
            self.ended.append(name)
            log.error("task ended; the operator is unhealthy", extra=fields(task=name))
            return

    @property
    def healthy(self) -> bool:
        return not self.ended and all(not t.done() for t in self.tasks.values())

    async def cancel(self, name: str) -> None:
        """Cancel one task (if it runs) and wait until it has ended."""
        task = self.tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
