"""Leader election on a Lease: one holder at a time, takeover after expiry."""

from __future__ import annotations

import asyncio

from controlplane.kube import Credentials, KubeClient
from controlplane.leader import Leader

from .helpers import async_wait_for
from .operator_kit import running_cluster


async def test_one_leader_and_takeover_after_expiry() -> None:
    async with running_cluster() as cluster:
        events: list[tuple[str, bool]] = []
        clients = [KubeClient(Credentials(server=cluster.url)) for _ in range(2)]
        leaders = [
            Leader(
                client,
                "bilayer-system",
                f"replica-{i}",
                lease_seconds=1,
                renew_seconds=0.1,
                on_change=lambda leading, i=i: events.append((f"replica-{i}", leading)),
            )
            for i, client in enumerate(clients)
        ]
        tasks = [asyncio.create_task(leader.run()) for leader in leaders]
        await async_wait_for(lambda: any(leader.leading for leader in leaders), what="a leader")
        await asyncio.sleep(0.5)
        assert sum(leader.leading for leader in leaders) == 1  # never two
        first = next(leader for leader in leaders if leader.leading)
        other = next(leader for leader in leaders if leader is not first)
        tasks[leaders.index(first)].cancel()  # the leader dies without releasing
        await async_wait_for(lambda: other.leading, deadline_s=10, what="the standby to take over")
        lease = await cluster.api.get(
            "/apis/coordination.k8s.io/v1/namespaces/bilayer-system/leases/bilayer-operator"
        )
        assert lease is not None and lease["spec"]["holderIdentity"] == other.identity
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
