"""The exporter interface, the per-exporter queue and worker, and InMemoryExporter."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa
import pytest

import knhk
from knhk import Exporter, ExportResult, InMemoryExporter, MetricBatch, Span, SpanBatch
from knhk.exporters.base import ExporterWorker


def _batch(first: int, n: int) -> SpanBatch:
    return SpanBatch.from_spans([Span("op", trace_id=i, span_id=i, start_time_ns=i)
                                 for i in range(first, first + n)])


class Scripted(Exporter):
    """Export outcomes scripted per call: 'ok', 'fail', 'raise' or an Event to wait on."""

    name = "scripted"

    def __init__(self, script=(), queue_size: int = 64) -> None:
        self.script = list(script)
        self.queue_size = queue_size
        self.seen: list[int] = []
        self.shutdown_calls = 0

    def export(self, batch):
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, threading.Event):
            step.wait(10)
            step = "ok"
        if step == "raise":
            raise ValueError("scripted failure")
        self.seen.append(batch.num_rows)
        return ExportResult.SUCCESS if step == "ok" else ExportResult.FAILURE

    def shutdown(self, timeout=None):
        self.shutdown_calls += 1


def test_base_exporter_contract():
    e = Exporter()
    with pytest.raises(NotImplementedError):
        e.export(_batch(1, 1))
    assert e.force_flush(1.0) is True
    assert e.shutdown(1.0) is None
    assert e.queue_size > 0
    assert {r.name for r in ExportResult} == {"SUCCESS", "FAILURE"}


def test_worker_exports_in_order_and_counts():
    exp = Scripted()
    w = ExporterWorker(exp)
    for i, n in enumerate((1, 2, 3)):
        assert w.submit(_batch(10 * i + 1, n))
    assert w.wait_idle(time.monotonic() + 5)
    assert exp.seen == [1, 2, 3]
    assert (w.stats.batches_exported, w.stats.events_exported) == (3, 6)
    assert w.idle()
    assert w.close(time.monotonic() + 5) is True
    assert exp.shutdown_calls == 1
    assert w.name == "scripted"


def test_worker_counts_failures_and_survives_exceptions(caplog):
    exp = Scripted(["fail", "raise", "ok"])
    w = ExporterWorker(exp)
    with caplog.at_level(logging.ERROR, logger="knhk.exporters.base"):
        for n in (1, 2, 3):
            w.submit(_batch(1, n))
        assert w.wait_idle(time.monotonic() + 5)
    assert w.stats.export_errors == 2
    assert w.stats.events_failed == 3
    assert w.stats.events_exported == 3
    assert "ValueError: scripted failure" in w.stats.last_error
    assert any("scripted" in r.getMessage() for r in caplog.records)
    w.close(time.monotonic() + 5)


def test_full_queue_drops_and_counts_new_batches():
    gate = threading.Event()
    exp = Scripted([gate], queue_size=2)
    w = ExporterWorker(exp)
    try:
        assert w.submit(_batch(1, 1))
        deadline = time.monotonic() + 5
        while w.stats.queued_batches or w.idle():   # wait until the worker holds batch 1
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert w.submit(_batch(2, 2)) and w.submit(_batch(4, 3))
        assert w.submit(_batch(7, 4)) is False
        assert w.stats.events_dropped_queue_full == 4
        assert w.wait_idle(time.monotonic() + 0.05) is False
    finally:
        gate.set()
    assert w.wait_idle(time.monotonic() + 5)
    assert exp.seen == [1, 2, 3]
    w.close(time.monotonic() + 5)


def test_close_with_a_hung_exporter_returns_by_the_deadline():
    gate = threading.Event()
    exp = Scripted([gate])
    w = ExporterWorker(exp)
    try:
        w.submit(_batch(1, 1))
        w.submit(_batch(2, 5))
        time.sleep(0.02)
        t0 = time.monotonic()
        assert w.close(time.monotonic() + 0.3) is False
        assert time.monotonic() - t0 < 0.8
        assert w.stats.events_dropped_shutdown == 5
        assert w.submit(_batch(9, 2)) is False
        assert w.stats.events_dropped_shutdown == 7
    finally:
        gate.set()


def test_exporter_shutdown_that_raises_is_contained(caplog):
    class BadShutdown(Scripted):
        def shutdown(self, timeout=None):
            raise RuntimeError("cannot shut down")

    w = ExporterWorker(BadShutdown())
    with caplog.at_level(logging.ERROR, logger="knhk.exporters.base"):
        assert w.close(time.monotonic() + 2) is True
    assert any("shutdown" in r.getMessage() for r in caplog.records)


def test_worker_name_defaults_to_the_class_name():
    class Plain:
        def export(self, batch):
            return ExportResult.SUCCESS

    w = ExporterWorker(Plain())
    assert w.name == "Plain"
    assert w.capacity == 64
    w.close(time.monotonic() + 1)


# -- InMemoryExporter ---------------------------------------------------------------------


def test_in_memory_exporter_keeps_batches_in_order():
    sink = InMemoryExporter()
    b1, b2 = _batch(1, 2), _batch(3, 1)
    mb = MetricBatch(pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA))
    for b in (b1, mb, b2):
        assert sink.export(b) is ExportResult.SUCCESS
    assert sink.batches == [b1, mb, b2]
    assert sink.span_batches() == [b1, b2]
    assert sink.metric_batches() == [mb]
    assert sink.spans().column("span_id").to_pylist() == \
        [i.to_bytes(8, "big") for i in (1, 2, 3)]
    assert sink.metrics_table().num_rows == 0
    sink.clear()
    assert sink.batches == [] and sink.spans().num_rows == 0


def test_in_memory_exporter_refuses_after_shutdown():
    sink = InMemoryExporter()
    sink.shutdown()
    assert sink.export(_batch(1, 1)) is ExportResult.FAILURE
    assert sink.batches == []


def test_in_memory_exporter_is_exported_from_knhk():
    assert knhk.InMemoryExporter is InMemoryExporter
    assert "InMemoryExporter" in knhk.__all__
