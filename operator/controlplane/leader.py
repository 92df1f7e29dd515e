"""Leader election on a coordination.k8s.io Lease, following client-go's leaderelection.

Both operator replicas watch and keep a warm store; only the holder of the Lease
compiles, pushes and writes status. The rules (client-go's):
- lease duration 15 s > renew deadline 10 s > retry period 2 s;
- a Lease held by another replica counts as expired only when its record has not changed
  for a lease duration *by this replica's own clock*, measured from when this replica
  last saw it change: the other replica's renewTime is never compared with our clock
  (a standby whose clock ran 16 s ahead took a freshly renewed Lease);
- the leader renews every retry period; if it cannot renew within the renew deadline
  (each call is cancelled at that deadline, so one hung request cannot keep it acting)
  it steps down, and stays a candidate; it never exits;
- on shutdown the leader releases the Lease, so a standby takes over at its next try;
- every acquisition increments leaseTransitions: with the holder, that is the *term*
  that each push carries, and a dataplane refuses pushes from an older term.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataplane.logs import fields

from .kube import TRANSIENT, KubeClient, KubeError, resource_path

log = logging.getLogger("bilayer.leader")

JITTER = 1.2  # candidates retry every retry period times up to this factor


@dataclass(frozen=True)
class Term:
    """Who leads, and how many times leadership changed hands before."""

    transitions: int
    holder: str

    @property
    def header(self) -> str:
        return f"{self.transitions}/{self.holder}"


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wall() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def check_timing(lease_seconds: float, renew_deadline: float, retry_period: float) -> None:
    """ValueError unless the three durations can work together (client-go's rule)."""
    if not lease_seconds > renew_deadline > retry_period * JITTER:
        raise ValueError("lease duration > renew deadline > retry period (x1.2) is required")
    if lease_seconds != int(lease_seconds):
        # leaseDurationSeconds is an integer: 1.5 s would be written as 1 s, and others
        # would count the Lease expired while we still act.
        raise ValueError(f"the lease duration is whole seconds, not {lease_seconds}")


class Leader:
    """Acquires, renews and releases a Lease; reports the term held (None: not leading)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        identity: str,
        *,
        name: str = "bilayer-operator",
        lease_seconds: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[Term | None], None] = lambda term: None,
        wall: Callable[[], datetime.datetime] = _wall,
    ) -> None:
        check_timing(lease_seconds, renew_deadline, retry_period)
        self.client = client
        self.path = resource_path("coordination.k8s.io", "v1", "leases", namespace, name)
        self.collection = resource_path("coordination.k8s.io", "v1", "leases", namespace)
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.wall = wall  # only for what we write; expiry never reads it
        self.term: Term | None = None
        self._observed: tuple[Any, ...] | None = None  # the last Lease record seen
        self._observed_at = 0.0  # when it was seen to change, by the event loop's clock
        self._renewed_at = 0.0
        self._version: str | None = None
        self.holder: str | None = None  # holderIdentity seen by the last try (None: not read)

    @property
    def leading(self) -> bool:
        return self.term is not None

    async def run(self) -> None:
        """Candidate, leader, candidate again...; never returns."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                term = await self._try_quietly()
                if term is None:
                    await asyncio.sleep(self.retry_period * random.uniform(1.0, JITTER))
                    continue
                self._set(term)
                while True:
                    await asyncio.sleep(self.retry_period)
                    if not await self._renew(loop):
                        break
                self._set(None)
        finally:
            if self.term is not None:
                self._set(None)

    async def _renew(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Renew, retrying every retry period, until the renew deadline after the last
        successful renewal; False when that deadline passed (then step down)."""
        try:
            async with asyncio.timeout_at(self._renewed_at + self.renew_deadline):
                while True:
                    term = await self._try_quietly()
                    if term is not None and term == self.term:
                        return True
                    if term is not None:  # cannot happen: our own record changed under us
                        return False
                    if self.holder not in (None, "", self.identity):
                        # Not a failed try: another replica holds the Lease (we stalled past
                        # the lease and it took over). It acts now; we must not, not even
                        # until our deadline.
                        log.error(
                            "another replica holds the Lease; stepping down",
                            extra=fields(identity=self.identity, holder=self.holder),
                        )
                        return False
                    await asyncio.sleep(self.retry_period)
        except TimeoutError:
            log.error(
                "could not renew the Lease within the renew deadline; stepping down",
                extra=fields(identity=self.identity, deadline=self.renew_deadline),
            )
            return False

    def _set(self, term: Term | None) -> None:
        if term == self.term:
            return
        self.term = term
        if term is not None:
            log.info("leadership acquired", extra=fields(identity=self.identity, term=term.header))
        else:
            log.warning("leadership lost", extra=fields(identity=self.identity))
        self.on_change(term)

    async def _try_quietly(self) -> Term | None:
        try:
            # Bounded like a renewal, so a hung call cannot stall a candidate either.
            async with asyncio.timeout(self.renew_deadline):
                return await self.try_acquire_or_renew()
        except (KubeError, *TRANSIENT, ValueError) as err:
            log.warning("lease check failed", extra=fields(error=str(err) or repr(err)))
            return None

    async def try_acquire_or_renew(self) -> Term | None:
        """One attempt, as client-go's tryAcquireOrRenew: the term held after it, or None."""
        loop = asyncio.get_running_loop()
        # The renew deadline counts from here, before the request leaves: others may see
        # the record change as soon as it reaches the server, and count from then.
        sent = loop.time()
        now = _stamp(self.wall())
        self.holder = None
        lease = await self.client.get(self.path)
        if lease is None:
            spec = self._record(0, now, now)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                created = await self.client.create(self.collection, body)
            except KubeError as err:
                if err.status == 409:
                    return None  # another replica created it first
                raise
            return self._held(created, sent)
        spec = lease.get("spec") or {}
        record = self._view(spec)
        if record != self._observed:
            self._observed, self._observed_at = record, loop.time()
        holder = self.holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and loop.time() < self._observed_at + duration:
            return None  # held by another replica, and renewed within its lease duration
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity and self.term is not None:
            acquired = spec.get("acquireTime") or now
        else:
            # A new term, also when we held it before a restart: pushes of our old term
            # must be refused from now on.
            transitions, acquired = transitions + 1, now
        patch = {
            "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
            "spec": self._record(transitions, acquired, now),
        }
        try:
            # With metadata.resourceVersion in the patch, the API server refuses it (409)
            # if anyone wrote the Lease since we read it.
            updated = await self.client.patch(self.path, patch)
        except KubeError as err:
            if err.status == 409:
                return None
            raise
        return self._held(updated, sent)

    def _record(self, transitions: int, acquired: str, now: str) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "acquireTime": acquired,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    @staticmethod
    def _view(spec: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            spec.get(k)
            for k in (
                "holderIdentity",
                "leaseDurationSeconds",
                "acquireTime",
                "renewTime",
                "leaseTransitions",
            )
        )

    def _held(self, lease: dict[str, Any], at: float) -> Term:
        spec = lease.get("spec") or {}
        self._observed, self._observed_at, self._renewed_at = self._view(spec), at, at
        return Term(int(spec.get("leaseTransitions") or 0), self.identity)

    async def release(self) -> None:
        """Give the Lease up if we hold it (on shutdown, once run() has ended: a renewal
        racing the release could take it again): a standby takes it at its next try.
        Asks the Lease rather than our own view: a cancelled acquisition may have
        succeeded without our hearing of it."""
        self._set(None)
        try:
            lease = await self.client.get(self.path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = lease.get("spec") or {}
            await self.client.patch(
                self.path,
                {
                    "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
                    "spec": {
                        "holderIdentity": None,
                        "leaseDurationSeconds": 1,
                        "renewTime": _stamp(self.wall()),
                        "leaseTransitions": spec.get("leaseTransitions") or 0,
                    },
                },
            )
            log.info("lease released", extra=fields(identity=self.identity))
        except (KubeError, *TRANSIENT) as err:
            log.warning("could not release the Lease", extra=fields(error=str(err) or repr(err)))
