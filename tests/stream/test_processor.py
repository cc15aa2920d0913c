"""StreamProcessor: windows and exact aggregates against NumPy and polars."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import knhk
from knhk.stream import StreamProcessor, WindowConfig, WindowResult
from knhk.workload import WorkloadConfig, generate

S = 1_000_000_000
QS = (0.5, 0.95, 0.99)


def make_batch(start, dur, service=None, name=None, status=None, attrs=None):
    n = len(start)
    service = service if service is not None else ["svc"] * n
    name = name if name is not None else ["op"] * n
    cols = {
        "trace_id": np.arange(1, n + 1, dtype=">u8").view(np.uint8).reshape(n, 8).repeat(2, 1),
        "span_id": np.arange(1, n + 1, dtype=">u8").view(np.uint8).reshape(n, 8),
        "name": pa.array(name, pa.string()).dictionary_encode(),
        "service": pa.array(service, pa.string()).dictionary_encode(),
        "start_time_ns": np.asarray(start, np.int64),
        "end_time_ns": np.asarray(start, np.int64) + np.asarray(dur, np.int64),
        "status_code": np.asarray(status if status is not None else np.zeros(n), np.int8),
    }
    rb, _ = knhk.batch.coerce_spans(cols)
    return knhk.SpanBatch._wrap(rb)


def reference(start, dur, keys, size, slide, status, quantiles=QS):
    """Plain NumPy: loop over windows and groups, np.quantile per group."""
    start = np.asarray(start, np.int64)
    dur_ms = np.asarray(dur, np.int64) / 1e6
    status = np.asarray(status)
    out = {}
    k = -(-size // slide)
    for i in range(start.size):
        w = start[i] // slide * slide
        for j in range(k):
            ws = w - j * slide
            if start[i] < ws + size:
                out.setdefault((ws, keys[i]), []).append(i)
    rows = {}
    for (ws, key), idx in out.items():
        d = dur_ms[idx]
        rows[(ws, key)] = dict(
            window_start=ws, window_end=ws + size, count=len(idx),
            sum=d.sum(), avg=d.mean(), min=d.min(), max=d.max(),
            q=[np.quantile(d, q) for q in quantiles],
            error_rate=float(np.mean(status[idx] == 2)),
            throughput=len(idx) / (size / S))
    return rows


def check_against_reference(results, ref, quantiles=QS):
    assert len(results) == len(ref)
    for r in results:
        exp = ref[(r.window_start, r.keys)]
        assert r.window_end == exp["window_end"]
        assert r.count == exp["count"]
        for q, v in zip(quantiles, exp["q"], strict=True):
            got = getattr(r, knhk.stream.quantile_name(q))
            assert got == v, (q, got, v)  # bit for bit
        assert r.min == exp["min"] and r.max == exp["max"]
        assert r.sum == pytest.approx(exp["sum"], rel=1e-12)
        assert r.avg == pytest.approx(exp["avg"], rel=1e-12)
        assert r.error_rate == exp["error_rate"]
        assert r.throughput == pytest.approx(exp["throughput"], rel=1e-12)


def run(processor, batch, pieces=1):
    n = batch.num_rows
    step = max(1, -(-n // pieces))
    for off in range(0, n, step):
        assert processor.process(batch.slice(off, step)) is None
    processor.flush()
    return processor.get_results()


# -- exact mode against NumPy --------------------------------------------------------

rows_st = st.lists(
    st.tuples(st.integers(0, 600 * S), st.sampled_from([0, 1, 1000, 5 * 10**6, 10**9]),
              st.integers(0, 4 * 10**6), st.sampled_from(["a", "b", "c"]),
              st.sampled_from(["x", "y"]), st.sampled_from([0, 1, 2])),
    min_size=0, max_size=120)


@settings(max_examples=60, deadline=None)
@given(rows=rows_st, pieces=st.integers(1, 4),
       window=st.sampled_from([(60, 60), (60, 20), (45, 30), (1, 1)]))
def test_exact_matches_numpy(rows, pieces, window):
    size, slide = window[0] * S, window[1] * S
    # sorted by start: with zero lateness, out-of-order rows would be late (tested below)
    rows = sorted(rows)
    start = [r[0] for r in rows]
    # duplicate-heavy durations: a few base values plus a small jitter
    dur = [r[1] + (r[2] if r[1] > 1000 else 0) for r in rows]
    svc, nm, status = [r[3] for r in rows], [r[4] for r in rows], [r[5] for r in rows]
    cfg = WindowConfig.tumbling(seconds=window[0]) if size == slide else \
        WindowConfig.sliding(size=window[0], slide=window[1])
    p = StreamProcessor(cfg)
    results = run(p, make_batch(start, dur, svc, nm, status), pieces)
    ref = reference(start, dur, list(zip(svc, nm, strict=True)), size, slide, status)
    check_against_reference(results, ref)
    assert p.counters()["late_events"] == 0


def test_single_value_and_identical_values():
    p = StreamProcessor(WindowConfig.tumbling(seconds=10), quantiles=(0.0, 0.5, 0.999, 1.0))
    p.process(make_batch([0, 1, 2, 15 * S], [7_000_000] * 3 + [3_000_000]))
    p.flush()
    a, b = p.get_results()
    assert (a.count, a.p0_duration_ms, a.p50_duration_ms, a.p99_9_duration_ms,
            a.p100_duration_ms) == (3, 7.0, 7.0, 7.0, 7.0)
    assert (b.window_start, b.count, b.p50_duration_ms) == (10 * S, 1, 3.0)


def test_workload_against_numpy_and_table_shape():
    batch = generate(20_000, WorkloadConfig(seed=4, spans_per_second=20_000 / 180))
    # the workload's traces overlap in time: a lateness allowance keeps every span
    p = StreamProcessor(WindowConfig.tumbling(seconds=60, allowed_lateness=600))
    for off in range(0, batch.num_rows, 3000):
        p.process(batch.slice(off, 3000))
    p.flush()
    table = p.get_results(as_table=True)
    assert table.column_names[:4] == ["window_start", "window_end", "service", "name"]
    for col in ("count", "sum", "avg", "min", "max", "p50_duration_ms", "p95_duration_ms",
                "p99_duration_ms", "error_rate", "throughput"):
        assert col in table.column_names
    start = batch.column("start_time_ns").to_numpy()
    dur = batch.duration_ns()
    keys = list(zip(batch.column("service").to_pylist(), batch.column("name").to_pylist(),
                    strict=True))
    status = batch.column("status_code").to_numpy()
    assert p.counters()["late_events"] == 0
    ref = reference(start, dur, keys, 60 * S, 60 * S, status)
    got = {(r["window_start"], r["service"], r["name"]): r for r in table.to_pylist()}
    assert sum(r["count"] for r in got.values()) == batch.num_rows
    assert got.keys() == {(w, *k) for (w, k) in ref}
    for (w, k), exp in ref.items():
        assert got[(w, *k)]["p99_duration_ms"] == exp["q"][2]
        assert got[(w, *k)]["error_rate"] == exp["error_rate"]


def test_workload_matches_polars_group_by_dynamic():
    batch = generate(30_000, WorkloadConfig(seed=9, spans_per_second=30_000 / 300))
    for cfg, every, period in ((WindowConfig.tumbling(seconds=60), "60s", "60s"),
                               (WindowConfig.sliding(size=60, slide=20), "20s", "60s")):
        # a lateness allowance larger than the data: no span is late
        p = StreamProcessor(WindowConfig(cfg.kind, cfg.size_ns, cfg.slide_ns, 0, 10**12))
        p.process(batch)
        p.flush()
        mine = p.get_results(as_table=True)
        assert p.counters()["late_events"] == 0
        df = pl.DataFrame({
            "t": batch.column("start_time_ns").to_numpy(),
            "service": batch.column("service").to_pylist(),
            "name": batch.column("name").to_pylist(),
            "d": batch.duration_ns() / 1e6,
        }).with_columns(pl.col("t").cast(pl.Datetime("ns"))).sort("t")
        theirs = df.group_by_dynamic("t", every=every, period=period, group_by=["service", "name"],
                                     start_by="window").agg(
            pl.len().alias("count"),
            *[pl.col("d").quantile(q, interpolation="linear").alias(f"q{q}") for q in QS])
        theirs = {(row["t"], row["service"], row["name"]): row
                  for row in theirs.with_columns(pl.col("t").cast(pl.Int64)).to_dicts()}
        ours = {(r["window_start"], r["service"], r["name"]): r for r in mine.to_pylist()}
        t_min = int(df["t"].cast(pl.Int64).min())
        # polars starts its first window at the boundary at or before the first event;
        # knhk also reports the earlier sliding windows that hold the first events
        ours = {k: v for k, v in ours.items() if k[0] >= t_min // cfg.slide_ns * cfg.slide_ns}
        assert ours.keys() == theirs.keys()
        for k, r in ours.items():
            assert r["count"] == theirs[k]["count"]
            for q in QS:
                assert r[knhk.stream.quantile_name(q)] == pytest.approx(theirs[k][f"q{q}"],
                                                                       rel=1e-12, abs=1e-12)


# -- watermark, lateness, sessions -----------------------------------------------------


def test_late_events_are_counted_and_routed_never_folded_in():
    late_batches = []
    p = StreamProcessor(WindowConfig.tumbling(seconds=10, allowed_lateness=5),
                        late_output=late_batches.append)
    p.process(make_batch([1 * S, 2 * S], [10**6, 2 * 10**6]))
    p.process(make_batch([16 * S], [10**6]))           # watermark 11 s: window [0, 10) closes
    assert [r.count for r in p.get_results()] == [2]
    p.process(make_batch([3 * S, 12 * S], [9 * 10**6, 10**6]))  # 3 s is late, 12 s is not
    assert p.counters()["late_events"] == 1
    assert [b.column("start_time_ns").to_pylist() for b in late_batches] == [[3 * S]]
    p.flush()
    [r] = p.get_results()
    assert (r.window_start, r.count) == (10 * S, 2)
    assert p.pop_counters()["stream_late_events"] == 1
    assert p.pop_counters() == {}


def test_allowed_lateness_keeps_window_open():
    p = StreamProcessor(WindowConfig.tumbling(seconds=10, allowed_lateness=5))
    p.process(make_batch([1 * S, 12 * S], [10**6, 10**6]))  # watermark 7 s
    p.process(make_batch([4 * S], [3 * 10**6]))             # out of order, within lateness
    p.flush()
    first = p.get_results()[0]
    assert (first.count, first.max) == (2, 3.0)
    assert p.counters()["late_events"] == 0


def test_invalid_spans_are_counted_and_excluded():
    p = StreamProcessor(WindowConfig.tumbling(seconds=10))
    p.process(make_batch([0, S, 2 * S], [4 * 10**6, -5, 2 * 10**6]))
    p.flush()
    [r] = p.get_results()
    assert (r.count, r.avg) == (2, 3.0)
    assert p.counters()["invalid_spans"] == 1


def test_session_windows_per_key_across_batches():
    p = StreamProcessor(WindowConfig.session(gap=10), group_by=("service",))
    p.process(make_batch([0, 5 * S], [10**6, 2 * 10**6], ["a", "a"]))
    assert p.get_results() == []
    p.process(make_batch([12 * S, 40 * S, 100 * S], [3 * 10**6, 10**6, 10**6], ["a", "a", "b"]))
    results = p.get_results()  # watermark 100 s closes a's sessions, not b's
    assert [(r.service, r.window_start, r.window_end, r.count) for r in results] == [
        ("a", 0, 22 * S, 3), ("a", 40 * S, 50 * S, 1)]
    assert results[0].throughput == pytest.approx(3 / 22)
    p.process(make_batch([3 * S], [10**6], ["a"]))  # falls into a closed session
    assert p.counters()["late_events"] == 1
    p.flush()
    assert [(r.service, r.count, r.max) for r in p.get_results()] == [("b", 1, 1.0)]


def test_processing_time_windows_close_on_poll():
    now = [100 * S]
    p = StreamProcessor(WindowConfig.tumbling(seconds=10, processing_time=True),
                        clock=lambda: now[0])
    p.process(make_batch([0, 10**15], [10**6, 2 * 10**6]))  # event times ignored
    now[0] = 111 * S
    p.poll()
    [r] = p.get_results()
    assert (r.window_start, r.count) == (100 * S, 2)


def test_group_by_attribute_kind_status_and_custom():
    spans = [knhk.Span("op", trace_id=1, span_id=i + 1, start_time_ns=i,
                       duration_ns=(i + 1) * 10**6, status=2 if i % 2 else 0,
                       attributes={"tier": "gold" if i < 3 else "free"})
             for i in range(5)]
    p = StreamProcessor(WindowConfig.tumbling(seconds=1),
                        group_by=("attributes.tier", "status"),
                        custom={"spread": lambda v: float(v[-1] - v[0])})
    p.process(knhk.SpanBatch.from_spans(spans))
    p.flush()
    got = {r.keys: (r.count, r.spread) for r in p.get_results()}
    assert got == {("gold", 0): (2, 2.0), ("gold", 2): (1, 0.0),
                   ("free", 2): (1, 0.0), ("free", 0): (1, 0.0)}


def test_value_attribute():
    spans = [knhk.Span("op", trace_id=1, span_id=i + 1, start_time_ns=i,
                       attributes={"size": float(i)} if i != 2 else {}) for i in range(5)]
    p = StreamProcessor(value="attributes.size", group_by=())
    p.process(knhk.SpanBatch.from_spans(spans))
    p.flush()
    [r] = p.get_results()
    assert (r.count, r.p50_size, r.max) == (4, np.quantile([0.0, 1, 3, 4], 0.5), 4.0)
    assert p.counters()["missing_value"] == 1


def test_results_as_objects_equal_table_rows():
    p = StreamProcessor(WindowConfig.tumbling(seconds=10))
    p.process(make_batch([0, S, 11 * S], [1, 2, 3]))
    p.flush()
    table = p.get_results(as_table=True)
    assert p.get_results() == []  # drained
    objs = [WindowResult(row, ("service", "name")) for row in table.to_pylist()]
    assert [o.window_start for o in objs] == [0, 10 * S]
    assert objs[0].keys == ("svc", "op")


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: WindowConfig.tumbling(seconds=-1), "must be positive"),
    (lambda: WindowConfig.sliding(size=10, slide=0), "must be positive"),
    (lambda: WindowConfig.sliding(size=10, slide=11), "must not be larger"),
    (lambda: WindowConfig.session(gap=0), "must be positive"),
    (lambda: StreamProcessor(group_by=("colour",)), "unknown group-by key 'colour'"),
    (lambda: StreamProcessor(quantiles=(0.5, 1.5)), "quantile must be a number in"),
    (lambda: StreamProcessor(quantiles=(float("nan"),)), "quantile must be a number in"),
    (lambda: StreamProcessor(mode="fast"), "mode must be"),
    (lambda: StreamProcessor(value="colour"), "unknown group-by key|value must be"),
])
def test_bad_configuration(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- as a pipeline stage ---------------------------------------------------------------


def test_stage_in_pipeline_observes_and_passes_everything(pipeline_factory):
    processor = StreamProcessor(WindowConfig.tumbling(seconds=60))
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_stage(processor).with_exporter(sink))
    batch = generate(2_000, WorkloadConfig(seed=2))
    pipeline.record_batch(batch)
    pipeline.shutdown()
    assert sink.spans().num_rows == 2_000
    results = processor.get_results()
    assert sum(r.count for r in results) + processor.counters()["late_events"] == 2_000


def test_counters_reach_pipeline_stats(pipeline_factory):
    from knhk.stream import CepAction, CepPattern, CepRule, Matcher
    processor = StreamProcessor(WindowConfig.tumbling(seconds=60))
    processor.add_cep_rule(CepRule("any", CepPattern.count_threshold(Matcher(), 1, 1),
                                   CepAction.alert("info", "x")))
    pipeline = pipeline_factory(lambda b: b.with_stage(processor))
    pipeline.record_batch(make_batch([0, S, 2 * S], [1, 2, 3]))
    pipeline.shutdown()
    counters = pipeline.stats().counters
    assert counters["stream_spans_seen"] == 3
    assert counters["stream_windows_closed"] == 1
    assert counters["stream_alerts_total"] == len(processor.alerts) >= 1


def test_event_stream_feeds_process_batch(pipeline_factory):
    processor = StreamProcessor(WindowConfig.tumbling(seconds=10))
    pipeline = pipeline_factory()
    stream = pipeline.event_stream()
    pipeline.record_batch(make_batch([0, S, 12 * S], [10**6, 3 * 10**6, 10**6]))
    pipeline.shutdown()
    for batch in stream:
        processor.process_batch(batch)
    processor.flush()
    assert [(r.window_start, r.count, r.max) for r in processor.get_results()] == [
        (0, 2, 3.0), (10 * S, 1, 1.0)]


def test_sketch_mode_counts_values_it_cannot_hold_and_keeps_the_rest():
    spans = [knhk.Span("op", trace_id=i, span_id=i, start_time_ns=i * 10**9, duration_ns=10,
                       attributes={"x": v}) for i, v in enumerate([1.5, -2.0, 3.0, 4.0], 1)]
    p = StreamProcessor(WindowConfig.tumbling(seconds=60), mode="sketch", value="attributes.x")
    p.process_batch(knhk.SpanBatch.from_spans(spans))
    p.flush()
    [result] = p.get_results()
    assert result.count == 3
    assert p.counters()["value_out_of_sketch_range"] == 1


# -- bounded state: keys of closed windows are forgotten ----------------------------


def _churning_batches(n_batches=12, keys_per_batch=700, seed=3):
    """Each batch: one second of spans over keys never seen before, plus a few
    keys that recur in every batch (they must survive every compaction)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        n = keys_per_batch * 3
        start = b * S + rng.integers(0, S, n)
        dur = rng.integers(1, 50_000_000, n)
        fresh = [f"op-{b}-{i % keys_per_batch}" for i in range(n)]
        names = [("steady-" + str(i % 3)) if i % 10 == 0 else fresh[i] for i in range(n)]
        status = rng.choice([0, 2], n, p=[0.9, 0.1])
        out.append(make_batch(start, dur, name=names, status=status))
    return out


def _table(proc, batches):
    for batch in batches:
        proc.process_batch(batch)
    proc.flush()
    t = proc.get_results(as_table=True)
    keys = [c for c in ("window_start", "window_end", "service", "name") if c in t.column_names]
    return t.sort_by([(k, "ascending") for k in keys])


@pytest.mark.parametrize("window, mode", [
    (WindowConfig.tumbling(seconds=1), "exact"),
    (WindowConfig.sliding(2, 1), "exact"),
    (WindowConfig.session(gap=0.5), "exact"),
    (WindowConfig.tumbling(seconds=1), "sketch"),
    (WindowConfig.sliding(2, 1), "sketch"),
])
def test_forgetting_dead_keys_changes_no_result(window, mode, monkeypatch):
    batches = _churning_batches()
    small = StreamProcessor(window, mode=mode)
    monkeypatch.setattr(knhk.stream.processor, "_COMPACT_MIN", 10**9)
    remembering = StreamProcessor(window, mode=mode)
    monkeypatch.setattr(knhk.stream.processor, "_COMPACT_MIN", 1000)
    small._compact_at = 1000
    expected = _table(remembering, batches)
    got = _table(small, batches)
    assert got.equals(expected)
    assert small.counters()["keys_forgotten"] > 0
    assert remembering.counters().get("keys_forgotten", 0) == 0
    # the compacted processor remembers about the keys of the open windows only
    distinct = len(set().union(*(b.column("name").to_pylist() for b in batches)))
    assert len(remembering._keys._tuples) == distinct
    assert len(small._keys._tuples) < 3 * 700 + 1000 < distinct


def test_pending_results_are_bounded_and_the_discarded_counted():
    proc = StreamProcessor(WindowConfig.tumbling(seconds=1), max_pending_results=50)
    batches = _churning_batches(n_batches=5, keys_per_batch=20)
    for batch in batches:
        proc.process_batch(batch)
    proc.flush()
    c = proc.counters()
    kept = proc.get_results(as_table=True).num_rows
    per_window = [len(set(b.column("name").to_pylist())) for b in batches]  # one window each
    assert 0 < kept <= 50 + max(per_window)
    assert c["results_discarded"] > 0
    assert kept + c["results_discarded"] == sum(per_window)
    with pytest.raises(ValueError, match="max_pending_results"):
        StreamProcessor(max_pending_results=0)
