"""The span and metric Arrow schemas: the columns issue 2 and DESIGN.md list.

Expected types are written out here from the design, not read from knhk.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import knhk
from knhk import METRIC_SCHEMA, SPAN_SCHEMA, AttrType, MetricKind, SpanKind, SpanStatus, Temporality

DICT = pa.dictionary(pa.int32(), pa.string())


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


@pytest.mark.parametrize(("name", "type_", "nullable"), [
    ("trace_id", pa.binary(16), False),
    ("span_id", pa.binary(8), False),
    ("parent_span_id", pa.binary(8), True),
    ("kind", pa.int8(), False),
    ("start_time_ns", pa.int64(), False),
    ("end_time_ns", pa.int64(), False),
    ("status_code", pa.int8(), False),
    ("status_message", pa.string(), True),
    ("flags", pa.uint32(), False),
    ("dropped_attributes_count", pa.uint32(), False),
    ("dropped_events_count", pa.uint32(), False),
    ("dropped_links_count", pa.uint32(), False),
])
def test_span_columns_with_fixed_types(name, type_, nullable):
    f = SPAN_SCHEMA.field(name)
    assert f.type == type_
    assert f.nullable is nullable


@pytest.mark.parametrize("name", ["name", "service", "trace_state", "scope_name",
                                  "scope_version"])
def test_span_string_columns_are_dictionary_encoded(name):
    t = SPAN_SCHEMA.field(name).type
    assert pa.types.is_dictionary(t) and pa.types.is_integer(t.index_type)
    assert t.value_type == pa.string()


@pytest.mark.parametrize("name", ["attributes", "resource_attributes", "scope_attributes"])
def test_span_attribute_columns_are_typed(name):
    t = SPAN_SCHEMA.field(name).type
    assert pa.types.is_list(t)
    item = t.value_type
    assert pa.types.is_struct(item)
    children = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    assert _value_type(children["key"]) == pa.string()
    assert children["type"] == pa.int8()
    # One typed child per OTLP scalar, and a container for arrays / kvlists.
    assert _value_type(children["str"]) == pa.string()
    assert children["int"] == pa.int64()
    assert children["double"] == pa.float64()
    assert children["bool"] == pa.bool_()
    assert children["bytes"] == pa.binary()
    assert "any" in children


def test_span_events_and_links_carry_what_otlp_has():
    ev = SPAN_SCHEMA.field("events").type.value_type
    ev_fields = {ev.field(i).name: ev.field(i).type for i in range(ev.num_fields)}
    assert ev_fields["time_unix_nano"] == pa.int64()
    assert _value_type(ev_fields["name"]) == pa.string()
    assert ev_fields["attributes"] == SPAN_SCHEMA.field("attributes").type
    assert "dropped_attributes_count" in ev_fields
    ln = SPAN_SCHEMA.field("links").type.value_type
    ln_fields = {ln.field(i).name: ln.field(i).type for i in range(ln.num_fields)}
    assert ln_fields["trace_id"] == pa.binary(16)
    assert ln_fields["span_id"] == pa.binary(8)
    for name in ("trace_state", "flags", "attributes", "dropped_attributes_count"):
        assert name in ln_fields


def test_span_schema_has_resource_and_scope_columns():
    names = set(SPAN_SCHEMA.names)
    assert {"resource_attributes", "resource_dropped_attributes_count", "resource_schema_url",
            "scope_name", "scope_version", "scope_attributes",
            "scope_dropped_attributes_count", "scope_schema_url"} <= names


@pytest.mark.parametrize(("schema", "signal"), [(SPAN_SCHEMA, "spans"),
                                                (METRIC_SCHEMA, "metrics")])
def test_schema_version_is_in_the_metadata(schema, signal):
    meta = schema.metadata
    version = meta[b"knhk.schema"].decode()
    assert version.startswith(f"{signal}/")
    assert int(version.split("/")[1]) >= 1
    assert meta[b"knhk.signal"].decode() == signal


def test_sealed_batches_and_ipc_keep_the_metadata():
    import io

    batch = knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=1)])
    assert batch.schema.metadata == SPAN_SCHEMA.metadata
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch.record_batch)
    back = pa.ipc.open_file(pa.BufferReader(sink.getvalue())).schema
    assert back.metadata[b"knhk.schema"] == SPAN_SCHEMA.metadata[b"knhk.schema"]


@pytest.mark.parametrize(("name", "check"), [
    ("name", lambda t: _value_type(t) == pa.string()),
    ("description", lambda t: _value_type(t) == pa.string()),
    ("unit", lambda t: _value_type(t) == pa.string()),
    ("kind", pa.types.is_integer),
    ("temporality", pa.types.is_integer),
    ("monotonic", pa.types.is_boolean),
    ("start_time_ns", lambda t: t == pa.int64()),
    ("time_ns", lambda t: t == pa.int64()),
    ("value", pa.types.is_floating),
    ("bounds", lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type)),
    ("bucket_counts", lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type)),
    ("attributes", lambda t: t == SPAN_SCHEMA.field("attributes").type),
    ("service", lambda t: _value_type(t) == pa.string()),
])
def test_metric_columns(name, check):
    assert check(METRIC_SCHEMA.field(name).type), METRIC_SCHEMA.field(name)


def test_enums_use_otlp_numbering():
    assert [int(k) for k in (SpanKind.UNSPECIFIED, SpanKind.INTERNAL, SpanKind.SERVER,
                             SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)] == \
        list(range(6))
    assert (int(SpanStatus.UNSET), int(SpanStatus.OK), int(SpanStatus.ERROR)) == (0, 1, 2)
    # AnyValue oneof field numbers: string 1, bool 2, int 3, double 4, array 5, kvlist 6,
    # bytes 7.
    assert [int(AttrType[n]) for n in ("STRING", "BOOL", "INT", "DOUBLE", "ARRAY", "KVLIST",
                                      "BYTES")] == list(range(1, 8))
    assert (int(Temporality.DELTA), int(Temporality.CUMULATIVE)) == (1, 2)
    assert {MetricKind.COUNTER, MetricKind.UP_DOWN_COUNTER, MetricKind.GAUGE,
            MetricKind.HISTOGRAM} == set(MetricKind)


def test_otlp_span_fields_all_have_a_column():
    # Every field of OTLP's Span message (opentelemetry-proto) must have somewhere to go.
    from opentelemetry.proto.trace.v1 import trace_pb2

    otlp = {f.name for f in trace_pb2.Span.DESCRIPTOR.fields}
    mapped = {"start_time_unix_nano": "start_time_ns", "end_time_unix_nano": "end_time_ns",
              "status": "status_code"}
    missing = {f for f in otlp if mapped.get(f, f) not in SPAN_SCHEMA.names}
    assert not missing, f"OTLP Span fields without a column: {sorted(missing)}"
