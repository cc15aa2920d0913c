"""CEP rules on scripted streams: batch splits, out-of-order spans, dedup, bounded state."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import knhk
from knhk.stream import CallbackAlertSink, StreamProcessor
from knhk.stream.cep import CepAction, CepPattern, CepRule, Matcher

S = 1_000_000_000


def batch_of(events):
    """events: (time_s, name, trace, service, status, attrs) tuples."""
    spans = [knhk.Span(name, trace_id=trace, span_id=i + 1, start_time_ns=int(t * S),
                       duration_ns=10**6, status=status, attributes=attrs,
                       service=svc)
             for i, (t, name, trace, svc, status, attrs) in enumerate(events)]
    return knhk.SpanBatch.from_spans(spans)


def ev(t, name="op", trace=1, svc="api", status=0, attrs=None):
    return (t, name, trace, svc, status, attrs or {})


def feed(processor, events, cuts):
    bounds = [0, *sorted(cuts), len(events)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            processor.process(batch_of(events[a:b]))


# -- count_threshold ---------------------------------------------------------------------


def ref_count_fires(events, threshold, within):
    by_key = {}
    for e in events:
        if e[4] == 2:
            by_key.setdefault(e[3], []).append(e[0] * S)
    fired = set()
    for key, ts in by_key.items():
        ts = sorted(ts)
        if any(ts[i] - ts[i - threshold + 1] < within * S for i in range(threshold - 1, len(ts))):
            fired.add(key)
    return fired


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["a", "b"]), st.sampled_from([0, 2])),
                max_size=40),
       st.lists(st.integers(0, 40), max_size=3), st.integers(1, 4))
def test_count_threshold_matches_reference_across_batch_splits(rows, cuts, threshold):
    events = [ev(t, svc=svc, status=status) for t, svc, status in sorted(rows)]
    p = StreamProcessor()
    p.add_cep_rule(CepRule("burst", CepPattern.count_threshold(
        Matcher(status="error"), threshold, within=10, by="service"),
        CepAction.alert("error", "{count} errors on {key}")))
    feed(p, events, [c for c in cuts if c < len(events)])
    assert {a.key[0] for a in p.alerts} == ref_count_fires(events, threshold, 10)


def test_count_threshold_out_of_order_within_a_batch_and_message():
    p = StreamProcessor()
    p.add_cep_rule(CepRule("burst", CepPattern.count_threshold(
        Matcher(status="error"), 3, within=5, by="service"),
        CepAction.alert("critical", "{count} errors on {key[0]}")))
    p.process(batch_of([ev(4, status=2), ev(1, status=2), ev(30, status=2, svc="db")]))
    assert p.alerts == []
    p.process(batch_of([ev(3, status=2)]))   # late but inside 5 s of the two before
    [a] = p.alerts
    assert (a.rule, a.severity, a.message, a.time_ns) == ("burst", "critical",
                                                          "3 errors on api", 4 * S)


def test_dedup_suppresses_repeats_within_period():
    p = StreamProcessor(dedup_seconds=60)
    p.add_cep_rule(CepRule("slow", CepPattern.count_threshold(
        Matcher(min_duration_ms=0.5), 1, within=1), CepAction.alert("warning", "slow")))
    for t in (0, 10, 70):
        p.process(batch_of([ev(t)]))
    assert [a.time_ns // S for a in p.alerts] == [0, 70]
    assert p.counters()["alerts_suppressed"] == 1
    assert p.counters()["alerts_total"] == 2


# -- sequence ---------------------------------------------------------------------------------


def ref_sequence_keys(events, names, within):
    fired = set()
    by_trace = {}
    for e in events:
        by_trace.setdefault(e[2], []).append(e)
    for trace, evs in by_trace.items():
        for combo in itertools.product(*[[e for e in evs if e[1] == n] for n in names]):
            ts = [e[0] for e in combo]
            if ts == sorted(ts) and ts[-1] - ts[0] <= within:
                fired.add(trace)
    return fired


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from("ABC"), st.integers(1, 3)),
                max_size=25),
       st.lists(st.integers(0, 25), max_size=3), st.sampled_from([2, 3]))
def test_sequence_matches_reference_across_batch_splits(rows, cuts, steps):
    events = [ev(t, name=name, trace=trace) for t, name, trace in sorted(rows)]
    names = "ABC"[:steps]
    p = StreamProcessor()
    p.add_cep_rule(CepRule("seq", CepPattern.sequence([Matcher(name=n) for n in names],
                                                      within=10)))
    feed(p, events, [c for c in cuts if c < len(events)])
    got = {int(a.key[0], 16) for a in p.alerts}
    assert got == ref_sequence_keys(events, names, 10)


def test_sequence_split_over_two_batches_and_out_of_order():
    p = StreamProcessor()
    p.add_cep_rule(CepRule("login-then-fail", CepPattern.sequence(
        [Matcher(name="login"), Matcher(name="pay", status="error")], within=30),
        CepAction.alert("error", "{rule} on trace {key[0]}")))
    p.process(batch_of([ev(100, "login", trace=7), ev(100, "login", trace=8)]))
    p.process(batch_of([ev(120, "pay", trace=7, status=2), ev(90, "pay", trace=8, status=2)]))
    assert [a.key for a in p.alerts] == [(f"{7:016x}",)]  # trace 8's pay precedes its login
    p.process(batch_of([ev(95, "login", trace=9), ev(99, "pay", trace=9, status=2)]))
    assert [a.key for a in p.alerts][-1] == (f"{9:016x}",)


def test_sequence_state_is_bounded_and_evictions_counted():
    rule = CepRule("seq", CepPattern.sequence([Matcher(name="A"), Matcher(name="B")], within=1000),
                   max_state=5)
    p = StreamProcessor()
    p.add_cep_rule(rule)
    p.process(batch_of([ev(i, "A", trace=i + 1) for i in range(20)]))
    state = p._cep[0]
    assert state._carry[0][0].size == 5 and state.evictions == 15
    p.process(batch_of([ev(50, "B", trace=1), ev(50, "B", trace=20)]))
    assert [a.key for a in p.alerts] == [(f"{20:016x}",)]  # trace 1's A was evicted


# -- matchers and actions ---------------------------------------------------------------


def test_matchers_on_attributes_kind_and_regex():
    b = batch_of([ev(0, "GET /a", attrs={"http.response.status_code": 503, "user": "bob"}),
                  ev(1, "POST /b", attrs={"http.response.status_code": 200, "user": "alice"}),
                  ev(2, "GET /c", attrs={"user": "carol"})])
    assert Matcher(attributes={"http.response.status_code": (500, 599)}).mask(b).tolist() == \
        [True, False, False]
    assert Matcher(attributes={"user": re.compile("^(a|c)")}).mask(b).tolist() == \
        [False, True, True]
    assert Matcher(name_regex=r"^GET ").mask(b).tolist() == [True, False, True]
    assert (Matcher(name_regex="^GET") & ~Matcher(attributes={"user": "bob"})).mask(b).tolist() \
        == [False, False, True]
    assert Matcher(kind="internal").mask(b).all() and not Matcher(kind="server").mask(b).any()


def test_callback_action_and_sinks():
    seen, delivered = [], []
    p = StreamProcessor(alert_sinks=[CallbackAlertSink(delivered.append)])
    p.add_cep_rule(CepRule("any-error", CepPattern.count_threshold(Matcher(status=2), 1, 60),
                           CepAction.call(seen.append, severity="info")))
    p.process(batch_of([ev(5, status=2)]))
    assert seen == [{"rule": "any-error", "key": (), "count": 1, "time_ns": 5 * S}]
    assert [a.rule for a in delivered] == ["any-error"]


@pytest.mark.parametrize("make, message", [
    (lambda: Matcher(name_regex="("), "cannot compile regular expression"),
    (lambda: Matcher(status="bad"), "status must be one of"),
    (lambda: CepPattern.count_threshold(Matcher(), 0, 10), "threshold must be"),
    (lambda: CepPattern.count_threshold(Matcher(), 2, 0), "within must be a positive number"),
    (lambda: CepPattern.count_threshold(Matcher(), 2, 1, by="colour"), "unknown group-by key"),
    (lambda: CepPattern.sequence([Matcher()], 10), "at least 2 matchers"),
    (lambda: CepAction.alert("warning", "{nope}"), "template"),
    (lambda: CepRule("", CepPattern.sequence([Matcher(), Matcher()], 1)), "non-empty name"),
    (lambda: StreamProcessor().add_cep_rule("rule"), "takes a CepRule"),
])
def test_bad_configuration(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_invalid_spans_never_match():
    p = StreamProcessor()
    p.add_cep_rule(CepRule("e", CepPattern.count_threshold(Matcher(status=2), 1, 10)))
    n = 3
    batch = knhk.SpanBatch._wrap(knhk.batch.coerce_spans({
        "trace_id": np.ones((n, 16), np.uint8), "span_id": np.arange(1, n + 1, dtype=">u8")
        .view(np.uint8).reshape(n, 8), "name": pa.array(["x"] * n),
        "start_time_ns": np.array([10, 20, 30]) * S,
        "end_time_ns": np.array([5, 15, 25]) * S,  # end before start
        "status_code": np.full(n, 2, np.int8)})[0])
    p.process(batch)
    assert p.alerts == [] and p.counters()["invalid_spans"] == 3


# -- absence -------------------------------------------------------------------------------


def ref_absence(events, within, now):
    fired = set()
    for e in events:
        if e[1] != "A" or not e[0] + within < now:
            continue
        if not any(f[1] == "B" and f[2] == e[2] and e[0] <= f[0] <= e[0] + within for f in events):
            fired.add(e[2])
    return fired


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from("AB"), st.integers(1, 3)),
                max_size=25),
       st.lists(st.integers(0, 25), max_size=3))
def test_absence_matches_reference_across_batch_splits(rows, cuts):
    events = [ev(t, name=name, trace=trace) for t, name, trace in sorted(rows)]
    p = StreamProcessor()
    p.add_cep_rule(CepRule("no-reply", CepPattern.absence(Matcher(name="A"), Matcher(name="B"),
                                                          within=5)))
    feed(p, events, [c for c in cuts if c < len(events)])
    now = max((e[0] for e in events), default=0)
    got = {int(a.key[0], 16) for a in p.alerts}
    assert got == ref_absence(events, 5, now)


def test_absence_out_of_order_answer_arrives_first():
    p = StreamProcessor()
    p.add_cep_rule(CepRule("no-reply", CepPattern.absence(Matcher(name="A"), Matcher(name="B"),
                                                          within=5, by="service")))
    p.process(batch_of([ev(12, "B", svc="x")]))
    p.process(batch_of([ev(10, "A", svc="x"), ev(10, "A", svc="y")]))
    p.process(batch_of([ev(30, "C", svc="z")]))   # time passes
    assert [a.key for a in p.alerts] == [("y",)]


# -- correlation and regex ----------------------------------------------------------------


def test_correlation_across_services_and_batches():
    p = StreamProcessor()
    p.add_cep_rule(CepRule("co-fail", CepPattern.correlation(
        Matcher(service="checkout", status="error"), Matcher(service="payments", status="error"),
        within=5), CepAction.alert("error", "{key}")))
    p.process(batch_of([ev(10, svc="checkout", status=2), ev(30, svc="payments", status=2)]))
    assert p.alerts == []                                        # 20 s apart
    p.process(batch_of([ev(33, svc="checkout", status=2)]))     # 3 s after payments' error
    [a] = p.alerts
    assert a.key == (("checkout",), ("payments",)) and a.time_ns == 33 * S
    p.process(batch_of([ev(34, svc="payments", status=0)]))     # not an error: no match
    assert len(p.alerts) == 1


def ref_regex(events, pattern, within):
    fired = set()
    hist = {}
    for t, name, trace, *_ in sorted(events, key=lambda e: (e[2], e[0])):
        if name not in "ABC":
            continue
        h = hist.setdefault(trace, [])
        h.append((t, name))
        h[:] = [(u, c) for u, c in h if t - u <= within]
        if re.search(f"(?:{pattern})$", "".join(c for _, c in h)):
            fired.add(trace)
    return fired


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from("ABCD"), st.integers(1, 3)),
                max_size=25), st.lists(st.integers(0, 25), max_size=3),
       st.sampled_from(["AB+C", "A(B|C)A", "C{2}"]))
def test_regex_matches_reference(rows, cuts, pattern):
    # distinct times per trace: the reference orders ties by arrival, knhk by time only
    seen, uniq = set(), []
    for t, name, trace in sorted(rows):
        if (t, trace) not in seen:
            seen.add((t, trace))
            uniq.append((t, name, trace))
    events = [ev(t, name=name, trace=trace) for t, name, trace in uniq]
    p = StreamProcessor()
    p.add_cep_rule(CepRule("rx", CepPattern.regex(pattern, {c: Matcher(name=c) for c in "ABC"},
                                                  within=15)))
    feed(p, events, [c for c in cuts if c < len(events)])
    assert {int(a.key[0], 16) for a in p.alerts} == ref_regex(events, pattern, 15)


def test_regex_bad_configuration():
    with pytest.raises(ValueError, match="cannot compile"):
        CepPattern.regex("A(", {"A": Matcher()}, 1)
    with pytest.raises(ValueError, match="one plain character"):
        CepPattern.regex("AB", {"AB": Matcher()}, 1)


def test_emit_action_puts_a_derived_span_into_the_pipeline(pipeline_factory):
    processor = StreamProcessor()
    processor.add_cep_rule(CepRule("burst", CepPattern.count_threshold(
        Matcher(status="error"), 2, within=10, by="service"), CepAction.emit("error.burst")))
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_stage(processor).with_exporter(sink))
    pipeline.record_batch(batch_of([ev(1, status=2), ev(2, status=2), ev(3)]))
    pipeline.shutdown()
    spans = sink.spans()
    assert spans.num_rows == 4
    derived = [r for r in spans.to_pylist() if r["name"] == "error.burst"]
    assert len(derived) == 1 and derived[0]["service"] == "knhk.cep"
    assert derived[0]["start_time_ns"] == 2 * S
    attrs = {a["key"]: a for a in derived[0]["attributes"]}
    assert attrs["knhk.cep.rule"]["str"] == "burst" and attrs["knhk.cep.count"]["int"] == 2


# -- the key vocabulary follows the live keys --------------------------------------------


def _rules(max_state):
    return [
        CepRule("burst", CepPattern.count_threshold(Matcher(status="error"), 3, within=5,
                                                    by="service"),
                CepAction.alert("error", "{key}"), max_state=max_state),
        CepRule("seq", CepPattern.sequence([Matcher(name="a"), Matcher(name="b")], within=5,
                                           by="service"), CepAction.alert("warning", "{key}"),
                max_state=max_state),
        CepRule("missing", CepPattern.absence(Matcher(name="a"), Matcher(name="b"), within=5,
                                              by="service"), CepAction.alert("info", "{key}"),
                max_state=max_state),
        CepRule("rx", CepPattern.regex("ab", {"a": Matcher(name="a"), "b": Matcher(name="b")},
                                       within=5, by="service"),
                CepAction.alert("info", "{key}"), max_state=max_state),
    ]


@pytest.mark.parametrize("compact_at", [16, 10**9])
def test_rules_keyed_by_ever_new_values_forget_dead_keys_and_fire_alike(monkeypatch,
                                                                        compact_at):
    """Each batch brings new services (a high-cardinality key) and a rule's state is
    bounded (max_state: the oldest partial matches are evicted): the encoder of every
    rule keeps about the keys its state still holds, not every value ever seen, and the
    alerts equal those of a run that forgets nothing."""
    import knhk.stream.cep as cep

    def run(at):
        monkeypatch.setattr(cep, "_COMPACT_AT", at)
        p = StreamProcessor()
        for rule in _rules(max_state=40):
            p.add_cep_rule(rule)
        rng = np.random.default_rng(5)
        for b in range(60):
            events = []
            for k in range(20):
                svc = f"svc-{b}-{k}" if k % 4 else f"long-{k}"  # a few keys live on
                t = b * 3 + float(rng.uniform(0, 3))
                events += [ev(t, name=str(rng.choice(["a", "b", "c"])), svc=svc,
                              status=int(rng.choice([0, 2])))]
            p.process(batch_of(sorted(events)))
        return p

    p = run(compact_at)
    reference = run(10**9)
    got = sorted((a.rule, a.key, a.time_ns) for a in p.alerts)
    assert got == sorted((a.rule, a.key, a.time_ns) for a in reference.alerts)
    assert len(got) > 0
    sizes = [st._keys.n_groups for st in p._cep]
    counters = p.counters()
    if compact_at == 16:
        # 60 batches x 15 new services + 5 long-lived = 905 seen; state holds <= 2 x 40
        assert max(sizes) < 200
        assert counters["cep_keys_forgotten"] > 0
    else:
        assert min(sizes) > 800 and counters["cep_keys_forgotten"] == 0
