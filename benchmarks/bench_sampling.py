"""Sampling: knhk's vectorized samplers beside opentelemetry-sdk's per-span samplers.

Run the side-by-side scenarios with ``python benchmarks/run.py sampling`` (figures
go to RESULTS.md) or the pytest-benchmark form with
``pytest benchmarks/bench_sampling.py --benchmark-only``.

Head sampling: ``sample_mask`` over one SpanBatch of random trace ids, beside
the SDK's ``TraceIdRatioBased`` / ``ParentBased`` called once per span (what a
user without knhk would do); the SDK's per-span cost is measured on 100,000
spans. Adaptive priority's peer picks the rate per span from the status and
duration, then asks the SDK sampler of that class.

Tail sampling: traces of 20 spans, 1,000 traces in flight at a time, their
spans interleaved and the root last, fed in batches of 10,000 with a fake
clock advancing 0.25 s per batch (1 s idle timeout), then flushed. There is
no Python peer (the OpenTelemetry Collector's processor is Go), so the figure
stands alone, with the bytes held per pending span.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate

import knhk
from knhk.sampling import AdaptiveSamplingStrategy, ParentBased, SamplingConfig, TraceIdRatio
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE
from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig

# -- data ----------------------------------------------------------------------------


def head_batch(n: int, seed: int = 1) -> knhk.SpanBatch:
    """n spans with random trace ids, 2 % errors, 10 % slow, 70 % with a parent."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    span_ids = np.arange(1, n + 1, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(n, 8)
    has_parent = rng.random(n) < 0.7
    parents = np.where(has_parent[:, None], span_ids[::-1], 0).astype(np.uint8)
    parent = pa.array(parents.view("S8").ravel(), type=pa.binary(8), mask=~has_parent)
    dur = np.where(rng.random(n) < 0.1, 2_000_000_000, 5_000_000).astype(np.int64)
    return knhk.SpanBatch({
        "trace_id": ids, "span_id": span_ids, "parent_span_id": parent,
        "name": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                               pa.array(["GET /users/{id}"])),
        "start_time_ns": np.full(n, 1_700_000_000_000_000_000, np.int64),
        "duration_ns": dur,
        "status_code": np.where(rng.random(n) < 0.02, 2, 0).astype(np.int8),
        "flags": np.where(rng.random(n) < 0.5, 0x301, 0x100).astype(np.uint32),
    })


def trace_batches(n_spans: int, per_trace: int = 20, in_flight: int = 1000,
                  batch_size: int = 10_000, seed: int = 2) -> list[knhk.SpanBatch]:
    """Traces of ``per_trace`` spans, interleaved ``in_flight`` at a time, root last."""
    rng = np.random.default_rng(seed)
    n_traces = n_spans // per_trace
    n = n_traces * per_trace
    tids = rng.integers(0, 256, size=(n_traces, 16), dtype=np.uint8)
    order_t = np.empty(n, np.int64)
    order_k = np.empty(n, np.int64)
    pos = 0
    for g in range(0, n_traces, in_flight):
        grp = np.arange(g, min(g + in_flight, n_traces))
        for k in range(per_trace):
            order_t[pos:pos + grp.size] = rng.permutation(grp)
            order_k[pos:pos + grp.size] = k
            pos += grp.size
    span_ids = np.arange(1, n + 1, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(n, 8)
    is_root = order_k == per_trace - 1
    parent = pa.array(np.full(n, b"\x00\x00\x00\x00\x00\x00\x00\x07", dtype="S8"),
                      type=pa.binary(8), mask=is_root)
    start = (order_t * 1000 + order_k).astype(np.int64) * 1_000_000
    dur = rng.integers(1, 40, size=n).astype(np.int64) * 1_000_000
    errors = (rng.random(n_traces) < 0.01)[order_t] & (order_k == 3)
    routes = pa.array([f"/api/v{i}/items" for i in range(8)])
    attrs = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                           pa.array(["http.route"])),
            pa.array(np.ones(n, np.int8)),
            pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 8, n).astype(np.int32)),
                                           routes),
            pa.nulls(n, pa.int64()), pa.nulls(n, pa.float64()), pa.nulls(n, pa.bool_()),
            pa.nulls(n, pa.binary()), pa.nulls(n, pa.binary())], fields=list(ATTRIBUTE_STRUCT)),
        type=ATTRIBUTES_TYPE)
    whole = knhk.SpanBatch({
        "trace_id": tids[order_t], "span_id": span_ids, "parent_span_id": parent,
        "name": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                               pa.array(["op"])),
        "start_time_ns": start, "end_time_ns": start + dur,
        "status_code": np.where(errors, 2, 0).astype(np.int8), "attributes": attrs,
    })
    return [whole.slice(o, batch_size) for o in range(0, n, batch_size)]


TAIL_POLICIES = [
    Policy.status_code("errors", ["ERROR"]),
    Policy.latency("slow", threshold_ms=30_000),
    Policy.string_attribute("v1", "http.route", ["/api/v1/items"]),
    Policy.probabilistic("baseline", 5),
]


def tail_config() -> TailSamplingConfig:
    return TailSamplingConfig(TAIL_POLICIES, decision_wait=30.0, idle_timeout=1.0,
                              num_traces=20_000, tick_interval=0.25)


# -- runs ----------------------------------------------------------------------------


def time_mask(sampler, batch: knhk.SpanBatch) -> tuple[int, float]:
    t0 = time.perf_counter()
    sampler.sample_mask(batch)
    return batch.num_rows, time.perf_counter() - t0


def time_process(sampler, batch: knhk.SpanBatch) -> tuple[int, float]:
    t0 = time.perf_counter()
    res = sampler.process(batch)
    res.batch.filter(res.mask)
    return batch.num_rows, time.perf_counter() - t0


def sdk_ratio(ints: list[int], rate: float) -> tuple[int, float]:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    s = TraceIdRatioBased(rate)
    t0 = time.perf_counter()
    for t in ints:
        s.should_sample(None, t, "GET /users/{id}")
    return len(ints), time.perf_counter() - t0


def sdk_priority(rows: list[tuple[int, int, int]], cfg: SamplingConfig) -> tuple[int, float]:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    base, slow, err = (TraceIdRatioBased(r) for r in (cfg.base_rate, cfg.slow_rate,
                                                      cfg.error_rate))
    thr = cfg.slow_threshold_ms * 1e6
    t0 = time.perf_counter()
    for t, status, dur in rows:
        s = err if status == 2 else slow if dur >= thr else base
        s.should_sample(None, t, "GET /users/{id}")
    return len(rows), time.perf_counter() - t0


def sdk_parent_based(cases: list, rate: float) -> tuple[int, float]:
    from opentelemetry.sdk.trace.sampling import ParentBased as SdkParentBased
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    s = SdkParentBased(TraceIdRatioBased(rate))
    t0 = time.perf_counter()
    for ctx, t in cases:
        s.should_sample(ctx, t, "GET /users/{id}")
    return len(cases), time.perf_counter() - t0


def sdk_inputs(batch: knhk.SpanBatch, n: int):
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        TraceFlags,
        set_span_in_context,
    )

    b = batch.slice(0, n)
    ints = [int.from_bytes(x, "big") for x in b.column("trace_id").to_pylist()]
    status = b.column("status_code").to_pylist()
    dur = b.duration_ns().tolist()
    parents = b.column("parent_span_id").is_valid().to_pylist()
    flags = b.column("flags").to_pylist()
    ctxs = [set_span_in_context(NonRecordingSpan(SpanContext(
        t, 0xABC, is_remote=bool(f & 0x200), trace_flags=TraceFlags(f & 1)))) if p else None
        for t, p, f in zip(ints, parents, flags, strict=True)]
    return ints, list(zip(ints, status, dur, strict=True)), list(zip(ctxs, ints, strict=True))


def run_tail(batches: list[knhk.SpanBatch]) -> tuple[int, float, dict]:
    clock = [0.0]
    sampler = TailSampler(tail_config(), clock=lambda: clock[0])
    n = sum(b.num_rows for b in batches)
    out = 0
    per_span: list[float] = []
    t0 = time.perf_counter()
    for b in batches:
        out += sampler.process(b).batch.num_rows
        clock[0] += 0.25
        st = sampler.stats()
        if st["spans_held"]:
            per_span.append(st["bytes_held_spans"] / st["spans_held"])
    clock[0] += 60.0
    out += sampler.flush().num_rows
    dt = time.perf_counter() - t0
    st = sampler.stats()
    st["bytes_per_held_span_max"] = max(per_span, default=0.0)
    st["bytes_per_held_span_median"] = statistics.median(per_span) if per_span else 0.0
    st["spans_out"] = out
    return n, dt, st


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 100_000 if quick else 1_000_000
    batch = head_batch(n)
    ints, rows, cases = sdk_inputs(batch, 100_000)
    results = []

    ratio = TraceIdRatio(0.1)
    time_mask(ratio, batch)
    k, k_all = median_rate(lambda: time_mask(ratio, batch), runs)
    p, p_all = median_rate(lambda: sdk_ratio(ints, 0.1), runs)
    results.append(Result(
        f"TraceIdRatio(0.1).sample_mask over {n:,} spans", "spans/s", k, p,
        "opentelemetry-sdk TraceIdRatioBased.should_sample per span",
        ">= 50,000,000 spans/s", k >= 5e7, runs, "decisions identical to the SDK's (tested)",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    cfg = SamplingConfig(base_rate=0.01, slow_rate=0.5, error_rate=1.0,
                         slow_threshold_ms=1000)
    adaptive = AdaptiveSamplingStrategy(cfg)
    time_mask(adaptive, batch)
    k, k_all = median_rate(lambda: time_mask(adaptive, batch), runs)
    p, p_all = median_rate(lambda: sdk_priority(rows, cfg), runs)
    results.append(Result(
        f"adaptive priority sample_mask over {n:,} spans", "spans/s", k, p,
        "per span: pick the class rate, then the SDK's TraceIdRatioBased",
        ">= 50,000,000 spans/s", k >= 5e7, runs, "2 % errors, 10 % slow",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    pb = ParentBased(TraceIdRatio(0.1))
    time_mask(pb, batch)
    k, k_all = median_rate(lambda: time_mask(pb, batch), runs)
    p, p_all = median_rate(lambda: sdk_parent_based(cases, 0.1), runs)
    results.append(Result(
        f"ParentBased(TraceIdRatio(0.1)).sample_mask over {n:,} spans", "spans/s", k, p,
        "opentelemetry-sdk ParentBased(TraceIdRatioBased).should_sample per span", None,
        None, runs, "70 % children, half of them of remote parents",
        {"knhk_runs": k_all, "peer_runs": p_all}))

    stage = TraceIdRatio(0.1)
    k, k_all = median_rate(lambda: time_process(stage, batch), runs)
    results.append(Result(
        f"TraceIdRatio(0.1) as a stage: mask + knhk=p in trace_state + filter, {n:,} spans",
        "spans/s", k, None, None, None, None, runs, "", {"knhk_runs": k_all}))

    tn = 200_000 if quick else 1_000_000
    batches = trace_batches(tn)
    run_tail(batches[: max(1, len(batches) // 10)])   # warm up
    rates, extra = [], {}
    for _ in range(3 if quick else 5):
        m, dt, extra = run_tail(batches)
        rates.append(m / dt)
    k = statistics.median(rates)
    results.append(Result(
        f"tail sampling, {tn:,} spans in traces of 20, 1,000 traces interleaved",
        "spans/s", k, None, "none in Python (the Collector's tail_sampling is Go)",
        ">= 2,000,000 spans/s", k >= 2e6, len(rates),
        f"4 policies (status_code, latency, string_attribute, probabilistic); held spans "
        f"{extra['bytes_per_held_span_median']:.0f} bytes each (median over the run, max "
        f"{extra['bytes_per_held_span_max']:.0f}: Arrow rows + an 8-byte tag); trace state "
        f"{extra['bytes_state']:,} bytes fixed for num_traces=20,000 and the two 100,000-entry "
        "decision caches",
        {"runs": rates, "bytes_per_held_span_median": extra["bytes_per_held_span_median"],
         "bytes_per_held_span_max": extra["bytes_per_held_span_max"],
         "bytes_state": extra["bytes_state"], "traces_sampled": extra["traces_sampled"],
         "spans_out": extra["spans_out"]}))
    return results


# -- pytest-benchmark form ----------------------------------------------------------


@pytest.fixture(scope="module", params=[100_000, 1_000_000], ids=["1e5", "1e6"])
def batch(request):
    return head_batch(request.param)


@pytest.fixture(scope="module")
def sdk_data():
    return sdk_inputs(head_batch(100_000), 100_000)


def _rate(benchmark, n):
    benchmark.extra_info["spans_per_s"] = n / benchmark.stats.stats.median


def test_trace_id_ratio_mask(benchmark, batch, sdk_data):
    s = TraceIdRatio(0.1)
    benchmark(s.sample_mask, batch)
    _rate(benchmark, batch.num_rows)
    n, dt = sdk_ratio(sdk_data[0], 0.1)
    benchmark.extra_info["ratio_vs_otel_sdk"] = benchmark.extra_info["spans_per_s"] / (n / dt)


def test_adaptive_priority_mask(benchmark, batch, sdk_data):
    cfg = SamplingConfig(base_rate=0.01, slow_rate=0.5, slow_threshold_ms=1000)
    s = AdaptiveSamplingStrategy(cfg)
    benchmark(s.sample_mask, batch)
    _rate(benchmark, batch.num_rows)
    n, dt = sdk_priority(sdk_data[1], cfg)
    benchmark.extra_info["ratio_vs_otel_sdk"] = benchmark.extra_info["spans_per_s"] / (n / dt)


def test_parent_based_mask(benchmark, batch, sdk_data):
    s = ParentBased(TraceIdRatio(0.1))
    benchmark(s.sample_mask, batch)
    _rate(benchmark, batch.num_rows)
    n, dt = sdk_parent_based(sdk_data[2], 0.1)
    benchmark.extra_info["ratio_vs_otel_sdk"] = benchmark.extra_info["spans_per_s"] / (n / dt)


def test_otel_sdk_trace_id_ratio_per_span(benchmark, sdk_data):
    benchmark.pedantic(sdk_ratio, args=(sdk_data[0], 0.1), rounds=3)
    _rate(benchmark, len(sdk_data[0]))


@pytest.mark.parametrize("n", [100_000, 1_000_000], ids=["1e5", "1e6"])
def test_tail_sampling(benchmark, n):
    batches = trace_batches(n)
    out = benchmark.pedantic(run_tail, args=(batches,), rounds=3, iterations=1,
                             warmup_rounds=1)
    _rate(benchmark, n)
    benchmark.extra_info["bytes_per_held_span_max"] = out[2]["bytes_per_held_span_max"]
    benchmark.extra_info["bytes_state"] = out[2]["bytes_state"]


if __name__ == "__main__":
    for r in scenarios(quick="--quick" in sys.argv):
        print(r.as_dict())
