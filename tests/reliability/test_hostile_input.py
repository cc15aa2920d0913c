"""Hostile input against the running system under test's OTLP endpoints (issue 11, §3).

Random bytes and mutated valid requests on gRPC, HTTP/protobuf and
HTTP/JSON; decompression bombs; deep nesting; oversized bodies. Pass: every
answer is a clear rejection (INVALID_ARGUMENT / RESOURCE_EXHAUSTED, 400 /
413 / 415) or an acceptance; the process stays up and answers a valid
request at once; and every span it accepted along the way reaches the
backend (the sink's total equals the receivers' accepted count).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import random
import struct
import time
from collections import Counter

import grpc
import pytest

from knhk.testbed import LoadGenerator, ScenarioResult
from knhk.testbed.serve import ServeProcess, serve_config

_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LIMIT = 1 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _request_with_attribute(value: bytes) -> bytes:
    """An ExportTraceServiceRequest of one span whose one attribute has AnyValue ``value``."""
    attr = _ld(1, b"k") + _ld(2, value)
    span = (_ld(1, b"\x01" * 16) + _ld(2, b"\x02" * 8) + _ld(5, b"deep")
            + b"\x39" + struct.pack("<Q", 1000) + b"\x41" + struct.pack("<Q", 2000)
            + _ld(9, attr))
    return _ld(1, _ld(2, _ld(2, span)))


def _nested_anyvalue(depth: int) -> bytes:
    v = _ld(1, b"leaf")  # string_value
    for _ in range(depth):
        v = _ld(5, _ld(1, v))  # array_value { values: v }
    return v


def _nested_json(depth: int) -> bytes:
    value = '{"stringValue":"leaf"}'
    for _ in range(depth):
        value = '{"arrayValue":{"values":[' + value + "]}}"
    span = ('{"traceId":"01010101010101010101010101010101","spanId":"0202020202020202",'
            '"name":"deep","startTimeUnixNano":"1000","endTimeUnixNano":"2000",'
            '"attributes":[{"key":"k","value":' + value + "}]}")
    return ('{"resourceSpans":[{"scopeSpans":[{"spans":[' + span + "]}]}]}").encode()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(b)) if b else 0
        if op < 0.5 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif op < 0.7:
            b.insert(pos, rng.randrange(256))
        elif op < 0.85 and b:
            del b[pos]
        else:
            b = b[:rng.randrange(len(b) + 1)]
    return bytes(b)


class _Target:
    """The gRPC and HTTP endpoints of one system under test, with answer tallies."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.channel = grpc.insecure_channel(proc.grpc_endpoint)
        self.call = self.channel.unary_unary(_METHOD)
        self.port = proc.ready["http_port"]

    def grpc(self, body: bytes, compress: bool = False) -> str:
        try:
            self.call(body, timeout=10,
                      compression=grpc.Compression.Gzip if compress else None)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def http(self, body: bytes, ctype: str = "application/x-protobuf",
             headers: dict | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            # the server may answer (413) and close without reading the whole body, as
            # it should: sending then fails, and the answer is still there to read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request("POST", "/v1/traces", body=body,
                             headers={"Content-Type": ctype, **(headers or {})})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(params=["sut", "knhk-serve"])
def target(request, sinks, sut, tmp_path):
    """The testbed's own runner, and ``knhk serve`` with a generated config."""
    sink = sinks("grpc")
    if request.param == "sut":
        proc = sut("--exporter", f"grpc={sink.endpoint}", "--max-request-bytes", str(LIMIT))
    else:
        cfg = serve_config(0, 0, [("grpc", sink.endpoint)])
        cfg["receivers"]["otlp"]["protocols"]["grpc"]["max_recv_msg_size_mib"] = LIMIT >> 20
        cfg["receivers"]["otlp"]["protocols"]["http"]["max_request_body_size"] = LIMIT
        proc = ServeProcess(cfg, str(tmp_path))
        proc.ready = {"http_port": int(proc.http_url.split(":")[2].split("/")[0])}
    t = _Target(proc)
    t.kind = request.param
    t.sink = sink
    yield t
    t.close()
    if isinstance(proc, ServeProcess):
        proc.kill()


def _check_alive_and_accounted(target, valid: LoadGenerator) -> tuple[bool, str]:
    """A valid request is accepted at once; every accepted span reaches the backend."""
    t0 = time.monotonic()
    ok = valid.send(*valid.make_request())
    answer_s = time.monotonic() - t0
    if isinstance(target.proc, ServeProcess):
        # knhk serve reports its counters once, at exit: shut it down (it flushes first)
        summary = target.proc.terminate()
        accepted = summary["traces: spans received"]
        exported = summary["traces: exported by otlp/sink0"]
        invalid = summary["traces: spans dropped"]
        arrived = sum(target.sink.received.values())
    else:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = target.proc.stats()
            accepted = sum(r["spans_received"] for r in st["receivers"].values())
            if sum(target.sink.received.values()) >= accepted and \
                    st["pipeline"]["events_processed"] >= accepted:
                break
            time.sleep(0.05)
        final = target.proc.terminate()
        accepted = sum(r["spans_received"] for r in final["receivers"].values())
        exported = sum(e["spans_exported"] for e in final["exporters"].values())
        arrived = sum(target.sink.received.values())
        invalid = final["pipeline"]["dropped_by_reason"].get("invalid", 0)
    tracebacks = target.proc.log().count("Traceback")
    good = ok and answer_s < 2.0 and exported == arrived and tracebacks == 0 and \
        accepted == exported + invalid and valid.result.acked <= target.sink.ids()
    return good, (f"alive, {tracebacks} tracebacks logged: valid request answered in "
                  f"{answer_s:.2f}s; accepted {accepted} spans "
                  f"(of which {invalid} invalid rows dropped and counted), backend got {arrived}")


def _row(report, target, sid, title, endpoint, tries, passed, details):
    report.add(ScenarioResult(f"{sid}@{target.kind}", f"{title} ({target.kind})",
                              "clear rejection, no crash, no hang, nothing accepted lost",
                              passed=passed, kind="hostile", load=endpoint, sent=tries,
                              details=details))


def test_random_bytes_and_mutated_requests(target, report):
    rng = random.Random(1234)
    valid = LoadGenerator(target.proc.grpc_endpoint, spans_per_request=20, run_id=9)
    valid.send(*valid.make_request())
    base_req, _ = valid.make_request(30)
    base = base_req.SerializeToString()
    from google.protobuf import json_format

    base_json = json_format.MessageToJson(base_req).encode()
    tallies: dict[str, Counter] = {}
    n = 60
    for name, send, make in [
        ("random bytes / gRPC", target.grpc, lambda: rng.randbytes(rng.randint(1, 3000))),
        ("random bytes / HTTP protobuf", target.http, lambda: rng.randbytes(rng.randint(1, 3000))),
        ("random bytes / HTTP JSON", lambda b: target.http(b, "application/json"),
         lambda: rng.randbytes(rng.randint(1, 3000))),
        ("mutated requests / gRPC", target.grpc, lambda: _mutate(base, rng)),
        ("mutated requests / HTTP protobuf", target.http, lambda: _mutate(base, rng)),
        ("mutated requests / HTTP JSON", lambda b: target.http(b, "application/json"),
         lambda: _mutate(base_json, rng)),
    ]:
        tallies[name] = Counter(str(send(make())) for _ in range(n))
    alive, summary = _check_alive_and_accounted(target, valid)
    allowed = {"OK", "INVALID_ARGUMENT", "200", "400"}
    for name, tally in tallies.items():
        clear = set(tally) <= allowed
        _row(report, target, "hostile-" + name.replace(" / ", "-").replace(" ", "-").lower(), name,
             name.split(" / ")[1], n, clear and alive,
             f"answers {dict(tally)}; {summary}")
    for name, tally in tallies.items():
        assert set(tally) <= allowed, (name, tally)
    assert alive, summary


def test_bombs_nesting_and_oversized(target, report):
    valid = LoadGenerator(target.proc.grpc_endpoint, spans_per_request=20, run_id=10)
    valid.send(*valid.make_request())
    zeros = b"\0" * (64 << 20)
    bomb = gzip.compress(zeros, 9)  # ~64 KB that inflates to 64 MiB
    cases = {
        "gzip bomb 64 MiB / HTTP": (lambda: target.http(
            bomb, headers={"Content-Encoding": "gzip"}), {"413"}),
        "gzip bomb 16 MiB / gRPC": (lambda: target.grpc(zeros[:16 << 20], compress=True),
                                    {"RESOURCE_EXHAUSTED"}),
        "AnyValue nested 5,000 deep / gRPC": (lambda: target.grpc(
            _request_with_attribute(_nested_anyvalue(5000))), {"INVALID_ARGUMENT"}),
        "AnyValue nested 5,000 deep / HTTP protobuf": (lambda: target.http(
            _request_with_attribute(_nested_anyvalue(5000))), {"400"}),
        "AnyValue nested 5,000 deep / HTTP JSON": (lambda: target.http(
            _nested_json(5000), "application/json"), {"400"}),
        "JSON arrays nested 100,000 deep / HTTP": (lambda: target.http(
            b"[" * 100_000 + b"]" * 100_000, "application/json"), {"400"}),
        "oversized 2 MiB / HTTP": (lambda: target.http(b"\x0a" * (2 << 20)), {"413"}),
        "oversized 2 MiB / gRPC": (lambda: target.grpc(b"\x0a" * (2 << 20)),
                                   {"RESOURCE_EXHAUSTED"}),
        "Content-Length of 10 GB, small body / HTTP": (lambda: _lying_length(target),
                                                       {"413"}),
        "wrong content type / HTTP": (lambda: target.http(b"{}", "text/plain"), {"415"}),
        "JSON with 1e400 and huge ints / HTTP": (lambda: target.http(json.dumps(
            {"resourceSpans": [{"scopeSpans": [{"spans": [{
                "traceId": "01" * 16, "spanId": "02" * 8, "name": "n",
                "startTimeUnixNano": "9" * 400, "endTimeUnixNano": 1e300}]}]}]}).encode(),
            "application/json"), {"400", "200"}),
    }
    got = {}
    for name, (send, allowed) in cases.items():
        t0 = time.monotonic()
        got[name] = (str(send()), time.monotonic() - t0, allowed)
    alive, summary = _check_alive_and_accounted(target, valid)
    for name, (answer, took, allowed) in got.items():
        _row(report, target, "hostile-" + name.split(" / ")[0].replace(" ", "-").replace(",", "")
             .lower() + "-" + name.split(" / ")[1].replace(" ", "-").lower(), name,
             name.split(" / ")[1], 1, answer in allowed and took < 5 and alive,
             f"answer {answer} in {took:.2f}s (expected {sorted(allowed)}); {summary}")
    bad = {k: v for k, v in got.items() if v[0] not in v[2] or v[1] >= 5}
    assert not bad, bad
    assert alive, summary


def _lying_length(target) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/traces")
        conn.putheader("Content-Type", "application/x-protobuf")
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        conn.send(b"\x0a\x00")
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    finally:
        conn.close()
