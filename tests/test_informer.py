"""List-then-watch: relists replace the store's view; errors are retried; tasks supervised."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controlplane.informer import Informer
from controlplane.store import Store
from controlplane.supervisor import Supervisor

from .helpers import async_wait_for, load_yaml

ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: %s, namespace: shop, resourceVersion: "%d"}
spec: {port: %d, rules: [{backendRefs: [{name: web, port: 80}]}]}
"""


def route(name: str, version: int, port: int) -> dict[str, Any]:
    return load_yaml(ROUTE % (name, version, port))[0]


class ScriptedApi:
    """Answers lists and watches from a script; the watch then waits for more."""

    def __init__(
        self, lists: list[list[dict[str, Any]]], watches: list[list[dict[str, Any] | Exception]]
    ) -> None:
        self.lists = lists
        self.watches = watches
        self.watched_from: list[str] = []
        self.idle = asyncio.Event()

    async def list(self, path: str, params: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
        items = self.lists.pop(0)
        return items, str(max([int(i["metadata"]["resourceVersion"]) for i in items] or [0]))

    async def watch(
        self,
        path: str,
        version: str,
        params: dict[str, str] | None = None,
        *,
        timeout: int = 300,  # noqa: ASYNC109
    ) -> AsyncIterator[dict[str, Any]]:
        self.watched_from.append(version)
        if not self.watches:
            self.idle.set()
            await asyncio.Event().wait()
        for item in self.watches.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


async def run_informer(api: ScriptedApi, store: Store) -> tuple[Informer, asyncio.Task[None]]:
    informer = Informer(
        api,  # type: ignore[arg-type]
        "l7routes",
        "/apis/bilayer.dev/v1alpha1/l7routes",
        lambda items: store.replace_all("L7Route", items),
        lambda event, body: store.apply("L7Route", event, body),
    )
    return informer, asyncio.create_task(informer.run())


async def test_a_relist_after_410_drops_what_was_deleted_meanwhile() -> None:
    """The ghost objects of the issue: deleted while the watch was gone, kept forever
    (kopf's relist re-adds what exists and says nothing of what does not)."""
    store = Store()
    api = ScriptedApi(
        lists=[[route("a", 1, 8080), route("b", 2, 8081)], [route("a", 1, 8080)]],
        watches=[[{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]],
    )
    informer, task = await run_informer(api, store)
    await asyncio.wait_for(api.idle.wait(), 5)
    assert sorted(k.name for k in store.objects) == ["a"]
    assert informer.lists == 2 and informer.restarts == 1
    task.cancel()


@pytest.mark.looptime  # backoffs and watch floors on the fake clock
async def test_a_dropped_watch_resumes_from_the_last_version_seen() -> None:
    store = Store()
    api = ScriptedApi(
        lists=[[route("a", 1, 8080)]],
        watches=[
            [{"type": "ADDED", "object": route("b", 5, 8081)}, aiohttp.ServerDisconnectedError()],
            [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}],
            [{"type": "DELETED", "object": route("a", 10, 8080)}],
        ],
    )
    informer, task = await run_informer(api, store)
    await asyncio.wait_for(api.idle.wait(), 10)
    assert api.watched_from == ["1", "5", "9", "10"]  # no relist: nothing was lost
    assert informer.lists == 1 and sorted(k.name for k in store.objects) == ["b"]
    task.cancel()


async def test_failing_tasks_are_restarted_and_an_ended_task_fails_health() -> None:
    """Before, the leader loop, the compile loop and the pod watch ended for good on
    ServerDisconnectedError while liveness said 200."""
    supervisor = Supervisor()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise aiohttp.ServerDisconnectedError()
        await asyncio.Event().wait()

    async def quits() -> None:
        return

    supervisor.spawn("flaky", flaky)
    await async_wait_for(lambda: runs == 3, deadline_s=10, what="two restarts")
    assert supervisor.healthy and supervisor.restarts["flaky"] == 2
    supervisor.spawn("quits", quits)
    await async_wait_for(lambda: not supervisor.healthy, what="health to fail")
    assert supervisor.ended == ["quits"]
    await supervisor.stop()


async def test_healthz_follows_the_supervised_tasks() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from controlplane.observe import Metrics, health_app

    healthy = True
    app = health_app(Metrics(), lambda: healthy, lambda: False, lambda: None)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503  # still listing
        healthy = False
        assert (await client.get("/healthz")).status == 503
        assert "bilayer_operator_compiles_total" in await (await client.get("/metrics")).text()


def informer_of(api: ScriptedApi, on_list: Any, on_event: Any) -> Informer:
    return Informer(api, "l7routes", "/apis/bilayer.dev/v1alpha1/l7routes", on_list, on_event)  # type: ignore[arg-type]


@pytest.mark.looptime  # backoffs and watch floors on the fake clock
async def test_an_event_whose_handler_failed_is_delivered_again() -> None:
    """The version moved past an event before its handler ran: when the handler raised,
    the watch resumed after the event, and the event was lost for good."""
    store = Store()
    failures = [RuntimeError("a bug, once")]

    def on_event(event: str, body: Any) -> None:
        if failures and body["metadata"]["name"] == "b":
            raise failures.pop()
        store.apply("L7Route", event, body)

    api = ScriptedApi(
        lists=[[route("a", 1, 8080)]],
        # The server sends from the version asked for: b again when resumed from 1.
        watches=[[{"type": "ADDED", "object": route("b", 5, 8081)}]] * 2,
    )
    informer = informer_of(api, lambda items: store.replace_all("L7Route", items), on_event)
    supervisor = Supervisor()
    supervisor.spawn("watch", informer.run)  # restarted after the handler's exception
    await asyncio.wait_for(api.idle.wait(), 10)
    assert api.watched_from == ["1", "1", "5"]
    assert sorted(k.name for k in store.objects) == ["a", "b"]
    await supervisor.stop()


@pytest.mark.looptime  # backoffs and watch floors on the fake clock
async def test_a_list_whose_handler_failed_is_listed_again() -> None:
    """The list's version was kept although on_list raised: the restarted informer went
    straight to watching, `synced` was never set and the operator's start waited forever."""
    store = Store()
    calls = 0

    def on_list(items: list[dict[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug, once")
        store.replace_all("L7Route", items)

    api = ScriptedApi(lists=[[route("a", 1, 8080)], [route("a", 1, 8080)]], watches=[])
    informer = informer_of(api, on_list, lambda event, body: None)
    supervisor = Supervisor()
    supervisor.spawn("watch", informer.run)
    await asyncio.wait_for(informer.synced.wait(), 10)
    assert calls == 2 and informer.lists == 1 and [k.name for k in store.objects] == ["a"]
    await supervisor.stop()


@pytest.mark.looptime
async def test_watches_the_server_ends_at_once_are_reopened_at_most_once_a_second() -> None:
    """A server (or a proxy in front of it) that closes every watch cleanly at once was
    asked again in a tight loop."""
    store = Store()
    api = ScriptedApi(lists=[[route("a", 1, 8080)]], watches=[[] for _ in range(10)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, task = await run_informer(api, store)
    await asyncio.wait_for(api.idle.wait(), 60)
    assert len(api.watched_from) == 11
    assert loop.time() - started >= 9.5  # ten that ended at once: a second each
    task.cancel()
