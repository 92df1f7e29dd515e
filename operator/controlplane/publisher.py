"""Pushing the table to every ready dataplane pod, and knowing what each pod serves.

One worker per pod. A worker pushes the desired table when the pod's acknowledged
version differs, retries failures with capped exponential backoff and jitter, and every
`resync` seconds asks the pod what it serves (GET /v1/table) to repair drift: a pod that
restarted without its saved table, or that someone pushed to by hand. A pod that
refuses a table (400) keeps its old one; the error is kept for status and logs, and the
same version is not pushed to it again.

A pod that serves a recent table gets a delta (PATCH /v1/table: the parts that changed,
a few kilobytes where the whole table of 10,000 routes is 2 MB); any other pod, or one
that answers a delta with anything but 200, gets the whole table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dataplane import delta
from dataplane.logs import fields
from dataplane.table import Table

log = logging.getLogger("bilayer.publisher")

BACKOFF_BASE = 0.2
BACKOFF_MAX = 10.0
# Recent tables kept as bases for deltas. They share their unchanged parts, so each costs
# little more than its own maps (about 1 MB at 10,000 routes, and work for every full
# garbage collection). A delta is acknowledged in milliseconds, so pods are rarely more
# than a version or two behind; one whose version has left the history gets the whole
# table (2 MB, seconds to parse).
HISTORY = 8


@dataclass(frozen=True)
class Pod:
    """A ready dataplane pod: where its admin API is."""

    uid: str
    name: str
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


@dataclass
class PodState:
    pod: Pod
    acked_version: str | None = None  # what the pod said it serves
    acked_generation: int | None = None
    refused_version: str | None = None  # a version it answered 400 to
    error: str | None = None
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    pushes: int = 0


class Publisher:
    """Keeps every pod on the desired table; calls on_change when an acknowledgement moves."""

    def __init__(
        self,
        token: str | None,
        *,
        resync: float = 60.0,
        on_change: Callable[[], None] = lambda: None,
        on_conflict: Callable[[int], None] = lambda generation: None,
    ) -> None:
        self.token = token
        self.resync = resync
        self.on_change = on_change
        self.on_conflict = on_conflict
        self.table: Table | None = None
        self._body: bytes | None = None  # the whole desired table as JSON, made when needed
        self._history: OrderedDict[str, Table] = OrderedDict()
        self._deltas: dict[str, bytes] = {}  # from a base version to the desired table
        self._changes: delta.Changes | None = None  # where the desired table may differ
        self.pods: dict[str, PodState] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        for state in self.pods.values():
            if state.task is not None:
                state.task.cancel()
        await asyncio.gather(*(s.task for s in self.pods.values() if s.task), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- inputs ---

    def set_pods(self, pods: list[Pod]) -> None:
        """The ready dataplane pods now; a pod with a new UID starts from scratch."""
        wanted = {pod.uid: pod for pod in pods}
        for uid in list(self.pods):
            if uid not in wanted:
                state = self.pods.pop(uid)
                if state.task is not None:
                    state.task.cancel()
                self.on_change()
        for uid, pod in wanted.items():
            previous = self.pods.get(uid)
            if previous is not None and previous.pod == pod:
                continue
            if previous is not None and previous.task is not None:
                previous.task.cancel()
            state = self.pods[uid] = PodState(pod)
            state.task = asyncio.get_running_loop().create_task(self._work(state))
            self.on_change()

    def poke(self, uid: str) -> None:
        """Check this pod now (it may have restarted)."""
        state = self.pods.get(uid)
        if state is not None:
            state.acked_version = None
            state.wake.set()

    def publish(self, table: Table, changes: delta.Changes | None = None) -> None:
        """Make table the desired one; workers push it where it is not yet served. changes,
        from the compiler, says where it may differ from the table before it: a delta from
        that one then looks only there instead of at all 20,000 parts."""
        current = self.table
        if (
            current is not None
            and current.version == table.version
            and current.generation >= table.generation
        ):
            return
        self.table = table
        self._changes = changes
        self._body = None
        self._deltas = {}
        self._history[table.version] = table
        self._history.move_to_end(table.version)
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)
        for state in self.pods.values():
            state.wake.set()

    def _whole(self, table: Table) -> bytes:
        if self._body is None or table is not self.table:
            self._body = table.to_json().encode()
        return self._body

    def _delta_from(self, base: str | None, table: Table) -> bytes | None:
        """The delta from base to table as JSON, when base is a table we published."""
        if base is None or base == table.version or base not in self._history or table is not self.table:
            return None
        body = self._deltas.get(base)
        if body is None:
            body = self._deltas[base] = delta.diff(self._history[base], table, self._changes).to_json()
        return body

    async def _send(self, pod: Pod, method: str, body: bytes) -> tuple[int, dict[str, Any]]:
        async with self._client().request(
            method, pod.url + "/v1/table", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            answer = await response.json(content_type=None)
            if not isinstance(answer, dict):
                raise ValueError(f"{method} /v1/table answered {response.status} without a JSON object")
            return response.status, answer

    # --- what pods serve ---

    def acked(self) -> dict[str, str | None]:
        """Acknowledged table version by pod UID."""
        return {uid: s.acked_version for uid, s in self.pods.items()}

    async def discover_generation(self) -> int:
        """The highest generation any pod serves (asked once, at start)."""
        results = await asyncio.gather(*(self._ask(s) for s in self.pods.values()), return_exceptions=True)
        return max([r for r in results if isinstance(r, int)] or [0])

    # --- the worker ---

    async def _work(self, state: PodState) -> None:
        with_log = fields(pod=state.pod.name, address=state.pod.url)
        await self._ask(state)
        while True:
            table = self.table
            if table is not None and table.version not in (state.acked_version, state.refused_version):
                ok = await self._push(state, table)
                if not ok:
                    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(state.failures, 10))
                    await self._sleep(state, random.uniform(delay / 2, delay))
                    continue
            state.wake.clear()
            woke = await self._sleep(state, self.resync)
            if not woke:
                before = state.acked_version
                await self._ask(state)  # resync: repair drift
                if before != state.acked_version:
                    log.warning(
                        "dataplane drifted; repushing", extra={**with_log, "served": state.acked_version}
                    )

    async def _sleep(self, state: PodState, seconds: float) -> bool:
        """Sleep until woken (True) or until seconds pass (False)."""
        try:
            async with asyncio.timeout(seconds):
                await state.wake.wait()
        except TimeoutError:
            return False
        return True

    async def _ask(self, state: PodState) -> int | None:
        """GET /v1/table: what the pod serves now."""
        try:
            async with self._client().get(state.pod.url + "/v1/table") as response:
                if response.status != 200:
                    return None
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None
        changed = state.acked_version != answer.get("version")
        state.acked_version = answer.get("version")
        state.acked_generation = answer.get("generation")
        if changed:
            self.on_change()
        generation = answer.get("generation")
        return generation if isinstance(generation, int) else None

    async def _push(self, state: PodState, table: Table) -> bool:
        pod = state.pod
        started = time.monotonic()
        body = self._delta_from(state.acked_version, table)
        method = "PATCH" if body is not None else "PUT"
        try:
            status, answer = await self._send(pod, method, body or self._whole(table))
            if method == "PATCH" and status not in (200, 409):
                # 412: the pod moved on since it told us its version; 400: it found the
                # delta wrong. The whole table settles both.
                log.info(
                    "delta not applied; pushing the whole table",
                    extra=fields(pod=pod.name, status=status, error=answer.get("error")),
                )
                method, body = "PUT", self._whole(table)
                status, answer = await self._send(pod, method, body)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as err:
            state.failures += 1
            state.error = f"cannot reach {pod.url}: {err or type(err).__name__}"
            if state.failures in (1, 5) or state.failures % 20 == 0:
                log.warning(
                    "push failed", extra=fields(pod=pod.name, error=state.error, failures=state.failures)
                )
            return False
        state.pushes += 1
        if status == 200:
            state.failures = 0
            state.error = None
            state.acked_version = answer.get("version")
            state.acked_generation = answer.get("generation")
            log.info(
                "table pushed",
                extra=fields(
                    pod=pod.name,
                    version=table.version,
                    generation=table.generation,
                    method=method,
                    bytes=len(body or self._whole(table)),
                    seconds=round(time.monotonic() - started, 3),
                ),
            )
            self.on_change()
            return True
        if status == 409:
            # The pod serves a newer generation (an earlier operator, or a hand push).
            served = answer.get("generation")
            if isinstance(served, int):
                self.on_conflict(served)
            state.error = answer.get("error")
            return True  # the loop restamps and publishes again
        if status != 400:
            # Not a verdict on the table (401: wrong admin token; 5xx): keep trying, say why.
            state.failures += 1
            state.error = f"pod {pod.name} answered {status}: {answer.get('error', '')}"
            if state.failures in (1, 5) or state.failures % 20 == 0:
                log.error(
                    "push rejected", extra=fields(pod=pod.name, status=status, error=answer.get("error"))
                )
            self.on_change()
            return False
        state.refused_version = table.version
        state.error = f"pod {pod.name} refused the table: {answer.get('error', status)}"
        log.error("table refused", extra=fields(pod=pod.name, status=status, error=answer.get("error")))
        self.on_change()
        return True
