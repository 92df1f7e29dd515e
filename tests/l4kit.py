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
