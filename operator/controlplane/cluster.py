"""The operator in a cluster: watch events in, pushed tables and honest status out.

kopf runs the process (controlplane/main.py: login, startup, shutdown); this module does
the rest: list and watch every kind (controlplane.informer; nothing compiles before every
list is complete), the compile loop, leader election, pushes to the dataplane pods,
`Programmed` from their acknowledgements, the dataplane Service's ports, health and
metrics. Every long-lived task is supervised. It keeps no state of its own beyond caches:
a restarted operator lists, compiles the same table, finds the pods already serving it
and pushes no table (only its new leader term, in an empty delta).
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

from aiohttp import web

from dataplane.eventloop import freeze_heap
from dataplane.logs import fields

from . import status
from .admintoken import ensure_token
from .compiler import Compiled, ObjectKey
from .compiler import conditions as c
from .compiler.snapshot import ROUTE_KINDS
from .informer import Informer
from .kube import TRANSIENT, KubeClient, KubeError, backoff, resource_path
from .leader import Leader, Term
from .loop import CompileLoop
from .observe import Metrics, health_app
from .publisher import Pod, PodState, Publisher
from .resources.classes import DEFAULT_CLASS
from .resources.common import Condition
from .resources.kube import TLS_SECRET_TYPE
from .statuswriter import StatusWriter, reconcile_service_ports, service_ports_key
from .statuswriter import observed_conditions as _conditions
from .store import KINDS, Kind, Store
from .supervisor import Supervisor

log = logging.getLogger("bilayer.operator")

HISTORY = 64  # compiled versions remembered, to know what an older acknowledgement covers
FREEZE_AFTER_WRITES = 1000
SERVICE_PORTS_RECHECK = 60.0  # seconds: the dataplane Service is read again at least this often
LEADER_TASK = "leader election"
STATUS_TASK = "status loop"
SERVICE_TASK = "service ports"


@dataclass
class OperatorSettings:
    """How the operator runs; from the command line or Helm values."""

    namespace: str = "bilayer-system"  # where the dataplane pods, Service and Lease live
    # The routes this install serves: their spec.className, or none when this is the
    # default class (resources.classes). Others' routes are neither compiled nor written.
    class_name: str = DEFAULT_CLASS
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
    # Without admin_token: the Secret in `namespace` holding it, filled at the first start.
    admin_token_secret: str | None = None
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
    lease_seconds: int = 15  # client-go's defaults (leader.Leader)
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    # /healthz, /readyz, /metrics. Not kopf's 0.0.0.0:8080: where operator and
    # dataplanes share a network, that took port 8080 from listeners.
    health_address: str = "0.0.0.0"
    health_port: int | None = 9902
    # Client-side rate limit of API calls (watches excluded). client-go's default is 5
    # QPS (controller-runtime's 20, burst 30): a first start at 10,000 routes writes
    # 11,000 statuses, 2 minutes at 100 a second, 9 at 20. The API server's priority
    # and fairness still protects it; 429s are honoured with backoff.
    api_qps: float = 100.0
    api_burst: int = 200


def _summary(conditions: list[Condition]) -> tuple[tuple[Any, ...], ...]:
    """What a status write would change, cheap to compare."""
    return tuple((c.type, c.status, c.reason, c.message, c.observedGeneration) for c in conditions)


class Operator:
    """Everything but the kopf wiring."""

    def __init__(self, settings: OperatorSettings, client: KubeClient) -> None:
        self.settings = settings
        self.client = client
        self.metrics = Metrics()
        self.supervisor = Supervisor(self.metrics)
        self.store = Store(settings.class_name)
        self.loop = CompileLoop(
            self.store.snapshot,
            self._compiled,
            holdoff=settings.holdoff,
            max_holdoff=settings.max_holdoff,
            metrics=self.metrics,
        )
        self.publisher = Publisher(
            settings.admin_token,
            resync=settings.resync,
            on_change=self._acks_changed,
            on_conflict=self._conflict,
            metrics=self.metrics,
        )
        self.status = StatusWriter(client, self.store, metrics=self.metrics)
        self.latest: Compiled | None = None
        # Which table generation each compiled version has, and for each served object
        # the generation of the first table that served it as it is now: a pod that
        # acknowledged that table or a later one serves the object (tables between the
        # two would have moved `since`).
        self.versions: OrderedDict[str, int] = OrderedDict()
        self.since: dict[ObjectKey, int] = {}
        self.pods: dict[str, Pod] = {}
        self.leading = False
        self.leader: Leader | None = None
        self.informers: list[Informer] = []
        self._status_due = asyncio.Event()
        self._wanted: dict[ObjectKey, tuple[tuple[Any, ...], ...]] = {}  # last desired, summarized
        # Objects whose desired status must be worked out again at the next status pass:
        # those the last compile changed, and those not yet programmed everywhere. The
        # rest keep theirs, so a pass costs what changed, not 10,000 objects.
        self._recheck: set[ObjectKey] = set()
        self._unprogrammed: set[ObjectKey] = set()
        self._recheck_all = True
        self._pods_view: tuple[Any, ...] = ()
        self._first_pass = True
        self._service_ports: tuple[Any, ...] | None = None  # what the Service was last made to hold
        self._service_checked = 0.0
        self._ports_due = asyncio.Event()
        self._health: web.AppRunner | None = None
        self.synced = asyncio.Event()

    # --- life cycle ---

    async def start(self) -> None:
        """Serve health, list and watch everything, then compile (when leading)."""
        if self.settings.health_port is not None:
            app = health_app(self.metrics, self.supervisor_healthy, self.synced.is_set, self._refresh_metrics)
            self._health = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._health.setup()
            await web.TCPSite(self._health, self.settings.health_address, self.settings.health_port).start()
        await self._admin_token()
        scopes: list[str | None] = [*self.settings.watch_namespaces] or [None]
        for kind in KINDS:
            for namespace in scopes:
                self._inform(kind, namespace)
        pods = Informer(
            self.client,
            "pods",
            resource_path("", "v1", "pods", self.settings.namespace),
            self._pods_listed,
            self._pod_event,
            params=self._selector,
            metrics=self.metrics,
        )
        self.informers.append(pods)
        for informer in self.informers:
            self.supervisor.spawn(f"watch {informer.name}", informer.run)
        # Every kind listed before anything compiles; listing retries on its own (429
        # while a CRD's storage initializes, outages), each list in pages.
        await asyncio.gather(*(informer.synced.wait() for informer in self.informers))
        self.loop.warm()
        log.info(
            "initial listing complete",
            extra=fields(
                objects=len(self.store.objects),
                dataplane_pods=len(self.pods),
                class_name=self.settings.class_name,
            ),
        )
        self.synced.set()
        self.supervisor.spawn("compile loop", self.loop.run)
        self._spawn_writers()
        if self.settings.leader_election:
            self.leader = Leader(
                self.client,
                self.settings.namespace,
                self.settings.identity,
                name=self.settings.lease_name,
                lease_seconds=self.settings.lease_seconds,
                renew_deadline=self.settings.renew_deadline,
                retry_period=self.settings.retry_period,
                on_change=self._leadership,
            )
            self.supervisor.spawn(LEADER_TASK, self.leader.run)
        else:
            self._leadership(None, elected=False)

    async def _admin_token(self) -> None:
        """Take the admin token from its Secret (writing one at the first start) when no
        flag or environment variable gave it; retried until the Secret can be read."""
        name = self.settings.admin_token_secret
        if self.publisher.token is not None or not name:
            return
        attempt = 0
        while True:
            try:
                self.publisher.token = await ensure_token(self.client, self.settings.namespace, name)
                return
            except (KubeError, OSError) as err:
                log.warning("cannot read the admin token", extra=fields(secret=name, error=str(err)))
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    def _spawn_writers(self) -> None:
        """(Re)start the tasks that write to the API server (route status, the dataplane
        Service); a restart cancels the one running, with the writes it has in flight."""
        self.supervisor.spawn(STATUS_TASK, self._status_loop)
        self.supervisor.spawn(SERVICE_TASK, self._service_loop)

    @property
    def acting(self) -> bool:
        """Leading and taken over (pushing): only then are status and the Service ours to
        write. Leading alone is not enough: until the take-over has asked every pod what
        it serves, what we know of them is what they acknowledged under the last leader."""
        return self.leading and self.publisher.active

    def supervisor_healthy(self) -> bool:
        return self.supervisor.healthy

    def _inform(self, kind: Kind, namespace: str | None) -> None:
        params = {"fieldSelector": f"type={TLS_SECRET_TYPE}"} if kind.kind == "Secret" else {}
        name = kind.plural + (f" in {namespace}" if namespace else "")
        self.informers.append(
            Informer(
                self.client,
                name,
                resource_path(kind.group, kind.version, kind.plural, namespace),
                lambda items: self._listed(kind.kind, namespace, items),
                lambda event, body: self.on_event(kind.kind, event, body),
                params=params,
                metrics=self.metrics,
            )
        )

    async def stop(self) -> None:
        """Stop every task, then release the Lease (a standby takes over at once)."""
        # The leader loop first, then everything that acts, and only then the release: a
        # renewal still running took the Lease again during a release (a new term), or
        # made the release's write lose the race, and the standby waited a whole lease.
        await self.supervisor.cancel(LEADER_TASK)
        await self.supervisor.stop()
        await self.publisher.close()
        if self.leader is not None:
            await self.leader.release()
        if self._health is not None:
            await self._health.cleanup()

    def _leadership(self, term: Term | None, *, elected: bool = True) -> None:
        """Leadership changed: act, or stop pushing at once."""
        if term is None and elected:
            self.leading = False
            self.metrics.leader.set(0)
            self.publisher.active = False
            for state in self.publisher.pods.values():
                if state.task is not None:
                    state.task.cancel()
            # A status pass in progress stops now, not when it ends: at 10,000 routes a
            # pass is minutes of writes, and the new leader writes meanwhile. Its
            # unwritten objects are looked at again when we lead again (_take_over).
            if self.supervisor.tasks.get(STATUS_TASK) is not None:
                self._spawn_writers()
            return
        self.leading = True
        self.metrics.leader.set(1)
        if term is not None:
            self.metrics.term.set(term.transitions)
        self.supervisor.spawn("take over", lambda: self._take_over(term), once=True)

    async def _take_over(self, term: Term | None) -> None:
        """Start acting: above the generation any pod serves, then push and write status."""
        self.loop.advance_generation(await self.publisher.discover_generation())
        self.loop.version = ""  # the next table gets a generation above what pods serve
        if not self.leading:
            return
        self.publisher.activate(term.header if term is not None else None)
        self._recheck_all = True
        self._service_ports = None  # another leader may have changed it meanwhile: look again
        self._ports_due.set()
        self.loop.mark_synced()
        self._status_due.set()

    # --- events ---

    def _listed(self, kind: str, namespace: str | None, items: list[dict[str, Any]]) -> None:
        """A (re)list of one kind: it replaces what the store held, deletions included."""
        if self.store.replace_all(kind, items, namespace):
            self.loop.mark_dirty()

    def on_event(self, kind: str, event: str | None, body: Mapping[str, Any]) -> None:
        if self.store.apply(kind, event, body):
            self.loop.mark_dirty()
        elif kind in ROUTE_KINDS and event != "DELETED" and self.latest is not None:
            # Not news for the table; but if its status is not what we say, say it again.
            key = ObjectKey.of(body)
            if key in self.latest.statuses and self.store.holds(key):
                observed = [c for c in _conditions(self.store.status_of(key))]
                if not status.same(observed, self._desired(key)):
                    self._wanted.pop(key, None)  # compare it with the cluster again
                    self._recheck.add(key)
                    self._status_due.set()

    def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        self.pods = {}
        for body in items:
            pod = self._running_pod(body)
            if pod is not None:
                self.pods[pod.uid] = pod
        self.publisher.set_pods(list(self.pods.values()))

    def _pod_event(self, event: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or meta.get("name"))
        pod = self._running_pod(body) if event != "DELETED" else None
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
    def _selector(self) -> dict[str, str]:
        return {"labelSelector": ",".join(f"{k}={v}" for k, v in self.settings.dataplane_labels.items())}

    def _running_pod(self, body: Mapping[str, Any]) -> Pod | None:
        """A pod to push to: running, with an IP. Not "Ready": a dataplane is Ready once
        it serves a table, so waiting for Ready before pushing deadlocked fresh pods."""
        status_ = body.get("status") or {}
        meta = body.get("metadata") or {}
        address = status_.get("podIP")
        if not address or meta.get("deletionTimestamp") or status_.get("phase") in ("Succeeded", "Failed"):
            return None
        port = self.settings.admin_port
        for container in (body.get("spec") or {}).get("containers") or []:
            for declared in container.get("ports") or []:
                if declared.get("name") == "admin":
                    port = int(declared["containerPort"])
        return Pod(
            uid=str(meta.get("uid") or meta.get("name")),
            name=str(meta.get("name")),
            address=address,
            port=port,
        )

    def _refresh_metrics(self) -> None:
        m = self.metrics
        version = self.latest.table.version if self.latest is not None else None
        states = {"current": 0, "other": 0, "none": 0, "refused": 0, "fenced": 0}
        for state in self.publisher.pods.values():
            if state.fenced:
                states["fenced"] += 1
            elif version is not None and state.refused_version == version:
                states["refused"] += 1
            elif state.acked_version is None:
                states["none"] += 1
            else:
                states["current" if state.acked_version == version else "other"] += 1
        for name, count in states.items():
            m.dataplane_pods.labels(name).set(count)
        m.api_requests.set(self.client.requests)
        m.api_retries.set(self.client.retries)
        m.api_throttled.set(self.client.throttled)

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
        self._ports_due.set()  # the Service's ports follow on their own task

    async def _service_loop(self) -> None:
        """Keep the dataplane Service's ports equal to the latest table's listeners. A task
        of its own, not a step of the compile: a slow or failing admission webhook on
        Services held every compile and push back by seconds (a minute on timeouts)."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ports_due.wait(), SERVICE_PORTS_RECHECK)
            self._ports_due.clear()
            if self.latest is None or not self.acting:
                continue  # the leader keeps the Service; a standby writes nothing
            table = self.latest.table
            ports = service_ports_key(table)  # UDP and passthrough ports included
            now = loop.time()
            if ports == self._service_ports and now - self._service_checked < SERVICE_PORTS_RECHECK:
                continue
            try:
                await reconcile_service_ports(
                    self.client, self.settings.namespace, self.settings.dataplane_service, table
                )
            except (KubeError, *TRANSIENT) as err:
                failures += 1
                delay = backoff(failures, 1.0, 60.0)
                log.warning(
                    "cannot update the dataplane Service",
                    extra=fields(error=str(err) or repr(err), retry_in=round(delay, 2)),
                )
                await asyncio.sleep(delay)
                self._ports_due.set()  # again, with whatever table is the latest by then
                continue
            failures = 0
            self._service_ports, self._service_checked = ports, now

    def _acks_changed(self) -> None:
        self._status_due.set()

    def _conflict(self, generation: int) -> None:
        # A pod serves a newer generation than ours: republish above it.
        self.loop.advance_generation(generation)
        self.loop.version = ""
        self.loop.mark_dirty()

    # --- status ---

    async def _status_loop(self) -> None:
        failures = 0
        while True:
            await self._status_due.wait()
            await asyncio.sleep(self.settings.status_delay)
            self._status_due.clear()
            if self.latest is None or not self.acting:
                continue
            await self._settle()
            if not self.acting:
                continue
            # Compare with the cluster only where what we want changed since the last pass
            # (or someone overwrote it, see on_event).
            desired = self._due_statuses()
            changed = {k: v for k, v in desired.items() if self._wanted.get(k) != _summary(v)}
            try:
                written, failed = await self.status.write_all(changed)
            except Exception:  # a bug: say so, and look at everything again in a while
                log.exception("status pass failed")
                self._recheck_all = True
                failures += 1
                await asyncio.sleep(backoff(failures, 1.0, 60.0))
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
            if not failed:
                failures = 0
                continue
            # Written again at the next pass, after a backoff that grows while writes
            # keep failing (the API server is down or refusing: no retry storm).
            for key in failed:
                self._wanted.pop(key, None)
            self._recheck |= failed
            failures += 1
            await asyncio.sleep(backoff(failures, 1.0, 60.0))
            self._status_due.set()

    async def _settle(self) -> None:
        """Wait a bounded time until every pod has answered for the latest table: a pass
        before that writes Pending, and the pass after writes every status again (11,000
        writes at a first start with 10,000 routes). The first pass waits up to
        status_settle; later ones at most a second, so one slow pod cannot hold every
        status back for long."""
        loop = asyncio.get_running_loop()
        bound = self.settings.status_settle if self._first_pass else min(1.0, self.settings.status_settle)
        self._first_pass = False
        deadline = loop.time() + bound
        while (left := deadline - loop.time()) > 0 and not self._pushes_settled():
            self._status_due.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), left)  # acks set it
        self._status_due.clear()

    def _pushes_settled(self) -> bool:
        assert self.latest is not None
        version = self.latest.table.version
        # A pod that has never answered is not waited for: it serves nothing we know of
        # and does not count for Programmed (one that hangs held the first pass 10 s).
        return all(
            version in (s.acked_version, s.refused_version) or s.failures > 0 or s.fenced or not s.answered
            for s in self.publisher.pods.values()
        )

    def _serving(self) -> list[PodState]:
        """The pods that count for Programmed: those serving a table. A pod that serves
        none yet (just started, not Ready) is not serving traffic either; counting it
        made every object Pending, then Programmed, on every rollout step."""
        return [s for s in self.publisher.pods.values() if s.acked_version is not None and not s.fenced]

    def _due_statuses(self) -> dict[ObjectKey, list[Condition]]:
        """Desired conditions of the objects whose status may have changed."""
        assert self.latest is not None
        version = self.latest.table.version
        pods = tuple(
            sorted(
                (s.pod.uid, s.refused_version == version, tuple(sorted(s.failed_ports.items())))
                for s in self._serving()
            )
        )
        if pods != self._pods_view or self._recheck_all:
            # The set of serving pods changed (or what they report): every object may
            # have another Programmed. Worked out for all; written only where it differs.
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
        generation = status.served_generation(conds)
        states = self._serving()
        since = self.since.get(key)
        acked = 0
        if since is not None:
            for state in states:
                if self.versions.get(state.acked_version or "", -1) >= since:
                    acked += 1
        port_error = None
        if key in compiled.served and any(s.failed_ports for s in states):
            spec = (self.store.objects.get(key) or {}).get("spec") or {}
            port, udp = spec.get("port"), key.kind == "L4Listener" and spec.get("protocol") == "UDP"
            for state in states:
                error = state.failed_ports.get(port) if isinstance(port, int) else None
                if error is not None and status.is_udp_error(error) == udp:
                    port_error = f"pod {state.pod.name}: {error}"
                    break
        programmed = status.programmed(compiled, key, acked, len(states), port_error=port_error)
        if key in compiled.served and programmed.status != "True":
            refusals = [s.error for s in states if s.refused_version == compiled.table.version and s.error]
            if refusals:
                programmed = c.condition(c.PROGRAMMED, False, "Refused", refusals[0], generation)
        return [*conds, programmed]
