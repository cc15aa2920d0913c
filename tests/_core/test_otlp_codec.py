"""The OTLP trace codec against opentelemetry-proto's own parser and serializer.

Requests are generated with hypothesis as opentelemetry-proto messages,
serialized by protobuf, decoded by knhk, re-encoded by knhk and parsed back by
protobuf: the message must come back equal. Fields are also read one by one
from the protobuf objects and compared with the decoded columns, so a fault
shared by knhk's encoder and decoder cannot hide.
"""

from __future__ import annotations

import contextlib
import gzip
import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

import knhk
from knhk import _attributes
from knhk.otlp import OtlpDecodeError, decode_traces, encode_traces
from knhk.workload import WorkloadConfig, generate

# -- strategies ----------------------------------------------------------------------

_text = st.text(max_size=12)
_i64 = st.integers(-(2**63), 2**63 - 1)
_u32 = st.integers(0, 2**32 - 1)
_double = st.floats(allow_nan=False)


def _scalar_any() -> st.SearchStrategy[AnyValue]:
    return st.one_of(
        _text.map(lambda v: AnyValue(string_value=v)),
        st.booleans().map(lambda v: AnyValue(bool_value=v)),
        _i64.map(lambda v: AnyValue(int_value=v)),
        _double.map(lambda v: AnyValue(double_value=v)),
        st.binary(max_size=8).map(lambda v: AnyValue(bytes_value=v)),
        st.just(AnyValue()),
    )


def _array(values: list[AnyValue]) -> AnyValue:
    out = AnyValue()
    out.array_value.SetInParent()
    out.array_value.values.extend(values)
    return out


def _kvlist(items: list[tuple[str, AnyValue]]) -> AnyValue:
    out = AnyValue()
    out.kvlist_value.SetInParent()
    out.kvlist_value.values.extend(KeyValue(key=k, value=v) for k, v in items)
    return out


any_values = st.recursive(
    _scalar_any(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(_array),
        st.lists(st.tuples(_text, inner), max_size=3).map(_kvlist),
    ),
    max_leaves=8,
)
key_values = st.lists(st.tuples(_text, any_values), max_size=4).map(
    lambda kvs: [KeyValue(key=k, value=v) for k, v in kvs])
ids16 = st.binary(min_size=16, max_size=16)
ids8 = st.binary(min_size=8, max_size=8)


@st.composite
def spans(draw) -> Span:
    s = Span(
        trace_id=draw(ids16), span_id=draw(ids8),
        trace_state=draw(st.sampled_from(["", "k=v", "a=1,b=2"])),
        parent_span_id=draw(st.one_of(st.just(b""), ids8)),
        name=draw(st.one_of(_text, st.text(min_size=200, max_size=400))),
        kind=draw(st.integers(0, 5)),
        start_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
        end_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
        dropped_attributes_count=draw(_u32), dropped_events_count=draw(_u32),
        dropped_links_count=draw(_u32), flags=draw(_u32),
        status=Status(code=draw(st.integers(0, 2)), message=draw(_text)),
    )
    s.attributes.extend(draw(key_values))
    for _ in range(draw(st.integers(0, 2))):
        ev = s.events.add(time_unix_nano=draw(st.integers(0, 2**64 - 1)), name=draw(_text),
                          dropped_attributes_count=draw(_u32))
        ev.attributes.extend(draw(key_values))
    for _ in range(draw(st.integers(0, 2))):
        ln = s.links.add(trace_id=draw(ids16), span_id=draw(ids8),
                         trace_state=draw(st.sampled_from(["", "x=y"])), flags=draw(_u32),
                         dropped_attributes_count=draw(_u32))
        ln.attributes.extend(draw(key_values))
    return s


@st.composite
def requests(draw) -> ExportTraceServiceRequest:
    """A request whose consecutive resources and scopes differ (so none merge)."""
    req = ExportTraceServiceRequest()
    for r in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add(schema_url=draw(st.sampled_from(["", "https://r"])))
        rs.resource.SetInParent()
        rs.resource.attributes.add(key="rid", value=AnyValue(int_value=r))
        rs.resource.attributes.extend(draw(key_values))
        rs.resource.dropped_attributes_count = draw(_u32)
        for j in range(draw(st.integers(1, 3))):
            ss = rs.scope_spans.add(schema_url=draw(st.sampled_from(["", "https://s"])))
            ss.scope.SetInParent()
            ss.scope.name = f"scope{j}"
            ss.scope.version = draw(_text)
            ss.scope.attributes.extend(draw(key_values))
            ss.scope.dropped_attributes_count = draw(_u32)
            ss.spans.extend(draw(st.lists(spans(), min_size=1, max_size=3)))
    return req


def _parse(wire: bytes) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    out.ParseFromString(wire)
    return out


# -- reading the protobuf objects field by field ---------------------------------------


def _py_any(v: AnyValue):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_py_any(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _py_any(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _py_attrs(kvs) -> list:
    return [(kv.key, _py_any(kv.value)) for kv in kvs]


def _row_attrs(rows) -> list:
    return [(r["key"], _attributes.attribute_value(r)) for r in rows]


def _signed(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def _expected_rows(req: ExportTraceServiceRequest) -> list[dict]:
    rows = []
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                rows.append({
                    "trace_id": s.trace_id, "span_id": s.span_id,
                    "parent_span_id": s.parent_span_id or None,
                    "trace_state": s.trace_state or None, "flags": s.flags, "name": s.name,
                    "kind": s.kind, "start_time_ns": _signed(s.start_time_unix_nano),
                    "end_time_ns": _signed(s.end_time_unix_nano),
                    "status_code": s.status.code, "status_message": s.status.message or None,
                    "attributes": _py_attrs(s.attributes),
                    "dropped_attributes_count": s.dropped_attributes_count,
                    "events": [(_signed(e.time_unix_nano), e.name, _py_attrs(e.attributes),
                                e.dropped_attributes_count) for e in s.events],
                    "dropped_events_count": s.dropped_events_count,
                    "links": [(ln.trace_id, ln.span_id, ln.trace_state or None, ln.flags,
                               _py_attrs(ln.attributes), ln.dropped_attributes_count)
                              for ln in s.links],
                    "dropped_links_count": s.dropped_links_count,
                    "resource_attributes": _py_attrs(rs.resource.attributes),
                    "resource_dropped_attributes_count": rs.resource.dropped_attributes_count,
                    "resource_schema_url": rs.schema_url or None,
                    "scope_name": ss.scope.name or None,
                    "scope_version": ss.scope.version or None,
                    "scope_attributes": _py_attrs(ss.scope.attributes),
                    "scope_dropped_attributes_count": ss.scope.dropped_attributes_count,
                    "scope_schema_url": ss.schema_url or None,
                })
    return rows


def _actual_rows(batch: knhk.SpanBatch) -> list[dict]:
    out = []
    for r in batch.to_pylist():
        r = dict(r)
        del r["service"]
        for k in ("attributes", "resource_attributes", "scope_attributes"):
            r[k] = _row_attrs(r[k])
        r["events"] = [(e["time_unix_nano"], e["name"], _row_attrs(e["attributes"]),
                        e["dropped_attributes_count"]) for e in r["events"]]
        r["links"] = [(ln["trace_id"], ln["span_id"], ln["trace_state"], ln["flags"],
                       _row_attrs(ln["attributes"]), ln["dropped_attributes_count"])
                      for ln in r["links"]]
        out.append(r)
    return out


def _same(a, b) -> bool:
    """Equality that tells -0.0 from 0.0 and 1 from True (attribute values keep types)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


# -- round trips ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_decode_reads_every_field_as_protobuf_does(req):
    batch = decode_traces(req.SerializeToString())
    assert batch.schema.equals(knhk.SPAN_SCHEMA)
    # the arrays are built from raw buffers: Arrow's full validation must accept them
    batch.record_batch.validate(full=True)
    expected, actual = _expected_rows(req), _actual_rows(batch)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert want.keys() == got.keys()
        for key in want:
            assert _same(got[key], want[key]), key


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_decode_encode_gives_back_the_same_message(req):
    wire = req.SerializeToString()
    batch = decode_traces(wire)
    again = encode_traces(batch)
    assert _parse(again) == req
    assert decode_traces(again).equals(batch)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_a_slice_encodes_exactly_its_rows(req, data):
    batch = decode_traces(req.SerializeToString())
    start = data.draw(st.integers(0, batch.num_rows))
    part = batch.slice(start, data.draw(st.integers(0, batch.num_rows - start)))
    # columns at non-zero offsets, nested lists whose child ranges start mid-array
    back = decode_traces(encode_traces(part))
    assert _actual_rows(back) == _actual_rows(part)
    assert back.column("service").to_pylist() == part.column("service").to_pylist()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12) | st.text(max_size=6).map(str.encode))
def test_utf8_check_agrees_with_python(raw):
    span = _ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(5, raw)
    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError:
        expected = None
    try:
        got = decode_traces(_ld(1, _ld(2, _ld(2, span)))).column("name").to_pylist()[0]
    except OtlpDecodeError as exc:
        assert "not valid UTF-8" in str(exc)
        got = None
    assert got == expected


def test_service_comes_from_the_resource():
    req = ExportTraceServiceRequest()
    for name in ("checkout", None):
        rs = req.resource_spans.add()
        if name:
            rs.resource.attributes.add(key="service.name", value=AnyValue(string_value=name))
        rs.scope_spans.add().spans.add(trace_id=b"t" * 16, span_id=b"s" * 8, name="x")
    batch = decode_traces(req.SerializeToString(), default_service="fallback")
    assert batch.column("service").to_pylist() == ["checkout", "fallback"]


def test_workload_batches_round_trip_through_protobuf():
    batch = generate(300, WorkloadConfig(seed=7))
    wire = encode_traces(batch)
    parsed = _parse(wire)
    assert sum(len(ss.spans) for rs in parsed.resource_spans for ss in rs.scope_spans) == 300
    back = decode_traces(wire)
    assert back.equals(batch) or back.to_pylist() == batch.to_pylist()
    # a slice encodes only its rows
    part = batch.slice(100, 50)
    assert decode_traces(encode_traces(part)).to_pylist() == part.to_pylist()


def test_unknown_fields_are_skipped():
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"t" * 16, span_id=b"s" * 8, name="known")
    del span
    wire = req.SerializeToString()
    # field 99 (varint), field 98 (fixed64), field 97 (bytes) at the request level
    extra = b"\x98\x06\x05" + b"\x91\x06" + b"\x00" * 8 + b"\x8a\x06\x02hi"
    assert decode_traces(extra + wire + extra).column("name").to_pylist() == ["known"]


# -- bad input ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_a_clear_error(data):
    try:
        decode_traces(data)
    except OtlpDecodeError as exc:
        assert "malformed ExportTraceServiceRequest" in str(exc)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_truncated_and_corrupted_requests_never_crash(req, data):
    wire = req.SerializeToString()
    if not wire:
        return
    cut = data.draw(st.integers(0, len(wire) - 1))
    at = data.draw(st.integers(0, len(wire) - 1))
    flipped = bytearray(wire)
    flipped[at] ^= data.draw(st.integers(1, 255))
    for bad in (wire[:cut], bytes(flipped)):
        with contextlib.suppress(OtlpDecodeError):
            decode_traces(bad)


def _ld(field: int, payload: bytes) -> bytes:
    return _attributes._ld(field, payload)


def _one_attr_request(any_value: bytes) -> bytes:
    kv = _ld(1, b"k") + _ld(2, any_value)
    span = _ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(9, kv)
    return _ld(1, _ld(2, _ld(2, span)))


def test_nesting_10000_deep_is_refused():
    value = b""
    for _ in range(10_000):
        value = _ld(5, _ld(1, value))  # AnyValue{array_value{values: [value]}}
    with pytest.raises(OtlpDecodeError, match="nests arrays / kvlists deeper than 32"):
        decode_traces(_one_attr_request(value))
    shallow = _ld(5, _ld(1, _ld(5, b"")))
    assert decode_traces(_one_attr_request(shallow)).attribute("k").to_pylist() == [[[]]]


@pytest.mark.parametrize(("wire", "message"), [
    (b"\x0a\xff\xff\xff\xff\x0f", "runs past the end"),          # a 4 GiB length
    (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "runs past the end"),  # "negative"
    (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
    (b"\x0b", "unsupported wire type"),                            # a group start
    (b"\x0e", "unsupported wire type"),                            # wire type 6
    (b"\x00", "invalid field number"),
])
def test_malformed_framing_is_named(wire, message):
    with pytest.raises(OtlpDecodeError, match=message):
        decode_traces(wire)


@pytest.mark.parametrize(("span", "message"), [
    (_ld(1, b"t" * 15) + _ld(2, b"s" * 8), "trace_id must be 16 bytes"),
    (_ld(1, b"t" * 16), "span_id must be 8 bytes"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(4, b"p"), "parent_span_id"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(5, b"\xff\xfe"),
     r"not valid UTF-8 \(in Span.name"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(15, _ld(2, b"\xc0\x80")),  # overlong NUL
     r"not valid UTF-8 \(in Status.message"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(9, _ld(1, b"\xed\xa0\x80")),  # a surrogate
     r"attribute key is not valid UTF-8 \(in Span.attributes"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(9, _ld(1, b"k") + _ld(2, _ld(1, b"\xf4\x90"))),
     r"string value is not valid UTF-8 \(in Span.attributes"),
    (_ld(1, b"t" * 16) + _ld(2, b"s" * 8) + _ld(11, _ld(2, b"ok\x80")),
     r"not valid UTF-8 \(in Span.Event.name"),
])
def test_invalid_spans_are_named(span, message):
    with pytest.raises(OtlpDecodeError, match=message):
        decode_traces(_ld(1, _ld(2, _ld(2, span))))


def test_a_gzip_payload_is_not_mistaken_for_protobuf():
    with pytest.raises(OtlpDecodeError):
        decode_traces(gzip.compress(b"\x0a\x00" * 100))


def test_empty_request_is_an_empty_batch():
    assert decode_traces(b"").num_rows == 0
    assert decode_traces(ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans()])]).SerializeToString()
    ).num_rows == 0
    assert encode_traces(knhk.SpanBatch.empty()) == b""


def test_decoded_buffers_do_not_alias_the_request():
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(trace_id=b"t" * 16, span_id=b"s" * 8,
                                                        name="n")
    wire = bytearray(req.SerializeToString())
    batch = decode_traces(wire)
    wire[:] = b"\x00" * len(wire)
    assert batch.column("name").to_pylist() == ["n"]
    assert batch.column("trace_id").to_pylist() == [b"t" * 16]
    assert isinstance(batch.record_batch, pa.RecordBatch)
    assert np.asarray(batch.column("kind")).tolist() == [0]


def test_a_service_without_resource_gets_service_name_on_the_wire():
    batch = knhk.SpanBatch.from_spans([
        knhk.Span("a", trace_id=1, span_id=2, service="checkout"),
        knhk.Span("b", trace_id=1, span_id=3)])
    parsed = _parse(encode_traces(batch))
    resources = [_py_attrs(rs.resource.attributes) for rs in parsed.resource_spans]
    assert resources == [[("service.name", "checkout")], []]
    assert decode_traces(encode_traces(batch)).column("service").to_pylist() == [
        "checkout", "unknown_service"]


def test_threads_decode_and_encode_at_once_with_the_gil_released():
    from concurrent.futures import ThreadPoolExecutor

    batches = [generate(200, WorkloadConfig(seed=s)) for s in range(4)]
    wires = [encode_traces(b) for b in batches]
    expected = [decode_traces(w) for w in wires]
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(decode_traces, wires * 5))
        encoded = list(pool.map(encode_traces, decoded))
    assert all(d.equals(expected[i % 4]) for i, d in enumerate(decoded))
    assert encoded == wires * 5
