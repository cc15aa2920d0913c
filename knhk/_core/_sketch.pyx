"""Kernels of the DDSketch-style quantile sketch: bucket counting and rank lookup.

A positive value ``x`` falls in bucket ``ceil(log(x) / log(gamma))`` with
``gamma = (1 + alpha) / (1 - alpha)``; every value of bucket ``i`` lies in
``(gamma**(i-1), gamma**i]``, so the bucket's representative
``2 * gamma**i / (gamma + 1)`` is within relative error ``alpha`` of it
(Masson, Rim & Lee, "DDSketch", VLDB 2019). Python checks the values and
sizes ``counts`` so that every index falls inside it; the kernels trust that.
"""

import numpy as np

cimport numpy as cnp
from libc.math cimport ceil, log

from knhk._core._types cimport int64_t

cnp.import_array()


cdef inline int64_t _index(double x, double inv_log_gamma) noexcept nogil:
    return <int64_t>ceil(log(x) * inv_log_gamma)


def bucket_range(const double[::1] values, double inv_log_gamma, double min_value):
    """(lowest, highest) bucket index of the values above ``min_value``, and how many are not.

    Returns ``(lo, hi, n_zero)``; ``lo > hi`` when every value is at most ``min_value``.
    """
    cdef Py_ssize_t i, n = values.shape[0]
    cdef int64_t lo = 1 << 62, hi = -(1 << 62), k, n_zero = 0
    cdef double x
    with nogil:
        for i in range(n):
            x = values[i]
            if x <= min_value:
                n_zero += 1
                continue
            k = _index(x, inv_log_gamma)
            if k < lo:
                lo = k
            if k > hi:
                hi = k
    return lo, hi, n_zero


def bucket_add(const double[::1] values, double inv_log_gamma, double min_value,
               int64_t offset, int64_t[::1] counts):
    """Count each value above ``min_value`` in ``counts[index - offset]``, clamped to the array.

    Indices below ``offset`` land in ``counts[0]`` (the collapsed lowest buckets).
    Returns how many values were at most ``min_value`` (the zero bucket).
    """
    cdef Py_ssize_t i, n = values.shape[0], m = counts.shape[0]
    cdef int64_t k, n_zero = 0
    cdef double x
    with nogil:
        for i in range(n):
            x = values[i]
            if x <= min_value:
                n_zero += 1
                continue
            k = _index(x, inv_log_gamma) - offset
            if k < 0:
                k = 0
            elif k >= m:
                k = m - 1
            counts[k] += 1
    return n_zero


def rank_bucket(const int64_t[::1] counts, int64_t zero_count, const double[::1] ranks):
    """For each rank (ascending not required), the bucket position holding it; -1: zero bucket."""
    cdef Py_ssize_t i, j, m = counts.shape[0], n = ranks.shape[0]
    cdef cnp.ndarray[cnp.int64_t, ndim=1] out_arr = np.empty(n, np.int64)
    cdef int64_t[::1] out = out_arr
    cdef double acc, r
    with nogil:
        for i in range(n):
            r = ranks[i]
            if r < zero_count:
                out[i] = -1
                continue
            acc = zero_count
            j = 0
            while j < m - 1:
                acc += counts[j]
                if acc > r:
                    break
                j += 1
            out[i] = j
    return out_arr
