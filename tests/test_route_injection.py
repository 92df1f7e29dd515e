"""Route fields that end up in HTTP heads cannot carry a line break: a route author must
not be able to write a second request onto a backend connection (shared with other
routes) or a second response, or a header, to clients. Refused where the route is written
(Accepted=False, and by the CRD schema), and again where a table is pushed (400)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dataplane.table import Table, TableError

from .helpers import compile_yaml
from .l7kit import route

SMUGGLE = "/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /SMUGGLED"


def rule_with(filters: list[dict[str, Any]], backends: bool = True) -> list[dict[str, Any]]:
    rule: dict[str, Any] = {"filters": filters}
    if backends:
        rule["backendRefs"] = [{"name": "web", "port": 80}]
    return [rule]


def modifier(kind: str, **ops: Any) -> dict[str, Any]:
    return {"type": kind, kind[0].lower() + kind[1:]: ops}


REFUSED = [
    (
        "request header value",
        [modifier("RequestHeaderModifier", set=[{"name": "X-A", "value": "a\r\nX-B: b"}])],
        True,
    ),
    (
        "response header value",
        [modifier("ResponseHeaderModifier", add=[{"name": "X-A", "value": "a\nSet-Cookie: s=1"}])],
        True,
    ),
    ("NUL in a value", [modifier("RequestHeaderModifier", set=[{"name": "X-A", "value": "a\x00b"}])], True),
    (
        "rewrite hostname",
        [{"type": "URLRewrite", "urlRewrite": {"hostname": "a\r\nTransfer-Encoding: chunked"}}],
        True,
    ),
    (
        "rewrite full path",
        [
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": SMUGGLE}},
            }
        ],
        True,
    ),
    (
        "rewrite path with a space",
        [
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a b"}},
            }
        ],
        True,
    ),
    (
        "redirect hostname",
        [{"type": "RequestRedirect", "requestRedirect": {"hostname": "x\r\nSet-Cookie: s=1"}}],
        False,
    ),
    (
        "redirect path",
        [
            {
                "type": "RequestRedirect",
                "requestRedirect": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/\r\nSet-Cookie: s=1"}
                },
            }
        ],
        False,
    ),
    (
        "underscore Content_Length",
        [modifier("RequestHeaderModifier", set=[{"name": "Content_Length", "value": "0"}])],
        True,
    ),
    (
        "underscore Transfer_encoding",
        [modifier("ResponseHeaderModifier", remove=["Transfer_encoding"])],
        True,
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_route_fields_that_reach_a_head_refuse_line_breaks(
    case: tuple[str, list[dict[str, Any]], bool],
) -> None:
    _, filters, backends = case
    compiled = compile_yaml(json.dumps(route("r", 8080, rule_with(filters, backends))))
    (conditions,) = compiled.statuses.values()
    assert conditions[0].type == "Accepted" and conditions[0].status == "False", conditions[0].message
    assert not compiled.table.listeners  # nothing of it is served


def test_a_pushed_table_with_a_line_break_in_a_head_field_is_refused() -> None:
    """A table that did not come from the compiler (a push to the admin API) is checked too."""
    good = compile_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
        "spec: {ports: [{name: http, port: 80}]}\n---\n"
        + json.dumps(
            route(
                "r",
                8080,
                rule_with(
                    [
                        modifier("RequestHeaderModifier", set=[{"name": "X-A", "value": "a"}]),
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "hostname": "b.test",
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/p"},
                            },
                        },
                    ]
                ),
            )
        )
    ).table
    document = json.loads(good.to_json())
    Table.parse(document)  # as compiled: fine
    (rule,) = document["listeners"]["8080"]["l7"]["rules"].values()
    for field, poison in (
        (("requestHeaders", "set", 0, "value"), "a\r\nX-B: b"),
        (("rewrite", "hostname"), "b.test\r\nTransfer-Encoding: chunked"),
        (("rewrite", "path", "value"), SMUGGLE),
        (("requestHeaders", "set", 0, "name"), "X-A\r\nX-B"),
    ):
        bad = json.loads(json.dumps(document))
        (target,) = bad["listeners"]["8080"]["l7"]["rules"].values()
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = poison
        with pytest.raises(TableError):
            Table.parse(bad)
    assert rule  # the unpoisoned document stays parseable
