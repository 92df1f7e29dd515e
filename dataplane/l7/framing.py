"""HTTP/1.1 heads and framing: what a parsed message means, and the framing the proxy emits.

The proxy never forwards framing it was sent. llhttp splits the bytes into messages
(reader.py); this module validates each head into a RequestHead or ResponseHead whose body
is described by that parse (a length, chunked, or up to the close), and the heads the proxy
writes carry framing built from that description alone. So nothing a peer sends (a
Connection header naming Content-Length, a Transfer_Encoding spelled with an underscore, a
length with leading zeros, an absolute-form target) can change how the next hop splits the
byte stream into messages: the class of bug behind request smuggling.

Everything here is pure: bytes and numbers in, a head or a BadMessage out.
"""

from __future__ import annotations

import re
from typing import Final

from .hostnames import normalize_host
from .paths import BadPath, normalize, split_target

Headers = list[tuple[bytes, bytes]]

# Body framing, as the parse saw it. A length >= 0 is a Content-Length.
CHUNKED: Final = -1
UNTIL_CLOSE: Final = -2  # responses only: the body ends when the backend closes
NO_BODY: Final = -3  # no framing header: no body (requests), or a response that cannot have one

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Headers the proxy writes itself from its own parse or knowledge; a peer's copies are dropped
# and a Connection header can never nominate them.
FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})
FORWARDING: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
PROTECTED: Final = HOP_BY_HOP | FRAMING | FORWARDING
# A name that differs from a protected one only by '_' for '-' (in any position) is refused:
# CGI-style backends and servers such as gunicorn read both as the same variable
# (Transfer_Encoding as Transfer-Encoding, X-Forwarded_For as X-Forwarded-For).
# They are found as `95 in name` (95 is "_") then the name with '-' for '_': never as
# `b"_" in name`, since `bytes in bytes` first tries the needle as an integer, raising and
# clearing an exception each time (thousands of instructions per header).

# The request id the proxy forwards and logs (exchange.py writes the field): a client's value
# is kept when it is one visible-ASCII token of bounded length, so a log line stays bounded
# and one id names one request; anything else is replaced by a new id.
REQUEST_ID: Final = b"x-request-id"
_SANE_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")

UPGRADES: Final = frozenset({b"websocket"})  # what a request may upgrade to; h2c is refused (RFC 9113)
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose request content many servers never read (RFC 9110 gives it no meaning): a
# backend connection that carried such a body is not reused, since the server may read
# the body later as a request of its own (CL.0 desync).
BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# reg-name, IPv4 or an IP literal, then an optional port (RFC 3986 3.2.2): no userinfo,
# no path, no whitespace.
_HOST: Final = re.compile(rb"(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?)?")

# Hosts seen valid, and their names for routing: a dict lookup instead of the pattern and
# the normalization for the hosts a listener serves over and over. Cleared when full, so a
# client sending random hosts cannot grow it.
_HOST_NAMES: Final[dict[bytes, str]] = {}
_HOST_NAMES_KEPT: Final = 4096

# Field kinds looked at while validating a head: one dict lookup per field decides. (Final
# names, here and above: compiled code reads them as constants, not from the module's dict.)
_PLAIN: Final = 0
_HOST_FIELD: Final = 1
_LENGTH: Final = 2
_TE: Final = 3
_CONNECTION: Final = 4
_UPGRADE: Final = 5
_XFF: Final = 6
_DROP: Final = 7
_DISGUISED: Final = 8
_REQUEST_ID: Final = 9
_TE_FIELD: Final = 10
_KINDS: Final = {
    b"host": _HOST_FIELD,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _XFF,
    b"x-request-id": _REQUEST_ID,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _TE_FIELD,  # hop-by-hop, but "trailers" in it is passed on to an HTTP/2 backend
    b"trailer": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
}
_RESPONSE_KINDS: Final = {
    **dict.fromkeys(HOP_BY_HOP, _DROP),
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
}


_KINDS_KEPT: Final = 4096


class _FieldKinds(dict[bytes, int]):
    """Field name as sent -> kind, learned: peers send the same names in the same case
    over and over, so most fields cost one lookup, not a lower() and a search. Cleared when
    full, so a peer sending random names cannot grow it."""

    def __init__(self, kinds: dict[bytes, int]) -> None:
        super().__init__()
        self.kinds = kinds

    def __missing__(self, name: bytes) -> int:
        lower = name.lower()
        kind = self.kinds.get(lower, _PLAIN)
        # A name with '_' for '-' in a framing or forwarding field: CGI-style backends
        # (and gunicorn) read X-Forwarded_For as X-Forwarded-For. (Searched as 95, "_":
        # `b"_" in name` tries the needle as an integer first, raising an exception.)
        if kind == _PLAIN and 95 in lower and lower.replace(b"_", b"-") in PROTECTED:
            kind = _DISGUISED
        if len(self) >= _KINDS_KEPT:
            self.clear()
        self[name] = kind
        return kind


_REQUEST_FIELDS: Final = _FieldKinds(_KINDS)
_RESPONSE_FIELDS: Final = _FieldKinds(_RESPONSE_KINDS)


class BadMessage(Exception):
    """A message the proxy refuses; status is what the client gets (502 for a backend's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestHead:
    """A validated request head: where it goes, what to forward, how its body is framed.

    A class with its own __init__, not a dataclass: mypyc compiles this __init__, while a
    dataclass's is generated Python, interpreted for each of the heads made per request."""

    __slots__ = (
        "body",
        "encoded_slash",
        "forwarded_for",
        "has_body",
        "headers",
        "host",
        "host_name",
        "keep_alive",
        "method",
        "path",
        "query",
        "reparse",
        "request_id",
        "te_trailers",
        "upgrade",
        "version",
    )

    def __init__(  # noqa: PLR0917 (positional: made for every request, as dataclasses were)
        self,
        method: str,
        version: str,
        host: bytes,
        host_name: str,
        path: str,
        query: str,
        encoded_slash: bool,
        headers: Headers,
        forwarded_for: bytes,
        body: int,
        keep_alive: bool,
        upgrade: bytes,
        reparse: bool,
        has_body: bool,
        request_id: bytes,
        te_trailers: bool = False,
    ) -> None:
        self.method = method
        self.version = version  # "1.0" or "1.1"
        self.host = host  # as sent (validated), or the authority of an absolute-form target
        self.host_name = host_name  # host as routing compares it: lower case, no port, no trailing dot
        self.path = path  # normalized: dot segments removed, unreserved escapes decoded
        self.query = query
        self.encoded_slash = encoded_slash
        self.headers = headers  # end-to-end fields to forward, in order
        self.forwarded_for = forwarded_for  # the client's X-Forwarded-For values, joined
        self.body = body  # a length >= 0, CHUNKED or NO_BODY
        self.keep_alive = keep_alive
        self.upgrade = upgrade  # b"websocket", or b"" for none
        self.reparse = reparse  # llhttp switched to upgrade mode but the proxy refused it: parse on
        self.has_body = has_body  # a length above 0, or chunked
        # The client's X-Request-Id when sane (one field, see REQUEST_ID), else b"".
        self.request_id = request_id
        self.te_trailers = te_trailers  # the client sent TE: trailers (gRPC needs it, RFC 9113 8.2.2)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


class ResponseHead:
    """A validated response head from a backend (an __init__ of its own, as RequestHead)."""

    __slots__ = ("body", "headers", "keep_alive", "length", "status")

    def __init__(self, status: int, headers: Headers, body: int, length: int, keep_alive: bool) -> None:
        self.status = status
        self.headers = headers  # end-to-end fields to forward
        self.body = body  # a length >= 0, CHUNKED, UNTIL_CLOSE or NO_BODY
        self.length = length  # the Content-Length to announce when body is NO_BODY (HEAD, 304), or -1
        self.keep_alive = keep_alive  # the backend connection may carry another request after this one


def _connection_tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def _length(value: bytes, current: int, status: int) -> int:
    """A Content-Length value (llhttp checked it is digits and not repeated)."""
    if not value.isdigit() and not value.strip().isdigit():
        raise BadMessage(status, "invalid Content-Length")
    length = int(value)
    if current >= 0 and current != length:
        raise BadMessage(status, "conflicting Content-Length values")
    return length


def _drop_named(headers: Headers, named: set[bytes]) -> Headers:
    """Remove the fields a Connection header nominates, except the protected ones."""
    named -= PROTECTED
    named -= {b"close", b"keep-alive", b"upgrade"}
    if not named:
        return headers
    return [(n, v) for n, v in headers if n.lower() not in named]


def _target(url: bytes) -> tuple[bytes | None, str, str]:
    """(authority of an absolute-form target or None, raw path, query) of a target that is
    not in origin form."""
    lowered = url[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = url[url.index(b"//") + 2 :]
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            found = rest.find(stop)
            if found != -1 and found < end:
                end = found
        authority, rest = rest[:end], rest[end:]
        if b"@" in authority:
            raise BadMessage(400, "the request target has user information, which is not allowed")
        if not authority or _HOST.fullmatch(authority) is None:
            raise BadMessage(400, "the request target's authority is not a valid host")
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        path, query = split_target(rest.decode("latin-1"))
        return authority, path, query
    if url == b"*":
        raise BadMessage(400, "asterisk-form request targets (OPTIONS *) are not routed")
    raise BadMessage(400, "the request target must be a path starting with '/' or an absolute URL")


def request_head(
    method: bytes, version: str, url: bytes, fields: Headers, *, keep_alive: bool, upgrading: bool
) -> RequestHead:
    """Validate what llhttp parsed; raises BadMessage with the status to answer.

    upgrading: llhttp switched to upgrade mode after this head (Connection: upgrade with an
    Upgrade field, or CONNECT), so the bytes after it were not parsed as HTTP.
    """
    if version not in ("1.1", "1.0"):
        if version.startswith("0"):
            raise BadMessage(400, "HTTP/0.9 requests are not supported")
        raise BadMessage(505, f"HTTP/{version} is not supported on this connection; use HTTP/1.1")
    name = _METHODS.get(method) or method.decode("ascii", "replace")
    if name == "CONNECT":
        raise BadMessage(405, "CONNECT is not supported: this is a reverse proxy")
    host: bytes | None = None
    hosts = 0
    body = NO_BODY
    chunked = False
    connection: list[bytes] | None = None
    upgrade = b""
    forwarded_for = b""
    request_id: bytes | None = None
    te_trailers = False
    headers: Headers = []
    kinds = _REQUEST_FIELDS
    for field, value in fields:
        kind = kinds[field]
        if kind == _PLAIN:
            headers.append((field, value))
        elif kind == _HOST_FIELD:
            host = value
            hosts += 1
        elif kind == _LENGTH:
            body = _length(value, body, 400)
        elif kind == _TE:
            if value.strip().lower() != b"chunked":
                raise BadMessage(501, "only the chunked transfer coding is supported")
            chunked = True
        elif kind == _CONNECTION:
            tokens = _connection_tokens(value)
            connection = tokens if connection is None else connection + tokens
        elif kind == _UPGRADE:
            upgrade = value.split(b",", 1)[0].strip().lower()
        elif kind == _XFF:
            forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
        elif kind == _REQUEST_ID:
            # Not forwarded: the proxy writes the field itself. Two of them: neither is trusted.
            request_id = value if request_id is None else b""
        elif kind == _DISGUISED:
            raise BadMessage(
                400, f"header {field.decode('latin-1')} is refused: spell it with '-' instead of '_'"
            )
        elif kind == _TE_FIELD:
            te_trailers = te_trailers or b"trailers" in _connection_tokens(value)
    if chunked:
        if version == "1.0":
            raise BadMessage(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        body = CHUNKED
    if hosts > 1:
        raise BadMessage(400, "more than one Host header")
    if host is None:
        if version == "1.1":
            raise BadMessage(400, "the Host header is missing")
        host = b""
    elif host and host not in _HOST_NAMES and _HOST.fullmatch(host) is None:
        raise BadMessage(400, "the Host header is not a valid host[:port]")
    if url[:1] == b"/":  # origin form, nearly every request
        raw_path = url.decode("latin-1")
        query = ""
        if "?" in raw_path or "#" in raw_path:
            raw_path, query = split_target(raw_path)
    else:
        authority, raw_path, query = _target(url)
        if authority is not None:
            host = authority  # RFC 9112 3.2.2: the target's authority replaces Host
    if "\\" in raw_path:
        raise BadMessage(400, "the request path has a backslash")
    if "%" not in raw_path and "//" not in raw_path and "/." not in raw_path and raw_path[:1] == "/":
        # normalize() would return the path as it is (its own first test): a call less
        path, encoded_slash = raw_path, False
    else:
        try:
            path, encoded_slash = normalize(raw_path)
        except BadPath as err:
            raise BadMessage(400, str(err)) from None
    if connection:
        named = set(connection)
        headers = _drop_named(headers, named)
        wants_upgrade = b"upgrade" in named and bool(upgrade)
    else:
        wants_upgrade = False
    reparse = False
    has_body = body > 0 or body == CHUNKED
    if upgrading or wants_upgrade:
        if upgrade in UPGRADES and name == "GET" and not has_body:
            pass
        elif has_body and upgrading:
            # llhttp handed the body over as tunnel bytes: it cannot be forwarded as a body.
            raise BadMessage(400, "an Upgrade request must not have a body")
        else:
            upgrade, reparse = b"", upgrading  # refused: forwarded as a plain request
    else:
        upgrade = b""
    host_name = _HOST_NAMES.get(host)
    if host_name is None:
        host_name = normalize_host(host.decode("latin-1"))
        if len(_HOST_NAMES) >= _HOST_NAMES_KEPT:
            _HOST_NAMES.clear()
        _HOST_NAMES[host] = host_name
    if request_id is None or (request_id and _SANE_REQUEST_ID.fullmatch(request_id) is None):
        request_id = b""
    # Positional: keyword arguments cost a microsecond per request here.
    return RequestHead(
        name,  # method
        version,
        host,
        host_name,
        path,
        query,
        encoded_slash,
        headers,
        forwarded_for,
        body,
        keep_alive,
        upgrade,
        reparse,
        has_body,
        request_id,
        te_trailers,
    )


def response_head(
    status: int, fields: Headers, keep_alive: bool, method: str, upgrade: bytes
) -> ResponseHead:
    """Validate a backend's response head to a request (method, upgrade asked for).

    keep_alive: llhttp's reading of the version and Connection. (The version itself is not
    looked at: whatever a backend says, the client gets HTTP/1.1 framed by the proxy.)
    """
    if status < 100:
        raise BadMessage(502, f"the backend answered with status {status}")
    if status == 101 and not upgrade:
        raise BadMessage(502, "the backend switched protocols without an upgrade request")
    length = -1
    chunked = False
    close = False
    named: set[bytes] | None = None
    headers: Headers = []
    kinds = _RESPONSE_FIELDS
    for field, value in fields:
        kind = kinds[field]
        if kind == _PLAIN:
            headers.append((field, value))
        elif kind == _LENGTH:
            # The first length in plain digits, nearly every response: what _length returns
            length = int(value) if length < 0 and value.isdigit() else _length(value, length, 502)
        elif kind == _TE:
            if value.strip().lower() != b"chunked":
                raise BadMessage(502, "the backend used a transfer coding other than chunked")
            chunked = True
        elif kind == _CONNECTION:
            lowered = value.lower()
            if lowered == b"close":
                close = True
            elif lowered != b"keep-alive":
                tokens = _connection_tokens(value)
                close = close or b"close" in tokens
                named = set(tokens) if named is None else named.union(tokens)
        elif kind == _UPGRADE and status == 101:
            headers.append((field, value))
        # else: hop-by-hop, or an underscore spelling of a framing or forwarding field
        # (a client could read it as the field itself): never forwarded
    if named:
        headers = _drop_named(headers, named)
    if status < 200 or status in (204, 304) or method == "HEAD":
        body = NO_BODY
    elif chunked:
        body = CHUNKED
    elif length >= 0:
        body = length
    else:
        body = UNTIL_CLOSE
    announced = length if method == "HEAD" or status == 304 else -1
    # A connection is not reused after a HEAD (servers commonly write the GET body anyway,
    # later than the head) nor after a 204 that announced a body: bytes arriving after the
    # proxy thought the response done would be taken for the next client's answer.
    reusable = (
        keep_alive
        and not close
        and body != UNTIL_CLOSE
        and method != "HEAD"
        and not (status == 204 and (length > 0 or chunked))
    )
    return ResponseHead(status, headers, body, announced, reusable)


# (name, value) -> b"name: value", in C: joining the lines of a head runs no bytecode per field
def _field_lines(parts: list[bytes], headers: Headers) -> None:
    """Append each field as name, ": ", value, CRLF: one join of the whole head then copies
    each byte once (a join per field costs a call and an allocation per field)."""
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")


def serialize(headers: Headers) -> bytes:
    """Header fields as lines, each ending in CRLF (b"" for none)."""
    if not headers:
        return b""
    parts: list[bytes] = []
    _field_lines(parts, headers)
    return b"".join(parts)


def request_bytes(method: str, target: bytes, host: bytes, headers: Headers, body: int) -> bytes:
    """The request head for a backend, with framing from the proxy's own parse."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    _field_lines(parts, headers)
    if body >= 0:
        parts.append(b"content-length: %d\r\n\r\n" % body)
    elif body == CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """data as one chunk of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
