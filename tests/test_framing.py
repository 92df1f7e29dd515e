"""The pure framing rules as tables: a parsed head in, a validated head (or the status that
refuses it) out; and the request head the proxy writes."""

from __future__ import annotations

import pytest

from dataplane.l7.framing import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    BadMessage,
    RequestHead,
    request_bytes,
    request_head,
    response_head,
)

Fields = list[tuple[bytes, bytes]]


def head(
    fields: Fields, url: bytes = b"/", method: bytes = b"GET", version: str = "1.1", **kw: bool
) -> RequestHead:
    return request_head(
        method,
        version,
        url,
        fields,
        keep_alive=kw.get("keep_alive", True),
        upgrading=kw.get("upgrading", False),
    )


HOST = (b"Host", b"shop.test")

REQUESTS_REFUSED = [
    ("HTTP/0.9", [HOST], b"/", b"GET", "0.9", False, 400),
    ("HTTP/2.0 on h1", [HOST], b"/", b"GET", "2.0", False, 505),
    ("no Host in 1.1", [], b"/", b"GET", "1.1", False, 400),
    ("two Hosts", [HOST, HOST], b"/", b"GET", "1.1", False, 400),
    ("Host with userinfo", [(b"Host", b"a.test:80@b.test")], b"/", b"GET", "1.1", False, 400),
    ("Host with a path", [(b"Host", b"a.test/x")], b"/", b"GET", "1.1", False, 400),
    ("Host with a bad port", [(b"Host", b"a.test:80x")], b"/", b"GET", "1.1", False, 400),
    ("port without host", [(b"Host", b":80")], b"/", b"GET", "1.1", False, 400),
    ("Transfer_Encoding", [HOST, (b"Transfer_Encoding", b"chunked")], b"/", b"POST", "1.1", False, 400),
    ("Content_Length", [HOST, (b"content_length", b"3")], b"/", b"POST", "1.1", False, 400),
    ("X_Forwarded_Proto", [HOST, (b"X_Forwarded_Proto", b"https")], b"/", b"GET", "1.1", False, 400),
    ("gzip coding", [HOST, (b"Transfer-Encoding", b"gzip")], b"/", b"POST", "1.1", False, 501),
    ("chunked in 1.0", [HOST, (b"Transfer-Encoding", b"chunked")], b"/", b"POST", "1.0", False, 400),
    (
        "conflicting lengths",
        [HOST, (b"Content-Length", b"3"), (b"Content-Length", b"4")],
        b"/",
        b"POST",
        "1.1",
        False,
        400,
    ),
    ("backslash", [HOST], b"/a\\b", b"GET", "1.1", False, 400),
    ("asterisk", [HOST], b"*", b"OPTIONS", "1.1", False, 400),
    ("relative target", [HOST], b"a/b", b"GET", "1.1", False, 400),
    ("absolute with userinfo", [HOST], b"http://u:p@b.test/", b"GET", "1.1", False, 400),
    ("absolute, bad authority", [HOST], b"http://b test/", b"GET", "1.1", False, 400),
    ("climbs above root", [HOST], b"/../x", b"GET", "1.1", False, 400),
    ("CONNECT", [HOST], b"b.test:443", b"CONNECT", "1.1", True, 405),
    (
        "upgrade with a body",
        [HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Content-Length", b"3")],
        b"/ws",
        b"GET",
        "1.1",
        True,
        400,
    ),
]


@pytest.mark.parametrize("case", REQUESTS_REFUSED, ids=[c[0] for c in REQUESTS_REFUSED])
def test_requests_refused(case: tuple[str, Fields, bytes, bytes, str, bool, int]) -> None:
    _, fields, url, method, version, upgrading, status = case
    with pytest.raises(BadMessage) as refused:
        head(fields, url, method, version, upgrading=upgrading)
    assert refused.value.status == status


def test_framing_fields_are_never_forwarded_and_connection_cannot_nominate_them() -> None:
    got = head(
        [
            HOST,
            (b"Connection", b"keep-alive, Content-Length, X-Drop, host"),
            (b"Content-Length", b"010"),
            (b"X-Drop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"X-Keep", b"1"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"X-Forwarded-For", b"10.0.0.2"),
            (b"X-Forwarded-Proto", b"https"),
        ],
        method=b"POST",
    )
    assert got.body == 10  # the number it means, never the digits as sent
    assert got.headers == [(b"X-Keep", b"1")]
    assert got.forwarded_for == b"10.0.0.1, 10.0.0.2"
    assert got.host == b"shop.test"
    data = request_bytes("POST", b"/", got.host, got.headers, got.body)
    assert data == b"POST / HTTP/1.1\r\nhost: shop.test\r\nX-Keep: 1\r\ncontent-length: 10\r\n\r\n"


def test_absolute_form_sets_host_path_and_query() -> None:
    got = head([(b"Host", b"ignored.test")], b"http://b.test?x=/y")
    assert (got.host, got.path, got.query) == (b"b.test", "/", "x=/y")
    got = head([HOST], b"HTTPS://B.test:8443/a/./b?q")
    assert (got.host, got.path, got.query) == (b"B.test:8443", "/a/b", "q")


@pytest.mark.parametrize(
    ("fields", "upgrading", "upgrade", "reparse"),
    [
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], True, b"websocket", False),
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket, foo")], True, b"websocket", False),
        ([(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")], True, b"", True),
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"foo/1")], True, b"", True),
        ([(b"Upgrade", b"websocket")], False, b"", False),  # no Connection: upgrade
    ],
)
def test_only_websocket_upgrades(fields: Fields, upgrading: bool, upgrade: bytes, reparse: bool) -> None:
    got = head([HOST, *fields], b"/ws", upgrading=upgrading)
    assert (got.upgrade, got.reparse) == (upgrade, reparse)
    assert all(name.lower() not in (b"upgrade", b"connection", b"http2-settings") for name, _ in got.headers)


def test_bodies() -> None:
    assert head([HOST]).body == NO_BODY and not head([HOST]).has_body
    assert head([HOST, (b"Content-Length", b"0")], method=b"POST").body == 0
    chunked = head([HOST, (b"Transfer-Encoding", b" Chunked ")], method=b"POST")
    assert chunked.body == CHUNKED and chunked.has_body
    data = request_bytes("POST", b"/", b"h", [], CHUNKED)
    assert data.endswith(b"transfer-encoding: chunked\r\n\r\n")


RESPONSES = [
    # (status, fields, method, upgrade) -> (body, announced length, keep-alive)
    ("length", 200, [(b"Content-Length", b"5")], "GET", b"", (5, -1, True)),
    ("leading zeros", 200, [(b"Content-Length", b"007")], "GET", b"", (7, -1, True)),
    ("chunked", 200, [(b"Transfer-Encoding", b"chunked")], "GET", b"", (CHUNKED, -1, True)),
    ("until close", 200, [], "GET", b"", (UNTIL_CLOSE, -1, False)),
    # Not reused after a HEAD, nor after a 204 that announced a body: late bytes would be
    # taken for the next client's answer.
    ("HEAD", 200, [(b"Content-Length", b"1000")], "HEAD", b"", (NO_BODY, 1000, False)),
    ("204", 204, [], "GET", b"", (NO_BODY, -1, True)),
    ("204 announcing a body", 204, [(b"Content-Length", b"5")], "GET", b"", (NO_BODY, -1, False)),
    ("304", 304, [(b"Content-Length", b"5")], "GET", b"", (NO_BODY, 5, True)),
    (
        "Connection: close",
        200,
        [(b"Content-Length", b"1"), (b"Connection", b"close")],
        "GET",
        b"",
        (1, -1, False),
    ),
    (
        "Connection names Content-Length",
        200,
        [(b"Connection", b"content-length"), (b"Content-Length", b"2")],
        "GET",
        b"",
        (2, -1, True),
    ),
    (
        "101 asked for",
        101,
        [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")],
        "GET",
        b"websocket",
        (NO_BODY, -1, True),
    ),
]


@pytest.mark.parametrize("case", RESPONSES, ids=[c[0] for c in RESPONSES])
def test_responses(case: tuple[str, int, Fields, str, bytes, tuple[int, int, bool]]) -> None:
    _, status, fields, method, upgrade, expected = case
    got = response_head(status, fields, True, method, upgrade)
    assert (got.body, got.length, got.keep_alive) == expected
    assert all(
        name.lower() not in (b"content-length", b"transfer-encoding", b"connection")
        for name, _ in got.headers
    )


@pytest.mark.parametrize(
    ("status", "fields", "upgrade"),
    [
        (101, [], b""),  # a 101 nobody asked for
        (99, [], b""),
        (0, [], b""),
        (200, [(b"Transfer-Encoding", b"gzip")], b""),
        (200, [(b"Content-Length", b"1"), (b"Content-Length", b"2")], b""),
    ],
)
def test_responses_refused(status: int, fields: Fields, upgrade: bytes) -> None:
    with pytest.raises(BadMessage) as refused:
        response_head(status, fields, True, "GET", upgrade)
    assert refused.value.status == 502
