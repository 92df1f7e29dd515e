"""Pushing the table to every running dataplane pod, and knowing what each pod serves.

Pods get the table as soon as they run and have an IP, Ready or not: a dataplane's
readiness means "serving a table", so waiting for Ready before the first push
deadlocked every fresh pod (first install, scale-out, rollouts).

Only the leader pushes: `activate(term)` starts one worker per pod, `deactivate()` stops
them all at once (leadership lost). Every push carries the term, and a pod refuses one
older than a term it has seen (403): then that worker stops. A pod that reports another
term than ours is told ours at once, by an empty delta when it already serves our table:
a new leader usually compiles the very table its predecessor pushed, and until a pod
has seen the new term it still takes the deposed leader's pushes.

A worker pushes the desired table when the pod's acknowledged version differs, retries
failures with capped exponential backoff and jitter, and every `resync` seconds asks the
pod what it serves (GET /v1/table) to repair drift, and pushes again a table the pod
refused (its cause may be fixed on the pod's side). A pod that serves a recent table
gets a delta (PATCH /v1/table: the parts that changed, a few kilobytes where the whole
table of 10,000 routes is 2 MB); any other pod, or one that answers a delta with
anything but 200, gets the whole table. What a pod reports about listeners it could
not open (a port in use) is kept for status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dataplane import delta
from dataplane.logs import fields
from dataplane.table import Table

from .kube import backoff
from .observe import Metrics

log = logging.getLogger("bilayer.publisher")

BACKOFF_BASE = 0.2
BACKOFF_MAX = 10.0
PUSH_TIMEOUT = 30.0  # a whole table of 10,000 routes takes a pod about 2 s to parse
ANSWER_BYTES = 1024 * 1024  # a push answer is brief; a pod may not make us hold more
# Recent tables kept as bases for deltas. They share their unchanged parts, so each costs
# little more than its own maps (about 1 MB at 10,000 routes, and work for every full
# garbage collection). A delta is acknowledged in milliseconds, so pods are rarely more
# than a version or two behind; one whose version has left the history gets the whole
# table (2 MB, seconds to parse).
HISTORY = 8
TERM_HEADER = "Bilayer-Term"  # dataplane.admin.TERM_HEADER


@dataclass(frozen=True)
class Pod:
    """A running dataplane pod: where its admin API is."""

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
    term: str | None = None  # the leader term the pod reported, or ours once it took a push
    refused_version: str | None = None  # a version it answered 400 to
    failed_ports: dict[int, str] = field(default_factory=dict)  # listeners it could not open
    error: str | None = None
    failures: int = 0
    fenced: bool = False  # it answered 403: a newer leader programs it
    answered: bool = False  # it has answered a request at least once
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    pushes: int = 0


class Publisher:
    """Keeps every pod on the desired table; calls on_change when what a pod serves moves."""

    def __init__(
        self,
        token: str | None,
        *,
        resync: float = 60.0,
        on_change: Callable[[], None] = lambda: None,
        on_conflict: Callable[[int], None] = lambda generation: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.token = token
        self.resync = resync
        self.on_change = on_change
        self.on_conflict = on_conflict
        self.metrics = metrics or Metrics()
        self.table: Table | None = None
        self.term: str | None = None  # set while leading
        self.active = False
        self._body: tuple[Table, bytes] | None = None  # a whole table as JSON, and which
        self._history: OrderedDict[str, Table] = OrderedDict()
        self._deltas: dict[str, bytes] = {}  # from a base version to the desired table
        self._changes: delta.Changes | None = None  # where the desired table may differ
        self.pods: dict[str, PodState] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT, sock_connect=5)
            )
        return self._session

    async def close(self) -> None:
        await self.deactivate()
        if self._session is not None:
            await self._session.close()

    # --- leadership ---

    def activate(self, term: str | None) -> None:
        """Push from now on, stamping pushes with term."""
        self.term, self.active = term, True
        for state in self.pods.values():
            state.fenced = False
            self._start(state)

    async def deactivate(self) -> None:
        """Stop every push now (leadership lost); what pods serve is kept."""
        self.active = False
        tasks = [s.task for s in self.pods.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in self.pods.values():
            state.task = None

    def _start(self, state: PodState) -> None:
        if self.active and not state.fenced and (state.task is None or state.task.done()):
            state.task = asyncio.get_running_loop().create_task(self._keep(state))

    # --- inputs ---

    def set_pods(self, pods: list[Pod]) -> None:
        """The running dataplane pods now; a pod with a new UID starts from scratch."""
        wanted = {pod.uid: pod for pod in pods}
        for uid in list(self.pods):
            if uid not in wanted:
                state = self.pods.pop(uid)
                if state.task is not None:
                    state.task.cancel()
                # Pods come and go with every rollout: their series go with them, or the
                # metrics would grow for as long as the operator runs.
                with contextlib.suppress(KeyError):
                    self.metrics.push_seconds.remove(state.pod.name)
                self.on_change()
        for uid, pod in wanted.items():
            previous = self.pods.get(uid)
            if previous is not None and previous.pod == pod:
                continue
            if previous is not None and previous.task is not None:
                previous.task.cancel()
            state = self.pods[uid] = PodState(pod)
            self._start(state)
            self.on_change()

    def poke(self, uid: str) -> None:
        """Check this pod now (it may have restarted)."""
        state = self.pods.get(uid)
        if state is not None:
            state.acked_version = None
            state.refused_version = None
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
        self._deltas = {}
        self._history[table.version] = table
        self._history.move_to_end(table.version)
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)
        self.metrics.table_generation.set(table.generation)
        self.metrics.table_version.clear()
        self.metrics.table_version.labels(table.version).set(1)
        self.metrics.table_listeners.set(len(table.listeners))
        for state in self.pods.values():
            state.wake.set()

    def _whole(self, table: Table) -> bytes:
        """The whole table as JSON, made once per table: the cache is keyed by the table
        itself (a cache of "the current body" once handed a restarted pod an older
        table's JSON labelled with the newer generation)."""
        if self._body is None or self._body[0] is not table:
            self._body = (table, table.to_json().encode())
            self.metrics.table_bytes.set(len(self._body[1]))
        return self._body[1]

    def _delta_from(self, base: str | None, table: Table) -> bytes | None:
        """The delta from base to table as JSON, when base is a table we published."""
        if base is None or base == table.version or base not in self._history or table is not self.table:
            return None
        body = self._deltas.get(base)
        if body is None:
            body = self._deltas[base] = delta.diff(self._history[base], table, self._changes).to_json()
        return body

    async def _send(self, pod: Pod, method: str, body: bytes) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if self.term is not None:
            headers[TERM_HEADER] = self.term
        async with self._client().request(
            method, pod.url + "/v1/table", data=body, headers=headers
        ) as response:
            answer = json.loads(await _bounded(response, ANSWER_BYTES) or b"null")
            if not isinstance(answer, dict):
                raise ValueError(f"{method} /v1/table answered {response.status} without a JSON object")
            return response.status, answer

    # --- what pods serve ---

    def acked(self) -> dict[str, str | None]:
        """Acknowledged table version by pod UID."""
        return {uid: s.acked_version for uid, s in self.pods.items()}

    async def discover_generation(self, within: float = 3.0) -> int:
        """The highest generation any pod serves (asked when leadership is taken). Pods
        that do not answer within `within` seconds are not waited for (a pod that hangs
        held a new leader back for the push timeout); one that serves a higher
        generation answers the first push with 409, and the loop moves above it."""

        async def ask(state: PodState) -> int | None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    return await self._ask(state)
            return None

        results = await asyncio.gather(*(ask(s) for s in self.pods.values()), return_exceptions=True)
        return max([r for r in results if isinstance(r, int)] or [0])

    # --- the worker ---

    async def _keep(self, state: PodState) -> None:
        """The worker, restarted after a bug rather than leaving the pod unprogrammed."""
        while True:
            try:
                await self._work(state)
                return  # fenced: a newer leader programs this pod
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pod worker failed; restarting it", extra=fields(pod=state.pod.name))
                await asyncio.sleep(BACKOFF_MAX)

    async def _work(self, state: PodState) -> None:
        await self._ask(state)
        while True:
            # Clear the wake-up first: a table published while we push must wake us again
            # (cleared after the push, it waited for the next resync, 60 s).
            state.wake.clear()
            table = self.table
            if table is not None and (
                table.version not in (state.acked_version, state.refused_version) or self._unaware(state)
            ):
                ok = await self._push(state, table)
                if state.fenced:
                    return
                if not ok:
                    delay = backoff(min(state.failures, 10), BACKOFF_BASE, BACKOFF_MAX)
                    await self._sleep(state, delay)
                    continue
                if self.table is not table:
                    continue  # a newer one came meanwhile
            if not await self._sleep(state, self.resync):
                before = state.acked_version
                await self._ask(state)  # resync: repair drift
                if before != state.acked_version and self.table is not None:
                    log.warning(
                        "dataplane drifted; pushing again",
                        extra=fields(
                            pod=state.pod.name, served=state.acked_version, desired=self.table.version
                        ),
                    )
                # A refused table is tried again: the pod's side of the cause may be fixed.
                state.refused_version = None

    def _unaware(self, state: PodState) -> bool:
        """The pod serves a table but has not seen our term (we just took over)."""
        return self.term is not None and state.acked_version is not None and state.term != self.term

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
                answer = json.loads(await _bounded(response, 16 * ANSWER_BYTES))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not isinstance(answer, dict):
            return None
        state.answered = True
        term = answer.get("term")
        state.term = term if isinstance(term, str) else None
        failed = {
            int(port): str(info.get("error"))
            for port, info in (answer.get("listeners") or {}).items()
            if isinstance(info, dict) and info.get("state") == "error" and str(port).isdigit()
        }
        self._record(state, answer.get("version"), answer.get("generation"), failed)
        generation = answer.get("generation")
        return generation if isinstance(generation, int) else None

    def _record(self, state: PodState, version: Any, generation: Any, failed: dict[int, str]) -> None:
        changed = state.acked_version != version or state.failed_ports != failed
        state.acked_version = version if isinstance(version, str) else None
        state.acked_generation = generation if isinstance(generation, int) else None
        state.failed_ports = failed
        if changed:
            self.on_change()

    async def _push(self, state: PodState, table: Table) -> bool:
        pod = state.pod
        started = time.monotonic()
        served = state.acked_version
        term_only = served is not None and table.version in (served, state.refused_version)
        if term_only:
            # Only our term is news to the pod: a delta of nothing, from what it serves to
            # what it serves. The pod records the term before it looks at the delta.
            assert served is not None
            body: bytes | None = delta.Delta(served, served, state.acked_generation or 0, ()).to_json()
        else:
            body = self._delta_from(served, table)
        method = "PATCH" if body is not None else "PUT"
        try:
            status, answer = await self._send(pod, method, body or self._whole(table))
            if method == "PATCH" and status not in (200, 403, 409):
                # 412: the pod moved on since it told us its version; 400: it found the
                # delta wrong. The whole table settles both.
                log.info(
                    "delta not applied; pushing the whole table",
                    extra=fields(pod=pod.name, status=status, error=answer.get("error")),
                )
                method, body = "PUT", self._whole(table)
                status, answer = await self._send(pod, method, body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            state.failures += 1
            state.error = f"cannot reach {pod.url}: {err or type(err).__name__}"
            self.metrics.pushes.labels("unreachable").inc()
            if state.failures in (1, 5) or state.failures % 20 == 0:
                log.warning(
                    "push failed", extra=fields(pod=pod.name, error=state.error, failures=state.failures)
                )
            return False
        state.pushes += 1
        state.answered = True
        seconds = time.monotonic() - started
        self.metrics.push_seconds.labels(pod.name).observe(seconds)
        if status == 200:
            self.metrics.pushes.labels(
                "term" if term_only else "delta" if method == "PATCH" else "whole"
            ).inc()
            state.failures = 0
            state.error = None
            # It took a push of our term, so it knows it (whatever its answer says: an
            # older dataplane does not report its term, and we would tell it again and again).
            state.term = self.term
            failed = {
                int(p): str(e) for p, e in (answer.get("failedListeners") or {}).items() if str(p).isdigit()
            }
            log.info(
                "term pushed" if term_only else "table pushed",
                extra=fields(
                    pod=pod.name,
                    term=self.term,
                    version=table.version,
                    generation=table.generation,
                    method=method,
                    bytes=len(body or self._whole(table)),
                    seconds=round(seconds, 3),
                    **({"failed_listeners": failed} if failed else {}),
                ),
            )
            self._record(state, answer.get("version"), answer.get("generation"), failed)
            return True
        if status == 403:
            # A newer leader has programmed this pod: we are deposed and do not know it
            # yet (the Lease says so at the next renewal). Stop pushing to it.
            self.metrics.pushes.labels("fenced").inc()
            state.fenced = True
            state.error = answer.get("error")
            log.error(
                "push refused: a newer leader term programs this pod",
                extra=fields(pod=pod.name, error=state.error),
            )
            return True
        if status == 409:
            # The pod serves a newer generation (an earlier operator, or a hand push).
            self.metrics.pushes.labels("conflict").inc()
            served = answer.get("generation")
            if isinstance(served, int):
                self.on_conflict(served)
            state.error = answer.get("error")
            return True  # the loop restamps and publishes again
        if status != 400:
            # Not a verdict on the table (401: wrong admin token; 5xx): keep trying, say why.
            self.metrics.pushes.labels("error").inc()
            state.failures += 1
            state.error = f"pod {pod.name} answered {status}: {answer.get('error', '')}"
            if state.failures in (1, 5) or state.failures % 20 == 0:
                log.error(
                    "push rejected", extra=fields(pod=pod.name, status=status, error=answer.get("error"))
                )
            self.on_change()
            return False
        self.metrics.pushes.labels("refused").inc()
        state.refused_version = table.version
        state.error = f"pod {pod.name} refused the table: {answer.get('error', status)}"
        log.error("table refused", extra=fields(pod=pod.name, status=status, error=answer.get("error")))
        self.on_change()
        return True


async def _bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ValueError past limit bytes: a pod cannot make us hold more."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"answer larger than {limit} bytes")
    return bytes(body)
