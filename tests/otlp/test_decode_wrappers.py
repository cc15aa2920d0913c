"""The argument checks and error translation every OTLP protobuf decoder shares."""

from __future__ import annotations

import pytest

from knhk.otlp import OtlpDecodeError, decode_traces
from knhk.otlp.metrics import decode_metrics, decode_metrics_counted

DECODERS = [decode_traces, decode_metrics, decode_metrics_counted]
REQUEST = {decode_traces: "ExportTraceServiceRequest",
           decode_metrics: "ExportMetricsServiceRequest",
           decode_metrics_counted: "ExportMetricsServiceRequest"}


@pytest.mark.parametrize("decode", DECODERS)
def test_a_truncated_field_is_one_worded_error_with_its_offset(decode):
    # 0x0a = field 1, length-delimited; its length (5, at byte 1) claims more
    # bytes than the one that follows.
    with pytest.raises(OtlpDecodeError) as info:
        decode(b"\x0a\x05\x12")
    assert info.value.offset == 1
    assert REQUEST[decode] in str(info.value)
    assert isinstance(info.value, ValueError)
    # translated, not chained: the traceback shows the wrapper's error only
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("data", [bytes([0x0a, 0x00]), bytearray([0x0a, 0x00]),
                                  memoryview(bytes([0x0a, 0x00]))])
def test_every_bytes_like_is_accepted(decode, data):
    # one empty ResourceSpans / ResourceMetrics: a valid request with no rows
    result = decode(data)
    batch = result[0] if isinstance(result, tuple) else result
    assert batch.num_rows == 0


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("data", ["\x0a\x00", 10, None, [10, 0]])
def test_data_that_is_not_bytes_like_is_named(decode, data):
    with pytest.raises(TypeError, match=f"data must be bytes.*got {type(data).__name__}"):
        decode(data)


@pytest.mark.parametrize("decode", DECODERS)
def test_a_default_service_that_is_not_a_str_is_named(decode):
    with pytest.raises(TypeError, match="default_service must be a str, got bytes"):
        decode(b"", default_service=b"svc")


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("max_depth", [-1, 1001, 2.0, True, "3"])
def test_a_bad_max_depth_is_refused_before_decoding(decode, max_depth):
    with pytest.raises(ValueError, match="max_depth must be an int between 0 and 1000"):
        decode(b"\x0a\x05\x12", max_depth=max_depth)


@pytest.mark.parametrize(("names", "expected"), [
    (["a", "b"], "b"), (["", "b"], "b"), (["a", ""], "unknown_service"), ([], "unknown_service"),
])
def test_traces_and_metrics_take_a_resources_service_by_the_same_rule(names, expected):
    """Several service.name attributes on one resource (invalid, but seen): the last one
    wins for spans and metric points alike; an empty last one means the default."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    traces, metrics = ExportTraceServiceRequest(), ExportMetricsServiceRequest()
    rs, rm = traces.resource_spans.add(), metrics.resource_metrics.add()
    for name in names:
        rs.resource.attributes.add(key="service.name").value.string_value = name
        rm.resource.attributes.add(key="service.name").value.string_value = name
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "op"
    metric = rm.scope_metrics.add().metrics.add()
    metric.name = "g"
    metric.gauge.data_points.add().as_int = 1
    assert decode_traces(traces.SerializeToString()).column("service").to_pylist() == [expected]
    assert decode_metrics(metrics.SerializeToString()).column("service").to_pylist() == [
        expected]
