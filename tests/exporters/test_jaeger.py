"""JaegerExporter against an independent Thrift implementation.

thriftpy2 loads the Jaeger IDL (``../shared/testdata/jaeger-idl``) and decodes
what knhk sends with its own compact protocol: a oneway ``emitBatch`` message
header, then ``emitBatch_args``. Every decoded field is compared with what the
batch holds, mapped by hand as the OpenTelemetry -> Jaeger transformation says;
the UDP tests receive real datagrams on a loopback socket.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import thriftpy2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

import knhk
from knhk import _attributes
from knhk.exporters import jaeger as jaeger_module
from knhk.exporters.base import ExportResult
from knhk.exporters.jaeger import JaegerExporter, encode_batch
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE, METRIC_SCHEMA
from knhk.workload import WorkloadConfig, generate

IDL = Path(__file__).resolve().parents[2] / ".." / "shared" / "testdata" / "jaeger-idl"
KINDS = {2: "server", 3: "client", 4: "producer", 5: "consumer"}


@pytest.fixture(scope="module")
def agent():
    return thriftpy2.load(str(IDL / "agent.thrift"), module_name="jaeger_agent_thrift",
                          include_dirs=[str(IDL)])


def decode(agent, datagram: bytes):
    """One datagram -> its jaeger Batch, checking the message header and that nothing trails."""
    buf = TMemoryBuffer(datagram)
    proto = TCompactProtocol(buf)
    name, mtype, _ = proto.read_message_begin()
    assert (name, mtype) == ("emitBatch", TMessageType.ONEWAY)
    args = agent.Agent.emitBatch_args()
    args.read(proto)
    proto.read_message_end()
    assert buf.read(1 << 20) == b""
    return args.batch


# -- the expected mapping, written from the input rows -------------------------------------


class JsonOf:
    """Equal to a JSON text that parses to ``value`` (arrays and kvlists become JSON strings)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, str) and json.loads(other) == self.value

    def __repr__(self):
        return f"JsonOf({self.value!r})"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, bytes):
        import base64

        return base64.b64encode(v).decode()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def tag_of(key: str, value) -> tuple:
    """(key, vType, vStr, vDouble, vBool, vLong, vBinary) of one attribute's Python value."""
    if isinstance(value, bool):
        return (key, 2, None, None, value, None, None)
    if isinstance(value, int):
        return (key, 3, None, None, None, value, None)
    if isinstance(value, float):
        return (key, 1, None, value, None, None, None)
    if isinstance(value, bytes):
        return (key, 4, None, None, None, None, value)
    if isinstance(value, list | dict):
        return (key, 0, JsonOf(_jsonable(value)), None, None, None, None)
    return (key, 0, "" if value is None else value, None, None, None, None)


def attr_tags(rows: list[dict]) -> list[tuple]:
    return [tag_of(a["key"], _attributes.attribute_value(a)) for a in rows]


def signed(b: bytes) -> int:
    return struct.unpack(">q", b)[0]


def expected_span(r: dict) -> dict:
    tid = r["trace_id"]
    refs = []
    if r["parent_span_id"] is not None:
        refs.append((0, signed(tid[8:]), signed(tid[:8]), signed(r["parent_span_id"])))
    refs += [(1, signed(ln["trace_id"][8:]), signed(ln["trace_id"][:8]),
              signed(ln["span_id"])) for ln in r["links"]]
    tags = attr_tags(r["attributes"])
    if r["scope_name"]:
        tags += [tag_of("otel.scope.name", r["scope_name"]),
                 tag_of("otel.library.name", r["scope_name"])]
    if r["scope_version"]:
        tags += [tag_of("otel.scope.version", r["scope_version"]),
                 tag_of("otel.library.version", r["scope_version"])]
    tags += attr_tags(r["scope_attributes"])
    if r["kind"] in KINDS:
        tags.append(tag_of("span.kind", KINDS[r["kind"]]))
    if r["status_code"] in (1, 2):
        tags.append(tag_of("otel.status_code", "OK" if r["status_code"] == 1 else "ERROR"))
        if r["status_message"]:
            tags.append(tag_of("otel.status_description", r["status_message"]))
    if r["status_code"] == 2:
        tags.append(tag_of("error", True))
    for what in ("attributes", "events", "links"):
        if r[f"dropped_{what}_count"]:
            tags.append(tag_of(f"otel.dropped_{what}_count", r[f"dropped_{what}_count"]))
    if r["trace_state"]:
        tags.append(tag_of("w3c.tracestate", r["trace_state"]))
    logs = []
    for ev in r["events"]:
        fields = [] if any(a["key"] == "event" for a in ev["attributes"]) else [
            tag_of("event", ev["name"])]
        fields += attr_tags(ev["attributes"])
        if ev["dropped_attributes_count"]:
            fields.append(tag_of("otel.event.dropped_attributes_count",
                                 ev["dropped_attributes_count"]))
        logs.append((ev["time_unix_nano"] // 1000, fields))
    return {
        "traceIdLow": signed(tid[8:]), "traceIdHigh": signed(tid[:8]),
        "spanId": signed(r["span_id"]),
        "parentSpanId": signed(r["parent_span_id"]) if r["parent_span_id"] else 0,
        "operationName": r["name"], "references": refs or None, "flags": 1,
        "startTime": r["start_time_ns"] // 1000,
        "duration": (r["end_time_ns"] - r["start_time_ns"]) // 1000,
        "tags": tags or None, "logs": logs or None,
    }


def got_span(s) -> dict:
    def tags(ts):
        return None if ts is None else [
            (t.key, t.vType, t.vStr, t.vDouble, t.vBool, t.vLong, t.vBinary) for t in ts]

    return {
        "traceIdLow": s.traceIdLow, "traceIdHigh": s.traceIdHigh, "spanId": s.spanId,
        "parentSpanId": s.parentSpanId, "operationName": s.operationName,
        "references": None if s.references is None else [
            (x.refType, x.traceIdLow, x.traceIdHigh, x.spanId) for x in s.references],
        "flags": s.flags, "startTime": s.startTime, "duration": s.duration,
        "tags": tags(s.tags),
        "logs": None if s.logs is None else [(lg.timestamp, tags(lg.fields)) for lg in s.logs],
    }


def eq(a, b) -> bool:
    """Equality where NaN equals NaN and -0.0 differs from 0.0 (decoded doubles are exact)."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(eq, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)
    if isinstance(a, JsonOf) or isinstance(b, JsonOf):
        return a == b
    return type(a) is type(b) and a == b


def expected_process(r: dict) -> tuple:
    tags = [t for t in attr_tags(r["resource_attributes"])
            if not (t[0] == "service.name" and t[1] == 0)]
    return r["service"], tags


def check_round_trip(agent, batch: knhk.SpanBatch, datagrams: list[bytes],
                     max_packet: int = 65_000) -> list:
    """Every span decoded once, every field as the input says; returns the decoded batches."""
    rows = {(r["trace_id"], r["span_id"]): r for r in batch.to_pylist()}
    decoded = [decode(agent, d) for d in datagrams]
    seen = set()
    for k, (d, b) in enumerate(zip(datagrams, decoded, strict=True)):
        assert len(d) <= max_packet
        assert b.seqNo == k
        for s in b.spans:
            tid = struct.pack(">q", s.traceIdHigh) + struct.pack(">q", s.traceIdLow)
            key = (tid, struct.pack(">q", s.spanId))
            assert key not in seen
            seen.add(key)
            r = rows[key]
            service, ptags = expected_process(r)
            assert b.process.serviceName == service
            assert eq([(t.key, t.vType, t.vStr, t.vDouble, t.vBool, t.vLong, t.vBinary)
                       for t in b.process.tags or []], ptags)
            want, got = expected_span(r), got_span(s)
            assert eq(got, want), (got, want)
    assert seen == set(rows)
    return decoded


# -- round trips --------------------------------------------------------------------------


def test_workload_batch_round_trips_field_by_field(agent):
    batch = generate(2_000, WorkloadConfig(seed=5))
    datagrams = encode_batch(batch)
    decoded = check_round_trip(agent, batch, datagrams)
    assert len(datagrams) > 3
    # trace-based batching: the workload's traces are small, so no trace of a process
    # (service + host) is split over datagrams
    where: dict = {}
    for k, b in enumerate(decoded):
        process = (b.process.serviceName, tuple((t.key, t.vStr) for t in b.process.tags))
        for s in b.spans:
            where.setdefault((process, s.traceIdHigh, s.traceIdLow), set()).add(k)
    assert all(len(ks) == 1 for ks in where.values())
    assert len(where) > len(decoded)
    # and a datagram is one process: all its spans' services agree with the rows
    assert {b.process.serviceName for b in decoded} == set(
        batch.column("service").cast(pa.string()).to_pylist())


def edge_spans() -> knhk.SpanBatch:
    nasty = {
        "s": "plain", "empty": "", "uni": "日本語 😀 é", "t": True, "f": False,
        "i": -(2**63), "imax": 2**63 - 1, "d": 2.5, "nan": float("nan"),
        "inf": float("inf"), "ninf": float("-inf"), "negzero": -0.0,
        "bin": b"\xff\xfe\x00\x80 not utf-8", "arr": [1, "a", True, 2.5, None],
        "kv": {"x": 1, "y": [b"\x00\x01", float("nan")]}, "none": None,
        "dbl": knhk.AttributeValue.double(3),
    }
    return knhk.SpanBatch.from_spans([
        knhk.Span("root ✓", trace_id=2**128 - 1, span_id=2**64 - 1, start_time_ns=1_999,
                  end_time_ns=1_000_999_999, kind=2, status=2, status_message="boom",
                  service="svc-ü", attributes=nasty, trace_state="k=v",
                  resource_attributes={"service.name": "svc-ü", "host.name": "h1", "n": 3},
                  scope_name="lib", scope_version="1.2",
                  events=[knhk.SpanEvent("exception", 5_500, {"exception.type": "E"}),
                          knhk.SpanEvent("named", 7_000, {"event": "override", "x": 1.5}),
                          knhk.SpanEvent("", 8_000)]),
        knhk.Span("", trace_id=2**128 - 1, span_id=2, parent_span_id=2**64 - 1,
                  start_time_ns=3_000, duration_ns=0, kind=3, status=1, status_message="fine",
                  service="svc-ü",
                  resource_attributes={"service.name": "svc-ü", "host.name": "h1", "n": 3},
                  links=[knhk.SpanLink(7, 8), knhk.SpanLink(2**127, 2**63)]),
        knhk.Span("internal", trace_id=5, span_id=3, parent_span_id=2, kind=1,
                  start_time_ns=10, duration_ns=999, service="other", status_message="unset"),
        knhk.Span("producer", trace_id=5, span_id=4, kind=4, start_time_ns=10, duration_ns=1,
                  service="other", resource_attributes={"host.name": "h2"}),
        knhk.Span("consumer", trace_id=5, span_id=5, kind=5, start_time_ns=10, duration_ns=1,
                  service="other", attributes={"big": "x" * 1_000}),
    ])


def test_edge_cases_round_trip(agent):
    batch = edge_spans()
    rb = batch.record_batch
    # dropped counts and scope attributes are not in the Span API: set the columns
    for name, values in (("dropped_attributes_count", [3, 0, 0, 1, 0]),
                         ("dropped_events_count", [0, 2, 0, 0, 0]),
                         ("dropped_links_count", [1, 0, 0, 0, 7])):
        rb = rb.set_column(rb.schema.get_field_index(name), rb.schema.field(name),
                           pa.array(values, pa.uint32()))
    i = rb.schema.get_field_index("scope_attributes")
    rb = rb.set_column(i, rb.schema.field(i), rb.column("attributes"))
    batch = knhk.SpanBatch._wrap(rb)
    datagrams = encode_batch(batch)
    decoded = check_round_trip(agent, batch, datagrams)
    # three processes: svc-ü/h1, other without resource, other/h2
    assert sorted((b.process.serviceName, len(b.process.tags or [])) for b in decoded) == [
        ("other", 0), ("other", 1), ("svc-ü", 2)]
    root = next(s for b in decoded for s in b.spans if s.operationName == "root ✓")
    tags = {t.key: t for t in root.tags}
    assert math.isnan(tags["nan"].vDouble) and tags["inf"].vDouble == math.inf
    assert tags["ninf"].vDouble == -math.inf and math.copysign(1, tags["negzero"].vDouble) < 0
    assert tags["bin"].vBinary == b"\xff\xfe\x00\x80 not utf-8" and tags["bin"].vType == 4
    assert json.loads(tags["arr"].vStr) == [1, "a", True, 2.5, None]
    assert json.loads(tags["kv"].vStr) == {"x": 1, "y": ["AAE=", "NaN"]}
    assert tags["dbl"].vType == 1 and tags["dbl"].vDouble == 3.0
    assert tags["error"].vBool is True and tags["otel.status_code"].vStr == "ERROR"
    assert root.logs[1].fields[0].key == "event" and root.logs[1].fields[0].vStr == "override"
    assert root.startTime == 1 and root.duration == 1_000_998  # ns truncated to microseconds
    assert root.traceIdHigh == -1 and root.traceIdLow == -1 and root.spanId == -1


def test_invalid_utf8_in_a_string_column_is_replaced_and_counted(agent):
    batch = knhk.SpanBatch.from_spans([
        knhk.Span("op", trace_id=1, span_id=1, status=2, status_message="ok-ish",
                  attributes={"k": "value"})])
    rb = batch.record_batch
    # a status message with invalid UTF-8, as a corrupt IPC file could carry
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, 4], np.int32)),
                                                 pa.py_buffer(b"a\xffb\xc3")])
    rb = rb.set_column(rb.schema.get_field_index("status_message"),
                       rb.schema.field("status_message"), bad)
    # and an attribute value whose dictionary holds invalid UTF-8
    attrs = rb.column("attributes")
    vals = attrs.values
    bad_dict = pa.Array.from_buffers(pa.string(), 1, [
        None, pa.py_buffer(np.array([0, 3], np.int32)), pa.py_buffer(b"\xe2\x82x")])
    bad_str = pa.DictionaryArray.from_arrays(vals.field("str").indices, bad_dict)
    vals = pa.StructArray.from_arrays(
        [bad_str if f.name == "str" else vals.field(f.name) for f in ATTRIBUTE_STRUCT],
        fields=list(ATTRIBUTE_STRUCT))
    rb = rb.set_column(rb.schema.get_field_index("attributes"), rb.schema.field("attributes"),
                       pa.ListArray.from_arrays(attrs.offsets, vals, type=ATTRIBUTES_TYPE))
    exporter = JaegerExporter("127.0.0.1", _free_port())
    try:
        datagrams = encode_batch(knhk.SpanBatch._wrap(rb))
        span = decode(agent, datagrams[0]).spans[0]
        tags = {t.key: t.vStr for t in span.tags}
        assert tags["otel.status_description"] == "a\ufffdb\ufffd"
        assert tags["k"] == "\ufffdx"
        exporter.export(knhk.SpanBatch._wrap(rb))
        assert exporter.stats()["invalid_utf8_replaced"] == 2
    finally:
        exporter.shutdown()


# -- datagram size ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 30_000), min_size=1, max_size=12),
       traces=st.integers(1, 4), max_packet=st.sampled_from([512, 1_500, 9_000, 65_000]))
def test_every_datagram_fits_and_every_span_is_accounted_for(agent, sizes, traces, max_packet):
    batch = knhk.SpanBatch.from_spans([
        knhk.Span(f"op{i}", trace_id=i % traces + 1, span_id=i + 1, start_time_ns=i,
                  duration_ns=1, attributes={"payload": "é" * (size // 2), "n": i},
                  events=[knhk.SpanEvent("e", i, {"blob": b"\x01" * (size // 3)})])
        for i, size in enumerate(sizes)])
    data, offsets, nspans, counters = jaeger_module._encode(batch, max_packet, 0)
    datagrams = [data[offsets[k]:offsets[k + 1]] for k in range(offsets.size - 1)]
    assert all(len(d) <= max_packet for d in datagrams)
    decoded = [decode(agent, d) for d in datagrams]
    n = sum(len(b.spans) for b in decoded)
    assert n == len(sizes) - counters["spans_dropped_too_large"] == int(nspans.sum())
    originals = {i + 1: "é" * (size // 2) for i, size in enumerate(sizes)}
    for b in decoded:
        for s in b.spans:
            payload = next(t.vStr for t in s.tags if t.key == "payload")
            assert originals[s.spanId].startswith(payload)  # cut, never altered


def test_one_huge_attribute_is_cut_and_counted(agent):
    big = "ü" * 100_000
    batch = knhk.SpanBatch.from_spans([
        knhk.Span("op", trace_id=1, span_id=1, start_time_ns=0, duration_ns=5,
                  attributes={"big": big, "small": "keep"})])
    exporter = JaegerExporter("127.0.0.1", _free_port())
    try:
        datagrams = encode_batch(batch)
        assert len(datagrams) == 1 and 60_000 < len(datagrams[0]) <= 65_000
        tags = {t.key: t.vStr for t in decode(agent, datagrams[0]).spans[0].tags}
        assert big.startswith(tags["big"]) and tags["small"] == "keep"
        exporter.export(batch)
        stats = exporter.stats()
        assert stats["spans_truncated"] == 1 and stats["values_truncated"] == 1
    finally:
        exporter.shutdown()


# -- UDP ----------------------------------------------------------------------------------


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def udp_agent():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65_535) for _ in range(count)]


def test_datagrams_arrive_over_loopback_udp(agent, udp_agent):
    batch = generate(1_500, WorkloadConfig(seed=9))
    exporter = JaegerExporter("127.0.0.1", udp_agent.getsockname()[1])
    try:
        assert exporter.export(batch) is ExportResult.SUCCESS
        stats = exporter.stats()
        got = receive(udp_agent, stats["datagrams_sent"])
        assert got == encode_batch(batch)
        assert stats["spans_sent"] == 1_500 and stats["bytes_sent"] == sum(map(len, got))
        check_round_trip(agent, batch, got)
        # seqNo continues across batches
        assert exporter.export(batch.slice(0, 10)) is ExportResult.SUCCESS
        (more,) = receive(udp_agent, 1)
        assert decode(agent, more).seqNo == stats["datagrams_sent"]
    finally:
        exporter.shutdown()


def test_pipeline_exports_to_the_agent(agent, udp_agent, pipeline_factory, make_span):
    exporter = JaegerExporter("127.0.0.1", udp_agent.getsockname()[1])
    pipeline = pipeline_factory(lambda b: b.with_exporter(exporter).with_batch_size(50))
    for i in range(1, 121):
        pipeline.record_span(make_span(i, service="checkout", attributes={"i": i}))
    assert pipeline.shutdown(timeout=5.0)
    stats = exporter.stats()
    batches = [decode(agent, d) for d in receive(udp_agent, stats["datagrams_sent"])]
    spans = [s for b in batches for s in b.spans]
    assert sorted(s.spanId for s in spans) == list(range(1, 121))
    assert {b.process.serviceName for b in batches} == {"checkout"}
    assert stats["spans_sent"] == 120 and stats["datagrams_failed"] == 0


def test_agent_not_listening_is_counted_not_raised():
    exporter = JaegerExporter("127.0.0.1", _free_port())
    batch = generate(200, WorkloadConfig(seed=2))
    results = []
    t0 = time.monotonic()
    try:
        for _ in range(5):
            results.append(exporter.export(batch))
            time.sleep(0.02)  # lets the ICMP port-unreachable come back
        elapsed = time.monotonic() - t0
        stats = exporter.stats()
    finally:
        exporter.shutdown()
    assert elapsed < 2.0
    assert stats["send_errors"].get("ECONNREFUSED", 0) >= 1
    assert ExportResult.FAILURE in results
    assert stats["datagrams_failed"] >= 1 and stats["spans_failed"] >= 1
    assert stats["spans_sent"] + stats["spans_failed"] == 5 * 200


# -- API ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"max_packet_size": 100}, "max_packet_size must be between"),
    ({"max_packet_size": 70_000}, "max_packet_size must be between"),
    ({"port": 0}, "port"), ({"host": ""}, "host"), ({"queue_size": 0}, "queue_size"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JaegerExporter(**kwargs)
    with pytest.raises(TypeError, match="max_packet_size must be an int"):
        JaegerExporter(max_packet_size=1e4)


def test_after_shutdown_exports_fail_and_metric_batches_are_ignored():
    exporter = JaegerExporter("127.0.0.1", _free_port())
    metrics = knhk.MetricBatch(pa.RecordBatch.from_pylist([], schema=METRIC_SCHEMA))
    assert exporter.export(metrics) is ExportResult.SUCCESS
    assert exporter.export([1, 2]) is ExportResult.FAILURE  # not a batch: counted, not raised
    assert exporter.stats()["send_errors"] == {"unsupported_batch": 1}
    exporter.shutdown()
    batch = knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=1)])
    assert exporter.export(batch) is ExportResult.FAILURE
    stats = exporter.stats()
    assert stats["spans_failed"] == 1
    assert stats["send_errors"] == {"unsupported_batch": 1, "shutdown": 1}
    assert stats["metric_batches_ignored"] == 1


def test_a_slice_encodes_as_the_same_rows_built_afresh():
    spans = [knhk.Span(f"op{i}", trace_id=i % 3 + 1, span_id=i + 1, start_time_ns=i,
                       duration_ns=5, attributes={"i": i, "arr": [i]},
                       events=[knhk.SpanEvent(f"e{i}", i, {"x": i})],
                       links=[knhk.SpanLink(i + 100, i + 200)],
                       resource_attributes={"r": i % 2}) for i in range(10)]
    batch = knhk.SpanBatch.from_spans(spans)
    fresh = encode_batch(knhk.SpanBatch.from_spans(spans[3:8]))
    assert encode_batch(batch.slice(3, 5)) == fresh
    assert encode_batch(batch.take(pa.array([3, 4, 5, 6, 7]))) == fresh
    assert encode_batch(batch.slice(3, 5).record_batch) == fresh
