"""The operator in a cluster: watch events in, pushed tables and honest status out.

kopf delivers events (controlplane/main.py); this module does the rest: the initial
listing (nothing compiles before it is complete), the compile loop, pushes to the
dataplane pods, `Programmed` from their acknowledgements, the dataplane Service's ports.
It keeps no state of its own beyond caches: a restarted operator lists, compiles the
same table, finds the pods already serving it and pushes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from dataplane.eventloop import freeze_heap
from dataplane.logs import fields

from . import status
from .compiler import Compiled, ObjectKey
from .compiler import conditions as c
from .compiler.snapshot import ROUTE_KINDS
from .kube import KubeClient, KubeError, resource_path
from .leader import Leader
from .loop import CompileLoop
from .publisher import Pod, Publisher
from .resources.common import Condition
from .statuswriter import StatusWriter, reconcile_service_ports
from .statuswriter import observed_conditions as _conditions
from .store import KINDS, Store

log = logging.getLogger("bilayer.operator")

HISTORY = 64  # compiled versions remembered, to know what an older acknowledgement covers
FREEZE_AFTER_WRITES = 1000
SERVICE_PORTS_RECHECK = 60.0  # seconds: the dataplane Service is read again at least this often


@dataclass
class OperatorSettings:
    """How the operator runs; from the command line or Helm values."""

    namespace: str = "bilayer-system"  # where the dataplane pods, Service and Lease live
    identity: str = field(default_factory=lambda: os.environ.get("POD_NAME") or os.uname().nodename)
    watch_namespaces: list[str] = field(default_factory=list)  # empty: cluster-wide
    dataplane_labels: dict[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "bilayer",
            "app.kubernetes.io/component": "dataplane",
        }
    )
    dataplane_service: str = "bilayer-dataplane"
    admin_port: int = 9901
    admin_token: str | None = None
    # Compiles cost what changed (about 10 ms for a route at 10,000), so the hold-off only
    # merges events that arrive together. At 50 ms, churn of 20 events a second never
    # let it expire and every change waited the 500 ms cap (bench/control.py).
    holdoff: float = 0.01
    max_holdoff: float = 0.5
    resync: float = 60.0
    status_delay: float = 0.1  # batch acknowledgements into one status pass
    status_settle: float = 10.0  # wait up to this long for pushes to settle before a pass
    leader_election: bool = True
    lease_name: str = "bilayer-operator"


def _summary(conditions: list[Condition]) -> tuple[tuple[Any, ...], ...]:
    """What a status write would change, cheap to compare."""
    return tuple((c.type, c.status, c.reason, c.message, c.observedGeneration) for c in conditions)


class Operator:
    """Everything but the kopf wiring."""

    def __init__(self, settings: OperatorSettings, client: KubeClient) -> None:
        self.settings = settings
        self.client = client
        self.store = Store()
        self.loop = CompileLoop(
            self.store.snapshot,
            self._compiled,
            holdoff=settings.holdoff,
            max_holdoff=settings.max_holdoff,
        )
        self.publisher = Publisher(
            settings.admin_token,
            resync=settings.resync,
            on_change=self._acks_changed,
            on_conflict=self._conflict,
        )
        self.status = StatusWriter(client, self.store)
        self.latest: Compiled | None = None
        # Which table generation each compiled version has, and for each served object
        # the generation of the first table that served it as it is now: a pod that
        # acknowledged that table or a later one serves the object (tables between the
        # two would have moved `since`).
        self.versions: OrderedDict[str, int] = OrderedDict()
        self.since: dict[ObjectKey, int] = {}
        self.pods: dict[str, Pod] = {}
        self.leading = not settings.leader_election
        self._status_due = asyncio.Event()
        self._wanted: dict[ObjectKey, tuple[tuple[Any, ...], ...]] = {}  # last desired, summarized
        # Objects whose desired status must be worked out again at the next status pass:
        # those the last compile changed, and those not yet programmed everywhere. The
        # rest keep theirs, so a pass costs what changed, not 10,000 objects.
        self._recheck: set[ObjectKey] = set()
        self._unprogrammed: set[ObjectKey] = set()
        self._recheck_all = True
        self._pods_view: tuple[Any, ...] = ()
        self._service_ports: tuple[Any, ...] | None = None
        self._service_checked = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        self.synced = asyncio.Event()

    # --- life cycle ---

    async def start(self) -> None:
        """List everything, learn what the pods serve, then start compiling (if leading)."""
        for kind in KINDS:
            items: list[dict[str, Any]] = []
            scopes: list[str | None] = [*self.settings.watch_namespaces] or [None]
            for namespace in scopes:
                found, _ = await self.client.list(
                    resource_path(kind.group, kind.version, kind.plural, namespace)
                )
                items += found
            self.store.replace_all(kind.kind, items)
        self.loop.warm()
        pods_version = await self._list_pods()
        self.loop.advance_generation(await self.publisher.discover_generation())
        log.info(
            "initial listing complete",
            extra=fields(
                objects=len(self.store.objects),
                dataplane_pods=len(self.pods),
                generation=self.loop.generation,
            ),
        )
        self.synced.set()
        spawn = asyncio.get_running_loop().create_task
        self._tasks = [
            spawn(self.loop.run()),
            spawn(self._status_loop()),
            spawn(self._watch_pods(pods_version)),
        ]
        if self.settings.leader_election:
            leader = Leader(
                self.client,
                self.settings.namespace,
                self.settings.identity,
                name=self.settings.lease_name,
                on_change=self._leadership,
            )
            self._tasks.append(spawn(leader.run()))
        else:
            self.loop.mark_synced()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.close()

    def _leadership(self, leading: bool) -> None:
        if leading:
            self.leading = True
            self.loop.mark_synced()
            return
        if self.leading:
            # As controller-runtime does: a leader that lost its Lease exits, and restarts
            # as a standby, rather than risk acting alongside the new leader.
            log.error("lost the leader Lease; exiting so that one replica acts at a time")
            os._exit(1)

    # --- events from kopf ---

    def on_event(self, kind: str, event: str | None, body: Mapping[str, Any]) -> None:
        if self.store.apply(kind, event, body):
            self.loop.mark_dirty()
        elif kind in ROUTE_KINDS and event != "DELETED" and self.latest is not None:
            # Not news for the table; but if its status is not what we say, say it again.
            key = ObjectKey.of(body)
            if key in self.latest.statuses:
                observed = [c for c in _conditions(self.store.status_of(key))]
                if not status.same(observed, self._desired(key)):
                    self._wanted.pop(key, None)  # compare it with the cluster again
                    self._recheck.add(key)
                    self._status_due.set()

    def on_pod(self, event: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("namespace") != self.settings.namespace:
            return
        if any(labels.get(k) != v for k, v in self.settings.dataplane_labels.items()):
            return
        uid = str(meta.get("uid") or meta.get("name"))
        pod = self._ready_pod(body) if event != "DELETED" and not meta.get("deletionTimestamp") else None
        before = self.pods.get(uid)
        if pod is None:
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = pod
        if before != pod:
            self.publisher.set_pods(list(self.pods.values()))
        elif pod is not None and event == "MODIFIED":
            self.publisher.poke(uid)  # e.g. its container restarted: check what it serves

    @property
    def _pods_path(self) -> str:
        return resource_path("", "v1", "pods", self.settings.namespace)

    @property
    def _selector(self) -> dict[str, str]:
        return {"labelSelector": ",".join(f"{k}={v}" for k, v in self.settings.dataplane_labels.items())}

    async def _list_pods(self) -> str:
        items, version = await self.client.list(self._pods_path + "?" + self._selector_query())
        seen = set()
        for pod in items:
            seen.add(str((pod.get("metadata") or {}).get("uid")))
            self.on_pod(None, pod)
        for uid in [u for u in self.pods if u not in seen]:
            self.pods.pop(uid)
        self.publisher.set_pods(list(self.pods.values()))
        return version

    def _selector_query(self) -> str:
        return urlencode(self._selector)

    async def _watch_pods(self, version: str) -> None:
        """The dataplane pods in our namespace: watched here, not through kopf, so that
        the operator needs pod access only in its own namespace."""
        while True:
            try:
                async for event in self.client.watch(self._pods_path, version, self._selector):
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.on_pod(kind, obj)
                    elif kind == "ERROR":
                        version = await self._list_pods()  # e.g. 410 Gone: start over
            except (KubeError, OSError, TimeoutError, ValueError) as err:
                log.warning("pod watch interrupted", extra=fields(error=str(err)))
                await asyncio.sleep(1.0)
                with contextlib.suppress(KubeError, OSError, TimeoutError):
                    version = await self._list_pods()

    def _ready_pod(self, body: Mapping[str, Any]) -> Pod | None:
        status_ = body.get("status") or {}
        address = status_.get("podIP")
        ready = any(
            cond.get("type") == "Ready" and cond.get("status") == "True"
            for cond in status_.get("conditions") or []
        )
        if not address or not ready:
            return None
        port = self.settings.admin_port
        for container in (body.get("spec") or {}).get("containers") or []:
            for declared in container.get("ports") or []:
                if declared.get("name") == "admin":
                    port = int(declared["containerPort"])
        meta = body.get("metadata") or {}
        return Pod(
            uid=str(meta.get("uid") or meta.get("name")),
            name=str(meta.get("name")),
            address=address,
            port=port,
        )

    # --- compile results ---

    async def _compiled(self, compiled: Compiled) -> None:
        previous = self.latest.statuses if self.latest is not None else {}
        self.latest = compiled
        table = compiled.table
        self.versions[table.version] = table.generation
        self.versions.move_to_end(table.version)
        while len(self.versions) > HISTORY:
            self.versions.popitem(last=False)
        # The compiler hands back the same conditions object for an object whose result
        # did not change: identity finds the ones that did.
        for key, conds in compiled.statuses.items():
            if previous.get(key) is conds:
                continue
            self._recheck.add(key)
            if key in compiled.served:
                self.since[key] = table.generation
            else:
                self.since.pop(key, None)
        if len(previous) + len(self._recheck) > len(compiled.statuses):
            for key in [k for k in self.since if k not in compiled.statuses]:
                del self.since[key]
            for key in [k for k in self._wanted if k not in compiled.statuses]:
                del self._wanted[key]
        self.publisher.publish(table, compiled.changes)
        self._status_due.set()
        ports = tuple(
            (port, listener.l4 is None, bool(listener.l7 and listener.l7.tls))
            for port, listener in table.listeners.items()
        )
        now = asyncio.get_running_loop().time()
        if ports == self._service_ports and now - self._service_checked < SERVICE_PORTS_RECHECK:
            return
        try:
            await reconcile_service_ports(
                self.client, self.settings.namespace, self.settings.dataplane_service, table
            )
            self._service_ports, self._service_checked = ports, now
        except (KubeError, OSError, TimeoutError) as err:
            log.warning("cannot update the dataplane Service", extra=fields(error=str(err)))

    def _acks_changed(self) -> None:
        self._status_due.set()

    def _conflict(self, generation: int) -> None:
        # A pod serves a newer generation than ours: republish above it.
        self.loop.advance_generation(generation)
        self.loop.version = ""
        self.loop.mark_dirty()

    # --- status ---

    async def _status_loop(self) -> None:
        while True:
            await self._status_due.wait()
            await asyncio.sleep(self.settings.status_delay)
            self._status_due.clear()
            if self.latest is None or not self.leading:
                continue
            await self._settle()
            # Compare with the cluster only where what we want changed since the last pass
            # (or someone overwrote it, see on_event).
            desired = self._due_statuses()
            changed = {k: v for k, v in desired.items() if self._wanted.get(k) != _summary(v)}
            try:
                written, failed = await self.status.write_all(changed)
            except Exception:  # a bug: say so, and look at everything again in a while
                log.exception("status pass failed")
                self._recheck_all = True
                await asyncio.sleep(1.0)
                self._status_due.set()
                continue
            if written:
                log.info("status written", extra=fields(objects=written))
            if written > FREEZE_AFTER_WRITES:
                # What a first status pass leaves (a status per object) stays: keep it out
                # of collections. Not frozen, it made every full collection after it a
                # 0.3 s pause; the one full collection here is the last.
                freeze_heap()
            for key, conditions in desired.items():
                self._wanted[key] = _summary(conditions)
            if failed:  # written again at the next pass (a failed write is logged)
                for key in failed:
                    self._wanted.pop(key, None)
                self._recheck |= failed
                await asyncio.sleep(1.0)
                self._status_due.set()

    async def _settle(self) -> None:
        """Wait (a bounded time) until every pod has answered for the latest table: a pass
        before that writes Programmed=False, and the pass after writes every status again
        (11,000 writes at a first start with 10,000 routes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.status_settle
        while (left := deadline - loop.time()) > 0 and not self._pushes_settled():
            self._status_due.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), left)  # acks set it
        self._status_due.clear()

    def _pushes_settled(self) -> bool:
        assert self.latest is not None
        version = self.latest.table.version
        return all(
            version in (s.acked_version, s.refused_version) or s.failures > 0
            for s in self.publisher.pods.values()
        )

    def _due_statuses(self) -> dict[ObjectKey, list[Condition]]:
        """Desired conditions of the objects whose status may have changed."""
        assert self.latest is not None
        pods = tuple(
            (uid, s.refused_version == self.latest.table.version) for uid, s in self.publisher.pods.items()
        )
        if pods != self._pods_view or self._recheck_all:
            # Another pod count changes every "n/m dataplane pods".
            self._pods_view, self._recheck_all = pods, False
            keys: set[ObjectKey] = set(self.latest.statuses)
        else:
            keys = (self._recheck | self._unprogrammed) & self.latest.statuses.keys()
        self._recheck = set()
        desired = {key: self._desired(key) for key in keys}
        for key, conditions in desired.items():
            if conditions[-1].status == "True" or key not in self.latest.served:
                self._unprogrammed.discard(key)
            else:
                self._unprogrammed.add(key)
        self._unprogrammed &= self.latest.statuses.keys()
        return desired

    def _desired(self, key: ObjectKey) -> list[Condition]:
        compiled = self.latest
        assert compiled is not None
        conds = compiled.statuses[key]
        generation = conds[0].observedGeneration
        states = list(self.publisher.pods.values())
        since = self.since.get(key)
        acked = 0
        if since is not None:
            for state in states:
                if self.versions.get(state.acked_version or "", -1) >= since:
                    acked += 1
        programmed = status.programmed(compiled, key, acked, len(states))
        if key in compiled.served and programmed.status != "True":
            refusals = [s.error for s in states if s.refused_version == compiled.table.version and s.error]
            if refusals:
                programmed = c.condition(c.PROGRAMMED, False, "Refused", refusals[0], generation)
        return [*conds, programmed]
