"""Request path normalization, before matching and forwarding (as Envoy does).

Without it ``/public/../internal`` would match a ``/public`` prefix and reach a backend
that resolves the dot segments itself: a routing bypass. Steps:

1. percent-encoded unreserved characters are decoded (``%7E`` -> ``~``), other escapes
   are upper-cased; a malformed escape is refused;
2. repeated slashes merge;
3. dot segments are removed (RFC 3986 5.2.4); climbing above the root is refused.

An encoded slash (``%2F``) or backslash (``%5C``) stays encoded, so it never acts as a
separator here; the caller refuses it unless the matched route opts in (some backends
decode it and split there). A dot segment with parameters (``..;`` or ``.;x``), which Java
servlet containers resolve as a dot segment, is refused outright.
"""

from __future__ import annotations

import re
from typing import Final

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_SLASHES: Final = re.compile(r"//+")


class BadPath(ValueError):
    """The request target cannot be routed; the message says why (sent with a 400)."""


def split_target(target: str) -> tuple[str, str]:
    """Path and query of an origin-form request target; the fragment is dropped."""
    path, _, query = target.partition("?")
    if "#" in query:
        query = query.split("#", 1)[0]
    if "#" in path:
        path = path.split("#", 1)[0]
    return path, query


def normalize(path: str) -> tuple[str, bool]:
    """The normalized path and whether it holds an encoded slash; raises BadPath."""
    if not path.startswith("/"):
        raise BadPath("the request path must start with '/'")
    if "%" not in path and "//" not in path and "/." not in path:
        return path, False  # the common case costs three scans
    encoded_slash = False
    if "%" in path:
        path, encoded_slash = _decode_unreserved(path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        if "/.;" in path or "/..;" in path:
            raise BadPath("the request path has a dot segment with parameters (..;)")
        path = _remove_dot_segments(path)
    return path, encoded_slash


def _decode_unreserved(path: str) -> tuple[str, bool]:
    out = []
    encoded_slash = False
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadPath("the request path has a malformed percent-escape")
        decoded = chr(int(pair, 16))
        if decoded in _UNRESERVED:
            out.append(decoded)
        else:
            if decoded in "/\\":
                encoded_slash = True
            out.append("%" + pair.upper())
        i += 3
    return "".join(out), encoded_slash


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                kept.append("")
            continue
        if segment == "..":
            if not kept:
                raise BadPath("the request path climbs above the root")
            kept.pop()
            if last:
                kept.append("")
            continue
        kept.append(segment)
    return "/" + "/".join(kept)


def prefix_matches(prefix: str, path: str) -> bool:
    """Segment-wise PathPrefix: /foo matches /foo, /foo/ and /foo/bar, never /foobar."""
    key = prefix.rstrip("/")
    return key in ("", path) or path.startswith(key + "/")
