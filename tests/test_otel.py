"""The OpenTelemetry SDK bridge, against the real opentelemetry-sdk.

The independent reference for the field mapping is the SDK's own OTLP
encoder: the same spans encoded by ``opentelemetry-exporter-otlp-proto-common``
and decoded by knhk's OTLP codec must give the rows the bridge records.
"""

from __future__ import annotations

import threading

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

import knhk
from knhk import otlp
from knhk._attributes import attributes_dict
from knhk.otel import KnhkSpanExporter, KnhkSpanProcessor, _Converter, spans_to_batch

REMOTE_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
REMOTE_SPAN = 0xB7AD6B7169203331


def _provider(*processors, limits=None, resource=None, sampler=ALWAYS_ON):
    provider = TracerProvider(
        resource=resource or Resource.create({"service.name": "checkout",
                                              "service.version": "1.2.3",
                                              "host.cores": 8}),
        span_limits=limits or SpanLimits(), sampler=sampler)
    for p in processors:
        provider.add_span_processor(p)
    return provider


def _rich_spans(provider):
    """Spans using every field the SDK has: kinds, remote parent, all attribute
    types, events, links with trace state, error status, dropped counts."""
    tracer = provider.get_tracer("shop.instrumentation", "4.5.6",
                                 schema_url="https://opentelemetry.io/schemas/1.26.0",
                                 attributes={"scope.flavour": "vanilla"})
    remote = SpanContext(REMOTE_TRACE, REMOTE_SPAN, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "abc"), ("other", "1")]))
    ctx = trace_api.set_span_in_context(trace_api.NonRecordingSpan(remote))
    link_ctx = SpanContext(0x1234, 0x5678, is_remote=True,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED),
                           trace_state=TraceState([("lk", "v")]))
    token = otel_context.attach(ctx)
    try:
        with tracer.start_as_current_span(
                "POST /checkout", kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.response.status_code": 500,
                            "retry": True, "ratio": 0.25, "tags": ["a", "b"],
                            "codes": [1, 2, 3], "weights": [0.5, 1.5], "flags": [True, False],
                            "extra.1": "x", "extra.2": "y", "extra.3": "z"},
                links=[Link(link_ctx, {"link.reason": "retry-of", "link.n": 2})],
                record_exception=False, set_status_on_exception=False) as server:
            server.add_event("payment.started", {"amount": 12.5, "currency": "EUR"},
                             timestamp=1_700_000_000_000_000_123)
            server.add_event("payment.failed", {"code": 402, "a": 1, "b": 2, "c": 3})
            server.add_event("third")
            server.add_event("fourth")
            with tracer.start_as_current_span("SELECT orders", kind=SpanKind.CLIENT) as db:
                db.set_attribute("db.system.name", "postgresql")
            for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.INTERNAL):
                with tracer.start_as_current_span(f"k{kind.value}", kind=kind) as s:
                    s.set_status(Status(StatusCode.OK))
            server.set_status(Status(StatusCode.ERROR, "card declined"))
    finally:
        otel_context.detach(token)


def _norm(row: dict) -> dict:
    """A row with attribute lists as dicts (the two encoders may differ in AnyValue bytes)."""
    out = dict(row)
    for key in ("attributes", "resource_attributes", "scope_attributes"):
        out[key] = attributes_dict(row[key])
    out["events"] = [dict(e, attributes=attributes_dict(e["attributes"]))
                     for e in row["events"]]
    out["links"] = [dict(lk, attributes=attributes_dict(lk["attributes"]))
                    for lk in row["links"]]
    return out


@pytest.fixture
def rich():
    memory = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=10, max_events=3, max_links=1,
                        max_event_attributes=3, max_link_attributes=1)
    provider = _provider(SimpleSpanProcessor(memory), limits=limits,
                         resource=Resource.create({"service.name": "checkout",
                                                   "service.version": "1.2.3",
                                                   "host.cores": 8},
                                                  schema_url="https://example.com/s/1"))
    _rich_spans(provider)
    provider.shutdown()
    return memory.get_finished_spans()


def test_every_field_matches_the_sdks_own_otlp_encoding(rich):
    batch = spans_to_batch(rich)
    assert batch.schema.equals(knhk.SPAN_SCHEMA)
    reference = otlp.decode_traces(encode_spans(rich).SerializeToString())
    ours = sorted((_norm(r) for r in batch.to_pylist()), key=lambda r: r["span_id"])
    theirs = sorted((_norm(r) for r in reference.to_pylist()), key=lambda r: r["span_id"])
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs, strict=True):
        # The SDK's encoder leaves the W3C trace flags out of Span.flags; OTLP puts
        # them in the low byte, as knhk does. The remote bits must agree.
        assert a["flags"] & 0x01  # sampled
        assert a["flags"] & ~0xFF == b["flags"]
        for lk_a, lk_b in zip(a["links"], b["links"], strict=True):
            assert lk_a["flags"] & ~0xFF == lk_b["flags"]
            lk_a["flags"] = lk_b["flags"]
            # ... and leaves out a link's trace state, which knhk keeps.
            assert lk_b["trace_state"] is None and lk_a["trace_state"] == "lk=v"
            lk_a["trace_state"] = None
        a["flags"] = b["flags"]
        assert a == b


def test_fields_hold_the_values_given(rich):
    rows = {r["name"]: r for r in spans_to_batch(rich).to_pylist()}
    server = rows["POST /checkout"]
    assert server["trace_id"] == REMOTE_TRACE.to_bytes(16, "big")
    assert server["parent_span_id"] == REMOTE_SPAN.to_bytes(8, "big")
    assert server["kind"] == knhk.SpanKind.SERVER
    assert server["status_code"] == knhk.SpanStatus.ERROR
    assert server["status_message"] == "card declined"
    assert server["trace_state"] == "vendor=abc,other=1"
    assert server["flags"] == 0x301  # sampled, has-is-remote, parent is remote
    assert server["service"] == "checkout"
    attrs = attributes_dict(server["attributes"])
    assert attrs["http.response.status_code"] == 500 and attrs["retry"] is True
    assert attrs["ratio"] == 0.25 and attrs["tags"] == ["a", "b"]
    assert attrs["codes"] == [1, 2, 3] and attrs["weights"] == [0.5, 1.5]
    assert attrs["flags"] == [True, False]
    types = {a["key"]: a["type"] for a in server["attributes"]}
    assert "http.request.method" not in attrs  # the oldest, dropped by the limit
    assert types["extra.3"] == knhk.AttrType.STRING
    assert types["retry"] == knhk.AttrType.BOOL and types["ratio"] == knhk.AttrType.DOUBLE
    assert types["codes"] == knhk.AttrType.ARRAY
    assert len(attrs) == 10 and server["dropped_attributes_count"] == 1
    assert [e["name"] for e in server["events"]] == ["payment.failed", "third", "fourth"]
    assert server["dropped_events_count"] == 1
    assert server["events"][0]["dropped_attributes_count"] == 1
    assert len(server["links"]) == 1 and server["dropped_links_count"] == 0
    link = server["links"][0]
    assert link["trace_id"] == (0x1234).to_bytes(16, "big")
    assert link["span_id"] == (0x5678).to_bytes(8, "big")
    assert link["trace_state"] == "lk=v" and link["dropped_attributes_count"] == 1
    assert attributes_dict(server["resource_attributes"])["host.cores"] == 8
    assert server["resource_schema_url"] == "https://example.com/s/1"
    assert server["scope_name"] == "shop.instrumentation" and server["scope_version"] == "4.5.6"
    assert server["scope_schema_url"] == "https://opentelemetry.io/schemas/1.26.0"
    assert attributes_dict(server["scope_attributes"]) == {"scope.flavour": "vanilla"}
    db = rows["SELECT orders"]
    assert db["kind"] == knhk.SpanKind.CLIENT and db["parent_span_id"] == server["span_id"]
    assert db["flags"] == 0x101  # its parent is local
    assert rows["k3"]["kind"] == knhk.SpanKind.PRODUCER
    assert rows["k4"]["kind"] == knhk.SpanKind.CONSUMER
    assert rows["k0"]["kind"] == knhk.SpanKind.INTERNAL
    assert rows["k0"]["status_code"] == knhk.SpanStatus.OK
    sdk = {s.name: s for s in rich}
    assert server["start_time_ns"] == sdk["POST /checkout"].start_time
    assert server["end_time_ns"] == sdk["POST /checkout"].end_time


def test_processor_feeds_the_pipeline_through_the_tracer_provider(pipeline_factory, rich):
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(sink))
    proc = KnhkSpanProcessor(pipeline, schedule_delay=0)
    provider = _provider(proc, limits=SpanLimits(max_span_attributes=10, max_events=3,
                                                 max_links=1, max_event_attributes=3,
                                                 max_link_attributes=1),
                         resource=Resource.create({"service.name": "checkout",
                                                   "service.version": "1.2.3",
                                                   "host.cores": 8},
                                                  schema_url="https://example.com/s/1"))
    _rich_spans(provider)
    assert proc.force_flush()
    got = sorted((_norm(r) for r in sink.spans().to_pylist()), key=lambda r: r["name"])
    want = sorted((_norm(r) for r in spans_to_batch(rich).to_pylist()),
                  key=lambda r: r["name"])
    for a, b in zip(got, want, strict=True):
        for key in ("trace_id", "span_id", "start_time_ns", "end_time_ns"):
            a.pop(key), b.pop(key)
        for x in (a, b):
            x["parent_span_id"] = x["parent_span_id"] is not None
            for lk in x["links"]:
                lk.pop("span_id"), lk.pop("trace_id")
            for e in x["events"]:
                e.pop("time_unix_nano")
        assert a == b
    provider.shutdown()


def test_unsampled_spans_are_left_out_unless_asked():
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
        default, everything = (KnhkSpanProcessor(pipeline, schedule_delay=0),
                               KnhkSpanProcessor(pipeline, schedule_delay=0,
                                                 export_unsampled=True))
        from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

        class RecordOnly(Sampler):
            def should_sample(self, *args, **kwargs):
                return SamplingResult(Decision.RECORD_ONLY)

            def get_description(self):
                return "record-only"

        for proc, sampler in ((default, RecordOnly()), (everything, RecordOnly()),
                              (default, ALWAYS_OFF)):
            provider = _provider(proc, sampler=sampler)
            provider.get_tracer("t").start_span("s").end()
            proc.force_flush()
        assert default.spans_received == 0
        assert everything.spans_received == everything.spans_recorded == 1
        pipeline.force_flush()
        assert sink.spans().num_rows == 1
        [flags] = sink.spans().column("flags").to_pylist()
        assert flags & 0x01 == 0 and flags & 0x100  # not sampled; has-is-remote


def test_spans_from_many_threads_all_arrive_once():
    sink = knhk.InMemoryExporter()
    pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
    proc = KnhkSpanProcessor(pipeline, max_batch_size=64, schedule_delay=0.01)
    provider = _provider(proc)
    tracer = provider.get_tracer("threads")
    n_threads, per_thread = 8, 300
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            with tracer.start_as_current_span(f"t{t}", attributes={"i": i}), \
                    tracer.start_as_current_span("child"):
                pass

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert proc.force_flush()
    spans = sink.spans()
    assert spans.num_rows == 2 * n_threads * per_thread
    assert len(set(spans.column("span_id").to_pylist())) == spans.num_rows
    names = spans.column("name").to_pylist()
    for t in range(n_threads):
        assert names.count(f"t{t}") == per_thread
        values = sorted(v for v, n in zip(spans.attribute_values("i"), names, strict=True)
                        if n == f"t{t}")
        assert values == list(range(per_thread))
    assert proc.spans_received == proc.spans_recorded == spans.num_rows
    provider.shutdown()
    pipeline.shutdown()


def test_force_flush_records_a_partial_buffer_and_the_timer_does_too():
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
        manual = KnhkSpanProcessor(pipeline, max_batch_size=1000, schedule_delay=0)
        provider = _provider(manual)
        for _ in range(5):
            provider.get_tracer("t").start_span("buffered").end()
        pipeline.force_flush()
        assert sink.spans().num_rows == 0  # still in the processor's buffer
        assert manual.force_flush(timeout_millis=5000)
        assert sink.spans().num_rows == 5

        timed = KnhkSpanProcessor(pipeline, max_batch_size=1000, schedule_delay=0.02)
        provider2 = _provider(timed)
        provider2.get_tracer("t").start_span("timed").end()
        import time

        deadline = time.monotonic() + 5
        while timed.spans_recorded == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert timed.spans_recorded == 1
        provider.shutdown()
        provider2.shutdown()


def test_shutdown_flushes_then_drops_later_spans():
    sink = knhk.InMemoryExporter()
    pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
    proc = KnhkSpanProcessor(pipeline, max_batch_size=1000, schedule_delay=10,
                             shutdown_pipeline=True)
    provider = _provider(proc)
    tracer = provider.get_tracer("t")
    for _ in range(3):
        tracer.start_span("before").end()
    provider.shutdown()  # calls proc.shutdown(): records the buffer, shuts the pipeline
    assert pipeline.closed
    assert sink.spans().num_rows == 3
    proc.on_end(_one_span())
    assert proc.spans_dropped == 1 and proc.spans_recorded == 3
    proc.shutdown()  # twice is harmless


def _one_span():
    memory = InMemorySpanExporter()
    provider = _provider(SimpleSpanProcessor(memory))
    provider.get_tracer("t").start_span("late").end()
    return memory.get_finished_spans()[0]


def test_exporter_twin_behind_the_sdks_batch_processor():
    sink = knhk.InMemoryExporter()
    pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
    exporter = KnhkSpanExporter(pipeline)
    provider = _provider(BatchSpanProcessor(exporter, max_export_batch_size=50))
    tracer = provider.get_tracer("t")
    for i in range(120):
        tracer.start_span("op", attributes={"i": i}).end()
    # The SDK's BatchSpanProcessor.force_flush exports but does not flush its exporter.
    assert provider.force_flush() and exporter.force_flush()
    assert sorted(sink.spans().attribute_values("i")) == list(range(120))
    provider.shutdown()
    assert not pipeline.closed  # not the exporter's to close unless asked
    assert exporter.export([_one_span()]) is SpanExportResult.FAILURE
    pipeline.shutdown()


def test_exporter_reports_failure_when_the_pipeline_refuses():
    pipeline = knhk.TelemetryPipeline.builder().build()
    exporter = KnhkSpanExporter(pipeline)
    assert exporter.export([_one_span()]) is SpanExportResult.SUCCESS
    assert exporter.export([]) is SpanExportResult.SUCCESS
    pipeline.shutdown()
    assert exporter.export([_one_span()]) is SpanExportResult.FAILURE


def test_a_resource_without_service_name_gets_the_default():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"k": "v"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("t").start_span("s").end()
    batch = spans_to_batch(memory.get_finished_spans(), default_service="fallback")
    assert batch.column("service").to_pylist() == ["fallback"]
    assert spans_to_batch([]).num_rows == 0


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="TelemetryPipeline"):
        KnhkSpanProcessor(object())
    with pytest.raises(TypeError, match="TelemetryPipeline"):
        KnhkSpanExporter("localhost:4317")
    pipeline = knhk.TelemetryPipeline.builder().build()
    try:
        with pytest.raises(ValueError, match="max_batch_size"):
            KnhkSpanProcessor(pipeline, max_batch_size=0)
        with pytest.raises(ValueError, match="schedule_delay"):
            KnhkSpanProcessor(pipeline, schedule_delay=-1)
    finally:
        pipeline.shutdown()
    with pytest.raises(TypeError, match=r"spans\[1\]"):
        spans_to_batch([_one_span(), "not a span"])
    with pytest.raises(TypeError, match="iterable"):
        spans_to_batch(_one_span())


def test_the_direct_ring_path_and_the_column_path_record_the_same_rows():
    """Spans with nothing a knhk.Span lacks go straight into the ring (record_spans);
    the rest as patched batches (record_batch). Both must give the same rows."""
    memory = InMemorySpanExporter()
    provider = _provider(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")  # no schema URL, no scope attributes
    for i in range(50):
        with tracer.start_as_current_span("op", attributes={"i": i, "tags": ["x", str(i)]},
                                          kind=SpanKind.CLIENT) as s:
            s.add_event("e", {"n": i})
    spans = memory.get_finished_spans()
    converter = _Converter()
    _, extras = converter.spans(spans)
    assert extras == []  # so record() takes the direct path
    sinks = [knhk.InMemoryExporter(), knhk.InMemoryExporter()]
    for sink, direct in zip(sinks, (True, False), strict=True):
        with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
            taken = (converter.record(pipeline, spans) if direct
                     else pipeline.record_batch(converter.convert(spans)))
            assert taken == 50
    a, b = (sorted(map(_norm, s.spans().to_pylist()), key=lambda r: r["span_id"])
            for s in sinks)
    assert a == b and len(a) == 50
