"""The operator on a real kube-apiserver + etcd, under the chart's RBAC (see envtest_kit)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .envtest import ApiServer
from .envtest_kit import EnvCluster, env_cluster, fetch, kubectl, netns_available
from .helpers import async_wait_for, free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def netns() -> None:
    why = netns_available()
    if why:
        pytest.skip(why)


def l7route(name: str, port: int, service: str = "web", path: str = "/") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L7Route",
        "metadata": {"name": name},
        "spec": {
            "port": port,
            "rules": [
                {"matches": [{"path": {"value": path}}], "backendRefs": [{"name": service, "port": 80}]}
            ],
        },
    }


def l4listener(name: str, port: int, service: str = "web") -> dict[str, object]:
    return {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": name},
        "spec": {"port": port, "backendRefs": [{"name": service, "port": 80}]},
    }


async def service_ports(cluster: EnvCluster) -> list[int]:
    service = await cluster.get("Service", "bilayer-dataplane", cluster.namespace) or {}
    return sorted(p["port"] for p in service["spec"]["ports"])


async def test_lifecycle_on_the_real_api_server(apiserver: ApiServer, tmp_path: Path, netns: None) -> None:
    """Both kinds created, updated, deleted; status by the real server; traffic through
    fresh pods that become Ready only once the operator has pushed them a table."""
    async with env_cluster(apiserver, tmp_path, cluster_wide=True) as cluster:
        web, other = cluster.backend("web"), cluster.backend("other")
        await cluster.service("web", [web])
        pods = [await cluster.add_pod(), await cluster.add_pod()]
        operator = cluster.start_operator()
        http, tcp = free_port(), free_port()
        await cluster.create(l7route("api", http))
        programmed = await cluster.wait_condition("L7Route", "api", "Programmed", generation=1)
        assert programmed["reason"] == "Programmed"
        for pod in pods:  # fresh pods: pushed though not Ready, then Ready (readiness = a table)
            await cluster.serves(pod, http, "web")
            await async_wait_for(lambda pod=pod: pod.probe("/readyz") == 200, what="ready")
        conditions = await cluster.conditions("L7Route", "api")
        assert conditions["Accepted"]["status"] == "True" and conditions["ResolvedRefs"]["status"] == "True"

        # Printer columns, as a user sees them.
        table = await asyncio.to_thread(kubectl, apiserver, tmp_path, "get", "l7routes", "-n", cluster.apps)
        header, row = table.splitlines()[:2]
        assert header.split() == ["NAME", "PORT", "HOSTNAMES", "ACCEPTED", "PROGRAMMED", "AGE"]
        assert row.split()[:2] == ["api", str(http)] and row.split()[-3:-1] == ["True", "True"]

        # Update: generation 2 is programmed, traffic follows.
        await cluster.patch(
            "L7Route",
            "api",
            {
                "spec": {
                    "rules": [
                        {
                            "matches": [{"path": {"value": "/v2"}}],
                            "backendRefs": [{"name": "web", "port": 80}],
                        }
                    ]
                }
            },
        )
        await cluster.wait_condition("L7Route", "api", "Programmed", generation=2)
        assert (await asyncio.to_thread(fetch, pods[0].address, http, "/"))[0] == 404

        # An L4Listener; the dataplane Service gets its port.
        await cluster.create(l4listener("tcp", tcp))
        await cluster.wait_condition("L4Listener", "tcp", "Programmed")
        await cluster.serves(pods[1], tcp, "web")
        await async_wait_for(lambda: _ports_are(cluster, [http, tcp]), what="Service ports")

        # EndpointSlice change: traffic moves to the other backend.
        await cluster.patch("EndpointSlice", "web-1", {"endpoints": [{"addresses": [other.address]}]})
        await cluster.serves(pods[0], tcp, "other")

        # Delete both: listeners gone on every pod, the Service keeps one port (it needs one).
        await cluster.delete("L7Route", "api")
        await cluster.delete("L4Listener", "tcp")
        for pod in pods:
            await async_wait_for(lambda pod=pod: not pod.served()["listeners"], what="listeners removed")

        # The operator's own endpoints.
        assert operator.get("/healthz")[0] == 200 and operator.get("/readyz")[0] == 200
        assert operator.metric("bilayer_operator_leader") == 1
        assert operator.metric("bilayer_operator_pushes_total") >= 4
        assert operator.metric("bilayer_operator_status_writes_total") >= 3


async def _ports_are(cluster: EnvCluster, ports: list[int]) -> bool:
    return await service_ports(cluster) == sorted(ports)
