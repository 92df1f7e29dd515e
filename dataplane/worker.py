"""A worker process: a Dataplane serving what its supervisor (dataplane.workers) sends.

Started as ``python -m dataplane.worker FD INDEX LOG_LEVEL BUCKETS_FD WORKERS``. Every
message on the socketpair but METRICS and STOP is handled in order: settings first, then
listening sockets, tables, deltas and health marks; each table or delta is answered with
what the worker serves (or why it refused). It drains and exits on STOP, SIGTERM,
SIGINT, or when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry

from . import delta, shared
from .channel import (
    APPLIED,
    DELTA,
    EJECTED,
    HELLO,
    MARK,
    METRICS,
    REFUSED,
    ROLLBACK,
    SAMPLES,
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
from .metrics import DataplaneCollector
from .runtime import Dataplane, GenerationConflict, Settings
from .shared import SharedBuckets
from .table import Table, TableError

log = logging.getLogger("bilayer.workers")


class WorkerProcess:
    """One worker: a Dataplane serving what the supervisor sends over fd."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.index = index
        self.queue: asyncio.Queue[tuple[int, int, bytes, list[socket.socket]]] = asyncio.Queue()
        self.channel = Channel(sock, self._on_message, self._on_closed)
        self.dataplane: Dataplane | None = None
        self.registry = CollectorRegistry()
        self.stopping = asyncio.Event()
        self.grace: float | None = None
        self._background: set[asyncio.Task[None]] = set()

    def _on_message(self, kind: int, payload: bytes) -> None:
        (seq,) = struct.unpack_from("!Q", payload)
        body = payload[8:]
        sockets: list[socket.socket] = []
        if kind == SOCKETS:  # taken now: the descriptors queue in the order messages came
            sockets = [socket.socket(fileno=fd) for fd in self.channel.take_fds(len(json.loads(body)))]
        if kind == METRICS:  # answered at once, even while a table is being applied
            task = asyncio.create_task(self._reply(SAMPLES, {"seq": seq, "families": self._families()}))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if kind == STOP:
            self.grace = json.loads(body).get("grace")
            self.stopping.set()
            return
        self.queue.put_nowait((kind, seq, body, sockets))

    def _on_closed(self) -> None:
        log.warning("the supervisor is gone; draining", extra=fields(worker=self.index))
        self.stopping.set()

    async def _reply(self, kind: int, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            await self.channel.send(kind, encode(message))

    def _families(self) -> list[dict[str, Any]]:
        families = []
        for metric in self.registry.collect():
            if metric.name.startswith("bilayer_table_"):
                continue  # the supervisor's: it claims the version
            samples = [[s.name, s.labels, s.value] for s in metric.samples if not s.name.endswith("_created")]
            families.append(
                {"name": metric.name, "help": metric.documentation, "type": metric.type, "samples": samples}
            )
        return families

    async def serve(self) -> None:
        consumer = asyncio.create_task(self._consume())
        await self.stopping.wait()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        if self.dataplane is not None:
            await self.dataplane.close(self.grace)
            for sock in self.dataplane.settings.listening_sockets.values():
                sock.close()
        self.channel.close()

    async def _consume(self) -> None:
        while True:
            kind, seq, body, sockets = await self.queue.get()
            await self._handle(kind, seq, body, sockets)

    async def _handle(self, kind: int, seq: int, body: bytes, sockets: list[socket.socket]) -> None:
        if kind == SETTINGS:
            document = json.loads(body)
            self.dataplane = Dataplane(Settings(**document))
            self.dataplane.health.active_checks = False
            self.dataplane.health.on_eject = self._ejected
            self.registry.register(DataplaneCollector(self.dataplane))
            await self._reply(HELLO, {"seq": seq, "pid": os.getpid()})
            return
        dataplane = self.dataplane
        assert dataplane is not None, "settings come first"
        if kind == SOCKETS:
            ports = json.loads(body)
            for port, sock in zip(ports, sockets, strict=False):
                old = dataplane.settings.listening_sockets.pop(port, None)
                if old is not None:
                    old.close()
                dataplane.settings.listening_sockets[port] = sock
        elif kind == MARK:
            mark = json.loads(body)
            endpoint = f"{mark['address']}:{mark['port']}"
            if mark["healthy"] is not None:  # rare: an active check's verdict changed
                log.info(
                    "endpoint health from the supervisor",
                    extra=fields(endpoint=endpoint, healthy=mark["healthy"]),
                )
            elif mark["ejectedUntil"] > time.monotonic():  # as rare: another worker ejected it
                log.info("endpoint ejected by another worker", extra=fields(endpoint=endpoint))
            dataplane.health.mark(
                mark["address"],
                mark["port"],
                mark["protocol"],
                healthy=mark["healthy"],
                ejected_until=mark["ejectedUntil"],
            )
        elif kind in (TABLE, DELTA, ROLLBACK):
            await self._apply(dataplane, kind, seq, body)

    async def _apply(self, dataplane: Dataplane, kind: int, seq: int, body: bytes) -> None:
        try:
            # No collection while the table and the listeners' structures for it are built:
            # at 10,000 routes the collector otherwise walks millions of new objects, again
            # and again (seconds per push); apply freezes them afterwards.
            with gc_paused():
                if kind in (TABLE, ROLLBACK):
                    table = Table.parse(body)
                    await dataplane.apply(table, persist=False, older=kind == ROLLBACK)
                else:
                    await dataplane.apply_delta(delta.parse(body))
        except delta.BaseMismatch as err:
            await self._reply(REFUSED, {"seq": seq, "error": str(err), "mismatch": True})
            return
        except (TableError, GenerationConflict) as err:
            log.error("table refused by a worker", extra=fields(worker=self.index, error=str(err)))
            await self._reply(REFUSED, {"seq": seq, "error": str(err)})
            return
        table_now = dataplane.table
        shared = dataplane.settings.listening_sockets
        for port in [p for p in shared if table_now is None or p not in table_now.listeners]:
            shared.pop(port).close()  # the supervisor closed its copy too
        await self._reply(
            APPLIED,
            {
                "seq": seq,
                "version": table_now.version if table_now else None,
                "generation": table_now.generation if table_now else None,
                "errors": {str(p): e for p, e in dataplane.listener_errors.items()},
            },
        )

    def _ejected(self, state: EndpointState) -> None:
        task = asyncio.create_task(self._send_quietly(EJECTED, mark(state, healthy=None)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, kind: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):
            await self.channel.send(kind, payload)


class _WorkerField(logging.Filter):
    """Adds the worker's index to every line it logs."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        extra = getattr(record, "fields", None)
        record.fields = {**extra, "worker": self.index} if isinstance(extra, dict) else {"worker": self.index}
        return True


async def run_worker(fd: int, index: int) -> None:
    """A worker's life: serve what the supervisor sends until it says stop (or is gone)."""
    worker = WorkerProcess(socket.socket(fileno=fd), index)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # A terminal's Ctrl-C reaches the whole process group: drain as the supervisor does.
        loop.add_signal_handler(sig, worker.stopping.set)
    await worker.serve()


def main(argv: list[str]) -> None:
    from . import eventloop, logs

    fd, index, level, buckets, workers = int(argv[0]), int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    shared.use(SharedBuckets(buckets), workers)
    logs.setup(level)
    logging.getLogger().handlers[0].addFilter(_WorkerField(index))
    eventloop.raise_fd_limit()
    eventloop.run(run_worker(fd, index))


if __name__ == "__main__":
    main(sys.argv[1:])
