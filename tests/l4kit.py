"""Building blocks for L4 tests: backends on loopback, tables, a dataplane in the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table

from .helpers import compile_yaml, free_port, service


class Backend:
    """A TCP server on loopback that says its name on connect, then echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open.add(writer)
        try:
            writer.write(self.name.encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.open):
                writer.close()
            await self.server.wait_closed()
            self.server = None


def l4_table(port: int, backends: dict[str, list[int]], generation: int = 1, **spec: Any) -> Table:
    """A table with one L4Listener on port whose backendRefs are the named Services.

    backends maps a Service name to its endpoint ports on 127.0.0.1; spec adds fields,
    e.g. loadBalancing={"policy": "LeastConnections"} or weights={"a": 3}.
    """
    import json

    weights = spec.pop("weights", {})
    services = "---\n".join(
        service(name, 80, [("127.0.0.1", p) for p in ports]) for name, ports in backends.items()
    )
    refs = [{"name": name, "port": 80, "weight": weights.get(name, 1)} for name in backends]
    listener = {
        "apiVersion": "bilayer.dev/v1alpha1",
        "kind": "L4Listener",
        "metadata": {"name": f"l{port}", "namespace": "default"},
        "spec": {"port": port, "backendRefs": refs, **spec},
    }
    compiled = compile_yaml(services + "---\n" + json.dumps(listener), generation)
    assert compiled.statuses, compiled
    return compiled.table


async def read_name(reader: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()


@asynccontextmanager
async def running_dataplane(**settings: Any) -> AsyncIterator[Dataplane]:
    dataplane = Dataplane(Settings(address="127.0.0.1", **settings))
    try:
        yield dataplane
    finally:
        await dataplane.close(0)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def listener_port() -> int:
    return free_port()


def objects_table(listeners: dict[str, dict[str, Any]], services: str, generation: int = 1) -> Table:
    """A table from L4Listeners (name -> spec, in age order) and Services' YAML."""
    import json

    docs = [services]
    for i, (name, spec) in enumerate(listeners.items()):
        stamp = f"2026-01-01T00:00:{i:02d}Z"
        meta = {"name": name, "namespace": "default", "creationTimestamp": stamp}
        docs.append(
            json.dumps(
                {"apiVersion": "bilayer.dev/v1alpha1", "kind": "L4Listener", "metadata": meta, "spec": spec}
            )
        )
    compiled = compile_yaml("\n---\n".join(docs), generation)
    for key, conditions in compiled.statuses.items():
        assert conditions[0].status == "True", (key, conditions)
    return compiled.table


def services_yaml(backends: dict[str, list[int]], protocol: str = "TCP") -> str:
    """Services on port 80 (the given protocol) with endpoints on 127.0.0.1 at these ports."""
    if protocol == "TCP":
        return "---\n".join(
            service(name, 80, [("127.0.0.1", p) for p in ports]) for name, ports in backends.items()
        )
    docs = []
    for name, ports in backends.items():
        docs.append(
            f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: main, port: 80, targetPort: main, protocol: {protocol}}}]
"""
        )
        for i, target in enumerate(ports):
            docs.append(
                f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-{i}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: main, port: {target}, protocol: {protocol}}}]
endpoints:
- addresses: [127.0.0.1]
"""
            )
    return "---\n".join(docs)


def refs(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "port": 80} for name in names]
