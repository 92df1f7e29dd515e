"""GitOps and the operator share the dataplane Service on a real API server: the chart's
render (applied by a GitOps tool, server-side or client-side) owns the fixed port, the
operator's server-side apply owns the listener ports, and neither apply undoes the other."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from .envtest import ApiServer
from .envtest_kit import RELEASE, EnvCluster, env_cluster, helm_template, kubectl
from .helpers import async_wait_for, free_port
from .test_envtest_operator import l4listener, l7route

pytestmark = pytest.mark.timeout(240)
SERVICE = f"{RELEASE}-dataplane"


async def _ports(cluster: EnvCluster) -> dict[tuple[int, str], dict[str, Any]]:
    service = await cluster.get("Service", SERVICE, cluster.namespace) or {}
    return {(p["port"], p["protocol"]): p for p in service["spec"]["ports"]}


def _managers(service: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(manager, operation) -> the port keys it owns."""
    owned: dict[tuple[str, str], set[str]] = {}
    for entry in service["metadata"]["managedFields"]:
        ports = entry.get("fieldsV1", {}).get("f:spec", {}).get("f:ports", {})
        keys = {k for k in ports if k.startswith("k:")}
        if keys:
            owned[(entry["manager"], entry["operation"])] = keys
    return owned


async def test_a_gitops_sync_and_the_operator_keep_each_others_ports(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    async with env_cluster(apiserver, tmp_path) as cluster:
        # The chart's Service as a GitOps tool applies it (NodePort, to see node ports kept),
        # in place of the copy the test harness installed.
        rendered = helm_template(
            cluster.namespace,
            *("--set", "service.type=NodePort"),
            *("--set", f"operator.watchNamespaces={{{cluster.apps}}}"),
        )
        (service,) = [o for o in rendered if o["kind"] == "Service" and o["metadata"]["name"] == SERVICE]
        await cluster.delete("Service", SERVICE, cluster.namespace)
        manifest = tmp_path / "service.yaml"
        manifest.write_text(yaml.safe_dump(service))

        def sync(*how: str) -> None:
            kubectl(apiserver, tmp_path, "apply", *how, "-f", str(manifest))

        await asyncio.to_thread(sync, "--server-side", "--field-manager=gitops")
        chart_port = (80, "TCP")
        assert set(await _ports(cluster)) == {chart_port}

        await cluster.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80}]},
            }
        )
        cluster.start_operator()
        tcp, http = free_port(), free_port()
        await cluster.create(l4listener("tcp", tcp))
        await cluster.create(l7route("api", http))
        everything = {chart_port, (tcp, "TCP"), (http, "TCP")}

        async def all_there() -> bool:
            return set(await _ports(cluster)) == everything

        await async_wait_for(all_there, 30, what="the listener ports next to the chart's")
        before = await _ports(cluster)
        assert (
            before[(tcp, "TCP")]["name"] == f"tcp-{tcp}" and before[(http, "TCP")]["name"] == f"http-{http}"
        )
        node_ports = {key: port["nodePort"] for key, port in before.items()}
        assert all(node_ports.values())

        # GitOps syncs the unchanged render again: server-side apply by its own manager,
        # then a plain (client-side) kubectl apply. Ports, names and node ports all stay.
        for how in (("--server-side", "--field-manager=gitops"), ()):
            await asyncio.to_thread(sync, *how)
            after = await _ports(cluster)
            assert after == before, how

        # Each owns its own: the operator's apply entry holds the listener ports only.
        live = await cluster.get("Service", SERVICE, cluster.namespace) or {}
        owned = _managers(live)
        assert owned[("bilayer-operator", "Apply")] == {
            f'k:{{"port":{tcp},"protocol":"TCP"}}',
            f'k:{{"port":{http},"protocol":"TCP"}}',
        }
        assert 'k:{"port":80,"protocol":"TCP"}' in owned[("gitops", "Apply")]

        # A listener removed: its port goes (the operator's apply releases it), the
        # chart's and the other listener's stay with their node ports.
        await cluster.delete("L4Listener", "tcp")

        async def tcp_gone() -> bool:
            return set(await _ports(cluster)) == everything - {(tcp, "TCP")}

        await async_wait_for(tcp_gone, 30, what="the removed listener's port to go")
        remaining = await _ports(cluster)
        assert {key: port["nodePort"] for key, port in remaining.items()} == {
            key: node_ports[key] for key in remaining
        }
