"""The file provider: YAML and JSON in a folder, last good content kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

from controlplane.files import EMPTY_SETTLE, FileSource

ROUTE = """
apiVersion: bilayer.dev/v1alpha1
kind: L4Listener
metadata: {name: %s, namespace: shop}
spec:
  port: %d
  backendRefs: [{name: redis, port: 6379}]
"""


def names(source: FileSource) -> list[str]:
    return sorted(o["metadata"]["name"] for o in source.snapshot().objects)


def touch_later(path: Path, text: str) -> None:
    """Write and move mtime forward: some filesystems keep whole-second mtimes."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_multi_document_yaml_json_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ROUTE % ("one", 1) + "---\n" + ROUTE % ("two", 2))
    (tmp_path / "b.json").write_text(
        json.dumps(
            {"kind": "List", "items": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}]}
        )
    )
    (tmp_path / "ignored.txt").write_text("not yaml: [")
    (tmp_path / "other.yml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    (tmp_path / "ca.yml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n")
    source = FileSource(tmp_path)
    source.reload()
    assert names(source) == ["cm", "one", "s", "two"]  # ConfigMaps hold CA bundles for backend TLS
    assert source.problems == []


def test_broken_file_keeps_its_last_good_content(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE % ("one", 1))
    source = FileSource(tmp_path)
    source.reload()
    touch_later(path, "kind: L4Listener\n  bad: [indent")
    source.reload()
    assert names(source) == ["one"]
    assert len(source.problems) == 1
    assert "routes.yaml: not valid YAML" in source.problems[0]
    assert "last good content" in source.problems[0]
    touch_later(path, ROUTE % ("fixed", 1))
    source.reload()
    assert names(source) == ["fixed"]
    assert source.problems == []


def test_a_save_seen_half_done_never_empties_the_last_good_content(tmp_path: Path) -> None:
    """A save truncates the file, then writes it: a poll in between saw it empty, took
    "nothing" as its good content, and the broken save that followed fell back on that."""
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE % ("one", 1))
    source = FileSource(tmp_path, clock=lambda: 0.0)
    source.reload()
    with path.open("w") as f:  # truncated; the poll comes before the write
        assert not source.reload()
        assert names(source) == ["one"] and source.settling
        f.write("kind: L4Listener\n  bad: [indent")
    assert source.reload()
    assert names(source) == ["one"]
    assert "last good content" in source.problems[0]
    assert not source.settling


def test_a_file_emptied_on_purpose_is_believed_once_it_stays_empty(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE % ("one", 1))
    now = [0.0]
    source = FileSource(tmp_path, clock=lambda: now[0])
    source.reload()
    touch_later(path, "")
    assert not source.reload()
    now[0] = EMPTY_SETTLE / 2
    assert not source.reload() and names(source) == ["one"]
    now[0] = EMPTY_SETTLE
    assert source.reload() and names(source) == []
    assert source.problems == [] and not source.settling


def test_documents_without_kind_or_name_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nmetadata: {}\n")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    source = FileSource(tmp_path)
    source.reload()
    assert any("needs kind and metadata.name" in p for p in source.problems)
    assert any("is not a mapping" in p for p in source.problems)


def test_duplicate_objects_keep_the_first_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ROUTE % ("same", 1))
    (tmp_path / "b.yaml").write_text(ROUTE % ("same", 2))
    source = FileSource(tmp_path)
    source.reload()
    objects = source.snapshot().objects
    assert len(objects) == 1 and objects[0]["spec"]["port"] == 1
    assert source.problems == ["b.yaml: L4Listener shop/same is also defined in a.yaml; ignoring this copy"]


def test_removed_file_removes_its_objects(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ROUTE % ("one", 1))
    source = FileSource(tmp_path)
    source.reload()
    (tmp_path / "a.yaml").unlink()
    source.reload()
    assert names(source) == []


def test_missing_folder_is_a_problem(tmp_path: Path) -> None:
    source = FileSource(tmp_path / "nope")
    source.reload()
    assert source.problems and "not a folder or a file" in source.problems[0]
