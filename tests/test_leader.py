"""Leader election on a Lease, as client-go does it.

An in-memory Lease store (with resourceVersion checks, like the API server's) that can
hang or fail calls; short durations (lease 2 s > renew deadline 1 s > retry 0.2 s).
The real API server's side is in tests/test_envtest_operator.py (two replicas).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
from typing import Any

import aiohttp
import pytest

from controlplane.kube import KubeError
from controlplane.leader import Leader, Term

from .helpers import async_wait_for

LEASE = dict(lease_seconds=2, renew_deadline=1.0, retry_period=0.2)


class Leases:
    """One Lease, kept like the API server keeps it; calls can be made to hang or fail."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.hang = asyncio.Event()  # set: every call hangs
        self.fail = False  # every call fails as a dropped connection does
        self.delay = 0.0  # seconds each call takes
        self.calls = 0
        self.written = 0.0  # the event loop's time of the last write that succeeded

    async def _gate(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hang.is_set():
            await asyncio.Event().wait()
        if self.fail:
            raise aiohttp.ServerDisconnectedError()

    async def get(self, path: str) -> dict[str, Any] | None:
        await self._gate()
        return copy.deepcopy(self.lease)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._gate()
        if self.lease is not None:
            raise KubeError(409, "exists")
        self.version += 1
        self.written = asyncio.get_running_loop().time()
        self.lease = {
            **copy.deepcopy(body),
            "metadata": {**body["metadata"], "resourceVersion": str(self.version)},
        }
        return copy.deepcopy(self.lease)

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._gate()
        assert self.lease is not None
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "the object has been modified")
        self.version += 1
        self.written = asyncio.get_running_loop().time()
        spec = {k: v for k, v in {**self.lease["spec"], **body["spec"]}.items() if v is not None}
        self.lease = {
            **self.lease,
            "spec": spec,
            "metadata": {**self.lease["metadata"], "resourceVersion": str(self.version)},
        }
        return copy.deepcopy(self.lease)


class Replica:
    def __init__(self, leases: Leases, name: str, **options: Any) -> None:
        self.changes: list[Term | None] = []
        self.leader = Leader(leases, "ns", name, on_change=self.changes.append, **{**LEASE, **options})  # type: ignore[arg-type]
        self.task = asyncio.create_task(self.leader.run())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def stop_all(*replicas: Replica) -> None:
    for replica in replicas:
        await replica.stop()


async def test_one_leader_then_the_standby_takes_over_after_the_lease_expires() -> None:
    leases = Leases()
    a, b = Replica(leases, "a"), Replica(leases, "b")
    await async_wait_for(lambda: a.leader.leading or b.leader.leading, what="a leader")
    first, other = (a, b) if a.leader.leading else (b, a)
    for _ in range(10):  # a few retry periods: still one leader
        await asyncio.sleep(0.1)
        assert a.leader.leading != b.leader.leading
    assert first.leader.term == Term(0, first.leader.identity)
    await first.stop()  # dies without releasing
    loop = asyncio.get_running_loop()
    renewed = leases.written
    await async_wait_for(lambda: other.leader.leading, deadline_s=5, what="the standby to take over")
    # Not before a lease duration after the leader's last renewal: the standby saw that
    # change no earlier than it was written, and waits a lease duration from then. (Timed
    # from the stop instead, a loaded machine delaying the last renewal failed the test.)
    took_over = loop.time()
    assert leases.lease is not None
    assert took_over - renewed >= leases.lease["spec"]["leaseDurationSeconds"] == 2
    assert other.leader.term == Term(1, other.leader.identity)  # a new term
    await stop_all(other)


async def test_expiry_is_measured_on_the_observers_clock_not_by_comparing_with_renew_time() -> None:
    """A standby whose wall clock is 16 s ahead of the leader's does not take a Lease that
    is being renewed (before: it compared renewTime with its own clock and took it)."""
    leases = Leases()
    a = Replica(leases, "a")
    await async_wait_for(lambda: a.leader.leading, what="a to lead")
    ahead = Replica(
        leases, "b", wall=lambda: datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=16)
    )
    await asyncio.sleep(2.5)  # more than a lease duration of tries
    assert a.leader.leading and not ahead.leader.leading
    assert ahead.changes == []
    await stop_all(a, ahead)


async def test_a_hung_renewal_steps_down_within_the_renew_deadline_and_the_process_lives_on() -> None:
    leases = Leases()
    a = Replica(leases, "a")
    await async_wait_for(lambda: a.leader.leading, what="a to lead")
    loop = asyncio.get_running_loop()
    leases.hang.set()  # every call hangs from now on (before: one renew could hang 30 s)
    hung = loop.time()
    await async_wait_for(lambda: not a.leader.leading, deadline_s=3, what="a to step down")
    # Stepped down before the Lease expires for anyone else (lease 2 s after the last renewal).
    assert loop.time() - hung < 2.0
    assert a.changes[-1] is None and not a.task.done()  # a candidate again, not exited
    leases.hang.clear()
    await async_wait_for(lambda: a.leader.leading, deadline_s=5, what="a to lead again")
    assert a.leader.term == Term(1, "a")  # a new term: pushes of the old one are refused
    await stop_all(a)


async def test_failed_renewals_within_the_deadline_keep_leadership() -> None:
    leases = Leases()
    a = Replica(leases, "a")
    await async_wait_for(lambda: a.leader.leading, what="a to lead")
    leases.fail = True
    await asyncio.sleep(0.5)  # two or three failed renewals, within the 1 s deadline
    leases.fail = False
    await asyncio.sleep(1.0)
    assert a.changes == [Term(0, "a")]  # never lost
    await stop_all(a)


async def test_release_on_shutdown_hands_over_at_once() -> None:
    leases = Leases()
    a = Replica(leases, "a", lease_seconds=30, renew_deadline=20)
    await async_wait_for(lambda: a.leader.leading, what="a to lead")
    b = Replica(leases, "b", lease_seconds=30, renew_deadline=20)
    await asyncio.sleep(0.3)
    await a.stop()  # the leader loop ends first, then the release (Operator.stop does so)
    await a.leader.release()
    loop = asyncio.get_running_loop()
    released = loop.time()
    await async_wait_for(lambda: b.leader.leading, deadline_s=5, what="b to take over")
    assert loop.time() - released < 1.0  # a retry period, not the 30 s lease
    assert a.changes == [Term(0, "a"), None]
    await stop_all(b)


def test_durations_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="lease duration > renew deadline > retry period"):
        Leader(Leases(), "ns", "a", lease_seconds=10, renew_deadline=10, retry_period=2)  # type: ignore[arg-type]


def test_the_lease_duration_is_whole_seconds() -> None:
    """leaseDurationSeconds is an integer: a lease of 1.5 s was written as 1 s, the renew
    deadline itself, and a standby could take the Lease while the leader still acted
    (test_one_leader_then_the_standby_takes_over_after_the_lease_expires failed 3 runs in 7)."""
    with pytest.raises(ValueError, match="whole seconds"):
        Leader(Leases(), "ns", "a", lease_seconds=1.5, renew_deadline=1.0, retry_period=0.2)  # type: ignore[arg-type]


async def test_the_renew_deadline_counts_from_when_the_renewal_was_sent() -> None:
    """Others count the lease from when they see the record change, which can be as early
    as the moment our request reaches the server: our deadline counts from when we sent
    it, not from when the answer came back (0.6 s later here)."""
    leases = Leases()
    leases.delay = 0.3  # a GET and a CREATE: the answer comes 0.6 s after the request left
    leader = Leader(leases, "ns", "a", **LEASE)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    sent = loop.time()
    assert await leader.try_acquire_or_renew() == Term(0, "a")
    assert leader._renewed_at - sent < 0.05
    sent = loop.time()
    leader.term = Term(0, "a")
    assert await leader.try_acquire_or_renew() == Term(0, "a")  # a renewal: GET and PATCH
    assert leader._renewed_at - sent < 0.05


async def test_a_leader_that_sees_another_holder_steps_down_at_once() -> None:
    """Someone else holds the Lease (we stalled past our lease, and a standby took it):
    before, the renewal took that for a failed try and kept acting until its deadline."""
    leases = Leases()
    a = Replica(leases, "a", lease_seconds=10, renew_deadline=5)
    await async_wait_for(lambda: a.leader.leading, what="a to lead")
    assert leases.lease is not None
    leases.version += 1
    leases.lease["spec"]["holderIdentity"] = "b"
    leases.lease["spec"]["leaseTransitions"] += 1
    leases.lease["metadata"]["resourceVersion"] = str(leases.version)
    loop = asyncio.get_running_loop()
    taken = loop.time()
    await async_wait_for(lambda: not a.leader.leading, deadline_s=6, what="a to step down")
    assert loop.time() - taken < 1.0  # a retry period or two, not the 5 s renew deadline
    await stop_all(a)


async def test_the_operator_stops_its_leader_loop_before_it_releases_the_lease() -> None:
    """Operator.stop() released the Lease while the leader loop still ran: a renewal in
    flight then took the Lease again (a new term), the release's write lost the race,
    and the standby waited out a whole lease (5 runs in 60)."""
    from controlplane.cluster import Operator, OperatorSettings

    leases = Leases()
    operator = Operator(OperatorSettings(health_port=None), leases)  # type: ignore[arg-type]
    operator.leader = Leader(leases, "ns", "a", on_change=operator._leadership, **LEASE)  # type: ignore[arg-type]
    operator.supervisor.spawn("leader election", operator.leader.run)
    await async_wait_for(lambda: operator.leading, what="a to lead")
    leases.delay = 0.1  # each call takes a while: a renewal is in flight when we stop
    calls = leases.calls
    await async_wait_for(lambda: leases.calls > calls, what="a renewal in flight")
    await operator.stop()
    assert leases.lease is not None and "holderIdentity" not in leases.lease["spec"]
    assert leases.lease["spec"]["leaseTransitions"] == 0  # not taken again meanwhile


async def test_a_new_leader_writes_no_status_before_it_has_taken_over() -> None:
    """Leadership was acted on at once for status, while the take-over (asking every pod
    what it serves, up to 3 s) had not yet started the pushes: a status pass in that gap
    judged Programmed by what pods had acknowledged under the previous leader."""
    from controlplane.cluster import STATUS_TASK, Operator, OperatorSettings
    from controlplane.compiler import Snapshot, compile_snapshot

    from .golden import inputs

    settings = OperatorSettings(health_port=None, status_delay=0.01, status_settle=0.1)
    operator = Operator(settings, Leases())  # type: ignore[arg-type]
    asked = asyncio.Event()
    answer = asyncio.Event()

    async def discover_generation(within: float = 3.0) -> int:
        asked.set()
        await answer.wait()  # the pods take a while to answer
        return 0

    active_at_writes: list[bool] = []

    async def write_all(desired: dict[Any, Any]) -> tuple[int, set[Any]]:
        active_at_writes.append(operator.publisher.active)
        return 0, set()

    operator.publisher.discover_generation = discover_generation  # type: ignore[method-assign]
    operator.status.write_all = write_all  # type: ignore[method-assign]
    operator.latest = compile_snapshot(Snapshot.of(inputs("l7-basic")), 1)
    operator.supervisor.spawn(STATUS_TASK, operator._status_loop)
    operator._leadership(Term(1, "a"))
    await asyncio.wait_for(asked.wait(), 5)
    operator._status_due.set()  # e.g. a route changed
    # The status loop's turn, twice over, while the take-over waits for the pods.
    await async_wait_for(lambda: not operator._status_due.is_set(), what="the status loop to look")
    answer.set()
    await async_wait_for(lambda: active_at_writes, what="a status pass")
    assert all(active_at_writes), active_at_writes
    await operator.stop()
