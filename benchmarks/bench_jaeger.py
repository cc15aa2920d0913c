"""Jaeger: knhk's compact-Thrift datagram encoder beside thriftpy2.

Run with ``python benchmarks/run.py jaeger`` (figures go to RESULTS.md).

Batches are 8,192 spans of the synthetic workload (``knhk.workload``), what a
pipeline hands its exporters.

- Encode: ``knhk.exporters.jaeger.encode_batch`` (Arrow batch -> the
  ``Agent.emitBatch`` datagrams, grouped by process and trace, each <= 65,000
  bytes) beside thriftpy2 (the Jaeger IDL loaded with ``thriftpy2.load``, its
  compact protocol) building the same ``Batch`` structs from Python rows (rows
  prepared outside the timing) and serializing one ``emitBatch`` message per
  process. The peer does less: it neither groups by trace nor splits to fit a
  datagram. (opentelemetry-exporter-jaeger-thrift is deprecated and pins an old
  SDK, so it is not installed here.)
- The kernel alone: the same batches with their column buffers prepared outside
  the timing.
- Export: ``JaegerExporter.export`` (encode + non-blocking UDP sends) to a bound
  loopback socket that does not read (the kernel discards what overflows its
  buffer; the sender sees no error), so the figure is knhk's cost alone.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

import thriftpy2
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate, timer

import knhk
from knhk import _attributes
from knhk.exporters import jaeger
from knhk.workload import WorkloadConfig, generate

BATCH_SPANS = 8_192
IDL = Path(__file__).resolve().parents[1] / ".." / "shared" / "testdata" / "jaeger-idl"
_KINDS = {2: "server", 3: "client", 4: "producer", 5: "consumer"}


def batches(n_spans: int) -> list[knhk.SpanBatch]:
    batch = generate(n_spans, WorkloadConfig(seed=21))
    return [batch.slice(i, BATCH_SPANS) for i in range(0, n_spans, BATCH_SPANS)]


# -- the peer: thriftpy2 ------------------------------------------------------------------


def load_idl():
    return thriftpy2.load(str(IDL / "agent.thrift"), module_name="bench_agent_thrift",
                          include_dirs=[str(IDL)])


def python_rows(batch: knhk.SpanBatch) -> list[dict]:
    rows = batch.to_pylist()
    for r in rows:
        for k in ("attributes", "resource_attributes"):
            r[k] = _attributes.attributes_dict(r[k])
    return rows


def thriftpy2_encode(agent, rows: list[dict]) -> list[bytes]:
    j = agent.jaeger
    Tag, TagType = j.Tag, j.TagType

    def tag(key, value):
        if isinstance(value, bool):
            return Tag(key=key, vType=TagType.BOOL, vBool=value)
        if isinstance(value, int):
            return Tag(key=key, vType=TagType.LONG, vLong=value)
        if isinstance(value, float):
            return Tag(key=key, vType=TagType.DOUBLE, vDouble=value)
        if isinstance(value, bytes):
            return Tag(key=key, vType=TagType.BINARY, vBinary=value)
        return Tag(key=key, vType=TagType.STRING, vStr=str(value))

    def i64(b: bytes) -> int:
        return struct.unpack(">q", b)[0]

    by_process: dict = {}
    for r in rows:
        key = (r["service"], tuple(r["resource_attributes"].items()))
        spans = by_process.setdefault(key, [])
        tid, parent = r["trace_id"], r["parent_span_id"]
        tags = [tag(k, v) for k, v in r["attributes"].items()]
        if r["kind"] in _KINDS:
            tags.append(tag("span.kind", _KINDS[r["kind"]]))
        if r["status_code"] == 2:
            tags += [tag("otel.status_code", "ERROR"), tag("error", True)]
        refs = [j.SpanRef(refType=j.SpanRefType.CHILD_OF, traceIdLow=i64(tid[8:]),
                          traceIdHigh=i64(tid[:8]), spanId=i64(parent))] if parent else None
        spans.append(j.Span(
            traceIdLow=i64(tid[8:]), traceIdHigh=i64(tid[:8]), spanId=i64(r["span_id"]),
            parentSpanId=i64(parent) if parent else 0, operationName=r["name"],
            references=refs, flags=1, startTime=r["start_time_ns"] // 1000,
            duration=(r["end_time_ns"] - r["start_time_ns"]) // 1000, tags=tags))
    out = []
    for seq, ((service, resource), spans) in enumerate(by_process.items()):
        process = j.Process(serviceName=service, tags=[tag(k, v) for k, v in resource
                                                      if k != "service.name"])
        buf = TMemoryBuffer()
        proto = TCompactProtocol(buf)
        proto.write_message_begin("emitBatch", TMessageType.ONEWAY, seq)
        agent.Agent.emitBatch_args(batch=j.Batch(process=process, spans=spans,
                                                 seqNo=seq)).write(proto)
        proto.write_message_end()
        out.append(buf.getvalue())
    return out


# -- timing -------------------------------------------------------------------------------


def _time_all(fn, items, n_spans: int) -> tuple[int, float]:
    t = timer()
    for item in items:
        fn(item)
    return n_spans, t()


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 8 * BATCH_SPANS if quick else 32 * BATCH_SPANS
    bs = batches(n)
    agent = load_idl()
    datagrams = [d for b in bs for d in jaeger.encode_batch(b)]
    bytes_per_span = sum(map(len, datagrams)) / n
    largest = max(map(len, datagrams))
    results = []

    jaeger.encode_batch(bs[0])
    k, k_all = median_rate(lambda: _time_all(jaeger.encode_batch, bs, n), runs)
    peer_bs = bs[: max(1, len(bs) // 8)]  # the peer is slow: time an eighth of the spans
    peer_rows = [python_rows(b) for b in peer_bs]
    peer_n = sum(b.num_rows for b in peer_bs)
    p, p_all = median_rate(lambda: _time_all(lambda r: thriftpy2_encode(agent, r), peer_rows,
                                             peer_n), max(2, runs - 2))
    results.append(Result(
        f"encode {len(bs)} batches of {BATCH_SPANS} spans to Jaeger emitBatch datagrams",
        "spans/s", k, p,
        "thriftpy2 compact protocol: Batch structs built from Python rows, one message "
        "per process (no trace grouping, no size limit)",
        ">= 1,000,000 spans/s", k >= 1e6, runs,
        f"{bytes_per_span:.0f} bytes/span, {len(datagrams)} datagrams, largest {largest:,} B; "
        f"peer timed on {peer_n:,} spans",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    prepared = []
    for b in bs:
        prepared.append(jaeger._columns(b.record_batch, jaeger._Prep()))
    k, k_all = median_rate(lambda: _time_all(
        lambda c: jaeger._kernel.encode_batch(c, jaeger.DEFAULT_MAX_PACKET_SIZE, 0),
        prepared, n), runs)
    results.append(Result(
        "the compiled kernel alone (column buffers prepared outside the timing)", "spans/s",
        k, None, None, None, None, runs, "", {"knhk_runs": k_all}))

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    exporter = jaeger.JaegerExporter("127.0.0.1", sink.getsockname()[1])
    try:
        k, k_all = median_rate(lambda: _time_all(exporter.export, bs, n), runs)
        stats = exporter.stats()
    finally:
        exporter.shutdown()
        sink.close()
    results.append(Result(
        "JaegerExporter.export: encode + non-blocking UDP sends over loopback", "spans/s",
        k, None, None, None, None, runs,
        f"{stats['datagrams_sent']:,} datagrams sent, {stats['datagrams_failed']} failed "
        f"({stats['send_errors']})", {"knhk_runs": k_all}))
    return results


if __name__ == "__main__":
    for r in scenarios(quick=True):
        print(r.name, f"{r.knhk:,.0f}", r.unit, "peer", r.peer and f"{r.peer:,.0f}", r.met)
