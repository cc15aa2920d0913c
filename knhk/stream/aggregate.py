"""Exact grouped aggregation: one sort, then every statistic of every group at once.

:func:`grouped_stats` takes a group id per row and a value per row and returns
count, sum, min, max and any list of quantiles for every non-empty group. The
values are sorted once by (group, value) — as a single packed int64 key when
group id and value fit in 63 bits together, else by ``np.lexsort`` — and the
quantiles are read from the sorted run of each group with the arithmetic of
NumPy's default ``method="linear"`` (Hyndman & Fan type 7), so they are the
very same float64 numbers ``np.quantile`` returns.

Example
-------
>>> import numpy as np
>>> from knhk.stream.aggregate import grouped_stats
>>> s = grouped_stats(np.array([1, 0, 1, 1]), np.array([4, 7, 1, 2]), 2, (0.5,))
>>> s.groups.tolist(), s.count.tolist(), s.quantiles[0].tolist()
([0, 1], [1, 3], [7.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GroupedStats", "grouped_stats", "linear_quantiles"]


@dataclass
class GroupedStats:
    """Statistics of the non-empty groups, in increasing group id.

    ``values`` holds every value sorted by (group, value) and scaled;
    ``starts`` / ``count`` delimit each group's run in it.
    """

    groups: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    min: np.ndarray
    max: np.ndarray
    quantiles: list[np.ndarray]
    values: np.ndarray
    starts: np.ndarray


def linear_quantiles(sorted_values: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                     q: float) -> np.ndarray:
    """Quantile ``q`` of each run ``sorted_values[starts[i]:starts[i] + counts[i]]``.

    The arithmetic is NumPy's ``method="linear"`` step for step (virtual index
    ``(n - 1) * q``, then its two-sided lerp), so results equal
    ``np.quantile`` bit for bit. Every run must be non-empty.
    """
    vi = (counts - 1) * q
    prev = np.floor(vi)
    gamma = vi - prev
    prev = prev.astype(np.intp)
    last = counts - 1
    above = vi >= last
    lo = np.where(above, last, prev)
    hi = np.where(above, last, prev + 1)
    a = sorted_values[starts + lo]
    b = sorted_values[starts + hi]
    diff = b - a
    out = a + diff * gamma
    upper = gamma >= 0.5
    out[upper] = (b - diff * (1 - gamma))[upper]
    return out


def grouped_stats(groups: np.ndarray, values: np.ndarray, n_groups: int,
                  quantiles: Sequence[float], *, scale: float = 1.0) -> GroupedStats:
    """Count, sum, min, max and quantiles of ``values / scale`` per group.

    Parameters
    ----------
    groups : int array
        Group id of each row, in ``[0, n_groups)``.
    values : int64 or float64 array
        The value of each row; non-negative int64 values take the packed-sort
        fast path, and integer sums are exact.
    n_groups : int
    quantiles : sequence of float in [0, 1]
    scale : float
        Values are divided by it after sorting (1e6 turns ns into ms).

    Returns
    -------
    GroupedStats
    """
    groups = np.asarray(groups, dtype=np.int64)
    values = np.asarray(values)
    if groups.size == 0:
        e = np.empty(0)
        return GroupedStats(np.empty(0, np.int64), np.empty(0, np.int64), e, e, e,
                            [e for _ in quantiles], e, np.empty(0, np.int64))
    sorted_v = _sort_by_group_value(groups, values, n_groups)
    counts = np.bincount(groups, minlength=n_groups)
    present = np.flatnonzero(counts)
    c = counts[present]
    ends = np.cumsum(c)
    starts = ends - c
    sums = np.add.reduceat(sorted_v, starts)
    if scale != 1.0:
        vs = sorted_v / scale
        sums = sums / scale
    else:
        vs = sorted_v.astype(np.float64, copy=False)
        sums = sums.astype(np.float64, copy=False)
    qs = [linear_quantiles(vs, starts, c, float(q)) for q in quantiles]
    return GroupedStats(present, c, sums, vs[starts], vs[ends - 1], qs, vs, starts)


def _sort_by_group_value(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """``values`` ordered by (group, value)."""
    if values.dtype.kind in "iu" and values.size:
        vmin = int(values.min())
        vmax = int(values.max())
        vbits = max(vmax, 1).bit_length()
        gbits = max(n_groups - 1, 1).bit_length()
        if vmin >= 0 and vbits + gbits <= 63:
            # one radix-friendly int64 sort instead of an argsort and two gathers
            key = (groups << vbits) | values.astype(np.int64, copy=False)
            key.sort()
            return key & ((1 << vbits) - 1)
    order = np.lexsort((values, groups))
    return values[order]
