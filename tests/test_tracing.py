"""Trace Context parsing, sampling and span export, without sockets."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from dataplane.l7.trace import Trace, parse_traceparent, redact_query, traceparent
from dataplane.tracing import Tracer, ratio_bound, traces_url

ROOT = Path(__file__).parent.parent
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01".encode()

# (value, expected (trace id, parent id, flags) or None for invalid), after the W3C
# Trace Context recommendation's traceparent section and its test suite's cases.
CORPUS: list[tuple[str, bytes, tuple[int, int, int] | None]] = [
    ("sampled", VALID, (int(TRACE, 16), int(PARENT, 16), 1)),
    ("not sampled", f"00-{TRACE}-{PARENT}-00".encode(), (int(TRACE, 16), int(PARENT, 16), 0)),
    (
        "unknown flags kept, sampled bit read",
        f"00-{TRACE}-{PARENT}-09".encode(),
        (int(TRACE, 16), int(PARENT, 16), 9),
    ),
    (
        "surrounding whitespace is not part of the value",
        b" \t" + VALID + b" ",
        (int(TRACE, 16), int(PARENT, 16), 1),
    ),
    (
        "a later version, same length",
        f"01-{TRACE}-{PARENT}-01".encode(),
        (int(TRACE, 16), int(PARENT, 16), 1),
    ),
    (
        "a later version with more fields",
        f"cc-{TRACE}-{PARENT}-01-what-the-future".encode(),
        (int(TRACE, 16), int(PARENT, 16), 1),
    ),
    ("a later version, more without a dash", f"cc-{TRACE}-{PARENT}-01what".encode(), None),
    ("version 00 with more fields", f"00-{TRACE}-{PARENT}-01-extra".encode(), None),
    ("version 00 one character longer", VALID + b"0", None),
    ("version ff", f"ff-{TRACE}-{PARENT}-01".encode(), None),
    ("version in upper case", f"0A-{TRACE}-{PARENT}-01".encode(), None),
    ("trace id in upper case", f"00-{TRACE.upper()}-{PARENT}-01".encode(), None),
    ("parent id in upper case", f"00-{TRACE}-{PARENT.upper()}-01".encode(), None),
    ("flags in upper case", f"00-{TRACE}-{PARENT}-0A".encode(), None),
    ("trace id all zeros", f"00-{'0' * 32}-{PARENT}-01".encode(), None),
    ("parent id all zeros", f"00-{TRACE}-{'0' * 16}-01".encode(), None),
    ("trace id too short", f"00-{TRACE[:-1]}-{PARENT}-01".encode(), None),
    ("parent id too long", f"00-{TRACE}-{PARENT}0-01".encode(), None),
    ("not hex", f"00-{TRACE[:-1]}g-{PARENT}-01".encode(), None),
    ("flags of one digit", f"00-{TRACE}-{PARENT}-1".encode(), None),
    ("underscores for dashes", f"00_{TRACE}_{PARENT}_01".encode(), None),
    ("whitespace inside", f"00- {TRACE}-{PARENT}-01".encode(), None),
    ("empty", b"", None),
    ("a later version, too short", f"01-{TRACE}-{PARENT}-".encode(), None),
]


@pytest.mark.parametrize(("why", "value", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_traceparent_corpus(why: str, value: bytes, expected: tuple[int, int, int] | None) -> None:
    assert parse_traceparent(value) == expected, why


def test_traceparent_written_is_version_00_with_only_the_sampled_flag() -> None:
    assert traceparent(int(TRACE, 16), 1, True) == f"00-{TRACE}-0000000000000001-01".encode()
    assert traceparent(1, int(PARENT, 16), False) == f"00-{'0' * 31}1-{PARENT}-00".encode()
    assert parse_traceparent(traceparent(5, 7, True)) == (5, 7, 1)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 0.999, 1.0])
def test_ratio_sampling_decides_as_the_sdk_does(ratio: float) -> None:
    tracer = Tracer(InMemorySpanExporter(), ratio=ratio)
    sdk = TraceIdRatioBased(ratio)
    rng = random.Random(ratio)
    ids = [rng.getrandbits(128) or 1 for _ in range(5000)]
    # Around the bound too, where an off-by-one would show.
    bound = ratio_bound(ratio)
    ids += [(rng.getrandbits(64) << 64) | low for low in (bound - 1, bound, bound + 1) if 0 < low < 1 << 64]
    for trace_id in ids:
        decision = sdk.should_sample(None, trace_id, "x").decision.is_sampled()
        assert tracer.sample(trace_id) == decision, hex(trace_id)


def test_sampling_is_parent_based_and_a_bad_parent_starts_a_new_trace() -> None:
    never = Tracer(InMemorySpanExporter(), ratio=0.0)
    always = Tracer(InMemorySpanExporter(), ratio=1.0)
    sampled = [(b"traceparent", VALID)]
    unsampled = [(b"traceparent", VALID[:-2] + b"00")]
    trace = Trace(never, sampled)
    assert (trace.sampled, trace.continued, trace.trace_hex, trace.parent_id) == (
        True,
        True,
        TRACE,
        int(PARENT, 16),
    )
    assert Trace(never, unsampled).sampled is False
    assert Trace(always, unsampled).sampled is True  # not sampled upstream: the ratio decides
    assert Trace(never, []).sampled is False
    assert Trace(always, []).sampled is True
    for headers in ([(b"Traceparent", VALID.upper())], [(b"traceparent", VALID), (b"TraceParent", VALID)]):
        fresh = Trace(always, headers)
        assert not fresh.continued and fresh.trace_hex != TRACE and fresh.parent_id == 0


def test_forwarded_context_replaces_the_request_s() -> None:
    tracer = Tracer(InMemorySpanExporter(), ratio=0.0)
    endpoint = _Endpoint()
    # A valid context: tracestate stays, in place; traceparent is ours.
    headers = [(b"TraceParent", VALID[:-2] + b"00"), (b"tracestate", b"a=1"), (b"x", b"y")]
    trace = Trace(tracer, headers)
    trace.attempt_begins(headers, endpoint, 0, "/", False)  # type: ignore[arg-type]
    assert headers == [(b"tracestate", b"a=1"), (b"x", b"y"), (b"traceparent", headers[-1][1])]
    parsed = parse_traceparent(headers[-1][1])
    assert parsed == (int(TRACE, 16), trace.span_id, 0)
    # An invalid one: both go, a new trace is sent.
    headers = [(b"traceparent", VALID.upper()), (b"Tracestate", b"a=1"), (b"x", b"y")]
    trace = Trace(tracer, headers)
    trace.attempt_begins(headers, endpoint, 0, "/", False)  # type: ignore[arg-type]
    assert [n for n, _ in headers] == [b"x", b"traceparent"]
    assert parse_traceparent(headers[-1][1]) == (trace.trace_id, trace.span_id, 0)


def test_query_redaction() -> None:
    assert redact_query("a=1&b=2") == "a=1&b=2"
    assert redact_query("sig=abc&q=1&Signature=x&AWSAccessKeyId=k&X-Goog-Signature=g") == (
        "sig=REDACTED&q=1&Signature=REDACTED&AWSAccessKeyId=REDACTED&X-Goog-Signature=REDACTED"
    )
    assert redact_query("signature=lowercase&sigma=1") == "signature=lowercase&sigma=1"


def test_traces_url() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://vendor.example/otlp/v1/traces") == "https://vendor.example/otlp/v1/traces"
    for bad in ("collector:4318", "grpc://collector:4317", "http://"):
        with pytest.raises(ValueError, match="OTLP endpoint"):
            traces_url(bad)


def test_record_exports_a_span_with_its_parent_kind_and_status() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer(exporter, ratio=1.0)
    tracer.record("GET", SpanKind.SERVER, 5, 6, 7, start=10, end=20, attributes={"a": 1}, error="")
    tracer.record("GET", SpanKind.CLIENT, 5, 8, 6, start=11, end=19, attributes={}, remote_parent=False)
    tracer.flush()
    server, client = exporter.get_finished_spans()
    assert server.context is not None and server.parent is not None and client.parent is not None
    assert (server.context.trace_id, server.context.span_id, server.parent.span_id) == (5, 6, 7)
    assert server.parent.is_remote and not client.parent.is_remote
    assert (server.kind, server.status.status_code, server.attributes) == (
        SpanKind.SERVER,
        StatusCode.ERROR,
        {"a": 1},
    )
    assert (client.kind, client.status.status_code, client.start_time, client.end_time) == (
        SpanKind.CLIENT,
        StatusCode.UNSET,
        11,
        19,
    )
    assert server.resource.attributes["service.name"] == "bilayer"
    assert tracer.counts.exported == 2


class _Stuck(SpanExporter):
    """An exporter whose collector does not answer until released."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.release = threading.Event()
        self.result = result
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.spans += len(spans)
        return self.result


def _record(tracer: Tracer, count: int) -> None:
    for i in range(count):
        tracer.record("GET", SpanKind.SERVER, 1, i + 1, 0, start=1, end=2, attributes={})


def test_a_full_queue_drops_and_counts_instead_of_growing() -> None:
    exporter = _Stuck()
    tracer = Tracer(exporter, ratio=1.0, queue_size=4)
    _record(tracer, 10)  # the collector is stuck: 4 wait, 6 are dropped
    assert (tracer.counts.handed, tracer.counts.queue_full) == (4, 6)
    exporter.release.set()
    tracer.flush()
    assert (exporter.spans, tracer.counts.exported) == (4, 4)
    _record(tracer, 2)  # room again
    tracer.flush()
    assert (tracer.counts.exported, tracer.counts.queue_full) == (6, 6)


def test_failed_exports_are_counted() -> None:
    exporter = _Stuck(SpanExportResult.FAILURE)
    exporter.release.set()
    tracer = Tracer(exporter, ratio=1.0)
    _record(tracer, 3)
    tracer.flush()
    assert (tracer.counts.failed, tracer.counts.exported) == (3, 0)
    metrics = {m.name: m for m in tracer.collect()}
    dropped = {s.labels["reason"]: s.value for s in metrics["bilayer_trace_spans_dropped"].samples}
    assert dropped == {"queue_full": 0, "export_failed": 3}


async def test_close_waits_at_most_its_grace_for_a_collector_that_does_not_answer() -> None:
    exporter = _Stuck()
    tracer = Tracer(exporter, ratio=1.0)
    _record(tracer, 1)
    await tracer.close(0.2)  # returns although the export is stuck
    _record(tracer, 1)
    assert tracer.counts.queue_full == 1  # closed: nothing more is queued
    exporter.release.set()


def test_the_sdk_is_not_imported_when_tracing_is_off() -> None:
    """Serving with tracing off loads no OpenTelemetry module (and so pays nothing for it)."""
    code = (
        "import asyncio, sys\n"
        "from dataplane.runtime import Dataplane, Settings\n"
        "from dataplane.l7 import listener, exchange, trace\n"
        "async def main():\n"
        "    dp = Dataplane(Settings(address='127.0.0.1'))\n"
        "    assert dp.tracer is None\n"
        "    await dp.close(0)\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'operator'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Endpoint:
    address = "127.0.0.1"
    port = 8080


def test_the_tracing_flags_are_checked() -> None:
    from controlplane.cli import _settings, parser

    args = parser().parse_args(
        ["dataplane", "--otlp-endpoint", "http://collector:4318", "--trace-sampling", "1"]
    )
    settings = _settings(args)
    assert (settings.otlp_endpoint, settings.trace_sampling) == ("http://collector:4318", 1.0)
    assert _settings(parser().parse_args(["run", "-f", "."])).otlp_endpoint is None
    for bad in (
        ["--trace-sampling", "1.5"],
        ["--trace-sampling", "x"],
        ["--otlp-endpoint", "collector:4318"],
    ):
        with pytest.raises(SystemExit):
            parser().parse_args(["dataplane", *bad])
