"""The README's resource examples are valid resources: each YAML block that declares an
L4Listener or L7Route compiles to Accepted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from controlplane.compiler import Snapshot, compile_snapshot

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [
    block
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    if re.search(r"^kind: (L4Listener|L7Route)$", block, re.MULTILINE)
]


def test_the_readme_has_resource_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: re.search(r"name: ([\w-]+)", b)[1])  # type: ignore[index]
def test_each_readme_example_is_accepted(block: str) -> None:
    documents = [d for d in yaml.safe_load_all(block) if d]
    compiled = compile_snapshot(Snapshot.of(documents), 1)
    for key, conditions in compiled.statuses.items():
        accepted = next(c for c in conditions if c.type == "Accepted")
        assert accepted.status == "True", (key, accepted.message)
