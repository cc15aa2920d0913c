"""Metric families held for a Prometheus scrape, with a cardinality limit and a fast renderer.

A :class:`Family` is one Prometheus metric family (one HELP and TYPE): its
series are found by their sorted label pairs, their label text is escaped
once when the series is created, and :meth:`Family.render` writes the text
format 0.0.4 or OpenMetrics 1.0 with a handful of string operations per
sample. :meth:`Family.to_metric` gives the same family as a
``prometheus_client`` metric family, for a registry of the user's own (and as
the reference the tests compare the fast renderer with).

Past ``limit - 1`` series a family folds new label sets into one overflow
series labelled ``otel_metric_overflow="true"`` (the OpenTelemetry SDK's
cardinality limit), so at most ``limit`` series are exposed and the sum over
the series stays exact.

Example
-------
>>> from knhk.exporters._prom_families import Family
>>> f = Family("calls_total", "counter", "Calls.", limit=2)
>>> f.add((("svc", "a"),), 2); f.add((("svc", "b"),), 3); f.add((("svc", "c"),), 4)
>>> print(f.render_text(), end="")
# HELP calls_total Calls.
# TYPE calls_total counter
calls_total{svc="a"} 2
calls_total{otel_metric_overflow="true"} 7
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from knhk.exporters._prom_names import escape_help, format_value, labels_text

__all__ = ["OVERFLOW", "Family"]

#: The label pairs of the overflow series.
OVERFLOW: tuple[tuple[str, str], ...] = (("otel_metric_overflow", "true"),)

_TYPES = ("counter", "gauge", "histogram")


def _le(bound: float) -> str:
    # the same canonical form prometheus_client writes (OpenMetrics wants one form)
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


class Family:
    """One metric family: its series, values and rendering.

    Parameters
    ----------
    name : str
        The exposed name (a counter's ends in ``_total``).
    prom_type : {"counter", "gauge", "histogram"}
    help : str
    limit : int
        Maximum number of series exposed, the overflow series included.
    bounds : sequence of float, optional
        A histogram's finite upper bounds, increasing (``+Inf`` is implied).
    expires : bool
        Keep each series' last update time (updates pass ``now=``) so that
        :meth:`drop_stale` can remove series nothing updates any more.
    """

    def __init__(self, name: str, prom_type: str, help: str, *, limit: int,
                 bounds: Sequence[float] | None = None, expires: bool = False) -> None:
        if prom_type not in _TYPES:
            raise ValueError(f"prom_type must be one of {_TYPES}, got {prom_type!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
            raise ValueError(f"the cardinality limit must be an int >= 2, got {limit!r}")
        self.name = name
        self.type = prom_type
        self.help = help or name
        self.limit = limit
        self.index: dict[tuple, int] = {}
        self.pairs: list[tuple[tuple[str, str], ...]] = []
        self._text: list[str] = []  # escaped label text per series, no braces
        self.overflow = -1
        self.overflowed_sets = 0  # label sets folded into the overflow series (distinct)
        # a cumulative input that overflows: its last value per label set, so the
        # overflow series gets the increments and its total stays exact
        self._overflow_last: dict[tuple, Any] = {}
        self.values: list[Any] = []
        self.seen: list[float] | None = [] if expires else None
        if prom_type == "histogram":
            b = [float(x) for x in (bounds or ())]
            if any(not (x < y) for x, y in itertools.pairwise(b)):
                raise ValueError(f"histogram {name!r}: bounds must increase strictly")
            self.bounds = tuple(x for x in b if x != float("inf"))
            nb = len(self.bounds) + 1
            self.buckets = np.zeros((8, nb), dtype=np.int64)
            self.sums = np.zeros(8, dtype=np.float64)
        else:
            self.bounds = ()

    # -- series ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pairs)

    def _new(self, pairs: tuple) -> int:
        i = len(self.pairs)
        self.pairs.append(pairs)
        self._text.append(labels_text(pairs))
        if self.seen is not None:
            self.seen.append(0.0)
        if self.type == "histogram":
            if i >= len(self.sums):
                grow = max(8, len(self.sums))
                self.buckets = np.vstack([self.buckets,
                                          np.zeros((grow, self.buckets.shape[1]), np.int64)])
                self.sums = np.concatenate([self.sums, np.zeros(grow)])
        else:
            self.values.append(0)
        return i

    def series(self, pairs: tuple) -> int:
        """The index of the series with these sorted label pairs (created if new;
        the overflow series once the limit is reached)."""
        i = self.index.get(pairs)
        if i is not None:
            return i
        if len(self.pairs) - (self.overflow >= 0) < self.limit - 1:
            i = self._new(pairs)
            self.index[pairs] = i
            return i
        if self.overflow < 0:
            self.overflow = self._new(OVERFLOW)
        if pairs not in self._overflow_last:
            self.overflowed_sets += 1
            self._overflow_last[pairs] = None
        return self.overflow

    # -- updates --------------------------------------------------------------------

    def _touch(self, i: int, now: float | None) -> None:
        if now is not None and self.seen is not None:
            self.seen[i] = now

    def add(self, pairs: tuple, amount: Any, *, now: float | None = None) -> None:
        """Add ``amount`` to a counter or gauge series (a delta)."""
        i = self.series(pairs)
        self.values[i] += amount
        self._touch(i, now)

    def set(self, pairs: tuple, value: Any, *, cumulative_sum: bool = False,
            now: float | None = None) -> None:
        """Set a series to ``value``.

        For a cumulative sum (``cumulative_sum``) that lands in the overflow
        series, the increment since this label set's last value is added
        instead (a value below the last is a reset: the whole value is added).
        """
        i = self.series(pairs)
        self._touch(i, now)
        if i != self.overflow or self.index.get(pairs) == i:
            self.values[i] = value
            return
        if not cumulative_sum:
            self.values[i] = value  # a gauge: the overflow series shows the latest
            return
        last = self._overflow_last.get(pairs)
        delta = value if last is None or value < last else value - last
        self._overflow_last[pairs] = value
        self.values[i] += delta

    def observe_many(self, rows: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> None:
        """Add bucket counts (``counts[k]`` for series ``rows[k]``) and sums: histogram deltas."""
        np.add.at(self.buckets, rows, counts)
        np.add.at(self.sums, rows, sums)

    def set_histogram(self, pairs: tuple, counts: Sequence[int], total: float, *,
                      cumulative: bool, now: float | None = None) -> None:
        """Record one histogram point: per-bucket (not cumulative) ``counts``, its sum."""
        i = self.series(pairs)
        self._touch(i, now)
        counts = np.asarray(counts, dtype=np.int64)
        if cumulative and not (i == self.overflow and self.index.get(pairs) != i):
            self.buckets[i] = counts
            self.sums[i] = total
            return
        if cumulative:
            last = self._overflow_last.get(pairs)
            self._overflow_last[pairs] = (counts, total)
            if last is not None and (counts >= last[0]).all():
                counts, total = counts - last[0], total - last[1]
        self.buckets[i] += counts
        self.sums[i] += total

    def drop_stale(self, cutoff: float) -> int:
        """Remove the series last updated before ``cutoff`` (the overflow series
        stays: it stands for label sets that may still come); return how many.

        A label set that comes back starts a new series (for a counter, a reset
        Prometheus' ``rate()`` handles).
        """
        if self.seen is None:
            return 0
        n = len(self.pairs)
        keep = [i for i in range(n) if i == self.overflow or self.seen[i] >= cutoff]
        if len(keep) == n:
            return 0
        overflow = keep.index(self.overflow) if self.overflow >= 0 else -1
        self.pairs = [self.pairs[i] for i in keep]
        self._text = [self._text[i] for i in keep]
        self.seen = [self.seen[i] for i in keep]
        if self.type == "histogram":
            self.buckets, self.sums = self.buckets[keep], self.sums[keep]
        else:
            self.values = [self.values[i] for i in keep]
        self.overflow = overflow
        self.index = {p: j for j, p in enumerate(self.pairs) if j != overflow}
        return n - len(keep)

    # -- output ---------------------------------------------------------------------

    def snapshot(self) -> Family:
        """A copy to render while this family keeps changing (taken under the
        owner's lock, rendered outside it, so a scrape does not stall the updates)."""
        f = copy.copy(self)
        n = len(self.pairs)
        f.pairs, f._text, f.values = self.pairs[:], self._text[:], self.values[:]
        if self.type == "histogram":
            f.buckets, f.sums = self.buckets[:n].copy(), self.sums[:n].copy()
        return f

    def _base_name(self, openmetrics: bool) -> str:
        if openmetrics and self.type == "counter" and self.name.endswith("_total"):
            return self.name[:-6]
        return self.name

    def render(self, out: list[str], *, openmetrics: bool = False) -> None:
        """Append this family's exposition lines to ``out``."""
        if not self.pairs:
            return
        base = self._base_name(openmetrics)
        help = escape_help(self.help, openmetrics)
        out.append(f"# HELP {base} {help}\n# TYPE {base} {self.type}\n")
        name = self.name
        if self.type != "histogram":
            fmt = format_value
            out.extend([f"{name}{{{t}}} {fmt(v)}\n" if t else f"{name} {fmt(v)}\n"
                        for t, v in zip(self._text, self.values, strict=True)])
            return
        n = len(self.pairs)
        cum = np.cumsum(self.buckets[:n], axis=1)
        counts = cum[:, -1].tolist()
        sums = self.sums[:n].tolist()
        les = [f'le="{_le(b)}"' for b in self.bounds] + ['le="+Inf"']
        bucket = f"{name}_bucket{{"
        for t, row, c, s in zip(self._text, cum.tolist(), counts, sums, strict=True):
            sep = t + "," if t else ""
            out.extend([f"{bucket}{sep}{le}}} {v}\n" for le, v in zip(les, row, strict=True)])
            lbl = f"{{{t}}}" if t else ""
            out.append(f"{name}_count{lbl} {c}\n{name}_sum{lbl} {format_value(s)}\n")

    def render_text(self, *, openmetrics: bool = False) -> str:
        out: list[str] = []
        self.render(out, openmetrics=openmetrics)
        return "".join(out)

    def to_metric(self) -> Any:
        """This family as a ``prometheus_client`` metric family (a ``Metric``)."""
        from prometheus_client.metrics_core import Metric

        m = Metric(self._base_name(True), self.help, self.type)
        if self.type != "histogram":
            for pairs, v in zip(self.pairs, self.values, strict=True):
                m.add_sample(self.name, dict(pairs), float(v))
            return m
        n = len(self.pairs)
        cum = np.cumsum(self.buckets[:n], axis=1)
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for k, pairs in enumerate(self.pairs):
            labels = dict(pairs)
            for le, v in zip(les, cum[k].tolist(), strict=True):
                m.add_sample(f"{self.name}_bucket", {**labels, "le": le}, float(v))
            m.add_sample(f"{self.name}_count", labels, float(cum[k, -1]))
            m.add_sample(f"{self.name}_sum", labels, float(self.sums[k]))
        return m
