"""Golden tests of the compiler: objects in, table and conditions out."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.compiler import Snapshot, compile_snapshot

from .golden import GOLDEN, cases, inputs, render


@pytest.mark.parametrize("case", cases())
def test_golden(case: str, update_golden: bool) -> None:
    out = GOLDEN / f"{case}.out.yaml"
    rendered = render(compile_snapshot(Snapshot.of(inputs(case))))
    if update_golden or not out.exists():
        out.write_text(rendered)
        if not update_golden:
            pytest.fail(f"{out.name} did not exist; written, review it and commit")
    assert rendered == out.read_text(), f"{case}: compiler output changed; `make golden` to accept"


def test_there_are_enough_cases() -> None:
    assert len(cases()) >= 40


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(cases()), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_input_order_never_changes_output(case: str, seed: int) -> None:
    objects = inputs(case)
    expected = render(compile_snapshot(Snapshot.of(objects)))
    random.Random(seed).shuffle(objects)
    assert render(compile_snapshot(Snapshot.of(objects))) == expected


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(st.sampled_from(cases()), min_size=2, max_size=6))
def test_the_compile_memo_never_changes_results(sequence: list[str]) -> None:
    """One cache across compiles of different inputs (the same keys with other content,
    Services and Secrets coming and going) gives exactly what a fresh compile gives."""
    from controlplane.compiler import CompileCache

    cache = CompileCache()
    for case in sequence:
        snapshot = Snapshot.of(inputs(case))
        assert render(compile_snapshot(snapshot, 1, cache)) == render(compile_snapshot(snapshot))
