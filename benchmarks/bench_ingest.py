"""Ingest: record_span and record_batch beside the OpenTelemetry SDK.

Run the side-by-side scenarios with ``python benchmarks/run.py ingest`` (figures
go to RESULTS.md) or the pytest-benchmark form with
``pytest benchmarks/bench_ingest.py --benchmark-only``.

The reference span is a span as users write it: a name, a trace and span id,
start and end times and two string attributes. The OpenTelemetry peer produces
the same spans through a TracerProvider with a BatchSpanProcessor whose
exporter discards them (queue sized so nothing is dropped).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate, paired_rates, rss_bytes

import knhk
from knhk.exporters.base import Exporter, ExportResult

ATTRS = {"http.request.method": "GET", "http.route": "/users/{id}"}


class Discard(Exporter):
    name = "discard"
    queue_size = 1 << 20

    def export(self, batch):
        return ExportResult.SUCCESS


def _ids(n: int, seed: int = 1) -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(seed)
    traces = [rng.getrandbits(128).to_bytes(16, "big") for _ in range(max(1, n // 10))]
    spans = [rng.getrandbits(64).to_bytes(8, "big") for _ in range(n)]
    return traces, spans


def knhk_record_span(n: int) -> tuple[int, float]:
    traces, spans = _ids(n)
    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(1000)
                .with_channel_capacity(max(n, 100_000)).with_exporter(Discard()).build())
    record, Span = pipeline.record_span, knhk.Span
    nt = len(traces)
    t0 = time.perf_counter()
    for i in range(n):
        record(Span(name="GET /users/{id}", trace_id=traces[i % nt], span_id=spans[i],
                    start_time_ns=1_700_000_000_000_000_000 + i,
                    end_time_ns=1_700_000_000_000_100_000 + i, attributes=ATTRS))
    pipeline._ring.seal()
    dt = time.perf_counter() - t0
    pipeline.shutdown()
    assert pipeline.stats().events_processed == n
    return n, dt


def _otel_discard_processor(n: int):
    """The SDK's BatchSpanProcessor over an exporter that discards, queue sized for ``n``."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DiscardOtel(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    return BatchSpanProcessor(DiscardOtel(), max_queue_size=n + 1)


def _otel_tracer(n: int):
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(_otel_discard_processor(n))
    return provider, provider.get_tracer("bench")


def otel_record_span(n: int) -> tuple[int, float]:
    provider, tracer = _otel_tracer(n)
    t0 = time.perf_counter()
    for i in range(n):
        span = tracer.start_span("GET /users/{id}", attributes=ATTRS,
                                 start_time=1_700_000_000_000_000_000 + i)
        span.end(end_time=1_700_000_000_000_100_000 + i)
    dt = time.perf_counter() - t0
    provider.shutdown()
    return n, dt


def otel_record_span_idiomatic(n: int) -> tuple[int, float]:
    """The SDK as its documentation writes it: a context-managed current span."""
    provider, tracer = _otel_tracer(n)
    t0 = time.perf_counter()
    for _ in range(n):
        with tracer.start_as_current_span("GET /users/{id}", attributes=ATTRS):
            pass
    dt = time.perf_counter() - t0
    provider.shutdown()
    return n, dt


def latency_percentiles(n: int = 200_000) -> tuple[dict, dict]:
    traces, spans = _ids(n)
    pipeline = (knhk.TelemetryPipeline.builder().with_channel_capacity(max(n, 100_000))
                .with_exporter(Discard()).build())
    record, Span, clock = pipeline.record_span, knhk.Span, time.perf_counter_ns
    nt = len(traces)
    lat = np.empty(n, dtype=np.int64)
    for i in range(n):
        s = Span(name="GET /users/{id}", trace_id=traces[i % nt], span_id=spans[i],
                 start_time_ns=1, end_time_ns=2, attributes=ATTRS)
        t0 = clock()
        record(s)
        lat[i] = clock() - t0
    pipeline.shutdown()
    provider, tracer = _otel_tracer(n)
    olat = np.empty(n, dtype=np.int64)
    for i in range(n):
        t0 = clock()
        span = tracer.start_span("GET /users/{id}", attributes=ATTRS, start_time=1)
        span.end(end_time=2)
        olat[i] = clock() - t0
    provider.shutdown()
    pct = (50, 99, 99.9)
    return ({p: float(np.percentile(lat, p)) / 1000 for p in pct},
            {p: float(np.percentile(olat, p)) / 1000 for p in pct})


def _columns(n: int, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    trace = rng.integers(0, 256, size=(n // 10 + 1, 16), dtype=np.uint8)[np.arange(n) // 10]
    trace[:, 0] |= 1
    span = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    span[:, 0] |= 1
    start = 1_700_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 1000
    names = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, 16, n, dtype=np.int32)),
        pa.array([f"op-{i}" for i in range(16)]))
    return {"trace_id": trace, "span_id": span, "name": names, "start_time_ns": start,
            "end_time_ns": start + rng.integers(1000, 10**7, n)}


def knhk_record_batch(data, n: int) -> tuple[int, float]:
    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(10_000)
                .with_channel_capacity(n + 10_000).with_exporter(Discard()).build())
    t0 = time.perf_counter()
    accepted = pipeline.record_batch(data)
    dt = time.perf_counter() - t0
    pipeline.shutdown()
    assert accepted == n, accepted
    return n, dt


def otel_batch_processor(n: int) -> tuple[int, float]:
    """The SDK's own bulk path: finished ReadableSpans handed to BatchSpanProcessor.on_end."""
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("bench")
    finished = []
    for i in range(n):
        s = tracer.start_span("op", attributes=ATTRS, start_time=i + 1)
        s.end(end_time=i + 2)
        finished.append(s)
    proc = _otel_discard_processor(n)
    t0 = time.perf_counter()
    for s in finished:
        proc.on_end(s)
    dt = time.perf_counter() - t0
    proc.shutdown()
    return n, dt


_MEMORY_CHILD = r"""
import gc, os, sys, random
sys.path.insert(0, {bench!r})
from _harness import rss_bytes
import knhk
from knhk._build import load_core
n = {n}
rng = random.Random(3)
traces = [rng.getrandbits(128).to_bytes(16, "big") for _ in range(n // 10)]
spans = [rng.getrandbits(64).to_bytes(8, "big") for _ in range(n)]
attrs = {attrs!r}
mode = {mode!r}
gc.collect()
if mode == "knhk-held":
    bs = {batch_size}
    ring = load_core("_ringbuffer").SpanRing(bs, n + bs)
    Span = knhk.Span
    before = rss_bytes()
    for i in range(n):
        ring.append(Span("GET /users/{{id}}", trace_id=traces[i % len(traces)],
                         span_id=spans[i], start_time_ns=1_700_000_000_000_000_000 + i,
                         end_time_ns=1_700_000_000_000_100_000 + i, attributes=attrs))
    ring.seal()
elif mode == "otel-held":
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracer = provider.get_tracer("bench")
    before = rss_bytes()
    for i in range(n):
        s = tracer.start_span("GET /users/{{id}}", attributes=attrs,
                              start_time=1_700_000_000_000_000_000 + i)
        s.end(end_time=1_700_000_000_000_100_000 + i)
    del s
gc.collect()
print(rss_bytes() - before)
"""


def resident_bytes_per_span(mode: str, n: int, batch_size: int = 4096) -> float:
    code = _MEMORY_CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), n=n,
                                attrs=ATTRS, mode=mode, batch_size=batch_size)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return int(out.strip().splitlines()[-1]) / n


def _reference_spans(n: int) -> knhk.SpanBatch:
    """The reference span with realistic ids and times: traces of 10 spans, 2 attributes."""
    rng = random.Random(4)
    spans = []
    t = 1_700_000_000_000_000_000
    for i in range(n):
        if i % 10 == 0:
            trace, root = rng.getrandbits(128).to_bytes(16, "big"), None
        sid = rng.getrandbits(64).to_bytes(8, "big")
        t += rng.randrange(50_000, 2_000_000)
        spans.append(knhk.Span("GET /users/{id}", trace_id=trace, span_id=sid,
                               parent_span_id=root, start_time_ns=t,
                               duration_ns=rng.randrange(10_000, 50_000_000),
                               attributes=ATTRS, kind=knhk.SpanKind.SERVER))
        root = root or sid
    return knhk.SpanBatch.from_spans(spans)


def ipc_bytes_per_span(batch: knhk.SpanBatch, rows_per_batch: int, tmp: str,
                       level: int | None = None) -> float:
    """Bytes per span written through knhk's IpcExporter (lz4), as a pipeline records."""
    from knhk.exporters.ipc import IpcExporter

    exporter = IpcExporter(tmp, prefix="bench", compression="lz4", compression_level=level)
    for off in range(0, batch.num_rows, rows_per_batch):
        exporter.export(batch.slice(off, rows_per_batch))
    exporter.shutdown()
    return sum(os.path.getsize(f) for f in exporter.files) / batch.num_rows


def otlp_bytes_per_span(batch: knhk.SpanBatch) -> dict[str, float]:
    import lz4.frame
    import zstandard

    raw = _otlp_bytes(batch)
    n = batch.num_rows
    return {"raw": len(raw) / n, "lz4": len(lz4.frame.compress(raw)) / n,
            "zstd": len(zstandard.ZstdCompressor(level=3).compress(raw)) / n}


def _otlp_bytes(batch) -> bytes:
    """Encode spans as an OTLP ExportTraceServiceRequest with opentelemetry-proto."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    from opentelemetry.proto.common.v1 import common_pb2 as cm
    from opentelemetry.proto.resource.v1 import resource_pb2 as rs
    from opentelemetry.proto.trace.v1 import trace_pb2 as tr

    from knhk._attributes import attributes_dict

    def kv(d):
        out = []
        for k, v in d.items():
            if isinstance(v, bool):
                av = cm.AnyValue(bool_value=v)
            elif isinstance(v, int):
                av = cm.AnyValue(int_value=v)
            elif isinstance(v, float):
                av = cm.AnyValue(double_value=v)
            else:
                av = cm.AnyValue(string_value=str(v))
            out.append(cm.KeyValue(key=k, value=av))
        return out

    by_service: dict[str, list] = {}
    resources: dict[str, list] = {}
    for row in batch.record_batch.to_pylist():
        span = tr.Span(trace_id=row["trace_id"], span_id=row["span_id"],
                       parent_span_id=row["parent_span_id"] or b"", name=row["name"],
                       kind=row["kind"], start_time_unix_nano=row["start_time_ns"],
                       end_time_unix_nano=row["end_time_ns"],
                       attributes=kv(attributes_dict(row["attributes"])),
                       status=tr.Status(code=row["status_code"],
                                        message=row["status_message"] or ""))
        by_service.setdefault(row["service"], []).append(span)
        resources.setdefault(row["service"], kv(attributes_dict(row["resource_attributes"])))
    req = ts.ExportTraceServiceRequest(resource_spans=[
        tr.ResourceSpans(resource=rs.Resource(attributes=resources[svc]),
                         scope_spans=[tr.ScopeSpans(spans=spans)])
        for svc, spans in by_service.items()])
    return req.SerializeToString()


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 200_000 if quick else 1_000_000
    results = []

    # interleaved runs: the machine's other load falls on both sides alike
    (k_rate, k_all), (o_rate, o_all), (oi_rate, oi_all) = paired_rates(
        [lambda: knhk_record_span(n), lambda: otel_record_span(min(n, 100_000)),
         lambda: otel_record_span_idiomatic(min(n, 100_000))], runs)
    results.append(Result(
        "record_span(Span(...)), 2 string attributes, into sealed batches", "spans/s",
        k_rate, o_rate,
        "opentelemetry-sdk start_span()/end(), BatchSpanProcessor + discarding exporter",
        ">= 2,000,000 spans/s and >= 60x the SDK", k_rate >= 2e6 and k_rate / o_rate >= 60,
        runs, f"{n:,} spans per run (SDK {min(n, 100_000):,}); ids precomputed",
        {"knhk_runs": k_all, "peer_runs": o_all}))
    results.append(Result(
        "record_span(Span(...)) vs the SDK's idiomatic `with start_as_current_span()`",
        "spans/s", k_rate, oi_rate,
        "opentelemetry-sdk start_as_current_span context manager, BatchSpanProcessor",
        ">= 60x the SDK", k_rate / oi_rate >= 60, runs, "same knhk runs as above",
        {"peer_runs": oi_all}))

    k_lat, o_lat = latency_percentiles(200_000 if quick else 500_000)
    results.append(Result(
        "record_span call latency p99 (not blocked)", "us", k_lat[99], o_lat[99],
        "opentelemetry-sdk start_span+end", "<= 5 us", k_lat[99] <= 5.0, 1,
        "perf_counter_ns around each call; includes the timer's own cost",
        {"knhk_p50": k_lat[50], "knhk_p999": k_lat[99.9], "peer_p50": o_lat[50]}))

    nb = 1_000_000
    cols = _columns(nb)
    table = knhk.SpanBatch(cols).record_batch
    a_rate, a_all = median_rate(lambda: knhk_record_batch(table, nb), runs)
    np_rate, np_all = median_rate(lambda: knhk_record_batch(cols, nb), runs)
    ob_rate, ob_all = median_rate(lambda: otel_batch_processor(100_000), runs)
    results.append(Result(
        "record_batch of 1,000,000 spans (Arrow RecordBatch) into sealed batches", "spans/s",
        a_rate, ob_rate, "opentelemetry-sdk BatchSpanProcessor.on_end of finished spans",
        ">= 20,000,000 spans/s", a_rate >= 2e7, runs, "",
        {"knhk_runs": a_all, "peer_runs": ob_all}))
    results.append(Result(
        "record_batch of 1,000,000 spans (dict of NumPy columns) into sealed batches",
        "spans/s", np_rate, ob_rate,
        "opentelemetry-sdk BatchSpanProcessor.on_end of finished spans",
        ">= 20,000,000 spans/s", np_rate >= 2e7, runs,
        "ids as (n,16)/(n,8) uint8, times int64, names an Arrow dictionary array; "
        "NumPy input is copied", {"knhk_runs": np_all}))

    nm = 200_000 if quick else 1_000_000
    k_mem = resident_bytes_per_span("knhk-held", nm, 4096)
    k_mem_1k = resident_bytes_per_span("knhk-held", nm, 1000)
    o_mem = resident_bytes_per_span("otel-held", min(nm, 200_000))
    results.append(Result(
        "resident bytes per reference span held in sealed batches (4096-row batches)",
        "bytes/span", k_mem, o_mem, "opentelemetry-sdk ReadableSpan held by InMemorySpanExporter",
        "<= 100 bytes/span; 1M spans in flight <= 150 MB",
        k_mem <= 100 and k_mem * 1e6 <= 150e6, 1,
        f"RSS growth in a fresh process over {nm:,} spans (SDK {min(nm, 200_000):,}); "
        f"with 1000-row batches: {k_mem_1k:.1f} bytes/span",
        {"bytes_per_span_1000_rows": k_mem_1k}))

    import tempfile

    from knhk import workload

    ref = _reference_spans(100_000)
    wl = workload.generate(100_000, workload.WorkloadConfig(seed=5))
    for label, batch in (("reference span", ref), ("generated workload", wl)):
        otlp = otlp_bytes_per_span(batch)
        figures = {}
        for rows in (1000, 4096, 10_000):
            with tempfile.TemporaryDirectory() as tmp:
                figures[rows] = ipc_bytes_per_span(batch, rows, tmp)
        results.append(Result(
            f"bytes per span on disk, Arrow IPC lz4, {label} (4096-row batches)",
            "bytes/span", figures[4096], otlp["lz4"],
            "the same spans as one OTLP protobuf request + lz4 (opentelemetry-proto)",
            "<= 50 bytes/span", figures[4096] <= 50, 1,
            f"1000-row batches {figures[1000]:.1f}, 10000-row {figures[10_000]:.1f}; "
            f"OTLP raw {otlp['raw']:.1f}, + zstd {otlp['zstd']:.1f}", {"ipc": figures}))
        with tempfile.TemporaryDirectory() as tmp:
            hc = ipc_bytes_per_span(batch, 4096, tmp, level=3)
        results.append(Result(
            f"bytes per span on disk, Arrow IPC lz4 compression_level=3, {label} "
            "(4096-row batches)", "bytes/span", hc, otlp["lz4"],
            "the same spans as one OTLP protobuf request + lz4 (opentelemetry-proto)",
            None, None, 1, "IpcExporter(compression_level=3): LZ4 HC, about 4x the CPU of "
            "the default level to write, same speed to read"))
    return results


# -- pytest-benchmark form ----------------------------------------------------------

@pytest.mark.parametrize("n", [100_000])
def test_record_span(benchmark, n):
    benchmark.pedantic(knhk_record_span, args=(n,), rounds=3)


@pytest.mark.parametrize("n", [100_000])
def test_otel_record_span(benchmark, n):
    benchmark.pedantic(otel_record_span, args=(n,), rounds=3)


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_record_batch_arrow(benchmark, n):
    rb = knhk.SpanBatch(_columns(n)).record_batch
    benchmark.pedantic(knhk_record_batch, args=(rb, n), rounds=3)


if __name__ == "__main__":
    for r in scenarios(quick="--quick" in sys.argv):
        print(r.as_dict())
    del statistics, rss_bytes
