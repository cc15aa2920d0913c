"""Tail sampling: trace completion, Collector policy semantics, bounded memory, late spans.

Decisions are compared with a reference written here, trace by trace and
policy by policy, after the OpenTelemetry Collector's ``tail_sampling``
processor (its policy evaluators and its final-decision rule); the
``probabilistic`` policy is checked against opentelemetry-sdk's
``TraceIdRatioBased``. Time is a fake clock throughout.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import knhk
from knhk.sampling import TraceIdRatio, adjusted_counts, reweighted_sum, sampling_probability
from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig
from knhk.workload import WorkloadConfig, generate

S, NS, IS, INS, D = "S", "NS", "IS", "INS", "D"


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def span(trace: int, sid: int, *, root: bool = False, status: int = 0, start_ms: float = 0,
         dur_ms: float = 1, attrs=None, resource=None, trace_state=None) -> knhk.Span:
    return knhk.Span("op", trace_id=trace, span_id=sid,
                     parent_span_id=None if root else 10_000 + trace,
                     status=status, start_time_ns=int(start_ms * 1e6),
                     duration_ns=int(dur_ms * 1e6), attributes=attrs,
                     resource_attributes=resource, trace_state=trace_state)


def batch(*spans: knhk.Span) -> knhk.SpanBatch:
    return knhk.SpanBatch.from_spans(list(spans))


def sampler(policies, clock=None, **kw) -> TailSampler:
    kw.setdefault("decision_wait", 10.0)
    kw.setdefault("idle_timeout", 1.0)
    kw.setdefault("tick_interval", 0)
    return TailSampler(TailSamplingConfig(policies, **kw), clock=clock or Clock())


def span_ids(b: knhk.SpanBatch) -> list[int]:
    return sorted(int.from_bytes(x, "big") for x in b.column("span_id").to_pylist())


# -- a reference evaluator, after the Collector ----------------------------------------


def _attr_hit(p: Policy, spans: list[knhk.Span]) -> bool:
    key, pr = p.params["key"], p.params
    for s in spans:
        for d in (s.attributes or {}, s.resource_attributes or {}):
            if key not in d:
                continue
            v = d[key]
            if p.type == "string_attribute" and isinstance(v, str) and v:
                if pr["enabled_regex_matching"]:
                    if any(re.search(x, v) for x in pr["values"]):
                        return True
                elif v in pr["values"]:
                    return True
            if p.type == "numeric_attribute" and isinstance(v, int | float) and \
                    not isinstance(v, bool) and \
                    (pr["min_value"] is None or v >= pr["min_value"]) and \
                    (pr["max_value"] is None or v <= pr["max_value"]):
                return True
            if p.type == "boolean_attribute" and isinstance(v, bool) and v == pr["value"]:
                return True
    return False


class Reference:
    """The Collector's evaluation, one trace at a time (stateful policies keep state)."""

    def __init__(self, policies: list[Policy]) -> None:
        self.policies = policies
        self.tokens = {p.name: p.params["burst_capacity"] for p in policies
                       if p.type == "rate_limiting"}

    def leaf(self, p: Policy, spans: list[knhk.Span], trace_id: int) -> str:
        pr = p.params
        if p.type == "always_sample":
            return S
        if p.type == "latency":
            ms = (max(s.end_time_ns for s in spans) - min(s.start_time_ns for s in spans)) \
                // 1_000_000
            hit = ms >= pr["threshold_ms"] if not pr["upper_threshold_ms"] else \
                pr["threshold_ms"] < ms <= pr["upper_threshold_ms"]
            return S if hit else NS
        if p.type == "status_code":
            codes = {"UNSET": 0, "OK": 1, "ERROR": 2}
            return S if any(int(s.status) in {codes[c] for c in pr["status_codes"]}
                            for s in spans) else NS
        if p.type == "probabilistic":
            sdk = TraceIdRatioBased(pr["sampling_percentage"] / 100.0)
            return S if sdk.should_sample(None, trace_id, "x").decision.is_sampled() else NS
        if p.type in ("string_attribute", "numeric_attribute", "boolean_attribute"):
            hit = _attr_hit(p, spans)
            if pr["invert_match"]:
                return INS if hit else IS
            return S if hit else NS
        if p.type == "and":
            return S if all(self.leaf(x, spans, trace_id) in (S, IS)
                            for x in p.sub_policies) else NS
        if p.type == "drop":
            return D if all(self.leaf(x, spans, trace_id) in (S, IS)
                            for x in p.sub_policies) else NS
        if p.type == "rate_limiting":
            if len(spans) <= self.tokens[p.name]:
                self.tokens[p.name] -= len(spans)
                return S
            return NS
        raise AssertionError(p.type)

    def decide(self, spans: list[knhk.Span], trace_id: int) -> tuple[bool, str | None]:
        first: dict[str, str] = {}
        for p in self.policies:
            d = self.leaf(p, spans, trace_id)
            first.setdefault(d, p.name)
            if d == D:
                break
        if D in first:
            return False, first[D]
        if INS in first:
            return False, None
        if S in first:
            return True, first[S]
        if IS in first and NS not in first:
            return True, first[IS]
        return False, None


KEYS = ("k.s", "k.n", "k.b", "k.x")


@st.composite
def attr_dicts(draw):
    out = {}
    for key in KEYS:
        if draw(st.booleans()):
            kind = {"k.s": "s", "k.n": draw(st.sampled_from("if")), "k.b": "b",
                    "k.x": draw(st.sampled_from("sib"))}[key]
            out[key] = {"s": lambda: draw(st.sampled_from(["a", "b", "ab", ""])),
                        "i": lambda: draw(st.integers(-3, 12)),
                        "f": lambda: draw(st.floats(-3, 12)),
                        "b": lambda: draw(st.booleans())}[kind]()
    return out or None


@st.composite
def leaf_policies(draw, name):
    t = draw(st.sampled_from(["always_sample", "latency", "status_code", "probabilistic",
                              "string_attribute", "numeric_attribute", "boolean_attribute"]))
    if t == "always_sample":
        return Policy.always_sample(name)
    if t == "latency":
        lo = draw(st.integers(0, 10))
        return Policy.latency(name, lo, draw(st.sampled_from([0, lo, lo + 3])))
    if t == "status_code":
        return Policy.status_code(name, draw(st.lists(st.sampled_from(["OK", "ERROR", "UNSET"]),
                                                      min_size=1, max_size=3)))
    if t == "probabilistic":
        return Policy.probabilistic(name, draw(st.sampled_from([0, 10, 50, 90, 100])))
    inv = draw(st.booleans())
    key = draw(st.sampled_from(KEYS))
    if t == "string_attribute":
        regex = draw(st.booleans())
        vals = draw(st.lists(st.sampled_from(["a", "b", "^a", "b$"] if regex else ["a", "b"]),
                             min_size=1, max_size=2))
        return Policy.string_attribute(name, key, vals, enabled_regex_matching=regex,
                                       invert_match=inv)
    if t == "numeric_attribute":
        lo = draw(st.one_of(st.none(), st.integers(-2, 8)))
        hi = draw(st.one_of(st.none(), st.integers(8, 12))) if lo is not None else 5
        return Policy.numeric_attribute(name, key, lo, hi, invert_match=inv)
    return Policy.boolean_attribute(name, key, draw(st.booleans()), invert_match=inv)


@st.composite
def policy_lists(draw):
    out = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["leaf", "leaf", "and", "drop", "rate"]))
        name = f"p{i}"
        if kind == "leaf":
            out.append(draw(leaf_policies(name)))
        elif kind == "rate":
            out.append(Policy.rate_limiting(name, draw(st.integers(1, 6))))
        else:
            subs = [draw(leaf_policies(f"{name}.{j}")) for j in range(draw(st.integers(1, 2)))]
            out.append(Policy.and_(name, subs) if kind == "and" else Policy.drop(name, subs))
    return out


@st.composite
def traces(draw):
    out = []
    for t in range(1, draw(st.integers(1, 7)) + 1):
        spans = []
        for j in range(draw(st.integers(1, 4))):
            spans.append(span(t * 1000003, t * 100 + j + 1, root=j == 0,
                              status=draw(st.integers(0, 2)),
                              start_ms=draw(st.integers(0, 8)),
                              dur_ms=draw(st.floats(0, 8)),
                              attrs=draw(attr_dicts()),
                              resource=draw(attr_dicts()) if draw(st.booleans()) else None))
        out.append(spans)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=policy_lists(), trs=traces(), data=st.data())
def test_decisions_match_the_collector_reference(policies, trs, data):
    # Interleave the traces' spans; every trace is complete when decided.
    flat = [s for tr in trs for s in tr]
    order = data.draw(st.permutations(range(len(flat))))
    spans = [flat[i] for i in order]
    seen: list[int] = []
    for s in spans:
        t = int.from_bytes(s.trace_id, "big")
        if t not in seen:
            seen.append(t)
    by_trace = defaultdict(list)
    for s in spans:
        by_trace[int.from_bytes(s.trace_id, "big")].append(s)
    ref = Reference(policies)
    expected = {t: ref.decide(by_trace[t], t) for t in seen}   # in first-arrival order

    clock = Clock()
    live = sampler(policies, clock)
    assert live.process(batch(*spans)).batch.num_rows == 0
    out = live.flush()
    kept = {int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()}
    assert kept == {t for t, (k, _) in expected.items() if k}
    # Whole traces, each span once, with the deciding policy recorded.
    assert out.num_rows == sum(len(by_trace[t]) for t in kept)
    names = out.attribute("tailsampling.policy").to_pylist()
    tids = [int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()]
    assert all(n == expected[t][1] for n, t in zip(names, tids, strict=True))
    stats = live.stats()
    assert stats["traces_sampled"] == len(kept)
    assert stats["policy_sampled_traces"] == {
        p.name: sum(1 for k, n in expected.values() if k and n == p.name) for p in policies}

    # Offline: the same decisions for the batch taken whole.
    offline = sampler(policies, Clock()).sample_mask(batch(*spans))
    assert offline.tolist() == [expected[int.from_bytes(s.trace_id, "big")][0] for s in spans]


# -- completion and timing -----------------------------------------------------------


def test_a_trace_is_held_until_root_seen_and_idle():
    clock = Clock()
    s = sampler([Policy.always_sample("all")], clock, idle_timeout=1.0, decision_wait=10.0)
    assert s.process(batch(span(1, 1, root=True))).batch.num_rows == 0
    clock.t = 0.9
    assert s.process(batch(span(1, 2))).batch.num_rows == 0       # idle clock restarts
    clock.t = 1.5
    assert s.poll().num_rows == 0                                  # 0.6 s idle
    clock.t = 1.95
    out = s.poll()
    assert span_ids(out) == [1, 2]
    assert s.stats()["traces_pending"] == 0


def test_a_trace_without_root_waits_for_decision_wait():
    clock = Clock()
    s = sampler([Policy.always_sample("all")], clock, idle_timeout=0.5, decision_wait=5.0)
    s.process(batch(span(1, 1), span(1, 2)))
    clock.t = 4.9
    assert s.poll().num_rows == 0
    clock.t = 5.0
    assert span_ids(s.poll()) == [1, 2]


def test_decisions_wait_for_the_tick_interval():
    clock = Clock()
    s = sampler([Policy.always_sample("all")], clock, idle_timeout=0.1, tick_interval=1.0)
    s.process(batch(span(1, 1, root=True)))        # first call sweeps at t=0
    clock.t = 0.5
    assert s.poll().num_rows == 0                   # due, but the next tick is at 1.0
    clock.t = 1.0
    assert s.poll().num_rows == 1


def test_released_batch_holds_rows_of_earlier_batches():
    clock = Clock()
    s = sampler([Policy.status_code("err", ["ERROR"])], clock)
    s.process(batch(span(1, 1), span(2, 2)))
    s.process(batch(span(1, 3, status=2), span(2, 4, root=True)))
    clock.t = 2.0
    res = s.process(batch(span(1, 5, root=True)))
    assert res.batch.num_rows == 0
    assert res.counters["sampled_out"] == 2            # trace 2, root seen and idle
    clock.t = 3.5
    res = s.process(batch(span(3, 6)))
    assert span_ids(res.batch) == [1, 3, 5]
    assert "sampled_out" not in res.counters
    assert s.stats()["traces_pending"] == 1


# -- late spans and the decision cache ---------------------------------------------------


def test_late_spans_follow_the_cached_decision():
    clock = Clock()
    s = sampler([Policy.status_code("err", ["ERROR"])], clock)
    s.process(batch(span(1, 1, root=True, status=2), span(2, 2, root=True)))
    clock.t = 2.0
    assert span_ids(s.poll()) == [1]
    res = s.process(batch(span(1, 3), span(2, 4), span(1, 5)))
    assert span_ids(res.batch) == [3, 5]
    assert res.batch.attribute("tailsampling.policy").to_pylist() == ["err", "err"]
    # Trace 2's first span (dropped by the poll) and its late one: poll() returns
    # a batch only, so its counts ride on the next StageResult.
    assert res.counters["sampled_out"] == 2
    st_ = s.stats()
    assert st_["late_spans_sampled"] == 2 and st_["late_spans_not_sampled"] == 1
    assert st_["traces_pending"] == 0
    assert s.decision_for(1) == (True, "err")
    assert s.decision_for(2) == (False, None)
    assert s.decision_for(3) is None


def test_decision_cache_is_bounded_fifo_and_can_be_off():
    clock = Clock()
    s = sampler([Policy.always_sample("all")], clock, sampled_cache_size=2,
                non_sampled_cache_size=0)
    s.process(batch(*(span(t, t, root=True) for t in (1, 2, 3))))
    clock.t = 2.0
    s.poll()
    assert s.stats()["decision_cache_entries"] == 2
    assert s.decision_for(1) is None                         # evicted first
    assert s.decision_for(3) == (True, "all")
    # Trace 1's late span is a new pending trace again, as in the Collector.
    assert s.process(batch(span(1, 9))).batch.num_rows == 0
    assert s.stats()["traces_pending"] == 1
    off = sampler([Policy.always_sample("all")], Clock(), sampled_cache_size=0,
                  non_sampled_cache_size=0)
    off.process(batch(span(1, 1, root=True)))
    off.flush()
    assert off.decision_for(1) is None


# -- bounded memory ------------------------------------------------------------------


@pytest.mark.parametrize("on_full", ["decide", "drop"])
def test_num_traces_bounds_pending_traces_and_counts_early_decisions(on_full):
    clock = Clock()
    s = sampler([Policy.always_sample("all")], clock, num_traces=3, on_full=on_full,
                decision_wait=100.0)
    out = []
    for t in range(1, 11):
        res = s.process(batch(span(t, 2 * t), span(t, 2 * t + 1)))
        out += span_ids(res.batch)
        assert s.stats()["traces_pending"] <= 3
    out += span_ids(s.flush())
    st_ = s.stats()
    if on_full == "decide":
        assert st_["traces_decided_early"] == 7 and st_["traces_dropped_early"] == 0
        assert sorted(out) == list(range(2, 22))
    else:
        assert st_["traces_dropped_early"] == 7 and st_["traces_decided_early"] == 0
        # The three newest traces are the ones that were never dropped.
        assert sorted(out) == list(range(16, 22))
    assert st_["spans_held"] == 0


def test_an_early_decision_is_made_on_partial_data_and_late_spans_follow_it():
    clock = Clock()
    s = sampler([Policy.status_code("err", ["ERROR"])], clock, num_traces=1)
    s.process(batch(span(1, 1)))
    s.process(batch(span(2, 2)))                 # trace 1 decided early: no error yet
    res = s.process(batch(span(1, 3, status=2)))
    assert res.batch.num_rows == 0
    assert s.stats()["late_spans_not_sampled"] == 1
    assert s.stats()["traces_decided_early"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_traces=st.integers(1, 6))
def test_every_span_is_released_once_or_dropped_and_counted(data, num_traces):
    clock = Clock()
    s = sampler([Policy.probabilistic("half", 50), Policy.status_code("err", ["ERROR"])],
                clock, num_traces=num_traces, idle_timeout=1.0, decision_wait=3.0)
    sid = 0
    sent: dict[int, int] = {}
    released: list[int] = []
    dropped = 0
    for _ in range(data.draw(st.integers(1, 12))):
        spans = []
        for _ in range(data.draw(st.integers(0, 6))):
            sid += 1
            t = data.draw(st.integers(1, 8))
            sent[sid] = t
            spans.append(span(t, sid, root=data.draw(st.booleans()),
                              status=data.draw(st.integers(0, 2))))
        res = s.process(batch(*spans)) if spans else s.process(knhk.SpanBatch.empty())
        released += span_ids(res.batch)
        dropped += res.counters.get("sampled_out", 0)
        assert s.stats()["traces_pending"] <= num_traces
        clock.t += data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    released += span_ids(s.flush())
    st_ = s.stats()
    assert len(released) == len(set(released))
    assert set(released) <= set(sent)
    assert st_["spans_held"] == 0 and st_["traces_pending"] == 0
    assert st_["spans_received"] == len(sent)
    assert st_["spans_sampled"] == len(released)
    assert st_["spans_not_sampled"] + st_["late_spans_not_sampled"] == len(sent) - len(released)
    assert dropped <= len(sent) - len(released)
    # With the cache on, a trace is never split: all of its spans share one fate.
    fate = defaultdict(set)
    for x, t in sent.items():
        fate[t].add(x in set(released))
    assert all(len(f) == 1 for f in fate.values())


def test_flush_can_drop_pending_traces():
    s = sampler([Policy.always_sample("all")], Clock(), drop_pending_traces_on_shutdown=True)
    s.process(batch(span(1, 1), span(2, 2)))
    assert s.flush().num_rows == 0
    assert s.stats()["traces_dropped_on_shutdown"] == 2
    # What flush dropped is reported through pop_counters, once.
    assert s.pop_counters() == {"sampled_out": 2}
    assert s.pop_counters() == {}


# -- what kept spans carry ----------------------------------------------------------------


def test_kept_spans_carry_policy_and_probability():
    clock = Clock()
    prob = Policy.probabilistic("p25", 25)
    s = sampler([Policy.status_code("err", ["ERROR"]), prob], clock)
    # Random ids: the ratio rule reads their low 64 bits.
    rng = np.random.default_rng(5)
    trace_ids = [int.from_bytes(rng.bytes(16), "big") for _ in range(400)]
    s.process(batch(*(span(t, i + 1, root=True, status=2 if t % 7 == 0 else 0,
                           trace_state="v=1") for i, t in enumerate(trace_ids))))
    out = s.flush()
    pol = out.attribute("tailsampling.policy").to_pylist()
    tids = [int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()]
    p = sampling_probability(out)
    ts = out.column("trace_state").to_pylist()
    for name, t, pr, state in zip(pol, tids, p, ts, strict=True):
        if t % 7 == 0:
            assert name == "err" and math.isnan(pr) and state == "v=1"
        else:
            assert name == "p25" and pr == 0.25 and state == "knhk=p:0.25,v=1"
    sdk = TraceIdRatioBased(0.25)
    want = {t for t in trace_ids
            if t % 7 == 0 or sdk.should_sample(None, t, "x").decision.is_sampled()}
    assert set(tids) == want
    # Re-weighting counts the traces that were not sampled.
    assert adjusted_counts(out).sum() == pytest.approx(len(trace_ids), rel=0.25)


def test_rate_limited_traces_lose_their_threshold():
    s = sampler([Policy.rate_limiting("rl", 100)], Clock())
    s.process(batch(span(1, 1, root=True, trace_state="ot=th:8")))
    out = s.flush()
    assert out.column("trace_state").to_pylist() == [None]
    assert np.isnan(sampling_probability(out)).all()


def test_rate_limiting_is_a_token_bucket_of_spans():
    clock = Clock()
    s = sampler([Policy.rate_limiting("rl", 4, burst_capacity=4)], clock, idle_timeout=0.1)
    # Traces of 3 spans: the bucket of 4 admits one, then refills 4 per second.
    s.process(batch(*(span(t, 10 * t + j, root=j == 0) for t in (1, 2) for j in range(3))))
    clock.t = 0.2
    assert span_ids(s.poll()) == [10, 11, 12]
    s.process(batch(*(span(t, 10 * t + j, root=j == 0) for t in (3, 4) for j in range(3))))
    clock.t = 1.0
    assert span_ids(s.poll()) == [30, 31, 32]


def test_composite_shares_and_records_the_sub_policy():
    clock = Clock(100.0)
    comp = Policy.composite(
        "comp", 10,
        [Policy.status_code("errors", ["ERROR"]), Policy.always_sample("rest")],
        rate_allocation={"errors": 50})
    s = sampler([comp], clock, idle_timeout=0.1)
    # 4 error traces of 2 spans (allocation 5 spans: two fit), 4 others (the rest, 5).
    spans = [span(t, 10 * t + j, root=j == 0, status=2 if t <= 4 else 0)
             for t in range(1, 9) for j in range(2)]
    s.process(batch(*spans))
    clock.t = 100.5
    out = s.poll()
    tids = sorted({int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()})
    assert tids == [1, 2, 5, 6]
    subs = dict(zip([int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()],
                    out.attribute("tailsampling.composite_policy").to_pylist(), strict=True))
    assert subs == {1: "errors", 2: "errors", 5: "rest", 6: "rest"}
    assert set(out.attribute("tailsampling.policy").to_pylist()) == {"comp"}
    # A new second resets the counters.
    s.process(batch(span(20, 200, root=True, status=2)))
    clock.t = 101.5
    assert span_ids(s.poll()) == [200]


def test_drop_wins_over_sampling_and_invert_match():
    s = sampler([Policy.always_sample("all"),
                 Policy.drop("no-health", [Policy.string_attribute("h", "url.path",
                                                                   ["/health"])]),
                 Policy.boolean_attribute("noisy", "debug", True, invert_match=True)],
                Clock())
    s.process(batch(span(1, 1, root=True, attrs={"url.path": "/health"}),
                    span(2, 2, root=True, attrs={"url.path": "/users"}),
                    span(3, 3, root=True, attrs={"debug": True})))
    out = s.flush()
    assert span_ids(out) == [2]
    # The span's own attributes stay; the deciding policy is added.
    assert out.to_spans()[0].attributes == {"url.path": "/users",
                                            "tailsampling.policy": "all"}


def test_record_options_off():
    s = sampler([Policy.probabilistic("all", 100)], Clock(), record_policy=False,
                record_probability=False)
    s.process(batch(span(1, 1, root=True, attrs={"a": 1})))
    out = s.flush()
    assert out.to_spans()[0].attributes == {"a": 1}
    assert out.column("trace_state").to_pylist() == [None]


# -- in a pipeline --------------------------------------------------------------------


def test_tail_sampler_as_a_pipeline_stage(pipeline_factory):
    sink = knhk.InMemoryExporter()
    ts = TailSampler(TailSamplingConfig([Policy.latency("slow", threshold_ms=5)],
                                        decision_wait=60.0, idle_timeout=30.0))
    p = pipeline_factory(lambda b: b.with_batch_size(4).with_stage(ts).with_exporter(sink))
    spans = [span(t, 10 * t + j, root=j == 0, start_ms=j, dur_ms=1 + 5 * (t % 2))
             for t in range(1, 7) for j in range(3)]
    for s_ in spans:
        assert p.record_span(s_)
    assert p.shutdown()
    got = sink.spans()
    assert sorted({int.from_bytes(x, "big") for x in got.column("trace_id").to_pylist()}) == \
        [1, 3, 5]
    assert got.num_rows == 9
    assert ts.stats()["spans_not_sampled"] == 9
    stats = p.stats()
    # spans dropped by decisions made at shutdown are counted as sampled out
    assert stats.events_sampled_out == 9
    assert stats.events_processed == 18 and stats.events_dropped == 0


def test_tail_sampler_decides_idle_traces_without_new_input(pipeline_factory):
    sink = knhk.InMemoryExporter()
    ts = TailSampler(TailSamplingConfig([Policy.always_sample("all")],
                                        decision_wait=0.2, idle_timeout=0.05))
    p = pipeline_factory(lambda b: b.with_batch_size(4).with_flush_interval(0.02)
                         .with_stage(ts).with_exporter(sink))
    for s_ in [span(1, 10 + j, root=j == 0, start_ms=j, dur_ms=1) for j in range(3)]:
        assert p.record_span(s_)
    deadline = time.monotonic() + 5.0
    while sink.spans().num_rows < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    # released by the pipeline's idle poll, before any shutdown
    assert sink.spans().num_rows == 3
    assert not p.closed


# -- configuration --------------------------------------------------------------------


COLLECTOR_YAML = """
decision_wait: 10s
num_traces: 100
expected_new_traces_per_sec: 10
decision_cache:
  sampled_cache_size: 1000
  non_sampled_cache_size: 1000
policies:
  - {name: test-policy-1, type: always_sample}
  - {name: test-policy-2, type: latency, latency: {threshold_ms: 5000, upper_threshold_ms: 10000}}
  - {name: test-policy-3, type: numeric_attribute,
     numeric_attribute: {key: key1, min_value: 50, max_value: 100}}
  - {name: test-policy-4, type: probabilistic, probabilistic: {sampling_percentage: 10}}
  - {name: test-policy-5, type: status_code, status_code: {status_codes: [ERROR, UNSET]}}
  - {name: test-policy-6, type: string_attribute,
     string_attribute: {key: key2, values: [value1, value2]}}
  - {name: test-policy-7, type: string_attribute,
     string_attribute: {key: key2, values: [value1, val*], enabled_regex_matching: true,
                        cache_max_size: 10}}
  - {name: test-policy-8, type: rate_limiting, rate_limiting: {spans_per_second: 35}}
  - {name: test-policy-12, type: boolean_attribute, boolean_attribute: {key: key4, value: true}}
  - name: and-policy-1
    type: and
    and:
      and_sub_policy:
        - {name: test-and-policy-1, type: numeric_attribute,
           numeric_attribute: {key: key1, min_value: 50, max_value: 100}}
        - {name: test-and-policy-2, type: string_attribute,
           string_attribute: {key: key2, values: [value1, value2]}}
  - name: drop-policy-1
    type: drop
    drop:
      drop_sub_policy:
        - {name: test-drop-policy-1, type: string_attribute,
           string_attribute: {key: url.path, values: ['\\/health', '\\/metrics'],
                              enabled_regex_matching: true}}
  - name: composite-policy-1
    type: composite
    composite:
      max_total_spans_per_second: 1000
      policy_order: [test-composite-policy-1, test-composite-policy-2, test-composite-policy-3]
      composite_sub_policy:
        - {name: test-composite-policy-1, type: numeric_attribute,
           numeric_attribute: {key: key1, min_value: 50}}
        - {name: test-composite-policy-2, type: string_attribute,
           string_attribute: {key: key2, values: [value1, value2]}}
        - {name: test-composite-policy-3, type: always_sample}
      rate_allocation:
        - {policy: test-composite-policy-1, percent: 50}
        - {policy: test-composite-policy-2, percent: 25}
"""


def test_the_collector_readme_configuration_loads():
    cfg = TailSamplingConfig.from_dict(yaml.safe_load(COLLECTOR_YAML))
    assert cfg.decision_wait == 10.0 and cfg.num_traces == 100
    assert cfg.sampled_cache_size == 1000
    assert [p.type for p in cfg.policies][:3] == ["always_sample", "latency",
                                                  "numeric_attribute"]
    # Round trip through the Collector shape.
    again = TailSamplingConfig.from_dict(
        {"policies": [p.to_dict() for p in cfg.policies]})
    assert again.policies == cfg.policies
    TailSampler(cfg)   # compiles


@pytest.mark.parametrize(("spec", "words"), [
    ({"name": "x", "type": "bytes_limiting"}, "unknown type 'bytes_limiting'; known types"),
    ({"name": "x", "type": "probabilistic", "probabilistic": {"sampling_percentage": 150}},
     "percentage in [0, 100]"),
    ({"name": "x", "type": "probabilistic",
      "probabilistic": {"sampling_percentage": 5, "hash_salt": "s"}}, "hash_salt"),
    ({"name": "x", "type": "latency", "latency": {"threshold_ms": -1}}, "threshold_ms"),
    ({"name": "x", "type": "numeric_attribute",
      "numeric_attribute": {"key": "k", "min_value": "5"}}, "min_value must be a number"),
    ({"name": "x", "type": "numeric_attribute", "numeric_attribute": {"key": "k"}},
     "min_value, max_value or both"),
    ({"name": "x", "type": "boolean_attribute",
      "boolean_attribute": {"key": "k", "value": "true"}}, "value must be true or false"),
    ({"name": "x", "type": "string_attribute",
      "string_attribute": {"key": "k", "values": [5]}}, "list of strings"),
    ({"name": "x", "type": "string_attribute",
      "string_attribute": {"key": "k", "values": ["("], "enabled_regex_matching": True}},
     "not a valid regular expression"),
    ({"name": "x", "type": "status_code", "status_code": {"status_codes": ["FAIL"]}},
     "unknown status code"),
    ({"name": "x", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 0}},
     "positive number"),
    ({"name": "x", "type": "and", "and": {"and_sub_policy": [
        {"name": "r", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 5}}]}},
     "cannot hold a rate_limiting sub-policy"),
    ({"name": "x", "type": "composite", "composite": {
        "max_total_spans_per_second": 10,
        "composite_sub_policy": [{"name": "a", "type": "always_sample"}],
        "rate_allocation": [{"policy": "b", "percent": 10}]}}, "unknown sub-policy 'b'"),
    ({"name": "x", "type": "composite", "composite": {
        "max_total_spans_per_second": 10,
        "composite_sub_policy": [{"name": "a", "type": "always_sample"},
                                 {"name": "b", "type": "always_sample"}],
        "rate_allocation": [{"policy": "a", "percent": 60}, {"policy": "b", "percent": 60}]}},
     "more than 100"),
    ({"name": "x", "type": "latency", "latency": {"threshold_ms": 1}, "extra": 1},
     "unknown key(s) extra"),
    ({"type": "always_sample"}, "non-empty string 'name'"),
])
def test_bad_policies_fail_at_configuration_time(spec, words):
    with pytest.raises(ValueError) as err:
        TailSamplingConfig([spec])
    assert words in str(err.value)
    assert "'x'" in str(err.value) or "name" in str(err.value)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"decision_wait": "10 parsecs"}, "duration such as"),
    ({"decision_wait": -1}, "positive"),
    ({"idle_timeout": 0}, "positive"),
    ({"num_traces": 0}, "num_traces"),
    ({"sampled_cache_size": -1}, "sampled_cache_size"),
    ({"on_full": "spill"}, "'decide' or 'drop'"),
    ({"rule": "md5"}, "'traceidratio' or 'consistent'"),
    ({"record_policy": "yes"}, "record_policy"),
])
def test_bad_settings_fail_at_configuration_time(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        TailSamplingConfig([Policy.always_sample("a")], **kwargs)


def test_policy_on_an_attribute_of_the_wrong_declared_type():
    with pytest.raises(ValueError, match=re.escape(
            "numeric_attribute policy on 'http.request.method', which is declared string")):
        TailSamplingConfig([Policy.numeric_attribute("m", "http.request.method", 1, 5)],
                           attribute_types={"http.request.method": "string"})
    with pytest.raises(ValueError, match="declared int"):
        TailSamplingConfig([Policy.and_("a", [Policy.boolean_attribute(
            "b", "http.response.status_code", True)])],
            attribute_types={"http.response.status_code": knhk.AttrType.INT})
    ok = TailSamplingConfig([Policy.numeric_attribute("s", "http.response.status_code", 500)],
                            attribute_types={"http.response.status_code": "int"})
    assert ok.policies[0].params["min_value"] == 500


def test_durations_and_duplicate_names():
    cfg = TailSamplingConfig([Policy.always_sample("a")], decision_wait="1m30s",
                             idle_timeout="250ms")
    assert cfg.decision_wait == 90.0 and cfg.idle_timeout == 0.25
    assert cfg.tick_interval == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="unique; repeated: a"):
        TailSamplingConfig([Policy.always_sample("a"), Policy.latency("a", 5)])
    with pytest.raises(ValueError, match="TailSamplingConfig"):
        TailSampler({"policies": []})


def test_sample_on_first_match_stops_before_a_later_drop():
    spans = [span(1, 1, root=True, attrs={"url.path": "/health"})]
    policies = [Policy.always_sample("all"),
                Policy.drop("no-health", [Policy.string_attribute("h", "url.path",
                                                                  ["/health"])])]
    assert sampler(policies).sample_mask(batch(*spans)).tolist() == [False]
    first = sampler(policies, sample_on_first_match=True)
    assert first.sample_mask(batch(*spans)).tolist() == [True]
    assert first.should_sample(spans[0]) == knhk.sampling.SamplingDecision.SAMPLE


def test_consistent_rule_probabilistic_policy_composes_with_upstream_th():
    rng = np.random.default_rng(8)
    ids = [int.from_bytes(rng.bytes(16), "big") for _ in range(300)]
    s = sampler([Policy.probabilistic("p", 50)], rule="consistent")
    s.process(batch(*(span(t, i + 1, root=True, trace_state="ot=th:c")
                      for i, t in enumerate(ids))))
    out = s.flush()
    head = knhk.sampling.TraceIdRatio(0.5, rule="consistent")
    want = head.sample_mask(batch(*(span(t, i + 1, root=True) for i, t in enumerate(ids))))
    got = {int.from_bytes(x, "big") for x in out.column("trace_id").to_pylist()}
    assert got == {t for t, w in zip(ids, want, strict=True) if w}
    # The upstream threshold (25 %) is stricter than ours (50 %): it stays.
    assert set(out.column("trace_state").to_pylist()) == {"ot=th:c"}


def test_latency_bounds_follow_the_collector():
    # Whole milliseconds, truncated; without an upper bound the threshold is
    # inclusive, with one the window is (threshold, upper].
    def kept(policy, dur_ms):
        return sampler([policy]).sample_mask(batch(span(1, 1, root=True,
                                                        dur_ms=dur_ms))).tolist()[0]
    lower = Policy.latency("l", threshold_ms=5)
    assert [kept(lower, d) for d in (4.999, 5.0, 7.0)] == [False, True, True]
    window = Policy.latency("w", threshold_ms=5, upper_threshold_ms=10)
    assert [kept(window, d) for d in (5.0, 5.999, 6.0, 10.0, 10.9, 11.0)] == \
        [False, False, True, True, True, False]


def test_inverted_decisions_combine_as_in_the_collector():
    no_debug = Policy.boolean_attribute("no-debug", "debug", True, invert_match=True)
    slow = Policy.latency("slow", threshold_ms=1000)
    plain = batch(span(1, 1, root=True))
    debug = batch(span(2, 2, root=True, attrs={"debug": True}))
    # An inverted sample alone keeps the trace, and names its policy.
    s = sampler([no_debug])
    assert s.sample_mask(plain).tolist() == [True]
    # ... but not beside a plain "not sampled" from another policy.
    assert sampler([no_debug, slow]).sample_mask(plain).tolist() == [False]
    # An inverted not-sample beats a sample.
    assert sampler([Policy.always_sample("all"), no_debug]).sample_mask(debug).tolist() == \
        [False]
    # Inside "and", inverted decisions count as plain ones.
    both = Policy.and_("both", [no_debug, Policy.always_sample("all")])
    assert sampler([both]).sample_mask(plain).tolist() == [True]
    assert sampler([both]).sample_mask(debug).tolist() == [False]
    live = sampler([no_debug])
    live.process(plain)
    assert live.flush().attribute("tailsampling.policy").to_pylist() == ["no-debug"]


# -- probabilities through two stages (head then tail) -------------------------------

N_TWO_STAGE = 60_000


@pytest.fixture(scope="module")
def small_traces() -> knhk.SpanBatch:
    # Small traces keep the Horvitz-Thompson error of a trace-level sample low.
    return generate(N_TWO_STAGE, WorkloadConfig(seed=11, max_depth=2, max_fan_out=2))


def _ht_sigma(full: knhk.SpanBatch, p: float) -> float:
    """Standard error of the re-weighted span count when whole traces are kept at p."""
    sizes = pc.value_counts(full.column("trace_id")).field("counts").to_numpy()
    return float(np.sqrt((sizes.astype(np.float64) ** 2 * (1 - p) / p).sum()))


def _two_stages(full, head: TraceIdRatio, tail_pct: float, rule: str) -> knhk.SpanBatch:
    r = head.process(full)
    t = TailSampler(TailSamplingConfig([Policy.probabilistic("p", tail_pct)], rule=rule))
    t.process(r.batch.filter(r.mask))
    return t.flush()


def _low64(b: knhk.SpanBatch) -> list[int]:
    return [int.from_bytes(x[8:], "big") for x in b.column("trace_id").to_pylist()]


def test_head_traceidratio_then_tail_consistent_has_unknown_probability(small_traces):
    # The reproducer: the head decided on the low 64 bits, not on R, so
    # its probability cannot be combined with the tail's threshold.
    out = _two_stages(small_traces, TraceIdRatio(0.5), 50, "consistent")
    assert 0 < out.num_rows < N_TWO_STAGE
    assert np.isnan(sampling_probability(out)).all()
    assert not any("th:" in (s or "") for s in out.column("trace_state").to_pylist())
    assert math.isnan(reweighted_sum(out, missing=math.nan))


def test_head_consistent_then_tail_consistent_reweights_to_the_true_count(small_traces):
    head = TraceIdRatio(0.5, rule="consistent")
    out = _two_stages(small_traces, head, 25, "consistent")
    # Nested thresholds: what the tail keeps is what 25 % alone keeps.
    want = TraceIdRatio(0.25, rule="consistent").sample_mask(small_traces)
    assert out.num_rows == int(want.sum())
    assert set(out.column("trace_state").to_pylist()) == {"ot=th:c"}
    est = reweighted_sum(out, missing=math.nan)
    sigma = _ht_sigma(small_traces, 0.25)
    assert sigma < 0.03 * N_TWO_STAGE
    assert abs(est - N_TWO_STAGE) < 4 * sigma


def test_head_traceidratio_then_tail_traceidratio_reweights_to_the_true_count(small_traces):
    out = _two_stages(small_traces, TraceIdRatio(0.5), 25, "traceidratio")
    # Both keep low64 < round(rate * 2**64): the stricter set, as the SDK decides it.
    sdk = TraceIdRatioBased(0.25)
    assert all(sdk.should_sample(None, t, "x").decision.is_sampled() for t in _low64(out))
    assert set(out.column("trace_state").to_pylist()) == {"knhk=p:0.25"}
    est = reweighted_sum(out, missing=math.nan)
    assert abs(est - N_TWO_STAGE) < 4 * _ht_sigma(small_traces, 0.25)
    # The looser tail after a strict head: the head's probability stays.
    out = _two_stages(small_traces, TraceIdRatio(0.25), 50, "traceidratio")
    assert set(out.column("trace_state").to_pylist()) == {"knhk=p:0.25"}


def test_head_consistent_then_tail_traceidratio_has_unknown_probability(small_traces):
    out = _two_stages(small_traces, TraceIdRatio(0.5, rule="consistent"), 50, "traceidratio")
    assert out.num_rows > 0
    assert np.isnan(sampling_probability(out)).all()


# -- sample_on_first_match and certain policies after a probabilistic one -------------


@pytest.mark.parametrize("first_match", [False, True])
def test_a_later_certain_policy_makes_the_probability_one(first_match):
    full = generate(20_000, WorkloadConfig(seed=3, error_rate=1.0))
    t = TailSampler(TailSamplingConfig(
        [Policy.probabilistic("p", 10), Policy.status_code("err", ["ERROR"])],
        sample_on_first_match=first_match))
    t.process(full)
    out = t.flush()
    # Every trace has an error: all are kept, each with certainty (a probability
    # of one writes nothing, so none is recorded and each span counts once).
    assert out.num_rows == full.num_rows
    assert np.isnan(sampling_probability(out)).all()
    assert reweighted_sum(out) == full.num_rows
    # The decision itself is unchanged: traces the probabilistic policy samples
    # are still attributed to it.
    pol = np.array(out.attribute("tailsampling.policy").to_pylist())
    sdk = TraceIdRatioBased(0.1)
    by_p = np.array([sdk.should_sample(None, t, "x").decision.is_sampled()
                     for t in _low64(out)])
    assert by_p.any() and (~by_p).any()
    assert (pol[by_p] == "p").all() and (pol[~by_p] == "err").all()


def test_first_match_reweights_a_mix_of_error_and_plain_traces():
    t = TailSampler(TailSamplingConfig(
        [Policy.probabilistic("p", 10), Policy.status_code("err", ["ERROR"])],
        sample_on_first_match=True))
    full = generate(20_000, WorkloadConfig(seed=5, error_rate=0.02, max_depth=2,
                                           max_fan_out=2))
    t.process(full)
    out = t.flush()
    p = sampling_probability(out)
    err_traces = set(full.filter(pc.equal(full.column("status_code"), 2))
                     .column("trace_id").to_pylist())
    is_err = np.array([x in err_traces for x in out.column("trace_id").to_pylist()])
    assert is_err.any() and (~is_err).any()
    # Error traces: probability one (nothing recorded, so each counts once);
    # the others: the probabilistic policy's 10 %.
    assert np.isnan(p[is_err]).all()
    assert (p[~is_err] == 0.1).all()
    # Within 4 standard errors (bounded as if every trace were kept at 10 %).
    assert abs(reweighted_sum(out) - full.num_rows) < 4 * _ht_sigma(full, 0.1)


def test_first_match_stops_shadowing_at_a_drop():
    # A drop between them: a trace the probabilistic policy did not sample is
    # dropped before the certain policy sees it, so the probability stays 10 %.
    t = TailSampler(TailSamplingConfig(
        [Policy.probabilistic("p", 10),
         Policy.drop("d", [Policy.status_code("e1", ["ERROR"])]),
         Policy.status_code("err", ["ERROR"])],
        sample_on_first_match=True))
    full = generate(20_000, WorkloadConfig(seed=3, error_rate=1.0))
    t.process(full)
    out = t.flush()
    assert 0 < out.num_rows < full.num_rows
    assert (sampling_probability(out) == 0.1).all()


def test_a_random_veto_makes_a_certain_keep_uncertain():
    # Kept only where the random drop did not hit: not a probability of one,
    # so an upstream probability must not survive as if it still held.
    full = generate(5_000, WorkloadConfig(seed=3, error_rate=1.0))
    state = pa.array(["knhk=p:0.5"] * full.num_rows, pa.string()).dictionary_encode()
    rb = full.record_batch
    i = rb.schema.get_field_index("trace_state")
    cols = list(rb.columns)
    cols[i] = pa.DictionaryArray.from_arrays(state.indices.cast(pa.int32()), state.dictionary)
    full = knhk.SpanBatch(pa.RecordBatch.from_arrays(cols, schema=rb.schema))
    t = TailSampler(TailSamplingConfig(
        [Policy.drop("d", [Policy.probabilistic("p", 50)]),
         Policy.status_code("err", ["ERROR"])]))
    t.process(full)
    out = t.flush()
    assert 0 < out.num_rows < full.num_rows
    assert np.isnan(sampling_probability(out)).all()
    assert set(out.column("trace_state").to_pylist()) == {None}
