"""Trace assembly and the analyses over assembled traces.

:func:`assemble` turns any number of span batches into a :class:`TraceSet`
(every trace at once: rows grouped by trace, duplicates dropped, parents
indexed by a hash join in a Cython kernel). A :class:`Trace` is one trace of
it. :class:`TraceAssembler` collects spans as they come, in the shape of the
original design's API. :func:`critical_paths` computes the critical path of
every trace of a batch in one kernel call, with the semantics of Jaeger UI.

Example
-------
>>> import knhk
>>> from knhk.tracing import TraceAssembler
>>> asm = TraceAssembler()
>>> asm.add_batch(knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=1, start_time_ns=0, duration_ns=100),
...     knhk.Span("db", trace_id=1, span_id=2, parent_span_id=1, start_time_ns=10,
...               duration_ns=50),
... ]))
>>> trace = asm.assemble_trace(1)
>>> [(s.span_id.hex(), s.section_start, s.section_end) for s in trace.critical_path()]
[('0000000000000001', 60, 100), ('0000000000000002', 10, 60), ('0000000000000001', 0, 10)]
>>> trace.critical_path().total_duration_ms()
0.0001
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk._build import load_core
from knhk.batch import MetricBatch, SpanBatch
from knhk.metrics import _check as _check_point
from knhk.metrics import metric_batch
from knhk.schema import MetricKind, MetricPoint, Span, Temporality

__all__ = [
    "CriticalPath",
    "CriticalPathSection",
    "Trace",
    "TraceAssembler",
    "TraceSet",
    "assemble",
    "critical_paths",
    "latency_breakdown",
    "service_call_graph",
    "service_graph_metrics",
]

logger = logging.getLogger(__name__)
_k = load_core("_tracing")
_NO_BITS = np.empty(0, dtype=np.uint8)
# Up to this many edges, service_call_graph finds each edge's p99 by a selection.
_SELECT_PER_EDGE_MAX = 2_000

_PATH_SCHEMA = pa.schema([
    pa.field("trace_id", pa.binary(16), nullable=False),
    pa.field("root_span_id", pa.binary(8), nullable=False),
    pa.field("span_id", pa.binary(8), nullable=False),
    pa.field("section_start", pa.int64(), nullable=False),
    pa.field("section_end", pa.int64(), nullable=False),
])


def _id_matrix(col: pa.Array, width: int,
               validity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, width) uint8 view of a fixed-size binary column, and its validity (if asked)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    buf = col.buffers()[1]
    if buf is None:
        raw = np.zeros((n, width), dtype=np.uint8)
    else:
        raw = np.frombuffer(buf, dtype=np.uint8, count=(col.offset + n) * width)
        raw = np.ascontiguousarray(raw[col.offset * width:].reshape(n, width))
    if not validity:
        return raw, None
    valid = (np.ones(n, dtype=np.uint8) if col.null_count == 0
             else col.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8))
    return raw, valid


def _binary(ids: np.ndarray, width: int) -> pa.Array:
    """A fixed_size_binary(width) Arrow array over the bytes of ``ids`` (n * width bytes)."""
    ids = np.ascontiguousarray(ids)
    return pa.Array.from_buffers(pa.binary(width), ids.nbytes // width,
                                 [None, pa.py_buffer(ids)])


def _as_batch(data: Any) -> SpanBatch:
    if isinstance(data, SpanBatch):
        return data
    if isinstance(data, Span):
        return SpanBatch.from_spans([data])
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, SpanBatch) for b in data):
        return SpanBatch.concat(list(data))
    # Arrow tables, record batches, dicts of columns: SpanBatch names a bad column.
    return SpanBatch(data)


def _trace_id_bytes(trace_id: bytes | int | str) -> bytes:
    if isinstance(trace_id, bytes):
        if len(trace_id) != 16:
            raise ValueError(f"trace_id must be 16 bytes, got {len(trace_id)} bytes")
        return trace_id
    if isinstance(trace_id, str):
        try:
            raw = bytes.fromhex(trace_id)
        except ValueError:
            raise ValueError(f"trace_id {trace_id!r} is not hexadecimal") from None
        return _trace_id_bytes(raw)
    if isinstance(trace_id, (int, np.integer)) and 0 <= int(trace_id) < 1 << 128:
        return int(trace_id).to_bytes(16, "big")
    raise ValueError(f"trace_id must be 16 bytes, a 32-digit hex string or an int in "
                     f"[0, 2**128), got {trace_id!r}")


class CriticalPathSection(NamedTuple):
    """One section of a critical path: the span that owns ``[section_start, section_end)``."""

    span_id: bytes
    section_start: int
    section_end: int


class CriticalPath(Sequence[CriticalPathSection]):
    """The critical path of one trace: sections latest first, tiling each root's interval.

    Examples
    --------
    >>> path = CriticalPath([CriticalPathSection(b"\\x00" * 8, 0, 1_500_000)])
    >>> len(path), path.total_duration_ms()
    (1, 1.5)
    """

    __slots__ = ("_sections",)

    def __init__(self, sections: Iterable[CriticalPathSection]) -> None:
        self._sections = list(sections)

    def __len__(self) -> int:
        return len(self._sections)

    def __getitem__(self, i: Any) -> Any:
        return self._sections[i]

    def __iter__(self) -> Iterator[CriticalPathSection]:
        return iter(self._sections)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CriticalPath):
            return self._sections == other._sections
        return NotImplemented

    def __repr__(self) -> str:
        return f"CriticalPath({len(self)} sections, {self.total_duration_ms()} ms)"

    def total_duration_ms(self) -> float:
        """Sum of the section lengths, in milliseconds."""
        return sum(s.section_end - s.section_start for s in self._sections) / 1e6


class TraceSet:
    """Every trace of some spans, assembled: rows grouped by trace, parents indexed.

    Attributes
    ----------
    spans : SpanBatch
        The kept spans (duplicates removed), grouped by trace in order of first
        appearance, in arrival order within a trace.
    trace_offsets : numpy.ndarray
        int64, ``len(self) + 1``: trace ``i`` is rows ``trace_offsets[i]:trace_offsets[i+1]``.
    parent : numpy.ndarray
        int64 row of each span's parent in ``spans``, -1 for a root.
    depth : numpy.ndarray
        int64 depth of each span, 0 for a root.
    is_orphan, in_cycle : numpy.ndarray
        bool: the span named a parent that is absent (it is a root now); the
        span's parent link closed a cycle (it was cut, the span is a root now).
    duplicates, orphans, cycles : int
        Counts of duplicate spans dropped, orphans and cycles broken.
    """

    def __init__(self, source: SpanBatch, rows: np.ndarray | None, meta: tuple,
                 ids: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        offsets, parent, depth, flags, counters = meta
        # Rows are taken from the source lazily: analyses need a few columns,
        # and a take over every column (attributes, events) costs more than assembly.
        self._source = source
        self._rows = rows
        self._spans: SpanBatch | None = source if rows is None else None
        self._ids = ids
        self.trace_offsets = offsets
        self.parent = parent
        self.depth = depth
        self.is_orphan = (flags & _k.FLAG_ORPHAN) != 0
        self.in_cycle = (flags & _k.FLAG_CYCLE) != 0
        self.duplicates, self.orphans, self.cycles = (int(c) for c in counters)

    @cached_property
    def _start(self) -> np.ndarray:
        return self._numeric("start_time_ns")

    @cached_property
    def _end(self) -> np.ndarray:
        # A span that ends before it starts is read as zero-length.
        return np.maximum(self._numeric("end_time_ns"), self._start)

    @cached_property
    def negative_durations(self) -> int:
        """Spans that end before they start (read as zero-length)."""
        return int(np.count_nonzero(self._numeric("end_time_ns") < self._start))

    @property
    def spans(self) -> SpanBatch:
        """The kept spans (duplicates removed), grouped by trace."""
        if self._spans is None:
            self._spans = self._source.take(pa.array(self._rows))
        return self._spans

    def _numeric(self, name: str) -> np.ndarray:
        col = self._source.column(name).to_numpy()
        return col if self._rows is None else col[self._rows]

    def _column(self, name: str) -> pa.Array:
        col = self._source.column(name)
        return col if self._rows is None else col.take(pa.array(self._rows))

    def _id_rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ids is None:
            self._ids = (_id_matrix(self._source.column("trace_id"), 16)[0],
                         _id_matrix(self._source.column("span_id"), 8)[0])
        tids, sids = self._ids
        if self._rows is not None:
            return tids[self._rows], sids[self._rows]
        return tids, sids

    def __len__(self) -> int:
        return len(self.trace_offsets) - 1

    def __iter__(self) -> Iterator[Trace]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Trace:
        if not -len(self) <= i < len(self):
            raise IndexError(f"trace index {i} out of range for {len(self)} traces")
        i %= len(self)
        a, b = int(self.trace_offsets[i]), int(self.trace_offsets[i + 1])
        par = self.parent[a:b]
        meta = (np.array([0, b - a], dtype=np.int64), np.where(par >= 0, par - a, -1),
                self.depth[a:b], (self.is_orphan[a:b] * _k.FLAG_ORPHAN
                                  | self.in_cycle[a:b] * _k.FLAG_CYCLE).astype(np.uint8),
                np.array([0, self.is_orphan[a:b].sum(), self.in_cycle[a:b].sum()]))
        rows = np.arange(a, b) if self._rows is None else self._rows[a:b]
        return Trace(self._source, rows, meta, self._ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} traces, {len(self.parent)} spans, "
                f"{self.orphans} orphans, {self.cycles} cycles, {self.duplicates} duplicates)")

    def trace_ids(self) -> list[bytes]:
        """The trace id of every trace, in order."""
        tids, _ = self._id_rows()
        return [bytes(tids[int(o)]) for o in self.trace_offsets[:-1]]

    def anomalies(self) -> dict[str, int]:
        """Counts of what assembly had to repair."""
        return {"duplicates": self.duplicates, "orphans": self.orphans,
                "cycles": self.cycles, "negative_durations": self.negative_durations}

    def critical_paths(self) -> pa.Table:
        """Critical paths of every trace in one kernel call (see :func:`critical_paths`)."""
        kind = self._numeric("kind")
        pos, s, e, root, _ = _k.critical_paths(self.parent, self.trace_offsets, self._start,
                                               self._end, kind)
        tids, sids = self._id_rows()
        # Gathers of whole ids as 64-bit words are several times faster than of byte rows.
        t64 = np.ascontiguousarray(tids).view(np.uint64).reshape(-1, 2)
        s64 = np.ascontiguousarray(sids).view(np.uint64).ravel()
        return pa.Table.from_arrays(
            [_binary(t64[pos].view(np.uint8), 16), _binary(s64[root].view(np.uint8), 8),
             _binary(s64[pos].view(np.uint8), 8), pa.array(s), pa.array(e)],
            schema=_PATH_SCHEMA)

    def self_time_ns(self) -> np.ndarray:
        """Each span's duration minus the union of its direct children's intervals clipped to it."""
        return _k.self_times(self.parent, self._start, self._end)

    def latency_breakdown(self) -> pa.Table:
        """Per (service, operation) statistics, as Jaeger's Trace Statistics view shows.

        Returns
        -------
        pyarrow.Table
            Columns ``service``, ``operation``, ``count``, ``total_time_ns``
            (sum of durations), ``self_time_ns`` (sum of self times),
            ``min_ns``, ``avg_ns``, ``max_ns`` (of durations) and ``percent``
            (self time as a percentage of the summed durations of the traces,
            a trace lasting from its first start to its last end), sorted by
            self time, largest first.
        """
        dur = self._end - self._start
        self_t = self.self_time_ns()
        services, s_code = self._codes("service")
        operations, o_code = self._codes("name")
        # Grouped on dictionary codes (a stable radix sort when the pair codes
        # fit 16 bits) rather than on strings: only the few groups become text.
        n_ops = max(len(operations), 1)
        key = s_code * n_ops + o_code
        order = np.argsort(key.astype(np.uint16) if max(len(services), 1) * n_ops <= 1 << 16
                           else key, kind="stable")
        key, dur_k, self_k = key[order], dur[order], self_t[order]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else \
            np.zeros(0, dtype=np.int64)
        count = np.diff(np.r_[first, len(key)]).astype(np.int64)

        def per_group(ufunc: np.ufunc, values: np.ndarray) -> np.ndarray:
            return ufunc.reduceat(values, first) if len(first) else np.zeros(0, np.int64)

        total = per_group(np.add, dur_k)
        k0 = key[first]
        g = {"service": pa.array(services[k0 // n_ops] if len(k0) else [], pa.string()),
             "operation": pa.array(operations[k0 % n_ops] if len(k0) else [], pa.string()),
             "dur_count": pa.array(count, pa.int64()),
             "dur_sum": pa.array(total, pa.int64()),
             "self_sum": pa.array(per_group(np.add, self_k), pa.int64()),
             "dur_min": pa.array(per_group(np.minimum, dur_k), pa.int64()),
             # As Arrow's mean of integers: the exact int64 sum over the count.
             "dur_mean": pa.array(total / np.maximum(count, 1), pa.float64()),
             "dur_max": pa.array(per_group(np.maximum, dur_k), pa.int64())}
        trace_total = self._trace_durations().sum()
        self_sum = g["self_sum"].to_numpy()
        percent = (100.0 * self_sum / trace_total if trace_total > 0
                   else np.zeros(len(self_sum)))
        out = pa.table({
            "service": g["service"], "operation": g["operation"],
            "count": g["dur_count"], "total_time_ns": g["dur_sum"],
            "self_time_ns": g["self_sum"], "min_ns": g["dur_min"],
            "avg_ns": g["dur_mean"], "max_ns": g["dur_max"],
            "percent": pa.array(percent, pa.float64()),
        })
        order = pc.sort_indices(out, [("self_time_ns", "descending"),
                                      ("service", "ascending"), ("operation", "ascending")])
        return out.take(order)

    def _codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct values of a string column (sorted) and each span's index into them."""
        col = self._source.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_dictionary(col.type):
            # A concatenated batch's dictionary may repeat a name: map through unique.
            names, remap = np.unique(col.dictionary.to_numpy(zero_copy_only=False),
                                     return_inverse=True)
            code = remap[col.indices.to_numpy(zero_copy_only=False)]
        else:
            names, code = np.unique(col.to_numpy(zero_copy_only=False), return_inverse=True)
        code = code.astype(np.int64)
        return names, (code if self._rows is None else code[self._rows])

    def _trace_durations(self) -> np.ndarray:
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        starts = np.minimum.reduceat(self._start, self.trace_offsets[:-1])
        ends = np.maximum.reduceat(self._end, self.trace_offsets[:-1])
        return ends - starts

    def service_call_graph(self) -> pa.Table:
        """Edges between services: the parent span's service calls the child span's.

        Only links whose services differ are edges. A call failed when either
        span's status is error (as the Collector's servicegraph connector
        counts it); its latency is the child span's duration.

        Returns
        -------
        pyarrow.Table
            Columns ``client``, ``server``, ``calls``, ``errors``,
            ``latency_total_ns``, ``latency_avg_ns``, ``latency_p99_ns``
            (nearest rank), sorted by client then server.
        """
        names, code = self._codes("service")
        status = self._numeric("status_code")
        child = np.flatnonzero(self.parent >= 0)
        par = self.parent[child]
        ci, si = code[par], code[child]
        keep = ci != si
        child, par, ci, si = child[keep], par[keep], ci[keep], si[keep]
        n_edges = max(len(names), 1) ** 2
        edge = ci * max(len(names), 1) + si
        lat = self._end[child] - self._start[child]
        err = (status[child] == 2) | (status[par] == 2)
        # Group by edge with a stable sort (a radix sort when edge codes fit 16
        # bits); each edge's p99 is then a selection within its group, which
        # costs far less than sorting every latency.
        order = np.argsort(edge.astype(np.uint16) if n_edges <= 1 << 16 else edge,
                           kind="stable")
        edge, lat, err = edge[order], lat[order], err[order]
        first = np.flatnonzero(np.r_[True, edge[1:] != edge[:-1]]) if len(edge) else \
            np.zeros(0, dtype=np.int64)
        counts = np.diff(np.r_[first, len(edge)])
        total = np.add.reduceat(lat, first) if len(edge) else np.zeros(0, np.int64)
        errors = np.add.reduceat(err.astype(np.int64), first) if len(edge) else \
            np.zeros(0, np.int64)
        # Nearest rank: the ceil(0.99 n)-th smallest latency of the edge.
        rank = np.ceil(0.99 * counts).astype(np.int64) - 1
        if len(first) <= _SELECT_PER_EDGE_MAX:
            p99 = np.array([np.partition(lat[a:a + c], r)[r]
                            for a, c, r in zip(first, counts, rank, strict=True)],
                           dtype=np.int64)
        else:
            # Many edges: one sort of (edge, latency) beats a selection per edge.
            p99 = lat[np.lexsort((lat, edge))[first + rank]]
        e0 = edge[first]
        n_names = max(len(names), 1)
        return pa.table({
            "client": pa.array(names[e0 // n_names] if len(e0) else [], pa.string()),
            "server": pa.array(names[e0 % n_names] if len(e0) else [], pa.string()),
            "calls": pa.array(counts, pa.int64()),
            "errors": pa.array(errors, pa.int64()),
            "latency_total_ns": pa.array(total, pa.int64()),
            "latency_avg_ns": pa.array(total / np.maximum(counts, 1), pa.float64()),
            "latency_p99_ns": pa.array(p99, pa.int64()),
        })


class Trace(TraceSet):
    """One assembled trace: its spans, roots, children, depths and analyses.

    Examples
    --------
    >>> import knhk
    >>> trace = assemble(knhk.SpanBatch.from_spans([
    ...     knhk.Span("a", trace_id=7, span_id=1, start_time_ns=0, duration_ns=10),
    ...     knhk.Span("b", trace_id=7, span_id=2, parent_span_id=1, start_time_ns=2,
    ...               duration_ns=4),
    ... ]))[0]
    >>> [r.hex() for r in trace.roots], trace.depth.tolist()
    (['0000000000000001'], [0, 1])
    """

    @property
    def trace_id(self) -> bytes:
        """The 16-byte trace id."""
        return bytes(self._id_rows()[0][0])

    @property
    def roots(self) -> list[bytes]:
        """Span ids of the roots (orphans and cut cycles included), in start order."""
        idx = np.flatnonzero(self.parent < 0)
        idx = idx[np.lexsort((idx, self._start[idx]))]
        sids = self._id_rows()[1]
        return [bytes(sids[i]) for i in idx]

    def children(self, span_id: bytes) -> list[bytes]:
        """Span ids of the direct children of ``span_id``, in arrival order."""
        if not isinstance(span_id, bytes) or len(span_id) != 8:
            raise ValueError(f"span_id must be 8 bytes, got {span_id!r}")
        sids = self._id_rows()[1]
        key = np.frombuffer(span_id, dtype=np.uint8)
        hit = np.flatnonzero((sids == key).all(axis=1))
        if not len(hit):
            raise KeyError(f"span {span_id.hex()} is not in trace {self.trace_id.hex()}")
        return [bytes(sids[i]) for i in np.flatnonzero(self.parent == hit[0])]

    def critical_path(self) -> CriticalPath:
        """The critical path, as Jaeger UI computes it.

        Returns
        -------
        CriticalPath
            Sections latest first; every root gets its path, roots in start
            order, each root's sections contiguous.
        """
        t = self.critical_paths()
        return CriticalPath(CriticalPathSection(*r) for r in zip(
            t.column("span_id").to_pylist(), t.column("section_start").to_pylist(),
            t.column("section_end").to_pylist(), strict=False))


def assemble(data: Any) -> TraceSet:
    """Assemble every trace of ``data`` at once.

    Parameters
    ----------
    data : SpanBatch, list of SpanBatch, or anything ``SpanBatch`` accepts

    Returns
    -------
    TraceSet

    Examples
    --------
    >>> import knhk
    >>> ts = assemble(knhk.SpanBatch.from_spans([
    ...     knhk.Span("a", trace_id=1, span_id=1, start_time_ns=0, duration_ns=5),
    ...     knhk.Span("x", trace_id=2, span_id=1, start_time_ns=0, duration_ns=5),
    ...     knhk.Span("b", trace_id=1, span_id=2, parent_span_id=9, start_time_ns=1,
    ...               duration_ns=1),
    ... ]))
    >>> len(ts), ts.orphans, ts.trace_offsets.tolist()
    (2, 1, [0, 2, 3])
    """
    batch = _as_batch(data)
    rb = batch.record_batch
    tids, _ = _id_matrix(rb.column("trace_id"), 16)
    sids, _ = _id_matrix(rb.column("span_id"), 8)
    pids, has_parent = _id_matrix(rb.column("parent_span_id"), 8)
    rows, offsets, parent, depth, flags, counters = _k.assemble(tids, sids, pids, has_parent)
    if counters[2]:
        logger.warning("trace assembly cut %d cycle(s) in parent links", counters[2])
    identity = len(rows) == batch.num_rows and bool(np.all(rows[1:] > rows[:-1]))
    return TraceSet(batch, None if identity else rows, (offsets, parent, depth, flags, counters),
                    (tids, sids))


def critical_paths(batch: Any) -> pa.Table:
    """Critical paths of all traces of a batch, in one kernel call.

    Parameters
    ----------
    batch : SpanBatch or anything :func:`assemble` accepts

    Returns
    -------
    pyarrow.Table
        Columns ``trace_id``, ``root_span_id``, ``span_id``, ``section_start``,
        ``section_end``; traces in order of first appearance, each trace's
        sections as :meth:`Trace.critical_path` lists them.

    Notes
    -----
    Equal to ``assemble(batch).critical_paths()`` (duplicates, orphans and
    cycles handled as :func:`assemble` handles them), without building the
    :class:`TraceSet`: one kernel assembles each trace and walks its path
    straight from the batch's id buffers. Rows of a trace need not be
    contiguous, but the call is fastest when they are (one extra pass
    regroups them otherwise).

    Examples
    --------
    >>> import knhk
    >>> t = critical_paths(knhk.SpanBatch.from_spans([
    ...     knhk.Span("a", trace_id=1, span_id=1, start_time_ns=0, duration_ns=10),
    ...     knhk.Span("b", trace_id=2, span_id=1, start_time_ns=5, duration_ns=10),
    ... ]))
    >>> t.column("section_start").to_pylist(), t.column("section_end").to_pylist()
    ([0, 5], [10, 15])
    """
    batch = _as_batch(batch)
    rb = batch.record_batch
    tids, _ = _id_matrix(rb.column("trace_id"), 16)
    sids, _ = _id_matrix(rb.column("span_id"), 8)
    pcol = rb.column("parent_span_id")
    pids, _ = _id_matrix(pcol, 8, validity=False)
    # The validity bitmap goes to the kernels as Arrow holds it.
    valid = (np.frombuffer(pcol.buffers()[0], np.uint8) if pcol.null_count
             else _NO_BITS)
    cols = (tids, sids, pids, valid, pcol.offset, _int64(rb.column("start_time_ns")),
            _int64(rb.column("end_time_ns")), rb.column("kind").to_numpy())
    offsets = _k.trace_runs(tids)
    if offsets is None:
        # Traces interleaved: one pass moves the needed columns into trace order.
        *grouped, offsets = _k.regroup(*cols)
        cols = (*grouped[:3], _NO_BITS, 0, *grouped[3:])
    # Assembly and the walk in one kernel pass over each trace's rows: no parent
    # index, no gathered columns and no id gathers in between.
    tid, root, sid, s, e, counters = _k.critical_paths_ids(*cols, offsets)
    if counters[2]:
        logger.warning("trace assembly cut %d cycle(s) in parent links", counters[2])
    return pa.Table.from_arrays([_binary(tid, 16), _binary(root, 8), _binary(sid, 8),
                                 pa.array(s), pa.array(e)], schema=_PATH_SCHEMA)


def _int64(col: pa.Array) -> np.ndarray:
    return np.ascontiguousarray(col.to_numpy(), dtype=np.int64)


def service_graph_metrics(edges: pa.Table, *, time_ns: int | None = None,
                          service: str = "knhk") -> MetricBatch:
    """A service call graph (from :meth:`TraceSet.service_call_graph`) as metric points.

    Named as the OpenTelemetry Collector's servicegraph connector names its
    counters: ``traces_service_graph_request_total`` and
    ``traces_service_graph_request_failed_total`` (delta counters), plus the
    gauges ``traces_service_graph_request_latency_avg_seconds`` and
    ``..._p99_seconds``; every point carries ``client`` and ``server`` attributes.

    Examples
    --------
    >>> import knhk
    >>> g = service_call_graph(knhk.SpanBatch.from_spans([
    ...     knhk.Span("a", trace_id=1, span_id=1, start_time_ns=0, duration_ns=9,
    ...               service="front"),
    ...     knhk.Span("b", trace_id=1, span_id=2, parent_span_id=1, start_time_ns=1,
    ...               duration_ns=4, service="db"),
    ... ]))
    >>> m = service_graph_metrics(g, time_ns=10)
    >>> m.column("name").to_pylist()[0], m.column("int_value").to_pylist()[0]
    ('traces_service_graph_request_total', 1)
    """
    expected = {"client", "server", "calls", "errors", "latency_avg_ns", "latency_p99_ns"}
    if not isinstance(edges, pa.Table) or not expected <= set(edges.column_names):
        raise ValueError("service_graph_metrics expects the table of service_call_graph(), "
                         f"with columns {sorted(expected)}")
    rows = []
    for e in edges.to_pylist():
        attrs = {"client": e["client"], "server": e["server"]}
        for name, kind, value in (
                ("traces_service_graph_request_total", MetricKind.COUNTER, e["calls"]),
                ("traces_service_graph_request_failed_total", MetricKind.COUNTER, e["errors"]),
                ("traces_service_graph_request_latency_avg_seconds", MetricKind.GAUGE,
                 e["latency_avg_ns"] / 1e9),
                ("traces_service_graph_request_latency_p99_seconds", MetricKind.GAUGE,
                 e["latency_p99_ns"] / 1e9)):
            rows.append(_check_point(MetricPoint(
                name, value, kind=kind, unit="s" if kind is MetricKind.GAUGE else "1",
                attributes=attrs, temporality=Temporality.DELTA, time_ns=time_ns,
                service=service)))
    return MetricBatch(metric_batch(rows))


def latency_breakdown(batch: Any) -> pa.Table:
    """Per (service, operation) statistics over all traces of ``batch``.

    See :meth:`TraceSet.latency_breakdown`.
    """
    return assemble(batch).latency_breakdown()


def service_call_graph(batch: Any) -> pa.Table:
    """Service call graph aggregated over all traces of ``batch``.

    See :meth:`TraceSet.service_call_graph`.
    """
    return assemble(batch).service_call_graph()


class TraceAssembler:
    """Collects spans and assembles traces on demand.

    Examples
    --------
    >>> import knhk
    >>> asm = TraceAssembler()
    >>> asm.add_span(knhk.Span("a", trace_id=3, span_id=1, start_time_ns=0, duration_ns=5))
    >>> asm.assemble_trace(3).roots
    [b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01']
    """

    def __init__(self) -> None:
        self._chunks: list[SpanBatch] = []
        self._pending_spans: list[Span] = []
        self._cache: TraceSet | None = None

    def add_span(self, span: Span) -> None:
        """Add one span (kept until the next assembly, then batched)."""
        if not isinstance(span, Span):
            raise TypeError(f"add_span expects a knhk.Span, got {type(span).__name__}")
        self._pending_spans.append(span)
        self._cache = None

    def add_batch(self, batch: Any) -> None:
        """Add a batch of spans (a SpanBatch or anything ``SpanBatch`` accepts)."""
        b = _as_batch(batch)
        if b.num_rows:
            self._chunks.append(b)
            self._cache = None

    def _spans(self) -> SpanBatch:
        if self._pending_spans:
            self._chunks.append(SpanBatch.from_spans(self._pending_spans))
            self._pending_spans = []
        if not self._chunks:
            return SpanBatch.empty()
        if len(self._chunks) > 1:
            self._chunks = [SpanBatch.concat(self._chunks)]
        return self._chunks[0]

    def assemble_all(self) -> TraceSet:
        """Every trace collected so far, assembled at once."""
        if self._cache is None:
            self._cache = assemble(self._spans())
        return self._cache

    def assemble_trace(self, trace_id: bytes | int | str) -> Trace:
        """The trace with ``trace_id`` (16 bytes, 32 hex digits or an int).

        Raises
        ------
        KeyError
            When no span of that trace was added.
        """
        tid = _trace_id_bytes(trace_id)
        spans = self._spans()
        col = spans.column("trace_id")
        mask = pc.equal(col, pa.scalar(tid, pa.binary(16)))
        sub = spans.filter(mask)
        if not sub.num_rows:
            raise KeyError(f"no span of trace {tid.hex()} was added")
        return assemble(sub)[0]

    def clear(self) -> None:
        """Forget every span."""
        self._chunks = []
        self._pending_spans = []
        self._cache = None
