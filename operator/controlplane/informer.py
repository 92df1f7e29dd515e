"""List, then watch: the operator's view of one kind, kept complete.

A watch continues from the last resourceVersion it saw (bookmarks move it on), so a
dropped connection loses nothing. When the server has forgotten that version (410 Gone)
the kind is listed again and the list *replaces* what the store held: an object deleted
while nobody watched is gone from the table too (kopf's relist only re-adds what
exists, so such objects stayed forever, their ports bound). Lists are paginated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from dataplane.logs import fields

from .kube import TRANSIENT, Gone, KubeClient, KubeError, backoff
from .observe import Metrics

log = logging.getLogger("bilayer.informer")

MIN_WATCH_SECONDS = 1.0  # a watch is opened at most this often when each ends at once

OnList = Callable[[list[dict[str, Any]]], None]
OnEvent = Callable[[str, Mapping[str, Any]], None]


class Informer:
    """Keeps on_list/on_event told about one collection, through errors and relists."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        path: str,
        on_list: OnList,
        on_event: OnEvent,
        *,
        params: dict[str, str] | None = None,
        watch_timeout: int = 300,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.client = client
        self.name = name
        self.path = path
        self.params = params or {}
        self.on_list = on_list
        self.on_event = on_event
        self.watch_timeout = watch_timeout
        self.synced = asyncio.Event()
        self.lists = 0
        self.restarts = 0  # watches that ended with an error or 410
        self.version: str | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                if self.version is None:
                    items, version = await self.client.list(self.path, self.params)
                    # The version is kept only once on_list took the items: if it raises,
                    # the supervisor restarts this and the kind is listed again (kept
                    # before, the restart went straight to watching and never set synced).
                    self.on_list(items)
                    self.version = version
                    self.lists += 1
                    if self.metrics is not None:
                        self.metrics.relists.labels(self.name).inc()
                    self.synced.set()
                opened = loop.time()
                await self._watch()
                attempt = 0  # the server ended the stream (timeoutSeconds): watch on
                lasted = loop.time() - opened
                if lasted < MIN_WATCH_SECONDS:
                    # Ended cleanly at once (a proxy's idle timeout, a struggling server):
                    # not again in a tight loop.
                    await asyncio.sleep(MIN_WATCH_SECONDS - lasted)
            except Gone:
                self._restarted()
                log.info("watch expired; listing again", extra=fields(watch=self.name))
                self.version = None
            except (KubeError, *TRANSIENT, ValueError) as err:
                self._restarted()
                delay = backoff(attempt, base=0.5, cap=10.0)
                if isinstance(err, KubeError) and err.retry_after is not None:
                    delay = max(delay, err.retry_after)  # a 429 on the watch itself
                attempt += 1
                log.warning(
                    "watch interrupted",
                    extra=fields(watch=self.name, error=str(err) or repr(err), retry_in=round(delay, 2)),
                )
                await asyncio.sleep(delay)

    def _restarted(self) -> None:
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.watch_restarts.labels(self.name).inc()

    async def _watch(self) -> None:
        assert self.version is not None
        async for event in self.client.watch(
            self.path, self.version, self.params, timeout=self.watch_timeout
        ):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise Gone(410, str(obj.get("message")))
                raise KubeError(int(code or 500), str(obj.get("message")))
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.on_event(str(kind), obj)
            # Past the event only once its handler succeeded: after an exception the
            # watch resumes before it and the event comes again.
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self.version = str(version)
