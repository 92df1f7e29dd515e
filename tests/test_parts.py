"""Part paths (dataplane.parts): the wire form, the order deltas rely on, what they name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.parts import HEADS, HOST_KINDS, PartPath, PathError

names = st.text(alphabet="abz./-:0", max_size=6)
ports = st.integers(min_value=1, max_value=65535)
paths = st.one_of(
    st.builds(PartPath.cluster, names),
    st.builds(PartPath.head, ports, st.sampled_from(HEADS)),
    st.builds(PartPath.rule, ports, names),
    st.builds(PartPath.host_group, ports, st.sampled_from(("exact", "wildcard")), names),
    st.builds(PartPath.host_group, ports, st.just("any"), st.just("")),
)


@given(paths)
def test_the_wire_form_names_the_same_path(path: PartPath) -> None:
    assert PartPath.from_wire(list(path.segments())) == path
    assert str(path) == "/".join(path.segments())


@given(st.lists(paths, max_size=12))
def test_paths_sort_as_their_wire_forms_do(found: list[PartPath]) -> None:
    """A delta lists a head before the rules and host groups under it: the order of the
    string tuples paths were before they were typed."""
    assert [p.segments() for p in sorted(found)] == sorted(p.segments() for p in found)


def test_what_a_path_names() -> None:
    rule = PartPath.rule(8080, "shop/api/0")
    assert rule.segments() == ("listeners", "8080", "l7", "rules", "shop/api/0")
    assert (rule.is_rule, rule.is_head, rule.is_host_group, rule.is_cluster) == (True, False, False, False)
    assert rule.port == 8080 and rule.key == "shop/api/0" and rule.model_kind == "rules"
    assert rule.where() == "listeners.8080.l7.rules.shop/api/0"
    group = PartPath.host_group(8080, "any", "")
    assert group.segments() == ("listeners", "8080", "l7", "any", "")  # the empty key is kept
    assert group.where() == "listeners.8080.l7.hosts.any"
    assert PartPath.host_group(8080, "wildcard", ".example.com").where() == (
        "listeners.8080.l7.hosts.wildcard..example.com"
    )
    head = PartPath.head(53, "udp")
    assert head.is_head and head.segments() == ("listeners", "53", "udp") and head.model_kind == "udp"
    cluster = PartPath.cluster("shop/api:80")
    assert cluster.is_cluster and not cluster.is_head and cluster.segments() == ("clusters", "shop/api:80")
    assert cluster.where() == "clusters.shop/api:80" and cluster.model_kind == "clusters"
    assert set(HOST_KINDS) == {"exact", "wildcard", "any"}


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        (["listeners", "0", "l4"], "port must be 1-65535, not '0'"),
        (["listeners", "http", "l4"], "port must be 1-65535"),
        (["listeners", "80", "tcp"], "names no part"),
        (["listeners", "80", "l4", "rules", "x"], "names no part"),
        (["listeners", "80", "l7", "any", "x"], "the any host group has the key ''"),
        (["clusters"], "names no part"),
        (["clusters", "a", "b"], "names no part"),
        ([], "names no part"),
    ],
)
def test_lists_that_name_no_part_are_refused(segments: list[str], message: str) -> None:
    with pytest.raises(PathError, match=message):
        PartPath.from_wire(segments)
