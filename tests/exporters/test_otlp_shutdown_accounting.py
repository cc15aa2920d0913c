"""OtlpExporter.shutdown: its counters are complete when it returns, even with a hung backend.

The backends are the testbed's real OTLP servers (opentelemetry-proto stubs) with
an injected delay, so a send attempt is still running when shutdown's deadline passes.
"""

from __future__ import annotations

import time

import pytest

import knhk
from knhk.exporters._retry import RetryConfig
from knhk.exporters.base import ExportResult
from knhk.exporters.otlp import OtlpConfig, OtlpExporter
from knhk.testbed import Faults, GrpcSink, HttpSink

FAST = RetryConfig(initial_interval=0.02, max_interval=0.05, randomization_factor=0.0,
                   max_elapsed_time=30.0)


def _batch(first: int, n: int) -> knhk.SpanBatch:
    return knhk.SpanBatch.from_spans([
        knhk.Span("op", trace_id=1, span_id=i, start_time_ns=1, duration_ns=5)
        for i in range(first, first + n)])


def _counters(e: OtlpExporter) -> tuple:
    with e._lock:
        return (e.spans_exported, e.spans_failed, e.export_errors,
                dict(e.errors_by_reason), e.late_successes)


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_in_flight_batches_are_counted_when_shutdown_returns(kind):
    delay = 1.2
    sink = (GrpcSink if kind == "grpc" else HttpSink)(faults=Faults(delay_s=delay)).start()
    try:
        exporter = OtlpExporter(OtlpConfig(
            endpoint=sink.endpoint, protocol="grpc" if kind == "grpc" else "http/protobuf",
            insecure=True, timeout=5.0, retry=FAST, consumers=2, headers={},
            compression="none"))
        assert exporter.export(_batch(1, 7)) is ExportResult.SUCCESS
        assert exporter.export(_batch(100, 5)) is ExportResult.SUCCESS
        time.sleep(0.3)  # both attempts reach the sink and hang there (for `delay`)
        assert sink.requests == 0 and len(exporter._inflight) == 2
        t0 = time.monotonic()
        exporter.shutdown(timeout=0.2)
        took = time.monotonic() - t0
        exported, failed, errors, reasons, late = _counters(exporter)
        assert late == 0
        # complete at return: every span is either exported or failed as "shutdown"
        assert (exported, failed, errors) == (0, 12, 2)
        assert reasons == {"shutdown": 2}
        assert took < 1.0, took
        # the attempts end after shutdown returned; nothing is counted twice
        time.sleep(delay + 0.3)
        exported2, failed2, errors2, reasons2, late2 = _counters(exporter)
        assert (exported2, failed2, errors2, reasons2) == (0, 12, 2, {"shutdown": 2})
        if kind == "http":
            # urllib cannot be cancelled: the sink answered 200 after shutdown gave up
            assert late2 == 2 and sink.count() == 12
        else:
            # closing the channel cancelled the calls: the sink saw clients leave
            assert late2 == 0 and sink.count() == 0
    finally:
        sink.stop()


def test_synchronous_mode_sends_on_the_callers_thread_and_reports_the_outcome():
    sink = GrpcSink(faults=Faults(unavailable=0.5, seed=3)).start()
    try:
        exporter = OtlpExporter(OtlpConfig(endpoint=sink.endpoint, protocol="grpc",
                                           insecure=True, retry=FAST, synchronous=True,
                                           headers={}, compression="none"))
        assert exporter._threads == []
        for i in range(4):
            assert exporter.export(_batch(1 + 10 * i, 10)) is ExportResult.SUCCESS
            assert sink.count() == 10 * (i + 1)  # delivered before export returned
        assert sink.answers["unavailable"] >= 1  # retried through injected failures
        sink.down()
        refused = OtlpExporter(OtlpConfig(
            endpoint=sink.endpoint, protocol="grpc", insecure=True, synchronous=True,
            retry=RetryConfig(enabled=False), headers={}, compression="none"))
        assert refused.export(_batch(500, 3)) is ExportResult.FAILURE
        assert refused.spans_failed == 3
        refused.shutdown(1.0)
        exporter.shutdown(1.0)
        assert exporter.spans_exported == 40 and exporter.spans_failed == 0
    finally:
        sink.stop()


def test_max_elapsed_time_zero_retries_until_shutdown():
    sink = GrpcSink().start()
    sink.down()
    try:
        exporter = OtlpExporter(OtlpConfig(
            endpoint=sink.endpoint, protocol="grpc", insecure=True, timeout=0.5,
            retry=RetryConfig(initial_interval=0.02, max_interval=0.05, max_elapsed_time=0),
            headers={}, compression="none"))
        exporter.export(_batch(1, 4))
        time.sleep(0.5)  # many attempts, none given up on
        assert exporter.export_errors == 0
        sink.up()
        assert exporter.force_flush(5)
        exporter.shutdown(1.0)
        assert exporter.spans_exported == 4 and sink.count() == 4
    finally:
        sink.stop()

