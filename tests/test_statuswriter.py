"""The status writer: writes only what differs, and reports the writes that failed."""

from __future__ import annotations

from typing import Any

import aiohttp

from controlplane.compiler import ObjectKey
from controlplane.compiler import conditions as c
from controlplane.statuswriter import StatusWriter
from controlplane.store import Store

from .helpers import load_yaml

ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: api, namespace: shop, generation: 1}
spec: {port: 8080, rules: [{backendRefs: [{name: web, port: 80}]}]}
"""
KEY = ObjectKey("L7Route", "shop", "api")


class FlakyClient:
    """Fails the first `failures` patches the way a dropped connection does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.patches: list[str] = []

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(path)
        if self.failures:
            self.failures -= 1
            raise aiohttp.ServerDisconnectedError()
        return body


async def test_a_failed_write_is_reported_then_written_again() -> None:
    store = Store()
    store.apply("L7Route", "ADDED", load_yaml(ROUTE)[0])
    client = FlakyClient(failures=1)
    writer = StatusWriter(client, store)  # type: ignore[arg-type]
    desired = {KEY: [c.condition(c.ACCEPTED, True, c.ACCEPTED, "serving HTTP on port 8080", 1)]}
    assert await writer.write_all(desired) == (0, {KEY})
    assert await writer.write_all(desired) == (1, set())
    assert store.status_of(KEY)[0]["reason"] == "Accepted"
    assert await writer.write_all(desired) == (0, set())  # already true: nothing written
    assert len(client.patches) == 2
