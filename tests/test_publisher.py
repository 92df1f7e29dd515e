"""The publisher against in-process dataplane admin APIs: what it pushes, and when."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from controlplane.publisher import Pod, Publisher
from dataplane.admin import build_app, serve
from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table

from .helpers import async_wait_for, free_port
from .test_admin import table

TOKEN = "t"


@dataclass
class FakePod:
    dataplane: Dataplane
    pod: Pod
    delay: float = 0.0  # seconds each PUT/PATCH waits before it is applied
    refuse: bool = False  # answer 400 to every push
    # Set when the test is done: a push still waiting out its delay goes on at once, so
    # that stopping the server does not wait for it.
    done: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def pods() -> AsyncIterator[Callable[[], Awaitable[FakePod]]]:
    runners: list[web.AppRunner] = []
    made: list[FakePod] = []

    async def make() -> FakePod:
        dataplane = Dataplane(Settings(address="127.0.0.1"), factories={})
        port = free_port()
        fake = FakePod(dataplane, Pod(uid=f"uid-{port}", name=f"pod-{port}", address="127.0.0.1", port=port))

        @web.middleware
        async def behave(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.method in ("PUT", "PATCH"):
                if fake.delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(fake.done.wait(), fake.delay)
                else:
                    await asyncio.sleep(0)
                if fake.refuse:
                    return web.json_response({"error": "no"}, status=400)
            return await handler(request)

        app = build_app(dataplane, TOKEN)
        app.middlewares.insert(0, behave)
        runners.append(await serve(app, "127.0.0.1", port))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.done.set()
    for runner in runners:
        await runner.cleanup()
    for fake in made:
        await fake.dataplane.close()


def served(fake: FakePod) -> Table | None:
    return fake.dataplane.table


async def test_a_table_published_during_a_push_is_pushed_at_once(
    pods: Callable[[], Awaitable[FakePod]],
) -> None:
    """Before, the wake-up set by publish() was cleared after the push in flight, and the
    new table waited for the next resync (60 s)."""
    fake = await pods()
    fake.delay = 0.5
    publisher = Publisher(TOKEN, resync=60)
    publisher.set_pods([fake.pod])
    publisher.activate("1/test")
    publisher.publish(table("l7-basic", 1))
    await asyncio.sleep(0.2)  # the first push is in flight (0.5 s)
    second = table("l4-basic", 2)
    publisher.publish(second)
    await async_wait_for(
        lambda: (t := served(fake)) is not None and t.version == second.version,
        deadline_s=5,
        what="the second table",
    )
    await publisher.close()


async def test_the_whole_table_json_is_the_table_asked_for() -> None:
    """Before, a worker still holding the previous table cached its JSON as "the body",
    and a restarted pod was then sent the old table labelled with the new generation."""
    publisher = Publisher(TOKEN)
    old, new = table("l7-basic", 1), table("l4-basic", 2)
    publisher.publish(old)
    publisher.publish(new)
    assert publisher._whole(old) == old.to_json().encode()  # a push of the old one, in flight
    assert publisher._whole(new) == new.to_json().encode()


async def test_a_refused_table_is_pushed_again_at_resync(pods: Callable[[], Awaitable[FakePod]]) -> None:
    """The cause of a refusal may be fixed on the pod's side; before, the same version was
    never pushed to that pod again."""
    fake = await pods()
    fake.refuse = True
    publisher = Publisher(TOKEN, resync=0.3)
    publisher.set_pods([fake.pod])
    publisher.activate("1/test")
    wanted = table("l7-basic", 1)
    publisher.publish(wanted)
    state = publisher.pods[fake.pod.uid]
    await async_wait_for(lambda: state.refused_version == wanted.version, what="a refusal")
    fake.refuse = False
    await async_wait_for(
        lambda: (t := served(fake)) is not None and t.version == wanted.version,
        deadline_s=5,
        what="the table pushed again",
    )
    await publisher.close()


async def test_only_an_active_publisher_pushes_and_a_newer_term_stops_it(
    pods: Callable[[], Awaitable[FakePod]],
) -> None:
    fake = await pods()
    publisher = Publisher(TOKEN, resync=60)
    publisher.set_pods([fake.pod])
    publisher.publish(table("l7-basic", 1))
    await asyncio.sleep(0.3)
    assert served(fake) is None  # a standby pushes nothing
    publisher.activate("1/old-leader")
    await async_wait_for(lambda: served(fake) is not None, what="a push")
    fake.dataplane.admit("2/new-leader")  # a newer leader reached the pod
    publisher.publish(table("l4-basic", 2))
    state = publisher.pods[fake.pod.uid]
    await async_wait_for(lambda: state.fenced, what="the push refused for its term")
    assert state.task is not None
    await async_wait_for(lambda: state.task is not None and state.task.done(), what="the worker to stop")
    assert served(fake) is not None and served(fake).generation == 1  # type: ignore[union-attr]
    await publisher.close()


async def test_deactivate_stops_every_push_at_once(pods: Callable[[], Awaitable[FakePod]]) -> None:
    fake = await pods()
    fake.delay = 3.0  # a push hangs in flight (longer than the 1 s deactivate may take)
    publisher = Publisher(TOKEN, resync=60)
    publisher.set_pods([fake.pod])
    publisher.activate("1/test")
    publisher.publish(table("l7-basic", 1))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(publisher.deactivate(), 1)
    assert all(s.task is None for s in publisher.pods.values())
    await publisher.close()


async def test_a_pod_that_goes_takes_its_metrics_along(pods: Callable[[], Awaitable[FakePod]]) -> None:
    from prometheus_client import generate_latest

    fake = await pods()
    publisher = Publisher(TOKEN, resync=60)
    publisher.set_pods([fake.pod])
    publisher.activate("1/test")
    wanted = table("l7-basic", 1)
    publisher.publish(wanted)
    await async_wait_for(lambda: served(fake) is not None, what="a push")
    text = generate_latest(publisher.metrics.registry).decode()
    assert f'pod="{fake.pod.name}"' in text and f'version="{wanted.version}"' in text
    publisher.set_pods([])  # the pod is gone (a rollout): no series of it stays behind
    assert f'pod="{fake.pod.name}"' not in generate_latest(publisher.metrics.registry).decode()
    await publisher.close()


async def test_a_new_leader_tells_every_pod_its_term_even_when_the_table_is_the_same(
    pods: Callable[[], Awaitable[FakePod]],
) -> None:
    """A new leader compiles the table its predecessor pushed: the pod already serves it,
    so nothing was pushed, the pod never heard the new term, and the deposed leader (which
    does not know yet) could still program it."""
    fake = await pods()
    old = Publisher(TOKEN, resync=60)
    old.set_pods([fake.pod])
    old.activate("1/old-leader")
    old.publish(table("l7-basic", 1))
    await async_wait_for(lambda: served(fake) is not None, what="the old leader's push")
    new = Publisher(TOKEN, resync=60)
    new.set_pods([fake.pod])
    new.publish(table("l7-basic", 2))  # the same content: the version the pod serves
    new.activate("2/new-leader")
    await async_wait_for(
        lambda: fake.dataplane.term == (2, "new-leader"), what="the pod to hear the new term"
    )
    assert served(fake).generation == 1  # type: ignore[union-attr]  # nothing but the term moved
    assert new.metrics.pushes.labels("term")._value.get() == 1
    old.publish(table("l4-basic", 3))
    state = old.pods[fake.pod.uid]
    await async_wait_for(lambda: state.fenced, what="the deposed leader's push refused")
    assert served(fake).version == table("l7-basic", 1).version  # type: ignore[union-attr]
    await old.close()
    await new.close()
