"""gRPC through Bilayer, end to end with real grpcio clients and servers: the client speaks
HTTP/2 with prior knowledge to an L7 port, Bilayer forwards each call as an HTTP/2 stream
to an h2c backend (a Service port with appProtocol kubernetes.io/h2c), and back.

Unary, server-, client- and bidirectional-streaming calls; deadlines (the client's
grpc-timeout and the route's timeout); UNAVAILABLE for a dead backend; retries on gRPC
status codes; answers Bilayer makes itself shaped as gRPC (no route: UNIMPLEMENTED)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest

from dataplane.runtime import Dataplane

from .grpckit import OTHER_SERVICE, SERVICE, GrpcBackend, channel, method
from .helpers import free_port, service
from .l7kit import backend_ref, l7_table, route, serving

T = TypeVar("T")


def h2c_service(name: str, ports: list[int]) -> str:
    """A Service whose port says it speaks HTTP/2 cleartext (Gateway API's appProtocol)."""
    return service(name, 80, [("127.0.0.1", p) for p in ports]).replace(
        "targetPort: main}", "targetPort: main, appProtocol: kubernetes.io/h2c}", 1
    )


@asynccontextmanager
async def proxied(
    rules: list[dict[str, Any]], backends: dict[str, list[int]], **settings: Any
) -> AsyncIterator[tuple[int, Dataplane]]:
    port = free_port()
    services = "---\n".join(h2c_service(name, ports) for name, ports in backends.items())
    table = l7_table([route("grpc", port, rules)], {}, extra=services)
    async with serving(table, **settings) as dataplane:
        yield port, dataplane


async def call(fn: Callable[[], T]) -> T:
    """A blocking grpcio call, off the loop that runs Bilayer."""
    return await asyncio.to_thread(fn)


def code_of(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def backend() -> Any:
    server = GrpcBackend("a").start()
    yield server
    server.stop()


async def test_unary_and_streaming_calls_pass_through(backend: GrpcBackend) -> None:
    async with proxied([{"backendRefs": [backend_ref("grpc")]}], {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            reply, unary = await call(lambda: ch.unary_unary(method("Echo")).with_call(b"hi", timeout=5))
            assert reply == b"echo:hi"
            # Trailers (grpc-status and the backend's trailing metadata) came back through.
            assert ("x-backend", "a") in [(m.key, m.value) for m in unary.trailing_metadata()]
            assert await call(lambda: list(ch.unary_stream(method("Count"))(b"50", timeout=5))) == [
                b"%d" % i for i in range(50)
            ]
            numbers = [b"%d" % i for i in range(100)]
            assert await call(lambda: ch.stream_unary(method("Sum"))(iter(numbers), timeout=5)) == b"4950"
            words = [b"w%d" % i for i in range(20)]
            assert await call(lambda: list(ch.stream_stream(method("Chat"))(iter(words), timeout=5))) == [
                b"re:" + w for w in words
            ]
    assert backend.calls == {"Echo": 1, "Count": 1, "Sum": 1, "Chat": 1}


async def test_many_concurrent_calls_on_one_client_connection(backend: GrpcBackend) -> None:
    async with proxied([{"backendRefs": [backend_ref("grpc")]}], {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            echo = ch.unary_unary(method("Echo"))
            replies = await asyncio.gather(
                *(call(lambda i=i: echo(b"%d" % i, timeout=10)) for i in range(200))  # type: ignore[misc]
            )
    assert replies == [b"echo:%d" % i for i in range(200)]


async def test_a_client_deadline_ends_the_call_with_deadline_exceeded(backend: GrpcBackend) -> None:
    async with proxied([{"backendRefs": [backend_ref("grpc")]}], {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            sleep = ch.unary_unary(method("Sleep"))
            code, _ = await call(lambda: code_of(lambda: sleep(b"5000", timeout=0.5)))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The proxy forwarded the deadline and cancelled the backend's call when it passed.
    assert backend.calls["Sleep"] == 1


async def test_the_route_timeout_answers_deadline_exceeded_from_the_proxy(backend: GrpcBackend) -> None:
    rules = [{"backendRefs": [backend_ref("grpc")], "timeouts": {"request": "300ms"}}]
    async with proxied(rules, {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            sleep = ch.unary_unary(method("Sleep"))
            code, _ = await call(lambda: code_of(lambda: sleep(b"5000", timeout=30)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_dead_backend_is_unavailable() -> None:
    dead = free_port()  # nothing listens there
    async with proxied([{"backendRefs": [backend_ref("grpc")]}], {"grpc": [dead]}) as (port, _):
        with channel(port) as ch:
            echo = ch.unary_unary(method("Echo"))
            code, _ = await call(lambda: code_of(lambda: echo(b"hi", timeout=5)))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_call_nothing_routes_is_unimplemented(backend: GrpcBackend) -> None:
    rules = [{"matches": [{"grpc": {"service": OTHER_SERVICE}}], "backendRefs": [backend_ref("grpc")]}]
    async with proxied(rules, {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            assert await call(lambda: ch.unary_unary(method("Who", OTHER_SERVICE))(b"", timeout=5)) == b"a"
            code, _ = await call(lambda: code_of(lambda: ch.unary_unary(method("Echo"))(b"", timeout=5)))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert backend.calls["Echo"] == 0


async def test_unavailable_answers_are_retried_when_the_route_lists_them(backend: GrpcBackend) -> None:
    backend.flaky_failures = 2
    rules = [
        {
            "backendRefs": [backend_ref("grpc")],
            "retry": {"attempts": 3, "codes": [], "grpcCodes": ["UNAVAILABLE"], "backoff": "10ms"},
        }
    ]
    async with proxied(rules, {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            assert await call(lambda: ch.unary_unary(method("Flaky"))(b"", timeout=5)) == b"ok"
    assert backend.calls["Flaky"] == 3


async def test_without_a_retry_policy_unavailable_reaches_the_client(backend: GrpcBackend) -> None:
    backend.flaky_failures = 1
    async with proxied([{"backendRefs": [backend_ref("grpc")]}], {"grpc": [backend.port]}) as (port, _):
        with channel(port) as ch:
            code, details = await call(
                lambda: code_of(lambda: ch.unary_unary(method("Flaky"))(b"", timeout=5))
            )
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "not yet")
    assert backend.calls["Flaky"] == 1


async def test_calls_are_routed_by_service_and_method() -> None:
    """GRPCRoute-style matches: one method of a service to one backend, the rest of the
    service to another."""
    a, b = GrpcBackend("a").start(), GrpcBackend("b").start()
    try:
        rules = [
            {
                "matches": [{"grpc": {"service": SERVICE, "method": "Echo"}}],
                "backendRefs": [backend_ref("a")],
            },
            {"matches": [{"grpc": {"service": SERVICE}}], "backendRefs": [backend_ref("b")]},
        ]
        async with proxied(rules, {"a": [a.port], "b": [b.port]}) as (port, _):
            with channel(port) as ch:
                for _ in range(3):
                    await call(lambda: ch.unary_unary(method("Echo"))(b"x", timeout=5))
                    await call(lambda: list(ch.unary_stream(method("Count"))(b"2", timeout=5)))
    finally:
        a.stop()
        b.stop()
    assert (a.calls, b.calls) == ({"Echo": 3}, {"Count": 3})
