"""Worker processes: a dataplane on every CPU the pod may use, programmed as one.

The supervisor (WorkerPool: a Dataplane with no listener of its own) owns the admin API,
the table on disk and the active health checks. A push is validated once, in the
supervisor, then sent to every worker over its socketpair (a delta as a delta, a whole
table as its JSON); the push is answered, and the pod claims the new version, only when
every running worker has applied it. A worker that exits, refuses or does not answer in
time fails the push with NotServed (the pod keeps claiming the version it served before;
the pusher pushes again), and a worker that exits is started again from the claimed table.
A worker is dataplane.worker; what they say to each other, dataplane.channel.

Workers get connections in one of two ways (--worker-sockets):

- ``reuseport`` (default): each worker binds every port itself with SO_REUSEPORT; the kernel
  hashes each new connection to one of the workers' sockets, so connections spread evenly.
  Connections still in a socket's accept queue when its worker dies are reset (with
  ``net.ipv4.tcp_migrate_req=1`` the kernel moves them to another worker's socket instead);
- ``shared``: the supervisor binds each port once and hands the socket to every worker
  (SCM_RIGHTS on the socketpair); nothing queued is lost when a worker dies, but whichever
  worker wakes first takes the waiting connections, so the spread follows scheduling.

bench/workers.py measures both (the README's "Workers" section has the figures): with
keep-alive clients, reuseport spread 64 connections 30/34, shared 61/3.

Per pod, not per worker: active checks run in the supervisor and their verdicts go to
every worker; a worker that ejects an endpoint on failures tells the supervisor, which
tells the others; /metrics sums the workers' counters; route rate limits take from
buckets every worker maps (dataplane.shared). Split evenly: connection caps. Per worker:
an L4 listener's client limits (README "Workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from . import delta
from .channel import (
    DELTA,
    EJECTED,
    MARK,
    MAX_FDS_PER_MESSAGE,
    METRICS,
    REFUSED,
    ROLLBACK,
    SETTINGS,
    SOCKETS,
    STOP,
    TABLE,
    Channel,
    encode,
    mark,
)
from .eventloop import gc_paused
from .health import EndpointState
from .logs import fields
from .runtime import Dataplane, GenerationConflict, NotServed, Settings
from .shared import SharedBuckets
from .table import Table, TableError

log = logging.getLogger("bilayer.workers")

START_SECONDS = 60.0  # for a new worker to say hello
BACKLOG = 4096  # of a shared listening socket, as the listeners ask for their own
SOCKET_MODES = ("reuseport", "shared")
# Gauges that say whether something works: the pod's value is the worst worker's.
WORST_OF = frozenset({"bilayer_listener_up", "bilayer_endpoint_healthy"})


def usable_cpus() -> int:
    """The CPUs this process may use: its cgroup's cpu.max quota rounded up, or, without
    a quota, the CPUs its affinity mask allows."""
    allowed = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(Path("/proc/self/cgroup"), Path("/sys/fs/cgroup"))
    return max(1, min(allowed, math.ceil(quota))) if quota else allowed


def _cgroup_quota(membership: Path, root: Path) -> float | None:
    """CPUs' worth of time the cgroup v2 hierarchy of this process allows per period (the
    smallest quota on the way up), or None when no level sets one."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    smallest: float | None = None
    where = root / path.lstrip("/")
    while True:
        with contextlib.suppress(OSError, ValueError):
            quota, _, period = (where / "cpu.max").read_text().strip().partition(" ")
            if quota != "max":
                cpus = int(quota) / int(period or "100000")
                smallest = cpus if smallest is None else min(smallest, cpus)
        if where == root or root not in where.parents:
            return smallest
        where = where.parent


def parse_workers(text: str) -> int:
    """--workers: a count, or auto (usable_cpus)."""
    if text == "auto":
        return usable_cpus()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers is a number of processes (1 or more) or auto, not {text!r}")
    return int(text)


# The supervisor.


class WorkerGone(Exception):
    """The worker exited (or its channel closed) before it answered."""


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, channel: Channel | None) -> None:
        self.index = index
        self.process = process
        self.channel: Channel | None = channel
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.synced = False  # serves the claimed table and takes pushes
        self.version: str | None = None
        self.ports_sent: set[int] = set()  # shared sockets it holds
        self.started = time.monotonic()

    def fail_pending(self, why: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(why))
        self.pending.clear()


class WorkerPool(Dataplane):
    """The supervisor: the pod's table, admin state and health checks; its workers serve."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        sockets: str = "reuseport",
        apply_timeout: float = 60.0,
        log_level: str = "info",
    ) -> None:
        if sockets not in SOCKET_MODES:
            raise ValueError(f"--worker-sockets is one of {', '.join(SOCKET_MODES)}, not {sockets!r}")
        # The workers trace; the supervisor forwards nothing.
        super().__init__(dataclasses.replace(settings, otlp_endpoint=None), factories={})
        self.worker_settings = settings
        self.count = count
        self.socket_mode = sockets
        self.apply_timeout = apply_timeout
        self.log_level = log_level
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.shared_sockets: dict[int, socket.socket] = {}
        self._runs: list[asyncio.Task[None]] = []
        self._closing = False
        self._seq = 0
        self._change: delta.Delta | None = None  # the delta being applied, sent as it is
        self._document: bytes | None = None  # the table being applied, as it was pushed
        self._families: list[Metric] = []
        self._background: set[asyncio.Task[None]] = set()
        self.health.on_health = self._tell_health
        # Rate-limit buckets every worker maps (dataplane.shared): a limit is per pod.
        self.buckets, self.buckets_fd = SharedBuckets.create()

    # Starting and restarting.

    async def start(self, within: float = 60.0) -> None:
        """Start every worker; returns once all of them are up (and serve the table, if any)."""
        self._runs = [asyncio.create_task(self._keep_running(i)) for i in range(self.count)]
        async with asyncio.timeout(within):
            while sum(w.synced for w in self.workers.values()) < self.count:
                if any(task.done() for task in self._runs):
                    break
                await asyncio.sleep(0.02)
        for task in self._runs:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _keep_running(self, index: int) -> None:
        delay = 0.1
        while not self._closing:
            worker = await self._spawn(index)
            self.workers[index] = worker
            try:
                await self._sync(worker)
            except (WorkerGone, TimeoutError, OSError, TableError) as err:
                why = str(err) or "no answer in time"
                log.error("worker did not start", extra=fields(worker=index, error=why))
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            code = await worker.process.wait()
            worker.synced = False
            worker.fail_pending(f"worker {index} exited ({_exit_text(code)})")
            if worker.channel is not None:
                worker.channel.close()
            if self._closing:
                return
            self.restarts += 1
            if time.monotonic() - worker.started > 10:
                delay = 0.1  # it ran for a while: this is not a crash loop
            log.error(
                "worker exited; starting it again",
                extra=fields(worker=index, exit=_exit_text(code), restart_in=delay),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _spawn(self, index: int) -> Worker:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dataplane.worker",
                str(theirs.fileno()),
                str(index),
                self.log_level,
                str(self.buckets_fd),
                str(self.count),
                pass_fds=[theirs.fileno(), self.buckets_fd],
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker = Worker(index, process, None)
        worker.channel = Channel(
            ours,
            lambda kind, payload: self._on_message(worker, kind, payload),
            lambda: worker.fail_pending(f"worker {index} exited"),
        )
        return worker

    async def _sync(self, worker: Worker) -> None:
        """Hand a new worker its settings, then the claimed table and what the pod knows
        of endpoint health; it takes pushes from then on."""
        settings = {
            f.name: getattr(self.worker_settings, f.name)
            for f in dataclasses.fields(Settings)
            if f.name not in ("listening_sockets", "state_dir")
        }
        settings["reuse_port"] = self.socket_mode == "reuseport"
        # An L7 listener's connection cap is the pod's, split (dataplane.shared.share).
        settings["max_client_connections"] = -(-self.worker_settings.max_client_connections // self.count)
        # Starting Python and importing the dataplane takes seconds on a busy node.
        await self._ask(worker, SETTINGS, encode(settings), within=max(START_SECONDS, self.apply_timeout))
        async with self._lock:  # no push in between: the worker gets the claimed table
            if self.table is not None:
                await self._send_sockets(worker, self.table)
                answer = await self._ask(worker, TABLE, self.table.to_json().encode())
                worker.version = answer.get("version")
            for state in self.health.endpoints.values():
                if not state.healthy or state.ejected_until > time.monotonic():
                    await self._tell(worker, MARK, mark(state, healthy=state.healthy))
            worker.synced = True
        log.info(
            "worker serving",
            extra=fields(worker=worker.index, pid=worker.process.pid, version=worker.version),
        )

    # Messages.

    def _on_message(self, worker: Worker, kind: int, payload: bytes) -> None:
        message = json.loads(payload) if payload else {}
        if kind == EJECTED:  # one worker's traffic ejected an endpoint: so do the others
            self._tell_all(payload, but=worker)
            return
        future = worker.pending.pop(message.get("seq", -1), None)
        if future is None or future.done():
            return
        if kind == REFUSED:
            future.set_exception(_Refused(message.get("error", ""), bool(message.get("mismatch"))))
        else:
            future.set_result(message)

    async def _ask(
        self, worker: Worker, kind: int, payload: bytes, *, within: float | None = None
    ) -> dict[str, Any]:
        """Send a request and wait for its answer (HELLO, APPLIED, SAMPLES: each carries
        the request's sequence number); WorkerGone, TimeoutError, _Refused."""
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.pending[seq] = future
        header = struct.pack("!Q", seq)
        channel = worker.channel
        if channel is None or channel.closed:
            raise WorkerGone(f"worker {worker.index} is not running")
        try:
            await channel.send(kind, header + payload)
        except OSError as err:
            worker.pending.pop(seq, None)
            raise WorkerGone(f"worker {worker.index}: {err}") from None
        try:
            async with asyncio.timeout(self.apply_timeout if within is None else within):
                return await future
        finally:
            worker.pending.pop(seq, None)

    async def _tell(self, worker: Worker, kind: int, payload: bytes) -> None:
        """A message without an answer; lost with a worker that is gone (it is synced anew)."""
        if worker.channel is not None:
            with contextlib.suppress(OSError):
                await worker.channel.send(kind, struct.pack("!Q", 0) + payload)

    def _tell_health(self, state: EndpointState) -> None:
        self._tell_all(mark(state, healthy=state.healthy))

    def _tell_all(self, mark: bytes, but: Worker | None = None) -> None:
        for worker in self.workers.values():
            if worker is not but and worker.synced:
                task = asyncio.create_task(self._tell(worker, MARK, mark))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    # Pushes.

    async def apply(
        self,
        table: Table,
        *,
        persist: bool = True,
        term: str | None = None,
        fenced: bool = False,
        older: bool = False,
        document: bytes | None = None,
    ) -> bool:
        # The pushed bytes go to the workers as they came: serializing 10,000 routes again
        # costs more than parsing them. A table without a version is stamped by each worker
        # as here (the version is a hash of the content).
        self._document = document
        try:
            return await super().apply(table, persist=persist, term=term, fenced=fenced, older=older)
        finally:
            self._document = None

    async def apply_delta(
        self, change: delta.Delta, *, term: str | None = None, fenced: bool = False
    ) -> bool:
        self._change = change  # _swap sends it to the workers as it is
        try:
            return await super().apply_delta(change, term=term, fenced=fenced)
        finally:
            self._change = None

    async def _swap(self, table: Table, *, older: bool = False) -> bool:
        """Serve table in every worker (the lock is held); False when it is served already."""
        current = self.table
        if current is not None and current.version == table.version:
            return False
        if current is not None and table.generation <= current.generation and not older:
            self.tables_refused += 1
            raise GenerationConflict(table.generation, current.generation)
        self._prepare_tls(table, None)  # a certificate that does not load is refused here, once
        change = self._change if self._change is not None and current is not None else None
        workers = [w for w in self.workers.values() if w.synced]
        if not workers:
            raise NotServed("no worker is serving yet (starting, or started again after exiting); push again")
        # The table's JSON: as pushed, or made once and only if a worker needs it.
        document: list[bytes] = [self._document] if self._document is not None else []

        def whole() -> bytes:
            if not document:
                with gc_paused():  # 4 MB of strings at 10,000 routes: nothing to collect
                    document.append(table.to_json().encode())
            return document[0]

        started = time.perf_counter()
        results = await asyncio.gather(
            *(self._apply_on(w, table, change, whole) for w in workers), return_exceptions=True
        )
        refusal = next((r for r in results if isinstance(r, TableError)), None)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            took = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)]
            await self._put_back(took, current)
        if refusal is not None:
            self.tables_refused += 1
            raise refusal
        if failures:
            raise NotServed("; ".join(str(f) for f in failures))
        self.listener_errors = {}
        for result in results:
            assert isinstance(result, dict)
            for port, error in result.get("errors", {}).items():
                self.listener_errors.setdefault(int(port), error)
        log.info(
            "table applied by every worker",
            extra=fields(
                version=table.version,
                workers=len(workers),
                sent="delta" if change is not None else "table",
                seconds=round(time.perf_counter() - started, 3),
            ),
        )
        self._close_shared(table)
        self.health.retain(table)  # the pod's active checks, run here once
        self.table = table
        self.tables_applied += 1
        return True

    async def _put_back(self, workers: list[Worker], claimed: Table | None) -> None:
        """The workers that applied a table the pod does not claim (another worker failed
        it) go back to the claimed one, or, when that cannot be, are started again."""
        if not workers:
            return
        document = claimed.to_json().encode() if claimed is not None else b""
        for worker in workers:
            try:
                if claimed is None:
                    raise WorkerGone("no table was served before")
                answer = await self._ask(worker, ROLLBACK, document)
                worker.version = answer.get("version")
            except (WorkerGone, TimeoutError, _Refused) as err:
                log.error(
                    "worker restarted to leave a table not every worker took",
                    extra=fields(worker=worker.index, error=str(err)),
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    async def _apply_on(
        self, worker: Worker, table: Table, change: delta.Delta | None, whole: Callable[[], bytes]
    ) -> dict[str, Any]:
        name = f"worker {worker.index}"
        try:
            await self._send_sockets(worker, table)
            if change is not None and worker.version == change.base:
                try:
                    answer = await self._ask(worker, DELTA, change.to_json())
                except _Refused as err:
                    if not err.mismatch:
                        raise
                    answer = await self._ask(worker, TABLE, whole())
            else:
                answer = await self._ask(worker, TABLE, whole())
        except _Refused as err:
            raise TableError(f"{name} refused the table: {err}") from None
        except TimeoutError:
            # A worker that cannot keep up is started again, from the table the pod claims.
            log.error(
                "worker did not apply the table in time; restarting it", extra=fields(worker=worker.index)
            )
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            raise NotServed(f"{name} did not apply the table within {self.apply_timeout:g} s") from None
        except WorkerGone as err:
            raise NotServed(str(err)) from None
        worker.version = answer.get("version")
        return answer

    # Shared listening sockets (--worker-sockets shared).

    async def _send_sockets(self, worker: Worker, table: Table) -> None:
        if self.socket_mode != "shared" or worker.channel is None:
            return
        for port, listener in sorted(table.listeners.items()):
            if listener.tcp_kind is None or port in self.shared_sockets:
                continue
            with contextlib.suppress(OSError):  # the worker's own bind then says why
                self.shared_sockets[port] = _listening_socket(self.settings.address, port)
        ports = [
            p for p in sorted(self.shared_sockets) if p not in worker.ports_sent and p in table.listeners
        ]
        for start in range(0, len(ports), MAX_FDS_PER_MESSAGE):
            batch = ports[start : start + MAX_FDS_PER_MESSAGE]
            fds = [self.shared_sockets[p].fileno() for p in batch]
            try:
                await worker.channel.send(SOCKETS, struct.pack("!Q", 0) + encode(batch), fds)
            except OSError as err:
                raise WorkerGone(f"worker {worker.index}: {err}") from None
            worker.ports_sent.update(batch)

    def _close_shared(self, table: Table) -> None:
        for port in [
            p for p in self.shared_sockets if p not in table.listeners or table.listeners[p].tcp_kind is None
        ]:
            self.shared_sockets.pop(port).close()
            for worker in self.workers.values():
                worker.ports_sent.discard(port)

    # Metrics: the sum over the workers.

    async def gather_metrics(self) -> None:
        workers = [w for w in self.workers.values() if w.synced]
        answers = await asyncio.gather(
            *(self._ask(w, METRICS, b"", within=5.0) for w in workers), return_exceptions=True
        )
        self._families = merge_families([a["families"] for a in answers if isinstance(a, dict)])

    def serving_metrics(self) -> Iterator[Metric]:
        workers = Metric("bilayer_workers", "Worker processes serving, and restarts since start.", "gauge")
        workers.add_sample("bilayer_workers", {}, sum(w.synced for w in self.workers.values()))
        yield workers
        restarts = Metric(
            "bilayer_worker_restarts", "Worker processes started again after they exited.", "counter"
        )
        restarts.add_sample("bilayer_worker_restarts_total", {}, self.restarts)
        yield restarts
        yield from self._families

    def worker_summary(self) -> list[dict[str, object]] | None:
        return [
            {"index": w.index, "pid": w.process.pid, "serving": w.synced, "version": w.version}
            for _, w in sorted(self.workers.items())
        ]

    # Stopping.

    async def close(self, grace: float | None = None) -> None:
        """Drain every worker (each stops accepting, lets its connections finish for up to
        grace seconds, then exits), then stop the health checks."""
        if self._closing:
            return
        grace = self.settings.drain_grace if grace is None else grace
        self._closing = True
        workers = list(self.workers.values())
        for worker in workers:
            await self._tell(worker, STOP, encode({"grace": grace}))
        for worker in workers:
            try:
                async with asyncio.timeout(grace + 10):
                    await worker.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for task in self._runs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in self.shared_sockets.values():
            sock.close()
        self.shared_sockets.clear()
        self.buckets.memory.close()
        os.close(self.buckets_fd)
        await super().close(grace)


class _Refused(Exception):
    def __init__(self, error: str, mismatch: bool) -> None:
        super().__init__(error)
        self.mismatch = mismatch


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def merge_families(per_worker: list[list[dict[str, Any]]]) -> list[Metric]:
    """The pod's metric families from each worker's: every sample summed over the workers,
    but the gauges that say whether something works, which take the worst worker's value."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in per_worker:
        for family in families:
            name = family["name"]
            if name not in merged:
                merged[name] = Metric(name, family["help"], family["type"])
                values[name] = {}
            worst = name in WORST_OF
            samples = values[name]
            for sample, labels, value in family["samples"]:
                key = (sample, tuple(sorted(labels.items())))
                if key not in samples:
                    samples[key] = value
                else:
                    samples[key] = min(samples[key], value) if worst else samples[key] + value
    for name, metric in merged.items():
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
    return list(merged.values())
