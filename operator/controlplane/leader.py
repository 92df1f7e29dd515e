"""Leader election on a coordination.k8s.io Lease, as controller-runtime does it.

Both operator replicas watch and keep a warm store; only the holder of the Lease
compiles, pushes and writes status. A leader that cannot renew in time steps down
before the Lease expires, so two replicas never act at once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from dataplane.logs import fields

from .kube import KubeClient, KubeError, resource_path

log = logging.getLogger("bilayer.leader")


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(stamp: str | None) -> datetime.datetime | None:
    if not stamp:
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


class Leader:
    """Acquires and renews a Lease; reports changes of leadership."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        identity: str,
        *,
        name: str = "bilayer-operator",
        lease_seconds: float = 15.0,
        renew_seconds: float = 5.0,
        on_change: Callable[[bool], None] = lambda leading: None,
    ) -> None:
        self.client = client
        self.path = resource_path("coordination.k8s.io", "v1", "leases", namespace, name)
        self.collection = resource_path("coordination.k8s.io", "v1", "leases", namespace)
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.on_change = on_change
        self.leading = False

    async def run(self) -> None:
        while True:
            try:
                leading = await self._try()
            except (KubeError, OSError, TimeoutError) as err:
                log.warning("lease check failed", extra=fields(error=str(err)))
                leading = False
            if leading != self.leading:
                self.leading = leading
                log.info(
                    "leadership " + ("acquired" if leading else "lost"), extra=fields(identity=self.identity)
                )
                self.on_change(leading)
            await asyncio.sleep(self.renew_seconds)

    async def _try(self) -> bool:
        now = _now()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "renewTime": _stamp(now),
        }
        lease = await self.client.get(self.path)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _stamp(now)},
            }
            try:
                await self.client.create(self.collection, body)
            except KubeError as err:
                if err.status == 409:
                    return False  # another replica created it first
                raise
            return True
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        renewed = _parse(current.get("renewTime"))
        duration = float(current.get("leaseDurationSeconds") or self.lease_seconds)
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder != self.identity and not expired:
            return False
        patch: dict[str, object] = {
            "spec": spec if holder == self.identity else {**spec, "acquireTime": _stamp(now)}
        }
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version:
            # The API server refuses the patch if someone else wrote the Lease meanwhile.
            patch["metadata"] = {"resourceVersion": version}
        try:
            await self.client.patch(self.path, patch)
        except KubeError as err:
            if err.status == 409:
                return False
            raise
        return True
