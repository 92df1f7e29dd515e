"""Prometheus metrics, read at scrape time.

The forwarding paths count into plain integers on their own stats objects (no locks, no
label lookups per request); this collector turns them into metric families when
/metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .runtime import Dataplane


class DataplaneCollector(Collector):
    """Metrics of one dataplane: table, listeners, and what the listeners report."""

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane

    def collect(self) -> Iterator[Metric]:
        dp = self.dataplane
        generation = GaugeMetricFamily("bilayer_table_generation", "Generation of the table being served.")
        generation.add_metric([], dp.table.generation if dp.table else 0)
        yield generation
        applied = CounterMetricFamily(
            "bilayer_table_applies", "Tables applied since start, whole or by delta."
        )
        applied.add_metric([], dp.tables_applied)
        yield applied
        deltas = CounterMetricFamily("bilayer_table_deltas", "Tables applied by delta since start.")
        deltas.add_metric([], dp.deltas_applied)
        yield deltas
        refused = CounterMetricFamily(
            "bilayer_table_refusals", "Tables refused (invalid or stale) since start."
        )
        refused.add_metric([], dp.tables_refused)
        yield refused
        yield from dp.serving_metrics()


def serving_metrics(dp: Dataplane) -> Iterator[Metric]:
    """What a dataplane's listeners, health checks and tracer report."""
    up = GaugeMetricFamily(
        "bilayer_listener_up",
        "1 when the listener is accepting, 0 when it failed to bind.",
        labels=["port", "kind"],
    )
    if dp.table is not None:
        for port, listener in sorted(dp.table.listeners.items()):
            kinds = [listener.tcp_kind] + (["udp"] if listener.udp is not None else [])
            for kind in kinds:
                running = dp.udp_listeners if kind == "udp" else dp.listeners
                if kind is not None:
                    up.add_metric([str(port), kind], 1 if port in running else 0)
    yield up
    # Each listener class reports all of its instances in one set of metric families.
    by_class: dict[type, list[object]] = {}
    for serving in [*dp.listeners.values(), *dp.udp_listeners.values()]:
        by_class.setdefault(type(serving), []).append(serving)
    for cls, group in by_class.items():
        collect: Callable[[list[object]], Iterator[Metric]] = getattr(cls, "collect")  # noqa: B009
        yield from collect(group)
    yield from dp.health.collect()
    if dp.tracer is not None:
        yield from dp.tracer.collect()
