"""The OpenTelemetry SDK bridge: KnhkSpanProcessor beside the SDK's own export paths.

Run with ``python benchmarks/run.py otel`` (``--quick`` for smaller sizes).

An instrumented application produces the same spans (three attributes, one
event, a parent) through an opentelemetry-sdk ``TracerProvider``; what differs
is where they go:

* knhk: ``KnhkSpanProcessor`` into a ``TelemetryPipeline`` (discarding exporter),
  spans converted to Arrow columns in-process;
* the SDK's ``BatchSpanProcessor`` with its ``InMemorySpanExporter`` (the
  cheapest thing the SDK can do with a span: keep the object);
* the SDK's ``BatchSpanProcessor`` with the OTLP exporter's encoding
  (``encode_spans(...).SerializeToString()``, what ``OTLPSpanExporter`` does
  before the network hop knhk avoids).

Rates count spans from the first ``start_span`` to the end of
``force_flush`` (every span converted and through the pipeline). A second
pair isolates the processors: pre-made spans handed to ``on_end``. A third
pair is the design choice inside the processor: buffering spans and
recording each buffer with one call (``record_spans``, or ``record_batch``
when a span has fields a ``knhk.Span`` cannot carry) against recording
each span from ``on_end`` (``record_span``); the third row compares the
column path (``record_batch`` of a patched batch) with the same.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import knhk
from knhk.exporters.base import Exporter, ExportResult
from knhk.otel import KnhkSpanProcessor, _Converter

RESOURCE = Resource.create({"service.name": "bench", "service.version": "1.0.0"})


class Discard(Exporter):
    name = "discard"
    queue_size = 1 << 20

    def export(self, batch):
        return ExportResult.SUCCESS


class OtlpEncode(SpanExporter):
    """The OTLP exporter's work short of the network: encode and serialize."""

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export(self, spans):
        self.bytes += len(encode_spans(spans).SerializeToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


class Collect(SpanProcessor):
    def __init__(self) -> None:
        self.spans = []

    def on_end(self, span):
        self.spans.append(span)


def _pipeline(n: int) -> knhk.TelemetryPipeline:
    return (knhk.TelemetryPipeline.builder().with_batch_size(1000)
            .with_channel_capacity(max(2 * n, 100_000)).with_exporter(Discard()).build())


def _emit(provider: TracerProvider, n: int) -> None:
    tracer = provider.get_tracer("bench", "1.0")
    for i in range(n // 2):
        with tracer.start_as_current_span("GET /users/{id}", attributes={
                "http.request.method": "GET", "http.route": "/users/{id}",
                "http.response.status_code": 200}) as span:
            span.add_event("cache.miss", {"key": i})
            with tracer.start_as_current_span("SELECT users", attributes={
                    "db.system.name": "postgresql", "db.operation.name": "SELECT",
                    "db.rows": i}):
                pass


def _bsp(exporter: SpanExporter, n: int) -> BatchSpanProcessor:
    return BatchSpanProcessor(exporter, max_queue_size=2 * n, max_export_batch_size=512,
                              schedule_delay_millis=100)


def run_knhk(n: int) -> tuple[int, float]:
    pipeline = _pipeline(n)
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(KnhkSpanProcessor(pipeline))
    t0 = time.perf_counter()
    _emit(provider, n)
    provider.force_flush()
    seconds = time.perf_counter() - t0
    done = pipeline.stats().events_processed
    provider.shutdown()
    pipeline.shutdown()
    assert done == n, f"knhk processed {done} of {n} spans"
    return n, seconds


def run_sdk(n: int, exporter: SpanExporter) -> tuple[int, float]:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(_bsp(exporter, n))
    t0 = time.perf_counter()
    _emit(provider, n)
    provider.force_flush()
    seconds = time.perf_counter() - t0
    provider.shutdown()
    return n, seconds


def _finished(n: int) -> list:
    collect = Collect()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(collect)
    _emit(provider, n)
    return collect.spans


def on_end_knhk(spans: list) -> tuple[int, float]:
    pipeline = _pipeline(len(spans))
    proc = KnhkSpanProcessor(pipeline)
    t0 = time.perf_counter()
    for s in spans:
        proc.on_end(s)
    proc.force_flush()
    seconds = time.perf_counter() - t0
    proc.shutdown()
    pipeline.shutdown()
    return len(spans), seconds


def on_end_sdk_otlp(spans: list) -> tuple[int, float]:
    exporter = OtlpEncode()
    proc = _bsp(exporter, len(spans))
    t0 = time.perf_counter()
    for s in spans:
        proc.on_end(s)
    proc.force_flush()
    seconds = time.perf_counter() - t0
    proc.shutdown()
    assert exporter.spans == len(spans)
    return len(spans), seconds


def per_span_path(spans: list) -> tuple[int, float]:
    """The alternative design: convert and record_span() each span in on_end."""
    pipeline = _pipeline(len(spans))
    one, record = _Converter().span, pipeline.record_span
    t0 = time.perf_counter()
    for s in spans:
        record(one(s)[0])
    pipeline.force_flush()
    seconds = time.perf_counter() - t0
    pipeline.shutdown()
    return len(spans), seconds


def column_path(spans: list) -> tuple[int, float]:
    """The fallback: buffers built as batches and recorded with record_batch."""
    pipeline = _pipeline(len(spans))
    conv = _Converter()
    t0 = time.perf_counter()
    for i in range(0, len(spans), 512):
        pipeline.record_batch(conv.convert(spans[i:i + 512]))
    pipeline.force_flush()
    seconds = time.perf_counter() - t0
    pipeline.shutdown()
    return len(spans), seconds


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 10_000 if quick else 40_000
    results = []
    k_rate, k_all = median_rate(lambda: run_knhk(n), runs)
    m_rate, m_all = median_rate(lambda: run_sdk(n, InMemorySpanExporter()), runs)
    o_rate, o_all = median_rate(lambda: run_sdk(n, OtlpEncode()), runs)
    results.append(Result(
        "instrumented app -> KnhkSpanProcessor -> pipeline (spans processed)", "spans/s",
        k_rate, o_rate, "SDK BatchSpanProcessor + OTLP encoding (OTLPSpanExporter minus network)",
        None, None, runs,
        f"{n:,} spans per run (server span with an event + client child), incl. force_flush",
        {"knhk_runs": k_all, "peer_runs": o_all}))
    results.append(Result(
        "instrumented app -> KnhkSpanProcessor vs the SDK keeping span objects", "spans/s",
        k_rate, m_rate, "SDK BatchSpanProcessor + InMemorySpanExporter", None, None, runs,
        "same knhk runs; the in-memory exporter converts nothing",
        {"peer_runs": m_all}))
    spans = _finished(n)
    ke_rate, ke_all = median_rate(lambda: on_end_knhk(spans), runs)
    oe_rate, oe_all = median_rate(lambda: on_end_sdk_otlp(spans), runs)
    results.append(Result(
        "on_end of finished spans: KnhkSpanProcessor into a pipeline", "spans/s",
        ke_rate, oe_rate, "SDK BatchSpanProcessor + OTLP encoding", None, None, runs,
        "processor cost alone (spans made beforehand), incl. force_flush",
        {"knhk_runs": ke_all, "peer_runs": oe_all}))
    ps_rate, ps_all = median_rate(lambda: per_span_path(spans), runs)
    results.append(Result(
        "inside the processor: buffered (one record_spans per batch) vs per-span", "spans/s",
        ke_rate, ps_rate, "the same conversion, record_span() in each on_end", None, None,
        runs, "the per-span path cannot carry dropped counts, schema URLs or scope "
        "attributes; the buffered one falls back to record_batch for those",
        {"peer_runs": ps_all}))
    cb_rate, cb_all = median_rate(lambda: column_path(spans), runs)
    results.append(Result(
        "inside the processor: the column path (from_spans + record_batch)", "spans/s",
        cb_rate, ps_rate, "the same conversion, record_span() in each on_end", None, None,
        runs, "what a batch with dropped counts or scope attributes costs: each span "
        "is encoded twice (a batch, then the pipeline's ring)", {"knhk_runs": cb_all}))
    return results
