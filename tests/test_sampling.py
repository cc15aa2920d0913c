"""Head samplers: decisions against opentelemetry-sdk, rate control, adjusted counts.

The ratio and parent-based samplers are checked against the real
``opentelemetry-sdk`` samplers over random ids; ``th`` encoding against the
values printed in the OpenTelemetry probability-sampling specification; rate
control with a fake clock, so no test sleeps.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    TraceIdRatioBased,
)
from opentelemetry.sdk.trace.sampling import (
    ParentBased as SdkParentBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

import knhk
from knhk._sampling_common import with_probability as _with_probability
from knhk.sampling import (
    AdaptivePrioritySampler,
    AdaptiveSamplingStrategy,
    AlwaysOff,
    AlwaysOn,
    ParentBased,
    SamplingConfig,
    SamplingDecision,
    TraceIdRatio,
    adjusted_counts,
    encode_threshold,
    parse_threshold,
    probability_to_threshold,
    reweighted_sum,
    sampler_from_env,
    sampling_probability,
    threshold_to_probability,
    trace_id_ratio_mask,
)

TWO56 = 1 << 56


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16), dtype=np.uint8)


def make_batch(ids: np.ndarray, *, status=None, duration_ns=None, parent=None, flags=None,
               trace_state=None) -> knhk.SpanBatch:
    n = len(ids)
    span_ids = (np.arange(1, n + 1, dtype=np.uint64)).astype(">u8").view(np.uint8)
    cols = {
        "trace_id": ids,
        "span_id": span_ids.reshape(n, 8),
        "name": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                               pa.array(["op"])),
        "start_time_ns": np.zeros(n, np.int64),
        "duration_ns": np.ones(n, np.int64) if duration_ns is None else duration_ns,
    }
    if status is not None:
        cols["status_code"] = np.asarray(status, np.int8)
    if parent is not None:
        cols["parent_span_id"] = pa.array(parent, pa.binary(8))
    if flags is not None:
        cols["flags"] = np.asarray(flags, np.uint32)
    if trace_state is not None:
        cols["trace_state"] = pa.array(trace_state, pa.string())
    return knhk.SpanBatch(cols)


def ints(ids: np.ndarray) -> list[int]:
    return [int.from_bytes(r.tobytes(), "big") for r in ids]


# -- TraceIdRatio against opentelemetry-sdk ------------------------------------------


SDK_RATES = [0.0, 1e-6, 0.1, 1 / 3, 0.5, 0.9999, 1.0, 2.0**-64, 1 - 2.0**-53]


@pytest.fixture(scope="module")
def hundred_thousand_ids() -> np.ndarray:
    ids = random_ids(100_000, seed=7)
    # Trace ids at the decision boundaries of the rates above.
    for j, rate in enumerate(SDK_RATES):
        b = TraceIdRatioBased.get_bound_for_rate(rate)
        for d, v in enumerate((b - 1, b, b + 1)):
            if 0 <= v < 1 << 64:
                ids[3 * j + d, 8:] = np.frombuffer(v.to_bytes(8, "big"), np.uint8)
    return ids


@pytest.mark.parametrize("rate", SDK_RATES)
def test_trace_id_ratio_decides_as_the_sdk_over_100k_ids(hundred_thousand_ids, rate):
    ids = hundred_thousand_ids
    sdk = TraceIdRatioBased(rate)
    expected = np.array([sdk.should_sample(None, t, "op").decision.is_sampled()
                         for t in ints(ids)])
    ours = TraceIdRatio(rate)
    mask = ours.sample_mask(make_batch(ids))
    np.testing.assert_array_equal(mask, expected)
    assert ours.bound == sdk.bound
    assert ours.stats()["sample_count"] == int(expected.sum())


def test_per_span_decision_is_the_batch_decision():
    ids = random_ids(300, seed=3)
    batch = make_batch(ids)
    for s in (TraceIdRatio(0.37), TraceIdRatio(0.37, rule="consistent")):
        mask = s.sample_mask(batch)
        per_span = [s.should_sample(sp) == SamplingDecision.SAMPLE for sp in batch.to_spans()]
        assert per_span == mask.tolist()


@settings(max_examples=60, deadline=None)
@given(r1=st.floats(0, 1), r2=st.floats(0, 1), rule=st.sampled_from(["traceidratio",
                                                                       "consistent"]))
def test_a_higher_rate_keeps_a_superset(r1, r2, rule):
    lo, hi = sorted((r1, r2))
    batch = make_batch(random_ids(2000, seed=11))
    m_lo = TraceIdRatio(lo, rule=rule).sample_mask(batch)
    m_hi = TraceIdRatio(hi, rule=rule).sample_mask(batch)
    assert not (m_lo & ~m_hi).any()


def test_every_span_of_a_trace_gets_the_same_decision():
    traces = random_ids(500, seed=5)
    ids = np.repeat(traces, 6, axis=0)
    rng = np.random.default_rng(1)
    batch = make_batch(ids, status=rng.integers(0, 2, ids.shape[0]),
                       duration_ns=rng.integers(0, 10, ids.shape[0]))
    for s in (TraceIdRatio(0.3), TraceIdRatio(0.3, rule="consistent"),
              AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.3))):
        mask = s.sample_mask(batch).reshape(500, 6)
        assert (mask.all(axis=1) | ~mask.any(axis=1)).all()
        assert 0 < mask[:, 0].sum() < 500


def test_trace_id_ratio_mask_helper_agrees_with_the_sampler():
    ids = random_ids(5000, seed=2)
    low = ids[:, 8:].copy().view(">u8").ravel().astype(np.uint64)
    rates = np.random.default_rng(0).choice([0.0, 0.2, 0.7, 1.0], size=5000)
    mask = trace_id_ratio_mask(low, rates)
    for r in (0.0, 0.2, 0.7, 1.0):
        sel = rates == r
        np.testing.assert_array_equal(mask[sel],
                                      TraceIdRatio(r).sample_mask(make_batch(ids[sel])))


def test_consistent_rule_keeps_randomness_at_or_above_the_threshold():
    ids = random_ids(20000, seed=9)
    r = ids[:, 9:].copy()
    r = np.concatenate([np.zeros((len(ids), 1), np.uint8), r], axis=1).view(">u8").ravel()
    for p in (0.01, 0.25, 0.5, 0.9):
        th = probability_to_threshold(p)
        mask = TraceIdRatio(p, rule="consistent").sample_mask(make_batch(ids))
        np.testing.assert_array_equal(mask, r.astype(np.uint64) >= np.uint64(th))


# -- ParentBased against opentelemetry-sdk --------------------------------------------


def sdk_parent_context(trace_id: int, has_parent: bool, remote: bool, sampled: bool):
    if not has_parent:
        return None
    ctx = SpanContext(trace_id, 0xABC, is_remote=remote,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return set_span_in_context(NonRecordingSpan(ctx))


@pytest.mark.parametrize("delegates", [
    {},
    {"remote_parent_not_sampled": ALWAYS_ON, "local_parent_sampled": ALWAYS_OFF},
    {"remote_parent_sampled": TraceIdRatioBased(0.5),
     "local_parent_not_sampled": TraceIdRatioBased(0.2)},
])
def test_parent_based_decides_as_the_sdk(delegates):
    rng = random.Random(4)
    n = 4000
    ids = random_ids(n, seed=8)
    has_parent = [rng.random() < 0.7 for _ in range(n)]
    remote = [rng.random() < 0.5 for _ in range(n)]
    sampled = [rng.random() < 0.5 for _ in range(n)]
    sdk = SdkParentBased(TraceIdRatioBased(0.3), **delegates)
    expected = [sdk.should_sample(sdk_parent_context(t, hp, rm, sm), t, "op")
                .decision.is_sampled()
                for t, hp, rm, sm in zip(ints(ids), has_parent, remote, sampled, strict=True)]

    def ours(d):
        if d is ALWAYS_ON:
            return AlwaysOn()
        if d is ALWAYS_OFF:
            return AlwaysOff()
        return TraceIdRatio(d.rate)

    sampler = ParentBased(TraceIdRatio(0.3), **{k: ours(v) for k, v in delegates.items()})
    flags = [(0x1 if sm else 0) | (0x300 if rm else 0x100) for rm, sm in
             zip(remote, sampled, strict=True)]
    batch = make_batch(ids, parent=[b"\x00\x00\x00\x00\x00\x00\x0a\xbc" if hp else None
                                    for hp in has_parent], flags=flags)
    assert sampler.sample_mask(batch).tolist() == expected
    assert [sampler.should_sample(s) == SamplingDecision.SAMPLE
            for s in batch.to_spans()] == expected


def test_parent_based_unknown_remoteness_counts_as_local():
    s = ParentBased(AlwaysOn(), local_parent_sampled=AlwaysOff(),
                    remote_parent_sampled=AlwaysOn())
    child = knhk.Span("c", trace_id=1, span_id=2, parent_span_id=1, flags=0x1)
    assert s.should_sample(child) == SamplingDecision.DROP
    remote_child = knhk.Span("c", trace_id=1, span_id=2, parent_span_id=1, flags=0x301)
    assert s.should_sample(remote_child) == SamplingDecision.SAMPLE


# -- thresholds and trace_state ----------------------------------------------------------


@pytest.mark.parametrize(("p", "th"), [(1.0, "0"), (0.5, "8"), (0.25, "c"), (0.125, "e"),
                                       (0.0625, "f")])
def test_exact_thresholds_from_the_spec_table(p, th):
    assert encode_threshold(probability_to_threshold(p)) == th
    assert threshold_to_probability(parse_threshold(th)) == p


def test_rounded_thresholds_from_the_spec_read_back_as_their_probability():
    # Rows of the spec's table (precision 5): th -> actual probability.
    for th, prob in (("fd70a4", 0.009999990463256836), ("e6666", 0.10000038146972656),
                     ("ffbe76d", 0.000999998301267624), ("aaaab", 0.33333301544189453)):
        assert threshold_to_probability(parse_threshold(th)) == pytest.approx(prob, rel=1e-12)
    # Full precision of 1 %: within one unit of 2**-56 of the exact threshold.
    assert abs(probability_to_threshold(0.01) - 0.99 * TWO56) <= 1
    assert encode_threshold(probability_to_threshold(0.01)).startswith("fd70a3d70a3d7")


@pytest.mark.parametrize("bad", ["", "123456789abcdef", "xyz", "-1", "+8", "8_0", " 8", "C"])
def test_invalid_th_values_are_not_thresholds(bad):
    assert parse_threshold(bad) is None


@pytest.mark.parametrize(("ts", "p", "rule", "out"), [
    # A traceidratio decision is not made on R: knhk=p, never th.
    (None, 0.25, "traceidratio", "knhk=p:0.25"),
    ("vendor=x", 0.25, "traceidratio", "knhk=p:0.25,vendor=x"),
    ("v=1,ot=rv:abcdef01234567", 0.5, "traceidratio", "ot=rv:abcdef01234567,knhk=p:0.5,v=1"),
    # Two traceidratio stages: nested kept sets, the smaller probability.
    ("knhk=p:0.5,v=1", 0.25, "traceidratio", "knhk=p:0.25,v=1"),
    ("knhk=p:0.125", 0.25, "traceidratio", "knhk=p:0.125"),
    ("knhk=p:0.5;x:1", float("nan"), "traceidratio", "knhk=x:1"),  # unknown: erased
    # The consistent rule: the spec's th, the larger threshold wins.
    (None, 0.25, "consistent", "ot=th:c"),
    ("ot=th:8;rv:abcdef01234567,v=1", 0.25, "consistent", "ot=th:c;rv:abcdef01234567,v=1"),
    ("ot=th:e,v=1", 0.25, "consistent", "ot=th:e,v=1"),       # upstream stricter: kept
    # The other kind upstream: no exact combination, so unknown (both erased).
    ("ot=th:8;rv:abcdef01234567,v=1", 0.25, "traceidratio", "ot=rv:abcdef01234567,v=1"),
    ("knhk=p:0.5,v=1", 0.25, "consistent", "v=1"),
    ("knhk=p:0.5,v=1", 0.5, "consistent", "v=1"),
    # Certain: unchanged, whatever the upstream kind.
    ("ot=th:8,v=1", 1.0, "traceidratio", "ot=th:8,v=1"),
    ("knhk=p:0.5", 1.0, "consistent", "knhk=p:0.5"),
    ("ot=th:8", float("nan"), "traceidratio", None),           # unknown: erased
    (None, 1.0, "consistent", None),
])
def test_trace_state_update_rules(ts, p, rule, out):
    assert _with_probability(ts, p, rule) == out


@pytest.mark.parametrize(("ts", "want"), [
    ("knhk=p:0.25", 0.25),
    ("v=1,knhk=p:5e-05;x:y", 5e-05),
    ("ot=th:c", 0.25),
    ("ot=th:c,knhk=p:0.25", math.nan),   # both kinds: knhk never writes that
    ("knhk=p:0", math.nan),
    ("knhk=p:1.5", math.nan),
    ("knhk=p:-0.5", math.nan),
    ("knhk=p:nan", math.nan),
    ("knhk=p:0x1", math.nan),
    ("knhk=q:0.5", math.nan),
    (None, math.nan),
])
def test_recorded_probabilities_are_read_from_either_kind(ts, want):
    b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=1, trace_state=ts)])
    got = sampling_probability(b)[0]
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_traceidratio_stage_never_writes_th():
    # A th claims a decision on R; the default rule decides on the low 64 bits.
    batch = make_batch(random_ids(2000, seed=13), trace_state=["ot=rv:abcdef01234567"] * 2000)
    r = TraceIdRatio(0.3).process(batch)
    states = set(r.batch.filter(r.mask).column("trace_state").to_pylist())
    assert states == {"ot=rv:abcdef01234567,knhk=p:" + repr(round(0.3 * 2**64) / 2**64)}
    assert np.allclose(sampling_probability(r.batch.filter(r.mask)), 0.3)


def test_process_writes_th_on_kept_rows_and_keeps_other_state():
    ids = random_ids(2000, seed=12)
    states = ["vendor=a" if i % 3 == 0 else None for i in range(2000)]
    batch = make_batch(ids, trace_state=states)
    result = TraceIdRatio(0.25).process(batch)
    kept = result.batch.filter(result.mask)
    assert 300 < kept.num_rows < 700
    got = kept.column("trace_state").to_pylist()
    want = [("knhk=p:0.25,vendor=a" if s else "knhk=p:0.25")
            for s, m in zip(states, result.mask, strict=True) if m]
    assert got == want
    assert kept.schema.equals(knhk.SPAN_SCHEMA)
    # The input batch is not changed.
    assert batch.column("trace_state").to_pylist() == states


def test_record_probability_off_leaves_trace_state_alone():
    batch = make_batch(random_ids(100, seed=1))
    out = TraceIdRatio(0.5, record_probability=False).process(batch).batch
    assert out.column("trace_state").null_count == 100


# -- adjusted counts ----------------------------------------------------------------------


def test_reweighted_counts_are_unbiased_under_priority_sampling():
    n = 200_000
    rng = np.random.default_rng(21)
    status = np.where(rng.random(n) < 0.02, 2, 0)
    dur = np.where(rng.random(n) < 0.1, 2_000_000, 1_000)
    values = rng.exponential(50.0, n)
    batch = make_batch(random_ids(n, seed=22), status=status, duration_ns=dur)
    s = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.05, slow_rate=0.5,
                                                slow_threshold_ms=1.0))
    res = s.process(batch)
    kept = res.batch.filter(res.mask)
    w = adjusted_counts(kept)
    # Error spans are kept with certainty and carry no th (adjusted count 1).
    kept_status = kept.column("status_code").to_numpy()
    assert (w[kept_status == 2] == 1.0).all()
    assert np.isnan(sampling_probability(kept)[kept_status == 2]).all()
    assert set(np.round(w[kept_status != 2], 6)) == {2.0, 20.0}
    est_n = reweighted_sum(kept)
    est_v = reweighted_sum(kept, values[res.mask])
    # Horvitz-Thompson: within 4 standard errors (about 2 % here).
    assert est_n == pytest.approx(n, rel=0.02)
    assert est_v == pytest.approx(values.sum(), rel=0.03)
    assert kept.num_rows < n / 4


def test_reweighted_sum_checks_its_values():
    b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=1,
                                             trace_state="ot=th:8")])
    assert reweighted_sum(b, pa.array([3.0])) == 6.0
    assert math.isnan(adjusted_counts(b.slice(0, 0), missing=math.nan).sum() + math.nan)
    with pytest.raises(ValueError, match="one entry per span"):
        reweighted_sum(b, [1.0, 2.0])


# -- adaptive priority -----------------------------------------------------------------


def test_priority_classes_and_stats():
    ids = random_ids(30000, seed=31)
    rng = np.random.default_rng(3)
    status = np.where(rng.random(30000) < 0.1, 2, rng.integers(0, 2, 30000))
    dur = rng.integers(0, 3_000_000, 30000)
    s = AdaptivePrioritySampler(SamplingConfig(base_rate=0.1, slow_rate=0.5, error_rate=1.0,
                                               slow_threshold_ms=2.0))
    mask = s.sample_mask(make_batch(ids, status=status, duration_ns=dur))
    err = status == 2
    slow = ~err & (dur >= 2_000_000)
    base = ~err & ~slow
    assert mask[err].all()
    for cls, rate in ((slow, 0.5), (base, 0.1)):
        np.testing.assert_array_equal(mask[cls], TraceIdRatio(rate).sample_mask(
            make_batch(ids[cls])))
    st_ = s.stats()
    assert st_["error_count"] == int(err.sum())
    assert st_["slow_count"] == int(slow.sum())
    assert st_["sample_count"] == int(mask.sum())
    assert st_["drop_count"] == 30000 - int(mask.sum())
    assert st_["effective_rate"] == pytest.approx(mask.mean())
    assert st_["current_base_rate"] == 0.1


def test_adaptive_per_span_decisions_match_the_mask():
    ids = random_ids(400, seed=41)
    rng = np.random.default_rng(4)
    batch = make_batch(ids, status=rng.integers(0, 3, 400),
                       duration_ns=rng.integers(0, 2_000_000, 400))
    cfg = SamplingConfig(base_rate=0.2, slow_rate=0.6, error_rate=0.9, slow_threshold_ms=1.0)
    mask = AdaptiveSamplingStrategy(cfg).sample_mask(batch)
    one = AdaptiveSamplingStrategy(cfg)
    assert [one.should_sample(s) == SamplingDecision.SAMPLE
            for s in batch.to_spans()] == mask.tolist()


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run_load(sampler, clock, loads, seed=0, error_frac=0.0):
    """One batch per interval with ``loads[i]`` spans; the kept count of each."""
    kept, rates = [], []
    for i, n in enumerate(loads):
        ids = random_ids(n, seed=seed * 1000 + i)
        status = np.where(np.arange(n) < int(n * error_frac), 2, 0)
        mask = sampler.sample_mask(make_batch(ids, status=status))
        kept.append(int(mask.sum()))
        rates.append(sampler.current_base_rate)
        clock.t += 1.0
    return np.array(kept), np.array(rates)


def test_rate_control_converges_on_a_steady_load_without_oscillating():
    clock = FakeClock()
    s = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.01, target_spans_per_second=2000,
                                                adjust_interval_s=1.0), clock=clock)
    kept, rates = run_load(s, clock, [20000] * 8)
    assert kept[0] < 400                       # the initial 1 %
    within = np.abs(kept - 2000) / 2000 <= 0.10
    assert within[1:5].any() and within[np.argmax(within):].all()
    # One estimate of a steady load: the rate moves once and stays.
    assert np.allclose(rates[1:], rates[1], rtol=0.05)
    assert s.stats()["rate_adjustments"] == 7


@pytest.mark.parametrize("factor", [10, 0.1])
def test_rate_control_follows_a_10x_load_step(factor):
    clock = FakeClock()
    s = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.05, target_spans_per_second=1500,
                                                min_rate=1e-4), clock=clock)
    base = 20000
    loads = [base] * 4 + [int(base * factor)] * 7
    kept, rates = run_load(s, clock, loads, seed=1)
    after = kept[4:]
    ok = np.abs(after - 1500) / 1500 <= 0.10
    first = int(np.argmax(ok))
    assert ok.any() and first <= 5 and ok[first:].all(), after
    # The base rate moves monotonically towards the new equilibrium: no overshoot.
    steps = np.diff(rates[4:])
    assert (steps <= 1e-12).all() if factor > 1 else (steps >= -1e-12).all()


def test_rate_control_respects_min_max_and_counts_fixed_classes():
    clock = FakeClock()
    hi = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.1, target_spans_per_second=1e9,
                                                 max_rate=0.4), clock=clock)
    run_load(hi, clock, [5000] * 3)
    assert hi.current_base_rate == 0.4
    clock = FakeClock()
    lo = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.1, target_spans_per_second=1,
                                                 min_rate=0.002), clock=clock)
    run_load(lo, clock, [5000] * 3)
    assert lo.current_base_rate == 0.002
    # Half the load is errors kept at 100 %: a target of 5500 spans/s leaves
    # 500/s for the 5000/s ordinary spans.
    clock = FakeClock()
    mixed = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.5,
                                                    target_spans_per_second=5500), clock=clock)
    run_load(mixed, clock, [10000] * 3, error_frac=0.5)
    assert mixed.current_base_rate == pytest.approx(0.1, rel=1e-9)


def test_backpressure_scales_the_base_rate_down():
    s = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.2, min_rate=0.01))
    s.on_pressure(0.4)
    assert s.current_base_rate == 0.2
    s.on_pressure(0.75)
    assert s.current_base_rate == pytest.approx(0.1)
    s.on_pressure(1.0)
    assert s.current_base_rate == 0.01
    s.on_pressure(0.0)
    assert s.current_base_rate == 0.2
    # A base rate below min_rate is never raised by pressure.
    z = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.0, min_rate=0.01))
    z.on_pressure(0.9)
    assert z.current_base_rate == 0.0
    assert not z.sample_mask(make_batch(random_ids(1000, seed=1))).any()


# -- configuration errors -------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"base_rate": 1.5}, "base_rate must be a rate in [0, 1]"),
    ({"error_rate": -0.1}, "error_rate"),
    ({"slow_rate": float("nan")}, "slow_rate"),
    ({"base_rate": True}, "base_rate"),
    ({"slow_threshold_ms": -1}, "slow_threshold_ms must be a number >= 0"),
    ({"min_rate": 0.5, "max_rate": 0.1}, "must not exceed max_rate"),
    ({"target_spans_per_second": 0}, "target_spans_per_second"),
    ({"adjust_interval_s": 0}, "adjust_interval_s"),
    ({"smoothing": 0}, "smoothing"),
    ({"rule": "nope"}, "'traceidratio' or 'consistent'"),
])
def test_bad_sampling_config_is_a_full_sentence(kwargs, words):
    with pytest.raises(ValueError, match=None) as err:
        SamplingConfig(**kwargs)
    assert words in str(err.value)
    assert str(err.value).endswith(".")


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match=r"rate in \[0, 1\]"):
        TraceIdRatio(1.01)
    with pytest.raises(ValueError, match="head sampler"):
        ParentBased("always")
    with pytest.raises(ValueError, match="share one rule"):
        ParentBased(TraceIdRatio(0.5), remote_parent_sampled=TraceIdRatio(0.5,
                                                                          rule="consistent"))
    with pytest.raises(ValueError, match="SamplingConfig"):
        AdaptiveSamplingStrategy({"base_rate": 0.1})


# -- environment ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "arg"), [
    ("always_on", None), ("always_off", None), ("traceidratio", "0.25"),
    ("parentbased_always_on", None), ("parentbased_always_off", None),
    ("parentbased_traceidratio", "0.6"), ("traceidratio", None), ("TraceIdRatio", "0.1"),
])
def test_env_sampler_decides_as_the_sdk_configured_from_the_same_env(monkeypatch, name, arg):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    sdk = TracerProvider().sampler
    ours = sampler_from_env()
    ids = random_ids(3000, seed=17)
    expected = [sdk.should_sample(None, t, "op").decision.is_sampled() for t in ints(ids)]
    assert ours.sample_mask(make_batch(ids)).tolist() == expected


def test_env_sampler_is_lenient(caplog):
    assert sampler_from_env({}) is None
    with caplog.at_level(logging.WARNING, logger="knhk.sampling"):
        assert sampler_from_env({"OTEL_TRACES_SAMPLER": "jaeger_remote"}) is None
        s = sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio",
                              "OTEL_TRACES_SAMPLER_ARG": "1.5"})
    assert s.rate == 1.0
    assert "jaeger_remote" in caplog.text and "OTEL_TRACES_SAMPLER_ARG" in caplog.text


# -- in a pipeline ----------------------------------------------------------------------


def test_pipeline_exports_what_the_adaptive_sampler_keeps(pipeline_factory):
    sink = knhk.InMemoryExporter()
    cfg = SamplingConfig(base_rate=0.3, slow_rate=1.0, slow_threshold_ms=1.0)
    p = pipeline_factory(lambda b: b.with_batch_size(500).with_adaptive_sampling(cfg)
                         .with_exporter(sink))
    ids = random_ids(2000, seed=51)
    dur = np.where(np.arange(2000) % 10 == 0, 5_000_000, 10)
    batch = make_batch(ids, duration_ns=dur)
    assert p.record_batch(batch) == 2000
    assert p.shutdown()
    expected = AdaptiveSamplingStrategy(cfg).sample_mask(batch)
    out = sink.spans()
    assert sorted(out.column("span_id").to_pylist()) == \
        sorted(batch.filter(expected).column("span_id").to_pylist())
    th = sampling_probability(out)
    slow = out.duration_ns() >= 1_000_000
    assert np.isnan(th[slow]).all()
    assert np.allclose(th[~slow], 0.3)
    assert p.stats().events_sampled_out == 2000 - int(expected.sum())


def test_head_samplers_work_as_pipeline_stages(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_stage(TraceIdRatio(0.5)).with_exporter(sink))
    ids = random_ids(1000, seed=61)
    p.record_batch(make_batch(ids))
    assert p.shutdown()
    assert sink.spans().num_rows == int(TraceIdRatio(0.5).sample_mask(make_batch(ids)).sum())
    assert set(sink.spans().column("trace_state").to_pylist()) == {"knhk=p:0.5"}


def test_descriptions_name_the_configuration():
    assert TraceIdRatio(0.5).description == "TraceIdRatio{0.5}"
    assert ParentBased(AlwaysOn()).description.startswith(
        "ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler")
    assert "slow:0.5@1000.0ms" in AdaptiveSamplingStrategy().description
