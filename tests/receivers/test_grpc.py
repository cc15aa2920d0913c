"""The OTLP/gRPC receiver with the OpenTelemetry SDK's own OTLP gRPC exporter as client."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import knhk
from knhk.otlp import encode_traces
from knhk.receivers import OtlpGrpcReceiver

_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _sdk_spans(n_spans: int = 6):
    """Finished SDK spans covering every attribute kind, events, links, status and kinds."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "checkout", "k8s.pod.uid": "abc", "replicas": 3}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.receiver", "1.2.3")
    with tracer.start_as_current_span("root", kind=SpanKind.SERVER,
                                      attributes={"s": "x", "b": True, "i": -7, "d": 2.5,
                                                  "ss": ["a", ""], "ii": [1, 2], "dd": [0.5],
                                                  "bb": [True, False]}) as root:
        root.add_event("ev", {"e.attr": 1}, timestamp=123)
        root.set_status(Status(StatusCode.ERROR, "boom"))
        for i in range(n_spans - 1):
            with tracer.start_as_current_span(
                    f"child-{i}", kind=SpanKind(i % 5),
                    links=[Link(root.get_span_context(), {"link.i": i})]) as child:
                child.set_attribute("empty", "")
    provider.shutdown()
    return memory.get_finished_spans()


def _flat(req: ExportTraceServiceRequest) -> list:
    out = [(rs.resource, rs.schema_url, ss.scope, ss.schema_url, span)
           for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans]
    return sorted(out, key=lambda t: t[4].span_id)


@pytest.fixture
def served(pipeline_factory):
    """(pipeline, sink, receiver) with a receiver on a free port."""
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(sink))
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
    yield pipeline, sink, receiver
    receiver.stop(0)


def test_sdk_exporter_spans_arrive_field_for_field(served):
    pipeline, sink, receiver = served
    spans = _sdk_spans()
    exporter = OTLPSpanExporter(endpoint=f"localhost:{receiver.port}", insecure=True)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert pipeline.force_flush(5.0)
    got = sink.spans()
    assert got.num_rows == len(spans)
    back = ExportTraceServiceRequest.FromString(encode_traces(got))
    assert _flat(back) == _flat(encode_spans(spans))
    assert set(got.column("service").to_pylist()) == {"checkout"}
    assert receiver.spans_received == len(spans)


def test_sdk_exporter_with_gzip(served):
    pipeline, sink, receiver = served
    from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression

    exporter = OTLPSpanExporter(endpoint=f"localhost:{receiver.port}", insecure=True,
                                compression=Compression.Gzip)
    assert exporter.export(_sdk_spans(3)) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert pipeline.force_flush(5.0)
    assert sink.spans().num_rows == 3


def _call(port: int, payload: bytes, metadata=None) -> bytes:
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        export = channel.unary_unary(_METHOD)
        return export(payload, timeout=5, metadata=metadata)


def test_empty_request_succeeds(served):
    _, _, receiver = served
    assert ExportTraceServiceResponse.FromString(_call(receiver.port, b"")) == \
        ExportTraceServiceResponse()


@pytest.mark.parametrize("payload", [b"\x0a\x05\x12", b"\xff" * 20, b"\x0b"])
def test_malformed_request_is_invalid_argument(served, payload):
    _, _, receiver = served
    with pytest.raises(grpc.RpcError) as info:
        _call(receiver.port, payload)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ExportTraceServiceRequest" in info.value.details()
    assert receiver.requests_invalid == 1


def test_full_pipeline_answers_unavailable_with_retry_info(pipeline_factory):
    from google.rpc import error_details_pb2, status_pb2

    pipeline = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(4))
    pipeline.shutdown(1.0)  # closed: nothing can be taken
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
    try:
        payload = encode_spans(_sdk_spans(3)).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            _call(receiver.port, payload)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        trailers = dict(info.value.trailing_metadata())
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert retry.retry_delay.seconds >= 1
    finally:
        receiver.stop(0)


def test_a_request_larger_than_the_pipeline_is_not_retryable(pipeline_factory):
    pipeline = pipeline_factory(lambda b: b.with_batch_size(2).with_channel_capacity(2))
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
    try:
        payload = encode_spans(_sdk_spans(3)).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            _call(receiver.port, payload)
        # RESOURCE_EXHAUSTED without RetryInfo: the OTLP specification says do not retry
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceed the pipeline's channel capacity" in info.value.details()
        assert "grpc-status-details-bin" not in dict(info.value.trailing_metadata() or ())
        assert pipeline.stats().events_received == 0
    finally:
        receiver.stop(0)


def test_bearer_token(pipeline_factory):
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(sink))
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0", bearer_token="s3cret").start()
    try:
        payload = encode_spans(_sdk_spans(2)).SerializeToString()
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                _call(receiver.port, payload, metadata)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        _call(receiver.port, payload, (("authorization", "Bearer s3cret"),))
        assert pipeline.force_flush(5.0)
        assert sink.spans().num_rows == 2
    finally:
        receiver.stop(0)


def test_request_over_the_size_limit_is_refused(pipeline_factory):
    pipeline = pipeline_factory()
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0", max_request_bytes=1000).start()
    try:
        payload = encode_spans(_sdk_spans(30)).SerializeToString()
        assert len(payload) > 1000
        with pytest.raises(grpc.RpcError) as info:
            _call(receiver.port, payload)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        receiver.stop(0)


def test_invalid_spans_are_a_partial_success(served):
    pipeline, sink, receiver = served
    req = encode_spans(_sdk_spans(2))
    bad = req.resource_spans[0].scope_spans[0].spans[0]
    bad.end_time_unix_nano = bad.start_time_unix_nano - 1
    resp = ExportTraceServiceResponse.FromString(_call(receiver.port, req.SerializeToString()))
    assert resp.partial_success.rejected_spans == 1
    assert pipeline.force_flush(5.0)
    assert sink.spans().num_rows == 1


@pytest.fixture(scope="module")
def fuzz_port():
    # one server for all examples: hypothesis does not mix with function-scoped fixtures
    pipeline = knhk.TelemetryPipeline.builder().build()
    receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
    yield receiver.port
    receiver.stop(0)
    pipeline.shutdown(1.0)


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=300))
def test_fuzzed_requests_get_a_clear_status(fuzz_port, payload):
    try:
        ExportTraceServiceResponse.FromString(_call(fuzz_port, payload))
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ExportTraceServiceRequest" in exc.details()


def test_a_second_receiver_on_a_port_in_use_fails_to_start(pipeline_factory):
    pipeline = pipeline_factory()
    first = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
    try:
        second = OtlpGrpcReceiver(pipeline, endpoint=f"localhost:{first.port}")
        with pytest.raises(Exception, match=str(first.port)):
            second.start()
    finally:
        first.stop()


@pytest.mark.parametrize("depth", [-1, 1001, 2.5, True])
def test_a_bad_nesting_limit_is_refused_when_built(pipeline_factory, depth):
    from knhk.receivers import OtlpHttpReceiver

    with pytest.raises(ValueError, match="max_depth"):
        OtlpGrpcReceiver(pipeline_factory(), max_depth=depth)
    with pytest.raises(ValueError, match="max_depth"):
        OtlpHttpReceiver(pipeline_factory(), max_depth=depth)


def test_counters_are_exact_under_concurrent_requests(served):
    """Requests are served on several threads: every request and span is counted once."""
    from concurrent.futures import ThreadPoolExecutor

    from knhk.workload import WorkloadConfig, generate

    pipeline, sink, receiver = served
    payloads = [encode_traces(generate(50, WorkloadConfig(seed=s))) for s in range(8)]
    with grpc.insecure_channel(f"localhost:{receiver.port}") as channel:
        call = channel.unary_unary(_METHOD)

        def send(i: int) -> None:
            call(payloads[i % len(payloads)], timeout=30)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(send, range(400)))
        with pytest.raises(grpc.RpcError):
            call(b"\xff\xff\xff", timeout=30)
    assert receiver.requests == 401
    assert receiver.requests_invalid == 1
    assert receiver.spans_received == 400 * 50
    assert pipeline.force_flush(30.0)
    assert sum(b.num_rows for b in sink.batches) == 400 * 50
