"""What every running listener (L4 and L7) has: its server, its open connections, and
waiting for them to end when it drains."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from .runtime import Settings

C = TypeVar("C")


# Compiled (compiled-modules.txt) for ServingL7, whose attributes the request path reads;
# ServingL4 may stay interpreted Python, which a compiled class must allow explicitly.
@mypyc_attr(allow_interpreted_subclasses=True)
class Serving(Generic[C]):
    """The shared half of ServingL4 and ServingL7."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[C] = set()
        self._emptied: asyncio.Event | None = None  # only while draining

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    def forget(self, conn: C) -> None:
        """A connection ended."""
        self.connections.discard(conn)
        if not self.connections and self._emptied is not None:
            self._emptied.set()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def wait_idle(self, grace: float) -> None:
        """Until every connection has ended, or grace seconds."""
        if not self.connections:
            return
        self._emptied = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._emptied.wait()


def listen_on(settings: Settings, address: str, port: int) -> dict[str, Any]:
    """The create_server arguments that put a TCP listener on port: the socket the
    supervisor handed this worker, or a bind of its own (SO_REUSEPORT in a worker)."""
    shared = settings.listening_sockets.get(port)
    if shared is not None:  # kept: a listener reopened on the port (L4 to L7) needs it again
        return {"sock": shared.dup()}
    return {"host": address, "port": port, "reuse_address": True, "reuse_port": settings.reuse_port or None}
