"""gRPC calls through Bilayer (HTTP/1.1 clients, an h2c backend): the proxy's own answers are
trailers-only gRPC responses, grpc-timeout bounds the call and reaches the backend reduced,
statuses listed in retry.grpcCodes are resent while nothing of the answer has left."""

from __future__ import annotations

import json
import time
from typing import Any

from dataplane.table import Table

from .h2backend import H2Backend
from .helpers import free_port
from .l7kit import backend_ref, l7_table, route, serving
from .rawkit import RawBackend
from .test_l7_upstream_h2 import ask, h2_table

HELLO = b"\x00\x00\x00\x00\x02hi"  # one gRPC message


def call(path: str, *, timeout: bytes | None = None, body: bytes = HELLO) -> bytes:
    extra = b"grpc-timeout: %s\r\n" % timeout if timeout is not None else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: api\r\nContent-Type: application/grpc\r\nTE: trailers\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(body), body)
    )


def with_grpc_codes(table: Table, codes: list[int]) -> Table:
    """The table with every rule's retry listing codes (the compiler's field is a later change)."""
    data: dict[str, Any] = table.model_dump(by_alias=True)
    for listener in data["listeners"].values():
        for rule in listener["l7"]["rules"].values():
            rule["retry"]["grpcCodes"] = codes
    return Table.model_validate(data)


async def test_a_call_with_no_endpoint_to_reach_gets_unavailable() -> None:
    port = free_port()
    async with serving(h2_table(port, free_port())):  # nothing listens there
        status, headers, body = await ask(port, call("/pkg.Svc/Get"))
        plain, _, _ = await ask(port, b"POST /pkg.Svc/Get HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n")
    assert (status, headers["content-type"], headers["grpc-status"]) == (200, "application/grpc", "14")
    assert headers["grpc-message"].startswith("could not connect to the backend")
    assert headers["content-length"] == "0" and body == b""
    assert plain == 503  # the same failure, for a client that is not gRPC


async def test_a_call_with_no_route_gets_unimplemented() -> None:
    port = free_port()
    rules = [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/pkg.Other"}}],
            "backendRefs": [backend_ref("h2")],
        }
    ]
    async with serving(l7_table([route("r", port, rules)], {"h2": [free_port()]})):
        status, headers, _ = await ask(port, call("/pkg.Svc/Get"))
    assert (status, headers["grpc-status"]) == (200, "12")
    assert headers["grpc-message"] == "no route for this host and path"


async def test_grpc_timeout_bounds_the_call_and_reaches_the_backend_reduced() -> None:
    backend = await H2Backend().start()
    port = free_port()
    try:
        async with serving(h2_table(port, backend.port)):
            began = time.monotonic()
            status, headers, _ = await ask(port, call("/grpc/slow/5000", timeout=b"300m"))
            took = time.monotonic() - began
            ok, _, body = await ask(port, call("/grpc/echo", timeout=b"5S"))
    finally:
        await backend.stop()
    assert (status, headers["grpc-status"]) == (200, "4")
    assert took < 5  # cut by the call's deadline, not the backend's answer
    seen = json.loads(body[5:])
    forwarded = dict(seen["headers"])["grpc-timeout"]
    assert ok == 200 and forwarded.endswith("u") and 0 < int(forwarded[:-1]) < 5_000_000


async def test_a_listed_grpc_status_is_resent_in_trailers_only_or_trailers() -> None:
    backend = await H2Backend().start()
    port = free_port()
    retry = {"retry": {"attempts": 2, "codes": [], "backoff": "1ms"}}
    try:
        async with serving(with_grpc_codes(h2_table(port, backend.port, **retry), [14])):
            status, headers, body = await ask(port, call("/grpc/fail/2/14"))
            assert (status, body) == (200, HELLO)
            assert "grpc-status" not in headers  # (in the trailers of the third answer)
            status, _, body = await ask(port, call("/grpc/late/1/14"))
            assert (status, body) == (200, HELLO)
            status, headers, body = await ask(port, call("/grpc/fail/1/3"))  # not listed
            assert (status, headers["grpc-status"], body) == (200, "3", b"")
    finally:
        await backend.stop()
    assert backend.counts == {"/grpc/fail/2/14": 3, "/grpc/late/1/14": 2, "/grpc/fail/1/3": 1}


async def test_an_http1_backends_trailers_carry_the_status_too() -> None:
    """A chunked HTTP/1.1 answer whose grpc-status is in its trailer section: read, so the
    call is resent."""
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\ngrpc-status: 14\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
        b"7\r\n%s\r\n0\r\ngrpc-status: 0\r\n\r\n" % HELLO,
    ]
    backend = await RawBackend(lambda conn, request: answers[conn.backend.count - 1]).start()
    port = free_port()
    retry = {"retry": {"attempts": 1, "codes": [], "backoff": "1ms"}}
    try:
        table = l7_table(
            [route("r", port, [{"backendRefs": [backend_ref("raw")], **retry}])], {"raw": [backend.port]}
        )
        async with serving(with_grpc_codes(table, [14])):
            status, _, body = await ask(port, call("/pkg.Svc/Get"))
    finally:
        await backend.stop()
    assert (status, body) == (200, HELLO)
    assert backend.count == 2


async def test_without_grpc_codes_a_status_is_forwarded_as_it_came() -> None:
    backend = await H2Backend().start()
    port = free_port()
    retry = {"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}}
    try:
        async with serving(h2_table(port, backend.port, **retry)):
            status, headers, _ = await ask(port, call("/grpc/fail/1/14"))
    finally:
        await backend.stop()
    assert (status, headers["grpc-status"]) == (200, "14")
    assert backend.counts == {"/grpc/fail/1/14": 1}
