"""A tunnel after a 101 (WebSocket): the client's socket and the backend's become a byte pair.

The two transports switch protocol to the L4 path's paired sides (dataplane/pair.py), so a
tunnel gets the same flow control (a side whose peer is slow stops reading), half-close and
idle timeout as an L4 connection. Bytes either side sent before the switch go first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..pair import Pair, Side

if TYPE_CHECKING:
    from ..health import EndpointState
    from .client import ClientConnection


class Tunnel(Pair):
    """The byte pair of one upgraded connection."""

    __slots__ = ("conn", "endpoint")

    # A WebSocket silent both ways for the idle timeout is dead or stuck: reset it, so no
    # kernel buffer waits on a peer that stopped reading.
    ABORT_WHEN_IDLE = True

    def __init__(
        self,
        conn: ClientConnection,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        client_early: bytes,
        backend_early: bytes,
        idle_timeout: float,
        endpoint: EndpointState,
    ) -> None:
        super().__init__(idle_timeout)
        self.conn = conn
        self.endpoint = endpoint  # its `active` count was taken by the exchange
        backend_side = Side(self)
        for side, transport, early in (
            (self.client, client, client_early),
            (backend_side, backend, backend_early),
        ):
            side.attach(transport)
            transport.set_protocol(side)
            side.early = early
        self.start(backend_side)

    def ended(self) -> None:
        self.endpoint.active -= 1
        self.conn.tunnel_ended()
