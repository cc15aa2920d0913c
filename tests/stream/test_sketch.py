"""DDSketch: the relative-error guarantee on adversarial data, and exact merges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from knhk.stream import StreamProcessor, WindowConfig
from knhk.stream.sketch import DDSketch

QS = [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]

value_st = st.one_of(st.floats(1e-6, 1e9), st.sampled_from([1e-6, 1.0, 7.25, 1e9]))
data_st = arrays(np.float64, st.integers(1, 400), elements=value_st)


def within(sketch, data, alpha):
    s = np.sort(data)
    est = sketch.quantiles(QS)
    true = s[np.floor(np.array(QS) * (s.size - 1)).astype(int)]
    # alpha, plus a few ulps for values exactly on a bucket boundary
    assert np.all(np.abs(est - true) <= alpha * true * (1 + 1e-9)), (est, true)


@settings(max_examples=100, deadline=None)
@given(data_st, st.sampled_from([0.01, 0.05, 0.001]))
def test_relative_error_guarantee(data, alpha):
    # enough buckets for 1e-6..1e9 at every alpha tried: nothing collapses
    sk = DDSketch(alpha, max_buckets=20_000)
    sk.add(data)
    within(sk, data, alpha)
    assert (sk.count, sk.min, sk.max) == (data.size, data.min(), data.max())


@pytest.mark.parametrize("name", ["pareto", "lognormal", "identical", "bimodal", "tiny"])
def test_adversarial_distributions(name):
    rng = np.random.default_rng(5)
    data = {
        "pareto": (rng.pareto(0.5, 50_000) + 1) * 1e-3,      # infinite-mean heavy tail
        "lognormal": rng.lognormal(0, 4, 50_000),
        "identical": np.full(50_000, 123.456),
        "bimodal": np.where(rng.random(50_000) < 0.99, 1.0, 1e6),
        "tiny": rng.uniform(1e-6, 2e-6, 50_000),
    }[name]
    data = data[data <= 1e9]
    sk = DDSketch(0.01)
    for chunk in np.array_split(data, 7):
        sk.add(chunk)
    within(sk, data, 0.01)
    assert sk.nbytes <= 2048 * 8


@settings(max_examples=100, deadline=None)
@given(data_st, data_st)
def test_merge_is_exact(a, b):
    sa, sb, sab = DDSketch(), DDSketch(), DDSketch()
    sa.add(a)
    sb.add(b)
    sab.add(np.concatenate([a, b]))
    m = sa.merged(sb)
    assert m.buckets() == sab.buckets()
    assert (m.zero_count, m.count, m.min, m.max) == (sab.zero_count, sab.count, sab.min, sab.max)
    np.testing.assert_array_equal(m.quantiles(QS), sab.quantiles(QS))
    assert m.sum == pytest.approx(sab.sum, rel=1e-12)


def test_bounded_memory_collapses_lowest_buckets():
    sk = DDSketch(0.01, max_buckets=64)
    data = np.geomspace(1e-6, 1e9, 10_000)
    sk.add(data)
    assert len(sk.buckets()) <= 64 and sk.count == 10_000
    # the top quantiles keep the guarantee
    s = np.sort(data)
    for q in (0.99, 1.0):
        true = s[int(np.floor(q * (s.size - 1)))]
        assert abs(sk.quantile(q) - true) <= 0.01 * true * (1 + 1e-9)


def test_zero_bucket_and_empty():
    sk = DDSketch()
    assert np.isnan(sk.quantile(0.5))
    sk.add(np.array([0.0, 0.0, 5.0]))
    assert (sk.zero_count, sk.quantile(0.0), sk.quantile(0.5)) == (2, 0.0, 0.0)


@pytest.mark.parametrize("make, message", [
    (lambda: DDSketch(0), "alpha"),
    (lambda: DDSketch(1.5), "alpha"),
    (lambda: DDSketch().add(np.array([1.0, -2.0])), "value -2.0 at index 1"),
    (lambda: DDSketch().add(np.array([np.nan])), "finite non-negative"),
    (lambda: DDSketch(0.01).merge(DDSketch(0.02)), "cannot merge"),
    (lambda: DDSketch().quantiles([1.5]), r"quantiles must be in \[0, 1\]"),
])
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_processor_sketch_mode_within_alpha_of_exact():
    rng = np.random.default_rng(3)
    import knhk
    n = 5000
    start = np.sort(rng.integers(0, 120 * 10**9, n))
    dur = (rng.lognormal(1, 2, n) * 1e6).astype(np.int64) + 1000
    batch = knhk.SpanBatch({"trace_id": rng.integers(1, 255, (n, 16), dtype=np.uint8),
                            "span_id": rng.integers(1, 255, (n, 8), dtype=np.uint8),
                            "name": ["op"] * n, "start_time_ns": start, "duration_ns": dur})
    results = {}
    for mode in ("exact", "sketch"):
        p = StreamProcessor(WindowConfig.tumbling(seconds=60), mode=mode,
                            quantiles=(0.0, 0.5, 0.99, 1.0))
        for off in range(0, n, 700):
            p.process(batch.slice(off, 700))
        p.flush()
        results[mode] = p.get_results()
    assert len(results["exact"]) == len(results["sketch"]) == 2
    for e, s in zip(results["exact"], results["sketch"], strict=True):
        assert (e.window_start, e.count, e.min, e.max) == (s.window_start, s.count, s.min, s.max)
        assert s.sum == pytest.approx(e.sum, rel=1e-9)
        # exact p0/p100 are min/max; the sketch's rank-quantile of the middle
        # differs from the interpolated one by less than alpha plus the gap
        # between neighbouring order statistics
        for name in ("p0_duration_ms", "p100_duration_ms"):
            assert getattr(s, name) == pytest.approx(getattr(e, name), rel=0.01)
        assert s.p50_duration_ms == pytest.approx(e.p50_duration_ms, rel=0.03)


@pytest.mark.parametrize("window", [WindowConfig.sliding(size=60, slide=20),
                                    WindowConfig.sliding(size=60, slide=15),
                                    WindowConfig.tumbling(seconds=30)])
def test_sketch_panes_merge_to_the_same_buckets_as_one_sketch_per_window(window):
    """Sliding windows in sketch mode merge per-pane sketches; the merged result must
    equal a sketch built directly from each window's values (exact merge)."""
    import knhk
    rng = np.random.default_rng(8)
    n = 3000
    start = np.sort(rng.integers(0, 300 * 10**9, n))
    dur = (rng.lognormal(1, 2, n) * 1e6).astype(np.int64)
    svc = rng.choice(["a", "b"], n)
    batch = knhk.SpanBatch({"trace_id": rng.integers(1, 255, (n, 16), dtype=np.uint8),
                            "span_id": rng.integers(1, 255, (n, 8), dtype=np.uint8),
                            "name": ["op"] * n, "service": svc.tolist(),
                            "start_time_ns": start, "duration_ns": dur})
    p = StreamProcessor(window, mode="sketch", group_by=("service",), quantiles=QS)
    for off in range(0, n, 400):
        p.process(batch.slice(off, 400))
    assert p.counters()["late_events"] == 0
    p.flush()
    results = p.get_results()
    rows, starts = window.assign(start)
    expected = {}
    for r, s0 in zip(rows.tolist(), starts.tolist(), strict=True):
        expected.setdefault((s0, svc[r]), []).append(dur[r] / 1e6)
    assert {(r.window_start, r.service) for r in results} == set(expected)
    for r in results:
        vals = np.array(expected[(r.window_start, r.service)])
        direct = DDSketch()
        direct.add(vals)
        assert r.count == vals.size and r.max == vals.max() and r.min == vals.min()
        got = [getattr(r, knhk.stream.quantile_name(q)) for q in QS]
        np.testing.assert_array_equal(got, direct.quantiles(QS))


def reference_collapsed(data, max_buckets, alpha=0.01):
    """Bucket counts of ``data`` with everything below the top ``max_buckets`` collapsed."""
    import math
    idx = np.ceil(np.log(data) / math.log((1 + alpha) / (1 - alpha))).astype(np.int64)
    lo = max(idx.min(), idx.max() - max_buckets + 1)
    idx = np.maximum(idx, lo)
    u, c = np.unique(idx, return_counts=True)
    return dict(zip(u.tolist(), c.tolist(), strict=True))


@settings(max_examples=100, deadline=None)
@given(st.lists(data_st, min_size=1, max_size=4), st.integers(2, 40))
def test_collapsing_matches_reference_whatever_the_order(parts, max_buckets):
    """Adding in parts or merging part sketches collapses like one pass over all values,
    as long as the top bucket's range only grows (true for any order here, since the
    final range is what counts)."""
    data = np.concatenate(parts)
    data = data[data > 1e-9]
    if data.size == 0:
        return
    parts = [p[p > 1e-9] for p in parts]
    added = DDSketch(max_buckets=max_buckets)
    for p in parts:
        added.add(p)
    merged = DDSketch(max_buckets=max_buckets)
    for p in parts:
        s = DDSketch(max_buckets=max_buckets)
        s.add(p)
        merged.merge(s)
    want = reference_collapsed(data, max_buckets)
    assert added.buckets() == want
    assert merged.buckets() == want
