"""knhk.memory_limiter: limits, cheap checks, and the receivers' retryable refusals."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import psutil
import pytest

import knhk
from knhk.exporters._retry import grpc_retry_delay
from knhk.memory_limiter import MemoryLimiter, resident_bytes
from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver, _common
from knhk.testbed import LoadGenerator

MiB = 1 << 20


class _Meter:
    """A settable resident-memory figure, and how often it was read."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.value


def test_resident_bytes_agrees_with_psutil():
    ours, theirs = resident_bytes(), psutil.Process().memory_info().rss
    assert abs(ours - theirs) < 0.1 * theirs


def test_states_and_counters():
    meter = _Meter(50 * MiB)
    lim = MemoryLimiter(100, 200, check_interval=0, rss=meter)
    assert lim.admit() and lim.state() == "ok"
    meter.value = 150 * MiB
    assert not lim.admit() and lim.state() == "soft"
    meter.value = 250 * MiB
    assert not lim.admit() and lim.state() == "hard"
    assert lim.forced_gcs >= 1
    meter.value = 10 * MiB
    assert lim.admit()
    st = lim.stats()
    assert st["refused_requests"] == 2 and st["admitted_requests"] == 2
    assert st["soft_crossings"] == 1 and st["peak_rss_bytes"] == 250 * MiB


def test_memory_is_read_at_most_once_per_interval():
    meter = _Meter(MiB)
    lim = MemoryLimiter(100, 200, check_interval=60, rss=meter)
    for _ in range(1000):
        lim.admit()
    assert meter.reads == 1


@pytest.mark.parametrize("kwargs, word", [
    ({"soft_limit_mib": 0, "hard_limit_mib": 1}, "soft_limit_mib"),
    ({"soft_limit_mib": 10, "hard_limit_mib": 5}, "hard_limit_mib"),
    ({"soft_limit_mib": 1, "hard_limit_mib": 2, "check_interval": -1}, "check_interval"),
    ({"soft_limit_mib": True, "hard_limit_mib": 2}, "soft_limit_mib"),
])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        MemoryLimiter(**kwargs)


def test_receivers_refuse_retryably_above_the_soft_limit_and_recover():
    meter = _Meter(500 * MiB)
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).with_flush_interval(0.01) \
            .build() as pipeline:
        _common.set_memory_limiter(pipeline, MemoryLimiter(100, 1000, check_interval=0,
                                                           rss=meter))
        with OtlpGrpcReceiver(pipeline, endpoint="127.0.0.1:0") as g, \
                OtlpHttpReceiver(pipeline, endpoint="127.0.0.1:0") as h:
            gen = LoadGenerator(f"127.0.0.1:{g.port}", spans_per_request=5, retry=False)
            req, _ = gen.make_request()
            with grpc.insecure_channel(f"127.0.0.1:{g.port}") as ch:
                call = ch.unary_unary(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
                with pytest.raises(grpc.RpcError) as info:
                    call(req.SerializeToString(), timeout=5)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "soft limit" in info.value.details()
                assert grpc_retry_delay(info.value.trailing_metadata()) is not None
            http_req = urllib.request.Request(
                f"http://127.0.0.1:{h.port}/v1/traces", data=req.SerializeToString(),
                headers={"Content-Type": "application/x-protobuf"})
            with pytest.raises(urllib.error.HTTPError) as http_info:
                urllib.request.urlopen(http_req, timeout=5)
            assert http_info.value.code == 503
            assert http_info.value.headers["Retry-After"]
            http_info.value.close()
            meter.value = 50 * MiB  # memory came down: the same requests now go through
            assert gen.send(req, [b"x"])
            with urllib.request.urlopen(http_req, timeout=5) as resp:
                assert resp.status == 200
            gen.close()
        assert pipeline.force_flush(5)
        _common.set_memory_limiter(pipeline, None)
        assert _common.memory_limiter_of(pipeline) is None
    assert sum(b.num_rows for b in sink.batches) == 10


def test_no_request_slips_in_while_the_first_reading_is_in_progress():
    """Requests arriving while another thread reads memory wait for that reading: the
    unlocked fast path used to hand them the state from before it ("ok")."""
    import threading
    import time

    def slow_rss() -> int:
        time.sleep(0.002)
        return 100 << 20

    admitted = 0
    for _ in range(50):
        limiter = MemoryLimiter(1, 2, check_interval=0.01, rss=slow_rss)
        results: list[bool] = []
        threads = [threading.Thread(target=lambda r=results, lim=limiter: r.append(lim.admit()))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        admitted += sum(results)
    assert admitted == 0
