"""Resends: RFC 9110's rule on non-idempotent requests, every resend counted against the
rule's attempts, 0s timeouts disabled as the Gateway API says. Plus the pure decisions,
as a table."""

from __future__ import annotations

import json

import pytest

from dataplane.l7.retry import Failure, give_up_status, may_resend

from .helpers import compile_yaml, free_port
from .l7kit import backend_ref, l7_table, route, serving
from .rawkit import Connection, RawBackend, Request, echo_response, exchange_raw, split_responses


def rule(**extra: object) -> list[dict[str, object]]:
    return [{"backendRefs": [backend_ref("raw")], **extra}]


async def test_a_post_is_never_replayed_when_a_pooled_connection_closes_unanswered() -> None:
    """The backend closes its kept-alive connection on the POST without answering: it may
    have acted on it, so the proxy must not send it again (it did, and the backend saw it
    twice)."""

    def answer(conn: Connection, request: Request) -> bytes | None:
        if request.method == "POST":
            return None  # close without a word
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(l7_table([route("r", port, rule())], {"raw": [backend.port]})):
            answer_bytes = await exchange_raw(
                port,
                b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
    finally:
        await backend.stop()
    assert [r.method for r in backend.requests].count("POST") == 1
    assert len(backend.connections) == 1  # the POST went on the pooled connection
    assert [s for s, _, _ in split_responses(answer_bytes)] == [200, 503]


async def test_an_idempotent_request_is_resent_once_on_a_new_connection_when_a_pooled_one_went_stale() -> (
    None
):
    """Without a retry policy, a GET whose pooled connection closed before any answer (the
    connection went stale, not the backend) is resent once, on a new connection."""

    def answer(conn: Connection, request: Request) -> bytes | None:
        if request.target == "/stale" and len(conn.requests) > 1:
            return None
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    try:
        async with serving(l7_table([route("r", port, rule())], {"raw": [backend.port]})):
            answer_bytes = await exchange_raw(
                port,
                b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /stale HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
    finally:
        await backend.stop()
    statuses = [s for s, _, _ in split_responses(answer_bytes)]
    assert statuses == [200, 200]
    assert [r.target for r in backend.requests].count("/stale") == 2
    assert len(backend.connections) == 2


@pytest.mark.parametrize("attempts", [0, 1, 3])
async def test_every_resend_counts_against_the_attempts(attempts: int) -> None:
    """A backend that resets every request 4 times: with attempts N it sees N + 1 requests
    and the client gets 503 once they are spent (it saw 5 and the client got 200)."""

    def answer(conn: Connection, request: Request) -> bytes | None:
        if backend.count <= 4:
            return None  # reset before any answer
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    retry = {"retry": {"attempts": attempts, "codes": [503], "backoff": "1ms"}}
    try:
        async with serving(l7_table([route("r", port, rule(**retry))], {"raw": [backend.port]})):
            answer_bytes = await exchange_raw(
                port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
    finally:
        await backend.stop()
    assert backend.count == attempts + 1
    assert answer_bytes.startswith(b"HTTP/1.1 503")


async def test_retries_on_status_stop_at_the_attempts() -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"

    def answer(conn: Connection, request: Request) -> bytes:
        if request.target == "/busy" or backend.count <= 2:
            return busy
        return echo_response(conn, request)

    backend = await RawBackend(answer).start()
    port = free_port()
    retry = {"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}}
    try:
        async with serving(l7_table([route("r", port, rule(**retry))], {"raw": [backend.port]})):
            ok = await exchange_raw(port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            spent = await exchange_raw(port, b"GET /busy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            post = await exchange_raw(
                port, b"POST /busy HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nz"
            )
    finally:
        await backend.stop()
    (status, _, body), *_ = split_responses(ok)
    assert status == 200 and json.loads(body)["n"] == 3
    assert spent.startswith(b"HTTP/1.1 503") and spent.endswith(b"busy")  # the last answer, forwarded
    assert [r.method for r in backend.requests if r.target == "/busy"] == ["GET", "GET", "GET", "POST"]
    assert post.startswith(b"HTTP/1.1 503")  # a POST is never resent


async def test_zero_second_timeouts_disable_them() -> None:
    """The Gateway API: 0s means no timeout (it answered 504 at once)."""
    backend = await RawBackend().start()
    port = free_port()
    timeouts = {"timeouts": {"request": "0s", "backendRequest": "0s"}}
    try:
        async with serving(l7_table([route("r", port, rule(**timeouts))], {"raw": [backend.port]})):
            answer = await exchange_raw(port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    assert answer.startswith(b"HTTP/1.1 200")


def test_zero_request_timeout_is_not_compared_with_backend_request() -> None:
    compiled = compile_yaml(
        json.dumps(route("r", 8080, rule(timeouts={"request": "0s", "backendRequest": "5s"})))
    )
    (conditions,) = compiled.statuses.values()
    assert conditions[0].status == "True", conditions[0].message
    (table_rule,) = compiled.table.listeners[8080].l7.rules.values()  # type: ignore[union-attr]
    assert table_rule.requestTimeout is None and table_rule.backendRequestTimeout == 5.0


def test_header_modifiers_cannot_touch_framing() -> None:
    filters = [
        {
            "type": "RequestHeaderModifier",
            "requestHeaderModifier": {"set": [{"name": "Content-Length", "value": "0"}]},
        }
    ]
    compiled = compile_yaml(json.dumps(route("r", 8080, rule(filters=filters))))
    (conditions,) = compiled.statuses.values()
    assert conditions[0].status == "False"
    assert "Content-Length is written by the proxy" in conditions[0].message


def test_patterns_are_re2() -> None:
    match = {"path": {"type": "RegularExpression", "value": "/(a)\\1"}}
    compiled = compile_yaml(json.dumps(route("r", 8080, rule(matches=[match]))))
    (conditions,) = compiled.statuses.values()
    assert conditions[0].status == "False"
    assert "not a valid RE2 regular expression" in conditions[0].message


# The decisions, as a table: (failure, idempotent, reused, resent, attempts, replayable,
# response started, budget) -> resend?
CASES = [
    ("connect, POST, attempts left", Failure.CONNECT, False, False, 0, 2, True, False, True, True),
    ("connect, no attempts", Failure.CONNECT, True, False, 0, 0, True, False, True, False),
    ("connect, body no longer held", Failure.CONNECT, True, False, 0, 2, False, False, True, False),
    ("reset, POST never", Failure.RESET, False, True, 0, 3, True, False, True, False),
    ("reset, stale pooled GET, no policy", Failure.RESET, True, True, 0, 0, True, False, True, True),
    ("reset, stale pooled GET, once only", Failure.RESET, True, True, 1, 0, True, False, True, False),
    ("reset, new connection, no policy", Failure.RESET, True, False, 0, 0, True, False, True, False),
    ("reset, attempts left", Failure.RESET, True, False, 1, 3, True, False, True, True),
    ("reset, attempts spent", Failure.RESET, True, False, 3, 3, True, False, True, False),
    ("reset, budget spent", Failure.RESET, True, False, 0, 3, True, False, False, False),
    ("status, GET", Failure.STATUS, True, False, 0, 1, True, False, True, True),
    ("status, POST", Failure.STATUS, False, False, 0, 1, True, False, True, False),
    ("status, response started", Failure.STATUS, True, False, 0, 1, True, True, True, False),
    ("timeout, GET", Failure.TIMEOUT, True, False, 0, 1, True, False, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_may_resend(case: tuple[object, ...]) -> None:
    _, failure, idempotent, reused, resent, attempts, replayable, started, budget, expected = case
    got = may_resend(
        failure,  # type: ignore[arg-type]
        idempotent=bool(idempotent),
        reused=bool(reused),
        resent=int(resent),  # type: ignore[call-overload]
        attempts=int(attempts),  # type: ignore[call-overload]
        replayable=bool(replayable),
        response_started=bool(started),
        budget=bool(budget),
    )
    assert got is expected


def test_give_up_statuses() -> None:
    assert [give_up_status(f) for f in (Failure.CONNECT, Failure.RESET, Failure.TIMEOUT)] == [503, 503, 504]
