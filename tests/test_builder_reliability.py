"""PipelineBuilder.with_memory_limiter and with_exporter(persistent_queue=...), with real peers.

Clients are the real OpenTelemetry SDK OTLP exporters (gRPC and HTTP); backends
are the testbed's OTLP sinks (opentelemetry-proto stubs, independent of knhk's codec).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import knhk
from knhk.exporters._persistent_queue import PersistentQueue
from knhk.exporters._retry import RetryConfig
from knhk.exporters.otlp import OtlpConfig, OtlpExporter
from knhk.memory_limiter import MemoryLimiter
from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver
from knhk.receivers._common import memory_limiter_of
from knhk.testbed import GrpcSink
from knhk.testbed.disk import records_on_disk

FAST = RetryConfig(initial_interval=0.02, max_interval=0.1, randomization_factor=0.0,
                   max_elapsed_time=0)


def _ids_on_disk(directory) -> set:
    """Span ids in the queue's records; empty while a record is half written."""
    try:
        return set().union(set(), *(r[3] for r in records_on_disk(str(directory))))
    except (OSError, ValueError):  # read while the writer is mid-record: look again
        return set()


def _sdk_spans(n: int) -> list:
    """``n`` finished spans of the real SDK, to hand to its OTLP exporters."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("knhk-builder-tests")
    for i in range(n):
        with tracer.start_as_current_span(f"op {i}"):
            pass
    spans = list(memory.get_finished_spans())
    provider.shutdown()
    return spans


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_memory_limiter_refuses_retryably_and_the_sdk_retries_through(protocol):
    # a real limiter on real resident memory: a soft limit of 1 MiB is always exceeded
    limiter = MemoryLimiter(1, 2, check_interval=0.01)
    sink = knhk.InMemoryExporter()
    pipeline = (knhk.TelemetryPipeline.builder().with_flush_interval(0.01)
                .with_memory_limiter(limiter).with_exporter(sink).build())
    assert memory_limiter_of(pipeline) is limiter
    receiver_cls = OtlpGrpcReceiver if protocol == "grpc" else OtlpHttpReceiver
    with pipeline, receiver_cls(pipeline, endpoint="127.0.0.1:0") as receiver:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{receiver.port}",
                                        insecure=True, timeout=20)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=f"http://127.0.0.1:{receiver.port}/v1/traces", timeout=20)
        spans = _sdk_spans(6)
        result: list = []
        sender = threading.Thread(target=lambda: result.append(exporter.export(spans)))
        sender.start()
        deadline = time.monotonic() + 5
        while limiter.stats()["refused_requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limiter.stats()["refused_requests"] >= 1
        assert pipeline.stats().events_received == 0  # refused whole, nothing taken
        # memory "comes down": the limits move above resident memory; the client's
        # retry (after the server's retry hint) now goes through
        limiter.soft_limit = limiter.hard_limit = 1 << 40
        sender.join(20)
        exporter.shutdown()
        assert result and result[0].name == "SUCCESS"
        assert pipeline.force_flush(5)
    assert sum(b.num_rows for b in sink.batches) == 6
    st = limiter.stats()
    assert st["admitted_requests"] >= 1 and st["soft_crossings"] == 1


def test_with_memory_limiter_arguments():
    b = knhk.TelemetryPipeline.builder()
    with pytest.raises(ValueError, match="soft_limit_mib"):
        b.with_memory_limiter()
    with pytest.raises(ValueError, match="not both"):
        b.with_memory_limiter(MemoryLimiter(1, 2), soft_limit_mib=3)
    with pytest.raises(ValueError, match="admit"):
        b.with_memory_limiter(object())
    with pytest.raises(ValueError, match="hard_limit_mib"):
        b.with_memory_limiter(soft_limit_mib=10, hard_limit_mib=5)
    with b.with_memory_limiter(soft_limit_mib=100, hard_limit_mib=300).build() as p:
        lim = memory_limiter_of(p)
        assert (lim.soft_limit, lim.hard_limit) == (100 << 20, 300 << 20)


def test_with_exporter_checks_the_persistent_queue_directory(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    b = knhk.TelemetryPipeline.builder()
    with pytest.raises(ValueError, match=r"directory .*file/q.* of exporter 'memory'"):
        b.with_exporter(knhk.InMemoryExporter(), persistent_queue=not_a_dir / "q")
    with pytest.raises(ValueError, match="queue size of exporter 'memory'"):
        b.with_exporter(knhk.InMemoryExporter(), queue_size=0)
    with pytest.raises(ValueError, match="a directory or a PersistentQueue"):
        b.with_exporter(knhk.InMemoryExporter(), persistent_queue=42)
    b.with_exporter(knhk.InMemoryExporter(), persistent_queue=tmp_path / "same")
    b.with_exporter(knhk.InMemoryExporter(), persistent_queue=str(tmp_path / "same"))
    with pytest.raises(ValueError, match="give each its own directory"):
        b.build()


def _otlp(endpoint: str) -> OtlpExporter:
    return OtlpExporter(OtlpConfig(endpoint=endpoint, protocol="grpc", insecure=True,
                                   timeout=1.0, retry=FAST, headers={}, compression="none"))


def _spans(first: int, n: int) -> knhk.SpanBatch:
    return knhk.SpanBatch.from_spans([
        knhk.Span("op", trace_id=7, span_id=i, start_time_ns=1, duration_ns=5)
        for i in range(first, first + n)])


def test_persistent_queue_survives_shutdown_and_a_new_pipeline_sends_it(tmp_path):
    qdir = tmp_path / "queue"
    sink = GrpcSink().start()
    sink.down()  # the backend is down throughout the first pipeline's life
    try:
        first = (knhk.TelemetryPipeline.builder().with_batch_size(50).with_flush_interval(0.01)
                 .with_exporter(_otlp(sink.endpoint), persistent_queue=qdir, queue_size=100)
                 .build())
        sent = set()
        for k in range(6):
            first.record_batch(_spans(1 + 50 * k, 50))
            sent |= {i.to_bytes(8, "big") for i in range(1 + 50 * k, 51 + 50 * k)}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            on_disk = _ids_on_disk(qdir)
            if on_disk == sent:
                break
            time.sleep(0.02)
        assert on_disk == sent
        assert first.shutdown(timeout=1.0) is False  # not exported: honest about it
        st = first.stats().exporters["otlp"]
        assert st["events_kept_on_disk"] == 300 and st["events_dropped_shutdown"] == 0
        assert "export_shutdown:otlp" not in first.stats().dropped_by_reason
        sink.up()
        second = (knhk.TelemetryPipeline.builder()
                  .with_exporter(_otlp(sink.endpoint), persistent_queue=str(qdir)).build())
        assert sink.wait_for(len(sent), 10)
        assert second.force_flush(5)
        pq = second.stats().exporters["otlp"]["extra"]["persistent_queue"]
        assert second.shutdown(timeout=5)
        assert sink.ids() == sent
        assert pq["records_replayed"] == 6 and pq["records_acked"] >= 1
        assert PersistentQueue(qdir).replay() == []  # all acknowledged
        assert not [n for n in os.listdir(qdir) if n.endswith(".knq")]
    finally:
        sink.stop()


def test_a_queue_directory_is_locked_while_in_use(tmp_path):
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink, persistent_queue=tmp_path).build():
        # a second pipeline (or process) on the same directory would corrupt the queue
        with pytest.raises(OSError, match="is in use by another queue"):
            PersistentQueue(tmp_path)
        other = knhk.TelemetryPipeline.builder().with_exporter(
            knhk.InMemoryExporter(), persistent_queue=tmp_path)
        with pytest.raises(OSError, match="is in use"):
            other.build()
    q = PersistentQueue(tmp_path)  # released by the shutdown
    assert q.replay() == []
    q.close()


def test_a_failed_build_releases_the_queues_it_already_opened(tmp_path):
    import threading

    from knhk.exporters._persistent_queue import PersistentQueue

    first, busy = tmp_path / "first", tmp_path / "busy"
    holder = PersistentQueue(str(busy))  # another queue holds this directory
    before = set(threading.enumerate())  # other tests' threads are not this test's
    a, b = knhk.InMemoryExporter(), knhk.InMemoryExporter()
    b.name = "b"
    try:
        with pytest.raises(OSError, match="in use"):
            (knhk.TelemetryPipeline.builder().with_exporter(a, persistent_queue=first)
             .with_exporter(b, persistent_queue=busy).build())
    finally:
        holder.close()
    assert not [t.name for t in set(threading.enumerate()) - before
                if t.name.startswith("knhk-export")]
    p = (knhk.TelemetryPipeline.builder().with_exporter(a, persistent_queue=first)
         .with_exporter(b, persistent_queue=busy).build())  # the first directory is free
    assert p.shutdown(5.0)
