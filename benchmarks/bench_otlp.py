"""OTLP: knhk's wire codec and gRPC receiver beside opentelemetry-proto (protobuf's upb).

Run with ``python benchmarks/run.py otlp`` (figures go to RESULTS.md).

Requests are 512 spans of the synthetic workload (``knhk.workload``), sorted by
service and host as an SDK's exports are (one process, one resource), so a
request holds a few resources; ~250 bytes per span.

- Decode: ``knhk.otlp.decode_traces`` (wire -> Arrow batch) beside
  ``ExportTraceServiceRequest.FromString`` plus reading every field in Python
  (what a Python receiver does to get at the data).
- Encode: ``knhk.otlp.encode_traces`` (Arrow batch -> wire) beside building the
  same request with opentelemetry-proto's classes from Python rows (rows
  prepared outside the timing) and ``SerializeToString``.
- Receiver: 512-span requests over loopback gRPC from 2 client threads into an
  ``OtlpGrpcReceiver`` feeding a pipeline; spans/s until the pipeline has them all.
- Metrics: requests of 512 points (a resource, a scope, 8 metrics: gauges, sums
  and 10-bucket histograms, 3 attributes per point), decoded by
  ``knhk.otlp.decode_metrics`` beside ``FromString`` plus reading every field,
  and encoded by ``knhk.otlp.encode_metrics`` beside building and serializing
  the request with opentelemetry-proto's classes from Python rows.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import threading
import time

import grpc
import pyarrow.compute as pc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate, timer

import knhk
from knhk import _attributes
from knhk.otlp import decode_metrics, decode_traces, encode_metrics, encode_traces
from knhk.receivers import OtlpGrpcReceiver
from knhk.workload import WorkloadConfig, generate

REQUEST_SPANS = 512


def request_batches(n_spans: int) -> list[knhk.SpanBatch]:
    batch = generate(n_spans, WorkloadConfig(seed=11))
    host = batch.attribute("host.name", source="resource_attributes").cast("string")
    order = pc.sort_indices(pa_table(batch, host), [("service", "ascending"),
                                                    ("host", "ascending")])
    batch = batch.take(order)
    return [batch.slice(i, REQUEST_SPANS) for i in range(0, batch.num_rows, REQUEST_SPANS)]


def pa_table(batch, host):
    import pyarrow as pa

    return pa.table({"service": batch.column("service").cast("string"), "host": host})


# -- the peers ---------------------------------------------------------------------------


def _read_any(v: AnyValue):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_read_any(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _read_any(kv.value) for kv in v.kvlist_value.values}
    return None if kind is None else getattr(v, kind)


def _read_attrs(kvs) -> list:
    return [(kv.key, _read_any(kv.value)) for kv in kvs]


def pb_decode_and_read(wire: bytes) -> int:
    req = ExportTraceServiceRequest.FromString(wire)
    n = 0
    for rs in req.resource_spans:
        _read_attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            _ = ss.scope.name, ss.scope.version  # reading is the work measured
            for s in ss.spans:
                _ = (s.trace_id, s.span_id, s.parent_span_id, s.trace_state, s.name, s.kind,
                 s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                 s.status.message, s.flags, s.dropped_attributes_count)
                _read_attrs(s.attributes)
                for e in s.events:
                    _ = (e.time_unix_nano, e.name, _read_attrs(e.attributes))
                for ln in s.links:
                    _ = (ln.trace_id, ln.span_id, _read_attrs(ln.attributes))
                n += 1
    return n


def _kv(key, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def python_rows(batch: knhk.SpanBatch) -> list[dict]:
    rows = batch.to_pylist()
    for r in rows:
        for k in ("attributes", "resource_attributes"):
            r[k] = _attributes.attributes_dict(r[k])
    return rows


def pb_build_and_serialize(rows: list[dict]) -> bytes:
    req = ExportTraceServiceRequest()
    last_res = None
    for r in rows:
        if r["resource_attributes"] != last_res:
            last_res = r["resource_attributes"]
            rs = req.resource_spans.add(resource=Resource(
                attributes=[_kv(k, v) for k, v in last_res.items()]))
            ss = rs.scope_spans.add(scope=InstrumentationScope(
                name=r["scope_name"] or "", version=r["scope_version"] or ""))
        ss.spans.append(Span(
            trace_id=r["trace_id"], span_id=r["span_id"],
            parent_span_id=r["parent_span_id"] or b"", name=r["name"], kind=r["kind"],
            start_time_unix_nano=r["start_time_ns"], end_time_unix_nano=r["end_time_ns"],
            flags=r["flags"], status=Status(code=r["status_code"]),
            attributes=[_kv(k, v) for k, v in r["attributes"].items()]))
    return req.SerializeToString()


# -- metrics ------------------------------------------------------------------------------

METRIC_POINTS = 512
_BOUNDS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]


def metric_request(seed: int) -> bytes:
    """512 points: 8 metrics (gauge, sum, histogram) x 64 points, 3 attributes each."""
    rng = random.Random(seed)
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (("service.name", f"svc-{seed % 7}"), ("service.version", "1.4.2"),
                 ("host.name", f"host-{seed % 13}"), ("deployment.environment.name", "prod"),
                 ("service.namespace", "shop")):
        rm.resource.attributes.add(key=k).value.string_value = v
    sm = rm.scope_metrics.add(scope=InstrumentationScope(name="io.opentelemetry.http",
                                                         version="1.0"))
    per = METRIC_POINTS // 8
    for m in range(8):
        kind = ("gauge", "sum", "histogram")[m % 3]
        metric = sm.metrics.add(name=f"http.server.metric_{m}", unit="ms",
                                description="a benchmark metric")
        data = getattr(metric, kind)
        if kind == "sum":
            data.is_monotonic, data.aggregation_temporality = True, 2
        if kind == "histogram":
            data.aggregation_temporality = 2
        for i in range(per):
            p = data.data_points.add(start_time_unix_nano=1_700_000_000_000_000_000,
                                     time_unix_nano=1_700_000_060_000_000_000 + i)
            p.attributes.add(key="http.request.method").value.string_value = "GET"
            p.attributes.add(key="http.route").value.string_value = f"/api/{i % 20}"
            p.attributes.add(key="http.response.status_code").value.int_value = 200
            if kind == "histogram":
                counts = [rng.randrange(100) for _ in range(len(_BOUNDS) + 1)]
                p.explicit_bounds.extend(_BOUNDS)
                p.bucket_counts.extend(counts)
                p.count, p.sum = sum(counts), rng.random() * 1e4
            elif kind == "sum":
                p.as_int = rng.randrange(10**6)
            else:
                p.as_double = rng.random()
    return req.SerializeToString()


def pb_decode_metrics_and_read(wire: bytes) -> int:
    req = ExportMetricsServiceRequest.FromString(wire)
    n = 0
    for rm in req.resource_metrics:
        _read_attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            _ = sm.scope.name, sm.scope.version
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                _ = m.name, m.description, m.unit, getattr(data, "is_monotonic", None)
                for p in data.data_points:
                    _ = (p.start_time_unix_nano, p.time_unix_nano, p.flags,
                         _read_attrs(p.attributes))
                    if kind == "histogram":
                        _ = p.count, p.sum, list(p.explicit_bounds), list(p.bucket_counts)
                    else:
                        _ = p.WhichOneof("value"), p.as_int, p.as_double
                    n += 1
    return n


def pb_build_metrics(rows: list[dict]) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add(resource=Resource(
        attributes=[_kv(r["key"], r["str"]) for r in rows[0]["resource_attributes"]]))
    sm = rm.scope_metrics.add(scope=InstrumentationScope(name=rows[0]["scope_name"],
                                                         version=rows[0]["scope_version"]))
    last, data = None, None
    for r in rows:
        if r["name"] != last:
            last = r["name"]
            metric = sm.metrics.add(name=r["name"], unit=r["unit"],
                                    description=r["description"])
            kind = {1: "gauge", 2: "sum", 4: "histogram"}[r["kind"]]
            data = getattr(metric, kind)
            if kind != "gauge":
                data.aggregation_temporality = r["temporality"]
            if kind == "sum":
                data.is_monotonic = True
        attrs = [_kv(a["key"], a["str"] if a["type"] == 1 else a["int"])
                 for a in r["attributes"]]
        if r["kind"] == 4:
            data.data_points.add(start_time_unix_nano=r["start_time_ns"],
                                 time_unix_nano=r["time_ns"], attributes=attrs,
                                 count=r["count"], sum=r["sum"], explicit_bounds=r["bounds"],
                                 bucket_counts=r["bucket_counts"])
        elif r["int_value"] is not None:
            data.data_points.add(start_time_unix_nano=r["start_time_ns"],
                                 time_unix_nano=r["time_ns"], attributes=attrs,
                                 as_int=r["int_value"])
        else:
            data.data_points.add(start_time_unix_nano=r["start_time_ns"],
                                 time_unix_nano=r["time_ns"], attributes=attrs,
                                 as_double=r["value"])
    return req.SerializeToString()


# -- timing ------------------------------------------------------------------------------


def _cpu_rate(fn, items, runs: int) -> float:
    """Median items/s on this process's CPU time: what one core does, whatever the load."""
    rates = []
    for _ in range(runs):
        t0 = time.process_time()
        for item in items:
            fn(item)
        rates.append(len(items) * REQUEST_SPANS / (time.process_time() - t0))
    return statistics.median(rates)


def _time_all(fn, items) -> tuple[int, float]:
    t = timer()
    n = 0
    for item in items:
        out = fn(item)
        n += out if isinstance(out, int) else REQUEST_SPANS
    return n, t()


def run_receiver(wires: list[bytes], clients: int = 2) -> tuple[int, float]:
    sink_count = [0]

    class Count(knhk.Exporter):
        # the receiver is measured, not the exporter queue's drop policy: room for all
        queue_size = 1 << 20

        def export(self, batch):
            sink_count[0] += batch.num_rows
            return knhk.ExportResult.SUCCESS

    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(4096)
                .with_channel_capacity(1_000_000).with_exporter(Count()).build())
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0", max_workers=4).start()
    total = sum(_count(w) for w in wires)
    channels = [grpc.insecure_channel(f"localhost:{receiver.port}") for _ in range(clients)]
    calls = [c.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
             for c in channels]

    def client(i: int) -> None:
        for w in wires[i::clients]:
            calls[i](w, timeout=30)

    t = timer()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    pipeline.force_flush(60)
    dt = t()
    receiver.stop(0)
    pipeline.shutdown(5)
    for c in channels:
        c.close()
    assert sink_count[0] == total, (sink_count[0], total, pipeline.stats())
    return total, dt


def _count(wire: bytes) -> int:
    return decode_traces(wire).num_rows


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 51_200 if quick else 204_800
    batches = request_batches(n)
    wires = [encode_traces(b) for b in batches]
    bytes_per_span = sum(map(len, wires)) / n
    rows = [python_rows(b) for b in batches]
    results = []

    _time_all(decode_traces, wires[:4])
    k, k_all = median_rate(lambda: _time_all(decode_traces, wires), runs)
    p, p_all = median_rate(lambda: _time_all(pb_decode_and_read, wires), runs)
    results.append(Result(
        f"decode {len(wires)} requests of {REQUEST_SPANS} spans into Arrow batches",
        "spans/s", k, p, "opentelemetry-proto FromString + reading every field in Python",
        ">= 3,000,000 spans/s and >= 1.8x the peer", k >= 3e6 and k >= 1.8 * p, runs,
        f"{bytes_per_span:.0f} bytes/span on the wire; knhk on CPU time (one core, "
        f"load-independent): {_cpu_rate(decode_traces, wires, runs):,.0f} spans/s",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    k, k_all = median_rate(lambda: _time_all(encode_traces, batches), runs)
    p, p_all = median_rate(lambda: _time_all(pb_build_and_serialize, rows), runs)
    results.append(Result(
        f"encode {len(batches)} batches of {REQUEST_SPANS} spans to request bytes",
        "spans/s", k, p, "opentelemetry-proto: build the request from Python rows + serialize",
        ">= 3,000,000 spans/s and >= 10x the peer", k >= 3e6 and k >= 10 * p, runs,
        "knhk on CPU time (one core, load-independent): "
        f"{_cpu_rate(encode_traces, batches, runs):,.0f} spans/s",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    mwires = [metric_request(i) for i in range(40 if quick else 160)]
    m_batches = [decode_metrics(w) for w in mwires]
    m_rows = [b.record_batch.to_pylist() for b in m_batches]
    # the peer's rebuilt request must mean the same as knhk's: checked once, outside timing
    assert ExportMetricsServiceRequest.FromString(pb_build_metrics(m_rows[0])) == \
        ExportMetricsServiceRequest.FromString(encode_metrics(m_batches[0]))
    k, k_all = median_rate(lambda: _time_all(decode_metrics, mwires), runs)
    p, p_all = median_rate(lambda: _time_all(pb_decode_metrics_and_read, mwires), runs)
    results.append(Result(
        f"decode {len(mwires)} metric requests of {METRIC_POINTS} points into Arrow batches",
        "points/s", k, p, "opentelemetry-proto FromString + reading every field in Python",
        None, None, runs, f"{sum(map(len, mwires)) / len(mwires) / METRIC_POINTS:.0f} "
        "bytes/point on the wire", {"knhk_runs": k_all, "peer_runs": p_all}))
    k, k_all = median_rate(lambda: _time_all(encode_metrics, m_batches), runs)
    p, p_all = median_rate(lambda: _time_all(pb_build_metrics, m_rows), runs)
    results.append(Result(
        f"encode {len(m_batches)} metric batches of {METRIC_POINTS} points to request bytes",
        "points/s", k, p, "opentelemetry-proto: build the request from Python rows + serialize",
        None, None, runs, "", {"knhk_runs": k_all, "peer_runs": p_all}))

    rwires = wires[: (len(wires) // 2 if quick else len(wires))]
    k, k_all = median_rate(lambda: run_receiver(rwires), max(2, runs - 2))
    results.append(Result(
        f"OTLP/gRPC receiver end to end: {len(rwires)} requests of {REQUEST_SPANS} spans, "
        "2 client threads, loopback, into a pipeline", "spans/s", k, None, None,
        ">= 500,000 spans/s", k >= 5e5, max(2, runs - 2),
        "clients and server share the machine's 2 cores", {"knhk_runs": k_all}))
    return results


if __name__ == "__main__":
    for r in scenarios(quick=True):
        print(r.name, f"{r.knhk:,.0f}", r.unit, "peer", r.peer and f"{r.peer:,.0f}", r.met)
