"""Trace kernels: assembly (parent index), critical paths and self times.

``assemble`` groups rows by trace id (open-addressing hash table on the 128-bit
id, growing with the number of traces, traces numbered in order of first
appearance, then a stable counting sort), keeps the first row of every (trace,
span id) pair, and finds each span's parent row by a hash join on (trace,
parent span id), trace by trace through a small table that stays in cache.
Orphans become roots; cycles in parent links are found by coloured walks up
the parent chain (each row is walked once) and broken at the row where the
walk met itself.

``critical_paths`` follows the semantics of Jaeger UI's critical path
(jaegertracing/jaeger-ui, TracePage/CriticalPath): children are clamped to
their parent's clamped interval (dropped with their subtree when they lie
outside it), CONSUMER children of PRODUCER parents are left out, and the walk
goes from a span to its last-finishing child, returning to the parent with the
child's start as a bound. The walk is iterative: no recursion however deep.
Each trace is processed in scratch space sized by the longest trace.

Python owns every array; positions are indices into the kept rows grouped by
trace.
"""

import numpy as np

cimport numpy as cnp

from libc.stdlib cimport free, malloc, qsort

from knhk._core._ids cimport be64, id_hash
from knhk._core._types cimport int8_t, int64_t, uint8_t, uint64_t

cnp.import_array()


# OTel SpanKind numbering.
cdef enum:
    KIND_PRODUCER = 4
    KIND_CONSUMER = 5

# Row flags written by ``assemble``.
cdef enum:
    _FLAG_ORPHAN = 1
    _FLAG_CYCLE = 2

FLAG_ORPHAN = _FLAG_ORPHAN
FLAG_CYCLE = _FLAG_CYCLE


cdef struct child_t:
    int64_t end
    int64_t start
    int64_t pos


cdef inline int _child_cmp(const void* a, const void* b) noexcept nogil:
    # Last-finishing first; on equal ends the earlier child (start, then position).
    cdef const child_t* x = <const child_t*>a
    cdef const child_t* y = <const child_t*>b
    if x.end != y.end:
        return -1 if x.end > y.end else 1
    if x.start != y.start:
        return -1 if x.start < y.start else 1
    if x.pos != y.pos:
        return -1 if x.pos < y.pos else 1
    return 0


cdef inline void _sort_children(child_t* c, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef child_t t
    if k > 16:
        qsort(c, k, sizeof(child_t), _child_cmp)
        return
    for i in range(1, k):
        t = c[i]
        j = i - 1
        while j >= 0 and _child_cmp(&c[j], &t) > 0:
            c[j + 1] = c[j]
            j -= 1
        c[j + 1] = t


cdef bint _grow(uint64_t** keys_p, int64_t** vals_p, Py_ssize_t* cap_p) noexcept nogil:
    # Doubles the open-addressing table and reinserts every entry.
    cdef Py_ssize_t old = cap_p[0], cap = 2 * old
    cdef uint64_t mask = <uint64_t>(cap - 1)
    cdef uint64_t* keys = <uint64_t*>malloc(2 * cap * sizeof(uint64_t))
    cdef int64_t* vals = <int64_t*>malloc(cap * sizeof(int64_t))
    cdef uint64_t* ok = keys_p[0]
    cdef int64_t* ov = vals_p[0]
    cdef Py_ssize_t i
    cdef uint64_t j
    if keys == NULL or vals == NULL:
        free(keys)
        free(vals)
        return False
    for i in range(cap):
        vals[i] = -1
    for i in range(old):
        if ov[i] < 0:
            continue
        j = id_hash(ok[2 * i], ok[2 * i + 1]) & mask
        while vals[j] >= 0:
            j = (j + 1) & mask
        keys[2 * j] = ok[2 * i]
        keys[2 * j + 1] = ok[2 * i + 1]
        vals[j] = ov[i]
    free(ok)
    free(ov)
    keys_p[0] = keys
    vals_p[0] = vals
    cap_p[0] = cap
    return True


cdef inline Py_ssize_t _pow2_for(Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t cap = 16
    while cap < 2 * n:
        cap <<= 1
    return cap


def assemble(const uint8_t[:, ::1] trace_ids, const uint8_t[:, ::1] span_ids,
             const uint8_t[:, ::1] parent_ids, const uint8_t[::1] has_parent):
    """Group rows by trace, drop duplicate spans, index parents, break cycles.

    Returns ``(rows, trace_offsets, parent, depth, flags, counters)``: ``rows``
    (int64, the kept rows grouped by trace, in row order within a trace),
    ``trace_offsets`` (int64, T + 1), ``parent`` (int64 position of the parent
    or -1), ``depth`` (int64, 0 for a root), ``flags`` (uint8: FLAG_ORPHAN,
    FLAG_CYCLE) and ``counters`` (int64: duplicates, orphans, cycles).
    """
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t cap = 1024
    cdef uint64_t mask = <uint64_t>(cap - 1)
    cdef Py_ssize_t i, p, q, t, m = 0, n_traces = 0, top, a, b, longest = 0
    cdef uint64_t hi, lo, j, sid, last_hi = 0, last_lo = 0
    cdef int64_t dups = 0, orphans = 0, cycles = 0, stamp, d, last_t = -1
    cdef bint failed = False

    trace_of_a = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] trace_of = trace_of_a
    # The trace table grows with the number of traces (not spans), so that it
    # stays in cache when spans of many traces arrive interleaved.
    cdef uint64_t* keys = <uint64_t*>malloc(2 * cap * sizeof(uint64_t))
    cdef int64_t* vals = <int64_t*>malloc(cap * sizeof(int64_t))
    if keys == NULL or vals == NULL:
        free(keys)
        free(vals)
        raise MemoryError("assemble: cannot allocate the trace table")
    for j in range(<uint64_t>cap):
        vals[j] = -1

    # 1. Trace numbering by first appearance; spans of a trace usually come
    # together, so the previous row's trace is tried before the table.
    with nogil:
        for i in range(n):
            hi = be64(&trace_ids[i, 0])
            lo = be64(&trace_ids[i, 8])
            if last_t >= 0 and hi == last_hi and lo == last_lo:
                trace_of[i] = last_t
                continue
            j = id_hash(hi, lo) & mask
            while True:
                if vals[j] < 0:
                    keys[2 * j] = hi
                    keys[2 * j + 1] = lo
                    vals[j] = n_traces
                    trace_of[i] = n_traces
                    n_traces += 1
                    break
                if keys[2 * j] == hi and keys[2 * j + 1] == lo:
                    trace_of[i] = vals[j]
                    break
                j = (j + 1) & mask
            last_hi = hi
            last_lo = lo
            last_t = trace_of[i]
            if 2 * n_traces > cap:
                if not _grow(&keys, &vals, &cap):
                    failed = True
                    break
                mask = <uint64_t>(cap - 1)
    free(keys)
    free(vals)
    if failed:
        raise MemoryError("assemble: cannot grow the trace table")

    counts_a = np.zeros(n_traces + 1, dtype=np.int64)
    sorted_a = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] counts = counts_a
    cdef int64_t[::1] srt = sorted_a
    rows_a = np.empty(n, dtype=np.int64)
    offsets_a = np.zeros(n_traces + 1, dtype=np.int64)
    parent_a = np.full(n, -1, dtype=np.int64)
    flags_a = np.zeros(n, dtype=np.uint8)
    cdef int64_t[::1] rows = rows_a
    cdef int64_t[::1] offsets = offsets_a
    cdef int64_t[::1] parent = parent_a
    cdef uint8_t[::1] flags = flags_a

    ssid_a = np.empty(n, dtype=np.uint64)
    spid_a = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] ssid = ssid_a
    cdef uint64_t[::1] spid = spid_a

    # 2. Stable counting sort by trace.
    with nogil:
        for i in range(n):
            counts[trace_of[i] + 1] += 1
        for t in range(n_traces):
            if counts[t + 1] > longest:
                longest = counts[t + 1]
            counts[t + 1] += counts[t]
        for t in range(n_traces + 1):
            offsets[t] = counts[t]
        # Ids move with their rows (read in row order, written scattered), so
        # that the per-trace passes below read them in order.
        for i in range(n):
            t = trace_of[i]
            p = counts[t]
            srt[p] = i
            ssid[p] = be64(&span_ids[i, 0])
            spid[p] = be64(&parent_ids[i, 0]) if has_parent[i] else 0
            counts[t] += 1

    # 3. Per trace, a small table on span id (it stays in cache): keep the
    # first row of each span id, then join each parent id against it.
    cap = _pow2_for(longest)
    local_keys_a = np.empty(cap, dtype=np.uint64)
    local_vals_a = np.empty(cap, dtype=np.int64)
    cdef uint64_t[::1] lkeys = local_keys_a
    cdef int64_t[::1] lvals = local_vals_a
    with nogil:
        for t in range(n_traces):
            a = offsets[t]
            b = offsets[t + 1]
            mask = <uint64_t>(_pow2_for(b - a) - 1)
            for j in range(mask + 1):
                lvals[j] = -1
            offsets[t] = m
            for p in range(a, b):
                sid = ssid[p]
                j = id_hash(0, sid) & mask
                while True:
                    if lvals[j] < 0:
                        lkeys[j] = sid
                        lvals[j] = m
                        rows[m] = srt[p]
                        # Compacted in place: m <= p, so spid[p] is not yet overwritten.
                        spid[m] = spid[p]
                        m += 1
                        break
                    if lkeys[j] == sid:
                        dups += 1
                        break
                    j = (j + 1) & mask
            for p in range(offsets[t], m):
                sid = spid[p]
                if sid == 0:
                    continue
                j = id_hash(0, sid) & mask
                q = -1
                while lvals[j] >= 0:
                    if lkeys[j] == sid:
                        q = lvals[j]
                        break
                    j = (j + 1) & mask
                if q < 0:
                    flags[p] |= _FLAG_ORPHAN
                    orphans += 1
                else:
                    parent[p] = q
        offsets[n_traces] = m

    mark_a = np.zeros(m, dtype=np.int64)
    depth_a = np.full(m, -1, dtype=np.int64)
    cdef int64_t[::1] mark = mark_a
    cdef int64_t[::1] depth = depth_a

    with nogil:
        # 5. Cycles: walk up from each unvisited row, stamping it; meeting the
        # current stamp again means a cycle, broken where the walk met it.
        for p in range(m):
            if mark[p] != 0:
                continue
            stamp = p + 1
            q = p
            while q >= 0 and mark[q] == 0:
                mark[q] = stamp
                q = parent[q]
            if q >= 0 and mark[q] == stamp:
                parent[q] = -1
                flags[q] |= _FLAG_CYCLE
                cycles += 1

        # 6. Depths: climb to a row of known depth (reusing ``mark`` as a
        # stack), then unwind.
        for p in range(m):
            if depth[p] >= 0:
                continue
            top = 0
            q = p
            while q >= 0 and depth[q] < 0:
                mark[top] = q
                top += 1
                q = parent[q]
            d = -1 if q < 0 else depth[q]
            while top > 0:
                top -= 1
                d += 1
                depth[mark[top]] = d

    counters = np.array([dups, orphans, cycles], dtype=np.int64)
    return (rows_a[:m].copy(), offsets_a, parent_a[:m].copy(), depth_a, flags_a[:m].copy(),
            counters)


def critical_paths(const int64_t[::1] parent, const int64_t[::1] trace_offsets,
                   const int64_t[::1] start, const int64_t[::1] end,
                   const int8_t[::1] kind):
    """Critical paths of all traces (Jaeger UI semantics), one section per row.

    Arrays are indexed by position (rows grouped by trace, as ``assemble``
    returns them; a parent lies in its child's trace); ``end`` must be >=
    ``start``. Returns ``(span_pos, sec_start, sec_end, root_pos,
    path_offsets)``: sections latest first, each root's sections contiguous,
    roots of a trace in start order, and ``path_offsets`` (T + 1) delimiting
    each trace's sections.
    """
    cdef Py_ssize_t m = parent.shape[0]
    cdef Py_ssize_t n_traces = trace_offsets.shape[0] - 1
    cdef Py_ssize_t t, longest = 1
    for t in range(n_traces):
        if trace_offsets[t + 1] - trace_offsets[t] > longest:
            longest = trace_offsets[t + 1] - trace_offsets[t]

    out_pos_a = np.empty(2 * m + 1, dtype=np.int64)
    out_s_a = np.empty(2 * m + 1, dtype=np.int64)
    out_e_a = np.empty(2 * m + 1, dtype=np.int64)
    out_root_a = np.empty(2 * m + 1, dtype=np.int64)
    path_off_a = np.zeros(n_traces + 1, dtype=np.int64)
    cdef int64_t[::1] out_pos = out_pos_a
    cdef int64_t[::1] out_s = out_s_a
    cdef int64_t[::1] out_e = out_e_a
    cdef int64_t[::1] out_root = out_root_a
    cdef int64_t[::1] path_off = path_off_a
    cdef Py_ssize_t n_out = 0
    # Scratch for one trace at a time (sized by the longest), so that it stays in cache.
    cdef int64_t* scratch = <int64_t*>malloc(8 * (longest + 1) * sizeof(int64_t))
    cdef child_t* ch = <child_t*>malloc((longest + 1) * sizeof(child_t))
    if scratch == NULL or ch == NULL:
        free(scratch)
        free(ch)
        raise MemoryError("critical_paths: cannot allocate scratch space")
    # Raw pointers into the helper: memoryview arguments would be acquired
    # and released (atomically) on every call, once per trace.
    cdef const int64_t* par_p = &parent[0] if m else NULL
    cdef const int64_t* st_p = &start[0] if m else NULL
    cdef const int64_t* en_p = &end[0] if m else NULL
    cdef const int8_t* kd_p = &kind[0] if m else NULL
    cdef int64_t* o_pos = &out_pos[0]
    cdef int64_t* o_s = &out_s[0]
    cdef int64_t* o_e = &out_e[0]
    cdef int64_t* o_root = &out_root[0]
    try:
        with nogil:
            for t in range(n_traces):
                n_out = _trace_path(par_p, st_p, en_p, kd_p, trace_offsets[t],
                                    trace_offsets[t + 1], scratch, longest + 1, ch,
                                    o_pos, o_s, o_e, o_root, n_out)
                path_off[t + 1] = n_out
    finally:
        free(scratch)
        free(ch)
    return (out_pos_a[:n_out].copy(), out_s_a[:n_out].copy(), out_e_a[:n_out].copy(),
            out_root_a[:n_out].copy(), path_off_a)


cdef Py_ssize_t _trace_path(const int64_t* parent, const int64_t* start,
                            const int64_t* end, const int8_t* kind,
                            Py_ssize_t a, Py_ssize_t b, int64_t* scratch, Py_ssize_t stride,
                            child_t* ch, int64_t* out_pos, int64_t* out_s,
                            int64_t* out_e, int64_t* out_root,
                            Py_ssize_t n_out) noexcept nogil:
    # One trace, positions a..b, local indices 0..L-1.
    cdef Py_ssize_t L = b - a
    cdef int64_t* cstart = scratch
    cdef int64_t* cend = scratch + stride
    cdef int64_t* coff = scratch + 2 * stride
    cdef int64_t* fill = scratch + 3 * stride
    cdef int64_t* queue = scratch + 4 * stride
    cdef int64_t* ptr = scratch + 5 * stride
    cdef int64_t* roots = scratch + 6 * stride
    cdef int64_t* kept = scratch + 7 * stride
    cdef Py_ssize_t i, q, c, k, lo, hi, head = 0, tail = 0, n_roots = 0, root, cur
    cdef int64_t bound = 0, s0, s1, r
    cdef bint has_bound

    for i in range(L + 1):
        coff[i] = 0
    for i in range(L):
        kept[i] = 0
        if parent[a + i] >= 0:
            coff[parent[a + i] - a + 1] += 1
    for i in range(L):
        coff[i + 1] += coff[i]
        fill[i] = coff[i]
    for i in range(L):
        q = parent[a + i]
        if q >= 0:
            q -= a
            ch[fill[q]].pos = i
            fill[q] += 1
        else:
            roots[n_roots] = i
            n_roots += 1
            cstart[i] = start[a + i]
            cend[i] = end[a + i]
            kept[i] = 1
            queue[tail] = i
            tail += 1

    # Clamp breadth-first, so a parent is clamped before its children.
    while head < tail:
        q = queue[head]
        head += 1
        for k in range(coff[q], coff[q + 1]):
            c = ch[k].pos
            if kind[a + q] == KIND_PRODUCER and kind[a + c] == KIND_CONSUMER:
                continue
            if start[a + c] >= cend[q] or end[a + c] <= cstart[q]:
                continue
            cstart[c] = start[a + c] if start[a + c] > cstart[q] else cstart[q]
            cend[c] = end[a + c] if end[a + c] < cend[q] else cend[q]
            kept[c] = 1
            queue[tail] = c
            tail += 1

    # Keep only clamped children, sorted last-finishing first.
    for q in range(L):
        lo = coff[q]
        hi = lo
        for k in range(coff[q], coff[q + 1]):
            c = ch[k].pos
            if kept[c]:
                ch[hi].pos = c
                ch[hi].end = cend[c]
                ch[hi].start = cstart[c]
                hi += 1
        if hi - lo > 1:
            _sort_children(&ch[lo], hi - lo)
        fill[q] = hi
        ptr[q] = lo

    # Roots in start order (then position): insertion sort, few roots per trace.
    for i in range(1, n_roots):
        r = roots[i]
        k = i - 1
        while k >= 0 and start[a + roots[k]] > start[a + r]:
            roots[k + 1] = roots[k]
            k -= 1
        roots[k + 1] = r

    for i in range(n_roots):
        root = roots[i]
        cur = root
        has_bound = False
        while True:
            # Next qualifying child of cur: with a bound, ends strictly before it.
            c = -1
            while ptr[cur] < fill[cur]:
                k = ptr[cur]
                ptr[cur] += 1
                if has_bound and ch[k].end >= bound:
                    continue
                c = ch[k].pos
                break
            s1 = bound if has_bound else cend[cur]
            s0 = cend[c] if c >= 0 else cstart[cur]
            if s0 != s1:
                out_pos[n_out] = a + cur
                out_s[n_out] = s0
                out_e[n_out] = s1
                out_root[n_out] = a + root
                n_out += 1
            if c >= 0:
                cur = c
                has_bound = False
            elif cur == root:
                break
            else:
                bound = cstart[cur]
                has_bound = True
                cur = parent[a + cur] - a
    return n_out


def self_times(const int64_t[::1] parent, const int64_t[::1] start,
               const int64_t[::1] end):
    """Each span's duration minus the union of its direct children clipped to it (floor 0)."""
    cdef Py_ssize_t m = parent.shape[0]
    cdef Py_ssize_t p, q, k, a, b
    cdef int64_t cur_s, cur_e, cs, ce, covered
    cdef bint have
    out_a = np.empty(m, dtype=np.int64)
    coff_a = np.zeros(m + 1, dtype=np.int64)
    fill_a = np.empty(m, dtype=np.int64)
    cdef int64_t[::1] out = out_a
    cdef int64_t[::1] coff = coff_a
    cdef int64_t[::1] fill = fill_a
    cdef child_t* ch = <child_t*>malloc((m + 1) * sizeof(child_t))
    if ch == NULL:
        raise MemoryError("self_times: cannot allocate the child table")
    try:
        with nogil:
            for p in range(m):
                if parent[p] >= 0:
                    coff[parent[p] + 1] += 1
            for p in range(m):
                coff[p + 1] += coff[p]
            for p in range(m):
                fill[p] = coff[p]
            for p in range(m):
                q = parent[p]
                if q >= 0:
                    # Sorted by start ascending: the comparator sorts by end
                    # descending, so store negated starts as the key.
                    ch[fill[q]].end = -start[p]
                    ch[fill[q]].start = end[p]
                    ch[fill[q]].pos = p
                    fill[q] += 1
            for q in range(m):
                a = coff[q]
                b = coff[q + 1]
                _sort_children(&ch[a], b - a)
                covered = 0
                cur_s = 0
                cur_e = 0
                have = False
                for k in range(a, b):
                    cs = -ch[k].end
                    ce = ch[k].start
                    if cs < start[q]:
                        cs = start[q]
                    if ce > end[q]:
                        ce = end[q]
                    if ce <= cs:
                        continue
                    if not have:
                        cur_s = cs
                        cur_e = ce
                        have = True
                    elif cs > cur_e:
                        covered += cur_e - cur_s
                        cur_s = cs
                        cur_e = ce
                    elif ce > cur_e:
                        cur_e = ce
                if have:
                    covered += cur_e - cur_s
                out[q] = end[q] - start[q] - covered
                if out[q] < 0:
                    out[q] = 0
    finally:
        free(ch)
    return out_a
