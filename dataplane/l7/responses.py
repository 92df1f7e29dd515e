"""Responses the proxy makes itself: short plain-text bodies, never a stack trace."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, "Unknown").encode()


STATUS_LINES: Final = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason(status)) for status in _REASONS}


def status_line(status: int) -> bytes:
    """b"HTTP/1.1 200 OK\\r\\n" for status."""
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def local(
    status: int,
    message: str,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response; message becomes the body (one line)."""
    head, body = local_parts(status, message, close=close, headers=headers, head_only=head_only)
    return head + body


def local_parts(
    status: int,
    message: str,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
    head_only: bool = False,
) -> tuple[bytes, bytes]:
    """The head and the body of local(): the access log counts the body bytes, as it does
    for a proxied response. A 204 has no body and no Content-Length (RFC 9110 forbids
    both); a response to HEAD announces the body it leaves out."""
    body = (message + "\n").encode() if status != 204 else b""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
    if status != 204:
        lines.append(b"content-type: text/plain; charset=utf-8\r\n")
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.extend(b"%s: %s\r\n" % pair for pair in headers or [])
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), b"" if head_only else body
