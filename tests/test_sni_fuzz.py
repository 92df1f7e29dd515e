"""The ClientHello reader against truncated, mutated and re-split hellos (hypothesis).

Whatever the bytes, the reader either asks for more (None), names a server (or none), or
raises HelloError: never another exception, never more than its limit held."""

from __future__ import annotations

import contextlib
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.l4.sni import HELLO_LIMIT, NO_NAME, HelloError, HelloReader, route_of, server_name

from .tlskit import client_hello, hello_in_records

NAMES = ["a.example.com", "xn--bcher-kva.example", "very-long-label-" * 3 + "x.test", None]


@functools.cache
def hello_of(name: str | None) -> bytes:
    return client_hello(name)


def read(chunks: list[bytes], limit: int = HELLO_LIMIT) -> object:
    reader = HelloReader(limit)
    for chunk in chunks:
        found = reader.feed(chunk)
        if found is not None:
            return found
    return None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@pytest.mark.parametrize("name", NAMES)
def test_a_real_hello_names_its_server(name: str | None) -> None:
    assert read([hello_of(name)]) == (name if name is not None else NO_NAME)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    record_size=st.integers(1, 600),
    cuts=st.lists(st.integers(0, 5000), max_size=30),
)
def test_any_split_into_records_and_segments_reads_the_same(
    name: str | None, record_size: int, cuts: list[int]
) -> None:
    data = hello_in_records(hello_of(name), record_size)
    if len(data) > HELLO_LIMIT:
        with pytest.raises(HelloError):
            read(split(data, cuts))
        return
    assert read(split(data, cuts)) == (name if name is not None else NO_NAME)


@settings(max_examples=300)
@given(name=st.sampled_from(NAMES), keep=st.integers(0, 2000))
def test_a_truncated_hello_asks_for_more(name: str | None, keep: int) -> None:
    data = hello_of(name)
    keep = keep % len(data)  # strictly shorter than the whole
    assert read([data[:keep]]) is None


@settings(max_examples=1000)
@given(
    name=st.sampled_from(NAMES),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 5000), max_size=5),
)
def test_a_mutated_hello_is_read_or_refused(
    name: str | None, flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = bytearray(hello_of(name))
    for at, value in flips:
        data[at % len(data)] = value
    try:
        found = read(split(bytes(data), cuts))
    except HelloError:
        return
    assert found is None or found is NO_NAME or isinstance(found, str)
    if isinstance(found, str):
        assert found == found.lower() and len(found) <= 253 and found.isascii()


@settings(max_examples=500)
@given(body=st.binary(max_size=600))
def test_any_body_is_parsed_or_refused(body: bytes) -> None:
    try:
        found = server_name(body)
    except HelloError:
        return
    assert found is NO_NAME or isinstance(found, str)


@settings(max_examples=300)
@given(data=st.binary(min_size=1, max_size=3000))
def test_garbage_never_escapes_as_another_error(data: bytes) -> None:
    with contextlib.suppress(HelloError):
        read([data])


def test_the_limit_bounds_what_is_held() -> None:
    reader = HelloReader(limit=1024)
    header = b"\x16\x03\x01\x3f\xff"  # a 16 KiB record announced
    assert reader.feed(header) is None
    with pytest.raises(HelloError, match="within 1024 bytes"):
        for _ in range(100):
            reader.feed(b"\x00" * 100)
    assert len(reader.pending) <= 1024


def test_sslv2_and_other_records_are_refused() -> None:
    with pytest.raises(HelloError, match="SSLv2"):
        read([b"\x80\x2e\x01"])
    with pytest.raises(HelloError, match="not a TLS handshake"):
        read([b"\x17\x03\x03\x00\x10"])
    with pytest.raises(HelloError, match="record type 21"):
        read([hello_in_records(b"\x01\x00\x00\x50", 4), b"\x15\x03\x03\x00\x02\x02\x28"])


def test_routes_exact_then_longest_wildcard_then_default() -> None:
    exact = {"a.example.com": "exact"}
    wildcard = {".example.com": "short", ".b.example.com": "long"}
    assert route_of("a.example.com", exact, wildcard, "default") == "exact"
    assert route_of("x.b.example.com", exact, wildcard, "default") == "long"
    assert route_of("b.example.com", exact, wildcard, "default") == "short"
    assert route_of("example.com", exact, wildcard, "default") == "default"  # *.example.com is deeper only
    assert route_of(NO_NAME, exact, wildcard, None) is None
