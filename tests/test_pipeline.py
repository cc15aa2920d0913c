"""TelemetryPipeline: builder checks, stages, exporters on their own queues, stats.

Timing assertions use generous margins (the CI machine is small and shared);
each test that waits does so for well under a second.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

import knhk
from knhk import (
    BackpressureStrategy,
    Exporter,
    ExportResult,
    InMemoryExporter,
    PipelineClosedError,
    SpanBatch,
    StageResult,
    TelemetryPipeline,
)


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def _gated(gate: threading.Event):
    """A stage that holds each batch until ``gate`` is set (at most 5 s)."""
    def stage(batch):
        gate.wait(5)
    return stage


def _span_ids(sink: InMemoryExporter) -> list[int]:
    return [int.from_bytes(b, "big") for b in sink.spans().column("span_id").to_pylist()]


class Recorder(Exporter):
    """Records batches; can sleep, fail, raise or hang on export."""

    def __init__(self, name: str, *, sleep: float = 0.0, result: ExportResult | None = None,
                 raises: bool = False, hang: threading.Event | None = None,
                 queue_size: int = 64) -> None:
        self.name = name
        self.sleep, self.result, self.raises, self.hang = sleep, result, raises, hang
        self.queue_size = queue_size
        self.rows = 0
        self.calls = 0
        self.shut = False

    def export(self, batch):
        self.calls += 1
        if self.hang is not None:
            self.hang.wait()
        if self.sleep:
            time.sleep(self.sleep)
        if self.raises:
            raise RuntimeError(f"{self.name} exporter failed on purpose")
        self.rows += batch.num_rows
        return self.result or ExportResult.SUCCESS

    def shutdown(self, timeout=None):
        self.shut = True


# -- builder ----------------------------------------------------------------------------


def _sentence(msg: str) -> bool:
    return msg[:1].isupper() and msg.rstrip().endswith(".") and len(msg.split()) >= 5


@pytest.mark.parametrize(("configure", "words"), [
    (lambda b: b.with_batch_size(0), "batch size"),
    (lambda b: b.with_batch_size(-5), "batch size"),
    (lambda b: b.with_batch_size(2.5), "batch size"),
    (lambda b: b.with_batch_size("100"), "batch size"),
    (lambda b: b.with_batch_size(True), "batch size"),
    (lambda b: b.with_flush_interval(0), "flush interval"),
    (lambda b: b.with_flush_interval(-1.0), "flush interval"),
    (lambda b: b.with_flush_interval(timedelta(0)), "flush interval"),
    (lambda b: b.with_flush_interval(timedelta(seconds=-1)), "flush interval"),
    (lambda b: b.with_flush_interval("1s"), "flush interval"),
    (lambda b: b.with_channel_capacity(0), "channel capacity"),
    (lambda b: b.with_channel_capacity(1.5), "channel capacity"),
    (lambda b: b.with_compression("brotli"), "compression"),
    (lambda b: b.with_compression("LZ4 "), "compression"),
    (lambda b: b.with_backpressure_strategy(9), "backpressure strategy"),
    (lambda b: b.with_backpressure_strategy("DROP_OLDEST"), "backpressure strategy"),
    (lambda b: b.with_backpressure_strategy(BackpressureStrategy.BLOCK, block_timeout=-1),
     "block timeout"),
    (lambda b: b.with_backpressure_strategy(BackpressureStrategy.BLOCK, block_timeout="1"),
     "block timeout"),
    (lambda b: b.with_weaver_registry("/definitely/not/a/registry"), "registry"),
    (lambda b: b.with_adaptive_sampling({"base_rate": 0.1}), "sampling"),
    (lambda b: b.with_exporter(object()), "exporter"),
    (lambda b: b.with_exporter(lambda batch: None), "exporter"),
    (lambda b: b.with_stage(42), "stage"),
    (lambda b: b.with_service_name(""), "service name"),
    (lambda b: b.with_batch_size(100).with_channel_capacity(10).build(), "capacity"),
])
def test_bad_builder_options_raise_a_full_sentence(configure, words):
    with pytest.raises(ValueError) as info:
        configure(TelemetryPipeline.builder())
    msg = str(info.value)
    assert words.lower() in msg.lower(), msg
    assert _sentence(msg), f"not a full sentence: {msg!r}"


@pytest.mark.parametrize("configure", [
    pytest.param(lambda b: b.with_flush_interval(math.inf), id="infinite flush interval"),
    pytest.param(lambda b: b.with_flush_interval(math.nan), id="NaN flush interval"),
    pytest.param(lambda b: b.with_flush_interval(timedelta.max), id="timedelta.max"),
    pytest.param(lambda b: b.with_backpressure_strategy(BackpressureStrategy.BLOCK,
                                                        block_timeout=math.nan),
                 id="NaN block timeout"),
])
def test_non_finite_durations_are_rejected(configure):
    with pytest.raises(ValueError, match=r"interval|timeout"):
        configure(TelemetryPipeline.builder())


def test_builder_returns_itself_and_accepts_good_options():
    b = TelemetryPipeline.builder()
    same = (b.with_batch_size(10).with_flush_interval(0.5)
            .with_flush_interval(timedelta(milliseconds=20)).with_channel_capacity(100)
            .with_compression("lz4").with_compression(None)
            .with_backpressure_strategy(BackpressureStrategy.DROP_NEWEST, block_timeout=0.1)
            .with_adaptive_sampling().with_service_name("svc"))
    assert same is b
    with b.build() as p:
        assert isinstance(p, TelemetryPipeline)
    assert p.closed


@pytest.mark.parametrize("interval", [0.1, timedelta(milliseconds=100)],
                         ids=["float", "timedelta"])
def test_flush_interval_delivers_a_lone_span(pipeline_factory, make_span, interval):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(1000).with_flush_interval(interval)
                         .with_exporter(sink))
    t0 = time.monotonic()
    assert p.record_span(make_span(1))
    assert _wait_for(lambda: sink.batches, timeout=2.0)
    elapsed = time.monotonic() - t0
    assert 0.08 <= elapsed <= 3 * 0.1 + 0.15, elapsed
    assert sink.spans().num_rows == 1


# -- stages -----------------------------------------------------------------------------


def test_stages_run_in_order_and_a_mask_filters_later_stages(pipeline_factory, make_span):
    seen: list[tuple[str, int]] = []

    def first(batch):
        seen.append(("first", batch.num_rows))
        ids = np.array([int.from_bytes(b, "big") for b in
                        batch.column("span_id").to_pylist()])
        return StageResult(batch, mask=ids % 2 == 0, counters={"validation_errors": 1,
                                                               "custom": 2})

    class Second:
        def process(self, batch):
            seen.append(("second", batch.num_rows))
            return None

    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(10).with_stage(first)
                         .with_stage(Second()).with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 31)])
    assert p.force_flush(5)
    assert [name for name, _ in seen] == ["first", "second"] * 3
    assert [n for name, n in seen if name == "first"] == [10, 10, 10]
    assert [n for name, n in seen if name == "second"] == [5, 5, 5]
    assert sorted(_span_ids(sink)) == list(range(2, 31, 2))
    s = p.stats()
    assert s.events_processed == 30
    assert s.events_sampled_out == 15
    assert s.validation_errors == 3
    assert s.counters.get("custom") == 6


def test_a_raising_stage_is_counted_and_the_batch_goes_on(pipeline_factory, make_span):
    def broken(batch):
        raise RuntimeError("stage failed on purpose")

    later = []
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(5).with_stage(broken)
                         .with_stage(lambda batch: later.append(batch.num_rows))
                         .with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 11)])
    assert p.force_flush(5)
    assert later == [5, 5]
    assert sorted(_span_ids(sink)) == list(range(1, 11))
    assert p.stats().stage_errors == 2


def test_a_stage_may_replace_the_batch(pipeline_factory, make_span):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(4)
                         .with_stage(lambda batch: batch.slice(0, 1))
                         .with_stage(lambda batch: batch.record_batch)   # a plain RecordBatch
                         .with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 9)])
    assert p.force_flush(5)
    assert sorted(_span_ids(sink)) == [1, 5]
    assert all(isinstance(b, SpanBatch) for b in sink.batches)


@pytest.mark.parametrize("stage", [
    pytest.param(lambda batch: {"not": "a batch"}, id="returns a dict"),
    pytest.param(lambda batch: StageResult(batch, mask=np.ones(batch.num_rows + 1, bool)),
                 id="mask of the wrong length"),
])
def test_an_unusable_stage_result_is_counted_not_lost(pipeline_factory, make_span, stage):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(4).with_stage(stage).with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 5)])
    assert p.force_flush(5)
    s = p.stats()
    assert s.stage_errors == 1
    assert s.events_received == s.events_processed + s.events_dropped + s.queued_events


# -- exporters --------------------------------------------------------------------------


def test_slow_exporter_does_not_delay_a_fast_one(pipeline_factory, make_span):
    slow = Recorder("slow", sleep=0.25)
    fast = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(10).with_exporter(slow)
                         .with_exporter(fast))
    t0 = time.monotonic()
    p.record_spans([make_span(i) for i in range(1, 51)])   # five full batches
    assert _wait_for(lambda: fast.spans().num_rows == 50, timeout=1.0)
    assert time.monotonic() - t0 < 0.6     # the slow one needs >= 1.25 s for 5 batches
    assert slow.calls < 5


def test_failing_and_raising_exporters_are_counted_others_continue(pipeline_factory,
                                                                    make_span):
    failing = Recorder("failing", result=ExportResult.FAILURE)
    raising = Recorder("raising", raises=True)
    good = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(5).with_exporter(failing)
                         .with_exporter(raising).with_exporter(good))
    p.record_spans([make_span(i) for i in range(1, 21)])
    assert p.force_flush(5)
    assert sorted(_span_ids(good)) == list(range(1, 21))
    s = p.stats()
    assert s.export_errors == 8
    assert s.exporters["failing"]["export_errors"] == 4
    assert s.exporters["raising"]["export_errors"] == 4
    assert "exporter failed on purpose" in s.exporters["raising"]["last_error"]
    assert s.exporters["memory"]["events_exported"] == 20
    assert s.exporters["failing"]["events_failed"] == 20


def test_hung_exporter_does_not_stop_shutdown(pipeline_factory, make_span):
    release = threading.Event()
    hung = Recorder("hung", hang=release)
    good = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(5).with_exporter(hung)
                         .with_exporter(good))
    try:
        p.record_spans([make_span(i) for i in range(1, 21)])
        assert not p.force_flush(0.2), "force_flush cannot succeed while an exporter hangs"
        t0 = time.monotonic()
        ok = p.shutdown(timeout=0.5)
        took = time.monotonic() - t0
        assert took < 1.5, took
        assert ok is False
        assert sorted(_span_ids(good)) == list(range(1, 21))
        assert good.batches and p.closed
    finally:
        release.set()


def test_exporter_queue_overflow_is_counted(pipeline_factory, make_span):
    release = threading.Event()
    stuck = Recorder("stuck", hang=release, queue_size=2)
    p = pipeline_factory(lambda b: b.with_batch_size(1).with_exporter(stuck))
    try:
        p.record_span(make_span(1))
        assert _wait_for(lambda: stuck.calls == 1)      # now hung inside export()
        p.record_spans([make_span(i) for i in range(2, 11)])
        assert _wait_for(lambda: p.stats().events_processed == 10)
        # One batch in export(), two queued, the other seven dropped and counted.
        s = p.stats()
        assert s.dropped_by_reason.get("export_queue_full:stuck") == 7
        assert s.exporters["stuck"]["events_dropped_queue_full"] == 7
    finally:
        release.set()
    assert p.force_flush(5)
    assert stuck.rows == 3


def test_shutdown_flushes_and_shuts_exporters_down(make_span):
    rec = Recorder("rec")
    p = (TelemetryPipeline.builder().with_batch_size(100).with_flush_interval(0.05)
         .with_exporter(rec).build())
    p.record_spans([make_span(i) for i in range(1, 8)])
    assert p.shutdown(timeout=5) is True
    assert rec.rows == 7 and rec.shut
    assert p.shutdown(timeout=5) is True      # idempotent


def test_shutdown_does_not_wait_out_a_long_flush_interval(make_span):
    rec = Recorder("rec")
    p = (TelemetryPipeline.builder().with_batch_size(100).with_flush_interval(30)
         .with_exporter(rec).build())
    p.record_spans([make_span(i) for i in range(1, 8)])
    t0 = time.monotonic()
    ok = p.shutdown(timeout=1.0)
    assert time.monotonic() - t0 < 0.5
    assert ok is True and rec.rows == 7


def test_force_flush_returns_true_when_drained(pipeline_factory, make_span):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(1000).with_flush_interval(0.3)
                         .with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 4)])
    t0 = time.monotonic()
    assert p.force_flush(timedelta(seconds=5)) is True
    assert time.monotonic() - t0 < 0.25, "force_flush seals; it does not wait for the interval"
    assert sink.spans().num_rows == 3
    assert p.stats().queued_events == 0


# -- input after shutdown, event stream, context manager ----------------------------------


def test_input_after_shutdown_is_counted_as_shutdown(pipeline_factory, make_span):
    p = pipeline_factory()
    p.shutdown(2)
    assert p.record_span(make_span(1)) is False
    assert p.record_spans([make_span(2), make_span(3)]) == 0
    cols = SpanBatch.from_spans([make_span(4)]).record_batch
    assert p.record_batch(cols) == 0
    s = p.stats()
    assert s.dropped_by_reason.get("shutdown") == 4
    assert s.events_dropped == 4 and s.events_received == 4
    with pytest.raises(PipelineClosedError):
        p.event_stream()


def test_event_stream_yields_batches_and_ends_at_shutdown(pipeline_factory, make_span):
    p = pipeline_factory(lambda b: b.with_batch_size(3))
    stream = p.event_stream()
    got: list[int] = []
    done = threading.Event()

    def consume():
        for batch in stream:
            got.extend(int.from_bytes(x, "big") for x in
                       batch.column("span_id").to_pylist())
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    p.record_spans([make_span(i) for i in range(1, 8)])
    assert _wait_for(lambda: len(got) == 7, timeout=3)
    assert not done.is_set(), "the stream must stay open until shutdown"
    p.shutdown(2)
    t.join(2)
    assert done.is_set() and sorted(got) == list(range(1, 8))


def test_event_stream_consumer_that_falls_behind_is_counted(pipeline_factory, make_span):
    p = pipeline_factory(lambda b: b.with_batch_size(1))
    stream = p.event_stream(max_batches=2)
    p.record_spans([make_span(i) for i in range(1, 6)])
    assert p.force_flush(5)
    assert p.stats().dropped_by_reason.get("event_stream_full") == 3
    p.shutdown(2)
    assert sum(b.num_rows for b in stream) == 2


def test_an_unused_event_stream_does_not_hold_batches(pipeline_factory, make_span):
    p = pipeline_factory(lambda b: b.with_batch_size(10))
    p.event_stream(max_batches=4)      # asked for and thrown away
    gc.collect()
    p.record_spans([make_span(i) for i in range(1, 101)])
    assert p.force_flush(5)
    assert "event_stream_full" not in p.stats().dropped_by_reason


def test_context_manager_shuts_down(make_span):
    sink = InMemoryExporter()
    with TelemetryPipeline.builder().with_flush_interval(0.05).with_exporter(sink).build() as p:
        p.record_span(make_span(1))
    assert p.closed
    assert sink.spans().num_rows == 1


def test_record_span_rejects_non_spans_and_keeps_earlier_ones(pipeline_factory, make_span):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink))
    with pytest.raises(TypeError, match=r"knhk\.Span"):
        p.record_span({"name": "op"})
    with pytest.raises(TypeError, match=r"knhk\.Span"):
        p.record_spans([make_span(1), "not a span", make_span(2)])
    assert p.force_flush(5)
    assert _span_ids(sink) == [1]


# -- stats ------------------------------------------------------------------------------


def test_stats_fields_add_up(pipeline_factory, make_span):
    sink = InMemoryExporter()
    # Fill faster than the worker can drain a stage that sleeps, so some are evicted.
    p = pipeline_factory(lambda b: b.with_batch_size(7).with_channel_capacity(14)
                         .with_backpressure_strategy(BackpressureStrategy.DROP_OLDEST)
                         .with_stage(lambda batch: time.sleep(0.02)).with_exporter(sink))
    p.record_spans([make_span(i) for i in range(1, 201)])
    assert p.force_flush(10)
    s = p.stats()
    fields = set(knhk.PipelineStats.__dataclass_fields__)
    assert {"events_received", "events_processed", "events_dropped", "dropped_by_reason",
            "batches_created", "validation_errors", "export_errors", "avg_batch_size",
            "avg_processing_latency_us", "p99_processing_latency_us",
            "queue_occupancy"} <= fields
    assert s.events_received == 200
    assert s.events_received == s.events_processed + s.events_dropped + s.queued_events
    assert s.events_dropped == s.dropped_by_reason.get("dropped_oldest", 0) > 0
    assert s.avg_batch_size == pytest.approx(s.events_processed / s.batches_processed)
    assert s.batches_created >= s.batches_processed
    assert 0.0 <= s.queue_occupancy <= 1.0
    assert s.p99_processing_latency_us >= 0 and s.avg_processing_latency_us >= 0
    # 20 ms of stage time per batch shows up in the processing latency.
    assert s.avg_processing_latency_us >= 15_000
    assert sink.spans().num_rows == s.events_processed
    assert s.as_dict()["events_received"] == 200


def test_drop_newest_counts_queue_full(pipeline_factory, make_span):
    gate = threading.Event()
    p = pipeline_factory(lambda b: b.with_batch_size(5).with_channel_capacity(10)
                         .with_backpressure_strategy(BackpressureStrategy.DROP_NEWEST)
                         .with_stage(_gated(gate)))
    try:
        accepted = sum(p.record_span(make_span(i)) for i in range(1, 41))
    finally:
        gate.set()
    assert p.force_flush(5)
    s = p.stats()
    assert accepted == s.events_processed
    assert s.dropped_by_reason.get("queue_full") == 40 - accepted > 0


def test_block_strategy_times_out_and_counts(pipeline_factory, make_span):
    gate = threading.Event()
    p = pipeline_factory(lambda b: b.with_batch_size(5).with_channel_capacity(5)
                         .with_backpressure_strategy(BackpressureStrategy.BLOCK,
                                                     block_timeout=0.05)
                         .with_stage(_gated(gate)))
    try:
        results = [p.record_span(make_span(i)) for i in range(1, 21)]
    finally:
        gate.set()
    assert p.force_flush(5)
    s = p.stats()
    assert s.dropped_by_reason.get("block_timeout") == results.count(False) > 0
    assert s.events_received == 20 == s.events_processed + s.events_dropped


# -- many producers ---------------------------------------------------------------------


def test_many_producer_threads_into_one_pipeline(pipeline_factory):
    threads, per_thread = 8, 20_000
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(1000).with_channel_capacity(20_000)
                         .with_backpressure_strategy(BackpressureStrategy.BLOCK,
                                                     block_timeout=30)
                         .with_exporter(sink))

    def produce(t: int) -> None:
        base = t * 1_000_000
        record = p.record_span
        for i in range(base + 1, base + per_thread + 1):
            record(knhk.Span("op", trace_id=i, span_id=i, start_time_ns=i))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert p.force_flush(30)
    col = sink.spans().column("span_id")
    ids = np.frombuffer(col.buffers()[1], ">u8", len(col), col.offset * 8)
    expected = np.array([t * 1_000_000 + i for t in range(threads)
                         for i in range(1, per_thread + 1)])
    assert ids.size == threads * per_thread
    assert np.array_equal(np.sort(ids.astype(np.int64)), np.sort(expected))
    s = p.stats()
    assert s.events_received == s.events_processed == threads * per_thread
    assert s.events_dropped == 0


def test_record_batch_and_record_span_from_threads(pipeline_factory):
    sink = InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(500).with_channel_capacity(50_000)
                         .with_exporter(sink))

    def batches(t: int) -> None:
        for k in range(10):
            ids = np.arange(1, 501) + t * 1_000_000 + k * 1000
            p.record_batch({
                "trace_id": pa.array([int(i).to_bytes(16, "big") for i in ids],
                                     pa.binary(16)),
                "span_id": pa.array([int(i).to_bytes(8, "big") for i in ids], pa.binary(8)),
                "name": np.array(["b"] * ids.size),
                "start_time_ns": ids.astype(np.int64),
                "duration_ns": np.ones(ids.size, np.int64),
            })

    def spans(t: int) -> None:
        for i in range(1, 5001):
            p.record_span(knhk.Span("s", trace_id=1, span_id=t * 1_000_000 + 500_000 + i))

    ws = [threading.Thread(target=f, args=(t,)) for t in range(3) for f in (batches, spans)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    assert p.force_flush(30)
    ids = _span_ids(sink)
    assert len(ids) == len(set(ids)) == 3 * (5000 + 5000)
    assert p.stats().events_dropped == 0


def test_try_record_batch_takes_all_or_nothing(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(2).with_exporter(sink))
    spans = [knhk.Span("a", trace_id=i, span_id=i) for i in range(1, 4)]
    bad = knhk.SpanBatch.from_spans(spans).record_batch.to_pylist()
    bad[1]["end_time_ns"] = bad[1]["start_time_ns"] - 1  # invalid: dropped and counted
    assert p.try_record_batch(pa.RecordBatch.from_pylist(bad, schema=knhk.SPAN_SCHEMA)) == 2
    assert p.force_flush(5)
    p.shutdown()
    assert p.try_record_batch(knhk.SpanBatch.from_spans(spans)) is None
    stats = p.stats()
    assert sink.spans().num_rows == 2
    assert stats.dropped_by_reason == {"invalid": 1}
    assert stats.events_refused == 3 and stats.events_received == 3


def test_ring_offer_all_takes_every_chunk_or_none():
    from knhk._build import load_core

    ring = load_core("_ringbuffer").SpanRing(2, 4, int(knhk.BackpressureStrategy.DROP_NEWEST))
    rb = knhk.SpanBatch.from_spans(
        [knhk.Span("a", trace_id=i, span_id=i) for i in range(1, 4)]).record_batch
    assert ring.offer_all([rb.slice(0, 2), rb.slice(2)]) is True
    assert ring.offer_all([rb.slice(0, 2)]) is False  # 1 row free: nothing taken
    assert (ring.received, ring.refused, sum(ring.dropped_counts())) == (3, 2, 0)
    assert ring.offer_all([rb.slice(0, 1)]) is True
    ring.close()
    assert ring.offer_all([rb.slice(0, 1)]) is False
    popped = []
    while (item := ring.pop()) is not None:
        popped.extend(item[0].column("span_id").to_pylist())
    assert popped == [*rb.column("span_id").to_pylist(), rb.column("span_id")[0].as_py()]


def test_try_record_metric_batch_refuses_whole_batches(pipeline_factory):
    from knhk.metrics import MetricBuffer

    buffer = MetricBuffer(batch_size=10, capacity=10, service="svc")
    for i in range(3):
        buffer.append(knhk.MetricPoint("hits", i, kind=knhk.MetricKind.COUNTER, time_ns=i + 1))
    buffer.seal()
    batch = knhk.MetricBatch(buffer.drain(0.0)[0])
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(4)
                         .with_exporter(sink))
    assert p.try_record_metric_batch(batch) == 3
    assert p.try_record_metric_batch(batch) is None      # 3 more do not fit in 4
    assert p.force_flush(5)
    p.shutdown()
    assert p.try_record_metric_batch(batch) is None      # shut down
    stats = p.stats()
    assert stats.metrics_received == 3 and stats.metrics_refused == 6
    assert not any(k.startswith("metrics_") for k in stats.dropped_by_reason)
    assert sum(b.num_rows for b in sink.metric_batches()) == 3


def test_a_refused_batch_counts_nothing_and_a_too_large_one_raises(pipeline_factory):
    p = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(4))
    rows = knhk.SpanBatch.from_spans(
        [knhk.Span("a", trace_id=i, span_id=i) for i in range(1, 7)]).record_batch.to_pylist()
    rows[0]["end_time_ns"] = rows[0]["start_time_ns"] - 1  # one invalid row
    five_valid = pa.RecordBatch.from_pylist(rows, schema=knhk.SPAN_SCHEMA)
    with pytest.raises(knhk.errors.BatchTooLargeError, match="channel capacity"):
        p.try_record_batch(five_valid)
    p.shutdown()
    assert p.try_record_batch(five_valid.slice(0, 3)) is None  # refused: retried later
    stats = p.stats()
    # neither the too-large nor the refused batch counted its invalid row
    assert stats.dropped_by_reason == {} and stats.events_received == 0


def test_an_exporter_stage_sees_every_span_before_sampling(pipeline_factory):
    seen: list[int] = []

    class Deriving(knhk.InMemoryExporter):
        bound = None

        def pipeline_stage(self):
            return lambda batch: seen.append(batch.num_rows)

        def bind_pipeline(self, pipeline):
            self.bound = pipeline

    exporter = Deriving()
    p = pipeline_factory(lambda b: b.with_sampler(knhk.AlwaysOff()).with_exporter(exporter))
    assert exporter.bound is p
    assert p.record_spans(knhk.Span("a", trace_id=i, span_id=i) for i in range(1, 11)) == 10
    assert p.force_flush(5)
    assert sum(seen) == 10                      # the stage saw all ten ...
    assert exporter.spans().num_rows == 0       # ... the exporter none (sampled out)
    assert p.stats().events_sampled_out == 10


def test_a_failing_bind_leaves_no_thread_running():
    class Unbindable(knhk.InMemoryExporter):
        name = "unbindable"

        def bind_pipeline(self, pipeline):
            raise OSError("port 9464 is in use")

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(OSError, match="in use"):
        knhk.TelemetryPipeline.builder().with_exporter(Unbindable()).build()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = {t.name for t in threading.enumerate() if t.is_alive()} - before
        if not left:
            break
        time.sleep(0.01)
    assert not left


def test_processing_latencies_returns_only_newer_batches(pipeline_factory):
    p = pipeline_factory(lambda b: b.with_batch_size(2))
    assert p.processing_latencies() == (0, pytest.approx(np.empty(0)))
    p.record_spans(knhk.Span("a", trace_id=i, span_id=i) for i in range(1, 7))
    assert p.force_flush(5)
    done, lat = p.processing_latencies()
    assert done == p.stats().batches_processed == 3 and lat.shape == (3,)
    assert (lat >= 0).all()
    p.record_spans(knhk.Span("a", trace_id=i, span_id=i) for i in range(7, 9))
    assert p.force_flush(5)
    done2, newer = p.processing_latencies(done)
    assert done2 == 4 and newer.shape == (1,)


def test_shutdown_is_false_when_an_export_failed_earlier():
    class Failing(knhk.Exporter):
        name = "failing"

        def export(self, batch):
            return knhk.ExportResult.FAILURE

    p = knhk.TelemetryPipeline.builder().with_flush_interval(0.01) \
        .with_exporter(Failing()).build()
    p.record_span(knhk.Span("a", trace_id=1, span_id=1))
    assert p.force_flush(5) is False or p.stats().export_errors == 1
    assert p.shutdown(5) is False
    assert p.stats().exporters["failing"]["events_failed"] == 1
    q = knhk.TelemetryPipeline.builder().with_exporter(knhk.InMemoryExporter()).build()
    q.record_span(knhk.Span("a", trace_id=1, span_id=1))
    assert q.shutdown(5) is True
