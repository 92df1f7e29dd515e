"""A real gRPC backend and client (grpcio) for tests, with no protoc step: generic handlers
that take and return raw bytes.

The server and the client run on grpcio's own threads (the synchronous API), so they never
share the test's event loop, which runs Bilayer on uvloop. Async tests call the client
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

SERVICE = "demo.Echo"
OTHER_SERVICE = "demo.Other"


@dataclass
class GrpcBackend:
    """demo.Echo with unary, server-, client- and bidirectional-streaming methods, and
    methods that fail or stall on request. Counts the calls each method took."""

    name: str = "grpc"
    port: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    # Flaky fails this many calls with UNAVAILABLE before answering.
    flaky_failures: int = 0
    seen_metadata: list[dict[str, str]] = field(default_factory=list)
    _server: grpc.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, port: int = 0) -> GrpcBackend:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        echo = {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
            "Sum": grpc.stream_unary_rpc_method_handler(self._sum),
            "Chat": grpc.stream_stream_rpc_method_handler(self._chat),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "Flaky": grpc.unary_unary_rpc_method_handler(self._flaky),
        }
        other = {"Who": grpc.unary_unary_rpc_method_handler(self._who)}
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, echo),
                grpc.method_handlers_generic_handler(OTHER_SERVICE, other),
            )
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def _note(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
            self.seen_metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.set_trailing_metadata((("x-backend", self.name),))

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note("Echo", context)
        return b"echo:" + request

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note("Who", context)
        return self.name.encode()

    def _count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._note("Count", context)
        for i in range(int(request)):
            yield b"%d" % i

    def _sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._note("Sum", context)
        return b"%d" % sum(int(r) for r in requests)

    def _chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._note("Chat", context)
        for r in requests:
            yield b"re:" + r

    def _sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sleeps the request's milliseconds, or until the call is cancelled."""
        self._note("Sleep", context)
        deadline = time.monotonic() + int(request) / 1000
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return b"slept"

    def _flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note("Flaky", context)
        with self._lock:
            failing = self.calls["Flaky"] <= self.flaky_failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"ok"


def channel(port: int) -> grpc.Channel:
    """A cleartext HTTP/2 channel (prior knowledge), as gRPC clients open them."""
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def method(name: str, service: str = SERVICE) -> str:
    return f"/{service}/{name}"
