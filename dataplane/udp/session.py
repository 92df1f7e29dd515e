"""One UDP session: a client's address and port, bound to one endpoint over a connected
socket of its own.

Both directions run in reader callbacks (``loop.add_reader``), reading into the listener's
one buffer and sending at once: no task, no transport and no buffer per datagram. UDP has
no backpressure: a datagram the kernel will not take now is dropped and counted, as a
router would.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..health import EndpointState
    from ..limits import Client
    from .listener import ServingUDP

BATCH = 64  # datagrams read per wakeup before other sockets get their turn

Address = tuple[str, int] | tuple[str, int, int, int]


class Session:
    """A client's session: its backend socket, counts, and how it ended."""

    __slots__ = (
        "answered",
        "backend_bytes",
        "backend_datagrams",
        "client",
        "client_bytes",
        "client_datagrams",
        "endpoint",
        "idle_since",
        "limited",
        "listener",
        "reason",
        "seen",
        "sock",
        "started",
    )

    def __init__(
        self,
        listener: ServingUDP,
        client: Address,
        endpoint: EndpointState,
        sock: socket.socket,
        limited: Client | None,
    ) -> None:
        self.listener = listener
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.limited = limited  # the client's entry in the per-client limits, if any
        self.client_datagrams = self.backend_datagrams = 0
        self.client_bytes = self.backend_bytes = 0
        self.answered = False
        self.started = self.idle_since = time.monotonic()
        self.seen = 0  # datagrams counted at the last idle sweep
        self.reason = ""

    @classmethod
    def open(
        cls, listener: ServingUDP, client: Address, endpoint: EndpointState, limited: Client | None
    ) -> Session:
        """Connect a socket to the endpoint (immediate for UDP) and start reading replies;
        raises OSError."""
        family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((endpoint.address, endpoint.port))
            session = cls(listener, client, endpoint, sock, limited)
            asyncio.get_running_loop().add_reader(sock.fileno(), session.replies)
        except BaseException:
            sock.close()
            raise
        return session

    def forward(self, data: memoryview) -> None:
        """A datagram from the client, to the endpoint."""
        self.client_datagrams += 1
        self.client_bytes += len(data)
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.listener.drops["backend_busy"] += 1
        except ConnectionRefusedError:
            # An ICMP port unreachable for an earlier datagram: nobody listens there.
            self.refused()
        except OSError as err:
            self.listener.drops["too_large" if err.errno == errno.EMSGSIZE else "send_failed"] += 1

    def replies(self) -> None:
        """The backend socket is readable: send what it holds to the client."""
        listener = self.listener
        buffer, view = listener.buffer, listener.view
        recv_into, sendto = self.sock.recv_into, listener.sock.sendto
        client, largest = self.client, listener.config.max_datagram
        for _ in range(BATCH):
            try:
                n = recv_into(buffer)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.refused()
                return
            except OSError:
                self.close("backend-error")
                return
            self.backend_datagrams += 1
            self.backend_bytes += n
            if not self.answered:
                self.answered = True
                listener.health.report_success(self.endpoint)
            if n > largest:
                listener.drops["too_large"] += 1
                continue
            try:
                sendto(view[:n], client)
            except BlockingIOError:
                listener.drops["client_busy"] += 1
            except OSError:
                listener.drops["send_failed"] += 1

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
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.listener.ended(self)
