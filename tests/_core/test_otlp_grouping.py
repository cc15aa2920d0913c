"""How the OTLP encoders group neighbouring rows into one ResourceSpans / ScopeSpans / Metric.

The encoders compare dictionary columns by index first (one entry on both rows
is the same string) and by bytes otherwise; these cases pin what that must
still honour: a null row is not the string its index happens to point at, and
two dictionary entries holding the same string are equal. Expected groupings
follow from the protobuf messages written by hand; the encoded bytes are read
back with opentelemetry-proto.
"""

from __future__ import annotations

import pyarrow as pa
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from knhk.otlp import decode_metrics, decode_traces, encode_metrics, encode_traces


def _spans(n: int) -> pa.RecordBatch:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(trace_id=bytes([1]) * 16, span_id=bytes([i + 1]) * 8, name=f"s{i}")
    return decode_traces(req.SerializeToString()).record_batch


def _with(rb: pa.RecordBatch, name: str, column: pa.Array) -> pa.RecordBatch:
    i = rb.schema.get_field_index(name)
    return rb.set_column(i, rb.schema.field(i), column)


def _scopes(wire: bytes) -> list[tuple[str, list[str]]]:
    req = ExportTraceServiceRequest.FromString(wire)
    return [(ss.scope.name, [s.name for s in ss.spans])
            for rs in req.resource_spans for ss in rs.scope_spans]


def test_a_null_row_is_not_grouped_with_the_entry_its_index_points_at():
    names = pa.DictionaryArray.from_arrays(
        pa.array([0, 0, 0], pa.int32(), mask=pa.array([False, True, False])),
        pa.array(["lib"]))
    wire = encode_traces(_with(_spans(3), "scope_name", names))
    assert _scopes(wire) == [("lib", ["s0"]), ("", ["s1"]), ("lib", ["s2"])]


def test_two_entries_with_the_same_string_are_one_scope():
    names = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2], pa.int32()),
                                           pa.array(["lib", "lib", "other"]))
    wire = encode_traces(_with(_spans(3), "scope_name", names))
    assert _scopes(wire) == [("lib", ["s0", "s1"]), ("other", ["s2"])]


def test_a_null_and_an_empty_string_are_the_same_absent_field():
    # protobuf cannot tell them apart: both are an InstrumentationScope without a name
    names = pa.DictionaryArray.from_arrays(
        pa.array([0, 1], pa.int32(), mask=pa.array([False, True])), pa.array(["", "x"]))
    wire = encode_traces(_with(_spans(2), "scope_name", names))
    assert _scopes(wire) == [("", ["s0", "s1"])]


def test_resource_attribute_keys_compare_by_string_not_by_index():
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="host.name").value.string_value = "h"
    for i in range(2):
        rs.scope_spans.add().spans.add(trace_id=bytes([1]) * 16, span_id=bytes([i + 1]) * 8,
                                       name=f"s{i}")
    rb = decode_traces(req.SerializeToString()).record_batch
    col = rb.column(rb.schema.get_field_index("resource_attributes"))
    assert col.value_lengths().to_pylist() == [1, 1]
    item = col.values
    # the same key through two dictionary entries, one per row
    split = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()),
                                           pa.array(["host.name", "host.name"]))
    fields = [split if f.name == "key" else item.field(f.name) for f in item.type]
    col = pa.ListArray.from_arrays(col.offsets, pa.StructArray.from_arrays(
        fields, fields=list(item.type)), type=col.type)
    back = ExportTraceServiceRequest.FromString(
        encode_traces(_with(rb, "resource_attributes", col)))
    assert len(back.resource_spans) == 1
    assert [[s.name for s in ss.spans] for ss in back.resource_spans[0].scope_spans] \
        == [["s0", "s1"]]


def test_metric_rows_split_on_a_null_name_unit():
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m", unit="ms")
    for t in (1, 2, 3):
        m.gauge.data_points.add(as_double=float(t), time_unix_nano=t)
    rb = decode_metrics(req.SerializeToString()).record_batch
    units = pa.DictionaryArray.from_arrays(
        pa.array([0, 0, 0], pa.int32(), mask=pa.array([False, True, False])),
        pa.array(["ms"]))
    i = rb.schema.get_field_index("unit")
    rb = rb.set_column(i, rb.schema.field(i), units)
    back = ExportMetricsServiceRequest.FromString(encode_metrics(rb))
    metrics = [mm for rm in back.resource_metrics for sm in rm.scope_metrics
               for mm in sm.metrics]
    assert [(mm.unit, [p.time_unix_nano for p in mm.gauge.data_points]) for mm in metrics] \
        == [("ms", [1]), ("", [2]), ("ms", [3])]
