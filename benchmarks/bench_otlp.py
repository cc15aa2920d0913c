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
"""

from __future__ import annotations

import os
import sys
import threading

import grpc
import pyarrow.compute as pc
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
from knhk.otlp import decode_traces, encode_traces
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


# -- timing ------------------------------------------------------------------------------


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
    assert sink_count[0] == total, (sink_count[0], total)
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
        f"{bytes_per_span:.0f} bytes/span on the wire",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    k, k_all = median_rate(lambda: _time_all(encode_traces, batches), runs)
    p, p_all = median_rate(lambda: _time_all(pb_build_and_serialize, rows), runs)
    results.append(Result(
        f"encode {len(batches)} batches of {REQUEST_SPANS} spans to request bytes",
        "spans/s", k, p, "opentelemetry-proto: build the request from Python rows + serialize",
        ">= 3,000,000 spans/s and >= 10x the peer", k >= 3e6 and k >= 10 * p, runs, "",
        {"knhk_runs": k_all, "peer_runs": p_all}))

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
