"""The routing table: validation, JSON round trip, content versions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dataplane.table import Table, TableError

from .golden import cases, inputs
from .helpers import compile_yaml


def golden_table(case: str) -> Table:
    from controlplane.compiler import Snapshot, compile_snapshot

    return compile_snapshot(Snapshot.of(inputs(case))).table


@pytest.mark.parametrize("case", cases())
def test_round_trip_through_json(case: str) -> None:
    # The compiler builds tables without validation; parsing them must give the same
    # content, and so the same version (the dataplane checks it).
    table = golden_table(case)
    again = Table.parse(table.to_json())
    assert again == table
    assert again.version == table.version


def test_identical_content_identical_version_whatever_the_generation() -> None:
    a = golden_table("l7-hostnames")
    b = golden_table("l7-hostnames").stamped(42)
    assert a.version == b.version
    assert a.generation != b.generation


def test_changed_content_changes_version() -> None:
    assert golden_table("l7-basic").version != golden_table("endpoints-none").version


RULE = "shop/http/0"


def good() -> dict[str, Any]:
    return json.loads(golden_table("shared-cluster").to_json())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t["listeners"]["7000"]["l4"]["backends"][0].update(cluster="nope"),
            "no cluster named 'nope'",
        ),
        (
            lambda t: t["clusters"]["shop/api:80"]["endpoints"][0].update(address="not-an-ip"),
            "not an IP address",
        ),
        (
            lambda t: t["listeners"]["8080"].update(l4=t["listeners"]["7000"]["l4"]),
            "at most one of l4, passthrough and l7",
        ),
        (
            lambda t: t["listeners"].update({"9": {}}),
            "set one of l4, passthrough and l7, or udp",
        ),
        (
            lambda t: t["listeners"].update(
                {"443": {"passthrough": {"routes": {"a/b": t["listeners"]["7000"]["l4"]}, "default": "a/c"}}}
            ),
            "passthrough.default: no route named 'a/c'",
        ),
        (
            lambda t: t["listeners"].update(
                {
                    "443": {
                        "passthrough": {
                            "routes": {"a/b": t["listeners"]["7000"]["l4"]},
                            "wildcard": {"example.com": "a/b"},
                        }
                    }
                }
            ),
            "a wildcard key starts with '.'",
        ),
        (lambda t: t.update(version="sha256:0000"), "does not match the content"),
        (lambda t: t["listeners"].update({"70000": t["listeners"]["7000"]}), "port must be 1-65535"),
        (
            lambda t: t["listeners"]["8080"]["l7"]["hosts"]["any"]["prefix"][""][0].update(rule="a/b/9"),
            "refers to rule .a/b/9.",
        ),
        (lambda t: t.update(surprise=True), "Extra inputs are not permitted"),
        (lambda t: t["listeners"]["7000"]["l4"].update(policy="Fastest"), "policy"),
        (
            lambda t: t["listeners"]["8080"]["l7"]["rules"][RULE].update(mirrors=[{"cluster": "nope"}]),
            r"rules\.shop/http/0\.mirrors\.0\.cluster: no cluster named 'nope'",
        ),
        (
            lambda t: t["listeners"]["8080"]["l7"]["rules"][RULE]["backends"][0].update(
                filters={"mirrors": [{"cluster": "shop/api:80", "share": 1.5}]}
            ),
            "share",
        ),
        (
            lambda t: t["listeners"]["8080"]["l7"]["rules"][RULE].update(
                cors={"allowOrigins": ["https://app.example.com/path"]}
            ),
            "allowOrigins",
        ),
        (
            lambda t: t["listeners"]["8080"]["l7"]["rules"][RULE].update(
                session={"type": "Cookie", "name": "a b"}
            ),
            "session.name",
        ),
        (
            lambda t: (
                t["listeners"]["8080"]["l7"]["rules"][RULE]["redirect"].update(statusCode=304)
                if "redirect" in t["listeners"]["8080"]["l7"]["rules"][RULE]
                else t["listeners"]["8080"]["l7"]["rules"][RULE].update(redirect={"statusCode": 304})
            ),
            "statusCode",
        ),
        (
            lambda t: t["listeners"]["7000"]["l4"]["backends"][0].update(filters={}),
            "filters are for L7 backends",
        ),
    ],
)
def test_bad_tables_are_refused_with_the_field(mutate: Any, message: str) -> None:
    document = good()
    mutate(document)
    with pytest.raises(TableError, match=message):
        Table.parse(json.dumps(document))


def test_bad_regex_refused() -> None:
    compiled = compile_yaml(
        """
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {name: r}
spec:
  port: 8080
  rules: [{matches: [{path: {type: RegularExpression, value: '/a.*'}}]}]
"""
    )
    document = json.loads(compiled.table.to_json())
    document["version"] = ""
    document["listeners"]["8080"]["l7"]["hosts"]["any"]["regex"][0]["path"]["value"] = "/a("
    with pytest.raises(TableError, match="regular expression"):
        Table.parse(json.dumps(document))


def test_empty_version_is_computed_on_stamp() -> None:
    document = good()
    document["version"] = ""
    table = Table.parse(json.dumps(document))
    assert table.stamped(3).version == golden_table("shared-cluster").version


def test_version_does_not_depend_on_key_order() -> None:
    document = good()
    reordered = dict(reversed(list(document.items())))
    reordered["listeners"] = dict(reversed(list(document["listeners"].items())))
    reordered["clusters"] = dict(reversed(list(document["clusters"].items())))
    a, b = Table.parse(json.dumps(document)), Table.parse(json.dumps(reordered))
    assert a.version == b.version and a.canonical() == b.canonical()


def test_to_json_round_trips_an_empty_table() -> None:
    empty = Table().stamped(1)
    assert Table.parse(empty.to_json()) == empty


def test_a_copy_with_other_content_gets_another_version() -> None:
    table = golden_table("shared-cluster")
    table.canonical()  # cached
    emptied = table.model_copy(update={"listeners": {}, "version": ""}).stamped(2)
    assert emptied.version != table.version
    assert emptied.version == Table(clusters=table.clusters).stamped(2).version
    assert table.stamped(5).version == table.version  # restamping keeps the content
