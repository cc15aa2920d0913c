"""Metric points: checks in ``record_metric``, the metric buffer, delivery as MetricBatch."""

from __future__ import annotations

import math

import pytest

import knhk
from knhk import MetricBatch, MetricKind, MetricPoint, Temporality
from knhk.metrics import MetricBuffer

HIST = {"kind": MetricKind.HISTOGRAM, "bounds": [1.0, 5.0], "bucket_counts": [1, 2, 3]}


def _rows(sink: knhk.InMemoryExporter) -> list[dict]:
    return [r for b in sink.metric_batches() for r in b.to_pylist()]


def test_counter_gauge_and_histogram_reach_exporters_as_metric_batches(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink).with_service_name("billing"))
    assert p.record_metric("requests", 3, kind=MetricKind.COUNTER, unit="1",
                           attributes={"route": "/a"}, time_ns=2_000, start_time_ns=1_000)
    assert p.record_metric(MetricPoint("temp", 21.5, kind=MetricKind.GAUGE, unit="Cel",
                                       time_ns=3_000))
    assert p.record_metric("latency", None, sum=12.5, min=0.5, max=9.0, time_ns=4_000,
                           description="request latency", **HIST)
    assert p.force_flush(5)
    assert all(isinstance(b, MetricBatch) for b in sink.metric_batches())
    assert not sink.span_batches()
    rows = {r["name"]: r for r in _rows(sink)}
    assert set(rows) == {"requests", "temp", "latency"}
    c, g, h = rows["requests"], rows["temp"], rows["latency"]
    assert (c["kind"], c["value"], c["int_value"], c["monotonic"]) == \
        (int(MetricKind.COUNTER), 3.0, 3, True)
    assert (c["start_time_ns"], c["time_ns"], c["unit"], c["service"]) == \
        (1_000, 2_000, "1", "billing")
    assert c["temporality"] == int(Temporality.CUMULATIVE)
    assert [(a["key"], a["str"]) for a in c["attributes"]] == [("route", "/a")]
    assert (g["value"], g["int_value"], g["monotonic"], g["start_time_ns"]) == \
        (21.5, None, False, 3_000)
    assert (h["bounds"], h["bucket_counts"], h["count"]) == ([1.0, 5.0], [1, 2, 3], 6)
    assert (h["sum"], h["min"], h["max"], h["value"]) == (12.5, 0.5, 9.0, None)
    assert h["description"] == "request latency"
    assert p.stats().metrics_received == 3


def test_metrics_go_to_event_stream_too(pipeline_factory):
    p = pipeline_factory()
    stream = p.event_stream()
    p.record_metric("g", 1.0)
    p.force_flush(5)
    p.shutdown(2)
    got = list(stream)
    assert [type(b) for b in got] == [MetricBatch]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    (("",), {"value": 1}, TypeError, "name"),
    ((None,), {"value": 1}, TypeError, "name"),
    (("m",), {"value": "1"}, TypeError, "'m'.*value"),
    (("m",), {"value": True}, TypeError, "'m'.*value"),
    (("m",), {"value": None}, TypeError, "'m'.*value"),
    (("m",), {"value": 1, "kind": 99}, ValueError, "'m'.*kind"),
    (("m",), {"value": 1, "temporality": 7}, ValueError, "'m'.*temporality"),
    (("m",), {"value": math.nan, "kind": MetricKind.COUNTER}, ValueError, "NaN"),
    (("m",), {"value": -1, "kind": MetricKind.COUNTER, "temporality": Temporality.DELTA},
     ValueError, ">= 0"),
    (("m",), {"value": 2**63}, ValueError, "int64"),
    (("m",), {"kind": MetricKind.HISTOGRAM}, ValueError, "bounds"),
    (("m",), {**HIST, "bucket_counts": [1, 2]}, ValueError, "bucket_counts"),
    (("m",), {**HIST, "bounds": [5.0, 1.0]}, ValueError, "increase"),
    (("m",), {**HIST, "bounds": [1.0, 1.0]}, ValueError, "increase"),
    (("m",), {**HIST, "bucket_counts": [1, -2, 3]}, ValueError, ">= 0"),
    (("m",), {"value": 1, "attributes": {"k": object()}}, TypeError, "'k'"),
    (("m",), {"value": 1, "attributes": {"k": 2**64}}, ValueError, "'k'"),
    ((5,), {}, TypeError, "MetricPoint or a metric name"),
])
def test_bad_metric_points_raise_clear_errors(pipeline_factory, args, kwargs, error, match):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink))
    assert p.record_metric("before", 1.0)
    with pytest.raises(error, match=match):
        p.record_metric(*args, **kwargs)
    assert p.record_metric("after", 2.0)
    assert p.force_flush(5)
    assert [r["name"] for r in _rows(sink)] == ["before", "after"]


def test_metric_point_with_extra_arguments_is_rejected(pipeline_factory):
    p = pipeline_factory()
    with pytest.raises(TypeError, match="no further arguments"):
        p.record_metric(MetricPoint("m", 1.0), 2.0)


def test_record_metric_after_shutdown_is_counted(pipeline_factory):
    p = pipeline_factory()
    p.shutdown(2)
    assert p.record_metric("late", 1.0) is False
    stats = p.stats()
    assert stats.dropped_by_reason.get("metrics_shutdown") == 1


def test_buffer_seals_by_size_and_counts_queue_full():
    buf = MetricBuffer(batch_size=2, capacity=4, service="svc")
    results = [buf.append(MetricPoint(f"m{i}", float(i))) for i in range(6)]
    assert results == [True] * 4 + [False] * 2
    assert buf.dropped == {"queue_full": 2}
    assert buf.received == 6
    batches = buf.drain(3600.0)
    assert [b.num_rows for b in batches] == [2, 2]
    assert batches[0].column("service").to_pylist() == ["svc", "svc"]
    assert buf.pending == 0
    assert buf.append(MetricPoint("again", 1.0))   # room again after the drain


def test_buffer_drain_seals_open_rows_only_when_due():
    buf = MetricBuffer(batch_size=10, capacity=100, service="svc")
    buf.append(MetricPoint("m", 1.0))
    assert buf.drain(3600.0) == []
    assert buf.pending == 1
    (rb,) = buf.drain(0.0)
    assert rb.column("name").to_pylist() == ["m"]


def test_buffer_close_refuses_and_counts():
    buf = MetricBuffer(batch_size=10, capacity=100, service="svc")
    buf.append(MetricPoint("m", 1.0))
    buf.close()
    assert buf.append(MetricPoint("late", 1.0)) is False
    assert buf.dropped == {"shutdown": 1}
    assert [b.num_rows for b in buf.drain(3600.0)] == [1]


# -- known bugs: unchecked fields poison the buffer --------------------------------------

_POISON = {
    "sum not a number": {**HIST, "sum": "x"},
    "min not a number": {**HIST, "min": "x"},
    "time_ns beyond int64": {"value": 1.0, "time_ns": 2**70},
    "unit not a str": {"value": 1.0, "unit": 5},
    "description not a str": {"value": 1.0, "description": 5},
    "service not a str": {"value": 1.0, "service": 5},
    "bucket count beyond uint64": {**HIST, "bucket_counts": [1, 2**65, 1]},
}


@pytest.mark.parametrize("fields", list(_POISON.values()), ids=list(_POISON))
def test_unchecked_metric_fields_are_rejected_and_lose_nothing(fields):
    buf = MetricBuffer(batch_size=10, capacity=100, service="svc")
    assert buf.append(MetricPoint("good", 1.0))
    with pytest.raises((TypeError, ValueError, OverflowError)):
        buf.append(MetricPoint("bad", **fields))
    buf.seal()
    assert [r for b in buf.drain(3600.0) for r in b.column("name").to_pylist()] == ["good"]


@pytest.mark.parametrize(("fields", "error", "match"), [
    pytest.param({"value": 1.0, "attributes": [("k", "v")]}, TypeError, "attributes",
                 id="attributes not a dict"),
    pytest.param({"value": 1.0, "time_ns": "soon"}, TypeError, "time_ns",
                 id="time_ns not an int"),
    pytest.param({**HIST, "bounds": [math.nan, 1.0]}, ValueError, "bounds",
                 id="NaN bound"),
])
def test_metric_field_errors_name_the_field(fields, error, match):
    buf = MetricBuffer(batch_size=10, capacity=100, service="svc")
    with pytest.raises(error, match=match):
        buf.append(MetricPoint("m", **fields))
