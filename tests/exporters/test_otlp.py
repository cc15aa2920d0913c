"""OtlpExporter against real peers: a grpcio server on opentelemetry-proto's generated
TraceService stubs, and an HTTP sink parsing with opentelemetry-proto; both can inject faults."""

from __future__ import annotations

import http.server
import threading
import time
from concurrent import futures
from dataclasses import replace

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import knhk
from knhk import _attributes
from knhk.exporters._retry import Backoff, RetryConfig, retry_after_seconds
from knhk.exporters.otlp import OtlpConfig, OtlpExporter
from knhk.workload import WorkloadConfig, generate

FAST = RetryConfig(initial_interval=0.01, randomization_factor=0.0, max_interval=0.05,
                   max_elapsed_time=5.0)


def _py_any(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_py_any(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _py_any(kv.value) for kv in v.kvlist_value.values}
    return None if kind is None else getattr(v, kind)


def _received_rows(requests) -> list[tuple]:
    rows = []
    for req in requests:
        for rs in req.resource_spans:
            service = {kv.key: _py_any(kv.value) for kv in rs.resource.attributes}.get(
                "service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    rows.append((s.trace_id, s.span_id, s.parent_span_id or None, s.name,
                                 s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                 s.status.code, service, ss.scope.name,
                                 {kv.key: _py_any(kv.value) for kv in s.attributes}))
    return sorted(rows)


def _batch_rows(batch) -> list[tuple]:
    return sorted(
        (r["trace_id"], r["span_id"], r["parent_span_id"], r["name"], r["kind"],
         r["start_time_ns"], r["end_time_ns"], r["status_code"], r["service"], r["scope_name"],
         _attributes.attributes_dict(r["attributes"]))
        for r in batch.to_pylist())


# -- a gRPC collector on the generated stubs ---------------------------------------------


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, script=()):
        self.script = list(script)   # per call: None (accept) or (code, retry_delay|None)
        self.requests: list = []
        self.calls = 0
        self.rejected = 0
        self.gate = threading.Event()
        self.gate.set()

    def Export(self, request, context):
        self.calls += 1
        self.gate.wait(5)
        step = self.script.pop(0) if self.script else None
        if step is not None:
            code, delay = step
            trailers = ()
            if delay is not None:
                detail = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(seconds=int(delay),
                                                      nanos=int(delay % 1 * 1e9)))
                st = status_pb2.Status(code=code.value[0], message="injected")
                st.details.add().Pack(detail)
                trailers = (("grpc-status-details-bin", st.SerializeToString()),)
            context.abort_with_status(_RpcStatus(code, "injected", trailers))
        self.requests.append(request)
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if self.rejected:
            resp.partial_success.rejected_spans = self.rejected
            resp.partial_success.error_message = "some were bad"
        return resp


class _RpcStatus(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


@pytest.fixture
def collector():
    servicer = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    servicer.port = port
    yield servicer
    servicer.gate.set()
    server.stop(0).wait()


def _exporter(port: int, **kw) -> OtlpExporter:
    kw.setdefault("retry", FAST)
    return OtlpExporter(OtlpConfig(endpoint=f"localhost:{port}", protocol="grpc",
                                   insecure=True, timeout=5.0, **kw))


def test_grpc_requests_equal_the_input(collector):
    batch = generate(200, WorkloadConfig(seed=3))
    exporter = _exporter(collector.port, compression="gzip")
    assert exporter.export(batch) is knhk.ExportResult.SUCCESS
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert _received_rows(collector.requests) == _batch_rows(batch)
    assert exporter.spans_exported == 200 and exporter.export_errors == 0


def test_as_a_pipeline_exporter(collector, pipeline_factory):
    exporter = _exporter(collector.port)
    pipeline = pipeline_factory(lambda b: b.with_exporter(exporter))
    pipeline.record_span(knhk.Span("op", trace_id=5, span_id=6, service="svc"))
    pipeline.shutdown(5.0)
    assert [r[3] for r in _received_rows(collector.requests)] == ["op"]
    assert _received_rows(collector.requests)[0][8] == "svc"


_RETRYABLE = ["UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "CANCELLED",
              "DATA_LOSS"]
_FINAL = ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED",
          "FAILED_PRECONDITION", "UNIMPLEMENTED", "INTERNAL", "UNKNOWN", "ALREADY_EXISTS",
          "RESOURCE_EXHAUSTED"]


@pytest.mark.parametrize("name", _RETRYABLE + _FINAL)
def test_grpc_retry_table(collector, name):
    collector.script = [(grpc.StatusCode[name], None)]
    exporter = _exporter(collector.port)
    exporter.export(generate(5, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    if name in _RETRYABLE:
        assert collector.calls == 2 and exporter.export_errors == 0
        assert exporter.spans_exported == 5
    else:
        assert collector.calls == 1 and exporter.export_errors == 1
        assert exporter.errors_by_reason == {f"grpc:{name}": 1}
        assert exporter.spans_failed == 5


def test_resource_exhausted_with_retry_info_waits_as_told(collector):
    collector.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.3)]
    exporter = _exporter(collector.port)
    start = time.monotonic()
    exporter.export(generate(5, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    elapsed = time.monotonic() - start
    exporter.shutdown(1)
    assert collector.calls == 2 and exporter.export_errors == 0
    assert elapsed >= 0.3


def test_partial_success_is_counted_not_retried(collector):
    collector.rejected = 2
    exporter = _exporter(collector.port)
    exporter.export(generate(5, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert collector.calls == 1
    assert exporter.spans_rejected == 2 and exporter.spans_exported == 3
    assert exporter.export_errors == 0


def test_retries_stop_at_max_elapsed_time(collector):
    collector.script = [(grpc.StatusCode.UNAVAILABLE, None)] * 100
    retry = RetryConfig(initial_interval=0.05, randomization_factor=0.0, max_elapsed_time=0.3)
    exporter = _exporter(collector.port, retry=retry)
    exporter.export(generate(5, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert 2 <= collector.calls <= 6
    assert exporter.errors_by_reason == {"retries_exhausted:grpc:UNAVAILABLE": 1}


def test_queue_full_is_counted(collector):
    collector.gate.clear()   # the backend hangs
    exporter = _exporter(collector.port, queue_size=1, consumers=1)
    batch = generate(4, WorkloadConfig(seed=1))
    results = [exporter.export(batch) for _ in range(3)]
    deadline = time.monotonic() + 5
    while collector.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    results.append(exporter.export(batch))
    assert results.count(knhk.ExportResult.FAILURE) >= 1
    assert exporter.errors_by_reason["queue_full"] >= 1
    collector.gate.set()
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert exporter.spans_exported + exporter.spans_failed == 4 * 4


def test_shutdown_returns_in_time_with_the_backend_down():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]   # closed again: nothing listens there
    exporter = _exporter(port, retry=RetryConfig(initial_interval=5.0))
    exporter.export(generate(5, WorkloadConfig(seed=1)))
    start = time.monotonic()
    exporter.shutdown(timeout=0.5)
    assert time.monotonic() - start < 2.0
    assert exporter.spans_failed == 5 and exporter.errors_by_reason["shutdown"] == 1


# -- HTTP --------------------------------------------------------------------------------


class _HttpSink(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("localhost", 0), _HttpHandler)
        self.script: list = []    # per call: None or (status, headers dict)
        self.requests: list = []
        self.calls = 0
        self.daemon_threads = True


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        import gzip as gz

        sink = self.server
        sink.calls += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        step = sink.script.pop(0) if sink.script else None
        if step is not None:
            status, headers = step
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gz.decompress(body)
        if self.headers["Content-Type"] == "application/json":
            sink.requests.append(_from_otlp_json(body))
        else:
            assert self.headers["Content-Type"] == "application/x-protobuf"
            sink.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        sink.headers = self.headers  # case-insensitive look-ups
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _from_otlp_json(body: bytes):
    """OTLP/JSON -> protobuf by protobuf's json_format, after turning hex ids into base64."""
    import base64
    import json

    from google.protobuf import json_format

    obj = json.loads(body)
    for rs in obj.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for holder in [span, *span.get("links", [])]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in holder:
                            holder[key] = base64.b64encode(bytes.fromhex(holder[key])).decode()
    return json_format.ParseDict(obj, trace_service_pb2.ExportTraceServiceRequest())


@pytest.fixture
def http_sink():
    sink = _HttpSink()
    t = threading.Thread(target=sink.serve_forever, daemon=True)
    t.start()
    yield sink
    sink.shutdown()
    sink.server_close()


def _http_exporter(sink, **kw):
    kw.setdefault("retry", FAST)
    return OtlpExporter(OtlpConfig(
        endpoint=f"http://localhost:{sink.server_address[1]}/v1/traces",
        protocol="http/protobuf", timeout=5.0, **kw))


def test_http_requests_equal_the_input(http_sink):
    batch = generate(150, WorkloadConfig(seed=9))
    exporter = _http_exporter(http_sink, compression="gzip", headers={"x-tenant": "a b"})
    exporter.export(batch)
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert _received_rows(http_sink.requests) == _batch_rows(batch)
    assert http_sink.headers["x-tenant"] == "a b"


def test_http_json_requests_equal_the_input(http_sink):
    batch = generate(60, WorkloadConfig(seed=5))
    exporter = _http_exporter(http_sink)
    exporter = OtlpExporter(replace(exporter.config, protocol="http/json"))
    exporter.export(batch)
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert _received_rows(http_sink.requests) == _batch_rows(batch)


@pytest.mark.parametrize(("status", "retried"), [
    (429, True), (502, True), (503, True), (504, True),
    (400, False), (401, False), (404, False), (413, False), (500, False)])
def test_http_retry_table(http_sink, status, retried):
    http_sink.script = [(status, {})]
    exporter = _http_exporter(http_sink)
    exporter.export(generate(3, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert http_sink.calls == (2 if retried else 1)
    assert exporter.export_errors == (0 if retried else 1)


def test_http_retry_after_is_honoured(http_sink):
    http_sink.script = [(503, {"Retry-After": "1"})]
    exporter = _http_exporter(http_sink)
    start = time.monotonic()
    exporter.export(generate(3, WorkloadConfig(seed=1)))
    assert exporter.force_flush(5)
    exporter.shutdown(1)
    assert time.monotonic() - start >= 1.0 and http_sink.calls == 2


def test_retry_after_http_date():
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None


def test_backoff_grows_to_the_cap_with_jitter_inside_bounds():
    import random

    b = Backoff(RetryConfig(initial_interval=1.0, multiplier=2.0, max_interval=4.0,
                            randomization_factor=0.5), random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    for d, base in zip(delays, [1, 2, 4, 4, 4, 4], strict=True):
        assert base * 0.5 <= d <= base * 1.5


# -- configuration from the environment -------------------------------------------------


def test_environment_as_the_specification_defines_it():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b,x=1",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x=2",
           "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}
    c = OtlpConfig().resolved(env)
    assert c.endpoint == "http://collector:4318/v1/traces"
    assert c.headers == {"api-key": "a b", "x": "2"}
    assert (c.protocol, c.compression, c.timeout) == ("http/protobuf", "gzip", 2.5)
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://other:9999/custom"
    assert OtlpConfig().resolved(env).endpoint == "http://other:9999/custom"
    grpc_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
                "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    c = OtlpConfig().resolved(grpc_env)
    assert (c.protocol, c.endpoint, c.insecure) == ("grpc", "collector:4317", True)
    # arguments win over the environment
    assert OtlpConfig(endpoint="x:1", timeout=1.0).resolved(env).endpoint == "x:1"


def test_bad_environment_values_are_logged_and_defaulted(caplog):
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "zip"}
    c = OtlpConfig().resolved(env)
    assert (c.timeout, c.protocol, c.compression) == (10.0, "grpc", None)
    assert len([r for r in caplog.records if "ignoring" in r.getMessage()]) == 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="protocol"):
        OtlpConfig(protocol="udp")
    with pytest.raises(ValueError, match="queue_size"):
        OtlpConfig(queue_size=0)


def test_a_batch_of_no_known_signal_is_counted_not_dropped_silently(collector):
    exporter = _exporter(collector.port)
    assert exporter.export(object()) is knhk.ExportResult.FAILURE
    exporter.shutdown(1)
    assert exporter.errors_by_reason == {"unsupported_signal": 1}
    assert collector.calls == 0


def test_a_batch_racing_shutdown_is_counted_not_lost(collector, monkeypatch):
    """shutdown() landing while export() encodes: the batch must not be queued behind
    the consumers' stop markers and reported as a success."""
    from knhk.exporters import otlp as otlp_mod

    exporter = _exporter(collector.port)
    real = otlp_mod.encode_traces

    def encode_then_shutdown(batch):
        payload = real(batch)
        exporter.shutdown(1.0)  # as ExporterWorker.close() may, from another thread
        return payload

    monkeypatch.setattr(otlp_mod, "encode_traces", encode_then_shutdown)
    batch = generate(50, WorkloadConfig(seed=4))
    assert exporter.export(batch) is knhk.ExportResult.FAILURE
    assert exporter.errors_by_reason == {"shutdown": 1}
    assert exporter.spans_failed == 50 and exporter.spans_exported == 0
    assert exporter._queue.qsize() == 0
