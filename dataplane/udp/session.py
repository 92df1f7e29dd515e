"""One UDP session: a client's address and port, bound to one endpoint over a connected
socket of its own.

Both directions are datagram protocols on the event loop's transports: uvloop reads every
ready datagram in C and sends at once, so a datagram costs two callbacks and no task, no
buffer of ours. UDP has no backpressure: while a transport holds unsent datagrams
(``pause_writing``), further ones are dropped and counted, as a router would.

Not ``loop.add_reader`` and ``sock.recv`` in Python on the session's socket: tried, it
cost the same CPU per datagram (12.6 against 12.9 µs, bench/udp.py, back to back on a
busy machine, 2026-11-30) and answered no more queries/s (0.70x nginx against 0.86x), for
a socket and a reader of our own to manage.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from ..health import EndpointState
    from ..limits import Client
    from .listener import ServingUDP

# Datagrams a session keeps while its socket is being set up (one loop iteration).
STARTING_QUEUE = 8

Address = tuple[str, int] | tuple[str, int, int, int]


def pause_at_once(transport: asyncio.DatagramTransport) -> None:
    """pause_writing as soon as one datagram waits (uvloop's and asyncio's datagram
    transports both have the method; typeshed does not list it)."""
    transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]


class Session(asyncio.DatagramProtocol):
    """A client's session: its backend transport, counts, and how it ended."""

    __slots__ = (
        "answered",
        "backend_bytes",
        "backend_datagrams",
        "busy",
        "client",
        "client_bytes",
        "client_datagrams",
        "endpoint",
        "idle_since",
        "limited",
        "listener",
        "pending",
        "reason",
        "seen",
        "started",
        "transport",
    )

    def __init__(
        self, listener: ServingUDP, client: Address, endpoint: EndpointState, limited: Client | None
    ) -> None:
        self.listener = listener
        self.client = client
        self.endpoint = endpoint
        self.limited = limited  # the client's entry in the per-client limits, if any
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] | None = []  # until the transport is there
        self.busy = False  # the backend socket holds unsent datagrams
        self.client_datagrams = self.backend_datagrams = 0
        self.client_bytes = self.backend_bytes = 0
        self.answered = False
        self.started = self.idle_since = time.monotonic()
        self.seen = 0  # datagrams counted at the last idle sweep
        self.reason = ""

    async def connect(self) -> None:
        """Open the socket to the endpoint (connect is immediate for UDP) and its transport."""
        endpoint = self.endpoint
        family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((endpoint.address, endpoint.port))
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        except OSError as err:
            sock.close()
            self.listener.drops["socket_failed"] += 1
            self.listener.socket_failed(err)
            self.close("socket-failed")
        except BaseException:  # cancelled: the listener is going away
            sock.close()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.reason:  # closed while starting
            transport.close()
            return
        self.transport = cast(asyncio.DatagramTransport, transport)
        pause_at_once(self.transport)
        pending, self.pending = self.pending, None
        for data in pending or ():
            self.transport.sendto(data)

    def forward(self, data: bytes) -> None:
        """A datagram from the client, to the endpoint."""
        self.client_datagrams += 1
        self.client_bytes += len(data)
        transport = self.transport
        if transport is None:
            pending = self.pending
            if pending is not None and len(pending) < STARTING_QUEUE:
                pending.append(data)
            else:
                self.listener.drops["backend_busy"] += 1
        elif self.busy:
            self.listener.drops["backend_busy"] += 1
        else:
            transport.sendto(data)

    def datagram_received(self, data: bytes, _: object) -> None:
        """A reply from the endpoint, to the client from the listener's socket."""
        self.backend_datagrams += 1
        self.backend_bytes += len(data)
        listener = self.listener
        if not self.answered:
            self.answered = True
            listener.health.report_success(self.endpoint)
        if len(data) > listener.max_datagram:
            listener.drops["too_large"] += 1
        elif listener.busy:
            listener.drops["client_busy"] += 1
        else:
            listener.transport.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.refused()
        elif isinstance(exc, OSError) and exc.errno == errno.EMSGSIZE:
            self.listener.drops["too_large"] += 1
        else:
            self.listener.drops["send_failed"] += 1

    def pause_writing(self) -> None:
        self.busy = True

    def resume_writing(self) -> None:
        self.busy = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("backend-error" if exc is not None else "closed")

    def refused(self) -> None:
        """The endpoint refused (ICMP port unreachable): a passive health failure. The
        session ends, so the client's next datagram (a retry) starts one elsewhere."""
        self.listener.health.report_failure(self.endpoint)
        self.endpoint.connect_failures += 1
        self.listener.drops["backend_refused"] += 1
        self.close("backend-refused")

    def close(self, reason: str) -> None:
        if self.reason:
            return
        self.reason = reason
        if self.transport is not None:
            self.transport.close()
        self.listener.ended(self)
