"""HTTP/2 as an attacker speaks it, to an HTTP/1.1 backend that records every byte
(rawkit's strict parser is the referee): a stream the client sends is at most one request
the backend parses, with no line or field the client could inject, and a malformed stream
is refused on its own (4xx or RST_STREAM) while the connection's other streams go on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .h2kit import H2Probe, get
from .helpers import free_port
from .l7kit import serving
from .rawkit import RawBackend, raw_table


@pytest.fixture
async def backend() -> AsyncIterator[RawBackend]:
    raw = await RawBackend().start()
    yield raw
    await raw.stop()


async def hostile_probe(port: int) -> H2Probe:
    """A client whose own h2 sends whatever the test asks, valid or not."""
    probe = await H2Probe.open(port)
    probe.h2.config.validate_outbound_headers = False
    probe.h2.config.normalize_outbound_headers = False
    return probe


# Heads h2 lets through (it refuses only NUL, CR, LF, uppercase and the RFC 9113 8.2 rules)
# but that an HTTP/1.1 backend must never read: each one answered 400 by the proxy.
REFUSED_400: dict[str, dict[str, Any]] = {
    "method not a token": {"method": "G(T"},
    "method with a space": {"method": "GET /evil"},
    "path with a space": {"path": "/a HTTP/1.1 /b"},
    "path in absolute form, Host overridden": {"path": "http://evil.test/x"},
    "path that is not a path": {"path": "x"},
    "asterisk form": {"path": "*", "method": "OPTIONS"},
    "DEL in a value": {"headers": [("x-a", "1\x7f2")]},
    "control character in a value": {"headers": [("x-a", "1\x012")]},
    "vertical tab in a value": {"headers": [("x-a", "1\x0b2")]},
    "name not a token": {"headers": [("x-a(b)", "1")]},
}


@pytest.mark.parametrize("name", sorted(REFUSED_400))
async def test_heads_http1_cannot_carry_are_refused_before_the_backend(
    backend: RawBackend, name: str
) -> None:
    port = free_port()
    async with serving(raw_table(port, backend)):
        probe = await hostile_probe(port)
        attack = dict(REFUSED_400[name])
        status, _, _ = await get(probe, attack.pop("path", "/x"), **attack)
        assert status == 400
        assert backend.count == 0 and not backend.malformed
        assert b"evil" not in b"".join(c.received for c in backend.connections)
        # The connection goes on, and the backend parses the next stream as sent.
        status, _, _ = await get(probe, "/after")
        assert status == 200 and [r.target for r in backend.requests] == ["/after"]
        assert probe.goaway() is None
        await probe.close()
