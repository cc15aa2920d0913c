"""The OTLP receivers' metrics endpoints, with the OpenTelemetry SDK's OTLP metric
exporters (gRPC and HTTP/protobuf) as clients."""

from __future__ import annotations

import gzip
import http.client
import json
import time

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

import knhk
from knhk import _attributes
from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver

_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def _send_with_sdk(exporter) -> None:
    """Record known values with the SDK and export them once through ``exporter``."""
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create(
        {"service.name": "checkout", "replicas": 3}))
    meter = provider.get_meter("tests.metrics", "0.1")
    counter = meter.create_counter("requests", unit="1", description="served")
    for v in (1, 2, 3):
        counter.add(v, {"route": "/a"})
    counter.add(10, {"route": "/b"})
    updown = meter.create_up_down_counter("queue.depth")
    updown.add(5)
    updown.add(-7)
    hist = meter.create_histogram("latency", unit="ms")
    for v in (0.5, 7.0, 30.0, 30.0):
        hist.record(v, {"ok": True})
    gauge = meter.create_gauge("temperature")
    gauge.set(21.5, {"room": "lab"})
    provider.shutdown()   # collects and exports once


def _rows(sink) -> dict:
    """Received points keyed by (name, attributes as sorted items)."""
    out = {}
    for batch in sink.metric_batches():
        for r in batch.to_pylist():
            attrs = tuple(sorted(_attributes.attributes_dict(r["attributes"]).items()))
            out[(r["name"], attrs)] = r
    return out


def _wait_for(sink, n: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _rows(sink)
        if len(rows) >= n:
            return rows
        time.sleep(0.01)
    return _rows(sink)


def _check_every_point(rows: dict) -> None:
    assert set(rows) == {("requests", (("route", "/a"),)), ("requests", (("route", "/b"),)),
                         ("queue.depth", ()), ("latency", (("ok", True),)),
                         ("temperature", (("room", "lab"),))}
    a = rows[("requests", (("route", "/a"),))]
    assert (a["kind"], a["monotonic"], a["int_value"], a["unit"], a["description"]) == (
        knhk.MetricKind.COUNTER, True, 6, "1", "served")
    assert a["temporality"] == knhk.Temporality.CUMULATIVE
    assert rows[("requests", (("route", "/b"),))]["int_value"] == 10
    q = rows[("queue.depth", ())]
    assert (q["kind"], q["monotonic"], q["int_value"]) == (
        knhk.MetricKind.UP_DOWN_COUNTER, False, -2)
    h = rows[("latency", (("ok", True),))]
    assert h["kind"] == knhk.MetricKind.HISTOGRAM
    assert (h["count"], h["sum"], h["min"], h["max"]) == (4, 67.5, 0.5, 30.0)
    assert sum(h["bucket_counts"]) == 4 and len(h["bucket_counts"]) == len(h["bounds"]) + 1
    # the SDK's default bounds: 0.5 is in (0, 5], 7 in (5, 10], 30 twice in (25, 50]
    assert h["bucket_counts"][h["bounds"].index(5.0)] == 1
    assert h["bucket_counts"][h["bounds"].index(10.0)] == 1
    assert h["bucket_counts"][h["bounds"].index(50.0)] == 2
    t = rows[("temperature", (("room", "lab"),))]
    assert (t["kind"], t["value"]) == (knhk.MetricKind.GAUGE, 21.5)
    for r in rows.values():
        assert r["service"] == "checkout"
        assert (r["scope_name"], r["scope_version"]) == ("tests.metrics", "0.1")
        assert _attributes.attributes_dict(r["resource_attributes"])["replicas"] == 3
        assert r["time_ns"] > 0


@pytest.fixture
def sink_pipeline(pipeline_factory):
    sink = knhk.InMemoryExporter()
    return sink, pipeline_factory(lambda b: b.with_exporter(sink))


def test_sdk_grpc_metric_exporter_delivers_every_point(sink_pipeline):
    sink, pipeline = sink_pipeline
    with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver:
        _send_with_sdk(GrpcMetricExporter(endpoint=f"localhost:{receiver.port}",
                                          insecure=True))
        rows = _wait_for(sink, 5)
    _check_every_point(rows)
    assert receiver.metric_points_received == 5


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_sdk_http_metric_exporter_delivers_every_point(sink_pipeline, compression):
    sink, pipeline = sink_pipeline
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        _send_with_sdk(HttpMetricExporter(
            endpoint=f"http://localhost:{receiver.port}/v1/metrics", compression=compression))
        rows = _wait_for(sink, 5)
    _check_every_point(rows)
    assert receiver.metric_points_received == 5


def _gauge_request(n: int = 1) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="g")
    for i in range(n):
        m.gauge.data_points.add(as_double=float(i), time_unix_nano=1 + i)
    return req


def _post(port: int, path: str, body: bytes, ctype: str, **headers):
    conn = http.client.HTTPConnection("localhost", port, timeout=5)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype, **headers})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_http_json_metrics_are_accepted(sink_pipeline):
    sink, pipeline = sink_pipeline
    body = json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "hits", "sum": {"isMonotonic": True, "aggregationTemporality": 1,
                                "dataPoints": [{"asInt": "42", "timeUnixNano": "7"}]}}]}]}]})
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        status, _, reply = _post(receiver.port, "/v1/metrics", body.encode(),
                                       "application/json")
        rows = _wait_for(sink, 1)
    assert (status, json.loads(reply)) == (200, {})
    (row,) = rows.values()
    assert (row["name"], row["int_value"], row["kind"], row["temporality"], row["time_ns"]) == (
        "hits", 42, knhk.MetricKind.COUNTER, knhk.Temporality.DELTA, 7)


def test_http_metrics_limits_and_errors(sink_pipeline):
    sink, pipeline = sink_pipeline
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0", max_request_bytes=2048) as r:
        status, _, body = _post(r.port, "/v1/metrics", b"\x0a\x05\x12", "application/x-protobuf")
        assert status == 400 and b"ExportMetricsServiceRequest" in body
        status, _, _ = _post(r.port, "/v1/metrics", b"{", "application/json")
        assert status == 400
        bomb = gzip.compress(b"\x00" * (1 << 20))
        status, _, _ = _post(r.port, "/v1/metrics", bomb, "application/x-protobuf",
                             **{"Content-Encoding": "gzip"})
        assert status == 413
        status, _, body = _post(r.port, "/v1/metrics", b"", "application/x-protobuf")
        assert (status, body) == (200, b"")
        status, _, _ = _post(r.port, "/v1/logs", b"", "application/x-protobuf")
        assert status == 404
    assert _rows(sink) == {}


def test_summary_points_come_back_as_partial_success(sink_pipeline):
    sink, pipeline = sink_pipeline
    req = _gauge_request(2)
    s = req.resource_metrics[0].scope_metrics[0].metrics.add(name="s")
    s.summary.data_points.add(count=3)
    with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver, \
            grpc.insecure_channel(f"localhost:{receiver.port}") as channel:
        reply = channel.unary_unary(_METHOD)(req.SerializeToString(), timeout=5)
        assert pipeline.force_flush(5)
    resp = ExportMetricsServiceResponse.FromString(reply)
    assert resp.partial_success.rejected_data_points == 1
    assert "Summary" in resp.partial_success.error_message
    values = [r["value"] for b in sink.metric_batches() for r in b.to_pylist()]
    assert values == [0.0, 1.0]


def test_full_pipeline_answers_unavailable_and_503(pipeline_factory):
    pipeline = pipeline_factory(lambda b: b.with_batch_size(4).with_channel_capacity(16))
    pipeline.shutdown(1.0)  # nothing can be taken: clients are told to retry
    request = _gauge_request(10).SerializeToString()
    with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver, \
            grpc.insecure_channel(f"localhost:{receiver.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(_METHOD)(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert receiver.requests_refused == 1
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        status, headers, _ = _post(receiver.port, "/v1/metrics", request,
                                   "application/x-protobuf")
    assert status == 503 and headers["Retry-After"] == "1"
    assert pipeline.stats().metrics_refused == 20


def test_a_metrics_request_larger_than_the_pipeline_is_not_retryable(pipeline_factory):
    pipeline = pipeline_factory(lambda b: b.with_batch_size(4).with_channel_capacity(4))
    big = _gauge_request(10).SerializeToString()
    with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver, \
            grpc.insecure_channel(f"localhost:{receiver.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(_METHOD)(big, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        status, headers, _ = _post(receiver.port, "/v1/metrics", big, "application/x-protobuf")
    assert status == 413 and "Retry-After" not in headers


def test_grpc_bad_metrics_bytes_are_invalid_argument(sink_pipeline):
    _, pipeline = sink_pipeline
    with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver, \
            grpc.insecure_channel(f"localhost:{receiver.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(_METHOD)(b"\xff\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ExportMetricsServiceRequest" in info.value.details()
        assert channel.unary_unary(_METHOD)(b"", timeout=5) == b""
