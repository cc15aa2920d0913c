"""The trace kernels against plain Python references.

``assemble`` is held equal to a dict-based model (first occurrence of each
(trace, span id) kept, parents looked up in a dict, cycles cut where a walk up
the parent chain meets itself); ``critical_paths`` to a recursive transcription
of Jaeger UI's rules as issue 6 states them; ``self_times`` to a per-span union
of intervals; the fused ``critical_paths_ids`` (with ``trace_runs`` and
``regroup`` in front of it) to the two references composed, ids and all.
Inputs are random forests with duplicates, missing parents, cycles, clock skew,
ties, zero-length spans and producer/consumer pairs, rows in any order.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from knhk._build import load_core

k = load_core("_tracing")


# -- references ---------------------------------------------------------------------


def ref_assemble(tids, sids, pids, has_parent):
    """Dict model of the assembly kernel; ids are Python ints."""
    n = len(tids)
    order_traces: dict[int, int] = {}
    for t in tids:
        order_traces.setdefault(t, len(order_traces))
    by_trace: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        by_trace[order_traces[tids[i]]].append(i)
    rows, offsets, seen, dups = [], [0], {}, 0
    for t in range(len(order_traces)):
        for i in by_trace[t]:
            key = (t, sids[i])
            if key in seen:
                dups += 1
                continue
            seen[key] = len(rows)
            rows.append(i)
        offsets.append(len(rows))
    m = len(rows)
    parent, flags, orphans = [-1] * m, [0] * m, 0
    for p, i in enumerate(rows):
        if has_parent[i] and pids[i] != 0:
            q = seen.get((order_traces[tids[i]], pids[i]))
            if q is None:
                flags[p] |= 1
                orphans += 1
            else:
                parent[p] = q
    mark, cycles = [0] * m, 0
    for p in range(m):
        if mark[p]:
            continue
        q = p
        while q >= 0 and not mark[q]:
            mark[q] = p + 1
            q = parent[q]
        if q >= 0 and mark[q] == p + 1:
            parent[q] = -1
            flags[q] |= 2
            cycles += 1
    depth = []
    for p in range(m):
        d, q = 0, parent[p]
        while q >= 0:
            d, q = d + 1, parent[q]
        depth.append(d)
    return rows, offsets, parent, depth, flags, [dups, orphans, cycles]


def ref_critical_paths(parent, offsets, start, end, kind):
    """Jaeger UI's critical path, recursively, per trace; (pos, s, e, root) tuples."""
    m = len(parent)
    children = defaultdict(list)
    for p in range(m):
        if parent[p] >= 0:
            children[parent[p]].append(p)
    cs, ce = {}, {}

    def clamp(p, s, e):
        cs[p], ce[p] = s, e
        for c in children[p]:
            if kind[p] == 4 and kind[c] == 5:
                continue
            if start[c] >= e or end[c] <= s:
                continue
            clamp(c, max(start[c], s), min(end[c], e))

    out = []

    def walk(p, root, bound=None):
        cands = [c for c in children[p] if c in cs and (bound is None or ce[c] < bound)]
        hi = ce[p] if bound is None else bound
        if cands:
            c = min(cands, key=lambda c: (-ce[c], cs[c], c))
            if ce[c] != hi:
                out.append((p, ce[c], hi, root))
            walk(c, root)
        else:
            if cs[p] != hi:
                out.append((p, cs[p], hi, root))
            if p != root:
                walk(parent[p], root, cs[p])

    path_off = [0]
    for t in range(len(offsets) - 1):
        roots = [p for p in range(offsets[t], offsets[t + 1]) if parent[p] < 0]
        for r in sorted(roots, key=lambda r: (start[r], r)):
            clamp(r, start[r], end[r])
            walk(r, r)
        path_off.append(len(out))
    return out, path_off


def ref_self_times(parent, start, end):
    children = defaultdict(list)
    for p, q in enumerate(parent):
        if q >= 0:
            children[q].append(p)
    out = []
    for p in range(len(parent)):
        ivs = sorted((max(start[c], start[p]), min(end[c], end[p])) for c in children[p])
        covered, cur = 0, None
        for s, e in ivs:
            if e <= s:
                continue
            if cur is None or s > cur[1]:
                if cur is not None:
                    covered += cur[1] - cur[0]
                cur = [s, e]
            else:
                cur[1] = max(cur[1], e)
        if cur is not None:
            covered += cur[1] - cur[0]
        out.append(max(end[p] - start[p] - covered, 0))
    return out


# -- inputs ---------------------------------------------------------------------------


def _ids(values, width):
    return np.array([list(int(v).to_bytes(width, "big")) for v in values],
                    dtype=np.uint8).reshape(len(values), width)


@st.composite
def forests(draw, max_spans=30):
    n = draw(st.integers(1, max_spans))
    tids = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    # Small id ranges make duplicates, missing parents and cycles common.
    sids = draw(st.lists(st.integers(1, 2 * n + 2), min_size=n, max_size=n))
    pids = draw(st.lists(st.integers(0, 2 * n + 2), min_size=n, max_size=n))
    has = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    start = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    dur = draw(st.lists(st.integers(-3, 30), min_size=n, max_size=n))
    kind = draw(st.lists(st.sampled_from([1, 2, 3, 4, 5]), min_size=n, max_size=n))
    return tids, sids, pids, has, start, [s + d for s, d in zip(start, dur, strict=False)], kind


def run_assemble(tids, sids, pids, has):
    return k.assemble(_ids(tids, 16), _ids(sids, 8), _ids(pids, 8),
                      np.array(has, dtype=np.uint8))


# -- tests --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(forests())
def test_assemble_matches_reference(f):
    tids, sids, pids, has, *_ = f
    rows, offsets, parent, depth, flags, counters = run_assemble(tids, sids, pids, has)
    ref = ref_assemble(tids, sids, pids, has)
    assert rows.tolist() == ref[0]
    assert offsets.tolist() == ref[1]
    assert parent.tolist() == ref[2]
    assert depth.tolist() == ref[3]
    assert flags.tolist() == ref[4]
    assert counters.tolist() == ref[5]


def test_assemble_reads_ids_big_endian_and_whole():
    # Trace ids differing only in the high half, span ids only in the first byte.
    tids = [1, 1 << 64]
    sids = [1 << 56, 1 << 56]
    _rows, offsets, parent, *_ = run_assemble(tids, sids, [0, 0], [False, False])
    assert offsets.tolist() == [0, 1, 2]
    assert parent.tolist() == [-1, -1]


def test_self_parent_and_two_cycles_are_cut():
    # 1 -> 1 (self), 2 -> 3 -> 2 (two-cycle), 4 -> 2 (hangs off the cycle).
    _rows, _offsets, parent, depth, flags, counters = run_assemble(
        [1, 1, 1, 1], [1, 2, 3, 4], [1, 3, 2, 2], [True] * 4)
    assert counters.tolist() == [0, 0, 2]
    assert parent[0] == -1 and flags[0] == k.FLAG_CYCLE
    assert sorted(parent[1:3].tolist()) == [-1, 1]
    assert depth.tolist() == ref_assemble([1] * 4, [1, 2, 3, 4], [1, 3, 2, 2], [True] * 4)[3]


@settings(max_examples=300, deadline=None)
@given(forests())
def test_critical_paths_match_reference(f):
    tids, sids, pids, has, start, end, kind = f
    rows, offsets, parent, *_ = run_assemble(tids, sids, pids, has)
    s = np.array(start, dtype=np.int64)[rows]
    e = np.maximum(np.array(end, dtype=np.int64)[rows], s)
    kd = np.array(kind, dtype=np.int8)[rows]
    pos, s0, s1, root, path_off = k.critical_paths(parent, offsets, s, e, kd)
    ref, ref_off = ref_critical_paths(parent.tolist(), offsets.tolist(), s.tolist(),
                                      e.tolist(), kd.tolist())
    assert list(zip(pos.tolist(), s0.tolist(), s1.tolist(), root.tolist(), strict=False)) == ref
    assert path_off.tolist() == ref_off


@settings(max_examples=300, deadline=None)
@given(forests())
def test_sections_tile_each_root(f):
    tids, sids, pids, has, start, end, kind = f
    rows, offsets, parent, *_ = run_assemble(tids, sids, pids, has)
    s = np.array(start, dtype=np.int64)[rows]
    e = np.maximum(np.array(end, dtype=np.int64)[rows], s)
    _pos, s0, s1, root, _ = k.critical_paths(parent, offsets, s, e,
                                            np.array(kind, dtype=np.int8)[rows])
    assert np.all(s1 > s0)
    for r in np.flatnonzero(parent < 0):
        sel = root == r
        # Latest first and contiguous: each section ends where the next begins.
        a, b = s0[sel], s1[sel]
        assert np.array_equal(b[1:], a[:-1])
        assert (b - a).sum() == e[r] - s[r]
        if sel.any():
            assert b[0] == e[r] and a[-1] == s[r]
            idx = np.flatnonzero(sel)
            assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))


@settings(max_examples=200, deadline=None)
@given(forests())
def test_self_times_match_reference(f):
    tids, sids, pids, has, start, end, _ = f
    rows, _offsets, parent, *_ = run_assemble(tids, sids, pids, has)
    s = np.array(start, dtype=np.int64)[rows]
    e = np.maximum(np.array(end, dtype=np.int64)[rows], s)
    assert k.self_times(parent, s, e).tolist() == ref_self_times(parent.tolist(), s.tolist(),
                                                                  e.tolist())


def test_wide_trace_sorts_children_with_qsort_path():
    # 200 children of one root (beyond the insertion-sort cutoff), all ends distinct
    # except ties, checked against the reference.
    rng = np.random.default_rng(7)
    n = 201
    parent = np.r_[-1, np.zeros(n - 1, dtype=np.int64)].astype(np.int64)
    s = np.r_[0, rng.integers(0, 900, n - 1)].astype(np.int64)
    e = np.r_[1000, s[1:] + rng.integers(0, 60, n - 1)].astype(np.int64)
    kd = np.ones(n, dtype=np.int8)
    off = np.array([0, n], dtype=np.int64)
    pos, s0, s1, root, _ = k.critical_paths(parent, off, s, e, kd)
    ref, _ = ref_critical_paths(parent.tolist(), off.tolist(), s.tolist(), e.tolist(),
                                kd.tolist())
    assert list(zip(pos.tolist(), s0.tolist(), s1.tolist(), root.tolist(), strict=False)) == ref


def test_deep_chain_needs_no_recursion():
    n = 300_000
    parent = np.arange(-1, n - 1, dtype=np.int64)
    s = np.arange(n, dtype=np.int64)
    e = np.full(n, 2 * n, dtype=np.int64) - s
    pos, s0, s1, _root, _ = k.critical_paths(parent, np.array([0, n], dtype=np.int64), s, e,
                                            np.ones(n, dtype=np.int8))
    assert (s1 - s0).sum() == e[0] - s[0]
    assert len(pos) == 2 * n - 1
    _rows, _offsets, _par, depth, *_ = run_assemble([1] * 3, [1, 2, 3], [0, 1, 2],
                                                 [False, True, True])
    assert depth.tolist() == [0, 1, 2]


def test_assemble_many_interleaved_traces_grows_the_trace_table():
    # 3,000 traces (the table starts at 1,024 slots), spans shuffled, with duplicates.
    rng = np.random.default_rng(3)
    n = 12_000
    tids = rng.integers(1, 3_001, n).tolist()
    sids = rng.integers(1, 6, n).tolist()
    pids = rng.integers(0, 6, n).tolist()
    has = (rng.random(n) < 0.8).tolist()
    got = run_assemble(tids, sids, pids, has)
    ref = ref_assemble(tids, sids, pids, has)
    assert len(got[1]) - 1 == len(set(tids))
    for g, r in zip(got, ref, strict=True):
        assert g.tolist() == r


# -- the fused kernel ------------------------------------------------------------------


def ref_trace_runs(tids):
    """Offsets of the traces when each trace's rows are contiguous, else None."""
    seen, first = set(), []
    for i, t in enumerate(tids):
        if i and t == tids[i - 1]:
            continue
        if t in seen:
            return None
        seen.add(t)
        first.append(i)
    return [*first, len(tids)]


def ref_paths_ids(tids, sids, pids, has, start, end, kind):
    """Sections as (trace id, root span id, span id, start, end) bytes and ints."""
    rows, offsets, parent, *_ = ref_assemble(tids, sids, pids, has)
    s = [start[i] for i in rows]
    e = [max(end[i], start[i]) for i in rows]
    sections, _ = ref_critical_paths(parent, offsets, s, e, [kind[i] for i in rows])
    return [(tids[rows[p]].to_bytes(16, "big"), sids[rows[r]].to_bytes(8, "big"),
             sids[rows[p]].to_bytes(8, "big"), a, b) for p, a, b, r in sections]


def run_paths_ids(tids, sids, pids, has, start, end, kind, bit_offset=0):
    """The kernels as ``knhk.tracing.critical_paths`` chains them; sections as tuples."""
    # The validity bitmap as Arrow lays it out, starting ``bit_offset`` bits in.
    bits = np.packbits(np.r_[np.ones(bit_offset, bool), np.array(has, bool)],
                       bitorder="little")
    cols = (_ids(tids, 16), _ids(sids, 8), _ids(pids, 8), bits, bit_offset,
            np.array(start, dtype=np.int64), np.array(end, dtype=np.int64),
            np.array(kind, dtype=np.int8))
    offsets = k.trace_runs(cols[0])
    assert (None if offsets is None else offsets.tolist()) == ref_trace_runs(tids)
    if offsets is None:
        *grouped, offsets = k.regroup(*cols)
        cols = (*grouped[:3], np.empty(0, np.uint8), 0, *grouped[3:])
    tid, root, sid, s0, s1, counters = k.critical_paths_ids(*cols, offsets)
    assert tid.shape == (len(s0), 16) and root.shape == sid.shape == (len(s0), 8)
    got = [(bytes(a), bytes(b), bytes(c), int(d), int(e))
           for a, b, c, d, e in zip(tid, root, sid, s0, s1, strict=True)]
    return got, counters.tolist()


@st.composite
def forests_any_order(draw):
    """Forests with rows interleaved across traces, or grouped by trace."""
    f = draw(forests())
    if draw(st.booleans()):
        # Rows grouped by trace (first appearance), row order kept within a trace.
        first = {t: i for i, t in reversed(list(enumerate(f[0])))}
        order = sorted(range(len(f[0])), key=lambda i: first[f[0][i]])
        f = tuple([col[i] for i in order] for col in f)
    return f


@settings(max_examples=250, deadline=None)
@given(forests_any_order(), st.integers(0, 9))
def test_critical_paths_ids_match_references(f, bit_offset):
    tids, sids, pids, has, *_ = f
    got, counters = run_paths_ids(*f, bit_offset=bit_offset)
    assert got == ref_paths_ids(*f)
    assert counters == ref_assemble(tids, sids, pids, has)[5]


@settings(max_examples=100, deadline=None)
@given(forests())
def test_regroup_is_a_stable_sort_by_first_appearance(f):
    tids, sids, pids, has, start, end, kind = f
    cols = (_ids(tids, 16), _ids(sids, 8), _ids(pids, 8),
            np.packbits(np.array(has, bool), bitorder="little"), 0,
            np.array(start, dtype=np.int64), np.array(end, dtype=np.int64),
            np.array(kind, dtype=np.int8))
    rank = {t: r for r, t in enumerate(dict.fromkeys(tids))}
    order = np.argsort(np.array([rank[t] for t in tids]), kind="stable")
    g_tid, g_sid, g_pid, g_start, g_end, g_kind, offsets = k.regroup(*cols)
    assert np.array_equal(g_tid, cols[0][order])
    assert np.array_equal(g_sid, cols[1][order])
    # A null parent reads as eight zero bytes: no parent.
    assert np.array_equal(g_pid, np.where(np.array(has)[:, None], cols[2], 0)[order])
    assert np.array_equal(g_start, cols[5][order]) and np.array_equal(g_end, cols[6][order])
    assert np.array_equal(g_kind, cols[7][order])
    assert offsets.tolist() == [0, *np.cumsum(np.bincount([rank[t] for t in tids])).tolist()]


def test_critical_paths_ids_result_grows_past_one_section_per_span():
    # A chain of 300 spans has 599 sections: the result outgrows its first
    # reservation (one section per span, plus 16) and must be regrown without loss.
    n = 300
    f = ([1] * n, list(range(1, n + 1)), list(range(0, n)), [True] * n,
         list(range(n)), [2 * n - i for i in range(n)], [1] * n)
    got, _ = run_paths_ids(*f)
    assert len(got) == 2 * n - 1
    assert got == ref_paths_ids(*f)


def test_critical_paths_ids_of_nothing():
    got, counters = run_paths_ids([], [], [], [], [], [], [])
    assert got == [] and counters == [0, 0, 0]
    assert k.trace_runs(np.zeros((0, 16), np.uint8)).tolist() == [0]


def test_critical_paths_ids_reads_only_valid_parents():
    # Row 1's parent bytes name row 0, but its validity bit is clear: a root.
    f = ([1, 1], [1, 2], [0, 1], [True, False], [0, 2], [10, 5], [1, 1])
    got, counters = run_paths_ids(*f, bit_offset=3)
    assert counters == [0, 0, 0]
    assert [g[1:] for g in got] == [(b"\0" * 7 + b"\1", b"\0" * 7 + b"\1", 0, 10),
                                     (b"\0" * 7 + b"\2", b"\0" * 7 + b"\2", 2, 5)]
