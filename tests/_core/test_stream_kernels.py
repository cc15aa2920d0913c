"""knhk._core._sketch against plain NumPy references."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from knhk._build import load_core

_k = load_core("_sketch")

ALPHA = 0.01
INV = 1.0 / math.log((1 + ALPHA) / (1 - ALPHA))
MIN = 1e-9

values_st = arrays(np.float64, st.integers(0, 300),
                   elements=st.one_of(st.floats(0, 1e12), st.sampled_from([0.0, 1.0, 1e-9, 3.5])))


def ref_index(v):
    return np.ceil(np.log(v) * INV).astype(np.int64)


@settings(max_examples=100, deadline=None)
@given(values_st)
def test_bucket_range_and_add_match_numpy(v):
    lo, hi, n_zero = _k.bucket_range(v, INV, MIN)
    pos = v[v > MIN]
    assert n_zero == v.size - pos.size
    if pos.size == 0:
        assert lo > hi
        return
    idx = ref_index(pos)
    assert (lo, hi) == (idx.min(), idx.max())
    counts = np.zeros(hi - lo + 1, np.int64)
    assert _k.bucket_add(v, INV, MIN, lo, counts) == n_zero
    np.testing.assert_array_equal(counts, np.bincount(idx - lo, minlength=counts.size))


def test_bucket_add_clamps_out_of_range_indices_to_the_ends():
    v = np.array([1.0, 10.0, 100.0])
    idx = ref_index(v)
    counts = np.zeros(2, np.int64)
    _k.bucket_add(v, INV, MIN, int(idx[1]), counts)
    assert idx[2] > idx[1] + 1
    # 1.0 is below the offset (collapsed into the first bucket); 100.0 beyond the last
    assert counts.tolist() == [2, 1]


@settings(max_examples=100, deadline=None)
@given(arrays(np.int64, st.integers(1, 20), elements=st.integers(0, 5)), st.integers(0, 4),
       st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_rank_bucket_matches_cumsum_search(counts, zero, qs):
    total = zero + int(counts.sum())
    ranks = np.floor(np.array(qs) * max(total - 1, 0))
    got = _k.rank_bucket(counts, zero, ranks)
    cum = zero + np.cumsum(counts)
    for r, g in zip(ranks, got, strict=True):
        if r < zero:
            assert g == -1
        else:
            want = int(np.searchsorted(cum, r, side="right"))
            assert g == min(want, counts.size - 1)
