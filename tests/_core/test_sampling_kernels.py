"""The sampling kernels against plain NumPy / Python references.

Each kernel of ``knhk._core._sampling`` has its reference here: the ratio and
priority masks in NumPy, the budget allocators as the Collector's loops, and
the tail-sampling trace table (hash table with backward-shift deletion, slots,
free stack, FIFO decision cache) as a dict-based model driven through random
ingest / retire sequences on tiny tables, so that probe runs collide and
deletions shift entries.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knhk._build import load_core

k = load_core("_sampling")

MASK56 = (1 << 56) - 1
TWO64 = 1 << 64


# -- references ---------------------------------------------------------------------


def low64(ids: np.ndarray) -> np.ndarray:
    return ids[:, 8:].copy().view(">u8").ravel().astype(np.uint64)


def ref_keys(ids: np.ndarray, rule: int) -> np.ndarray:
    low = low64(ids)
    return (~low) & np.uint64(MASK56) if rule == 1 else low


def ref_ratio_mask(ids, bound, keep_all, rule):
    if keep_all:
        return np.ones(len(ids), dtype=bool)
    return ref_keys(ids, rule) < np.uint64(bound)


def ref_priority(ids, status, start, end, slow_ns, bounds, keep_all, rule):
    cls = np.where(status == 2, 2, np.where(end - start >= slow_ns, 1, 0))
    key = ref_keys(ids, rule)
    mask = (key < bounds[cls]) | keep_all[cls].astype(bool)
    counts = np.array([np.sum(cls == c) for c in range(3)]
                      + [np.sum(mask & (cls == c)) for c in range(3)])
    return mask, counts, cls


def ref_greedy(counts, eligible, budget):
    out, left = [], float(budget)
    for c, e in zip(counts.tolist(), eligible.tolist(), strict=True):
        ok = bool(e) and c <= left
        out.append(ok)
        left -= c if ok else 0
    return np.array(out, dtype=bool), budget - left


def ref_composite(sub, counts, eligible, allocated, used, max_total):
    used = used.copy()
    k_subs = sub.shape[1]
    out, chosen = [], []
    for i in range(sub.shape[0]):
        ok, ch = False, -1
        if eligible[i]:
            for j in range(k_subs):
                if sub[i, j]:
                    ch = j
                    if used[j] + counts[i] <= allocated[j] and \
                            used[k_subs] + counts[i] <= max_total:
                        used[j] += counts[i]
                        used[k_subs] += counts[i]
                        ok = True
                    break
        out.append(ok)
        chosen.append(ch)
    return np.array(out, dtype=bool), np.array(chosen, dtype=np.int16), used


ids_strategy = st.integers(0, 300).flatmap(
    lambda n: st.binary(min_size=16 * n, max_size=16 * n).map(
        lambda b: np.frombuffer(b, dtype=np.uint8).reshape(-1, 16).copy()))


# -- masks ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(ids=ids_strategy, bound=st.integers(0, TWO64 - 1), keep_all=st.booleans(),
       rule=st.sampled_from([0, 1]))
def test_ratio_mask_matches_numpy(ids, bound, keep_all, rule):
    if rule == 1:
        bound = min(bound, 1 << 56)
    mask, kept = k.ratio_mask(ids, bound, keep_all, rule)
    ref = ref_ratio_mask(ids, bound, keep_all, rule)
    np.testing.assert_array_equal(mask, ref)
    assert kept == int(ref.sum())
    assert mask.dtype == np.bool_


def test_ratio_mask_edges_of_the_key():
    ids = np.zeros((3, 16), dtype=np.uint8)
    ids[1, 8:] = 0xFF                     # low64 = 2**64 - 1
    ids[2, 15] = 1                        # low64 = 1
    mask, _ = k.ratio_mask(ids, 1, False, 0)
    assert mask.tolist() == [True, False, False]
    mask, _ = k.ratio_mask(ids, TWO64 - 1, False, 0)
    assert mask.tolist() == [True, False, True]
    # Consistent rule: key = 2**56 - 1 - R; R = 0 keeps only at bound 2**56.
    mask, _ = k.ratio_mask(ids, 1 << 56, False, 1)
    assert mask.tolist() == [True, True, True]
    mask, _ = k.ratio_mask(ids, 1, False, 1)     # th = 2**56 - 1: only R = max
    assert mask.tolist() == [False, True, False]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), rule=st.sampled_from([0, 1]))
def test_priority_mask_matches_numpy(data, rule):
    ids = data.draw(ids_strategy)
    n = len(ids)
    status = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
                      dtype=np.int8)
    start = np.array(data.draw(st.lists(st.integers(0, 10**12), min_size=n, max_size=n)),
                     dtype=np.int64)
    dur = np.array(data.draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n)),
                   dtype=np.int64)
    slow_ns = data.draw(st.integers(0, 6000))
    top = (1 << 56) if rule == 1 else TWO64 - 1
    bounds = np.array(data.draw(st.lists(st.integers(0, top), min_size=3, max_size=3)),
                      dtype=np.uint64)
    keep_all = np.array(data.draw(st.lists(st.booleans(), min_size=3, max_size=3)),
                        dtype=np.uint8)
    classes = np.empty(n, dtype=np.uint8)
    mask, counts = k.priority_mask(ids, status, start, start + dur, slow_ns, bounds,
                                   keep_all, rule, classes)
    ref_mask, ref_counts, ref_cls = ref_priority(ids, status, start, start + dur, slow_ns,
                                                 bounds, keep_all, rule)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(classes, ref_cls)
    # Without a classes buffer the decisions are the same.
    mask2, counts2 = k.priority_mask(ids, status, start, start + dur, slow_ns, bounds,
                                     keep_all, rule, np.empty(0, dtype=np.uint8))
    np.testing.assert_array_equal(mask2, ref_mask)
    np.testing.assert_array_equal(counts2, ref_counts)


# -- budget allocators ----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 50), max_size=60), data=st.data(),
       budget=st.floats(0, 500))
def test_greedy_admit_matches_loop(counts, data, budget):
    counts = np.array(counts, dtype=np.int64)
    eligible = np.array(data.draw(st.lists(st.booleans(), min_size=len(counts),
                                           max_size=len(counts))), dtype=np.uint8)
    mask, used = k.greedy_admit(counts, eligible, budget)
    ref_mask, ref_used = ref_greedy(counts, eligible, budget)
    np.testing.assert_array_equal(mask, ref_mask)
    assert used == pytest.approx(ref_used)
    assert used <= budget + 1e-9


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), k_subs=st.integers(1, 4))
def test_composite_admit_matches_loop(data, n, k_subs):
    sub = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=k_subs,
                                               max_size=k_subs), min_size=n, max_size=n)),
                   dtype=np.uint8).reshape(n, k_subs)
    counts = np.array(data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)),
                      dtype=np.int64)
    eligible = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                        dtype=np.uint8)
    allocated = np.array(data.draw(st.lists(st.integers(0, 200), min_size=k_subs,
                                            max_size=k_subs)), dtype=np.int64)
    used = np.array(data.draw(st.lists(st.integers(0, 50), min_size=k_subs + 1,
                                       max_size=k_subs + 1)), dtype=np.int64)
    max_total = data.draw(st.integers(0, 300))
    ref_mask, ref_chosen, ref_used = ref_composite(sub, counts, eligible, allocated, used,
                                                   max_total)
    mask, chosen = k.composite_admit(sub, counts, eligible, allocated, used, max_total)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(chosen, ref_chosen)
    np.testing.assert_array_equal(used, ref_used)


# -- the trace table ----------------------------------------------------------------


def pow2(n):
    return 1 << max(2, (n - 1).bit_length())


class KernelTable:
    """The arrays knhk.tail_sampling keeps, driven through the kernels directly."""

    def __init__(self, num_traces, s_cache, n_cache):
        cap = pow2(2 * num_traces)
        self.ht_keys = np.zeros(2 * cap, np.uint64)
        self.ht_vals = np.full(cap, -1, np.int32)
        self.slots = np.zeros(num_traces, dtype=k.TRACE_SLOT_DTYPE)
        self.free = np.arange(num_traces - 1, -1, -1, dtype=np.int32)
        self.counters = np.array([num_traces, 0, 0, 0], np.int64)
        pos = s_cache + n_cache
        dcap = pow2(2 * pos) if pos else 0
        self.dc_keys = np.zeros(2 * dcap, np.uint64)
        self.dc_vals = np.full(dcap, -1, np.int32)
        self.dc_pos_keys = np.zeros(2 * pos, np.uint64)
        self.dc_info = np.full(pos, -1, np.int32)
        self.ring_base = np.array([0, s_cache], np.int64)
        self.ring_size = np.array([s_cache, n_cache], np.int64)
        self.ring_head = np.zeros(2, np.int64)
        self.tid_info = np.full(1024, -1, np.int32)

    def ingest(self, ids, is_root, start, end, status, pred, now, row0, tags):
        return k.tail_ingest(ids, is_root, start, end, status, pred, now, row0, self.ht_keys,
                             self.ht_vals, self.slots, self.free, self.counters, self.dc_keys,
                             self.dc_vals, self.dc_info, self.tid_info, tags)

    def retire(self, slots, infos, keep):
        k.tail_retire(np.array(slots, np.int32), np.array(infos, np.int32),
                      np.array(keep, np.uint8), self.ht_keys, self.ht_vals, self.slots,
                      self.free, self.counters, self.dc_keys, self.dc_vals, self.dc_pos_keys,
                      self.dc_info, self.ring_base, self.ring_size, self.ring_head,
                      self.tid_info)


class ModelTable:
    """The same behaviour in plain Python dicts and lists."""

    def __init__(self, num_traces, s_cache, n_cache):
        self.pending: dict[bytes, int] = {}
        self.slots: dict[int, dict] = {}
        self.free = list(range(num_traces - 1, -1, -1))
        self.next_tid = 0
        self.new_traces = 0
        self.hits = 0
        self.cache: dict[bytes, int] = {}
        self.pos_key: list[bytes | None] = [None] * (s_cache + n_cache)
        self.pos_info = [-1] * (s_cache + n_cache)
        self.base, self.size, self.head = [0, s_cache], [s_cache, n_cache], [0, 0]
        self.tid_info: dict[int, int] = {}
        self.use_cache = s_cache + n_cache > 0

    def ingest(self, ids, is_root, start, end, status, pred, now, row0, tags):
        n = len(ids)
        i = row0
        while i < n:
            key = ids[i].tobytes()
            if key in self.pending:
                s = self.slots[self.pending[key]]
                s["span_count"] += 1
                s["min_start"] = min(s["min_start"], int(start[i]))
                s["max_end"] = max(s["max_end"], int(end[i]))
                s["status_bits"] |= 1 << int(status[i])
                s["root_seen"] |= int(is_root[i])
                s["pred"] |= int(pred[i]) if len(pred) else 0
                s["last_seen"] = now
                tags[i] = s["tid"]
                i += 1
                continue
            if self.use_cache and key in self.cache:
                tags[i] = -1 - self.pos_info[self.cache[key]]
                self.hits += 1
                i += 1
                continue
            if not self.free:
                break
            slot = self.free.pop()
            self.pending[key] = slot
            self.slots[slot] = {
                "hi": int.from_bytes(key[:8], "big"), "lo": int.from_bytes(key[8:], "big"),
                "tid": self.next_tid, "first_seen": now, "last_seen": now, "span_count": 1,
                "min_start": int(start[i]), "max_end": int(end[i]),
                "pred": int(pred[i]) if len(pred) else 0,
                "status_bits": 1 << int(status[i]), "root_seen": int(is_root[i]), "state": 1,
                "key": key}
            self.tid_info[self.next_tid] = -1
            tags[i] = self.next_tid
            self.next_tid += 1
            self.new_traces += 1
            i += 1
        return i

    def retire(self, slots, infos, keep):
        for slot, info, kp in zip(slots, infos, keep, strict=True):
            s = self.slots.get(slot)
            if s is None or s["state"] == 0:
                continue
            key = s["key"]
            del self.pending[key]
            self.tid_info[s["tid"]] = info
            r = 0 if kp else 1
            if self.use_cache and self.size[r] > 0:
                if key in self.cache:
                    self.pos_info[self.cache[key]] = info
                else:
                    p = self.base[r] + self.head[r]
                    self.head[r] = (self.head[r] + 1) % self.size[r]
                    if self.pos_info[p] >= 0:
                        self.cache.pop(self.pos_key[p], None)
                    self.pos_key[p] = key
                    self.pos_info[p] = info
                    self.cache[key] = p
            s["state"] = 0
            self.free.append(slot)


def assert_tables_agree(kt: KernelTable, mt: ModelTable, pool: np.ndarray):
    assert int(kt.counters[0]) == len(mt.free)
    np.testing.assert_array_equal(kt.free[:len(mt.free)], mt.free)
    assert int(kt.counters[1]) == mt.next_tid
    assert int(kt.counters[2]) == mt.new_traces
    assert int(kt.counters[3]) == mt.hits
    pending = k.table_lookup(kt.ht_keys, kt.ht_vals, pool)
    assert pending.tolist() == [mt.pending.get(r.tobytes(), -1) for r in pool]
    assert int((kt.ht_vals >= 0).sum()) == len(mt.pending)
    if mt.use_cache:
        cached = k.table_lookup(kt.dc_keys, kt.dc_vals, pool)
        assert cached.tolist() == [mt.cache.get(r.tobytes(), -1) for r in pool]
        assert kt.dc_info.tolist() == mt.pos_info
        assert kt.ring_head.tolist() == mt.head
    for slot, s in mt.slots.items():
        row = kt.slots[slot]
        assert int(row["state"]) == s["state"]
        if s["state"]:
            for f in ("hi", "lo", "tid", "first_seen", "last_seen", "span_count",
                      "min_start", "max_end", "pred", "status_bits", "root_seen"):
                assert int(row[f]) == s[f] if f not in ("first_seen", "last_seen") \
                    else float(row[f]) == s[f], f
    for tid, info in mt.tid_info.items():
        assert int(kt.tid_info[tid & 1023]) == info


@settings(max_examples=120, deadline=None)
@given(data=st.data(), num_traces=st.integers(1, 6), s_cache=st.integers(0, 4),
       n_cache=st.integers(0, 4), pool_size=st.integers(1, 14))
def test_trace_table_matches_model(data, num_traces, s_cache, n_cache, pool_size):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pool = rng.integers(0, 256, size=(pool_size, 16), dtype=np.uint8)
    if data.draw(st.booleans()):      # sequential ids, as tests and replays use
        pool[:] = 0
        pool[:, 15] = np.arange(1, pool_size + 1)
    kt, mt = KernelTable(num_traces, s_cache, n_cache), ModelTable(num_traces, s_cache,
                                                                   n_cache)
    now = 0.0
    for _ in range(data.draw(st.integers(1, 12))):
        now += 1.0
        if data.draw(st.booleans()) or not mt.pending:
            n = data.draw(st.integers(0, 10))
            ids = pool[rng.integers(0, pool_size, n)] if n else np.zeros((0, 16), np.uint8)
            is_root = rng.integers(0, 2, n).astype(np.uint8)
            start = rng.integers(0, 1000, n).astype(np.int64)
            end = start + rng.integers(0, 1000, n)
            status = rng.integers(0, 3, n).astype(np.int8)
            pred = rng.integers(0, 2**63, n, dtype=np.uint64) if data.draw(st.booleans()) \
                else np.empty(0, np.uint64)
            row = 0
            t1, t2 = np.empty(n, np.int64), np.empty(n, np.int64)
            while True:
                r1 = kt.ingest(ids, is_root, start, end, status, pred, now, row, t1)
                r2 = mt.ingest(ids, is_root, start, end, status, pred, now, row, t2)
                assert r1 == r2
                np.testing.assert_array_equal(t1[row:r1], t2[row:r2])
                if r1 >= n:
                    break
                # Table full: retire the oldest pending trace and go on, as the sampler does.
                oldest = min(mt.pending.values(), key=lambda s: mt.slots[s]["tid"])
                info, kp = data.draw(st.integers(0, 50)), data.draw(st.booleans())
                kt.retire([oldest], [info], [kp])
                mt.retire([oldest], [info], [kp])
                row = r1
        else:
            chosen = data.draw(st.lists(st.sampled_from(sorted(mt.slots)), max_size=4))
            infos = data.draw(st.lists(st.integers(0, 50), min_size=len(chosen),
                                       max_size=len(chosen)))
            keep = data.draw(st.lists(st.booleans(), min_size=len(chosen),
                                      max_size=len(chosen)))
            kt.retire(chosen, infos, keep)
            mt.retire(chosen, infos, keep)
        assert_tables_agree(kt, mt, pool)


def test_trace_table_fills_and_stops_at_the_row_needing_a_slot():
    kt = KernelTable(2, 0, 0)
    ids = np.zeros((4, 16), np.uint8)
    ids[:, 15] = [1, 2, 1, 3]
    tags = np.empty(4, np.int64)
    z = np.zeros(4, np.int64)
    row = kt.ingest(ids, np.zeros(4, np.uint8), z, z, np.zeros(4, np.int8),
                    np.empty(0, np.uint64), 1.0, 0, tags)
    assert row == 3
    assert tags[:3].tolist() == [0, 1, 0]
    assert kt.slots["span_count"].tolist() == [2, 1]
