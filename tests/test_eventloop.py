"""Process helpers: the collector paused around large builds, the fd limit."""

from __future__ import annotations

import gc
import logging
import resource

import pytest

from dataplane.eventloop import freeze_heap, gc_paused, raise_fd_limit, report_slow_collections


def test_gc_paused_restores_the_previous_state() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_collector_thresholds_are_python_defaults() -> None:
    # Large thresholds made request-path pauses long; only builds pause the collector.
    assert gc.get_threshold() == (700, 10, 10)


def test_fd_limit_raised_to_the_hard_limit() -> None:
    soft = raise_fd_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_planned_collections_are_quiet_and_others_reported(caplog: pytest.LogCaptureFixture) -> None:
    """freeze_heap's own collection is routine (every start): nothing at the default level.
    Any other collection longer than the threshold is a stall worth a warning."""
    before = list(gc.callbacks)
    report_slow_collections(threshold=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="bilayer.gc"):
            freeze_heap()
            assert caplog.records == []
            gc.collect()
        assert [r.getMessage() for r in caplog.records] == ["slow garbage collection"]
    finally:
        gc.callbacks[:] = before
        gc.unfreeze()
