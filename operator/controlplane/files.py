"""The file provider: Kubernetes objects from YAML and JSON files in a folder.

A file that fails to parse keeps its last good content, so a half-saved edit never takes
routes away; the problem is reported until the file is fixed. A file that turns empty is
believed only once it stayed empty for EMPTY_SETTLE seconds: a save that truncates the file
and then writes it (Python's write_text, a shell's `>`, many editors) shows it empty in
between, and a poll in that moment made "nothing" the file's last good content, which a
broken save then fell back on, taking the routes away after all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dataplane.eventloop import gc_paused

from .compiler.snapshot import INPUT_KINDS, ObjectKey, Snapshot
from .resources.classes import DEFAULT_CLASS, in_class

SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's loader is about 7x faster than the pure-Python one (10,000 routes: 1.8 s vs 12.4 s).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Signature = tuple[tuple[str, int, int], ...]
# How long a file that had objects must stay empty before it is read as having none.
EMPTY_SETTLE = 1.0


@dataclass
class _FileState:
    signature: tuple[int, int]
    objects: list[dict[str, Any]]
    problem: str | None = None


@dataclass
class FileSource:
    """Objects from every *.yaml, *.yml and *.json file directly in directory (subfolders
    are not read), or from the one file directory names; routes of class_name only, as an
    operator of that class would see them (None: every class)."""

    directory: Path
    class_name: str | None = DEFAULT_CLASS
    # Routes skipped because they name another class, by the last reload.
    other_classes: list[ObjectKey] = field(default_factory=list)
    _files: dict[Path, _FileState] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _snapshot: Snapshot = field(default_factory=Snapshot)
    # Files that turned empty, not believed yet: path -> (signature, when first seen empty).
    _emptied: dict[Path, tuple[tuple[int, int], float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    @property
    def settling(self) -> bool:
        """A file turned empty and is to be looked at again (reload) even if nothing changes."""
        return bool(self._emptied)

    def signature(self) -> Signature:
        """Changes whenever a file is added, removed or written."""
        entries = []
        for path in self._paths():
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    def _paths(self) -> list[Path]:
        if self.directory.is_file():
            return [self.directory]
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.suffix in SUFFIXES and p.is_file())

    def subfolders(self) -> list[Path]:
        """Subfolders holding files this source would read were they in the folder itself:
        a layout like kustomize's, which `-f` does not follow; said so rather than ignored."""
        if not self.directory.is_dir():
            return []
        return sorted(
            d
            for d in self.directory.iterdir()
            if d.is_dir() and not d.name.startswith(".") and any(p.suffix in SUFFIXES for p in d.rglob("*"))
        )

    def reload(self) -> bool:
        """Read the files whose size or mtime changed; keep the rest as they were. True when
        a file was read or went away (the snapshot may differ)."""
        with gc_paused():
            return self._reload()

    def _reload(self) -> bool:
        paths = self._paths()
        changed = False
        for gone in set(self._files) - set(paths):
            del self._files[gone]
            changed = True
        for gone in set(self._emptied) - set(paths):
            del self._emptied[gone]
        for path in paths:
            try:
                stat = path.stat()
                signature = (stat.st_mtime_ns, stat.st_size)
                state = self._files.get(path)
                if state is not None and state.signature == signature:
                    self._emptied.pop(path, None)
                    continue
                if (
                    not stat.st_size
                    and state is not None
                    and state.objects
                    and self._settling(path, signature)
                ):
                    continue
                self._emptied.pop(path, None)
                changed = True
                text = path.read_text()
            except OSError as err:
                self._keep_previous(path, (0, 0), f"{path.name}: cannot read: {err.strerror}")
                continue
            try:
                self._files[path] = _FileState(signature, list(_documents(path, text)))
            except ValueError as err:
                self._keep_previous(path, signature, f"{path.name}: {err}; using its last good content")
        self.problems = [s.problem for s in self._files.values() if s.problem]
        if not self.directory.is_dir() and not self.directory.is_file():
            self.problems.insert(0, f"{self.directory}: not a folder or a file")
        self._snapshot = self._collect()
        return changed

    def _settling(self, path: Path, signature: tuple[int, int]) -> bool:
        """The file that had objects is empty: True until it stayed so for EMPTY_SETTLE."""
        now = self.clock()
        seen = self._emptied.get(path)
        if seen is None or seen[0] != signature:
            self._emptied[path] = (signature, now)
            return True
        if now - seen[1] < EMPTY_SETTLE:
            return True
        del self._emptied[path]
        return False

    def _keep_previous(self, path: Path, signature: tuple[int, int], problem: str) -> None:
        previous = self._files.get(path)
        self._files[path] = _FileState(signature, previous.objects if previous else [], problem)

    def snapshot(self) -> Snapshot:
        """Every object read by the last reload."""
        return self._snapshot

    def _collect(self) -> Snapshot:
        """Every object, first file (by name) first; a repeated object is reported and skipped."""
        seen: dict[ObjectKey, str] = {}
        objects: list[dict[str, Any]] = []
        self.other_classes = []
        for path, state in sorted(self._files.items()):
            for obj in state.objects:
                key = ObjectKey.of(obj)
                if self.class_name is not None and not in_class(obj, self.class_name):
                    self.other_classes.append(key)
                    continue
                if key in seen:
                    self.problems.append(
                        f"{path.name}: {key} is also defined in {seen[key]}; ignoring this copy"
                    )
                    continue
                seen[key] = path.name
                objects.append(obj)
        return Snapshot.of(objects)


def _documents(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".json":
            loaded = json.loads(text)
            documents = loaded.get("items", [loaded]) if isinstance(loaded, dict) else loaded
        else:
            documents = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    objects: list[dict[str, Any]] = []
    for index, doc in enumerate(documents):
        where = f"document {index + 1}"
        if not isinstance(doc, dict):
            raise ValueError(f"{where} is not a mapping")
        if doc.get("kind") == "List":
            objects.extend(item for item in doc.get("items", []) if isinstance(item, dict))
            continue
        if (
            not doc.get("kind")
            or not isinstance(doc.get("metadata"), dict)
            or not doc["metadata"].get("name")
        ):
            raise ValueError(f"{where} needs kind and metadata.name")
        if doc["kind"] in INPUT_KINDS:
            objects.append(doc)
    return objects
