"""`bilayer run -f DIR`: the file provider programming an in-process dataplane."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from dataplane.admin import build_app, serve
from dataplane.logs import fields
from dataplane.runtime import Dataplane, GenerationConflict, NotServed, Settings
from dataplane.server import open_dataplane, require_token, stop_on_signals

from . import status
from .compiler import Compiled, ObjectKey
from .files import FileSource
from .loop import CompileLoop
from .resources.classes import DEFAULT_CLASS
from .resources.common import Condition

log = logging.getLogger("bilayer.run")

POLL_INTERVAL = 0.25


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FileMode:
    """Files in, compiled table out to the dataplane, conditions kept for /v1/status."""

    def __init__(self, directory: Path, dataplane: Dataplane, class_name: str | None = DEFAULT_CLASS) -> None:
        self.source = FileSource(directory, class_name)
        self.dataplane = dataplane
        self.loop = CompileLoop(self.source.snapshot, self.publish, holdoff=0.05, max_holdoff=0.5)
        self.conditions: dict[ObjectKey, list[Condition]] = {}
        self._reported: set[str] = set()
        self._skipped = 0

    async def publish(self, compiled: Compiled) -> None:
        try:
            await self.dataplane.apply(compiled.table)
        except GenerationConflict as err:
            # The dataplane served a newer table (a manual push, or the saved one): move past it.
            self.loop.advance_generation(err.current)
            self.loop.version = ""
            self.loop.mark_dirty()
            return
        except NotServed as err:
            # A worker exited or lagged mid-apply; it is started again from the table served
            # before. Publish again shortly (the same table: its generation is kept).
            log.error("table not applied by every worker; retrying", extra=fields(error=str(err)))
            asyncio.get_running_loop().call_later(1.0, self.loop.mark_dirty)
            return
        now = now_rfc3339()
        port_errors = self._port_errors(compiled)
        updated: dict[ObjectKey, list[Condition]] = {}
        changed = problems = 0
        for key, conds in compiled.statuses.items():
            full = [
                *conds,
                status.programmed(
                    compiled, key, 1, 1, port_error=port_errors.get(key.ref), unit="the in-process dataplane"
                ),
            ]
            updated[key] = status.merge(self.conditions.get(key, []), full, now)
            bad = [c for c in full if c.status != "True"]
            problems += bool(bad)
            if not status.same(self.conditions.get(key, []), full):
                changed += 1
                if bad:  # one line per object with a problem; the healthy ones are summed up
                    log.warning(
                        f"{key}: " + "; ".join(f"{c.reason}: {c.message}" for c in bad),
                        extra=fields(object=str(key), conditions={c.type: c.status for c in full}),
                    )
        self.conditions = updated
        if changed:
            log.info(
                "objects updated",
                extra=fields(
                    objects=len(updated),
                    changed=changed,
                    with_problems=problems,
                    generation=self.loop.generation,
                ),
            )
        self._report_problems()

    def _port_errors(self, compiled: Compiled) -> dict[str, str]:
        """namespace/name -> why its listener failed to bind, for objects on failed ports."""
        errors: dict[str, str] = {}
        for port, error in self.dataplane.listener_errors.items():
            listener = compiled.table.listeners.get(port)
            if listener is None:
                continue
            # A port number may have a TCP and a UDP face: the error names the face that failed.
            if status.is_udp_error(error):
                if listener.udp is not None:
                    errors[listener.udp.source] = error
            elif listener.l4 is not None:
                errors[listener.l4.source] = error
            elif listener.passthrough is not None:
                errors.update((source, error) for source in listener.passthrough.routes)
            elif listener.l7 is not None:
                errors.update((rule.route, error) for rule in listener.l7.rules.values())
        return errors

    def _report_problems(self) -> None:
        skipped = len(self.source.other_classes)
        if skipped != self._skipped:
            self._skipped = skipped
            if skipped:  # said once per change, so a route that "vanished" is explained
                log.info(
                    "objects of other classes not served",
                    extra=fields(objects=skipped, class_name=self.source.class_name),
                )
        current = set(self.source.problems)
        for problem in sorted(current - self._reported):
            log.warning(problem, extra=fields(directory=str(self.source.directory)))
        self._reported = current

    def status_document(self) -> dict[str, Any]:
        table = self.dataplane.table
        return {
            "directory": str(self.source.directory),
            "version": table.version if table else None,
            "generation": table.generation if table else None,
            "problems": list(self.source.problems),
            "objects": [
                {
                    "kind": key.kind,
                    "namespace": key.namespace,
                    "name": key.name,
                    "conditions": [c.model_dump(exclude_none=True) for c in conds],
                }
                for key, conds in sorted(self.conditions.items())
            ],
        }

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        """Poll the folder; a change that reads differently reloads the files and marks the
        loop dirty (a file turned empty is looked at again until it is believed)."""
        seen = self.source.signature()
        self.source.reload()
        self.loop.mark_synced()
        while True:
            await asyncio.sleep(interval)
            current = self.source.signature()
            if current != seen or self.source.settling:
                seen = current
                if self.source.reload():
                    self.loop.mark_dirty()


async def run_files(
    directory: Path,
    settings: Settings,
    *,
    admin_host: str,
    admin_port: int,
    token: str | None,
    class_name: str | None = DEFAULT_CLASS,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the objects in directory until stop is set (or SIGINT/SIGTERM)."""
    require_token(admin_host, token)
    dataplane = await open_dataplane(settings)
    await dataplane.load_persisted()
    mode = FileMode(directory, dataplane, class_name)
    if dataplane.table is not None:
        mode.loop.advance_generation(dataplane.table.generation)
    app = build_app(dataplane, token, status_provider=mode.status_document)
    runner = await serve(app, admin_host, admin_port)
    log.info(
        "bilayer run started",
        extra=fields(
            directory=str(directory),
            class_name=class_name or "every class",
            admin=f"http://{admin_host}:{admin_port}",
            address=settings.address,
        ),
    )
    stop = stop_on_signals(stop)
    tasks = [asyncio.create_task(mode.watch()), asyncio.create_task(mode.loop.run())]
    try:
        await stop.wait()
    finally:
        log.info("shutting down", extra=fields(grace=settings.drain_grace))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dataplane.close()
        await runner.cleanup()
