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
A span's children are clamped and sorted when the walk first enters it, so a
dropped subtree is never looked at. Each trace is processed in scratch space
sized by the longest trace.

``critical_paths_ids`` fuses the two for rows already grouped by trace
(``trace_runs`` finds the runs; ``regroup`` moves interleaved rows into trace
order first): per trace it dedups, joins parents and cuts cycles in a table
that stays in cache, walks the path, and writes the ids of each section
straight into the result, reading the Arrow id buffers and validity bitmap as
they are. Its result buffers are malloc'd, grown and trimmed by realloc, and
handed to NumPy without a copy.

Python owns every input array; positions are indices into the kept rows
grouped by trace.
"""

import numpy as np

cimport numpy as cnp

from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_New
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

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


cdef inline uint64_t _span_slot(uint64_t sid, int shift) noexcept nogil:
    # Fibonacci hashing (Knuth, TAOCP 6.4) on the big-endian value: one multiply,
    # and sequential ids, common in tests and some SDKs, spread evenly.
    return (_bswap(sid) * <uint64_t>0x9E3779B97F4A7C15ULL) >> shift


cdef inline int _table_bits(Py_ssize_t n) noexcept nogil:
    # A span table of 2**bits >= 4n slots (at least 16): probes stay short.
    cdef int bits = 4
    while (<Py_ssize_t>1 << bits) < 4 * n:
        bits += 1
    return bits


cdef inline uint64_t _bswap(uint64_t x) noexcept nogil:
    return be64(<const uint8_t*>&x)


cdef inline uint64_t _raw64(const uint8_t* p) noexcept nogil:
    # Native-order load of 8 id bytes: equality and hashing need no byte order,
    # and the same bytes are stored back into the result unchanged.
    cdef uint64_t x
    memcpy(&x, p, 8)
    return x


cdef Py_ssize_t _number_traces(const uint8_t* tp, Py_ssize_t n, int64_t* trace_of,
                               int64_t* first) noexcept nogil:
    # Numbers traces by first appearance (the open-addressing table of
    # ``assemble``), writing each trace's first row to ``first`` and, when
    # ``trace_of`` is not NULL, each row's trace. Returns the number of traces;
    # -1 when memory runs out; -2, without ``trace_of``, as soon as a trace
    # comes back after another trace's rows (the rows are not grouped).
    cdef Py_ssize_t cap = 1024, i, n_traces = 0
    cdef uint64_t mask = <uint64_t>(cap - 1)
    cdef uint64_t hi, lo, j, last_hi = 0, last_lo = 0
    cdef int64_t last_t = -1, t
    cdef uint64_t* keys = <uint64_t*>malloc(2 * cap * sizeof(uint64_t))
    cdef int64_t* vals = <int64_t*>malloc(cap * sizeof(int64_t))
    if keys == NULL or vals == NULL:
        free(keys)
        free(vals)
        return -1
    for j in range(<uint64_t>cap):
        vals[j] = -1
    for i in range(n):
        hi = _raw64(tp + 16 * i)
        lo = _raw64(tp + 16 * i + 8)
        if last_t >= 0 and hi == last_hi and lo == last_lo:
            if trace_of != NULL:
                trace_of[i] = last_t
            continue
        j = id_hash(hi, lo) & mask
        while True:
            if vals[j] < 0:
                keys[2 * j] = hi
                keys[2 * j + 1] = lo
                vals[j] = n_traces
                first[n_traces] = i
                t = n_traces
                n_traces += 1
                break
            if keys[2 * j] == hi and keys[2 * j + 1] == lo:
                t = vals[j]
                if trace_of == NULL:
                    n_traces = -2
                break
            j = (j + 1) & mask
        if n_traces == -2:
            break
        if trace_of != NULL:
            trace_of[i] = t
        last_hi = hi
        last_lo = lo
        last_t = t
        if 2 * n_traces > cap:
            if not _grow(&keys, &vals, &cap):
                n_traces = -1
                break
            mask = <uint64_t>(cap - 1)
    free(keys)
    free(vals)
    return n_traces


def trace_runs(const uint8_t[:, ::1] trace_ids):
    """Offsets of the traces (int64, T + 1) when every trace's rows are contiguous, else None."""
    # Only run boundaries are looked up in the trace table, and the scan stops
    # at the first trace that comes back after another's rows.
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t n_traces
    first_a = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] first = first_a
    with nogil:
        n_traces = _number_traces(&trace_ids[0, 0] if n else NULL, n, NULL, &first[0])
    if n_traces == -1:
        raise MemoryError("trace_runs: cannot allocate the trace table")
    if n_traces == -2:
        return None
    first[n_traces] = n
    return first_a[:n_traces + 1].copy()


def regroup(const uint8_t[:, ::1] trace_ids, const uint8_t[:, ::1] span_ids,
            const uint8_t[:, ::1] parent_ids, const uint8_t[::1] parent_valid,
            Py_ssize_t valid_offset, const int64_t[::1] start, const int64_t[::1] end,
            const int8_t[::1] kind):
    """The columns ``critical_paths_ids`` reads, with rows grouped by trace.

    Traces in order of first appearance, row order within a trace (a stable
    counting sort). A null parent id becomes eight zero bytes, which the
    kernels read as no parent, so the result needs no validity bitmap.
    Returns ``(trace_ids, span_ids, parent_ids, start, end, kind,
    trace_offsets)``.
    """
    # Rows are read in order and written scattered: scattered stores cost far
    # less than the scattered loads of reading through a permutation.
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t i, t, q, n_traces, vbit
    cdef bint all_valid = parent_valid.shape[0] == 0
    cdef const uint8_t* vp = NULL
    cdef const uint8_t* tp = &trace_ids[0, 0] if n else NULL
    cdef const uint8_t* sp = &span_ids[0, 0] if n else NULL
    cdef const uint8_t* pp = &parent_ids[0, 0] if n else NULL
    if not all_valid:
        vp = &parent_valid[0]
    trace_of_a = np.empty(n, dtype=np.int64)
    first_a = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] trace_of = trace_of_a
    cdef int64_t[::1] first = first_a
    with nogil:
        n_traces = _number_traces(tp, n, &trace_of[0] if n else NULL, &first[0])
    if n_traces < 0:
        raise MemoryError("regroup: cannot allocate the trace table")
    offsets_a = np.zeros(n_traces + 1, dtype=np.int64)
    tid_a = np.empty((n, 2), dtype=np.uint64)
    sid_a = np.empty(n, dtype=np.uint64)
    pid_a = np.empty(n, dtype=np.uint64)
    start_a = np.empty(n, dtype=np.int64)
    end_a = np.empty(n, dtype=np.int64)
    kind_a = np.empty(n, dtype=np.int8)
    cdef int64_t[::1] offsets = offsets_a
    cdef int64_t[::1] fill = first_a
    cdef uint64_t[:, ::1] tid_o = tid_a
    cdef uint64_t[::1] sid_o = sid_a
    cdef uint64_t[::1] pid_o = pid_a
    cdef int64_t[::1] start_o = start_a
    cdef int64_t[::1] end_o = end_a
    cdef int8_t[::1] kind_o = kind_a
    with nogil:
        for i in range(n):
            offsets[trace_of[i] + 1] += 1
        for t in range(n_traces):
            offsets[t + 1] += offsets[t]
        for t in range(n_traces):
            fill[t] = offsets[t]
        for i in range(n):
            t = trace_of[i]
            q = fill[t]
            fill[t] += 1
            tid_o[q, 0] = _raw64(tp + 16 * i)
            tid_o[q, 1] = _raw64(tp + 16 * i + 8)
            sid_o[q] = _raw64(sp + 8 * i)
            vbit = valid_offset + i
            if all_valid or (vp[vbit >> 3] >> (vbit & 7)) & 1:
                pid_o[q] = _raw64(pp + 8 * i)
            else:
                pid_o[q] = 0
            start_o[q] = start[i]
            end_o[q] = end[i]
            kind_o[q] = kind[i]
    return (tid_a.view(np.uint8), sid_a.view(np.uint8).reshape(n, 8),
            pid_a.view(np.uint8).reshape(n, 8), start_a, end_a, kind_a, offsets_a)


cdef void _free_capsule(object capsule) noexcept:
    free(PyCapsule_GetPointer(capsule, NULL))


cdef object _owned(void* data, Py_ssize_t n, Py_ssize_t width, int typenum):
    # A NumPy array (n, or n x width) over ``data`` (malloc'd) that frees it:
    # the result is filled without the GIL and handed over without a copy.
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = width
    arr = cnp.PyArray_SimpleNewFromData(1 if width == 1 else 2, dims, typenum, data)
    cnp.set_array_base(<cnp.ndarray>arr, PyCapsule_New(data, NULL, _free_capsule))
    return arr


# The result first gets room for one section per span (paths of realistic
# traces have about one for every two spans), at most this many; it grows if needed.
cdef enum:
    _FIRST_RESERVE_MAX = 1 << 24


cdef struct sections_t:
    uint64_t* tid      # 2 words per section: the trace id's 16 bytes as stored
    uint64_t* root     # the root's span id bytes
    uint64_t* sid      # the section's span id bytes
    int64_t* s
    int64_t* e
    Py_ssize_t cap


cdef bint _reserve(sections_t* o, Py_ssize_t need) noexcept nogil:
    # Grows the result by realloc (glibc moves large blocks by remapping pages
    # rather than copying); a failed realloc leaves the old block valid.
    cdef Py_ssize_t cap = 2 * o.cap
    cdef void* p
    if need <= o.cap:
        return True
    if cap < need:
        cap = need
    p = realloc(o.tid, 16 * cap)
    if p == NULL:
        return False
    o.tid = <uint64_t*>p
    p = realloc(o.root, 8 * cap)
    if p == NULL:
        return False
    o.root = <uint64_t*>p
    p = realloc(o.sid, 8 * cap)
    if p == NULL:
        return False
    o.sid = <uint64_t*>p
    p = realloc(o.s, 8 * cap)
    if p == NULL:
        return False
    o.s = <int64_t*>p
    p = realloc(o.e, 8 * cap)
    if p == NULL:
        return False
    o.e = <int64_t*>p
    o.cap = cap
    return True


cdef inline void* _shrink(void* p, Py_ssize_t size) noexcept nogil:
    # Gives back the unused tail; keeps the block if realloc cannot (it stays valid).
    cdef void* q = realloc(p, size if size > 0 else 1)
    return p if q == NULL else q


def critical_paths_ids(const uint8_t[:, ::1] trace_ids, const uint8_t[:, ::1] span_ids,
                       const uint8_t[:, ::1] parent_ids, const uint8_t[::1] parent_valid,
                       Py_ssize_t valid_offset, const int64_t[::1] start,
                       const int64_t[::1] end, const int8_t[::1] kind,
                       const int64_t[::1] trace_offsets):
    """Assembly and critical paths in one pass, trace by trace, from the id columns.

    Rows must be grouped by trace, ``trace_offsets`` delimiting the traces
    (``trace_runs``, else ``regroup`` first). ``parent_valid`` is the parent
    column's Arrow validity bitmap, read from bit ``valid_offset`` on (empty:
    no nulls). Within a trace the first row of each span id is kept, parents
    are joined on span id, orphans become roots, cycles are cut where
    ``assemble`` cuts them, an end before its start reads as the start, and
    the path is walked as ``critical_paths`` walks it. Returns ``(trace_id,
    root_span_id, span_id, section_start, section_end, counters)``: ids as
    uint8 (k, 16) / (k, 8) holding the input bytes, sections in the order of
    ``critical_paths``, counters (int64: duplicates, orphans, cycles).
    """
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t n_traces = trace_offsets.shape[0] - 1
    cdef bint all_valid = parent_valid.shape[0] == 0
    cdef const uint8_t* vp = NULL
    cdef Py_ssize_t vbit
    cdef Py_ssize_t t, a, b, p, q, x, L, row, longest = 1, stride, hcap, n_out = 0, cnt
    cdef uint64_t sid, hmask, j, tid0, tid1
    cdef int bits
    cdef int64_t dups = 0, orphans = 0, cycles = 0, stamp, s0, e0, n_up, n_down
    cdef Py_ssize_t L_cyc
    cdef bint failed = False
    for t in range(n_traces):
        if trace_offsets[t + 1] - trace_offsets[t] > longest:
            longest = trace_offsets[t + 1] - trace_offsets[t]
    stride = longest + 1
    hcap = <Py_ssize_t>1 << _table_bits(longest)

    # Scratch for one trace at a time, sized by the longest, so that it stays in cache.
    cdef int64_t* walk = <int64_t*>malloc(8 * stride * sizeof(int64_t))
    cdef child_t* ch = <child_t*>malloc(stride * sizeof(child_t))
    cdef int64_t* loc = <int64_t*>malloc(10 * stride * sizeof(int64_t))
    cdef uint64_t* hkeys = <uint64_t*>malloc(hcap * sizeof(uint64_t))
    cdef int64_t* hvals = <int64_t*>malloc(hcap * sizeof(int64_t))
    cdef int8_t* kd = <int8_t*>malloc(stride)
    cdef sections_t o
    o.cap = 0
    o.tid = NULL
    o.root = NULL
    o.sid = NULL
    o.s = NULL
    o.e = NULL
    if (walk == NULL or ch == NULL or loc == NULL or hkeys == NULL or hvals == NULL
            or kd == NULL or not _reserve(&o, (n if n < _FIRST_RESERVE_MAX else
                                               _FIRST_RESERVE_MAX) + 16)):
        failed = True
    # Per kept span of the trace, in row order.
    cdef int64_t* lslot = loc
    cdef uint64_t* lsid = <uint64_t*>(loc + stride)
    cdef uint64_t* lpid = <uint64_t*>(loc + 2 * stride)
    cdef int64_t* par = loc + 3 * stride
    cdef int64_t* st = loc + 4 * stride
    cdef int64_t* en = loc + 5 * stride
    # Per section of the trace (at most 2 per span); the cycle stamps share
    # sec_pos's space, dead before the walk writes it.
    cdef int64_t* sec_pos = loc + 6 * stride
    cdef int64_t* sec_root = loc + 8 * stride
    cdef int64_t* mark = sec_pos
    cdef const uint8_t* tp = &trace_ids[0, 0] if n else NULL
    cdef const uint8_t* sp = &span_ids[0, 0] if n else NULL
    cdef const uint8_t* pp = &parent_ids[0, 0] if n else NULL
    if not all_valid:
        vp = &parent_valid[0]
    if not failed:
        with nogil:
            for j in range(<uint64_t>hcap):
                hvals[j] = -1
            for t in range(n_traces):
                a = trace_offsets[t]
                b = trace_offsets[t + 1]
                bits = _table_bits(b - a)
                hmask = (<uint64_t>1 << bits) - 1
                # Keep the first row of each span id.
                L = 0
                for row in range(a, b):
                    sid = _raw64(sp + 8 * row)
                    j = _span_slot(sid, 64 - bits)
                    while True:
                        if hvals[j] < 0:
                            hkeys[j] = sid
                            hvals[j] = L
                            lslot[L] = <int64_t>j
                            lsid[L] = sid
                            vbit = valid_offset + row
                            if all_valid or (vp[vbit >> 3] >> (vbit & 7)) & 1:
                                lpid[L] = _raw64(pp + 8 * row)
                            else:
                                lpid[L] = 0
                            s0 = start[row]
                            e0 = end[row]
                            st[L] = s0
                            en[L] = e0 if e0 > s0 else s0
                            kd[L] = kind[row]
                            L += 1
                            break
                        if hkeys[j] == sid:
                            dups += 1
                            break
                        j = (j + 1) & hmask
                # Parents by span id; an absent parent makes an orphan root.
                n_up = 0
                n_down = 0
                for q in range(L):
                    par[q] = -1
                    sid = lpid[q]
                    if sid == 0:
                        continue
                    j = _span_slot(sid, 64 - bits)
                    while hvals[j] >= 0:
                        if hkeys[j] == sid:
                            par[q] = hvals[j]
                            break
                        j = (j + 1) & hmask
                    if par[q] < 0:
                        orphans += 1
                for q in range(L):
                    # Branch-free: a self-link (par == q) counts as both kinds.
                    n_up += (par[q] >= 0) & (par[q] <= q)
                    n_down += par[q] >= q
                # Cycles, cut as ``assemble`` cuts them (walks started in row order).
                # A longer cycle needs a link to an earlier row and one to a later
                # row, a self-link is both: without both kinds there is no cycle.
                if n_up == 0 or n_down == 0:
                    L_cyc = 0
                else:
                    L_cyc = L
                for q in range(L_cyc):
                    mark[q] = 0
                for p in range(L_cyc):
                    if mark[p] != 0:
                        continue
                    stamp = p + 1
                    q = p
                    while q >= 0 and mark[q] == 0:
                        mark[q] = stamp
                        q = par[q]
                    if q >= 0 and mark[q] == stamp:
                        par[q] = -1
                        cycles += 1
                if not _reserve(&o, n_out + 2 * L):
                    failed = True
                    break
                cnt = _trace_path(par, 0, st, en, kd, L, walk, stride, ch, sec_pos,
                                  o.s + n_out, o.e + n_out, sec_root, 0)
                # Only the slots this trace filled are emptied again.
                for q in range(L):
                    hvals[lslot[q]] = -1
                tid0 = _raw64(tp + 16 * a)
                tid1 = _raw64(tp + 16 * a + 8)
                for x in range(cnt):
                    o.tid[2 * (n_out + x)] = tid0
                    o.tid[2 * (n_out + x) + 1] = tid1
                    o.sid[n_out + x] = lsid[sec_pos[x]]
                    o.root[n_out + x] = lsid[sec_root[x]]
                n_out += cnt
            if not failed:
                o.tid = <uint64_t*>_shrink(o.tid, 16 * n_out)
                o.root = <uint64_t*>_shrink(o.root, 8 * n_out)
                o.sid = <uint64_t*>_shrink(o.sid, 8 * n_out)
                o.s = <int64_t*>_shrink(o.s, 8 * n_out)
                o.e = <int64_t*>_shrink(o.e, 8 * n_out)
    free(walk)
    free(ch)
    free(loc)
    free(hkeys)
    free(hvals)
    free(kd)
    try:
        if failed:
            raise MemoryError("critical_paths_ids: cannot allocate scratch space or the result")
        # Ownership moves to each array as it is made; what is left is freed below.
        tid_a = _owned(o.tid, n_out, 16, cnp.NPY_UINT8)
        o.tid = NULL
        root_a = _owned(o.root, n_out, 8, cnp.NPY_UINT8)
        o.root = NULL
        sid_a = _owned(o.sid, n_out, 8, cnp.NPY_UINT8)
        o.sid = NULL
        s_a = _owned(o.s, n_out, 1, cnp.NPY_INT64)
        o.s = NULL
        e_a = _owned(o.e, n_out, 1, cnp.NPY_INT64)
        o.e = NULL
    finally:
        free(o.tid)
        free(o.root)
        free(o.sid)
        free(o.s)
        free(o.e)
    return (tid_a, root_a, sid_a, s_a, e_a,
            np.array([dups, orphans, cycles], dtype=np.int64))


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
    cdef Py_ssize_t t, a, longest = 1
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
                a = trace_offsets[t]
                n_out += _trace_path(par_p + a, a, st_p + a, en_p + a, kd_p + a,
                                     trace_offsets[t + 1] - a, scratch, longest + 1, ch,
                                     o_pos + n_out, o_s + n_out, o_e + n_out,
                                     o_root + n_out, a)
                path_off[t + 1] = n_out
    finally:
        free(scratch)
        free(ch)
    return (out_pos_a[:n_out].copy(), out_s_a[:n_out].copy(), out_e_a[:n_out].copy(),
            out_root_a[:n_out].copy(), path_off_a)


cdef inline Py_ssize_t _enter(Py_ssize_t q, const int64_t* start, const int64_t* end,
                              const int8_t* kind, int64_t* cs, int64_t* ce,
                              const int64_t* head, const int64_t* nxt, child_t* ch,
                              Py_ssize_t top) noexcept nogil:
    # Clamps q's children to q's clamped interval (q is clamped already: the
    # walk enters a span only from its parent), drops those outside it and
    # CONSUMER children of a PRODUCER, and lays the rest out at ch[top:],
    # last-finishing first. Returns the new top.
    cdef Py_ssize_t c = head[q], lo = top
    cdef int64_t s, e, qs = cs[q], qe = ce[q]
    cdef bint producer = kind[q] == KIND_PRODUCER
    while c >= 0:
        s = start[c]
        e = end[c]
        if s < qe and e > qs and not (producer and kind[c] == KIND_CONSUMER):
            if s < qs:
                s = qs
            if e > qe:
                e = qe
            cs[c] = s
            ce[c] = e
            ch[top].end = e
            ch[top].start = s
            ch[top].pos = c
            top += 1
        c = nxt[c]
    if top - lo > 1:
        _sort_children(&ch[lo], top - lo)
    return top


cdef Py_ssize_t _trace_path(const int64_t* parent, int64_t poff, const int64_t* start,
                            const int64_t* end, const int8_t* kind, Py_ssize_t L,
                            int64_t* scratch, Py_ssize_t stride, child_t* ch,
                            int64_t* out_pos, int64_t* out_s, int64_t* out_e,
                            int64_t* out_root, int64_t pos_base) noexcept nogil:
    # One trace of L spans: ``parent``, ``start``, ``end`` and ``kind`` point at
    # its first span and a parent value minus ``poff`` is a local index 0..L-1.
    # Writes sections from out_*[0] on, positions as pos_base + local index,
    # and returns how many. Children are clamped lazily, as the walk enters
    # their parent: a dropped child's subtree is never looked at.
    cdef int64_t* cs = scratch
    cdef int64_t* ce = scratch + stride
    cdef int64_t* head = scratch + 2 * stride
    cdef int64_t* nxt = scratch + 3 * stride
    cdef int64_t* ptr = scratch + 4 * stride
    cdef int64_t* fill = scratch + 5 * stride
    cdef int64_t* roots = scratch + 6 * stride
    cdef Py_ssize_t i, q, c, k, n_roots = 0, root, cur, top
    cdef Py_ssize_t n_out = 0
    cdef int64_t bound = 0, s0, s1, r
    cdef bint has_bound

    for i in range(L):
        head[i] = -1
    # Sibling lists (latest row first; the sort on entry orders them fully).
    for i in range(L):
        q = parent[i]
        if q >= 0:
            q -= poff
            nxt[i] = head[q]
            head[q] = i
        else:
            roots[n_roots] = i
            n_roots += 1

    # Roots in start order (then position): insertion sort, few roots per trace.
    for i in range(1, n_roots):
        r = roots[i]
        k = i - 1
        while k >= 0 and start[roots[k]] > start[r]:
            roots[k + 1] = roots[k]
            k -= 1
        roots[k + 1] = r

    for i in range(n_roots):
        root = roots[i]
        cs[root] = start[root]
        ce[root] = end[root]
        ptr[root] = 0
        top = _enter(root, start, end, kind, cs, ce, head, nxt, ch, 0)
        fill[root] = top
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
            s1 = bound if has_bound else ce[cur]
            s0 = ce[c] if c >= 0 else cs[cur]
            if s0 != s1:
                out_pos[n_out] = pos_base + cur
                out_s[n_out] = s0
                out_e[n_out] = s1
                out_root[n_out] = pos_base + root
                n_out += 1
            if c >= 0:
                cur = c
                has_bound = False
                ptr[cur] = top
                top = _enter(cur, start, end, kind, cs, ce, head, nxt, ch, top)
                fill[cur] = top
            elif cur == root:
                break
            else:
                bound = cs[cur]
                has_bound = True
                cur = parent[cur] - poff
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
