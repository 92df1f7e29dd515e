"""Gateway API filters through the real proxy: header modifiers' multi-value rules, filters
on a backendRef, and CORS (the cases of the upstream HTTPRouteCORS conformance test, written
here for L7Route)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, raw, route, serving


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def response_lines(data: bytes) -> list[tuple[str, str]]:
    """The header lines of the first response in data, names lower-cased, in order."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in head)]


async def test_header_modifiers_follow_the_spec_for_case_and_multiple_values(web_a: HTTPBackend) -> None:
    """add appends to the existing value ("foo" + "bar" = "foo,bar"), over every line of the
    name; set replaces every line whatever the case; remove ignores case; Set-Cookie keeps
    one line per cookie."""
    port = free_port()
    rules = [
        {
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "add": [{"name": "My-Header", "value": "bar"}, {"name": "X-New", "value": "1"}],
                        "set": [{"name": "X-Set", "value": "only"}],
                        "remove": ["x-GONE"],
                    },
                },
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {
                        "add": [
                            {"name": "X-Backend", "value": "extra"},
                            {"name": "Set-Cookie", "value": "proxy=2"},
                        ],
                    },
                },
            ],
            "backendRefs": [backend_ref("a")],
        }
    ]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]})):
        request = (
            b"GET /h HTTP/1.1\r\nHost: example.com\r\nmy-header: foo\r\nMY-HEADER: baz\r\n"
            b"x-set: one\r\nX-Set: two\r\nX-Gone: 1\r\nConnection: close\r\n\r\n"
        )
        answer = await raw(port, request)
        seen = [tuple(pair) for pair in echoed(answer.split(b"\r\n\r\n", 1)[1])["headers"]]
        names = [n for n, _ in seen]
        assert ("my-header", "foo,baz,bar") in seen and names.count("my-header") == 1
        assert ("x-set", "only") in seen and names.count("x-set") == 1
        assert "x-gone" not in names and ("x-new", "1") in seen
        answer = await raw(
            port, b"GET /cors-aware HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
        )
        lines = response_lines(answer)
        assert ("x-backend", "a,extra") in lines
        assert [v for n, v in lines if n == "set-cookie"] == ["backend=1", "proxy=2"]


async def test_filters_on_a_backend_apply_only_to_requests_sent_to_it(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    canary = {
        "name": "b",
        "port": 80,
        "weight": 1,
        "filters": [
            {
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {"add": [{"name": "X-Canary", "value": "yes"}]},
            },
            {
                "type": "ResponseHeaderModifier",
                "responseHeaderModifier": {"set": [{"name": "X-Served-By", "value": "canary"}]},
            },
            {
                "type": "URLRewrite",
                "urlRewrite": {
                    "hostname": "canary.internal",
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
                },
            },
        ],
    }
    rules = [
        {
            "matches": [{"path": {"value": "/shop"}}],
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"set": [{"name": "X-Rule", "value": "1"}]},
                }
            ],
            "backendRefs": [backend_ref("a"), canary],
        }
    ]
    table = l7_table([route("r", port, rules)], {"a": [web_a.port], "b": [web_b.port]})
    async with serving(table):
        seen: Counter[str] = Counter()
        for _ in range(10):
            async with client.get(
                f"http://127.0.0.1:{port}/shop/cart", headers={"Host": "example.com"}
            ) as resp:
                report = echoed(await resp.read())
                headers = report["header_map"]
                seen[report["backend"]] += 1
                assert headers["x-rule"] == "1"  # the rule's filter: every backend
                if report["backend"] == "b":
                    assert headers["x-canary"] == "yes" and headers["host"] == "canary.internal"
                    assert report["path"] == "/v2/cart"
                    assert resp.headers["x-served-by"] == "canary"
                else:
                    assert "x-canary" not in headers and headers["host"] == "example.com"
                    assert report["path"] == "/shop/cart"
                    assert "x-served-by" not in resp.headers
    assert seen == {"a": 5, "b": 5}


# --- CORS ---

CORS_ROUTES: list[dict[str, Any]] = [
    {
        "matches": [{"path": {"value": "/cors-1"}}],
        "filters": [
            {
                "type": "CORS",
                "cors": {
                    "allowOrigins": ["https://www.foo.com", "https://*.bar.com"],
                    "allowMethods": ["GET", "OPTIONS"],
                    "allowHeaders": ["x-header-1", "x-header-2"],
                    "exposeHeaders": ["x-header-3", "x-header-4"],
                    "allowCredentials": True,
                    "maxAge": 3600,
                },
            }
        ],
        "backendRefs": [backend_ref("a")],
    },
    {
        "matches": [{"path": {"value": "/cors-2"}}],
        "filters": [
            {"type": "CORS", "cors": {"allowOrigins": ["https://www.foo.com"], "allowMethods": ["*"]}}
        ],
        "backendRefs": [backend_ref("a")],
    },
    {
        "matches": [{"path": {"value": "/any-origin"}}],
        "filters": [{"type": "CORS", "cors": {"allowOrigins": ["*"], "allowMethods": ["PUT"]}}],
        "backendRefs": [backend_ref("a")],
    },
    {
        "matches": [{"path": {"value": "/echo-all"}}],
        "filters": [
            {
                "type": "CORS",
                "cors": {
                    "allowOrigins": ["*"],
                    "allowMethods": ["*"],
                    "allowHeaders": ["*"],
                    "exposeHeaders": ["*"],
                    "allowCredentials": True,
                },
            }
        ],
        "backendRefs": [backend_ref("a")],
    },
    {"matches": [{"path": {"value": "/plain"}}], "backendRefs": [backend_ref("a")]},
]


def _tokens(value: str) -> set[str]:
    return {t.strip() for t in value.split(",")}


@pytest.fixture
async def cors_port(web_a: HTTPBackend) -> AsyncIterator[int]:
    port = free_port()
    async with serving(l7_table([route("r", port, CORS_ROUTES)], {"a": [web_a.port]})):
        yield port


async def call(
    port: int, method: str, path: str, headers: dict[str, str]
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as resp,
    ):
        return resp.status, resp.headers, await resp.read()


PREFLIGHT = {
    "access-control-request-method": "GET",
    "access-control-request-headers": "x-header-1, x-header-2",
}


@pytest.mark.parametrize("origin", ["https://www.foo.com", "https://www.bar.com", "https://xpto.www.bar.com"])
async def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_proxy(
    cors_port: int, web_a: HTTPBackend, origin: str
) -> None:
    status, headers, body = await call(cors_port, "OPTIONS", "/cors-1", {"Origin": origin, **PREFLIGHT})
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == origin
    assert _tokens(headers["access-control-allow-methods"]) == {"GET", "OPTIONS"}
    assert _tokens(headers["access-control-allow-headers"]) == {"x-header-1", "x-header-2"}
    assert _tokens(headers["access-control-expose-headers"]) == {"x-header-3", "x-header-4"}
    assert headers["access-control-max-age"] == "3600"
    assert headers["access-control-allow-credentials"] == "true"
    assert "origin" in headers.get("vary", "").lower()
    assert web_a.calls == {}  # never forwarded


@pytest.mark.parametrize(
    "origin",
    [
        "https://foobar.com",
        "https://bar.com",  # "*.bar.com" needs a label left of the suffix
        "http://www.foo.com",  # another scheme
        "https://www.foo.com:8443",  # another port (443 is assumed when none is given)
        "https://www.foo.com.evil.test",
        "null",
    ],
)
async def test_cors_preflight_from_another_origin_is_refused_without_cors_headers(
    cors_port: int, web_a: HTTPBackend, origin: str
) -> None:
    status, headers, _ = await call(cors_port, "OPTIONS", "/cors-1", {"Origin": origin, **PREFLIGHT})
    assert status == 403
    assert not [h for h in headers if h.lower().startswith("access-control-")]
    assert web_a.calls == {}


async def test_cors_default_port_matches_an_explicit_one(cors_port: int) -> None:
    status, headers, _ = await call(
        cors_port, "OPTIONS", "/cors-1", {"Origin": "https://www.foo.com:443", **PREFLIGHT}
    )
    assert status == 204 and headers["access-control-allow-origin"] == "https://www.foo.com:443"


async def test_cors_actual_requests_get_the_policy_headers_and_the_backends_are_replaced(
    cors_port: int, web_a: HTTPBackend
) -> None:
    status, headers, _ = await call(cors_port, "GET", "/cors-1/cors-aware", {"Origin": "https://www.bar.com"})
    assert status == 200 and web_a.calls == {"/cors-1/cors-aware": 1}
    assert headers.getall("access-control-allow-origin") == ["https://www.bar.com"]  # not the backend's "*"
    assert headers["access-control-allow-credentials"] == "true"
    assert _tokens(headers["access-control-expose-headers"]) == {"x-header-3", "x-header-4"}
    status, headers, _ = await call(cors_port, "GET", "/cors-1/cors-aware", {"Origin": "https://foobar.com"})
    assert status == 200 and "access-control-allow-origin" not in headers
    assert "origin" in headers["vary"].lower()
    # Without a CORS filter the backend's own headers pass untouched.
    status, headers, _ = await call(cors_port, "GET", "/plain/cors-aware", {"Origin": "https://x.test"})
    assert headers["access-control-allow-origin"] == "*"


async def test_cors_an_options_request_that_is_not_a_preflight_is_forwarded(
    cors_port: int, web_a: HTTPBackend
) -> None:
    status, _, _ = await call(cors_port, "OPTIONS", "/cors-1/x", {"Origin": "https://www.foo.com"})
    assert status == 200 and web_a.calls == {"/cors-1/x": 1}


async def test_cors_wildcards_without_credentials_answer_star(cors_port: int) -> None:
    status, headers, _ = await call(
        cors_port,
        "OPTIONS",
        "/cors-2",
        {"Origin": "https://www.foo.com", "access-control-request-method": "POST"},
    )
    assert status == 204 and headers["access-control-allow-methods"] in ("POST", "*")
    assert "access-control-allow-credentials" not in headers
    for origin in ("https://foobar.com", "https://foobar.com:12345"):
        status, headers, _ = await call(
            cors_port, "OPTIONS", "/any-origin", {"Origin": origin, "access-control-request-method": "PUT"}
        )
        assert status == 204 and headers["access-control-allow-origin"] in (origin, "*")
        assert headers["access-control-allow-methods"] == "PUT"
        assert "access-control-allow-credentials" not in headers
        status, headers, _ = await call(cors_port, "PUT", "/any-origin", {"Origin": origin})
        assert status == 200 and headers["access-control-allow-origin"] in (origin, "*")


async def test_cors_wildcards_with_credentials_echo_the_request(cors_port: int) -> None:
    """The spec: with allowCredentials a "*" is never answered; the request's own origin,
    method and headers are, and "*" expose headers are left out."""
    status, headers, _ = await call(
        cors_port,
        "OPTIONS",
        "/echo-all",
        {
            "Origin": "https://other.foo.com",
            "access-control-request-method": "PUT",
            "access-control-request-headers": "x-header-1, x-header-2",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://other.foo.com"
    assert headers["access-control-allow-methods"] == "PUT"
    assert _tokens(headers["access-control-allow-headers"]) == {"x-header-1", "x-header-2"}
    assert headers["access-control-allow-credentials"] == "true"
    assert "access-control-expose-headers" not in headers
