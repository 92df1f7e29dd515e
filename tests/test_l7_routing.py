"""L7 routing through the real proxy: precedence, filters, backends, retries, limits."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from dataplane.runtime import Dataplane
from dataplane.table import Table

from .helpers import free_port
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, route, serving


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def get(
    client: aiohttp.ClientSession, port: int, path: str, *, host: str = "example.com", **kwargs: object
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Host": host, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    method = str(kwargs.pop("method", "GET"))
    async with client.request(
        method,
        f"http://127.0.0.1:{port}{path}",
        headers=headers,
        allow_redirects=False,
        **kwargs,  # type: ignore[arg-type]
    ) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


async def test_host_and_path_precedence(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    routes = [
        route(
            "exact",
            port,
            [{"matches": [{"path": {"value": "/"}}], "backendRefs": [backend_ref("a")]}],
            hostnames=["api.example.com"],
        ),
        route(
            "wild",
            port,
            [{"matches": [{"path": {"value": "/"}}], "backendRefs": [backend_ref("b")]}],
            hostnames=["*.example.com"],
        ),
        route(
            "paths",
            port,
            [
                {"matches": [{"path": {"type": "Exact", "value": "/x"}}], "backendRefs": [backend_ref("a")]},
                {"matches": [{"path": {"value": "/docs"}}], "backendRefs": [backend_ref("b")]},
            ],
            hostnames=["paths.test"],
        ),
    ]
    async with serving(l7_table(routes, {"a": [web_a.port], "b": [web_b.port]})):
        assert echoed((await get(client, port, "/q", host="api.example.com"))[2])["backend"] == "a"
        assert echoed((await get(client, port, "/q", host="WWW.Example.com:8080"))[2])["backend"] == "b"
        assert (await get(client, port, "/q", host="example.com"))[0] == 404
        assert echoed((await get(client, port, "/x", host="paths.test"))[2])["backend"] == "a"
        assert (await get(client, port, "/x/y", host="paths.test"))[0] == 404
        assert echoed((await get(client, port, "/docs/a", host="paths.test"))[2])["backend"] == "b"
        assert (await get(client, port, "/docsx", host="paths.test"))[0] == 404


async def test_forwarded_headers_and_hop_by_hop(web_a: HTTPBackend, client: aiohttp.ClientSession) -> None:
    port = free_port()
    routes = [route("r", port, [{"backendRefs": [backend_ref("a")]}])]
    async with serving(l7_table(routes, {"a": [web_a.port]})):
        status, _, body = await get(
            client,
            port,
            "/h",
            headers={
                "Connection": "keep-alive, X-Private",
                "X-Private": "secret",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "X-Forwarded-For": "10.9.9.9",
                "X-Kept": "yes",
            },
        )
    assert status == 200
    seen = echoed(body)["header_map"]
    for gone in ("x-private", "keep-alive", "te", "upgrade"):
        assert gone not in seen
    assert seen["x-kept"] == "yes"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "example.com"
    assert seen["host"] == "example.com"


async def test_header_modifiers_and_rewrites(web_a: HTTPBackend, client: aiohttp.ClientSession) -> None:
    port = free_port()
    rules = [
        {
            "matches": [{"path": {"value": "/api/v2"}}],
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "set": [{"name": "X-Env", "value": "canary"}],
                        "add": [{"name": "X-Add", "value": "1"}],
                        "remove": ["X-Debug"],
                    },
                },
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {
                        "set": [{"name": "Cache-Control", "value": "no-store"}],
                        "remove": ["x-remove-me"],
                    },
                },
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "hostname": "internal.svc",
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"},
                    },
                },
            ],
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"type": "Exact", "value": "/legacy"}}],
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/v1/legacy"}},
                }
            ],
            "backendRefs": [backend_ref("a")],
        },
    ]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]})):
        status, headers, body = await get(
            client, port, "/api/v2/users?id=7", headers={"X-Env": "prod", "X-Debug": "1"}
        )
        seen = echoed(body)
        assert status == 200
        assert seen["path"] == "/users?id=7"
        assert seen["header_map"]["x-env"] == "canary" and seen["header_map"]["x-add"] == "1"
        assert "x-debug" not in seen["header_map"]
        assert seen["header_map"]["host"] == "internal.svc"
        assert headers["cache-control"] == "no-store" and "x-remove-me" not in headers
        assert echoed((await get(client, port, "/api/v2"))[2])["path"] == "/"
        assert (await get(client, port, "/api/v20"))[0] == 404  # prefix matches whole segments
        assert echoed((await get(client, port, "/legacy?a=1"))[2])["path"] == "/v1/legacy?a=1"


@pytest.mark.parametrize(
    ("redirect", "location", "code"),
    [
        ({"scheme": "https"}, "https://example.com/old/page?q=1", 302),
        (
            {"hostname": "new.example.com", "statusCode": 301},
            "http://new.example.com:{port}/old/page?q=1",
            301,
        ),
        ({"port": 8443}, "http://example.com:8443/old/page?q=1", 302),
        ({"scheme": "https", "port": 443}, "https://example.com/old/page?q=1", 302),
        (
            {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}},
            "http://example.com:{port}/new/page?q=1",
            302,
        ),
        (
            {"statusCode": 303, "path": {"type": "ReplaceFullPath", "replaceFullPath": "/done"}},
            "http://example.com:{port}/done?q=1",
            303,
        ),
        ({"statusCode": 307}, "http://example.com:{port}/old/page?q=1", 307),
        ({"statusCode": 308, "scheme": "https"}, "https://example.com/old/page?q=1", 308),
    ],
)
async def test_redirects(
    redirect: dict[str, object], location: str, code: int, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [
        {
            "matches": [{"path": {"value": "/old"}}],
            "filters": [{"type": "RequestRedirect", "requestRedirect": redirect}],
        }
    ]
    async with serving(l7_table([route("r", port, rules)], {})):
        status, headers, _ = await get(client, port, "/old/page?q=1")
    assert status == code
    assert headers["location"] == location.format(port=port)


async def test_weighted_backends(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"backendRefs": [backend_ref("a", 3), backend_ref("b", 1), backend_ref("a", 0)]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port], "b": [web_b.port]})):
        seen = Counter([echoed((await get(client, port, "/w"))[2])["backend"] for _ in range(40)])
    assert seen == {"a": 30, "b": 10}


async def test_unresolved_empty_and_unreachable_backends(client: aiohttp.ClientSession) -> None:
    port = free_port()
    dead = free_port()
    rules = [
        {"matches": [{"path": {"value": "/unresolved"}}], "backendRefs": [{"name": "ghost", "port": 80}]},
        {"matches": [{"path": {"value": "/empty"}}], "backendRefs": [backend_ref("empty")]},
        {"matches": [{"path": {"value": "/dead"}}], "backendRefs": [backend_ref("dead")]},
        {"matches": [{"path": {"value": "/none"}}]},
    ]
    from .helpers import compile_yaml, service

    compiled = compile_yaml(
        service("empty", 80, [])
        + "---\n"
        + service("dead", 80, [("127.0.0.1", dead)])
        + "---\n"
        + __import__("json").dumps(route("r", port, rules))
    )
    async with serving(compiled.table):
        status, _, body = await get(client, port, "/unresolved")
        assert status == 500 and b"does not resolve" in body
        assert (await get(client, port, "/empty"))[0] == 503
        assert (await get(client, port, "/dead"))[0] == 503  # connect failed: as Envoy answers
        assert (await get(client, port, "/none"))[0] == 500


async def test_retries_on_codes_for_idempotent_requests(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}, "backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]})) as dp:
        status, _, body = await get(client, port, "/flaky/2")
        assert (status, body) == (200, b"ok after 3")
        assert (await get(client, port, "/flaky/5"))[0] == 503  # out of attempts
        status, _, _ = await get(client, port, "/flaky/1", method="POST", data=b"x")
        assert status == 503  # POST is not replayed
        serving_l7 = dp.listeners[port]
        stats = serving_l7.memory.rules[("default/r", 0)]  # type: ignore[attr-defined]
        assert stats.retries == 4


async def test_retry_on_connect_failure_moves_to_another_endpoint(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    dead = free_port()
    rules = [{"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}, "backendRefs": [backend_ref("s")]}]
    async with serving(l7_table([route("r", port, rules)], {"s": [dead, web_a.port]})):
        for _ in range(10):
            status, _, body = await get(client, port, "/p", method="POST", data=b"payload")
            assert status == 200 and echoed(body)["body_length"] == 7


async def test_timeouts(web_a: HTTPBackend, client: aiohttp.ClientSession) -> None:
    port = free_port()
    rules = [
        {
            "matches": [{"path": {"value": "/slow/300"}}],
            "timeouts": {"backendRequest": "100ms"},
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"value": "/slow/400"}}],
            "timeouts": {"request": "150ms"},
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"value": "/slow/10"}}],
            "timeouts": {"request": "2s"},
            "backendRefs": [backend_ref("a")],
        },
    ]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]})):
        assert (await get(client, port, "/slow/300"))[0] == 504
        assert (await get(client, port, "/slow/400"))[0] == 504
        assert (await get(client, port, "/slow/10"))[0] == 200


async def test_rate_limit_per_client_and_per_header(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [
        {
            "matches": [{"path": {"value": "/ip"}}],
            "rateLimit": {"requests": 3, "unit": "Minute"},
            "backendRefs": [backend_ref("a")],
        },
        {
            "matches": [{"path": {"value": "/key"}}],
            "rateLimit": {"requests": 2, "unit": "Hour", "key": {"header": "x-api-key"}},
            "backendRefs": [backend_ref("a")],
        },
    ]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]})):
        codes = [(await get(client, port, "/ip"))[0] for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        status, headers, _ = await get(client, port, "/ip")
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 20
        alice = [(await get(client, port, "/key", headers={"x-api-key": "alice"}))[0] for _ in range(3)]
        bob = [(await get(client, port, "/key", headers={"x-api-key": "bob"}))[0] for _ in range(2)]
        assert alice == [200, 200, 429] and bob == [200, 200]


async def test_upstream_connections_are_reused(web_a: HTTPBackend, client: aiohttp.ClientSession) -> None:
    port = free_port()
    async with serving(
        l7_table([route("r", port, [{"backendRefs": [backend_ref("a")]}])], {"a": [web_a.port]})
    ) as dp:
        for _ in range(20):
            assert (await get(client, port, "/k"))[0] == 200
        assert dp.listeners[port].pool.connects == 1  # type: ignore[attr-defined]
    assert len(web_a.peers) == 1


async def test_passive_ejection_on_5xx(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [{"loadBalancing": {"policy": "RoundRobin"}, "backendRefs": [backend_ref("s")]}]
    async with serving(l7_table([route("r", port, rules)], {"s": [web_a.port, web_b.port]})) as dp:
        for _ in range(8):
            await get(client, port, "/status/503")
        state_a = dp.health.endpoint("127.0.0.1", web_a.port)
        state_b = dp.health.endpoint("127.0.0.1", web_b.port)
        assert state_a.ejections >= 1 and state_b.ejections >= 1


async def test_consistent_hash_on_header(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    rules = [
        {
            "loadBalancing": {"policy": "ConsistentHash", "key": {"header": "x-user"}},
            "backendRefs": [backend_ref("s")],
        }
    ]
    async with serving(l7_table([route("r", port, rules)], {"s": [web_a.port, web_b.port]})):
        for user in ("alice", "bob", "carol", "dave"):
            backends = {
                echoed((await get(client, port, "/c", headers={"x-user": user}))[2])["backend"]
                for _ in range(5)
            }
            assert len(backends) == 1


async def test_table_swap_keeps_requests_flowing(
    web_a: HTTPBackend, web_b: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    port = free_port()
    first = l7_table(
        [route("r", port, [{"backendRefs": [backend_ref("a")]}])], {"a": [web_a.port]}, generation=1
    )
    second = l7_table(
        [route("r", port, [{"backendRefs": [backend_ref("b")]}])], {"b": [web_b.port]}, generation=2
    )
    async with serving(first) as dp:
        slow = asyncio.create_task(get(client, port, "/slow/300"))
        await asyncio.sleep(0.05)
        await dp.apply(second)
        assert (await slow)[0] == 200  # in flight across the swap
        assert echoed((await get(client, port, "/after"))[2])["backend"] == "b"


async def test_access_log_and_metrics(
    web_a: HTTPBackend, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane.metrics import DataplaneCollector

    port = free_port()
    rules = [{"matches": [{"path": {"value": "/api"}}], "backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]}), access_log=True) as dp:
        with caplog.at_level("INFO", logger="bilayer.access"):
            await get(client, port, "/api/x?y=1", host="shop.test")
            await get(client, port, "/nope", host="shop.test")
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
    entries = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert entries[0]["url"] == "http://shop.test/api/x?y=1"
    assert entries[0]["status"] == 200 and entries[0]["route"] == "default/r" and entries[0]["rule"] == 0
    assert entries[0]["upstream"] == f"127.0.0.1:{web_a.port}" and entries[0]["retries"] == 0
    assert entries[1]["status"] == 404 and entries[1]["route"] is None
    labels = f'code="2xx",port="{port}",route="default/r",rule="0"'
    assert f"bilayer_l7_route_responses_total{{{labels}}} 1.0" in text
    assert f'bilayer_l7_responses_total{{code="4xx",port="{port}"}} 1.0' in text
    assert f'bilayer_l7_route_duration_seconds_count{{port="{port}",route="default/r",rule="0"}} 1.0' in text


async def test_route_metrics_off_keeps_the_port_and_cluster_families_only(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane.metrics import DataplaneCollector

    port = free_port()
    rules = [{"backendRefs": [backend_ref("a")]}]
    async with serving(l7_table([route("r", port, rules)], {"a": [web_a.port]}), route_metrics=False) as dp:
        assert (await get(client, port, "/x"))[0] == 200
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
        stats = dp.listeners[port].memory.rules[("default/r", 0)]  # type: ignore[attr-defined]
    assert "bilayer_l7_route_" not in text  # not even the HELP and TYPE lines
    assert f'bilayer_l7_responses_total{{code="2xx",port="{port}"}} 1.0' in text
    assert f'bilayer_l7_cluster_requests_total{{cluster="default/a:80",port="{port}"}} 1.0' in text
    assert stats.responses[2] == 1  # the rule still counts: only its series are left out


async def test_a_removed_rule_takes_its_metric_series_with_it(
    web_a: HTTPBackend, client: aiohttp.ClientSession
) -> None:
    """Per-rule series of routes that left the table are dropped, whether the table came
    whole or as a delta: kept, every route ever served stayed a set of series until restart."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane import delta
    from dataplane.metrics import DataplaneCollector

    port = free_port()
    rules = [{"backendRefs": [backend_ref("a")]}]

    def routes(*names: str, generation: int) -> Table:
        made = [route(n, port, rules, hostnames=[f"{n}.test"]) for n in names]
        return l7_table(made, {"a": [web_a.port]}, generation=generation)

    def series(dp: Dataplane) -> set[str]:
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
        return {n for n in ("one", "two", "three") if f'route="default/{n}"' in text}

    async with serving(routes("one", "two", "three", generation=1)) as dp:
        for name in ("one", "two", "three"):
            assert (await get(client, port, "/", host=f"{name}.test"))[0] == 200
        assert series(dp) == {"one", "two", "three"}
        # A delta removes "two".
        current = dp.table
        assert current is not None
        smaller = routes("one", "three", generation=2)
        change = delta.diff(current, smaller)
        assert await dp.apply_delta(delta.parse(change.to_json()))
        assert series(dp) == {"one", "three"}
        # A whole table removes "three".
        assert await dp.apply(routes("one", generation=3))
        assert series(dp) == {"one"}
        assert (await get(client, port, "/", host="one.test"))[0] == 200
