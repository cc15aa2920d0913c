"""The testbed's backend sinks, driven by real OTLP clients (grpc stubs and urllib).

Both sinks record through one shared recorder, so every case runs against
both protocols and expects the same accounting.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from knhk.testbed.load import span_digest
from knhk.testbed.sinks import Faults, GrpcSink, HttpSink


def _request(*span_ids: int) -> trace_service_pb2.ExportTraceServiceRequest:
    req = trace_service_pb2.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in span_ids:
        sp = ss.spans.add(trace_id=b"\x01" * 16, span_id=i.to_bytes(8, "big"), name=f"op{i}",
                          start_time_unix_nano=i, end_time_unix_nano=i + 5)
        sp.attributes.add(key="k").value.int_value = i
    return req


def _send(sink, req, *, json_body: bool = False, gzip_body: bool = False) -> str:
    """Export ``req`` to ``sink``; the outcome as "ok", "unavailable" or "permanent"."""
    if isinstance(sink, GrpcSink):
        with grpc.insecure_channel(sink.endpoint) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            try:
                stub.Export(req, timeout=10)
            except grpc.RpcError as exc:
                return {grpc.StatusCode.UNAVAILABLE: "unavailable",
                        grpc.StatusCode.INVALID_ARGUMENT: "permanent"}[exc.code()]
            return "ok"
    body = json_format.MessageToJson(req).encode() if json_body else req.SerializeToString()
    headers = {"Content-Type": "application/json" if json_body else "application/x-protobuf"}
    if gzip_body:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    try:
        with urllib.request.urlopen(urllib.request.Request(
                sink.endpoint, data=body, headers=headers, method="POST"), timeout=10) as resp:
            assert resp.status == 200
        return "ok"
    except urllib.error.HTTPError as exc:
        status = json.loads(exc.read())
        if exc.code == 503:
            assert exc.headers["Retry-After"] == "0" and status["code"] == 14
            return "unavailable"
        assert exc.code == 400 and status["code"] == 3
        return "permanent"


@pytest.fixture(params=["grpc", "http"])
def make_sink(request):
    made = []

    def make(**kw):
        sink = (GrpcSink if request.param == "grpc" else HttpSink)(**kw).start()
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.stop()


def test_accepted_spans_are_counted_once_per_id_and_duplicates_apart(make_sink):
    sink = make_sink()
    assert _send(sink, _request(1, 2)) == "ok"
    assert _send(sink, _request(2, 3)) == "ok"
    assert sink.count() == 3 and sink.ids() == {i.to_bytes(8, "big") for i in (1, 2, 3)}
    assert sink.duplicates() == 1
    assert sink.requests == 2 and sink.answers == {"ok": 2}
    assert not sink.rejected and sink.spans is None
    assert sink.wait_for(3, timeout=0.1) and not sink.wait_for(4, timeout=0.05)


def test_permanent_faults_reject_and_unavailable_ones_record_nothing(make_sink):
    sink = make_sink(faults=Faults(permanent=1.0))
    assert _send(sink, _request(1, 2)) == "permanent"
    assert sink.count() == 0 and sorted(sink.rejected.values()) == [1, 1]
    sink.faults = Faults(unavailable=1.0)
    assert _send(sink, _request(3)) == "unavailable"
    assert sink.count() == 0 and len(sink.rejected) == 2
    assert sink.answers == {"permanent": 1, "unavailable": 1} and sink.requests == 2


def test_keep_spans_keeps_a_digest_of_what_arrived(make_sink):
    sink = make_sink(keep_spans=True)
    req = _request(7)
    assert _send(sink, req) == "ok"
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert sink.spans == {span.span_id: span_digest(span)}


def test_down_refuses_and_up_listens_on_the_same_port(make_sink):
    sink = make_sink()
    port = sink.port
    sink.down()
    if isinstance(sink, GrpcSink):
        with grpc.insecure_channel(sink.endpoint) as channel, pytest.raises(grpc.RpcError):
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(_request(1), timeout=1)
    else:
        with pytest.raises(urllib.error.URLError):
            _send(sink, _request(1))
    sink.up()
    assert sink.port == port
    assert _send(sink, _request(1)) == "ok" and sink.count() == 1


def test_http_takes_json_and_gzip_and_refuses_garbage():
    sink = HttpSink().start()
    try:
        assert _send(sink, _request(1), json_body=True) == "ok"
        assert _send(sink, _request(2), gzip_body=True) == "ok"
        assert sink.count() == 2
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(
                sink.endpoint, data=b"\xff\xff\xff", method="POST",
                headers={"Content-Type": "application/x-protobuf"}), timeout=10)
        assert info.value.code == 400
        info.value.close()
        assert sink.requests == 2          # an unparseable body is not a request
    finally:
        sink.stop()
