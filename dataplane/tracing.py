"""Span export: the OpenTelemetry SDK's batch processor and OTLP/HTTP exporter.

Imported only when tracing is on (`--otlp-endpoint`): the SDK never loads otherwise.

The request path keeps its own small record of a traced exchange (l7/trace.py) and hands
this module finished spans as ReadableSpans. It does not go through the SDK's Tracer:
that would build a Span, a Context and a sampler call for every request on the event
loop, sampled or not. What the SDK does here is what it is good at: batching finished
spans, encoding them to OTLP protobuf, and sending them from its own thread.

The queue is bounded twice: a span is dropped and counted when the spans handed over and
not yet settled (exported or failed) reach `queue_size`, so the SDK's own queue, which
would silently push out its oldest span, never fills. Failed exports are counted and
logged by the exporter; the request path never waits for or hears of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue
from prometheus_client.core import CounterMetricFamily, Metric

from .logs import fields

log = logging.getLogger("bilayer.tracing")

# The batch processor's settings are the SDK's defaults, and its environment variables
# (OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_EXPORT_BATCH_SIZE) apply.
QUEUE_SIZE = 2048  # spans held for export at most
SHUTDOWN_SECONDS = 5.0  # how long a stopping dataplane waits for the last export

_LOW_64 = (1 << 64) - 1
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("bilayer.dataplane")
_UNSET = Status(StatusCode.UNSET)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for an endpoint: a collector's base URL
    (`http://collector:4318`) gets the signal path; a URL with a path is used as it is."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the OTLP endpoint must be an http:// or https:// URL, not {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def ratio_bound(ratio: float) -> int:
    """Trace ids whose low 64 bits are below this are sampled: the rule of the SDK's
    TraceIdRatioBased sampler, so that every tracer using it agrees on a trace."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the sampling ratio must be between 0 and 1, not {ratio}")
    return round(ratio * (_LOW_64 + 1))


@dataclass(slots=True)
class Counts:
    """What happened to the spans of sampled requests (read by /metrics)."""

    started: int = 0  # spans begun
    handed: int = 0  # finished spans given to the batch processor
    exported: int = 0  # accepted by the collector
    queue_full: int = 0  # dropped: too many waiting for export (or the exporter has stopped)
    failed: int = 0  # in an export that failed (collector down, refused, timed out)

    @property
    def settled(self) -> int:
        return self.exported + self.failed


class _CountingExporter(SpanExporter):
    """The real exporter, counting what each export did. Runs in the processor's thread;
    only this thread writes `exported` and `failed`."""

    def __init__(self, inner: SpanExporter, counts: Counts) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not kill the export thread
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.counts.exported += len(spans)
        else:
            self.counts.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracer:
    """Sampling, span ids and export for one dataplane."""

    # (for the request path, which does not import the OpenTelemetry API itself)
    SERVER = SpanKind.SERVER
    CLIENT = SpanKind.CLIENT

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        ratio: float,
        queue_size: int | None = None,
        flush_seconds: float | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.ratio = ratio
        self.bound = ratio_bound(ratio)
        self.counts = Counts()
        if queue_size is None:
            queue_size = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", QUEUE_SIZE)
        self.queue_size = queue_size
        self.resource = resource or default_resource()
        self._processor = BatchSpanProcessor(
            _CountingExporter(exporter, self.counts),
            max_queue_size=queue_size,
            schedule_delay_millis=None if flush_seconds is None else flush_seconds * 1000,
            max_export_batch_size=min(_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), queue_size),
        )
        self._closed = False
        # Ids need to be unique and random enough for ratio sampling, not secret: the
        # SDK's own generator uses the same module.
        self._bits = random.getrandbits

    # --- the request path ---

    def sample(self, trace_id: int) -> bool:
        return (trace_id & _LOW_64) < self.bound

    def new_trace_id(self) -> int:
        trace_id = self._bits(128)
        while not trace_id:  # all zeros is invalid (W3C); 2**-128
            trace_id = self._bits(128)
        return trace_id

    def new_span_id(self) -> int:
        span_id = self._bits(64)
        while not span_id:
            span_id = self._bits(64)
        return span_id

    def record(
        self,
        name: str,
        kind: SpanKind,
        trace_id: int,
        span_id: int,
        parent_id: int,
        *,
        start: int,
        end: int,
        attributes: Mapping[str, AttributeValue],
        error: str | None = None,
        remote_parent: bool = True,
    ) -> None:
        """Hand one finished span of a sampled trace to the exporter (or drop it, counted,
        when the queue is full). start and end are epoch nanoseconds; error: the span's
        status is Error with this description ("" for none)."""
        counts = self.counts
        if self._closed or counts.handed - counts.settled >= self.queue_size:
            counts.queue_full += 1
            return
        counts.handed += 1
        # The request's tracestate is forwarded to the backend untouched but not parsed
        # into the span: Bilayer adds no entry of its own, and the SDK's parser logs every
        # malformed member, which a client could use to flood the log.
        context = SpanContext(trace_id, span_id, False, _SAMPLED)
        parent = SpanContext(trace_id, parent_id, remote_parent, _SAMPLED) if parent_id else None
        span = ReadableSpan(
            name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=kind,
            status=_UNSET if error is None else Status(StatusCode.ERROR, error or None),
            start_time=start,
            end_time=end,
            instrumentation_scope=_SCOPE,
        )
        self._processor.on_end(span)

    # --- life cycle ---

    def flush(self) -> None:
        """Export everything queued now (blocking: tests and shutdown)."""
        self._processor.force_flush()

    async def close(self, grace: float = SHUTDOWN_SECONDS) -> None:
        """Export what is queued and stop, waiting at most grace seconds (the export
        runs in a thread of its own, so a collector that does not answer holds nothing)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def shut() -> None:
            try:
                self._processor.shutdown()  # type: ignore[no-untyped-call]
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by then
                    loop.call_soon_threadsafe(finish)

        threading.Thread(target=shut, name="bilayer-trace-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, grace)
        except TimeoutError:
            log.warning("spans still unexported at shutdown", extra=fields(seconds=grace))

    # --- /metrics ---

    def collect(self) -> Iterator[Metric]:
        counts = self.counts
        started = CounterMetricFamily(
            "bilayer_trace_spans_started", "Spans begun for sampled requests (server and client spans)."
        )
        started.add_metric([], counts.started)
        exported = CounterMetricFamily("bilayer_trace_spans_exported", "Spans the OTLP collector accepted.")
        exported.add_metric([], counts.exported)
        dropped = CounterMetricFamily(
            "bilayer_trace_spans_dropped",
            "Spans lost, by reason: queue_full (more waiting for export than the queue holds), "
            "export_failed (the collector refused them, was unreachable or too slow).",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], counts.queue_full)
        dropped.add_metric(["export_failed"], counts.failed)
        yield from (started, exported, dropped)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    return int(text) if text.isdigit() and int(text) > 0 else default


def default_resource() -> Resource:
    """service.name "bilayer" unless OTEL_SERVICE_NAME says otherwise; OTEL_RESOURCE_ATTRIBUTES
    adds attributes (the chart sets the pod's name and namespace there)."""
    return Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "bilayer"})


def open_tracer(endpoint: str, ratio: float) -> Tracer:
    """A tracer exporting to an OTLP/HTTP collector. Headers, certificates and compression
    come from the OTEL_EXPORTER_OTLP_* environment variables, as for any OpenTelemetry SDK."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = traces_url(endpoint)
    # Each export, retries included, takes at most OTEL_EXPORTER_OTLP_TIMEOUT (10 s).
    tracer = Tracer(OTLPSpanExporter(endpoint=url), ratio=ratio)
    log.info("tracing on", extra=fields(endpoint=url, sampling=ratio))
    return tracer
