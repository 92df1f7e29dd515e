"""Request path normalization: the routing-bypass defence."""

from __future__ import annotations

import pytest

from dataplane.l7.paths import BadPath, normalize, prefix_matches, split_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/api/v2/users", "/api/v2/users"),
        ("/public/../internal", "/internal"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("//a///b//", "/a/b/"),
        ("/%7Euser/%41%42", "/~user/AB"),
        ("/a%2e%2e/b", "/a../b"),
        ("/%2e%2e/secret/../x", None),
        ("/space%20here", "/space%20here"),
        ("/lower%3a", "/lower%3A"),
        ("/p/%2E/q", "/p/q"),
    ],
)
def test_normalize(raw: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(BadPath):
            normalize(raw)
    else:
        assert normalize(raw)[0] == expected


@pytest.mark.parametrize("raw", ["/..", "/a/../../b", "relative", "/bad%zz", "/trunc%4"])
def test_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize(raw)


def test_encoded_slash_stays_encoded_and_is_reported() -> None:
    assert normalize("/files/a%2fb") == ("/files/a%2Fb", True)
    assert normalize("/files/a/b") == ("/files/a/b", False)


def test_dot_segments_cannot_escape_a_prefix() -> None:
    path, _ = normalize("/public/../internal/admin")
    assert not prefix_matches("/public", path)
    assert prefix_matches("/internal", path)


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),
        ("/foo/", "/foo", True),
        ("/", "/anything", True),
    ],
)
def test_prefix_matches_whole_segments(prefix: str, path: str, matches: bool) -> None:
    assert prefix_matches(prefix, path) is matches


def test_split_target() -> None:
    assert split_target("/a/b?x=1&y=2#frag") == ("/a/b", "x=1&y=2")
    assert split_target("/a#frag") == ("/a", "")
