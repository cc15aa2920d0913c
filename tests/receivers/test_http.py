"""The OTLP/HTTP receiver with the OpenTelemetry SDK's OTLP/HTTP exporter as client."""

from __future__ import annotations

import gzip
import http.client

import pytest
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import knhk
from knhk.otlp import encode_traces
from knhk.receivers import OtlpHttpReceiver

_PB = "application/x-protobuf"


def _sdk_spans(n: int = 4):
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "web"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.http", "0.1")
    with tracer.start_as_current_span("root", attributes={"a": [1, 2], "f": 1.5}) as root:
        root.add_event("hello", {"x": "y"})
        for i in range(n - 1):
            with tracer.start_as_current_span(f"c{i}", attributes={"i": i}):
                pass
    provider.shutdown()
    return memory.get_finished_spans()


def _flat(req):
    out = [(rs.resource, ss.scope, s) for rs in req.resource_spans
           for ss in rs.scope_spans for s in ss.spans]
    return sorted(out, key=lambda t: t[2].span_id)


@pytest.fixture
def served(pipeline_factory):
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(sink))
    receiver = OtlpHttpReceiver(pipeline, endpoint="localhost:0",
                                max_request_bytes=64 * 1024).start()
    yield pipeline, sink, receiver
    receiver.stop()


def _post(port: int, body: bytes, headers: dict | None = None, path: str = "/v1/traces"):
    conn = http.client.HTTPConnection("localhost", port, timeout=5)
    try:
        hdrs = {"Content-Type": _PB}
        hdrs.update(headers or {})
        conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_sdk_exporter_spans_arrive_field_for_field(served, compression):
    pipeline, sink, receiver = served
    spans = _sdk_spans()
    exporter = OTLPSpanExporter(endpoint=f"http://localhost:{receiver.port}/v1/traces",
                                compression=compression)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert pipeline.force_flush(5.0)
    back = ExportTraceServiceRequest.FromString(encode_traces(sink.spans()))
    assert _flat(back) == _flat(encode_spans(spans))


def test_empty_request_succeeds(served):
    status, headers, body = _post(served[2].port, b"")
    assert status == 200 and headers["Content-Type"] == _PB
    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()


def _status(body: bytes) -> status_pb2.Status:
    return status_pb2.Status.FromString(body)


def test_malformed_body_is_400_with_a_status(served):
    status, _, body = _post(served[2].port, b"\x0a\x05\x12")
    assert status == 400
    assert "malformed ExportTraceServiceRequest" in _status(body).message


def test_gzip_bomb_is_refused(served):
    bomb = gzip.compress(b"\x00" * (10 * 1024 * 1024))
    assert len(bomb) < 11 * 1024
    status, _, body = _post(served[2].port, bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    assert "decompressed" in _status(body).message


def test_corrupt_gzip_is_400(served):
    status, _, body = _post(served[2].port, b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in _status(body).message


@pytest.mark.parametrize(("headers", "code", "words"), [
    ({"Content-Encoding": "br"}, 415, "Content-Encoding"),
    ({"Content-Type": "text/plain"}, 415, "Content-Type"),
    ({"Content-Type": "application/grpc"}, 415, "Content-Type"),
])
def test_unsupported_encodings_and_types(served, headers, code, words):
    status, _, body = _post(served[2].port, b"", headers)
    assert status == code and words in _status(body).message


def test_too_large_body_is_413(served):
    status, _, _ = _post(served[2].port, b"\x00" * (65 * 1024))
    assert status == 413


def test_unknown_path_is_404(served):
    assert _post(served[2].port, b"", path="/v1/logs")[0] == 404


def test_a_pipeline_that_cannot_take_a_request_is_503_with_retry_after(pipeline_factory):
    pipeline = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(4))
    pipeline.shutdown(1.0)  # nothing can be taken: the client is told to retry
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        payload = encode_spans(_sdk_spans(3)).SerializeToString()
        status, headers, body = _post(receiver.port, payload)
    assert status == 503 and headers["Retry-After"] == "1"
    assert "shut down" in _status(body).message
    assert pipeline.stats().events_received == 0 and pipeline.stats().events_refused == 3


def test_a_request_larger_than_the_pipeline_is_413_not_retryable(pipeline_factory):
    pipeline = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(2))
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
        payload = encode_spans(_sdk_spans(3)).SerializeToString()
        status, headers, body = _post(receiver.port, payload)
    assert status == 413 and "Retry-After" not in headers
    assert "exceed the pipeline's channel capacity" in _status(body).message
    stats = pipeline.stats()
    assert stats.events_received == 0 and stats.events_refused == 0


def test_bearer_token(pipeline_factory):
    pipeline = pipeline_factory()
    with OtlpHttpReceiver(pipeline, endpoint="localhost:0", bearer_token="tok") as receiver:
        assert _post(receiver.port, b"")[0] == 401
        assert _post(receiver.port, b"", {"Authorization": "Bearer nope"})[0] == 401
        assert _post(receiver.port, b"", {"Authorization": "Bearer tok"})[0] == 200


@pytest.fixture(scope="module")
def fuzz_receiver():
    # one server for all examples: hypothesis does not mix with function-scoped fixtures
    pipeline = knhk.TelemetryPipeline.builder().build()
    receiver = OtlpHttpReceiver(pipeline, endpoint="localhost:0").start()
    yield receiver
    receiver.stop()
    pipeline.shutdown(1.0)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), encoding=st.sampled_from([None, "gzip"]))
def test_fuzzed_bodies_get_a_clear_answer(fuzz_receiver, data, encoding):
    headers = {"Content-Encoding": encoding} if encoding else {}
    status, _, body = _post(fuzz_receiver.port, data, headers)
    assert status in (200, 400)
    if status == 400:
        assert _status(body).message


def test_json_requests(served):
    import json

    from knhk.otlp.json import encode_traces_json

    pipeline, sink, receiver = served
    batch = encode_spans(_sdk_spans(3))
    body = encode_traces_json(knhk.otlp.decode_traces(batch.SerializeToString()))
    status, headers, resp = _post(receiver.port, body.encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(resp) == {}
    assert pipeline.force_flush(5.0)
    back = ExportTraceServiceRequest.FromString(encode_traces(sink.spans()))
    assert _flat(back) == _flat(batch)
    status, headers, resp = _post(receiver.port, b"{not json",
                                  {"Content-Type": "application/json"})
    assert status == 400 and json.loads(resp)["code"] == 3


def test_a_stalled_client_is_timed_out(pipeline_factory):
    import socket
    import time

    pipeline = pipeline_factory()
    receiver = OtlpHttpReceiver(pipeline, endpoint="localhost:0")
    receiver.read_timeout = 0.3
    with receiver:
        with socket.create_connection(("localhost", receiver.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-protobuf\r\nContent-Length: 100\r\n\r\nab")
            t0 = time.monotonic()
            while sock.recv(4096):  # whatever the server says, it then closes
                pass
            assert time.monotonic() - t0 < 3.0
        # and the receiver still serves others
        assert _post(receiver.port, b"")[0] == 200
