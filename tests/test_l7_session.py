"""Session persistence through the real proxy: a client stays on its endpoint while it is
there and available, moves (with a new token) when it is not; and the token's rules."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dataplane import table
from dataplane.health import EndpointState
from dataplane.l7.session import SessionPolicy

from .helpers import free_port
from .l7kit import HTTPBackend, echoed, l7_table, route, serving


@pytest.fixture
async def trio() -> AsyncIterator[list[HTTPBackend]]:
    backends = [await HTTPBackend(f"a{i}").start() for i in range(3)]
    yield backends
    for backend in backends:
        await backend.stop()


def sticky_rule(persistence: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "sessionPersistence": persistence,
            "loadBalancing": {"policy": "RoundRobin"},
            "backendRefs": [{"name": "a", "port": 80}],
            **extra,
        }
    ]


async def fetch(
    port: int, headers: dict[str, str] | None = None
) -> tuple[str, aiohttp.typedefs.LooseHeaders]:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(f"http://127.0.0.1:{port}/s", headers=headers or {}) as resp,
    ):
        assert resp.status == 200
        return echoed(await resp.read())["backend"], resp.headers


def cookie_of(headers: Any, name: str) -> str:
    values = [v for v in headers.getall("set-cookie", []) if v.startswith(name + "=")]
    assert len(values) == 1, headers
    return str(values[0].split(";")[0].split("=", 1)[1])


async def test_a_cookie_keeps_the_client_on_its_endpoint_until_the_endpoint_leaves(
    trio: list[HTTPBackend],
) -> None:
    port = free_port()
    rules = sticky_rule({"cookie": {"name": "sid"}})
    ports = [b.port for b in trio]
    async with serving(l7_table([route("r", port, rules)], {"a": ports})) as dataplane:
        first, headers = await fetch(port)
        set_cookie = headers["set-cookie"]
        assert "Path=/" in set_cookie and "HttpOnly" in set_cookie and "Max-Age" not in set_cookie
        token = cookie_of(headers, "sid")
        assert str(trio[0].port) not in token and "127.0.0.1" not in token  # no address shown
        stuck = Counter()
        for _ in range(12):
            backend, headers = await fetch(port, {"Cookie": f"theme=dark; sid={token}"})
            stuck[backend] += 1
            assert "set-cookie" not in headers  # a valid token without timeouts is not renewed
        assert stuck == {first: 12}
        spread = Counter([(await fetch(port))[0] for _ in range(6)])
        assert len(spread) == 3  # without the cookie: balanced as usual

        # The endpoint leaves the table: the client moves, and is given a new cookie.
        index = int(first[1])
        others = [p for i, p in enumerate(ports) if i != index]
        await dataplane.apply(l7_table([route("r", port, rules)], {"a": others}, generation=2))
        moved, headers = await fetch(port, {"Cookie": f"sid={token}"})
        assert moved != first
        token = cookie_of(headers, "sid")
        assert Counter([(await fetch(port, {"Cookie": f"sid={token}"}))[0] for _ in range(6)]) == {moved: 6}


async def test_a_client_moves_when_its_endpoint_fails(trio: list[HTTPBackend]) -> None:
    port = free_port()
    rules = sticky_rule({"cookie": {"name": "sid"}}, retry={"attempts": 1, "codes": [503]})
    async with serving(l7_table([route("r", port, rules)], {"a": [b.port for b in trio]})):
        first, headers = await fetch(port)
        token = cookie_of(headers, "sid")
        await next(b for b in trio if b.name == first).stop()
        # The pinned endpoint refuses the connection; the retry goes elsewhere, and the
        # answer names the endpoint that gave it.
        moved, headers = await fetch(port, {"Cookie": f"sid={token}"})
        assert moved != first
        new_token = cookie_of(headers, "sid")
        assert new_token != token
        assert Counter([(await fetch(port, {"Cookie": f"sid={new_token}"}))[0] for _ in range(4)]) == {
            moved: 4
        }


async def test_a_header_session_with_an_idle_timeout_is_renewed_on_every_answer(
    trio: list[HTTPBackend],
) -> None:
    port = free_port()
    rules = sticky_rule({"type": "Header", "header": {"name": "X-Session"}, "idleTimeout": "10m"})
    async with serving(l7_table([route("r", port, rules)], {"a": [b.port for b in trio]})):
        first, headers = await fetch(port)
        token = headers["x-session"]
        eid, created, _ = token.split(".")
        for _ in range(5):
            backend, headers = await fetch(port, {"X-Session": token})
            assert backend == first
            renewed = headers["x-session"].split(".")
            assert renewed[:2] == [eid, created]  # same endpoint, same start; last use renewed
        # A token idle for longer than the timeout starts a new session.
        began = f"{int(time.time() - 700):x}"
        stale = f"{eid}.{began}.{began}"
        _, headers = await fetch(port, {"X-Session": stale})
        assert headers["x-session"].split(".")[1] != began  # a new session, not the old one renewed
        fresh = f"{eid}.{began}.{int(time.time() - 5):x}"  # the same start, used recently: kept
        _, headers = await fetch(port, {"X-Session": fresh})
        assert headers["x-session"].split(".")[:2] == [eid, began]


@pytest.mark.parametrize(
    "token",
    ["garbage", "", "0000000000000000", "..", "a.b.c", "%s.zz.zz"],
)
async def test_malformed_tokens_are_a_new_session(trio: list[HTTPBackend], token: str) -> None:
    port = free_port()
    rules = sticky_rule({"cookie": {"name": "sid"}, "absoluteTimeout": "1h"})
    async with serving(l7_table([route("r", port, rules)], {"a": [b.port for b in trio]})):
        _, headers = await fetch(port)
        good = cookie_of(headers, "sid")
        value = token % good.split(".")[0] if "%s" in token else token
        _, headers = await fetch(port, {"Cookie": f"sid={value}"})
        assert cookie_of(headers, "sid") != value


# --- the token's rules, on the policy itself (times given, not waited for) ---


def policy(**session: Any) -> tuple[SessionPolicy, list[EndpointState]]:
    endpoints = [EndpointState("10.0.0.1", 8080), EndpointState("10.0.0.2", 8080)]
    config = table.Session(type="Cookie", name="sid", **session)
    return SessionPolicy(config, [("ns/a:80", endpoints)]), endpoints


def test_absolute_timeout_ends_a_session_and_sets_max_age_when_permanent() -> None:
    sessions, endpoints = policy(absoluteTimeout=3600.0, permanent=True)
    name, value = sessions.issue(0, endpoints[1], None, 1_000_000.0, secure=True) or (b"", b"")
    assert name == b"set-cookie"
    text = value.decode()
    assert text.startswith("sid=") and "; Max-Age=3600" in text and "; Secure" in text
    token = text.split(";")[0].split("=", 1)[1]
    pin = sessions.find(token, 1_000_000.0 + 3599)
    assert pin is not None and pin.endpoint is endpoints[1]
    assert sessions.issue(0, endpoints[1], pin, 1_000_000.0 + 3599, secure=True) is None  # no idle timeout
    assert sessions.find(token, 1_000_000.0 + 3601) is None
    # Renewed for another endpoint, Max-Age counts from the new start.
    other = sessions.issue(0, endpoints[0], pin, 1_000_000.0 + 3000, secure=False)
    assert other is not None and b"Max-Age=3600" in other[1] and b"Secure" not in other[1]


def test_idle_timeout_and_clock_rules() -> None:
    sessions, endpoints = policy(idleTimeout=60.0)
    now = 2_000_000.0
    issued = sessions.issue(0, endpoints[0], None, now, secure=False)
    assert issued is not None
    token = issued[1].decode().split(";")[0].split("=", 1)[1]
    eid, created, last = token.split(".")
    assert sessions.find(token, now + 59) is not None
    assert sessions.find(token, now + 61) is None
    future = f"{eid}.{int(now + 3600):x}.{int(now + 3600):x}"
    assert sessions.find(future, now) is None  # dated beyond the allowed clock skew
    backwards = f"{eid}.{int(now):x}.{int(now - 10):x}"
    assert sessions.find(backwards, now) is None  # used before it began
    assert sessions.find(f"{eid}", now) is None  # a timed session needs its times
    untimed, _ = policy()
    assert untimed.find(f"{eid}.{created}.{last}", now) is None  # and an untimed one has none
    assert untimed.find(eid, now) is not None
