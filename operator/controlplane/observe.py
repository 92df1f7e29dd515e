"""The operator's own endpoints: /healthz, /readyz and /metrics.

/healthz fails when a supervised task has ended (the kubelet restarts the pod);
/readyz answers 200 once the initial listing is complete (the startup probe waits for
it, however long listing a big cluster takes). /metrics is Prometheus text.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Everything the operator counts, in a registry of its own (one per operator)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.compiles = Counter("bilayer_operator_compiles", "Compiles of the routing table.", registry=r)
        self.compile_seconds = Histogram(
            "bilayer_operator_compile_seconds", "Time one compile took.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pushes = Counter(
            "bilayer_operator_pushes", "Table pushes to dataplane pods, by result.", ["result"], registry=r
        )
        self.push_seconds = Histogram(
            "bilayer_operator_push_seconds",
            "Time from sending a table (whole or delta) to a pod's answer.",
            ["pod"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.status_writes = Counter(
            "bilayer_operator_status_writes",
            "Status patches of L4Listeners and L7Routes, by result.",
            ["result"],
            registry=r,
        )
        self.watch_restarts = Counter(
            "bilayer_operator_watch_restarts",
            "Watches that ended with an error or 410 Gone.",
            ["watch"],
            registry=r,
        )
        self.relists = Counter(
            "bilayer_operator_lists", "Full lists of a watched collection.", ["watch"], registry=r
        )
        self.task_restarts = Counter(
            "bilayer_operator_task_restarts",
            "Supervised tasks restarted after an error.",
            ["task"],
            registry=r,
        )
        self.leader = Gauge("bilayer_operator_leader", "1 while this replica holds the Lease.", registry=r)
        self.term = Gauge("bilayer_operator_leader_term", "Lease transitions of the term held.", registry=r)
        self.table_generation = Gauge(
            "bilayer_operator_table_generation", "Generation of the table published.", registry=r
        )
        self.table_version = Gauge(
            "bilayer_operator_table_version",
            "1 for the version (content hash) of the table published.",
            ["version"],
            registry=r,
        )
        self.table_listeners = Gauge(
            "bilayer_operator_table_listeners", "Listeners in the table published.", registry=r
        )
        self.table_bytes = Gauge(
            "bilayer_operator_table_bytes",
            "Size of the whole table as JSON, when last sent whole.",
            registry=r,
        )
        self.dataplane_pods = Gauge(
            "bilayer_operator_dataplane_pods", "Dataplane pods, by what they serve.", ["state"], registry=r
        )
        self.api_requests = Gauge(
            "bilayer_operator_api_requests", "API requests made (a counter).", registry=r
        )
        self.api_retries = Gauge(
            "bilayer_operator_api_retries", "API requests retried (a counter).", registry=r
        )
        self.api_throttled = Gauge(
            "bilayer_operator_api_throttled", "429 answers from the API (a counter).", registry=r
        )


def health_app(
    metrics: Metrics, healthy: Callable[[], bool], ready: Callable[[], bool], refresh: Callable[[], None]
) -> web.Application:
    """The application serving /healthz, /readyz, /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if healthy() else web.Response(status=503, text="a task ended\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if ready() else web.Response(status=503, text="listing\n")

    async def scrape(_: web.Request) -> web.Response:
        refresh()
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app
