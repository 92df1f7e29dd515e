"""The socketpair between the supervisor and a worker (dataplane.workers): length-prefixed
messages, and listening sockets passed beside them."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from .health import EndpointState

# A message on a worker's socketpair: payload length, kind, payload.
FRAME = struct.Struct("!IB")
MAX_FDS_PER_MESSAGE = 200  # the kernel takes at most 253 descriptors in one SCM_RIGHTS

# Supervisor to worker.
SETTINGS, TABLE, DELTA, SOCKETS, MARK, METRICS, STOP, ROLLBACK = 1, 2, 3, 4, 5, 6, 7, 8
# Worker to supervisor.
HELLO, APPLIED, REFUSED, SAMPLES, EJECTED = 10, 11, 12, 13, 14


class Channel:
    """Length-prefixed messages on a stream socket, and descriptors sent beside them (a
    descriptor rides on the first byte of its message, so it has arrived by the time the
    message has)."""

    def __init__(
        self, sock: socket.socket, on_message: Callable[[int, bytes], None], on_closed: Callable[[], None]
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.on_closed = on_closed
        self.buffer = bytearray()
        self.fds: deque[int] = deque()
        self.closed = False
        self._sending = asyncio.Lock()
        self._waiting: asyncio.Future[None] | None = None
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            self.close()
            self.on_closed()
            return
        self.buffer += data
        while len(self.buffer) >= FRAME.size:
            length, kind = FRAME.unpack_from(self.buffer)
            end = FRAME.size + length
            if len(self.buffer) < end:
                break
            payload = bytes(self.buffer[FRAME.size : end])
            del self.buffer[:end]
            self.on_message(kind, payload)
            if self.closed:
                return

    def take_fds(self, count: int) -> list[int]:
        return [self.fds.popleft() for _ in range(min(count, len(self.fds)))]

    async def send(self, kind: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send one message; OSError when the peer is gone."""
        data = memoryview(FRAME.pack(len(payload), kind) + payload)
        async with self._sending:
            while fds:
                try:
                    socket.send_fds(self.sock, [data[:1]], fds)
                    data = data[1:]
                    break
                except (BlockingIOError, InterruptedError):
                    await self._writable()
            while data:
                try:
                    data = data[self.sock.send(data) :]
                except (BlockingIOError, InterruptedError):
                    await self._writable()

    async def _writable(self) -> None:
        if self.closed:
            raise ConnectionResetError("the channel is closed")
        self._waiting = ready = self.loop.create_future()
        self.loop.add_writer(self.sock.fileno(), self._wake)
        try:
            await ready
        finally:
            self._waiting = None
            if not self.closed:
                self.loop.remove_writer(self.sock.fileno())

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_exception(ConnectionResetError("the channel is closed"))
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def mark(state: EndpointState, *, healthy: bool | None) -> bytes:
    protocol = "udp" if state.key.endswith("/udp") else "tcp"
    return encode(
        {
            "address": state.address,
            "port": state.port,
            "protocol": protocol,
            "healthy": healthy,
            "ejectedUntil": state.ejected_until,
        }
    )
