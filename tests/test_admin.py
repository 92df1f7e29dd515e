"""The dataplane admin API over real HTTP: token, table push, readiness, metrics, persistence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dataplane.admin import build_app, serve
from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table

from .golden import inputs
from .helpers import free_port

TOKEN = "s3cret-token"


def table(case: str, generation: int = 1) -> Table:
    from controlplane.compiler import Snapshot, compile_snapshot

    return compile_snapshot(Snapshot.of(inputs(case)), generation).table


class Admin:
    def __init__(self, dataplane: Dataplane, url: str, session: aiohttp.ClientSession) -> None:
        self.dataplane, self.url, self.session = dataplane, url, session

    async def call(
        self, method: str, path: str, body: str | None = None, token: str | None = TOKEN
    ) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.url + path, data=body, headers=headers) as response:
            return response.status, await response.text()


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    # No listener implementations: these tests are about the admin API alone.
    dataplane = Dataplane(Settings(address="127.0.0.1", state_dir=tmp_path), factories={})
    port = free_port()
    runner = await serve(build_app(dataplane, TOKEN), "127.0.0.1", port)
    async with aiohttp.ClientSession() as session:
        yield Admin(dataplane, f"http://127.0.0.1:{port}", session)
    await runner.cleanup()
    await dataplane.close()


async def test_health_and_readiness_need_no_token(admin: Admin) -> None:
    assert await admin.call("GET", "/healthz", token=None) == (200, "ok\n")
    status, _ = await admin.call("GET", "/readyz", token=None)
    assert status == 503
    await admin.call("PUT", "/v1/table", table("l7-basic").to_json())
    assert (await admin.call("GET", "/readyz", token=None))[0] == 200


@pytest.mark.parametrize("path", ["/v1/table", "/metrics"])
async def test_everything_else_needs_the_token(admin: Admin, path: str) -> None:
    assert (await admin.call("GET", path, token=None))[0] == 401
    assert (await admin.call("GET", path, token="wrong"))[0] == 401
    assert (await admin.call("GET", path))[0] == 200


async def test_push_then_read_back(admin: Admin) -> None:
    pushed = table("shared-cluster", 3)
    status, body = await admin.call("PUT", "/v1/table", pushed.to_json())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["changed"] is True and answer["version"] == pushed.version and answer["generation"] == 3
    status, body = await admin.call("GET", "/v1/table")
    assert json.loads(body)["version"] == pushed.version


async def test_bad_table_gets_400_and_changes_nothing(admin: Admin) -> None:
    good = table("shared-cluster", 1)
    await admin.call("PUT", "/v1/table", good.to_json())
    document = json.loads(good.to_json())
    document["generation"] = 2
    document["version"] = ""
    document["listeners"]["7000"]["l4"]["backends"][0]["cluster"] = "missing"
    status, body = await admin.call("PUT", "/v1/table", json.dumps(document))
    assert status == 400
    assert "no cluster named 'missing'" in json.loads(body)["error"]
    status, body = await admin.call("PUT", "/v1/table", "{not json")
    assert status == 400
    assert admin.dataplane.table == good


async def test_same_version_is_a_no_op_and_older_generation_conflicts(admin: Admin) -> None:
    await admin.call("PUT", "/v1/table", table("l7-basic", 5).to_json())
    status, body = await admin.call("PUT", "/v1/table", table("l7-basic", 6).to_json())
    assert status == 200 and json.loads(body)["changed"] is False
    status, body = await admin.call("PUT", "/v1/table", table("l4-basic", 4).to_json())
    assert status == 409
    assert "not newer than the served generation 5" in json.loads(body)["error"]


async def test_metrics_are_prometheus_text(admin: Admin) -> None:
    await admin.call("PUT", "/v1/table", table("l7-basic", 2).to_json())
    status, body = await admin.call("GET", "/metrics")
    assert status == 200
    assert "# TYPE bilayer_table_generation gauge" in body
    assert "bilayer_table_generation 2.0" in body
    assert "bilayer_table_applies_total 1.0" in body


async def test_saved_table_is_served_after_restart(admin: Admin, tmp_path: Path) -> None:
    pushed = table("l7-basic", 7)
    await admin.call("PUT", "/v1/table", pushed.to_json())
    saved = tmp_path / "table.json"
    assert saved.exists() and oct(saved.stat().st_mode & 0o777) == "0o600"
    restarted = Dataplane(Settings(address="127.0.0.1", state_dir=tmp_path), factories={})
    assert await restarted.load_persisted()
    assert restarted.ready and restarted.table is not None
    assert restarted.table.version == pushed.version and restarted.table.generation == 7
    await restarted.close()


async def test_corrupt_saved_table_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "table.json").write_text('{"listeners": 5}')
    dataplane = Dataplane(Settings(state_dir=tmp_path), factories={})
    assert not await dataplane.load_persisted()
    assert not dataplane.ready


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One request sent as bytes (aiohttp would refuse to send what these tests need)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def port_of(admin: Admin) -> int:
    return int(admin.url.rsplit(":", 1)[1])


async def test_a_non_utf8_authorization_header_is_refused_not_a_server_error(admin: Admin) -> None:
    answer = await raw_request(
        port_of(admin), b"GET /v1/table HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


async def test_json_nested_too_deep_is_a_bad_request(admin: Admin) -> None:
    await admin.call("PUT", "/v1/table", table("l7-basic", 1).to_json())
    deep = "[" * 100_000 + "]" * 100_000
    for method in ("PATCH", "PUT"):
        status, body = await admin.call(method, "/v1/table", deep)
        assert status == 400, (method, status, body[:200])
    deep_object = '{"changes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert (await admin.call("PATCH", "/v1/table", deep_object))[0] == 400
    assert (await admin.call("GET", "/v1/table"))[0] == 200  # and it still serves


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("127.example.com", False),
        ("127.0.0.1.nip.io", False),
        ("1270.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
    ],
)
def test_is_loopback_means_a_loopback_address(host: str, loopback: bool) -> None:
    from dataplane.admin import is_loopback

    assert is_loopback(host) is loopback


async def put(admin: Admin, body: str, term: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {TOKEN}", **({"Bilayer-Term": term} if term else {})}
    async with admin.session.put(admin.url + "/v1/table", data=body, headers=headers) as response:
        return response.status, json.loads(await response.text())


async def test_pushes_from_an_older_leader_term_are_refused(admin: Admin, tmp_path: Path) -> None:
    """Fencing: a deposed leader that has not noticed yet cannot undo its successor's table."""
    status, answer = await put(admin, table("l7-basic", 1).to_json(), "3/operator-a")
    assert status == 200 and answer["term"] == "3/operator-a"
    status, answer = await put(admin, table("l4-basic", 2).to_json(), "4/operator-b")  # the next leader
    assert status == 200 and answer["term"] == "4/operator-b"
    stale = table("shared-cluster", 9)
    for term in ("3/operator-a", "4/operator-a", None):  # older; same count, other holder; none
        status, answer = await put(admin, stale.to_json(), term)
        assert status == 403, (term, answer)
    patch = '{"base": "x", "version": "y", "generation": 10, "changes": []}'
    headers = {"Authorization": f"Bearer {TOKEN}", "Bilayer-Term": "3/operator-a"}
    async with admin.session.patch(admin.url + "/v1/table", data=patch, headers=headers) as response:
        assert response.status == 403
    status, _ = await put(admin, stale.to_json(), "not-a-term")
    assert status == 400
    assert admin.dataplane.table is not None and admin.dataplane.table.generation == 2
    # The term survives a restart (it is saved with the table).
    restarted = Dataplane(Settings(address="127.0.0.1", state_dir=tmp_path), factories={})
    await restarted.load_persisted()
    assert restarted.term == (4, "operator-b")
    await restarted.close()


async def test_the_metrics_port_reads_without_the_token_and_writes_nothing(tmp_path: Path) -> None:
    """A scraper on the metrics port needs no credential, and that port cannot change the table."""
    import asyncio

    from dataplane.server import run_dataplane

    from .helpers import async_wait_for

    admin_port, metrics_port = free_port(), free_port()
    stop = asyncio.Event()
    settings = Settings(address="127.0.0.1", state_dir=tmp_path)
    served = asyncio.create_task(
        run_dataplane(settings, "127.0.0.1", admin_port, TOKEN, stop=stop, metrics_port=metrics_port)
    )
    admin_url, metrics_url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{metrics_port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                try:
                    async with session.get(metrics_url + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await async_wait_for(up, deadline_s=10, what="the metrics port")
            admin = Admin(Dataplane(Settings()), admin_url, session)
            metrics = Admin(admin.dataplane, metrics_url, session)
            assert (await metrics.call("GET", "/readyz", token=None))[0] == 503
            status, body = await metrics.call("GET", "/metrics", token=None)
            assert status == 200 and "bilayer_table_generation 0.0" in body
            pushed = table("l7-basic", 4).to_json()
            for method in ("PUT", "PATCH"):
                for token in (None, TOKEN):
                    status, _ = await metrics.call(method, "/v1/table", pushed, token=token)
                    assert status in (404, 405), (method, token, status)
            assert (await metrics.call("GET", "/v1/table", token=TOKEN))[0] == 404
            # The admin port still wants the token, for reads and writes alike.
            assert (await admin.call("GET", "/metrics", token=None))[0] == 401
            assert (await admin.call("PUT", "/v1/table", pushed, token=None))[0] == 401
            assert (await admin.call("PUT", "/v1/table", pushed))[0] == 200
            status, body = await metrics.call("GET", "/metrics", token=None)
            assert "bilayer_table_generation 4.0" in body
            assert (await metrics.call("GET", "/readyz", token=None))[0] == 200
    finally:
        stop.set()
        await asyncio.wait_for(served, 30)


async def test_a_push_of_an_older_term_is_refused_whatever_its_body(admin: Admin) -> None:
    """The term is judged before the body: a deposed leader's push is a 403 even when its
    body does not parse (it was a 400, which a pusher takes for a bad table)."""
    status, _ = await put(admin, table("l7-basic", 1).to_json(), "4/operator-b")
    assert status == 200
    headers = {"Authorization": f"Bearer {TOKEN}", "Bilayer-Term": "3/operator-a"}
    for method in ("PUT", "PATCH"):
        async with admin.session.request(
            method, admin.url + "/v1/table", data="{not json", headers=headers
        ) as response:
            assert response.status == 403, method
    assert admin.dataplane.term == (4, "operator-b")


async def test_the_term_is_saved_whole_or_not_at_all(
    admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The term file is replaced by a rename: a crash while it is written leaves the term
    before it, never a torn one (a torn term does not parse, and a restarted pod would
    then take pushes of any term)."""
    import os

    from dataplane import runtime

    status, _ = await put(admin, table("l7-basic", 1).to_json(), "4/operator-b")
    assert status == 200 and (tmp_path / "term").read_text() == "4/operator-b"

    def crash(*args: object) -> None:
        raise OSError("the process died before the rename")

    monkeypatch.setattr(runtime.os, "replace", crash)
    status, _ = await put(admin, table("l4-basic", 2).to_json(), "5/operator-c")
    assert status == 200
    assert (tmp_path / "term").read_text() == "4/operator-b"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".term")]  # no temporary left
