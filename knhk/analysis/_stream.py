"""Streaming versions of the Dataset's analyses: a pass (or two) over batches, bounded state.

Each function takes ``read(columns)``, a callable returning a fresh iterator of
record batches holding (at least) those columns, so the same code runs over a
lazy dataset's files and over batches in memory (which is how the tests hold
the streamed results equal to the eager ones).

* :func:`summary` — counts, time range, error rate, distinct traces (exact:
  the distinct trace ids are kept, 16 bytes each) and every operation's count
  and p99 duration, exactly as the eager ``np.quantile``-linear p99: a first
  pass builds a log-bucketed histogram per operation, a second pass keeps
  only the durations in the one or two buckets the p99's ranks fall in.
* :class:`ValidationSummary` — the merged counts of per-batch validation reports.
* :func:`lateness_ns` — the allowed lateness under which feeding batches in
  file order leaves no span late, so windows equal the time-sorted feed's.

Example
-------
>>> import knhk
>>> batch = knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=s, start_time_ns=0,
...                                              end_time_ns=s * 1000) for s in range(1, 101)])
>>> s = summary(lambda columns: iter([batch.record_batch.select(columns)]), limit=None)
>>> s["spans"], s["traces"], s["top_operations"].column("p99_ms").to_pylist()
(100, 1, [0.09901])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ValidationSummary", "lateness_ns", "summary"]

Reader = Callable[[Sequence[str]], Iterator[pa.RecordBatch]]

_ERROR = 2
_Q = 0.99
# Sorted int64 bucket edges, log-spaced (about 3 % apart) on both sides of zero.
# Any non-decreasing bucket function works for the exact selection; integer
# edges and searchsorted keep it exactly monotone (no float rounding at edges).
_POS = np.unique(np.floor(np.geomspace(1.0, 2.0 ** 62, 1500)).astype(np.int64))
_EDGES = np.concatenate([-_POS[::-1], [0], _POS])
_NB = len(_EDGES) + 1
_SUMMARY_COLUMNS = ["trace_id", "service", "name", "start_time_ns", "end_time_ns",
                    "status_code"]
_P99_COLUMNS = ["service", "name", "start_time_ns", "end_time_ns"]


def _bucket(d: np.ndarray) -> np.ndarray:
    return np.searchsorted(_EDGES, d, side="right")


class _Interner:
    """Global integer ids for the strings of dictionary columns seen batch after batch."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def codes(self, col: pa.Array) -> np.ndarray:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        values = col.dictionary.to_pylist()
        lut = np.fromiter((self.ids.setdefault(v, len(self.ids)) for v in values),
                          np.int64, len(values))
        idx = col.indices.fill_null(0).to_numpy() if col.null_count else col.indices.to_numpy()
        return lut[idx] if len(lut) else np.zeros(len(idx), np.int64)

    def names(self) -> np.ndarray:
        out = np.empty(len(self.ids), dtype=object)
        for k, i in self.ids.items():
            out[i] = k
        return out


class _Operations:
    """(service, name) pairs as dense operation ids."""

    def __init__(self) -> None:
        self.services = _Interner()
        self.names = _Interner()
        self.ids: dict[int, int] = {}

    def ops(self, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        svc = self.services.codes(rb.column("service"))
        nm = self.names.codes(rb.column("name"))
        pair = (svc << 32) | nm
        uniq, inv = np.unique(pair, return_inverse=True)
        lut = np.fromiter((self.ids.setdefault(int(p), len(self.ids)) for p in uniq),
                          np.int64, len(uniq))
        return lut[inv.ravel()], svc


def _distinct(parts: list[pa.Array]) -> pa.Array:
    return pc.unique(pa.chunked_array(parts, pa.binary(16)).combine_chunks()) if parts \
        else pa.array([], pa.binary(16))


def summary(read: Reader, *, limit: int | None = 10) -> dict[str, Any]:
    """The eager summary's figures in two passes over ``read`` (see the module docstring).

    Returns the summary dict's ``spans``, ``traces``, ``services``,
    ``service_names``, ``start_ns``, ``end_ns``, ``error_rate`` and
    ``top_operations`` (``limit`` rows; None: every operation), plus
    ``batches`` (non-empty batches read).
    """
    ops = _Operations()
    n = errors = batches = 0
    start_ns: int | None = None
    end_ns: int | None = None
    hist = np.zeros((0, _NB), np.int64)
    traces: list[pa.Array] = []
    held, compact_at = 0, 1 << 20
    used_services: set[int] = set()
    for rb in read(_SUMMARY_COLUMNS):
        if not rb.num_rows:
            continue
        batches += 1
        n += rb.num_rows
        start = rb.column("start_time_ns").to_numpy()
        end = rb.column("end_time_ns").to_numpy()
        lo, hi = int(start.min()), int(end.max())
        start_ns = lo if start_ns is None else min(start_ns, lo)
        end_ns = hi if end_ns is None else max(end_ns, hi)
        errors += int(np.count_nonzero(rb.column("status_code").to_numpy() == _ERROR))
        tid = pc.unique(rb.column("trace_id"))
        traces.append(tid)
        held += len(tid)
        if held >= compact_at:
            # keep the distinct ids distinct as they arrive: memory follows the traces, not spans
            traces = [_distinct(traces)]
            held = len(traces[0])
            compact_at = max(2 * held, 1 << 20)
        op, svc = ops.ops(rb)
        used_services.update(np.unique(svc).tolist())
        if len(ops.ids) > hist.shape[0]:
            hist = np.vstack([hist, np.zeros((len(ops.ids) - hist.shape[0], _NB), np.int64)])
        flat = op * _NB + _bucket(end - start)
        hist += np.bincount(flat, minlength=hist.size).reshape(hist.shape)
    names_s = ops.services.names()
    service_names = sorted(str(names_s[i]) for i in used_services)
    out: dict[str, Any] = {
        "spans": n,
        "traces": len(_distinct(traces)),
        "services": len(service_names),
        "service_names": service_names,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "error_rate": float(errors / n) if n else 0.0,
        "top_operations": _operations_table(read, ops, hist, limit),
        "batches": batches,
    }
    return out


def _operations_table(read: Reader, ops: _Operations, hist: np.ndarray,
                      limit: int | None) -> pa.Table:
    n_ops = hist.shape[0]
    counts = hist.sum(axis=1)
    present = counts > 0
    # ranks of the two order statistics the linear p99 interpolates, per operation
    h = (counts - 1) * _Q
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = h - lo
    cum = np.cumsum(hist, axis=1)
    b_lo = np.array([np.searchsorted(cum[i], lo[i], side="right") for i in range(n_ops)],
                    np.int64)
    b_hi = np.array([np.searchsorted(cum[i], hi[i], side="right") for i in range(n_ops)],
                    np.int64)

    def below(b: np.ndarray) -> np.ndarray:
        return np.where(b > 0, cum[np.arange(n_ops), np.maximum(b - 1, 0)], 0)

    below_lo, below_hi = below(b_lo), below(b_hi)
    picked_op: list[np.ndarray] = []
    picked_d: list[np.ndarray] = []
    if n_ops:
        for rb in read(_P99_COLUMNS):
            if not rb.num_rows:
                continue
            op, _ = ops.ops(rb)
            d = rb.column("end_time_ns").to_numpy() - rb.column("start_time_ns").to_numpy()
            b = _bucket(d)
            sel = (b == b_lo[op]) | (b == b_hi[op])
            picked_op.append(op[sel])
            picked_d.append(d[sel])
    p_op = np.concatenate(picked_op) if picked_op else np.zeros(0, np.int64)
    p_d = np.concatenate(picked_d) if picked_d else np.zeros(0, np.int64)
    order = np.lexsort((p_d, p_op))
    p_op, p_d = p_op[order], p_d[order]
    first = np.searchsorted(p_op, np.arange(n_ops), side="left")
    bucket_of = _bucket(p_d)
    a = np.zeros(n_ops, np.int64)
    b_ = np.zeros(n_ops, np.int64)
    for i in np.flatnonzero(present).tolist():
        stop = np.searchsorted(p_op, i, side="right")
        vals, bk = p_d[first[i]:stop], bucket_of[first[i]:stop]
        in_lo = vals[bk == b_lo[i]]
        in_hi = vals[bk == b_hi[i]]
        a[i] = in_lo[lo[i] - below_lo[i]]
        b_[i] = in_hi[hi[i] - below_hi[i]]
    # the eager formula, on the same dtypes, so the figures are the same floats
    af, bf = a.astype(np.float64), b_.astype(np.float64)
    p99 = (af + (bf - af) * frac) / 1e6
    svc_names = ops.services.names()
    op_names = ops.names.names()
    pairs = sorted(ops.ids.items(), key=lambda kv: kv[1])
    svc_of = [str(svc_names[p >> 32]) for p, _ in pairs]
    name_of = [str(op_names[p & 0xFFFFFFFF]) for p, _ in pairs]
    rank = sorted(np.flatnonzero(present).tolist(),
                  key=lambda i: (-p99[i], svc_of[i], name_of[i]))
    if limit is not None:
        rank = rank[:limit]
    return pa.table({
        "service": pa.array([svc_of[i] for i in rank], pa.string()),
        "name": pa.array([name_of[i] for i in rank], pa.string()),
        "count": pa.array([int(counts[i]) for i in rank], pa.int64()),
        "p99_ms": pa.array([float(p99[i]) for i in rank], pa.float64()),
    })


def lateness_ns(ranges: Sequence[tuple[int, int]]) -> int:
    """The least lateness under which batches fed in this order leave no span late.

    ``ranges`` are each batch's (min, max) start time in feed order. A
    processor's watermark after a batch is the largest start seen minus the
    lateness; a span is late once its window ends at or before the watermark.
    With lateness ``L = max(largest start before a batch - the batch's
    smallest start)``, the watermark never passes a span not yet fed.
    """
    seen: int | None = None
    worst = 0
    for lo, hi in ranges:
        if seen is not None and seen - lo > worst:
            worst = seen - lo
        seen = hi if seen is None else max(seen, hi)
    return worst


class ValidationSummary:
    """Merged per-batch :class:`~knhk.validation.BatchValidationReport` figures.

    What a lazy dataset's ``validate()`` returns: the counts of the eager
    report (``num_rows``, ``num_invalid``, ``num_violations``,
    ``num_findings``, ``counts``, ``level_counts()``, ``is_valid()``) and
    the per-row ``row_level`` (one byte a span, so ``invalid`` and
    ``valid_mask()`` work too). Findings as objects or as a table need the
    batch they point into: validate a selection eagerly for those
    (``ds.filter(...)``, or ``knhk.open(..., start=, end=, lazy=False)``).
    """

    def __init__(self) -> None:
        self.num_rows = 0
        self.num_invalid = 0
        self.num_violations = 0
        self.num_findings = 0
        self._counts: dict[str, int] = {}
        self._levels: dict[str, int] = {}
        self._row_level: list[np.ndarray] = []
        self.reports = 0

    def add(self, report: Any) -> None:
        """Fold in one batch's report."""
        self.reports += 1
        self.num_rows += report.num_rows
        self.num_invalid += report.num_invalid
        self.num_violations += report.num_violations
        self.num_findings += report.num_findings
        for k, v in report.counts.items():
            self._counts[k] = self._counts.get(k, 0) + v
        for k, v in report.level_counts().items():
            self._levels[k] = self._levels.get(k, 0) + v
        self._row_level.append(np.asarray(report.row_level, np.int8))

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def level_counts(self) -> dict[str, int]:
        return dict(self._levels)

    def is_valid(self) -> bool:
        return self.num_violations == 0

    @property
    def row_level(self) -> np.ndarray:
        return np.concatenate(self._row_level) if self._row_level else np.zeros(0, np.int8)

    @property
    def invalid(self) -> np.ndarray:
        from knhk.validation import FindingLevel

        return self.row_level >= FindingLevel.VIOLATION

    def valid_mask(self) -> np.ndarray:
        return ~self.invalid

    def __repr__(self) -> str:
        return (f"ValidationSummary({self.num_rows:,} spans, {self.num_invalid:,} invalid, "
                f"{self.num_findings:,} findings)")
