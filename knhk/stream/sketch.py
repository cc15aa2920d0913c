"""A mergeable relative-error quantile sketch (DDSketch-style), for long windows and many keys.

:class:`DDSketch` keeps one counter per logarithmic bucket: every quantile it
reports is within relative error ``alpha`` (1 % by default) of the true value
at that rank, in memory bounded by ``max_buckets`` whatever the number of
values. Two sketches with the same ``alpha`` merge exactly:
``merge(sketch(A), sketch(B))`` has the same buckets as ``sketch(A + B)``, so
partial results of batches, sliding panes or machines combine. The counting
loop is the Cython kernel ``knhk._core._sketch``.

Example
-------
>>> import numpy as np
>>> from knhk.stream.sketch import DDSketch
>>> a, b = DDSketch(0.01), DDSketch(0.01)
>>> a.add(np.arange(1, 501, dtype=float)); b.add(np.arange(501, 1001, dtype=float))
>>> m = a.merged(b)
>>> m.count, abs(m.quantile(0.5) - 500) <= 0.01 * 500
(1000, True)
"""

from __future__ import annotations

import math

import numpy as np

from knhk._build import load_core

__all__ = ["DDSketch"]

_k = load_core("_sketch")


class DDSketch:
    """Relative-error quantile sketch over non-negative values.

    Parameters
    ----------
    alpha : float
        Relative accuracy, in (0, 1).
    max_buckets : int
        Most buckets kept; beyond, the lowest buckets are collapsed into one
        (the guarantee then holds for the quantiles above them).
    min_value : float
        Values at or below it are counted in a zero bucket and reported as 0.

    Attributes
    ----------
    count, sum, min, max : exact count, sum, minimum and maximum of the values.
    """

    __slots__ = ("_counts", "_gamma", "_inv_log_gamma", "_offset", "alpha", "count",
                 "max", "max_buckets", "min", "min_value", "sum", "zero_count")

    def __init__(self, alpha: float = 0.01, *, max_buckets: int = 2048,
                 min_value: float = 1e-9) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
        if not isinstance(max_buckets, int) or max_buckets < 2:
            raise ValueError(f"max_buckets must be an int >= 2, got {max_buckets!r}")
        if not (isinstance(min_value, (int, float)) and min_value > 0
                and math.isfinite(min_value)):
            raise ValueError(f"min_value must be a positive finite number, got {min_value!r}")
        self.alpha = float(alpha)
        self.max_buckets = max_buckets
        self.min_value = float(min_value)
        self._gamma = (1 + self.alpha) / (1 - self.alpha)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._counts = np.zeros(0, np.int64)
        self._offset = 0
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- building -----------------------------------------------------------------

    def add(self, values: np.ndarray | float) -> None:
        """Add values (non-negative, finite)."""
        v = np.ascontiguousarray(np.atleast_1d(np.asarray(values, dtype=np.float64)))
        if v.ndim != 1:
            raise ValueError(f"values must be one-dimensional, got shape {v.shape}")
        if v.size == 0:
            return
        vmin, vmax = float(v.min()), float(v.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin < 0:
            bad = np.flatnonzero(~np.isfinite(v) | (v < 0))[0]
            raise ValueError(f"DDSketch takes finite non-negative values; value {float(v[bad])!r} "
                             f"at index {bad}")
        lo, hi, _ = _k.bucket_range(v, self._inv_log_gamma, self.min_value)
        if lo <= hi:
            self._reserve(lo, hi)
        self.zero_count += int(_k.bucket_add(v, self._inv_log_gamma, self.min_value,
                                             self._offset, self._counts))
        self.count += v.size
        self.sum += float(v.sum())
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)

    def _reserve(self, lo: int, hi: int) -> None:
        """Make the bucket array cover [lo, hi], collapsing the lowest beyond max_buckets."""
        cur_lo = self._offset
        cur_hi = self._offset + self._counts.size - 1
        if self._counts.size and lo >= cur_lo and hi <= cur_hi:
            return
        if self._counts.size:
            lo, hi = min(lo, cur_lo), max(hi, cur_hi)
        new_lo = max(lo, hi - self.max_buckets + 1)
        new = np.zeros(hi - new_lo + 1, np.int64)
        if self._counts.size:
            first = cur_lo - new_lo
            if first >= 0:
                new[first:first + self._counts.size] = self._counts
            elif self._counts.size + first <= 1:  # every old bucket is at or below it
                new[0] = self._counts.sum()
            else:  # collapse the buckets below the new lowest into it
                new[0] = self._counts[:-first + 1].sum()
                new[1:self._counts.size + first] = self._counts[-first + 1:]
        self._counts = new
        self._offset = new_lo

    def merge(self, other: DDSketch) -> None:
        """Add ``other``'s values into this sketch (same ``alpha`` and ``min_value``)."""
        if not isinstance(other, DDSketch):
            raise ValueError(f"can only merge a DDSketch, got {type(other).__name__}")
        if other.alpha != self.alpha or other.min_value != self.min_value:
            raise ValueError(f"cannot merge sketches with alpha/min_value {other.alpha}/"
                             f"{other.min_value} into {self.alpha}/{self.min_value}")
        nz = np.flatnonzero(other._counts)
        if nz.size:
            lo, hi = other._offset + int(nz[0]), other._offset + int(nz[-1])
            self._reserve(lo, hi)
            src = other._counts[nz[0]:nz[-1] + 1]
            first = lo - self._offset
            if first >= 0:
                self._counts[first:first + src.size] += src
            elif src.size + first <= 0:  # all of other's buckets are below: collapse
                self._counts[0] += src.sum()
            else:  # the lowest of other's buckets fall into the collapsed first bucket
                self._counts[0] += src[:-first].sum()
                self._counts[:src.size + first] += src[-first:]
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def merged(self, other: DDSketch) -> DDSketch:
        """A new sketch holding the values of both."""
        out = self.copy()
        out.merge(other)
        return out

    def copy(self) -> DDSketch:
        out = DDSketch(self.alpha, max_buckets=self.max_buckets, min_value=self.min_value)
        out._counts = self._counts.copy()
        out._offset = self._offset
        for name in ("zero_count", "count", "sum", "min", "max"):
            setattr(out, name, getattr(self, name))
        return out

    # -- reading -------------------------------------------------------------------

    def buckets(self) -> dict[int, int]:
        """Non-empty buckets as {index: count} (the zero bucket is ``zero_count``)."""
        nz = np.flatnonzero(self._counts)
        return dict(zip((nz + self._offset).tolist(), self._counts[nz].tolist(), strict=True))

    @property
    def nbytes(self) -> int:
        return int(self._counts.nbytes)

    def quantiles(self, qs: np.ndarray | list[float]) -> np.ndarray:
        """Estimates of the values at ranks ``floor(q * (count - 1))``; NaN when empty.

        Each is within relative error ``alpha`` of the true value at that rank,
        and clamped to the exact [min, max].
        """
        q = np.asarray(qs, dtype=np.float64)
        if q.size and (np.isnan(q).any() or q.min() < 0 or q.max() > 1):
            raise ValueError(f"quantiles must be in [0, 1], got {q.tolist()}")
        if self.count == 0:
            return np.full(q.shape, np.nan)
        ranks = np.floor(q * (self.count - 1))
        pos = _k.rank_bucket(self._counts, self.zero_count, np.ascontiguousarray(ranks))
        rep = 2.0 * self._gamma ** (pos + self._offset).astype(np.float64) / (self._gamma + 1)
        out = np.where(pos < 0, 0.0, rep)
        return np.clip(out, self.min, self.max)

    def quantile(self, q: float) -> float:
        """One quantile (see :meth:`quantiles`)."""
        return float(self.quantiles([q])[0])

    def __repr__(self) -> str:
        return (f"DDSketch(alpha={self.alpha}, count={self.count}, "
                f"buckets={np.count_nonzero(self._counts)})")
