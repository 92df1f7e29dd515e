"""kmock's Kubernetes emulator with what an operator test needs (see ../shared/KMOCK.md).

kmock 0.8 never sets uid, creationTimestamp, generation or resourceVersion, replays
every object on every watch, and keeps every request (each new one scans them all).
This subclass stamps metadata on writes, serves LIST with the current resourceVersion
and WATCH from a resourceVersion without gaps, answers single-object requests by key
(kmock scans every object), and keeps no request history. It overrides private
methods, so kmock is pinned to 0.8.
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums, rendering

CRDS = {
    "bilayer.dev/v1alpha1/l4listeners": ("L4Listener", "l4listener"),
    "bilayer.dev/v1alpha1/l7routes": ("L7Route", "l7route"),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """A stateful Kubernetes API for tests."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._version = 0
        self.status_writes = 0  # PATCH/PUT of a .../status subresource, for bench/control.py
        self.status_arrivals: list[float] = []  # when each came in (time.monotonic), before any delay
        # Seconds a write (create, patch) of a resource, by plural, takes before it is
        # served: a slow admission webhook.
        self.write_delay: dict[str, float] = {}
        self._held: list[rendering.Request] = []  # writes waiting out their delay
        self._deletions: dict[Any, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self.resources.load_bundled()
        for key, (kind, singular) in CRDS.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, singular=singular, namespaced=True, verbs=VERBS, subresources={"status"}
            )

    def _next(self) -> str:
        self._version += 1
        return str(self._version)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # No history: kmock would scan all of it on every request. But kmock serves a
        # request only while it still lists it (it matches reactions by looking the request
        # up there), so a write held in its delay stays listed: dropped by a request that
        # came meanwhile, it was answered 500 and retried for good.
        self._requests[:] = [*self._held, request]
        if request.action == enums.action.UPDATE and request.subresource == "status":
            self.status_arrivals.append(time.monotonic())
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            delay = self.write_delay.get(request.resource.plural or "")
            if delay:
                self._held.append(request)
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._held = [held for held in self._held if held is not request]  # by identity
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == enums.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = self._next()
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                self.status_writes += request.subresource == "status"
                key = (request.resource, request.namespace, request.name)
                # kmock's ObjectsArray.get() does not look objects up by key: index it.
                current = self._objects[key] if key in self._objects else None  # noqa: SIM401
                if current is not None and not current.deleted:
                    meta = request.data.setdefault("metadata", {})
                    meta["resourceVersion"] = self._next()
                    if "spec" in request.data and request.subresource != "status":
                        meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        if (
            request.action == enums.action.DELETE
            and request.resource is not None
            and request.name is not None
        ):
            key = (request.resource, request.namespace, request.name)
            if key in self._objects and not self._objects[key].deleted:
                raw = dict(self._objects[key].raw)
                version = self._next()
                raw["metadata"] = {**raw.get("metadata", {}), "resourceVersion": version}
                self._deletions[request.resource].append((int(version), raw))
        response: aiohttp.web.StreamResponse = await super()._handle(request)
        return response

    # kmock answers a fetch, update or delete by scanning every object (10 ms each at
    # 11,000 objects): look the one object up by its key instead.

    def _one(self, request: rendering.Request, name: str | None = None) -> Any:
        key = (request.resource, request.namespace, name or request.name)
        return self._objects[key] if key in self._objects else None  # noqa: SIM401

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._one(request)
        if obj is None or obj.deleted:
            return await super()._serve_fetch(request)  # kmock's not-found answer
        return obj.raw

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        if isinstance(request.data, dict) and request.namespace:
            obj = self._one(request, request.data.get("metadata", {}).get("name"))
            if obj is not None:
                return obj.last.raw
        return await super()._serve_create(request)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        obj = self._one(request)
        return obj.last.raw if obj is not None else await super()._serve_update(request)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        obj = self._one(request)
        return obj.last.raw if obj is not None else await super()._serve_delete(request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        payload["metadata"]["resourceVersion"] = str(self._version)
        if _selector(request):
            payload["items"] = [item for item in payload["items"] if _selected(request, item)]
        return payload

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        since = request.params.get("resourceVersion")
        if not since or since == "0":
            async for item in super()._serve_watch(request):
                if not isinstance(item, dict) or _selected(request, item.get("object") or {}):
                    yield item
            return
        yield b""
        assert request.resource is not None
        start = int(since)
        bus = self._buses[request.resource]
        async with self._lock:  # every write holds this lock: nothing slips between replay and stream
            replay = []
            for (resource, namespace, _), obj in self._objects.items():
                if resource != request.resource or obj.deleted:
                    continue
                if request.namespace is not None and namespace != request.namespace:
                    continue
                version = int(obj.get("metadata", {}).get("resourceVersion", 0) or 0)
                if version > start:
                    replay.append((version, {"type": "MODIFIED", "object": obj.raw}))
            for version, raw in self._deletions[request.resource]:
                if version > start:
                    replay.append((version, {"type": "DELETED", "object": raw}))
            mark = await bus.mark()
        try:
            for _, event in sorted(replay, key=lambda item: item[0]):
                if _selected(request, event["object"]):
                    yield event
            async for event in bus.stream(since=mark):
                namespace = event.get("object", {}).get("metadata", {}).get("namespace")
                if (request.namespace is None or namespace == request.namespace) and _selected(
                    request, event.get("object", {})
                ):
                    yield event
        finally:
            await bus.unmark(mark)


def _selector(request: rendering.Request) -> dict[str, str]:
    """An equality-based labelSelector (k=v,k=v), the only kind the operator sends: kmock
    ignores selectors, so two installs' operators each saw the other's dataplane pods."""
    text = str(request.params.get("labelSelector") or "")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def _selected(request: rendering.Request, obj: Any) -> bool:
    wanted = _selector(request)
    if not wanted:
        return True
    labels = ((obj.get("metadata") if isinstance(obj, dict) else None) or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())
