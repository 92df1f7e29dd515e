"""Process helpers: the collector paused around large builds, the fd limit."""

from __future__ import annotations

import gc
import resource

from dataplane.eventloop import gc_paused, raise_fd_limit


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
