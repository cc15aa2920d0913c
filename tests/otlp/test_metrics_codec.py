"""knhk.otlp.metrics against opentelemetry-proto: decode -> encode -> parse keeps the meaning."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

import knhk
from knhk.otlp import OtlpDecodeError, decode_metrics, encode_metrics
from knhk.otlp.metrics import (
    decode_metrics_counted,
    decode_metrics_json,
    encode_metrics_json,
)

# -- generated requests -----------------------------------------------------------------

_INT64 = st.integers(-(2**63), 2**63 - 1)
_DOUBLE = st.floats(allow_nan=False)
_scalar = st.one_of(
    st.tuples(st.just("string_value"), st.text(max_size=8)),
    st.tuples(st.just("bool_value"), st.booleans()),
    st.tuples(st.just("int_value"), _INT64),
    st.tuples(st.just("double_value"), _DOUBLE),
    st.tuples(st.just("bytes_value"), st.binary(max_size=8)),
    st.just(("empty", None)),
)
_any = st.recursive(_scalar, lambda inner: st.one_of(
    st.tuples(st.just("array_value"), st.lists(inner, max_size=3)),
    st.tuples(st.just("kvlist_value"), st.lists(st.tuples(st.text(max_size=4), inner),
                                                max_size=3))), max_leaves=6)
_attrs = st.lists(st.tuples(st.text(max_size=6), _any), max_size=4)


def _set_any(target, value) -> None:
    kind, v = value
    if kind == "array_value":
        target.array_value.SetInParent()
        for item in v:
            _set_any(target.array_value.values.add(), item)
    elif kind == "kvlist_value":
        target.kvlist_value.SetInParent()
        for k, item in v:
            _set_any(target.kvlist_value.values.add(key=k).value, item)
    elif kind != "empty":
        setattr(target, kind, v)


def _set_attrs(target, attrs) -> None:
    for k, v in attrs:
        _set_any(target.add(key=k).value, v)


_times = st.tuples(st.integers(0, 2**62), st.integers(0, 2**62))
_number_point = st.fixed_dictionaries({
    "attrs": _attrs, "times": _times, "flags": st.integers(0, 1),
    "value": st.one_of(st.tuples(st.just("as_int"), _INT64),
                       st.tuples(st.just("as_double"), _DOUBLE), st.just(None)),
})


@st.composite
def _histogram_point(draw):
    bounds = sorted(set(draw(st.lists(st.floats(-1e6, 1e6), max_size=4))))
    counts = draw(st.lists(st.integers(0, 2**40), min_size=len(bounds) + 1,
                           max_size=len(bounds) + 1)) if draw(st.booleans()) else []
    return {"attrs": draw(_attrs), "times": draw(_times), "flags": draw(st.integers(0, 1)),
            "bounds": bounds if counts else [], "counts": counts,
            "count": sum(counts) if counts else draw(st.integers(0, 2**40)),
            "sum": draw(st.none() | _DOUBLE), "min": draw(st.none() | _DOUBLE),
            "max": draw(st.none() | _DOUBLE)}


_metric = st.one_of(
    st.fixed_dictionaries({"type": st.just("gauge"),
                           "points": st.lists(_number_point, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("sum"), "mono": st.booleans(),
                           "temp": st.sampled_from([1, 2]),
                           "points": st.lists(_number_point, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("histogram"), "temp": st.sampled_from([1, 2]),
                           "points": st.lists(_histogram_point(), min_size=1, max_size=3)}),
)


@st.composite
def requests(draw) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        rm = req.resource_metrics.add()
        res_attrs = draw(_attrs)
        if draw(st.booleans()):
            res_attrs = [("service.name", ("string_value", draw(st.text(min_size=1,
                                                                         max_size=6)))),
                         *res_attrs]
        _set_attrs(rm.resource.attributes, res_attrs)
        for _ in range(draw(st.integers(1, 2))):
            sm = rm.scope_metrics.add()
            sm.scope.name = draw(st.text(max_size=5))
            sm.scope.version = draw(st.text(max_size=3))
            for m in draw(st.lists(_metric, min_size=1, max_size=3)):
                metric = sm.metrics.add(name=draw(st.text(min_size=1, max_size=6)),
                                        description=draw(st.text(max_size=4)),
                                        unit=draw(st.sampled_from(["", "ms", "By", "1"])))
                data = getattr(metric, m["type"])
                data.SetInParent()
                if m["type"] == "sum":
                    data.is_monotonic = m["mono"]
                if m["type"] != "gauge":
                    data.aggregation_temporality = m["temp"]
                for pt in m["points"]:
                    start, t = sorted(pt["times"])
                    p = data.data_points.add(start_time_unix_nano=start, time_unix_nano=t,
                                             flags=pt["flags"])
                    _set_attrs(p.attributes, pt["attrs"])
                    if m["type"] == "histogram":
                        p.count = pt["count"]
                        p.explicit_bounds.extend(pt["bounds"])
                        p.bucket_counts.extend(pt["counts"])
                        for f in ("sum", "min", "max"):
                            if pt[f] is not None:
                                setattr(p, f, pt[f])
                    elif pt["value"] is not None:
                        setattr(p, *pt["value"])
    return req


# -- the meaning of a request, independent of grouping ------------------------------------


def _any_py(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return ("array", [_any_py(x) for x in v.array_value.values])
    if kind == "kvlist_value":
        return ("kvlist", [(kv.key, _any_py(kv.value)) for kv in v.kvlist_value.values])
    return (kind, None if kind is None else getattr(v, kind))


def _kv(kvs) -> list:
    return [(kv.key, _any_py(kv.value)) for kv in kvs]


def points(req: ExportMetricsServiceRequest) -> list[tuple]:
    """Every data point with everything METRIC_SCHEMA keeps about it, in wire order."""
    out = []
    for rm in req.resource_metrics:
        res = _kv(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                shape = (kind, getattr(data, "is_monotonic", None),
                         getattr(data, "aggregation_temporality", None))
                for p in data.data_points:
                    if kind == "histogram":
                        value = (p.count, list(p.explicit_bounds), list(p.bucket_counts),
                                 *(getattr(p, f) if p.HasField(f) else None
                                   for f in ("sum", "min", "max")))
                    else:
                        which = p.WhichOneof("value")
                        value = (which, None if which is None else getattr(p, which))
                    out.append((res, sm.scope.name, sm.scope.version, m.name, m.description,
                                m.unit, shape, p.start_time_unix_nano, p.time_unix_nano,
                                p.flags, _kv(p.attributes), value))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_round_trip_keeps_every_point(req):
    batch = decode_metrics(req.SerializeToString())
    assert batch.num_rows == len(points(req))
    # built from raw buffers by the compiled codec: Arrow's full validation must accept them
    batch.record_batch.validate(full=True)
    back = ExportMetricsServiceRequest.FromString(encode_metrics(batch))
    assert points(back) == points(req)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_a_slice_encodes_exactly_its_points(req, data):
    batch = decode_metrics(req.SerializeToString()).record_batch
    start = data.draw(st.integers(0, batch.num_rows))
    part = batch.slice(start, data.draw(st.integers(0, batch.num_rows - start)))
    back = decode_metrics(encode_metrics(part)).record_batch
    assert back.to_pylist() == part.to_pylist()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_json_round_trip_keeps_every_point(req):
    batch, skipped = decode_metrics_json(encode_metrics_json(decode_metrics(
        req.SerializeToString())))
    assert skipped == 0
    assert points(ExportMetricsServiceRequest.FromString(encode_metrics(batch))) == points(req)


def _request_with(kind: str, **fields) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="service.name").value.string_value = "checkout"
    m = rm.scope_metrics.add(scope={"name": "lib", "version": "1.2"}).metrics.add(
        name="m", unit="ms")
    data = getattr(m, kind)
    for k, v in fields.items():
        setattr(data, k, v)
    return req


def test_columns_follow_the_otlp_meaning():
    req = _request_with("sum", is_monotonic=False, aggregation_temporality=1)
    req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points.add(
        as_double=-2.5, start_time_unix_nano=3, time_unix_nano=9)
    row = decode_metrics(req.SerializeToString()).to_pylist()[0]
    assert row["kind"] == knhk.MetricKind.UP_DOWN_COUNTER
    assert row["temporality"] == knhk.Temporality.DELTA
    assert (row["monotonic"], row["value"], row["int_value"]) == (False, -2.5, None)
    assert (row["service"], row["scope_name"], row["scope_version"], row["unit"]) == (
        "checkout", "lib", "1.2", "ms")
    assert (row["start_time_ns"], row["time_ns"]) == (3, 9)


def test_histogram_columns_and_dropped_exemplars():
    req = _request_with("histogram", aggregation_temporality=2)
    p = req.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points.add(
        count=6, sum=12.0, min=0.5, max=9.0, explicit_bounds=[1.0, 5.0],
        bucket_counts=[1, 3, 2], time_unix_nano=4)
    p.exemplars.add(as_double=3.0, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    row = decode_metrics(req.SerializeToString()).to_pylist()[0]
    assert row["kind"] == knhk.MetricKind.HISTOGRAM
    assert (row["count"], row["sum"], row["min"], row["max"]) == (6, 12.0, 0.5, 9.0)
    assert (row["bounds"], row["bucket_counts"]) == ([1.0, 5.0], [1, 3, 2])
    back = ExportMetricsServiceRequest.FromString(encode_metrics(decode_metrics(
        req.SerializeToString())))
    # exemplars have no column in METRIC_SCHEMA: documented as dropped
    assert len(back.resource_metrics[0].scope_metrics[0].metrics[0].histogram
               .data_points[0].exemplars) == 0


def test_unsupported_types_are_counted_not_silently_lost():
    req = _request_with("summary")
    req.resource_metrics[0].scope_metrics[0].metrics[0].summary.data_points.add(count=1)
    req.resource_metrics[0].scope_metrics[0].metrics[0].summary.data_points.add(count=2)
    batch, skipped = decode_metrics_counted(req.SerializeToString())
    assert (batch.num_rows, skipped) == (0, 2)


def test_points_recorded_in_a_pipeline_encode_with_their_service():
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).with_flush_interval(
            0.01).build() as pipeline:
        pipeline.record_metric("hits", 3, kind=knhk.MetricKind.COUNTER, service="api",
                               attributes={"a": [1, 2]})
    (batch,) = [b for b in sink.batches if isinstance(b, knhk.MetricBatch)]
    req = ExportMetricsServiceRequest.FromString(encode_metrics(batch))
    rm = req.resource_metrics[0]
    assert _kv(rm.resource.attributes) == [("service.name", ("string_value", "api"))]
    m = rm.scope_metrics[0].metrics[0]
    assert (m.name, m.sum.is_monotonic, m.sum.data_points[0].as_int) == ("hits", True, 3)
    assert _kv(m.sum.data_points[0].attributes) == [
        ("a", ("array", [("int_value", 1), ("int_value", 2)]))]


@pytest.mark.parametrize("data, words", [
    (b"\x0a\x05\x12", "ExportMetricsServiceRequest"),
    (b"\xff\xff\xff", "ExportMetricsServiceRequest"),
])
def test_malformed_bytes_raise_a_worded_error(data, words):
    with pytest.raises(OtlpDecodeError, match=words):
        decode_metrics(data)


def test_nesting_beyond_the_limit_is_refused():
    req = _request_with("gauge")
    p = req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points.add(as_int=1)
    v = p.attributes.add(key="deep").value
    for _ in range(5):
        v = v.array_value.values.add()
    v.int_value = 1
    assert decode_metrics(req.SerializeToString(), max_depth=5).num_rows == 1
    with pytest.raises(OtlpDecodeError, match=r"deep.*deeper than 4"):
        decode_metrics(req.SerializeToString(), max_depth=4)


def test_bad_json_raises_a_worded_error():
    with pytest.raises(OtlpDecodeError, match="OTLP/JSON"):
        decode_metrics_json("[1]")
    with pytest.raises(OtlpDecodeError, match="OTLP/JSON"):
        decode_metrics_json('{"resourceMetrics": 3}')


def test_empty_request_is_an_empty_batch():
    assert decode_metrics(b"").num_rows == 0
    assert encode_metrics(pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA)) == b""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64) | requests().map(lambda r: r.SerializeToString()[:-1]))
def test_arbitrary_bytes_decode_or_raise_the_worded_error(data):
    try:
        batch = decode_metrics(data)
    except OtlpDecodeError as exc:
        assert "ExportMetricsServiceRequest" in str(exc)
    else:
        assert batch.record_batch.schema.equals(knhk.METRIC_SCHEMA)


def test_a_histogram_whose_buckets_do_not_fit_its_bounds_is_refused():
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as mp

    def request(counts, count):
        point = mp.HistogramDataPoint(count=count, explicit_bounds=[1.0, 2.0],
                                      bucket_counts=counts, time_unix_nano=1)
        metric = mp.Metric(name="lat", histogram=mp.Histogram(data_points=[point],
                                                              aggregation_temporality=2))
        return ms.ExportMetricsServiceRequest(resource_metrics=[mp.ResourceMetrics(
            scope_metrics=[mp.ScopeMetrics(metrics=[metric])])]).SerializeToString()

    assert decode_metrics(request([1, 2, 3], 6)).column("count").to_pylist() == [6]
    assert decode_metrics(request([], 6)).column("count").to_pylist() == [6]  # no buckets
    for counts, count in (([5], 99), ([1, 2, 3], 7)):
        with pytest.raises(OtlpDecodeError, match="bucket counts"):
            decode_metrics(request(counts, count))


def test_the_last_data_field_of_a_metric_wins_as_in_protobuf():
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as mp

    gauge = mp.Metric(name="m", gauge=mp.Gauge(data_points=[mp.NumberDataPoint(as_int=1)]))
    total = mp.Metric(name="m", sum=mp.Sum(data_points=[mp.NumberDataPoint(as_int=2)],
                                           is_monotonic=True, aggregation_temporality=2))
    # two serialized Metric messages concatenated are one message with both oneof fields
    metric = gauge.SerializeToString() + total.SerializeToString()
    wire = _ld(1, _ld(2, _ld(2, metric)))  # request > resource_metrics > scope_metrics
    expected = ExportMetricsServiceRequest.FromString(wire)
    assert points(expected)[0][-1] == ("as_int", 2)
    row = decode_metrics(wire).to_pylist()[0]
    assert (row["kind"], row["int_value"]) == (knhk.MetricKind.COUNTER, 2)


def _ld(field: int, payload: bytes) -> bytes:
    n, size = len(payload), b""
    while n >= 0x80:
        size += bytes([n & 0x7F | 0x80])
        n >>= 7
    return bytes([field << 3 | 2]) + size + bytes([n]) + payload


@pytest.mark.parametrize(("field", "words"), [
    ("temporality", "aggregation temporality is not 0, 1 or 2"),
    ("time", "timestamp beyond int64"),
])
def test_out_of_range_values_are_named(field, words):
    req = _request_with("sum", aggregation_temporality=3 if field == "temporality" else 1)
    req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points.add(
        as_int=1, time_unix_nano=2**63 if field == "time" else 5)
    with pytest.raises(OtlpDecodeError, match=words):
        decode_metrics(req.SerializeToString())


def test_a_row_with_an_unknown_kind_is_refused_by_the_encoder():
    batch = decode_metrics(_points_request()).record_batch
    kinds = pa.array([9] * batch.num_rows, pa.int8())
    bad = batch.set_column(batch.schema.get_field_index("kind"), batch.schema.field("kind"),
                           kinds)
    with pytest.raises(ValueError, match="row 0 has kind 9"):
        encode_metrics(bad)


def _points_request() -> bytes:
    req = _request_with("gauge")
    req.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points.add(as_double=1.5)
    return req.SerializeToString()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_corrupted_requests_never_crash(req, data):
    wire = bytearray(req.SerializeToString())
    if not wire:
        return
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    try:
        batch = decode_metrics(bytes(wire))
    except OtlpDecodeError as exc:
        assert "malformed ExportMetricsServiceRequest" in str(exc)
    else:
        batch.record_batch.validate(full=True)


def test_nesting_10000_deep_is_refused_without_recursing_into_it():
    value = b""
    for _ in range(10_000):
        value = _ld(5, _ld(1, value))  # AnyValue{array_value{values: [value]}}
    point = _ld(7, _ld(1, b"deep") + _ld(2, value))  # NumberDataPoint.attributes
    metric = _ld(1, b"m") + _ld(5, _ld(1, point))  # Metric{name, gauge{data_points}}
    with pytest.raises(OtlpDecodeError, match="'deep' nests arrays / kvlists deeper than 32"):
        decode_metrics(_ld(1, _ld(2, _ld(2, metric))))


@pytest.mark.parametrize("wire", [
    b"\x0a\x02\x12\x05",                    # a length past the end of its message
    b"\x0a\x03\x12\x01\x13",                # a group start inside ScopeMetrics
    b"\x09" + b"\x00" * 3,                  # a fixed64 cut short
    _ld(1, _ld(2, _ld(2, _ld(5, _ld(1, b"\x11\x01"))))),  # start time cut short
])
def test_framing_faults_are_refused(wire):
    with pytest.raises(OtlpDecodeError, match="malformed ExportMetricsServiceRequest"):
        decode_metrics(wire)
