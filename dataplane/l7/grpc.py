"""gRPC semantics the proxy needs: which requests are gRPC calls, their deadline
(grpc-timeout), the status of an answer, and the trailers-only answers the proxy makes itself.
Pure: bytes and numbers in and out (PROTOCOL-HTTP2.md in the gRPC repository is the spec).

A malformed grpc-timeout is ignored (no deadline from it), as Envoy does, rather than
refused with INTERNAL as grpc-go's server does: the proxy does not own the call, the header
is forwarded unchanged, and the server it reaches decides what a malformed value means.
"""

from __future__ import annotations

import math

from .framing import Headers

# Status codes (google.rpc.Code) the proxy answers with.
OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

CONTENT_TYPE = b"application/grpc"
TIMEOUT = b"grpc-timeout"
STATUS = b"grpc-status"
MESSAGE = b"grpc-message"

# Why the proxy answered (exchange.Reason) -> the status a gRPC client gets.
_BY_REASON = {
    "no_route": UNIMPLEMENTED,
    "no_backend": UNAVAILABLE,
    "unresolved_backend": UNAVAILABLE,
    "no_endpoint": UNAVAILABLE,
    "connect_failed": UNAVAILABLE,
    "upstream_reset": UNAVAILABLE,
    "timeout": DEADLINE_EXCEEDED,
    "client_timeout": DEADLINE_EXCEEDED,
    "rate_limited": RESOURCE_EXHAUSTED,
    "too_large": RESOURCE_EXHAUSTED,
    "bad_response": INTERNAL,
    "cors_rejected": PERMISSION_DENIED,
}
# The gRPC spec's mapping of HTTP statuses, for any other answer (http-grpc-status-mapping.md).
_BY_HTTP = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED, 429: UNAVAILABLE}
_BY_HTTP.update(dict.fromkeys((502, 503, 504), UNAVAILABLE))

# grpc-timeout units, in seconds.
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_MAX_DIGITS = 8


def is_grpc(content_type: bytes | None) -> bool:
    """application/grpc, or application/grpc+proto (+json, +anything)."""
    if content_type is None:
        return False
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == CONTENT_TYPE or kind.startswith(CONTENT_TYPE + b"+")


def parse_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout value (1 to 8 digits and a unit), or None if malformed."""
    digits, unit = value[:-1], value[-1:]
    scale = _UNITS.get(unit)
    if scale is None or not digits or len(digits) > _MAX_DIGITS or not digits.isdigit():
        return None
    return int(digits) * scale


def format_timeout(seconds: float) -> bytes:
    """A grpc-timeout value for seconds: the finest unit that fits in 8 digits, rounded down
    (the backend's deadline is never later than the client's)."""
    remaining = max(0.0, seconds)
    for unit, scale in ((b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        count = math.floor(remaining / scale)
        if count < 10**_MAX_DIGITS:
            return b"%d%s" % (count, unit)
    return b"%d%s" % (min(math.floor(remaining / 3600.0), 10**_MAX_DIGITS - 1), b"H")


def call_of(headers: Headers) -> tuple[bool, float | None]:
    """(is it a gRPC call, its grpc-timeout in seconds if any and well formed)."""
    grpc = False
    timeout: float | None = None
    for name, value in headers:
        if len(name) == 12:  # both names are 12 letters: most fields cost one len()
            lower = name.lower()
            if lower == b"content-type":
                grpc = is_grpc(value)
            elif lower == TIMEOUT:
                timeout = parse_timeout(value.strip())
    return grpc, timeout if grpc else None


def status_of(headers: Headers) -> int | None:
    """The grpc-status in headers or trailers, if any (an unparsable one is UNKNOWN)."""
    for name, value in headers:
        if name.lower() == STATUS:
            code = value.strip()
            return int(code) if code.isdigit() and len(code) <= 2 else UNKNOWN
    return None


def status_for(http_status: int, reason: str | None) -> int:
    """The gRPC status of an answer the proxy makes itself."""
    found = _BY_REASON.get(reason or "")
    if found is not None:
        return found
    return _BY_HTTP.get(http_status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """grpc-message: UTF-8, with '%' and bytes outside printable ASCII percent-encoded."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(status: int, message: str) -> Headers:
    """The fields of a trailers-only answer (sent with HTTP status 200 and no body)."""
    return [(b"content-type", CONTENT_TYPE), (STATUS, b"%d" % status), (MESSAGE, encode_message(message))]


def with_timeout(headers: Headers, seconds: float) -> Headers:
    """headers with grpc-timeout set to what remains of the deadline."""
    kept = [(n, v) for n, v in headers if n.lower() != TIMEOUT]
    kept.append((TIMEOUT, format_timeout(seconds)))
    return kept
