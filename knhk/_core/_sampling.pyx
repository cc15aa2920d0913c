"""Sampling kernels: trace-id ratio and priority masks, and tail sampling's trace table.

Head sampling decides from the trace id alone: the low 64 bits of the id, read
big-endian, are compared with a bound (OpenTelemetry ``TraceIdRatioBased``:
keep when ``low64 < round(rate * 2**64)``), or, under the ``consistent`` rule of
the OpenTelemetry probability-sampling spec, the low 56 bits ``R`` are kept when
``R >= threshold``. Both are written as ``key < bound`` (the consistent key is
``2**56 - 1 - R``) so one loop serves both.

Tail sampling keeps one slot per pending trace (a packed struct, see
``TRACE_SLOT_DTYPE``), found through an open-addressing hash table on the
128-bit trace id (linear probing, backward-shift deletion), and a bounded
decision cache (two FIFO rings, sampled and not sampled) for spans that arrive
after their trace was decided. Python owns every array; these functions only
read and write them.
"""

import numpy as np

cimport numpy as cnp

from libc.stdint cimport int16_t

from knhk._core._ids cimport be64, id_hash
from knhk._core._types cimport int8_t, int32_t, int64_t, uint8_t, uint64_t

cnp.import_array()

cdef enum:
    RULE_TRACEIDRATIO = 0
    RULE_CONSISTENT = 1

cdef uint64_t _MASK56 = 0x00FFFFFFFFFFFFFFULL


cdef packed struct trace_slot_t:
    uint64_t hi
    uint64_t lo
    int64_t tid
    double first_seen
    double last_seen
    int64_t span_count
    int64_t min_start
    int64_t max_end
    uint64_t pred
    uint8_t status_bits
    uint8_t root_seen
    uint8_t state


#: NumPy dtype of one tail-sampling slot (matches the packed C struct).
TRACE_SLOT_DTYPE = np.dtype([
    ("hi", np.uint64), ("lo", np.uint64), ("tid", np.int64),
    ("first_seen", np.float64), ("last_seen", np.float64),
    ("span_count", np.int64), ("min_start", np.int64), ("max_end", np.int64),
    ("pred", np.uint64), ("status_bits", np.uint8), ("root_seen", np.uint8),
    ("state", np.uint8),
])

SLOT_FREE = 0
SLOT_PENDING = 1


cdef inline Py_ssize_t _find(const uint64_t* keys, const int32_t* vals, uint64_t mask,
                             uint64_t hi, uint64_t lo) noexcept nogil:
    cdef uint64_t j = id_hash(hi, lo) & mask
    while True:
        if vals[j] < 0:
            return -1
        if keys[2 * j] == hi and keys[2 * j + 1] == lo:
            return <Py_ssize_t>j
        j = (j + 1) & mask


cdef inline void _insert(uint64_t* keys, int32_t* vals, uint64_t mask,
                         uint64_t hi, uint64_t lo, int32_t value) noexcept nogil:
    # The caller keeps the load factor <= 1/2, so an empty bucket exists.
    cdef uint64_t j = id_hash(hi, lo) & mask
    while vals[j] >= 0:
        j = (j + 1) & mask
    keys[2 * j] = hi
    keys[2 * j + 1] = lo
    vals[j] = value


cdef inline void _delete(uint64_t* keys, int32_t* vals, uint64_t mask,
                         uint64_t i) noexcept nogil:
    # Backward-shift deletion for linear probing (Knuth, TAOCP vol. 3, 6.4,
    # Algorithm R): later entries of the probe run move into the hole unless
    # their home bucket lies cyclically in (i, j].
    cdef uint64_t j = i
    cdef uint64_t home
    while True:
        j = (j + 1) & mask
        if vals[j] < 0:
            break
        home = id_hash(keys[2 * j], keys[2 * j + 1]) & mask
        if i <= j:
            if i < home <= j:
                continue
        elif i < home or home <= j:
            continue
        keys[2 * i] = keys[2 * j]
        keys[2 * i + 1] = keys[2 * j + 1]
        vals[i] = vals[j]
        i = j
    vals[i] = -1


def ratio_mask(const uint8_t[:, ::1] trace_ids, uint64_t bound, bint keep_all, int rule):
    """Keep mask and kept count for 16-byte trace ids: ``key < bound`` (or all)."""
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t i, kept = 0
    cdef uint8_t k
    out = np.empty(n, dtype=np.bool_)
    cdef uint8_t[::1] o = out.view(np.uint8)
    with nogil:
        if keep_all:
            for i in range(n):
                o[i] = 1
            kept = n
        elif rule == RULE_CONSISTENT:
            for i in range(n):
                k = ((~be64(&trace_ids[i, 8])) & _MASK56) < bound
                o[i] = k
                kept += k
        else:
            for i in range(n):
                k = be64(&trace_ids[i, 8]) < bound
                o[i] = k
                kept += k
    return out, kept


def priority_mask(const uint8_t[:, ::1] trace_ids, const int8_t[::1] status,
                  const int64_t[::1] start, const int64_t[::1] end, int64_t slow_ns,
                  const uint64_t[::1] bounds, const uint8_t[::1] keep_all, int rule,
                  uint8_t[::1] classes):
    """Adaptive priority decisions: class 2 error, 1 slow (duration >= slow_ns), 0 the rest.

    Each class has its own bound (``bounds[c]``, or ``keep_all[c]``). Writes
    the class of every row to ``classes`` (length n, or length 0 to skip) and
    returns ``(mask, counts)`` with counts = [n_base, n_slow, n_error,
    kept_base, kept_slow, kept_error].
    """
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t i
    cdef int c
    cdef uint8_t k
    cdef uint64_t key
    cdef bint want_classes = classes.shape[0] > 0
    cdef uint64_t b0 = bounds[0], b1 = bounds[1], b2 = bounds[2]
    cdef uint8_t a0 = keep_all[0], a1 = keep_all[1], a2 = keep_all[2]
    cdef int64_t cnt[6]
    out = np.empty(n, dtype=np.bool_)
    counts = np.zeros(6, dtype=np.int64)
    cdef uint8_t[::1] o = out.view(np.uint8)
    cdef int64_t[::1] cv = counts
    for c in range(6):
        cnt[c] = 0
    with nogil:
        for i in range(n):
            key = be64(&trace_ids[i, 8])
            if rule == RULE_CONSISTENT:
                key = (~key) & _MASK56
            if status[i] == 2:
                c = 2
                k = (key < b2) | a2
            elif end[i] - start[i] >= slow_ns:
                c = 1
                k = (key < b1) | a1
            else:
                c = 0
                k = (key < b0) | a0
            o[i] = k
            cnt[c] += 1
            cnt[3 + c] += k
            if want_classes:
                classes[i] = <uint8_t>c
        for c in range(6):
            cv[c] = cnt[c]
    return out, counts


def tail_ingest(const uint8_t[:, ::1] trace_ids, const uint8_t[::1] is_root,
                const int64_t[::1] start, const int64_t[::1] end, const int8_t[::1] status,
                const uint64_t[::1] pred, double now, Py_ssize_t row0,
                uint64_t[::1] ht_keys, int32_t[::1] ht_vals, trace_slot_t[::1] slots,
                int32_t[::1] free_stack, int64_t[::1] counters,
                const uint64_t[::1] dc_keys, const int32_t[::1] dc_vals,
                const int32_t[::1] dc_info, int32_t[::1] tid_info, int64_t[::1] tags):
    """Add rows ``row0..n`` to their pending traces; return the row it stopped at.

    A row of a pending trace updates the trace's slot and is tagged with the
    trace's tid (>= 0); a row whose trace is in the decision cache is tagged
    ``-1 - info``; a row of a new trace takes a free slot and a new tid. When
    no slot is free the function returns that row's index (Python makes room
    and calls again). ``counters`` = [free_top, next_tid, new_traces,
    cache_hits]; ``pred`` may be empty (no attribute predicates).
    """
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t i, j
    cdef int32_t s
    cdef uint64_t hi, lo
    cdef uint64_t mask = <uint64_t>ht_vals.shape[0] - 1
    cdef uint64_t dc_mask = <uint64_t>dc_vals.shape[0] - 1
    cdef bint use_cache = dc_vals.shape[0] > 0
    cdef bint has_pred = pred.shape[0] > 0
    cdef int64_t dmask = tid_info.shape[0] - 1
    cdef int64_t free_top = counters[0], next_tid = counters[1]
    cdef int64_t new_traces = 0, hits = 0
    cdef trace_slot_t* slot
    cdef uint64_t* keys = &ht_keys[0]
    cdef int32_t* vals = &ht_vals[0]
    cdef const uint64_t* dkeys = NULL
    cdef const int32_t* dvals = NULL
    if use_cache:
        dkeys = &dc_keys[0]
        dvals = &dc_vals[0]
    with nogil:
        i = row0
        while i < n:
            hi = be64(&trace_ids[i, 0])
            lo = be64(&trace_ids[i, 8])
            j = _find(keys, vals, mask, hi, lo)
            if j >= 0:
                slot = &slots[vals[j]]
                slot.span_count += 1
                if start[i] < slot.min_start:
                    slot.min_start = start[i]
                if end[i] > slot.max_end:
                    slot.max_end = end[i]
                slot.status_bits |= <uint8_t>(1 << (status[i] & 7))
                slot.root_seen |= is_root[i]
                if has_pred:
                    slot.pred |= pred[i]
                slot.last_seen = now
                tags[i] = slot.tid
                i += 1
                continue
            if use_cache:
                j = _find(dkeys, dvals, dc_mask, hi, lo)
                if j >= 0:
                    tags[i] = -1 - <int64_t>dc_info[dvals[j]]
                    hits += 1
                    i += 1
                    continue
            if free_top == 0:
                break
            free_top -= 1
            s = free_stack[free_top]
            _insert(keys, vals, mask, hi, lo, s)
            slot = &slots[s]
            slot.hi = hi
            slot.lo = lo
            slot.tid = next_tid
            slot.first_seen = now
            slot.last_seen = now
            slot.span_count = 1
            slot.min_start = start[i]
            slot.max_end = end[i]
            slot.pred = pred[i] if has_pred else 0
            slot.status_bits = <uint8_t>(1 << (status[i] & 7))
            slot.root_seen = is_root[i]
            slot.state = 1
            tid_info[next_tid & dmask] = -1
            tags[i] = next_tid
            next_tid += 1
            new_traces += 1
            i += 1
        counters[0] = free_top
        counters[1] = next_tid
        counters[2] += new_traces
        counters[3] += hits
    return i


def tail_retire(const int32_t[::1] slot_ids, const int32_t[::1] infos,
                const uint8_t[::1] keep, uint64_t[::1] ht_keys, int32_t[::1] ht_vals,
                trace_slot_t[::1] slots, int32_t[::1] free_stack, int64_t[::1] counters,
                uint64_t[::1] dc_keys, int32_t[::1] dc_vals, uint64_t[::1] dc_pos_keys,
                int32_t[::1] dc_info, const int64_t[::1] ring_base,
                const int64_t[::1] ring_size, int64_t[::1] ring_head,
                int32_t[::1] tid_info):
    """Record decisions for pending slots and free them.

    Each slot leaves the pending table, its tid gets ``infos[k]`` in
    ``tid_info``, and its trace id enters the decision cache ring for its
    outcome (ring 0 sampled, ring 1 not sampled; a ring of size 0 is off),
    evicting that ring's oldest entry when full. ``counters[0]`` is the free
    stack's top.
    """
    cdef Py_ssize_t m = slot_ids.shape[0]
    cdef Py_ssize_t k, j
    cdef int32_t s
    cdef int r
    cdef int64_t p
    cdef uint64_t hi, lo
    cdef uint64_t mask = <uint64_t>ht_vals.shape[0] - 1
    cdef uint64_t dc_mask = <uint64_t>dc_vals.shape[0] - 1
    cdef bint use_cache = dc_vals.shape[0] > 0
    cdef int64_t dmask = tid_info.shape[0] - 1
    cdef int64_t free_top = counters[0]
    cdef trace_slot_t* slot
    cdef uint64_t* keys = &ht_keys[0]
    cdef int32_t* vals = &ht_vals[0]
    cdef uint64_t* dkeys = NULL
    cdef int32_t* dvals = NULL
    if use_cache:
        dkeys = &dc_keys[0]
        dvals = &dc_vals[0]
    with nogil:
        for k in range(m):
            s = slot_ids[k]
            slot = &slots[s]
            if slot.state == 0:
                continue
            hi = slot.hi
            lo = slot.lo
            j = _find(keys, vals, mask, hi, lo)
            if j >= 0:
                _delete(keys, vals, mask, <uint64_t>j)
            tid_info[slot.tid & dmask] = infos[k]
            r = 0 if keep[k] else 1
            if use_cache and ring_size[r] > 0:
                j = _find(dkeys, dvals, dc_mask, hi, lo)
                if j >= 0:
                    dc_info[dvals[j]] = infos[k]
                else:
                    p = ring_base[r] + ring_head[r]
                    ring_head[r] = (ring_head[r] + 1) % ring_size[r]
                    if dc_info[p] >= 0:
                        j = _find(dkeys, dvals, dc_mask, dc_pos_keys[2 * p],
                                  dc_pos_keys[2 * p + 1])
                        if j >= 0:
                            _delete(dkeys, dvals, dc_mask, <uint64_t>j)
                    dc_pos_keys[2 * p] = hi
                    dc_pos_keys[2 * p + 1] = lo
                    dc_info[p] = infos[k]
                    _insert(dkeys, dvals, dc_mask, hi, lo, <int32_t>p)
            slot.state = 0
            free_stack[free_top] = s
            free_top += 1
        counters[0] = free_top
    return None


def table_lookup(const uint64_t[::1] keys, const int32_t[::1] vals,
                 const uint8_t[:, ::1] trace_ids):
    """Value stored for each trace id in a table (-1 where absent)."""
    cdef Py_ssize_t n = trace_ids.shape[0]
    cdef Py_ssize_t i, j
    cdef uint64_t mask = <uint64_t>vals.shape[0] - 1
    out = np.full(n, -1, dtype=np.int32)
    cdef int32_t[::1] o = out
    with nogil:
        for i in range(n):
            j = _find(&keys[0], &vals[0], mask, be64(&trace_ids[i, 0]),
                      be64(&trace_ids[i, 8]))
            if j >= 0:
                o[i] = vals[j]
    return out


def greedy_admit(const int64_t[::1] counts, const uint8_t[::1] eligible, double budget):
    """In order, admit each eligible trace whose span count fits what budget is left.

    A trace that does not fit does not block smaller ones after it (as the
    OpenTelemetry Collector's rate limiting). Returns ``(mask, used)``.
    """
    cdef Py_ssize_t n = counts.shape[0]
    cdef Py_ssize_t i
    cdef double left = budget
    out = np.zeros(n, dtype=np.bool_)
    cdef uint8_t[::1] o = out.view(np.uint8)
    with nogil:
        for i in range(n):
            if eligible[i] and counts[i] <= left:
                o[i] = 1
                left -= counts[i]
    return out, budget - left


def composite_admit(const uint8_t[:, ::1] sub_sampled, const int64_t[::1] counts,
                    const uint8_t[::1] eligible, const int64_t[::1] allocated,
                    int64_t[::1] used, int64_t max_total):
    """The Collector's composite policy over traces in order.

    For each eligible trace the first sub-policy that samples it decides: the
    trace is sampled if the spans this second, with the trace's, stay within
    that sub-policy's allocation and, over all sub-policies, ``max_total``;
    else it is not sampled. ``used`` holds the spans this second per
    sub-policy and, last, their total; it is updated. Returns ``(mask,
    chosen)`` with the index of the sub-policy that matched, or -1.
    """
    cdef Py_ssize_t n = sub_sampled.shape[0]
    cdef Py_ssize_t k = sub_sampled.shape[1]
    cdef Py_ssize_t i, j
    cdef int64_t after, total
    out = np.zeros(n, dtype=np.bool_)
    chosen = np.full(n, -1, dtype=np.int16)
    cdef uint8_t[::1] o = out.view(np.uint8)
    cdef int16_t[::1] ch = chosen
    with nogil:
        for i in range(n):
            if not eligible[i]:
                continue
            for j in range(k):
                if sub_sampled[i, j]:
                    ch[i] = <int16_t>j
                    after = used[j] + counts[i]
                    total = used[k] + counts[i]
                    if after <= allocated[j] and total <= max_total:
                        used[j] = after
                        used[k] = total
                        o[i] = 1
                    break
    return out, chosen
