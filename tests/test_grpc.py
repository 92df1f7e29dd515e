"""gRPC semantics in the dataplane, as tables: which requests are calls, grpc-timeout read
and written, statuses found, the proxy's own answers."""

from __future__ import annotations

import pytest

from dataplane.l7 import grpc
from dataplane.l7.retry import Failure, may_resend


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"Application/GRPC+json; charset=utf-8", True),
        (b"application/grpc-web", False),
        (b"application/grpcx", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_is_grpc(content_type: bytes | None, expected: bool) -> None:
    assert grpc.is_grpc(content_type) is expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"99999999u", 99.999999),
        (b"5000000n", 0.005),
        (b"123456789m", None),  # more than 8 digits
        (b"10", None),  # no unit
        (b"S", None),  # no digits
        (b"1s", None),  # units are case-sensitive
        (b"-1S", None),
        (b"1.5S", None),
        (b"", None),
    ],
)
def test_parse_timeout(value: bytes, seconds: float | None) -> None:
    parsed = grpc.parse_timeout(value)
    assert parsed == pytest.approx(seconds) if seconds is not None else parsed is None


@pytest.mark.parametrize(
    ("seconds", "value"),
    [
        (0.25, b"250000u"),
        (4.9999999, b"4999999u"),  # rounded down: never later than the client's deadline
        (99.999999, b"99999999u"),
        (100.0, b"100000m"),
        (200000.0, b"200000S"),
        (10**9, b"16666666M"),
        (-1.0, b"0u"),
    ],
)
def test_format_timeout(seconds: float, value: bytes) -> None:
    assert grpc.format_timeout(seconds) == value


def test_call_of_reads_content_type_and_timeout() -> None:
    assert grpc.call_of([(b"Content-Type", b"application/grpc"), (b"grpc-timeout", b"2S")]) == (True, 2.0)
    assert grpc.call_of([(b"content-type", b"application/grpc"), (b"grpc-timeout", b"junk")]) == (True, None)
    assert grpc.call_of([(b"content-type", b"text/plain"), (b"grpc-timeout", b"2S")]) == (False, None)


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (503, "no_endpoint", grpc.UNAVAILABLE),
        (503, "connect_failed", grpc.UNAVAILABLE),
        (503, "upstream_reset", grpc.UNAVAILABLE),
        (504, "timeout", grpc.DEADLINE_EXCEEDED),
        (429, "rate_limited", grpc.RESOURCE_EXHAUSTED),
        (404, "no_route", grpc.UNIMPLEMENTED),
        (502, "bad_response", grpc.INTERNAL),
        (400, "bad_request", grpc.INTERNAL),
        (401, None, grpc.UNAUTHENTICATED),
        (302, "redirect", grpc.UNKNOWN),
    ],
)
def test_status_for_the_proxys_answers(status: int, reason: str | None, code: int) -> None:
    assert grpc.status_for(status, reason) == code


@pytest.mark.parametrize(
    ("message", "encoded"),
    [
        ("no ready endpoint", b"no ready endpoint"),
        ("100% sure", b"100%25 sure"),
        ("caf\u00e9\n", b"caf%C3%A9%0A"),
    ],
)
def test_encode_message(message: str, encoded: bytes) -> None:
    assert grpc.encode_message(message) == encoded


def test_trailers_only_and_status_of() -> None:
    fields = grpc.trailers_only(grpc.UNAVAILABLE, "gone 100%")
    assert fields == [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"gone 100%25"),
    ]
    assert grpc.status_of(fields) == 14
    assert grpc.status_of([(b"Grpc-Status", b" 0 ")]) == 0
    assert grpc.status_of([(b"grpc-status", b"x")]) == grpc.UNKNOWN
    assert grpc.status_of([(b"content-type", b"application/grpc")]) is None


def test_with_timeout_replaces_the_field() -> None:
    assert grpc.with_timeout([(b"a", b"1"), (b"Grpc-Timeout", b"5S")], 1.5) == [
        (b"a", b"1"),
        (b"grpc-timeout", b"1500000u"),
    ]


@pytest.mark.parametrize(
    ("resent", "attempts", "budget", "expected"),
    [(0, 2, True, True), (1, 2, True, True), (2, 2, True, False), (0, 2, False, False), (0, 0, True, False)],
)
def test_a_listed_grpc_status_is_resent_whatever_the_method(
    resent: int, attempts: int, budget: bool, expected: bool
) -> None:
    decided = may_resend(
        Failure.GRPC_STATUS,
        idempotent=False,
        reused=False,
        resent=resent,
        attempts=attempts,
        replayable=True,
        response_started=False,
        budget=budget,
    )
    assert decided is expected


def test_a_refused_stream_is_resent_once_even_without_retries() -> None:
    common = {
        "idempotent": False,
        "reused": False,
        "replayable": True,
        "response_started": False,
        "budget": False,
    }
    assert may_resend(Failure.REFUSED, resent=0, attempts=0, **common) is True
    assert may_resend(Failure.REFUSED, resent=1, attempts=0, **common) is False
