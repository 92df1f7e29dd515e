"""The access log line of an L7 request: its request id (kept from the client or made, and
forwarded), user agent, protocol, the reason of a response the proxy made itself, and bytes
counted alike for proxied and local responses. Real sockets, the real proxy."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .helpers import compile_yaml, free_port, service
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, route, serving

HEX32 = re.compile(r"[0-9a-f]{32}")


@contextmanager
def access_lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    """The fields of each `request` line logged inside the block (the list fills at exit)."""
    lines: list[dict[str, Any]] = []
    with caplog.at_level("INFO", logger="bilayer.access"):
        start = len(caplog.records)
        yield lines
        records = caplog.records[start:]
    lines.extend(r.fields for r in records if r.getMessage() == "request")  # type: ignore[attr-defined]


async def request(port: int, head: str) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection, read to its close (or reset: a cut response):
    status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((head + "Connection: close\n\n").replace("\n", "\r\n").encode("latin-1"))
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # (the bodies here are small: one chunk)
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return int(lines[0].split()[1]), headers, rest


def forwarded_ids(body: bytes) -> list[str]:
    return [v for n, v in echoed(body)["headers"] if n == "x-request-id"]


async def test_request_id_is_kept_when_sane_else_made_and_always_forwarded(
    web_a: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # A route may not change the id (set, add or remove): the backend gets the logged one.
    modifier = {"set": [{"name": "X-Request-Id", "value": "route"}], "remove": ["x-request-id"]}
    rules = [
        {
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": modifier}],
            "backendRefs": [backend_ref("a")],
        }
    ]
    cases = [
        ("", None),  # none: made
        ("X-Request-Id: 7f3c-abc_DEF.1\n", "7f3c-abc_DEF.1"),  # sane: kept as sent
        ("x-request-id: " + "a" * 128 + "\n", "a" * 128),  # the longest kept
        ("x-request-id: " + "a" * 129 + "\n", None),  # too long: replaced
        ("x-request-id: two words\n", None),  # not one visible-ASCII token
        ("x-request-id: caf\xe9\n", None),
        ("x-request-id: one\nx-request-id: two\n", None),  # which one? neither
    ]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]}), access_log=True):
        with access_lines(caplog) as lines:
            bodies = []
            for given, _ in cases:
                status, _, body = await request(port, f"GET /e HTTP/1.1\nHost: shop.test\n{given}")
                assert status == 200
                bodies.append(body)
    made: set[str] = set()
    for (given, kept), body, line in zip(cases, bodies, lines, strict=True):
        forwarded = forwarded_ids(body)
        assert forwarded == [line["request_id"]], given  # one field, the logged id
        if kept is not None:
            assert line["request_id"] == kept
        else:
            assert HEX32.fullmatch(line["request_id"]), given
            made.add(line["request_id"])
    assert len(made) == 5  # a new id each time


async def test_user_agent_protocol_and_trace_id_in_the_line(
    web_a: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    rules = [{"backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]}), access_log=True):
        with access_lines(caplog) as lines:
            await request(port, "GET /e HTTP/1.1\nHost: shop.test\nUser-Agent: probe/1.0 (test)\n")
            await request(port, "GET /e HTTP/1.0\n")
    assert lines[0]["user_agent"] == "probe/1.0 (test)" and lines[0]["protocol"] == "HTTP/1.1"
    assert lines[1]["user_agent"] is None and lines[1]["protocol"] == "HTTP/1.0"
    assert all(line["reason"] is None for line in lines)  # the backend answered
    assert all("trace_id" in line for line in lines)


async def test_local_responses_log_a_reason_and_their_body_bytes(
    web_a: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    dead = free_port()
    rules: list[dict[str, Any]] = [
        {"matches": [{"path": {"value": "/big"}}], "backendRefs": [backend_ref("a")]},
        {
            "matches": [{"path": {"value": "/old"}}],
            "filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}}],
        },
        {
            "matches": [{"path": {"value": "/limited"}}],
            "rateLimit": {"requests": 1, "unit": "Hour"},
            "backendRefs": [backend_ref("a")],
        },
        {"matches": [{"path": {"value": "/empty"}}], "backendRefs": [backend_ref("empty")]},
        {"matches": [{"path": {"value": "/dead"}}], "backendRefs": [backend_ref("dead")]},
        {"matches": [{"path": {"value": "/unresolved"}}], "backendRefs": [{"name": "ghost", "port": 80}]},
        {"matches": [{"path": {"value": "/none"}}]},
        {
            "matches": [{"path": {"value": "/slow"}}],
            "timeouts": {"request": "50ms"},
            "backendRefs": [backend_ref("a")],
        },
        {"matches": [{"path": {"value": "/reset"}}], "backendRefs": [backend_ref("a")]},
        {
            "matches": [{"path": {"value": "/cors"}}],
            "filters": [
                {"type": "CORS", "cors": {"allowOrigins": ["https://a.test"], "allowMethods": ["*"]}}
            ],
            "backendRefs": [backend_ref("a")],
        },
    ]
    objects = [
        service("a", 80, [("127.0.0.1", web_a.port)]),
        service("empty", 80, []),
        service("dead", 80, [("127.0.0.1", dead)]),
        json.dumps(route("r", port, rules)),
    ]
    preflight = "Origin: https://{}\nAccess-Control-Request-Method: GET\n"
    calls = [
        # (request head, status, reason); a None reason: the backend's response went through.
        ("GET /big/1000", 200, None),
        ("GET /nope", 404, "no_route"),
        ("HEAD /nope", 404, "no_route"),
        ("GET /old/x", 301, "redirect"),
        ("GET /limited", 200, None),
        ("GET /limited", 429, "rate_limited"),
        ("GET /empty", 503, "no_endpoint"),
        ("GET /dead", 503, "connect_failed"),
        ("GET /unresolved", 500, "unresolved_backend"),
        ("GET /none", 500, "no_backend"),
        ("GET /slow/2000", 504, "timeout"),
        ("GET /reset", 200, "upstream_reset"),  # cut after 1000 of 100000 body bytes
        ("GET /big/a%2Fb", 400, "bad_request"),  # an encoded slash the rule does not allow
        ("OPTIONS /cors\n" + preflight.format("a.test"), 204, "cors_preflight"),
        ("OPTIONS /cors\n" + preflight.format("b.test"), 403, "cors_rejected"),
    ]
    async with serving(compile_yaml("---\n".join(objects)).table, access_log=True):
        with access_lines(caplog) as lines:
            answers = []
            for call, _, _ in calls:
                first, _, more = call.partition("\n")
                answers.append(await request(port, f"{first} HTTP/1.1\nHost: shop.test\n{more}"))
    assert len(lines) == len(calls)
    for (call, status, reason), (got, _, body), line in zip(calls, answers, lines, strict=True):
        assert (got, line["status"], line["reason"]) == (status, status, reason), call
        # bytes: the body bytes sent to the client, whoever made the response.
        assert line["bytes"] == len(body), call
    by_call = {call: line for (call, _, _), line in zip(calls, lines, strict=True)}
    assert by_call["GET /big/1000"]["bytes"] == 1000
    assert by_call["GET /nope"]["bytes"] == len(b"no route for this host and path\n")
    assert by_call["HEAD /nope"]["bytes"] == 0  # the length announced, no body sent
    assert by_call["GET /reset"]["bytes"] == 1000
    assert all(HEX32.fullmatch(line["request_id"]) for line in lines)  # answered locally too


async def test_bytes_of_a_chunked_response_are_its_body_without_the_framing(
    web_a: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    rules = [{"backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]}), access_log=True):
        with access_lines(caplog) as lines:
            status, headers, _ = await request(port, "GET /chunked HTTP/1.1\nHost: shop.test\n")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert lines[0]["bytes"] == len("".join(f"part {i}\n" for i in range(5)))


async def test_heads_that_never_became_requests_are_logged_too(
    web_a: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed head (400), an oversized one (431) and one that came too slowly (408) are
    answered by the connection before any request exists: each still gets a line, with a
    reason, the status and the body bytes sent (before, they left no trace in the log)."""
    port = free_port()
    rules = [{"backendRefs": [backend_ref("a")]}]
    table = l7_table([route("r", port, rules)], {"a": [web_a.port]})
    async with serving(table, access_log=True, header_timeout=0.5, max_header_bytes=4096):
        with access_lines(caplog) as lines:
            bad, _, bad_body = await request(port, "GET / HTTP/1.1\nHost: shop.test\nBad Header: x\n")
            big, _, _ = await request(port, "GET / HTTP/1.1\nHost: shop.test\nX-Big: " + "a" * 8000 + "\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: shop.test\r\n")  # and nothing more
            slow = await asyncio.wait_for(reader.read(65536), 10)
            writer.close()
    assert (bad, big, slow.split(b" ")[1]) == (400, 431, b"408")
    by_status = {line["status"]: line for line in lines}
    assert by_status[400]["reason"] == "bad_request" and by_status[400]["bytes"] == len(bad_body)
    assert by_status[431]["reason"] == "too_large"
    assert by_status[408]["reason"] == "client_timeout"
    for line in by_status.values():
        assert HEX32.fullmatch(line["request_id"]) and line["method"] is None and line["route"] is None
        assert line["client"] == "127.0.0.1"
