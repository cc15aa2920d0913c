"""OtlpExporter with metric batches: a grpcio server on opentelemetry-proto's generated
MetricsService stubs, and an HTTP sink parsing with opentelemetry-proto."""

from __future__ import annotations

import http.server
import json
import threading
from concurrent import futures

import grpc
import pyarrow as pa
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

import knhk
from knhk import _attributes
from knhk.exporters._retry import RetryConfig
from knhk.exporters.otlp import OtlpConfig, OtlpExporter
from knhk.workload import WorkloadConfig, generate

FAST = RetryConfig(initial_interval=0.01, randomization_factor=0.0, max_interval=0.05,
                   max_elapsed_time=5.0)


def _row(**fields) -> dict:
    row = {f.name: None for f in knhk.METRIC_SCHEMA}
    row.update(temporality=2, monotonic=False, start_time_ns=1, time_ns=2, flags=0,
               service="api", attributes=[], resource_attributes=[])
    row.update(fields)
    return row


def _batch() -> knhk.MetricBatch:
    rows = [
        _row(name="requests", kind=int(knhk.MetricKind.COUNTER), monotonic=True, int_value=6,
             value=6.0, attributes=_attributes.attribute_rows({"route": "/a"}), unit="1"),
        _row(name="depth", kind=int(knhk.MetricKind.UP_DOWN_COUNTER), temporality=1,
             value=-1.5),
        _row(name="temp", kind=int(knhk.MetricKind.GAUGE), temporality=0, value=21.5,
             scope_name="lib", scope_version="2"),
        _row(name="latency", kind=int(knhk.MetricKind.HISTOGRAM), count=4, sum=67.5, min=0.5,
             max=30.0, bounds=[5.0, 10.0], bucket_counts=[1, 1, 2],
             attributes=_attributes.attribute_rows({"ok": True, "tags": ["x", "y"]})),
    ]
    return knhk.MetricBatch(pa.RecordBatch.from_pylist(rows, schema=knhk.METRIC_SCHEMA))


def _any_py(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_py(x) for x in v.array_value.values]
    return None if kind is None else getattr(v, kind)


def _received(requests) -> list[tuple]:
    """Points as (service, scope, name, type, monotonic, temporality, attrs, value)."""
    out = []
    for req in requests:
        for rm in req.resource_metrics:
            service = {kv.key: _any_py(kv.value) for kv in rm.resource.attributes}.get(
                "service.name")
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    for p in data.data_points:
                        if kind == "histogram":
                            value = (p.count, p.sum, p.min, p.max, list(p.explicit_bounds),
                                     list(p.bucket_counts))
                        else:
                            which = p.WhichOneof("value")
                            value = (which, getattr(p, which))
                        out.append((service, sm.scope.name, sm.scope.version, m.name, m.unit,
                                    kind, getattr(data, "is_monotonic", None),
                                    getattr(data, "aggregation_temporality", None),
                                    {kv.key: _any_py(kv.value) for kv in p.attributes},
                                    value))
    return out


# what _batch() means in OTLP terms, written out by hand
EXPECTED = [
    ("api", "", "", "requests", "1", "sum", True, 2, {"route": "/a"}, ("as_int", 6)),
    ("api", "", "", "depth", "", "sum", False, 1, {}, ("as_double", -1.5)),
    ("api", "lib", "2", "temp", "", "gauge", None, None, {}, ("as_double", 21.5)),
    ("api", "", "", "latency", "", "histogram", None, 2, {"ok": True, "tags": ["x", "y"]},
     (4, 67.5, 0.5, 30.0, [5.0, 10.0], [1, 1, 2])),
]


class _MetricsCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self):
        self.script: list = []      # per call: None (accept) or a grpc.StatusCode
        self.requests: list = []
        self.calls = 0
        self.rejected = 0

    def Export(self, request, context):
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if step is not None:
            context.abort(step, "injected")
        self.requests.append(request)
        resp = metrics_service_pb2.ExportMetricsServiceResponse()
        if self.rejected:
            resp.partial_success.rejected_data_points = self.rejected
        return resp


@pytest.fixture
def collector():
    servicer = _MetricsCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    # the same server also takes traces, so one exporter can send both signals
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(), server)
    servicer.port = server.add_insecure_port("localhost:0")
    server.start()
    yield servicer
    server.stop(0).wait()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        return trace_service_pb2.ExportTraceServiceResponse()


def _exporter(port: int, **kw) -> OtlpExporter:
    return OtlpExporter(OtlpConfig(endpoint=f"localhost:{port}", protocol="grpc",
                                   insecure=True, timeout=5.0, retry=FAST, **kw))


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_grpc_metric_requests_equal_the_input(collector, compression):
    exporter = _exporter(collector.port, compression=compression)
    assert exporter.export(_batch()) is knhk.ExportResult.SUCCESS
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert _received(collector.requests) == EXPECTED
    assert exporter.metric_points_exported == 4 and exporter.export_errors == 0


def test_spans_and_metrics_share_one_exporter(collector):
    exporter = _exporter(collector.port)
    exporter.export(generate(10, WorkloadConfig(seed=2)))
    exporter.export(_batch())
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert (exporter.spans_exported, exporter.metric_points_exported) == (10, 4)
    assert len(collector.requests) == 1


@pytest.mark.parametrize("code, calls, failed", [
    (grpc.StatusCode.UNAVAILABLE, 2, 0), (grpc.StatusCode.INVALID_ARGUMENT, 1, 4)])
def test_metric_retries_follow_the_shared_table(collector, code, calls, failed):
    collector.script = [code]
    exporter = _exporter(collector.port)
    exporter.export(_batch())
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert collector.calls == calls
    assert exporter.metric_points_failed == failed and exporter.spans_failed == 0
    if failed:
        assert exporter.errors_by_reason == {f"grpc:{code.name}": 1}


def test_metric_partial_success_is_counted(collector):
    collector.rejected = 1
    exporter = _exporter(collector.port)
    exporter.export(_batch())
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert (exporter.metric_points_exported, exporter.metric_points_rejected) == (3, 1)
    assert collector.calls == 1


def test_from_a_pipeline(collector, pipeline_factory):
    exporter = _exporter(collector.port)
    pipeline = pipeline_factory(lambda b: b.with_exporter(exporter))
    pipeline.record_metric("hits", 3, kind=knhk.MetricKind.COUNTER, service="svc",
                           time_ns=20, start_time_ns=10)
    pipeline.shutdown(5.0)
    (point,) = _received(collector.requests)
    assert point == ("svc", "", "", "hits", "", "sum", True, 2, {}, ("as_int", 3))


# -- HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def http_sink():
    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Content-Type"], body))
            reply = b"{}" if self.headers["Content-Type"] == "application/json" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("localhost", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_http_metrics_go_to_v1_metrics(http_sink, protocol):
    from google.protobuf import json_format

    port, seen = http_sink
    exporter = OtlpExporter(OtlpConfig(endpoint=f"http://localhost:{port}/v1/traces",
                                       protocol=protocol, timeout=5.0, retry=FAST))
    exporter.export(_batch())
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    ((path, ctype, body),) = seen
    assert path == "/v1/metrics"
    if protocol == "http/json":
        assert ctype == "application/json"
        req = json_format.ParseDict(json.loads(body),
                                    metrics_service_pb2.ExportMetricsServiceRequest())
    else:
        req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
    assert _received([req]) == EXPECTED
    assert exporter.metric_points_exported == 4


def test_metrics_endpoint_follows_the_environment():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    c = OtlpConfig().resolved(env)
    assert (c.endpoint, c.metrics_endpoint) == ("http://collector:4318/v1/traces",
                                                "http://collector:4318/v1/metrics")
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = "http://m:9/custom"
    assert OtlpConfig().resolved(env).metrics_endpoint == "http://m:9/custom"
    c = OtlpConfig(protocol="grpc").resolved({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "t:1"})
    assert (c.endpoint, c.metrics_endpoint) == ("t:1", "localhost:4317")
