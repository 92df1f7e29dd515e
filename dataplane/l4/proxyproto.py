"""PROXY protocol headers (HAProxy's spec, v1 text and v2 binary) sent to backends.

They carry the original client address and port, which the backend would otherwise
see as the dataplane's.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY_COMMAND = 0x21  # version 2, command PROXY
_TCP4 = 0x11
_TCP6 = 0x21

Address = tuple[str, int]


def header(version: str, source: Address, destination: Address) -> bytes:
    """The header for a client at source that connected to destination."""
    if version == "V1":
        return v1(source, destination)
    if version == "V2":
        return v2(source, destination)
    return b""


def v1(source: Address, destination: Address) -> bytes:
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()


def v2(source: Address, destination: Address) -> bytes:
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        # LOCAL-style unknown family: the receiver uses the connection's own addresses.
        return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY_COMMAND, 0x00, 0)
    family = _TCP4 if src.version == 4 else _TCP6
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY_COMMAND, family, len(body)) + body
