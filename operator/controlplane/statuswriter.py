"""Writing L4Listener and L7Route status, and the dataplane Service's ports.

The operator is the only writer of these statuses (of the objects of its class). A status
is patched only when its conditions differ from what the cluster has (ignoring transition
times), so a write never causes another write, and a restarted operator writes nothing
that is already true.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from dataplane.logs import fields
from dataplane.table import Table

from . import status
from .compiler import ObjectKey
from .kube import TRANSIENT, KubeClient, KubeError, resource_path
from .observe import Metrics
from .resources.common import Condition
from .store import BY_KIND, Store

log = logging.getLogger("bilayer.status")


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def observed_conditions(raw: list[dict[str, Any]]) -> list[Condition]:
    conditions = []
    for item in raw:
        try:
            conditions.append(Condition.model_validate(item))
        except ValueError:
            continue  # someone else's malformed condition: ours replaces it
    return conditions


class StatusWriter:
    """Patches .../status of route objects whose conditions changed."""

    def __init__(
        self, client: KubeClient, store: Store, *, concurrency: int = 16, metrics: Metrics | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.store = store
        self._concurrency = concurrency
        self.writes = 0

    async def write_all(self, desired: dict[ObjectKey, list[Condition]]) -> tuple[int, set[ObjectKey]]:
        """Write every changed status; returns how many were written, and the objects whose
        write failed (to try again).

        A fixed number of writers take the objects one by one: at a first start with
        10,000 routes, a coroutine and a request body per object made up front held
        tens of megabytes at once."""
        now = now_rfc3339()
        todo = iter(desired.items())  # shared: each object is taken by one writer
        written = 0
        failed: set[ObjectKey] = set()

        async def writer() -> None:
            nonlocal written
            for key, conditions in todo:
                if not self.store.holds(key):
                    # Deleted, or moved to another class since the compile: not ours to
                    # write (the other install owns its status now, even a stale one).
                    continue
                observed = observed_conditions(self.store.status_of(key))
                if status.same(observed, conditions):
                    continue
                if await self._write(key, status.merge(observed, conditions, now)):
                    written += 1
                elif key in self.store.objects:
                    failed.add(key)

        await asyncio.gather(*(writer() for _ in range(self._concurrency)))
        return written, failed

    async def _write(self, key: ObjectKey, conditions: list[Condition]) -> bool:
        kind = BY_KIND[key.kind]
        path = resource_path(kind.group, kind.version, kind.plural, key.namespace, key.name) + "/status"
        body = {"status": {"conditions": [c.model_dump(exclude_none=True) for c in conditions]}}
        try:
            updated = await self.client.patch(path, body)
        except KubeError as err:
            self._count("gone" if err.status == 404 else "failed")
            if err.status != 404:  # 404: deleted meanwhile
                log.warning("status write failed", extra=fields(object=str(key), error=str(err)))
            return False
        except TRANSIENT as err:
            self._count("failed")
            log.warning(
                "status write failed", extra=fields(object=str(key), error=str(err) or type(err).__name__)
            )
            return False
        self.writes += 1
        self._count("written")
        # Remember what we wrote: the watch event that follows must not look like news.
        current = self.store.objects.get(key)
        if current is not None:
            current["status"] = updated.get("status", body["status"])
            version = (updated.get("metadata") or {}).get("resourceVersion")
            if version:  # so that a late echo of an earlier write is known as older
                current["metadata"] = {**current["metadata"], "resourceVersion": version}
        return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.status_writes.labels(result).inc()


def desired_ports(table: Table) -> list[dict[str, Any]]:
    """The dataplane Service's ports: one per listener and protocol, named by what the port
    serves. A port number with TCP and UDP listeners (DNS on 53) gets two entries; a Service
    allows that, the pair (port, protocol) is what must be unique."""
    ports = []
    for port, listener in sorted(table.listeners.items()):
        if listener.l4 is not None:
            name = f"tcp-{port}"
        elif listener.passthrough is not None:
            name = f"tls-{port}"  # TLS the backends terminate (routed by SNI)
        elif listener.l7 is not None:
            name = f"https-{port}" if listener.l7.tls else f"http-{port}"
        else:
            name = ""  # a UDP-only port
        if name:
            ports.append({"name": name, "port": port, "targetPort": port, "protocol": "TCP"})
        if listener.udp is not None:
            ports.append({"name": f"udp-{port}", "port": port, "targetPort": port, "protocol": "UDP"})
    return ports


def service_ports_key(table: Table) -> tuple[tuple[str, int, str], ...]:
    """What the Service's ports depend on: the caller skips a reconcile while it is unchanged."""
    return tuple((p["name"], p["port"], p["protocol"]) for p in desired_ports(table))


# The operator's field manager for the Service's ports (server-side apply). The chart (or a
# GitOps tool) owns the Service and its fixed port; the operator owns only the listener
# ports it applies, so neither's apply removes what the other set.
FIELD_MANAGER = "bilayer-operator"


def owned_ports(service: dict[str, Any], manager: str = FIELD_MANAGER) -> set[tuple[int, str]]:
    """(port, protocol) of the Service's port entries that manager's server-side apply owns,
    read from managedFields (keys like k:{"port":80,"protocol":"TCP"})."""
    owned: set[tuple[int, str]] = set()
    for entry in (service.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        ports = ((entry.get("fieldsV1") or {}).get("f:spec") or {}).get("f:ports") or {}
        for key in ports:
            if key.startswith("k:"):
                item = json.loads(key[2:])
                owned.add((int(item["port"]), str(item.get("protocol", "TCP"))))
    return owned


async def reconcile_service_ports(client: KubeClient, namespace: str, name: str, table: Table) -> bool:
    """Apply the table's listener ports to the Service under the operator's field manager;
    True when it applied. Ports others own (the chart's fixed port, a GitOps tool's) stay,
    and the node ports Kubernetes assigned stay (an apply that leaves nodePort out keeps it)."""
    path = resource_path("", "v1", "services", namespace, name)
    service = await client.get(path)
    if service is None:
        # Never created here: the chart owns the Service (and RBAC has no create).
        log.warning("dataplane Service not found", extra=fields(service=f"{namespace}/{name}"))
        return False
    desired = desired_ports(table)
    current = (service.get("spec") or {}).get("ports") or []
    live = {(p.get("port"), p.get("protocol") or "TCP"): p for p in current}
    mine = owned_ports(service)
    for port in desired:
        key = (port["port"], port["protocol"])
        other = live.get(key)
        if other is not None and key not in mine and other.get("name"):
            # Someone else's entry for this port (the chart's initial port): keep its name,
            # so that both applies agree and neither undoes the other on every sync.
            port["name"] = other["name"]
    wanted = {(p["port"], p["protocol"]) for p in desired}
    view = {key: {k: live[key].get(k) for k in ("name", "port", "targetPort", "protocol")} for key in live}
    if mine == wanted and all(view.get((p["port"], p["protocol"])) == p for p in desired):
        return False
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
    }
    if desired:
        body["spec"] = {"ports": desired}
    # No listeners: an apply without ports releases ours; the chart's fixed port remains.
    await client.apply(path, body, FIELD_MANAGER)
    log.info(
        "dataplane Service ports applied",
        extra=fields(service=f"{namespace}/{name}", ports=[p["port"] for p in desired]),
    )
    return True
