"""The CORS filter: Gateway API's HTTPCORSFilter over the Fetch standard's CORS protocol.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered by the
proxy and never reaches a backend. Any other request goes on, and its response carries the
policy's Access-Control-* headers when its Origin is allowed. With a CORS filter the route
states the policy, so the backend's own Access-Control-* headers are replaced, never
merged: two Access-Control-Allow-Origin lines make a browser refuse the response.

Origins match by scheme, host and port, the port defaulting to 80 for http and 443 for
https. A host pattern "*.example.com" matches any number of labels left of the suffix,
"*" any host; an origin "*" alone allows every origin. A "*" answer is never given where
credentials are allowed: the spec asks for the request's own origin, method or headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import table

Header = tuple[bytes, bytes]

# The response headers that state a CORS policy: a route with a CORS filter owns them.
POLICY_HEADERS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_VARY = (b"vary", b"origin")


@dataclass(frozen=True)
class _Pattern:
    scheme: str
    host: str  # "*": any host; ".suffix": any host ending so; else the exact host
    port: int


def parse_origin(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin such as https://app.example.com:8443; None when it
    is not an http(s) origin (a browser sends "null" for opaque origins)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in _DEFAULT_PORTS or not rest or "/" in rest:
        return None
    if rest.startswith("["):  # an IPv6 literal
        end = rest.find("]")
        if end < 0:
            return None
        host, tail = rest[: end + 1], rest[end + 1 :]
    else:
        host, colon, port_text = rest.partition(":")
        tail = colon + port_text
    if not tail:
        return scheme, host, _DEFAULT_PORTS[scheme]
    if not tail.startswith(":") or not tail[1:].isdigit() or len(tail) > 6:
        return None
    return scheme, host, int(tail[1:])


def _pattern(origin: str) -> _Pattern:
    scheme, _, rest = origin.partition("://")
    host, _, port = rest.partition(":")
    if host.startswith("*."):
        host = host[1:]
    return _Pattern(scheme, host, int(port) if port else _DEFAULT_PORTS[scheme])


class CorsPolicy:
    """One rule's CORS filter, ready to answer."""

    __slots__ = (
        "_any_origin",
        "_credentials",
        "_exact",
        "_expose",
        "_headers",
        "_max_age",
        "_methods",
        "_patterns",
    )

    def __init__(self, cors: table.Cors) -> None:
        self._any_origin = cors.allowOrigins == ["*"]
        patterns = [_pattern(o) for o in cors.allowOrigins if o != "*"]
        self._exact = {(p.scheme, p.host, p.port) for p in patterns if not p.host.startswith((".", "*"))}
        self._patterns = [p for p in patterns if p.host.startswith((".", "*"))]
        self._credentials = cors.allowCredentials
        self._methods = cors.allowMethods
        self._headers = cors.allowHeaders
        self._expose = cors.exposeHeaders
        self._max_age = str(cors.maxAge).encode()

    def allows(self, origin: str) -> bool:
        if self._any_origin:
            return True
        parsed = parse_origin(origin.lower())
        if parsed is None:
            return False
        if parsed in self._exact:
            return True
        scheme, host, port = parsed
        return any(
            p.scheme == scheme
            and p.port == port
            and (p.host == "*" or (host.endswith(p.host) and len(host) > len(p.host)))
            for p in self._patterns
        )

    def _allow_origin(self, origin: bytes) -> list[Header]:
        if self._any_origin and not self._credentials:
            return [(b"access-control-allow-origin", b"*")]
        found = [(b"access-control-allow-origin", origin), _VARY]
        if self._credentials:
            found.append((b"access-control-allow-credentials", b"true"))
        return found

    def _expose_headers(self) -> list[Header]:
        if not self._expose or (self._expose == ["*"] and self._credentials):
            return []  # "*" would be read literally by a browser when credentials are allowed
        return [(b"access-control-expose-headers", ", ".join(self._expose).encode())]

    def preflight(self, origin: bytes, method: bytes, headers: bytes | None) -> list[Header]:
        """The headers of the answer to an allowed preflight."""
        out = self._allow_origin(origin)
        if self._methods == ["*"]:
            out.append((b"access-control-allow-methods", method if self._credentials else b"*"))
        elif self._methods:
            out.append((b"access-control-allow-methods", ", ".join(self._methods).encode()))
        if self._headers == ["*"]:
            if not self._credentials:
                out.append((b"access-control-allow-headers", b"*"))
            elif headers:
                out.append((b"access-control-allow-headers", headers))
        elif self._headers:
            out.append((b"access-control-allow-headers", ", ".join(self._headers).encode()))
        out += self._expose_headers()
        out.append((b"access-control-max-age", self._max_age))
        return out

    def response_headers(self, headers: list[Header], origin: bytes | None) -> list[Header]:
        """A backend's response headers under this policy: its own policy headers replaced
        by ours when the origin is allowed, dropped otherwise."""
        kept = [(n, v) for n, v in headers if n.lower() not in POLICY_HEADERS]
        if origin is not None and self.allows(origin.decode("latin-1")):
            kept += self._allow_origin(origin)
            kept += self._expose_headers()
        elif not (self._any_origin and not self._credentials):
            kept.append(_VARY)  # the answer depends on Origin: caches must know
        return kept
