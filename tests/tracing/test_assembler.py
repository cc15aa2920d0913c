"""knhk.tracing: hand-built traces for every rule of the critical path, robustness, analyses.

Expected sections are worked out by hand from the rules of issue 6 (Jaeger
UI's critical path) and written next to each case.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

import knhk
from knhk.errors import SchemaError
from knhk.tracing import (
    CriticalPath,
    Trace,
    TraceAssembler,
    assemble,
    critical_paths,
    latency_breakdown,
    service_call_graph,
    service_graph_metrics,
)
from knhk.workload import WorkloadConfig, generate

PRODUCER, CONSUMER, CLIENT, SERVER = 4, 5, 3, 2


def sid(i: int) -> bytes:
    return i.to_bytes(8, "big")


def batch(*spans, trace=1) -> knhk.SpanBatch:
    """Spans as (span, parent or None, start, end[, kind[, service[, status]]])."""
    cols = defaultdict(list)
    for sp in spans:
        s, p, a, b, *rest = sp
        kind = rest[0] if rest else 1
        svc = rest[1] if len(rest) > 1 else "svc"
        status = rest[2] if len(rest) > 2 else 0
        cols["trace_id"].append(trace.to_bytes(16, "big"))
        cols["span_id"].append(sid(s))
        cols["parent_span_id"].append(None if p is None else sid(p))
        cols["name"].append(f"op{s}")
        cols["start_time_ns"].append(a)
        cols["end_time_ns"].append(b)
        cols["kind"].append(kind)
        cols["service"].append(svc)
        cols["status_code"].append(status)
    # Typed, so that a column of only roots is not read as Arrow's null type.
    cols["parent_span_id"] = pa.array(cols["parent_span_id"], pa.binary(8))
    return knhk.SpanBatch(dict(cols))


def path_of(*spans) -> list[tuple[int, int, int]]:
    b = batch(*spans)
    trace = assemble(b)[0]
    path = [(int.from_bytes(s.span_id, "big"), s.section_start, s.section_end)
            for s in trace.critical_path()]
    # The one-call form (a separate, fused kernel) must walk every case the same.
    table = critical_paths(b)
    assert list(zip([int.from_bytes(x, "big") for x in table.column("span_id").to_pylist()],
                    table.column("section_start").to_pylist(),
                    table.column("section_end").to_pylist(), strict=True)) == path
    return path


# -- critical path rules -----------------------------------------------------------


def test_clamping_at_the_boundaries():
    # R [0,100]; A [50,150] -> [50,100]; G under A [90,140] -> [90,100];
    # B [100,120] starts at R's end: dropped; C [-20,0] ends at R's start: dropped;
    # D [-10,30] -> [0,30].
    spans = [(1, None, 0, 100), (2, 1, 50, 150), (3, 2, 90, 140), (4, 1, 100, 120),
             (5, 1, -20, 0), (6, 1, -10, 30)]
    assert path_of(*spans) == [(3, 90, 100), (2, 50, 90), (1, 30, 50), (6, 0, 30)]


def test_dropped_child_takes_its_subtree_with_it():
    # B [100,120] is dropped; its child E [50,60] lies inside R but must not count.
    spans = [(1, None, 0, 100), (4, 1, 100, 120), (5, 4, 50, 60)]
    assert path_of(*spans) == [(1, 0, 100)]


def test_ties_go_to_the_earlier_child():
    # A [10,80] and B [20,80] end together: A (earlier) is walked; B cannot
    # qualify afterwards (ends at 80, not before the bound 10).
    assert path_of((1, None, 0, 100), (3, 1, 20, 80), (2, 1, 10, 80)) == [
        (1, 80, 100), (2, 10, 80), (1, 0, 10)]


def test_ties_with_equal_start_go_to_the_earlier_row():
    assert path_of((1, None, 0, 100), (9, 1, 10, 80), (2, 1, 10, 80)) == [
        (1, 80, 100), (9, 10, 80), (1, 0, 10)]


def test_back_to_back_siblings():
    # B [10,20] is walked; returning with bound 10, A [0,10] does not end
    # strictly before it, so R owns [0,10].
    assert path_of((1, None, 0, 20), (2, 1, 0, 10), (3, 1, 10, 20)) == [(3, 10, 20), (1, 0, 10)]


def test_bound_admits_only_children_ending_before_it():
    # A [50,90] walked; bound 50: B [30,60] ends after it, C [10,40] qualifies.
    spans = [(1, None, 0, 100), (2, 1, 50, 90), (3, 1, 30, 60), (4, 1, 10, 40)]
    assert path_of(*spans) == [(1, 90, 100), (2, 50, 90), (1, 40, 50), (4, 10, 40), (1, 0, 10)]


def test_multiple_roots_in_start_order_each_contiguous():
    # R1 [50,80] is a root; R2 [0,40] an orphan (its parent 99 is missing), with X [10,20].
    spans = [(1, None, 50, 80), (2, 99, 0, 40), (3, 2, 10, 20)]
    trace = assemble(batch(*spans))[0]
    assert trace.orphans == 1 and trace.is_orphan.tolist() == [False, True, False]
    assert trace.roots == [sid(2), sid(1)]
    assert path_of(*spans) == [(2, 20, 40), (3, 10, 20), (2, 0, 10), (1, 50, 80)]
    assert trace.critical_path().total_duration_ms() == (40 + 30) / 1e6


def test_consumer_of_producer_is_not_blocking():
    # C (CONSUMER under a PRODUCER) is left out; S (CLIENT) is on the path.
    spans = [(1, None, 0, 100, PRODUCER), (2, 1, 20, 150, CONSUMER), (3, 1, 10, 30, CLIENT)]
    assert path_of(*spans) == [(1, 30, 100), (3, 10, 30), (1, 0, 10)]


def test_consumer_under_a_non_producer_counts():
    spans = [(1, None, 0, 100, SERVER), (2, 1, 20, 90, CONSUMER)]
    assert path_of(*spans) == [(1, 90, 100), (2, 20, 90), (1, 0, 20)]


def test_zero_duration_and_single_span_traces():
    assert path_of((1, None, 5, 5)) == []
    assert len(assemble(batch((1, None, 5, 5)))[0].critical_path()) == 0
    assert path_of((1, None, 0, 10)) == [(1, 0, 10)]
    # A zero-length child at the parent's end is dropped (starts at its end); one
    # inside is walked but owns no time, so the parent's time is split at it.
    assert path_of((1, None, 0, 10), (2, 1, 10, 10), (3, 1, 4, 4)) == [(1, 4, 10), (1, 0, 4)]


def test_critical_path_sequence_interface():
    path = assemble(batch((1, None, 0, 3_000_000), (2, 1, 0, 1_000_000)))[0].critical_path()
    assert isinstance(path, CriticalPath) and len(path) == 2
    assert path[0].span_id == sid(1) and path[0].section_start == 1_000_000
    assert path[-1].section_end == 1_000_000
    assert path.total_duration_ms() == 3.0


def test_critical_paths_batch_equals_per_trace():
    b = generate(3_000, WorkloadConfig(seed=11))
    table = critical_paths(b)
    ts = assemble(b)
    assert len(ts) > 10
    rows = []
    for trace in ts:
        tid = trace.trace_id
        rows += [(tid, s.span_id, s.section_start, s.section_end) for s in trace.critical_path()]
    cols = ("trace_id", "span_id", "section_start", "section_end")
    got = list(zip(*(table.column(c).to_pylist() for c in cols), strict=True))
    assert got == rows


def test_critical_paths_in_any_row_order_and_over_a_sliced_batch():
    # Shuffled rows take the regrouping route; a slice gives the parent column's
    # validity bitmap a bit offset. Both must agree with assembly + the walk.
    b = generate(4_000, WorkloadConfig(seed=17)).slice(3)
    assert b.column("parent_span_id").offset == 3 and b.column("parent_span_id").null_count
    shuffled = b.take(pa.array(np.random.default_rng(2).permutation(b.num_rows)))
    for x in (b, shuffled):
        table = critical_paths(x)
        assert table.schema == assemble(x).critical_paths().schema
        assert table.equals(assemble(x).critical_paths())
        assert table.num_rows > len(assemble(x))


def test_critical_paths_reports_cut_cycles(caplog):
    with caplog.at_level("WARNING", logger="knhk.tracing"):
        table = critical_paths(batch((1, 3, 0, 10), (2, 1, 1, 9), (3, 2, 2, 8)))
    assert "cut 1 cycle" in caplog.text
    assert table.column("section_end").to_pylist()[0] == 10


def test_paths_of_a_workload_tile_every_root():
    ts = assemble(generate(5_000, WorkloadConfig(seed=5)))
    table = ts.critical_paths()
    start = ts.spans.column("start_time_ns").to_numpy()
    end = ts.spans.column("end_time_ns").to_numpy()
    roots = np.flatnonzero(ts.parent < 0)
    total = (table.column("section_end").to_numpy() - table.column("section_start").to_numpy())
    assert total.sum() == (end[roots] - start[roots]).sum()


# -- robustness ----------------------------------------------------------------------


def test_duplicates_are_kept_once():
    b = batch((1, None, 0, 10), (2, 1, 2, 5), (2, 1, 2, 5))
    ts = assemble(knhk.SpanBatch.concat([b, b]))
    assert ts.spans.num_rows == 2 and ts.duplicates == 4


def test_self_parent_is_a_cycle_not_a_hang():
    ts = assemble(batch((1, 1, 0, 10), (2, 1, 1, 5)))
    assert ts.cycles == 1 and ts.in_cycle.tolist() == [True, False]
    assert ts.parent.tolist() == [-1, 0] and ts.depth.tolist() == [0, 1]
    assert [s[1:] for s in ts[0].critical_path()] == [(5, 10), (1, 5), (0, 1)]


def test_cycle_in_parent_chain_is_reported(caplog):
    # 1 <- 2 <- 3 <- 1: no root at all.
    with caplog.at_level("WARNING", logger="knhk.tracing"):
        ts = assemble(batch((1, 3, 0, 10), (2, 1, 1, 9), (3, 2, 2, 8)))
    assert ts.cycles == 1 and ts.anomalies()["cycles"] == 1
    assert "cycle" in caplog.text
    assert (ts.parent < 0).sum() == 1
    assert sorted(ts.depth.tolist()) == [0, 1, 2]
    path = ts[0].critical_path()
    root = ts.spans.column("span_id")[int(np.flatnonzero(ts.parent < 0)[0])].as_py()
    assert path[0].span_id == root


def test_negative_duration_is_rejected_before_assembly():
    # SpanBatch refuses end < start, so assembly never sees it (the kernel
    # tests cover the zero-length reading the Python layer applies anyway).
    with pytest.raises(SchemaError, match="end before start"):
        assemble(batch((1, None, 0, 10), (2, 1, 6, 3)))


def test_ids_of_the_wrong_width_are_rejected():
    with pytest.raises((SchemaError, ValueError), match=r"trace_id.*16 bytes"):
        assemble({"trace_id": [b"\x01" * 8], "span_id": [b"\x01" * 8], "name": ["a"],
                  "start_time_ns": [0], "end_time_ns": [1]})
    with pytest.raises(ValueError, match="16 bytes"):
        TraceAssembler().assemble_trace(b"\x01" * 8)


@pytest.mark.slow
def test_a_trace_of_a_million_spans():
    n = 1_000_000
    ids = [i.to_bytes(8, "big") for i in range(1, n + 1)]
    b = knhk.SpanBatch({"trace_id": [b"\x01" * 16] * n, "span_id": ids,
                        "parent_span_id": [None, *ids[:-1]], "name": ["x"] * n,
                        "start_time_ns": np.arange(n), "end_time_ns": 2 * n - np.arange(n)})
    ts = assemble(b)
    assert int(ts.depth.max()) == n - 1
    t = ts.critical_paths()
    assert pa.compute.sum(pa.compute.subtract(t.column("section_end"),
                                              t.column("section_start"))).as_py() == 2 * n


def test_a_deep_trace_short():
    n = 50_000
    ids = [i.to_bytes(8, "big") for i in range(1, n + 1)]
    b = knhk.SpanBatch({"trace_id": [b"\x01" * 16] * n, "span_id": ids,
                        "parent_span_id": [None, *ids[:-1]], "name": ["x"] * n,
                        "start_time_ns": np.arange(n), "end_time_ns": 2 * n - np.arange(n)})
    ts = assemble(b)
    assert int(ts.depth.max()) == n - 1
    assert len(ts[0].critical_path()) == 2 * n - 1


# -- assembler -------------------------------------------------------------------------


def test_assembler_span_and_batch_forms_agree():
    b = generate(800, WorkloadConfig(seed=3))
    by_batch, by_span = TraceAssembler(), TraceAssembler()
    by_batch.add_batch(b.slice(0, 300))
    by_batch.add_batch(b.slice(300))
    for span in b.to_spans():
        by_span.add_span(span)
    tid = b.column("trace_id")[0].as_py()
    t1, t2 = by_batch.assemble_trace(tid), by_span.assemble_trace(tid.hex())
    assert isinstance(t1, Trace) and t1.trace_id == tid
    assert t1.critical_path() == t2.critical_path()
    assert t1.spans.num_rows == int(np.sum(np.array(b.column("trace_id").to_pylist()) == tid))
    assert len(by_batch.assemble_all()) == len(assemble(b))
    with pytest.raises(KeyError, match="no span of trace"):
        by_batch.assemble_trace(b"\xff" * 16)


def test_children_and_depth():
    t = assemble(batch((1, None, 0, 10), (2, 1, 1, 5), (3, 1, 5, 9), (4, 3, 6, 7)))[0]
    assert t.children(sid(1)) == [sid(2), sid(3)]
    assert t.children(sid(4)) == []
    assert t.depth.tolist() == [0, 1, 1, 2]
    with pytest.raises(KeyError):
        t.children(sid(42))
    with pytest.raises(ValueError, match="8 bytes"):
        t.children(5)


# -- latency breakdown and service graph ---------------------------------------------


def test_latency_breakdown_by_hand():
    # R [0,100] with children A [10,40], B [30,60] (overlapping: union [10,60])
    # and C [90,120] (clipped to [90,100]): R's self time is 100 - 60 = 40.
    b = batch((1, None, 0, 100, 1, "front"), (2, 1, 10, 40, 1, "db"),
              (3, 1, 30, 60, 1, "db"), (4, 1, 90, 120, 1, "cache"))
    t = assemble(b)[0].latency_breakdown()
    rows = {(r["service"], r["operation"]): r for r in t.to_pylist()}
    assert t.column_names == ["service", "operation", "count", "total_time_ns",
                              "self_time_ns", "min_ns", "avg_ns", "max_ns", "percent"]
    assert rows[("front", "op1")]["self_time_ns"] == 40
    assert rows[("db", "op2")]["self_time_ns"] == 30
    assert rows[("cache", "op4")]["total_time_ns"] == 30
    # The trace lasts 0..120.
    assert rows[("front", "op1")]["percent"] == pytest.approx(100 * 40 / 120)


def test_latency_breakdown_matches_python_over_a_workload():
    b = generate(2_000, WorkloadConfig(seed=9))
    ts = assemble(b)
    table = latency_breakdown(b)
    svc = ts.spans.column("service").cast(pa.string()).to_pylist()
    op = ts.spans.column("name").cast(pa.string()).to_pylist()
    st = ts.spans.column("start_time_ns").to_pylist()
    en = ts.spans.column("end_time_ns").to_pylist()
    par = ts.parent.tolist()
    kids = defaultdict(list)
    for i, p in enumerate(par):
        if p >= 0:
            kids[p].append(i)
    agg = defaultdict(lambda: [0, 0, 0, None, None])
    for i in range(len(par)):
        ivs = sorted((max(st[c], st[i]), min(en[c], en[i])) for c in kids[i])
        covered, hi = 0, st[i]
        for a, e in ivs:
            a = max(a, hi)
            if e > a:
                covered += e - a
                hi = e
        a = agg[(svc[i], op[i])]
        d = en[i] - st[i]
        a[0] += 1
        a[1] += d
        a[2] += max(d - covered, 0)
        a[3] = d if a[3] is None else min(a[3], d)
        a[4] = d if a[4] is None else max(a[4], d)
    got = {(r["service"], r["operation"]): [r["count"], r["total_time_ns"], r["self_time_ns"],
                                            r["min_ns"], r["max_ns"], r["avg_ns"]]
           for r in table.to_pylist()}
    assert got == {key: [*v, v[1] / v[0]] for key, v in agg.items()}
    selfs = table.column("self_time_ns").to_pylist()
    assert selfs == sorted(selfs, reverse=True)


def test_service_call_graph_by_hand():
    b = batch((1, None, 0, 100, SERVER, "front"), (2, 1, 10, 30, CLIENT, "front"),
              (3, 2, 12, 28, SERVER, "db", 2), (4, 1, 40, 50, CLIENT, "cache"),
              (5, 1, 60, 90, CLIENT, "cache"))
    g = assemble(b)[0].service_call_graph().to_pylist()
    assert g == [
        {"client": "front", "server": "cache", "calls": 2, "errors": 0,
         "latency_total_ns": 40, "latency_avg_ns": 20.0, "latency_p99_ns": 30},
        {"client": "front", "server": "db", "calls": 1, "errors": 1,
         "latency_total_ns": 16, "latency_avg_ns": 16.0, "latency_p99_ns": 16},
    ]


def test_service_call_graph_aggregates_traces():
    b = generate(3_000, WorkloadConfig(seed=4))
    ts = assemble(b)
    agg = service_call_graph(b)
    per_trace = defaultdict(int)
    for t in ts:
        for r in t.service_call_graph().to_pylist():
            per_trace[(r["client"], r["server"])] += r["calls"]
    assert {(r["client"], r["server"]): r["calls"] for r in agg.to_pylist()} == dict(per_trace)
    assert len(agg) > 0


def test_service_graph_exports_as_metrics():
    b = batch((1, None, 0, 100, SERVER, "front"), (2, 1, 10, 30, CLIENT, "db", 2),
              (3, 1, 40, 50, CLIENT, "db"))
    edges = service_call_graph(b)
    m = service_graph_metrics(edges, time_ns=1_000)
    got = {(r["name"], r["attributes"][0]["str"], r["attributes"][1]["str"]):
           (r["int_value"] if r["int_value"] is not None else r["value"])
           for r in m.record_batch.to_pylist()}
    assert got[("traces_service_graph_request_total", "front", "db")] == 2
    assert got[("traces_service_graph_request_failed_total", "front", "db")] == 1
    assert got[("traces_service_graph_request_latency_avg_seconds", "front", "db")] == 15e-9
    assert got[("traces_service_graph_request_latency_p99_seconds", "front", "db")] == 20e-9
    assert set(m.column("time_ns").to_pylist()) == {1_000}
    with pytest.raises(ValueError, match="service_call_graph"):
        service_graph_metrics(pa.table({"x": [1]}))


def test_empty_input_gives_empty_results():
    e = knhk.SpanBatch.empty()
    ts = assemble(e)
    assert len(ts) == 0 and ts.anomalies() == {"duplicates": 0, "orphans": 0, "cycles": 0,
                                               "negative_durations": 0}
    assert critical_paths(e).num_rows == 0
    assert latency_breakdown(e).num_rows == 0
    assert service_call_graph(e).num_rows == 0
    assert service_graph_metrics(service_call_graph(e)).num_rows == 0
    assert len(TraceAssembler().assemble_all()) == 0


def test_service_call_graph_matches_python_over_a_workload():
    # A dict per (client, server) of the child spans' durations, sorted; p99 by
    # nearest rank, exactly as the Collector's servicegraph connector reads it.
    b = generate(6_000, WorkloadConfig(seed=21))
    ts = assemble(b)
    svc = ts.spans.column("service").cast(pa.string()).to_pylist()
    status = ts.spans.column("status_code").to_pylist()
    start = ts.spans.column("start_time_ns").to_pylist()
    end = ts.spans.column("end_time_ns").to_pylist()
    edges = defaultdict(lambda: [[], 0])
    for c, p in enumerate(ts.parent.tolist()):
        if p >= 0 and svc[p] != svc[c]:
            e = edges[(svc[p], svc[c])]
            e[0].append(end[c] - start[c])
            e[1] += status[c] == 2 or status[p] == 2
    expected = []
    for (client, server), (lats, errors) in sorted(edges.items()):
        lats.sort()
        expected.append({"client": client, "server": server, "calls": len(lats),
                         "errors": errors, "latency_total_ns": sum(lats),
                         "latency_avg_ns": sum(lats) / len(lats),
                         "latency_p99_ns": lats[-(-99 * len(lats) // 100) - 1]})
    got = service_call_graph(b).to_pylist()
    assert len(got) > 3 and any(e["errors"] for e in got)
    assert got == expected


def test_service_call_graph_p99_with_many_edges(monkeypatch):
    # Past the per-edge selection limit, one sort finds every p99: both must agree.
    import knhk.tracing.assembler as asm

    b = generate(3_000, WorkloadConfig(seed=8))
    by_selection = service_call_graph(b)
    monkeypatch.setattr(asm, "_SELECT_PER_EDGE_MAX", 0)
    by_sort = service_call_graph(b)
    assert len(by_sort) > 3 and by_sort.equals(by_selection)
