"""Traces through real sockets: the context a backend receives, the spans exported, the
access log's trace id, and `bilayer run` exporting to an OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from dataplane.l7.trace import parse_traceparent
from dataplane.metrics import DataplaneCollector
from dataplane.runtime import Dataplane, Settings
from dataplane.table import Table

from .helpers import BilayerRun, async_wait_for, free_port, service
from .l7kit import HTTPBackend, backend_ref, echoed, l7_table, read_response, route
from .test_l7_mirror import Mirror, eventually, mirror_filter

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@asynccontextmanager
async def traced(
    table: Table, ratio: float, **settings: Any
) -> AsyncIterator[tuple[Dataplane, InMemorySpanExporter]]:
    from dataplane.tracing import Tracer

    exporter = InMemorySpanExporter()
    dataplane = Dataplane(
        Settings(**{"address": "127.0.0.1", "access_log": False, **settings}),
        tracer=Tracer(exporter, ratio=ratio),
    )
    await dataplane.apply(table)
    try:
        yield dataplane, exporter
    finally:
        await dataplane.close(0)


@pytest.fixture
async def backend() -> AsyncIterator[HTTPBackend]:
    server = await HTTPBackend("a").start()
    yield server
    await server.stop()


async def send(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: shop.test:{port}", *headers, "", ""]
    writer.write("\r\n".join(lines).encode())
    try:
        return await read_response(reader)
    finally:
        writer.close()


def received(body: bytes) -> tuple[list[str], list[str]]:
    """The traceparent and tracestate values a backend received."""
    report = echoed(body)
    parents = [v for k, v in report["headers"] if k == "traceparent"]
    states = [v for k, v in report["headers"] if k == "tracestate"]
    return parents, states


def spans(exporter: InMemorySpanExporter, dataplane: Dataplane) -> tuple[ReadableSpan, list[ReadableSpan]]:
    assert dataplane.tracer is not None
    dataplane.tracer.flush()
    finished = exporter.get_finished_spans()
    servers = [s for s in finished if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, finished
    return servers[0], [s for s in finished if s.kind == SpanKind.CLIENT]


def one_rule(backend: HTTPBackend, port: int, **rule: Any) -> Table:
    return l7_table([route("r", port, [{"backendRefs": [backend_ref("a")], **rule}])], {"a": [backend.port]})


async def test_a_sampled_trace_is_continued_with_our_span_as_the_backend_s_parent(
    backend: HTTPBackend,
) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=0.0) as (dp, exporter):
        status, _, body = await send(
            port,
            "/shop/items?sig=secret&page=2",
            f"traceparent: 00-{TRACE}-{PARENT}-01",
            "tracestate: vendor=abc,other=1",
            "User-Agent: test-client/1.0",
        )
        server, clients = spans(exporter, dp)
    assert status == 200
    parents, states = received(body)
    assert states == ["vendor=abc,other=1"]  # forwarded untouched
    assert len(parents) == 1
    context = parse_traceparent(parents[0].encode())
    assert context is not None
    trace_id, parent_id, flags = context
    (client,) = clients
    assert client.context is not None and server.context is not None
    assert (trace_id, flags) == (int(TRACE, 16), 1)  # the trace continues, sampled
    assert parent_id == client.context.span_id  # the backend's parent: our span for this attempt
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert server.parent is not None and server.parent.span_id == int(PARENT, 16) and server.parent.is_remote
    assert server.context.trace_id == client.context.trace_id == int(TRACE, 16)
    assert (server.name, client.name) == ("GET", "GET")
    assert dict(server.attributes or {}) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/shop/items",
        "url.query": "sig=REDACTED&page=2",
        "server.address": "shop.test",
        "server.port": port,
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "user_agent.original": "test-client/1.0",
        "http.response.status_code": 200,
        "bilayer.route": "default/r",
        "bilayer.rule": 0,
    }
    assert dict(client.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": f"http://127.0.0.1:{backend.port}/shop/items?sig=REDACTED&page=2",
        "server.address": "127.0.0.1",
        "server.port": backend.port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": backend.port,
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
    }
    assert server.status.status_code == client.status.status_code == StatusCode.UNSET
    assert server.start_time is not None and client.start_time is not None
    assert server.end_time is not None and client.end_time is not None
    assert server.start_time <= client.start_time <= client.end_time <= server.end_time


async def test_an_unsampled_trace_is_continued_unrecorded_with_its_flag(backend: HTTPBackend) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=0.0) as (dp, exporter):
        _, _, body = await send(port, "/", f"traceparent: 00-{TRACE}-{PARENT}-00", "tracestate: v=1")
        assert dp.tracer is not None
        dp.tracer.flush()
        assert exporter.get_finished_spans() == ()
        assert dp.tracer.counts.started == 0
    parents, states = received(body)
    context = parse_traceparent(parents[0].encode())
    assert context is not None and context[0] == int(TRACE, 16) and context[2] == 0
    assert context[1] != int(PARENT, 16)  # the proxy is the parent, even unrecorded
    assert states == ["v=1"]


async def test_without_a_context_a_trace_starts_and_the_ratio_samples_it(backend: HTTPBackend) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=1.0) as (dp, exporter):
        _, _, body = await send(port, "/")
        server, (client,) = spans(exporter, dp)
    (parent,) = received(body)[0]
    assert server.context is not None and client.context is not None
    assert parse_traceparent(parent.encode()) == (server.context.trace_id, client.context.span_id, 1)
    assert server.parent is None  # a root


@pytest.mark.parametrize(
    "headers",
    [
        [f"traceparent: 00-{TRACE.upper()}-{PARENT}-01"],
        [f"traceparent: ff-{TRACE}-{PARENT}-01"],
        [f"traceparent: 00-{'0' * 32}-{PARENT}-01"],
        [f"traceparent: 00-{TRACE}-{PARENT}-01", f"traceparent: 00-{TRACE}-{PARENT}-01"],
    ],
    ids=["upper case", "version ff", "zero trace id", "twice"],
)
async def test_an_invalid_context_starts_a_new_trace_and_drops_tracestate(
    backend: HTTPBackend, headers: list[str]
) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=1.0) as (dp, exporter):
        _, _, body = await send(port, "/", *headers, "tracestate: vendor=abc")
        server, _ = spans(exporter, dp)
    parents, states = received(body)
    assert states == []
    assert len(parents) == 1
    context = parse_traceparent(parents[0].encode())
    assert context is not None and context[0] != int(TRACE, 16)
    assert server.parent is None


async def test_each_resend_is_a_client_span_with_its_count(backend: HTTPBackend) -> None:
    port = free_port()
    retry = {"retry": {"attempts": 2, "codes": [503], "backoff": "1ms"}}
    async with traced(one_rule(backend, port, **retry), ratio=1.0) as (dp, exporter):
        status, _, _ = await send(port, "/flaky/1")
        server, clients = spans(exporter, dp)
    assert status == 200
    first, second = sorted(clients, key=lambda s: s.start_time or 0)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["http.response.status_code"] == 503 and first.attributes["error.type"] == "503"
    assert first.status.status_code == StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200 and "error.type" not in second.attributes
    assert server.status.status_code == StatusCode.UNSET


async def test_server_errors_and_failed_attempts_are_errors(backend: HTTPBackend) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=1.0) as (dp, exporter):
        assert (await send(port, "/status/500"))[0] == 500
        server, (client,) = spans(exporter, dp)
        assert server.status.status_code == client.status.status_code == StatusCode.ERROR
        assert server.attributes is not None and server.attributes["error.type"] == "500"
        exporter.clear()
        assert (await send(port, "/status/404"))[0] == 404
        server, (client,) = spans(exporter, dp)
        # A 4xx is the client's error, not the server's: an error on the CLIENT span only.
        assert server.status.status_code == StatusCode.UNSET
        assert client.status.status_code == StatusCode.ERROR
        exporter.clear()
        await backend.stop()  # nothing listens: the connect fails, 503, no request was sent
        assert (await send(port, "/"))[0] == 503
        server, clients = spans(exporter, dp)
    assert clients == []
    assert server.attributes is not None and server.attributes["error.type"] == "503"


async def test_a_route_setting_traceparent_cannot_break_the_trace(backend: HTTPBackend) -> None:
    port = free_port()
    modifier = {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"add": [{"name": "traceparent", "value": "x"}]},
    }
    async with traced(one_rule(backend, port, filters=[modifier]), ratio=1.0) as (dp, exporter):
        _, _, body = await send(port, "/")
        _, (client,) = spans(exporter, dp)
    (parent,) = received(body)[0]
    assert client.context is not None
    assert parse_traceparent(parent.encode()) == (client.context.trace_id, client.context.span_id, 1)


async def test_the_access_log_carries_the_trace_id(
    backend: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=0.0, access_log=True):
        with caplog.at_level("INFO", logger="bilayer.access"):
            await send(port, "/", f"traceparent: 00-{TRACE}-{PARENT}-00")
            await send(port, "/")
    entries = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert entries[0]["trace_id"] == TRACE
    assert len(entries[1]["trace_id"]) == 32 and entries[1]["trace_id"] != TRACE


async def test_with_tracing_off_the_context_passes_untouched(
    backend: HTTPBackend, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    dataplane = Dataplane(Settings(address="127.0.0.1", access_log=True))
    assert dataplane.tracer is None
    await dataplane.apply(one_rule(backend, port))
    try:
        with caplog.at_level("INFO", logger="bilayer.access"):
            _, _, body = await send(port, "/", f"traceparent: 00-{TRACE}-{PARENT}-01", "tracestate: v=1")
    finally:
        await dataplane.close(0)
    assert received(body) == ([f"00-{TRACE}-{PARENT}-01"], ["v=1"])
    (entry,) = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert entry["trace_id"] is None


async def test_span_counters_on_metrics(backend: HTTPBackend) -> None:
    port = free_port()
    async with traced(one_rule(backend, port), ratio=1.0) as (dp, _):
        for _ in range(3):
            await send(port, "/")
        assert dp.tracer is not None
        dp.tracer.flush()
        registry = CollectorRegistry()
        registry.register(DataplaneCollector(dp))
        text = generate_latest(registry).decode()
    assert "bilayer_trace_spans_started_total 6.0" in text
    assert "bilayer_trace_spans_exported_total 6.0" in text
    assert 'bilayer_trace_spans_dropped_total{reason="queue_full"} 0.0' in text


async def test_a_mirrored_copy_is_a_span_of_its_own_in_the_same_trace(backend: HTTPBackend) -> None:
    port = free_port()
    mirror = await Mirror().start()
    rules = [{"filters": [mirror_filter("m")], "backendRefs": [backend_ref("a")]}]
    table = l7_table([route("r", port, rules)], {"a": [backend.port], "m": [mirror.port]})
    try:
        async with traced(table, ratio=0.0) as (dp, exporter):
            assert dp.tracer is not None
            tracer = dp.tracer
            _, _, body = await send(
                port, "/m?sig=s", f"traceparent: 00-{TRACE}-{PARENT}-01", "tracestate: v=1"
            )
            # The copy's span is recorded when the copy is answered, maybe after the exchange.
            await eventually(lambda: tracer.counts.handed == 3, "the copy's span")
            server, clients = spans(exporter, dp)
            exporter.clear()
            # Unsampled: no span; the copy names the request's own id, as the primary does.
            _, _, unsampled = await send(port, "/m", f"traceparent: 00-{TRACE}-{PARENT}-00")
            await eventually(lambda: len(mirror.copies) == 2, "the second copy")
            tracer.flush()
            assert exporter.get_finished_spans() == ()
    finally:
        await mirror.stop()
    (copy,) = [s for s in clients if s.attributes and s.attributes.get("bilayer.mirror")]
    (primary,) = [s for s in clients if s is not copy]
    assert server.context is not None and copy.context is not None and primary.context is not None
    assert copy.parent is not None and copy.parent.span_id == server.context.span_id
    assert copy.context.trace_id == int(TRACE, 16) and copy.context.span_id != primary.context.span_id
    assert received(body)[0] == [f"00-{TRACE}-{primary.context.span_id:016x}-01"]
    first, second = mirror.copies
    assert first["headers"]["traceparent"] == f"00-{TRACE}-{copy.context.span_id:016x}-01"
    assert first["headers"]["tracestate"] == "v=1"
    assert dict(copy.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": f"http://127.0.0.1:{mirror.port}/m?sig=REDACTED",
        "server.address": "127.0.0.1",
        "server.port": mirror.port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": mirror.port,
        "network.protocol.version": "1.1",
        "bilayer.mirror": True,
        "http.response.status_code": 500,  # what the test's mirror always answers
        "error.type": "500",
    }
    assert copy.status.status_code == StatusCode.ERROR
    assert server.status.status_code == StatusCode.UNSET  # the mirror's 500 is not the client's
    context = parse_traceparent(second["headers"]["traceparent"].encode())
    assert context is not None and context[0] == int(TRACE, 16) and context[2] == 0
    assert context[1] != int(PARENT, 16)
    assert received(unsampled)[0] == [second["headers"]["traceparent"]]


# --- end to end: `bilayer run` exporting over OTLP/HTTP to a receiver in this process ---


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf bodies, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(span)
                    self.resources.append(attributes)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


ROUTE = """---
apiVersion: bilayer.dev/v1alpha1
kind: L7Route
metadata: {{name: traced, namespace: default}}
spec:
  port: {port}
  rules: [{{backendRefs: [{{name: web, port: 80}}]}}]
"""


async def stop(run: BilayerRun) -> int:
    """Stop the process without blocking this loop (the receiver answers its last export)."""
    run.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    while run.process.poll() is None:
        if time.monotonic() > deadline:
            run.process.kill()
            raise AssertionError("bilayer run did not stop")
        await asyncio.sleep(0.05)
    return run.process.returncode


@pytest.mark.parametrize("export", ["scheduled", "at shutdown"])
async def test_bilayer_run_exports_spans_to_an_otlp_receiver(
    tmp_path: Path, backend: HTTPBackend, monkeypatch: pytest.MonkeyPatch, export: str
) -> None:
    receiver = await Receiver().start()
    port = free_port()
    (tmp_path / "objects.yaml").write_text(
        service("web", 80, [("127.0.0.1", backend.port)]) + ROUTE.format(port=port)
    )
    # Scheduled: every 100 ms. At shutdown: never before it, so only the flush delivers.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100" if export == "scheduled" else "600000")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=dataplane-0")
    endpoint = f"http://127.0.0.1:{receiver.port}"
    run = await asyncio.to_thread(
        BilayerRun, str(tmp_path), "--otlp-endpoint", endpoint, "--trace-sampling", "1", "--no-access-log"
    )
    try:
        await async_wait_for(lambda: _serves(port), what="the route")
        status, _, body = await send(port, "/e2e", f"traceparent: 00-{TRACE}-{PARENT}-01")
        assert status == 200
        if export == "scheduled":
            await async_wait_for(
                lambda: len(ours(receiver)) == 2, deadline_s=15, what="the spans at the receiver"
            )

            async def counted() -> bool:
                metrics = (await asyncio.to_thread(run.get, "/metrics"))[1]
                return f"bilayer_trace_spans_exported_total {len(receiver.spans)}.0" in metrics

            await async_wait_for(counted, what="the exported spans on /metrics")
        else:
            # Nothing exported up to the stop: what arrives after it is the shutdown's flush.
            metrics = (await asyncio.to_thread(run.get, "/metrics"))[1]
            assert "bilayer_trace_spans_exported_total 0.0" in metrics
            assert receiver.spans == []
    finally:
        code = await stop(run)
    await async_wait_for(lambda: len(ours(receiver)) == 2, deadline_s=15, what="the spans at the receiver")
    await receiver.stop()
    assert code == 0, run.output()
    by_kind = {span.kind: span for span in ours(receiver)}
    server = by_kind[2]  # SPAN_KIND_SERVER
    client = by_kind[3]  # SPAN_KIND_CLIENT
    assert server.trace_id.hex() == client.trace_id.hex() == TRACE
    assert server.parent_span_id.hex() == PARENT
    assert client.parent_span_id == server.span_id
    (parent,) = received(body)[0]
    assert parent == f"00-{TRACE}-{client.span_id.hex()}-01"
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["url.path"].string_value == "/e2e"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["bilayer.route"].string_value == "default/traced"
    assert receiver.resources[0]["service.name"] == "bilayer"
    assert receiver.resources[0]["k8s.pod.name"] == "dataplane-0"


def ours(receiver: Receiver) -> list[Any]:
    """The spans of the test's trace (the readiness probes have their own)."""
    return [span for span in receiver.spans if span.trace_id.hex() == TRACE]


async def _serves(port: int) -> bool:
    try:
        return (await send(port, "/ready"))[0] == 200
    except OSError:
        return False


async def test_an_unreachable_collector_costs_requests_nothing(
    tmp_path: Path, backend: HTTPBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    (tmp_path / "objects.yaml").write_text(
        service("web", 80, [("127.0.0.1", backend.port)]) + ROUTE.format(port=port)
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = await asyncio.to_thread(BilayerRun, str(tmp_path), "--otlp-endpoint", dead, "--trace-sampling", "1")
    try:
        await async_wait_for(lambda: _serves(port), what="the route")
        for _ in range(5):
            assert (await send(port, "/"))[0] == 200

        async def failed() -> bool:
            text = (await asyncio.to_thread(run.get, "/metrics"))[1]
            return (
                isinstance(text, str)
                and 'bilayer_trace_spans_dropped_total{reason="export_failed"} 0.0' not in text
            )

        await async_wait_for(failed, deadline_s=20, what="failed exports to be counted")
        assert (await send(port, "/"))[0] == 200
    finally:
        assert await stop(run) == 0, run.output()
