"""Table deltas (dataplane.delta): what a diff holds, and what a dataplane refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.compiler import Snapshot, compile_snapshot
from dataplane import delta
from dataplane.admin import build_app, serve
from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table, TableError

from .golden import inputs
from .helpers import free_port

TOKEN = "delta-token"


def compiled(case: str, generation: int = 1) -> Table:
    return compile_snapshot(Snapshot.of(inputs(case)), generation).table


def patched(base: Table, target: Table) -> Table:
    return delta.patch(base, delta.parse(delta.diff(base, target).to_json()))


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("l7-basic", "l7-hostnames"),
        ("l4-basic", "l7-basic"),  # a port changes kind
        ("l7-basic", "l4-basic"),
        ("shared-cluster", "l7-basic"),
        ("tls-basic", "l7-basic"),  # TLS goes away
        ("l7-basic", "tls-two-certificates"),
        ("tls-basic", "tls-two-certificates"),
        ("l4-basic", "sni-basic"),  # plain L4 becomes passthrough
        ("sni-basic", "sni-conflicts"),
        ("sni-basic", "l7-basic"),
        ("l4-basic", "udp-basic"),  # a UDP face appears beside the TCP one
        ("udp-basic", "l4-basic"),
        ("udp-basic", "udp-conflict"),
        ("l7-basic", "udp-conflict"),  # an L7 port gains a UDP face
        ("udp-conflict", "l7-basic"),
        ("udp-conflict", "udp-health-needs-tcp"),
        ("l7-basic", "http2-per-port"),  # a port's HTTP/2 switch goes off
        ("http2-per-port", "l7-basic"),
        ("l7-basic", "upstream-tls"),  # clusters with TLS and a protocol
    ],
)
def test_a_patched_table_is_the_target(before: str, after: str) -> None:
    base, target = compiled(before), compiled(after, 2)
    result = patched(base, target)
    assert result.to_dict() == target.to_dict()
    assert result.version == target.version == Table.parse(target.to_json()).version


def test_turning_http2_off_is_a_change_of_the_l7_head_alone() -> None:
    """The L7 head carries http2 beside tls: a delta that left it out kept HTTP/2 on in
    a pod patched from an earlier table (and the version sum disagreed)."""
    objects = inputs("l7-basic")
    base = compile_snapshot(Snapshot.of(objects)).table
    for obj in objects:
        if obj["kind"] == "L7Route":
            obj["spec"]["http2"] = False
    target = compile_snapshot(Snapshot.of(objects), 2).table
    change = delta.diff(base, target)
    assert {str(path) for path, _ in change.changes} == {
        f"listeners/{port}/l7" for port, listener in target.listeners.items() if listener.l7 is not None
    }
    result = patched(base, target)
    assert all(listener.l7 is None or not listener.l7.http2 for listener in result.listeners.values())
    assert result.version == target.version


def test_an_unchanged_table_has_an_empty_delta() -> None:
    base = compiled("l7-basic")
    assert delta.diff(base, base.stamped(2)).changes == ()


def test_a_delta_for_another_version_is_a_base_mismatch() -> None:
    base, target = compiled("l7-basic"), compiled("l7-hostnames", 2)
    change = delta.diff(base, target)
    with pytest.raises(delta.BaseMismatch, match="applies to"):
        delta.patch(compiled("l4-basic"), change)


def _document(before: str = "l7-basic", after: str = "l7-hostnames") -> tuple[Table, dict[str, Any]]:
    base, target = compiled(before), compiled(after, 2)
    document: dict[str, Any] = json.loads(delta.diff(base, target).to_json())
    return base, document


L7 = ["listeners", "8080", "l7"]
API_RULE = "shop/api/0"


def _add(path: list[str], value: Any = None) -> Any:
    change: dict[str, Any] = {"path": path} if value is None else {"path": path, "value": value}
    return lambda d: d["changes"].append(change)


def _entry(path_type: str, value: str) -> dict[str, Any]:
    return {"rule": API_RULE, "path": {"type": path_type, "value": value}}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version="sha256:" + "0" * 32), "produces .* not the promised"),
        (_add(["listeners", "99999", "l4"]), "port must be 1-65535"),
        (_add(["routes", "x"]), "names no part of a table"),
        (lambda d: d.update(generation=-1), "generation"),
        (lambda d: d.update(changes="all"), "must be a list"),
        (_add([*L7, "rules", "x/y/0"], {"index": 0}), r"value\.route: Field required"),
        (
            _add(
                [*L7, "rules", "shop/x/0"],
                {"route": "shop/x", "index": 0, "backends": [{"cluster": "nope", "weight": 1}]},
            ),
            "no cluster named 'nope'",
        ),
        (
            lambda d: d.update(changes=[{"path": [*L7, "rules", API_RULE]}]),
            "removes rule 'shop/api/0', which 1 match entries still refer to",
        ),
        (
            _add([*L7, "exact", "Upper.example.com"], {"prefix": {"": [_entry("PathPrefix", "/")]}}),
            "lower case",
        ),
        (_add([*L7, "any", ""], {"regex": [_entry("RegularExpression", "(")]}), "regular expression"),
        (_add(["listeners", "7777", "l7", "rules", "a/b/0"]), "no L7 listener"),
    ],
)
def test_bad_deltas_are_refused_with_the_field(mutate: Any, message: str) -> None:
    base, document = _document()
    mutate(document)
    with pytest.raises(TableError, match=message):
        delta.patch(base, delta.parse(json.dumps(document)))


async def test_the_admin_api_applies_deltas_and_refuses_bad_ones(tmp_path: Path) -> None:
    """PATCH over HTTP against a dataplane with real listeners: 200 and the new table is
    served; 412 for a stale base; 400 for a bad delta, and the table stays."""
    dataplane = Dataplane(Settings(address="127.0.0.1", state_dir=tmp_path))
    port = free_port()
    runner = await serve(build_app(dataplane, TOKEN), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/v1/table"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base, target = compiled("l7-basic"), compiled("l7-hostnames", 2)
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.patch(url, data=delta.diff(base, target).to_json()) as response:
                assert response.status == 412  # nothing served yet: push the whole table
            async with session.put(url, data=base.to_json()) as response:
                assert response.status == 200
            bad = json.loads(delta.diff(base, target).to_json())
            bad["version"] = "sha256:" + "1" * 32
            async with session.patch(url, data=json.dumps(bad)) as response:
                assert response.status == 400
                assert "not the promised" in (await response.json())["error"]
            assert dataplane.table is not None and dataplane.table.version == base.version
            async with session.patch(url, data=delta.diff(base, target).to_json()) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["version"] == target.version
            assert dataplane.table.to_dict() == target.to_dict()
            assert dataplane.deltas_applied == 1
            async with session.patch(url, data=delta.diff(base, target).to_json()) as response:
                assert response.status == 200  # already served: nothing to do
                assert (await response.json())["changed"] is False
            stale = delta.diff(compiled("l4-basic"), compiled("l7-basic", 3))
            async with session.patch(url, data=stale.to_json()) as response:
                assert response.status == 412
    finally:
        await runner.cleanup()
        await dataplane.close()
    # A delta is saved too (within a second, or at close): a restart serves it.
    assert Table.parse((tmp_path / "table.json").read_bytes()).version == target.version
