"""The admin token the operator writes into the chart's Secret, on a real API server under
the chart's RBAC: two replicas starting at once settle on one token."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from controlplane.admintoken import ensure_token
from controlplane.kube import Credentials, KubeClient, KubeError

from .envtest import ApiServer
from .envtest_kit import RELEASE, env_cluster, helm_template

pytestmark = pytest.mark.timeout(120)


async def test_replicas_starting_together_write_one_token(apiserver: ApiServer, tmp_path: Path) -> None:
    async with env_cluster(apiserver, tmp_path) as cluster:
        (secret,) = [o for o in helm_template(cluster.namespace) if o["kind"] == "Secret"]
        assert "data" not in secret  # the render holds no token: two renders are the same
        name = secret["metadata"]["name"]
        await cluster.create(secret)
        token = await cluster.token()  # the chart's operator ServiceAccount
        clients = [
            KubeClient(Credentials(server=apiserver.url, token=token, ca_path=str(apiserver.ca_path)))
            for _ in range(3)
        ]
        try:
            first = await asyncio.gather(*(ensure_token(c, cluster.namespace, name) for c in clients))
            assert len(set(first)) == 1 and len(first[0]) >= 32
            stored = await cluster.get("Secret", name, cluster.namespace)
            assert stored is not None
            assert base64.b64decode(stored["data"]["token"]).decode() == first[0]
            # A restarted operator reads the same token, and the RBAC grants no other Secret.
            assert await ensure_token(clients[0], cluster.namespace, name) == first[0]
            with pytest.raises(KubeError) as refused:
                await ensure_token(clients[0], cluster.namespace, f"{RELEASE}-other")
            assert refused.value.status == 403
        finally:
            for client in clients:
                await client.close()
