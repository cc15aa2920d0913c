"""The analyst's side: a recording opened as a dataset of span batches.

:func:`open_dataset` (``knhk.open``) opens Arrow IPC recordings (a file, a
directory, a glob or a list of those, as :func:`knhk.replay.read_batches`
takes them) as a :class:`Dataset`. A dataset is the Arrow data itself —
``to_arrow()``, ``to_pandas()``, ``to_polars()`` and the Arrow PyCapsule
stream protocol (``__arrow_c_stream__``), so Polars, DuckDB and pandas read it
— and it runs the same engine as the pipeline on it: validation against a
Weaver registry, windowed aggregates, trace assembly, critical paths, the
service graph, the latency breakdown and samplers. In Jupyter it shows itself
as a summary card. Plots live in :mod:`knhk.plotting` (and as ``Dataset.plot_*``
methods).

Eager and lazy
--------------
A recording smaller than :data:`LAZY_THRESHOLD_BYTES` on disk (or any, with
``lazy=False``) is read whole when opened, as it always was: every batch is
validated and checksummed as it is read, so a damaged file fails at ``open``,
and analyses that need every span at once concatenate them once and cache it.

A larger one (or any, with ``lazy=True``) is opened *lazily*: ``open`` reads
only the files' schemas, and each analysis reads what it needs when called,
batch by batch, only the columns it uses (``included_fields``: the
compressed buffers of other columns are not even decompressed), skipping the
batches outside ``start=`` / ``end=``:

======================  ===========================================================
analysis                lazy plan (memory)
======================  ===========================================================
first use               one pass over every batch, all columns, checksums checked
                        (a damaged file raises ``CorruptFileError`` here, naming the
                        file and byte offset); keeps rows and start-time range per
                        batch (the index, a few integers a batch)
summary, operations     two passes over 6 and 4 columns; exact (the same figures as
                        eager); distinct trace ids are kept (16 B a trace)
windows                 one pass, batches in file order through a StreamProcessor
                        whose allowed lateness the index says leaves no span late
                        (open windows only); rows within a window may come in
                        another order than eager's
validate                one pass, all columns, report per batch, merged into a
                        :class:`~knhk.analysis._stream.ValidationSummary` (counts
                        and one byte a span)
sample, filter          one pass for the sampler's masks (one byte a span), then a
                        lazy dataset of the rows kept
sql                     DuckDB scans a stream of the columns the query names
__arrow_c_stream__      batch by batch, never a whole table
service_graph,          K passes over 9 columns, each keeping the traces whose
latency_breakdown,      trace-id hash falls in one of K buckets (K from
slowest_traces          ``memory_budget``); the per-bucket results are merged as
                        :mod:`knhk.distributed` merges its buckets (exactly)
trace, critical_path    one pass over ``trace_id``, then the batches holding it
to_arrow, to_pandas,    materialise, as their names say; so do ``batch``,
to_polars, traces       ``batches``, ``traces()`` and ``duration_ns()``
======================  ===========================================================

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters.ipc import IpcExporter
>>> from knhk.workload import generate, WorkloadConfig
>>> tmp = tempfile.TemporaryDirectory()
>>> recorder = IpcExporter(tmp.name)
>>> _ = recorder.export(generate(2_000, WorkloadConfig(seed=1)))
>>> recorder.shutdown()
>>> ds = open_dataset(recorder.directory)
>>> s = ds.summary()
>>> s["spans"], s["traces"] > 0, sorted(s["top_operations"].column_names)
(2000, True, ['count', 'name', 'p99_ms', 'service'])
>>> ds.sql("SELECT count(*) AS n FROM spans").column("n").to_pylist()
[2000]
>>> lazy = open_dataset(recorder.directory, lazy=True)
>>> lazy.summary()["top_operations"].equals(s["top_operations"])
True
>>> lazy.service_graph().equals(ds.service_graph())
True
>>> tmp.cleanup()
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk.analysis import _stream
from knhk.analysis._scan import BatchInfo, Scanner, check_columns, projected_schema
from knhk.analysis._sql import ReaderFactory, sql_columns
from knhk.batch import MetricBatch, SpanBatch
from knhk.schema import SPAN_SCHEMA

__all__ = ["LAZY_THRESHOLD_BYTES", "Dataset", "open_dataset"]

logger = logging.getLogger(__name__)

_ERROR = 2
_TOP_OPERATIONS = 10

#: Recordings larger than this on disk open lazily unless ``lazy=False`` is given.
#: knhk's lz4 files hold about 50 bytes a span, so this is some five million
#: spans, one to two GB once read whole.
LAZY_THRESHOLD_BYTES = 256 << 20
#: Memory the trace analyses of a lazy dataset plan for when ``memory_budget`` is not given.
DEFAULT_MEMORY_BUDGET = 1 << 30
# What one span of the trace columns costs once assembled (measured: ids, the
# columns, the parent index and assembly's scratch arrays), for choosing K.
_TRACE_BYTES_PER_SPAN = 250
_TRACE_COLUMNS = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start_time_ns",
                  "end_time_ns", "status_code", "service")
# Columns a filled-in SpanBatch cannot do without (non-nullable, no neutral value).
_CORE_COLUMNS = ("trace_id", "span_id", "name", "service", "start_time_ns", "end_time_ns",
                 "status_code", "kind")


def _time_ns(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} is a naive datetime; give it a time zone "
                             "(datetime(..., tzinfo=UTC)) or pass nanoseconds since the epoch")
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if isinstance(value, np.datetime64):
        return int(value.astype("datetime64[ns]").astype(np.int64))
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{what} must be nanoseconds since the epoch (int) or an aware datetime, "
                    f"got {value!r}")


def open_dataset(source: str | os.PathLike | Iterable[str | os.PathLike], *,
                 verify: bool = True, lazy: bool | None = None,
                 columns: Sequence[str] | None = None, start: Any = None, end: Any = None,
                 memory_budget: int | None = None,
                 trace_partitions: int | None = None) -> Dataset:
    """Open Arrow IPC recordings as a :class:`Dataset` (exported as ``knhk.open``).

    Parameters
    ----------
    source : path, directory, glob string, or a list of those
        Files written by :class:`~knhk.exporters.ipc.IpcExporter` or
        ``knhk generate``; a directory or glob expands to its ``.arrow`` /
        ``.arrows`` files in sorted (time) order.
    verify : bool
        Check each batch's checksum while reading (a lazy dataset checks each
        file the first time it reads it, and again if the file changes).
    lazy : bool, optional
        Read batches when an analysis needs them rather than now (see the
        module docstring). The default, None, is lazy when the files hold more
        than :data:`LAZY_THRESHOLD_BYTES`.
    columns : list of str, optional
        The columns the Arrow faces (``to_arrow``, ``to_pandas``,
        ``to_polars``, ``sql``, the PyCapsule stream, ``iter_batches``) carry;
        a lazy dataset reads only those. Analyses read the columns they need
        whatever this says.
    start, end : int (ns since the epoch) or aware datetime, optional
        Keep the spans that start in ``[start, end)``. A lazy dataset skips
        the batches (after the first pass, the files) outside the range.
    memory_budget : int, optional
        Bytes a lazy dataset's trace analyses may hold at once (default
        :data:`DEFAULT_MEMORY_BUDGET`); it sets how many trace-id partitions
        they read the files in.
    trace_partitions : int, optional
        That number of partitions, given outright.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        When a path does not exist or a glob matches nothing (the message
        names it).
    knhk.CorruptFileError
        When a file is damaged (names the file and the byte offset) — at
        ``open`` for an eager dataset, at the first analysis for a lazy one.

    Examples
    --------
    >>> open_dataset("/nonexistent/*.arrow")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no files match '/nonexistent/*.arrow'
    """
    from knhk.replay import _expand, read_batches

    paths = _expand(source)
    if lazy is not None and not isinstance(lazy, bool):
        raise TypeError(f"lazy must be True, False or None, got {lazy!r}")
    cols = check_columns(columns, "open_dataset")
    t0, t1 = _time_ns(start, "start"), _time_ns(end, "end")
    if t0 is not None and t1 is not None and t0 >= t1:
        raise ValueError(f"start ({t0}) must be before end ({t1})")
    for label, value in (("memory_budget", memory_budget), ("trace_partitions", trace_partitions)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if lazy is None:
        lazy = sum(os.path.getsize(p) for p in paths) > LAZY_THRESHOLD_BYTES
    options = _Options(cols, t0, t1, memory_budget, trace_partitions)
    if lazy:
        scanner = Scanner(paths, verify=verify)
        logger.debug("opened %d files lazily (%d bytes)", len(paths), scanner.nbytes)
        return Dataset._lazy(scanner, options)
    spans: list[SpanBatch] = []
    metrics: list[MetricBatch] = []
    for batch in read_batches(paths, verify=verify):
        if isinstance(batch, SpanBatch):
            if t0 is not None or t1 is not None:
                batch = _time_filter(batch, t0, t1)
            if batch.num_rows:
                spans.append(batch)
        else:
            metrics.append(batch)
    logger.debug("opened %d files: %d span batches, %d metric batches",
                 len(paths), len(spans), len(metrics))
    ds = Dataset(spans, paths=paths, metrics=metrics)
    ds._options = options
    return ds


def _time_mask(start: np.ndarray, t0: int | None, t1: int | None) -> np.ndarray:
    keep = np.ones(len(start), bool)
    if t0 is not None:
        keep &= start >= t0
    if t1 is not None:
        keep &= start < t1
    return keep


def _time_filter(batch: SpanBatch, t0: int | None, t1: int | None) -> SpanBatch:
    keep = _time_mask(batch.column("start_time_ns").to_numpy(), t0, t1)
    return batch if keep.all() else batch.filter(keep)


@dataclass(frozen=True)
class _Options:
    columns: tuple[str, ...] | None = None
    start: int | None = None
    end: int | None = None
    memory_budget: int | None = None
    trace_partitions: int | None = None


@dataclass(frozen=True)
class _Part:
    """One batch of a lazy dataset's plan: the batch, and the rows of it kept (None: all)."""

    info: BatchInfo
    rows: int
    mask: np.ndarray | None


def _fill(rb: pa.RecordBatch) -> SpanBatch:
    """A SpanBatch of ``rb``'s columns, the others empty (null, zero, empty lists)."""
    from knhk.distributed._tasks import _filler

    if rb.schema.names == SPAN_SCHEMA.names:
        return SpanBatch._wrap(rb)
    have = set(rb.schema.names)
    n = rb.num_rows
    cols = [rb.column(f.name) if f.name in have else _filler(f, n) for f in SPAN_SCHEMA]
    return SpanBatch._wrap(pa.RecordBatch.from_arrays(cols, schema=SPAN_SCHEMA))


def _group_columns(group_by: Sequence[str], value: str) -> tuple[str, ...] | None:
    """Columns a StreamProcessor with these keys reads (None: unknown, read them all)."""
    simple = {"service": "service", "name": "name", "kind": "kind", "status": "status_code",
              "scope_name": "scope_name"}
    out = list(_CORE_COLUMNS)
    for key in (*group_by, value):
        if key == "duration":
            continue
        if key in simple:
            out.append(simple[key])
        elif key.startswith("attributes."):
            out.append("attributes")
        elif key.startswith("resource."):
            out.append("resource_attributes")
        else:
            return None
    return tuple(dict.fromkeys(out))


def _linear_quantiles(sorted_values: np.ndarray, first: np.ndarray, counts: np.ndarray,
                      q: float) -> np.ndarray:
    """Quantile ``q`` of each group of sorted values, as ``np.quantile``'s linear method."""
    h = (counts - 1) * q
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = h - lo
    a = sorted_values[first + lo].astype(np.float64)
    b = sorted_values[first + hi].astype(np.float64)
    return a + (b - a) * frac


def _iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="milliseconds")


def _human_duration(ns: int) -> str:
    s = ns / 1e9
    if s < 1:
        return f"{ns / 1e6:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _trace_id_bytes(trace_id: bytes | int | str) -> bytes:
    if isinstance(trace_id, bytes) and len(trace_id) == 16:
        return trace_id
    if isinstance(trace_id, str):
        try:
            raw = bytes.fromhex(trace_id)
        except ValueError:
            raw = b""
        if len(raw) == 16:
            return raw
    elif isinstance(trace_id, int) and not isinstance(trace_id, bool) \
            and 0 <= trace_id < 2**128:
        return trace_id.to_bytes(16, "big")
    raise ValueError(f"a trace id is 16 bytes, 32 hex digits or an int; got {trace_id!r}")


class Dataset:
    """Span batches from a recording, with the pipeline's analyses and Arrow's faces.

    Build one with :func:`open_dataset` (``knhk.open``) or
    :meth:`from_batches`. It is immutable: :meth:`filter` and :meth:`sample`
    return new datasets. A lazy dataset (``knhk.open(..., lazy=True)``, or a
    large recording) holds no batches: each analysis reads what it needs
    from the files (see the module docstring for what streams and what
    materialises).

    Attributes
    ----------
    batches : list of SpanBatch
        The span batches, in file order (a lazy dataset reads them all, once,
        when this is first used).
    paths : list of str
        The files read (empty for a dataset built in memory).
    metrics : list of MetricBatch
        Metric batches found in the files (kept aside; the analyses are of spans).
    lazy : bool
        Whether batches are read on demand.
    """

    def __init__(self, batches: Sequence[SpanBatch], *, paths: Sequence[str] = (),
                 metrics: Sequence[MetricBatch] = ()) -> None:
        for i, b in enumerate(batches):
            if not isinstance(b, SpanBatch):
                raise TypeError(f"batches[{i}] is {type(b).__name__}, expected a SpanBatch")
        self._batches: list[SpanBatch] | None = list(batches)
        self.paths = list(paths)
        self._metrics: list[MetricBatch] | None = list(metrics)
        self._scanner: Scanner | None = None
        self._options = _Options()
        self._masks: dict[tuple[int, int], np.ndarray] | None = None

    @classmethod
    def _lazy(cls, scanner: Scanner, options: _Options,
              masks: dict[tuple[int, int], np.ndarray] | None = None) -> Dataset:
        ds = cls.__new__(cls)
        ds._batches = None
        ds.paths = list(scanner.paths)
        ds._metrics = None
        ds._scanner = scanner
        ds._options = options
        ds._masks = masks
        return ds

    @classmethod
    def from_batches(cls, data: Any) -> Dataset:
        """A dataset over span data held in memory.

        Parameters
        ----------
        data : SpanBatch, pyarrow RecordBatch or Table, or a list of those
        """
        items = data if isinstance(data, list | tuple) else [data]
        batches: list[SpanBatch] = []
        for item in items:
            if isinstance(item, SpanBatch):
                batches.append(item)
            elif isinstance(item, pa.Table):
                batches.extend(SpanBatch(rb) for rb in item.to_batches())
            else:
                batches.append(SpanBatch(item))
        return cls([b for b in batches if b.num_rows])

    # -- what is held, and reading it ---------------------------------------------------

    @property
    def lazy(self) -> bool:
        return self._scanner is not None

    @property
    def batches(self) -> list[SpanBatch]:
        if self._batches is None:
            # a lazy dataset asked for its batches as a list: read them all, once
            self._batches = [SpanBatch._wrap(rb) for rb in self._iter(None)]
        return self._batches

    @property
    def metrics(self) -> list[MetricBatch]:
        if self._metrics is None:
            from knhk.replay import read_batches

            assert self._scanner is not None
            files = [p for p, s in zip(self._scanner.paths, self._scanner.signals, strict=True)
                     if s == "metrics"]
            self._metrics = [b for b in read_batches(files, verify=self._scanner.verify)
                             if isinstance(b, MetricBatch)] if files else []
        return self._metrics

    @cached_property
    def _plan(self) -> list[_Part]:
        """The batches a lazy dataset holds, each with the rows of it kept."""
        assert self._scanner is not None
        index = self._scanner.index()
        t0, t1 = self._options.start, self._options.end
        if self._masks is not None:
            return [_Part(i, int(self._masks[(i.file, i.batch)].sum()),
                          self._masks[(i.file, i.batch)])
                    for i in index if (i.file, i.batch) in self._masks]
        parts, partial = [], []
        for info in index:
            if not info.rows or (t0 is not None and info.max_start < t0) or \
                    (t1 is not None and info.min_start >= t1):
                continue
            if (t0 is not None and info.min_start < t0) or \
                    (t1 is not None and info.max_start >= t1):
                partial.append(info)
            parts.append(info)
        # batches straddling a bound: read their start times to know which rows are kept
        masks = {(f, b): _time_mask(rb.column(0).to_numpy(), t0, t1)
                 for f, b, rb in self._scanner.read(["start_time_ns"], partial, compact=False)}
        out = []
        for info in parts:
            m = masks.get((info.file, info.batch))
            if m is None:
                out.append(_Part(info, info.rows, None))
            elif m.any():
                out.append(_Part(info, int(m.sum()), m))
        return out

    def _iter(self, columns: Sequence[str] | None, *, compact: bool = True,
              parts: Sequence[_Part] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of the dataset's rows with only ``columns`` (None: all)."""
        if self._scanner is None:
            assert self._batches is not None
            for b in self._batches:
                rb = b.record_batch
                yield rb if columns is None else rb.select(list(columns))
            return
        plan = self._plan if parts is None else parts
        by_key = {(p.info.file, p.info.batch): p for p in plan}
        for f, b, rb in self._scanner.read(columns, [p.info for p in plan], compact=compact):
            mask = by_key[(f, b)].mask
            yield rb if mask is None else rb.filter(pa.array(mask, pa.bool_()))

    def iter_batches(self, columns: Sequence[str] | None = None) -> Iterator[Any]:
        """The dataset's spans batch by batch (what streaming over a large recording uses).

        Parameters
        ----------
        columns : list of str, optional
            Only these columns (``pyarrow.RecordBatch`` objects); by default
            the dataset's ``columns=`` if it was opened with one, else every
            column, as :class:`~knhk.SpanBatch` objects.

        Returns
        -------
        iterator of SpanBatch or pyarrow.RecordBatch
        """
        cols = check_columns(columns, "iter_batches") if columns is not None \
            else self._options.columns
        for rb in self._iter(cols):
            yield SpanBatch._wrap(rb) if cols is None else rb

    def _reader(self, columns: tuple[str, ...] | None) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(projected_schema(columns), self._iter(columns))

    # -- Arrow faces ----------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        if self._scanner is not None:
            return sum(p.rows for p in self._plan)
        assert self._batches is not None
        return sum(b.num_rows for b in self._batches)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        if self._scanner is not None:
            if not self._scanner.indexed:
                return (f"Dataset(lazy: {len(self.paths)} files, "
                        f"{self._scanner.nbytes / 1e6:,.1f} MB, not read yet)")
            return (f"Dataset(lazy: {self.num_rows:,} spans in {len(self._plan)} batches from "
                    f"{len(self.paths)} files)")
        return (f"Dataset({self.num_rows:,} spans in {len(self.batches)} batches from "
                f"{len(self.paths)} files)")

    def to_arrow(self) -> pa.Table:
        """All spans as one ``pyarrow.Table`` in ``SPAN_SCHEMA`` (one chunk per batch).

        With ``columns=`` given at open, only those columns.
        """
        cols = self._options.columns
        if self._scanner is None:
            table = pa.Table.from_batches([b.record_batch for b in self.batches],
                                          schema=SPAN_SCHEMA)
            return table if cols is None else table.select(list(cols))
        return pa.Table.from_batches(list(self._iter(cols)), schema=projected_schema(cols))

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """The Arrow PyCapsule stream of the batches, one at a time (no copy, no table)."""
        return self._reader(self._options.columns).__arrow_c_stream__(requested_schema)

    def to_pandas(self, **kwargs: Any) -> Any:
        """All spans as a pandas DataFrame (``pyarrow.Table.to_pandas`` arguments pass on)."""
        return self.to_arrow().to_pandas(**kwargs)

    def to_polars(self) -> Any:
        """All spans as a Polars DataFrame."""
        try:
            import polars as pl
        except ImportError:
            raise ImportError("Dataset.to_polars needs polars: pip install polars") from None
        return pl.from_arrow(self.to_arrow())

    @cached_property
    def batch(self) -> SpanBatch:
        """All spans as one :class:`~knhk.SpanBatch` (concatenated once, then cached)."""
        if len(self.batches) == 1:
            return self.batches[0]
        return SpanBatch.concat(self.batches)

    def duration_ns(self) -> np.ndarray:
        """Each span's ``end_time_ns - start_time_ns``, in row order."""
        if self._scanner is not None:
            parts = [rb.column(1).to_numpy() - rb.column(0).to_numpy()
                     for rb in self._iter(["start_time_ns", "end_time_ns"], compact=False)]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if not self.batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([b.duration_ns() for b in self.batches])

    def _column_np(self, name: str) -> np.ndarray:
        if not self.batches:
            return np.zeros(0, dtype=SPAN_SCHEMA.field(name).type.to_pandas_dtype())
        return np.concatenate([b.column(name).to_numpy() for b in self.batches])

    def _codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct values (sorted) of a string column and each row's index into them."""
        if not self.batches:
            return np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
        # One shared dictionary for every batch, then a unique over it alone:
        # sorting the (few) distinct strings, not a string per row.
        col = pa.table({name: pa.chunked_array([b.column(name) for b in self.batches])}) \
            .unify_dictionaries().column(0)
        dictionary = col.chunk(0).dictionary.to_numpy(zero_copy_only=False).astype(str)
        idx = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in col.chunks])
        names, remap = np.unique(dictionary, return_inverse=True)
        return names.astype(object), remap.astype(np.int64)[idx]

    # -- summary ----------------------------------------------------------------------

    @cached_property
    def _summary(self) -> dict[str, Any]:
        if self._scanner is not None:
            s = _stream.summary(lambda cols: self._iter(cols, compact=False), limit=None)
            ops = s.pop("top_operations")
            self.__dict__["_operations"] = ops
            s["top_operations"] = ops.slice(0, _TOP_OPERATIONS)
            s["files"] = len(self.paths)
            return s
        n = self.num_rows
        services, svc = self._codes("service")
        names, nm = self._codes("name")
        if n:
            start = self._column_np("start_time_ns")
            end = self._column_np("end_time_ns")
            status = self._column_np("status_code")
            traces = int(pc.count_distinct(pa.chunked_array(
                [b.column("trace_id") for b in self.batches])).as_py())
            start_ns, end_ns = int(start.min()), int(end.max())
            error_rate = float(np.count_nonzero(status == _ERROR) / n)
        else:
            traces, start_ns, end_ns, error_rate = 0, None, None, 0.0
        return {
            "spans": n,
            "traces": traces,
            "services": len(services),
            "service_names": [str(s) for s in services],
            "start_ns": start_ns,
            "end_ns": end_ns,
            "error_rate": error_rate,
            "top_operations": self._top_operations(services, svc, names, nm, _TOP_OPERATIONS),
            "files": len(self.paths),
            "batches": len(self.batches),
        }

    def _top_operations(self, services: np.ndarray, svc: np.ndarray, names: np.ndarray,
                        nm: np.ndarray, limit: int | None) -> pa.Table:
        dur = self.duration_ns()
        key = svc * max(len(names), 1) + nm
        order = np.lexsort((dur, key))
        key_s, dur_s = key[order], dur[order]
        if len(key_s):
            first = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
        else:
            first = np.zeros(0, dtype=np.int64)
        counts = np.diff(np.r_[first, len(key_s)]).astype(np.int64)
        p99 = _linear_quantiles(dur_s, first, counts, 0.99) / 1e6 if len(first) else \
            np.zeros(0)
        k0 = key_s[first]
        width = max(len(names), 1)
        svc_names = services[k0 // width] if len(k0) else np.zeros(0, dtype=object)
        op_names = names[k0 % width] if len(k0) else np.zeros(0, dtype=object)
        # by p99, largest first; ties by service then name so the order is stable
        rank = sorted(range(len(k0)), key=lambda i: (-p99[i], svc_names[i], op_names[i]))
        if limit is not None:
            rank = rank[:limit]
        return pa.table({
            "service": pa.array([svc_names[i] for i in rank], pa.string()),
            "name": pa.array([op_names[i] for i in rank], pa.string()),
            "count": pa.array([counts[i] for i in rank], pa.int64()),
            "p99_ms": pa.array([p99[i] for i in rank], pa.float64()),
        })

    def summary(self) -> dict[str, Any]:
        """What the recording holds, as ``knhk stats`` prints it.

        A lazy dataset computes the same figures in two passes over six
        columns (see the module docstring).

        Returns
        -------
        dict
            ``spans``, ``traces`` (distinct trace ids), ``services`` (how many
            distinct services; their names in ``service_names``), ``start_ns``
            (earliest start) and ``end_ns`` (latest end; both None when
            empty), ``error_rate`` (fraction of spans with status error),
            ``top_operations`` (``pyarrow.Table``: ``service``, ``name``,
            ``count``, ``p99_ms`` — the duration p99 in milliseconds by
            ``np.quantile``'s linear method — the ten largest p99 first),
            ``files``, ``batches``.
        """
        return dict(self._summary)

    def operations(self) -> pa.Table:
        """Every (service, name) with its span count and p99 duration, largest p99 first."""
        if self._scanner is not None:
            self._summary  # noqa: B018 -- computes every operation's row alongside
            return self.__dict__["_operations"]
        services, svc = self._codes("service")
        names, nm = self._codes("name")
        return self._top_operations(services, svc, names, nm, None)

    def _repr_html_(self) -> str:
        s = self._summary
        span = (s["end_ns"] - s["start_ns"]) if s["spans"] else 0
        rows = [
            ("spans", f"{s['spans']:,}"),
            ("traces", f"{s['traces']:,}"),
            ("services", f"{s['services']:,}"),
            ("time range", f"{_iso(s['start_ns'])} → {_iso(s['end_ns'])} "
                           f"({_human_duration(span)})"),
            ("error rate", f"{s['error_rate']:.2%}"),
            ("files", f"{s['files']:,} ({s['batches']:,} batches)"),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
                       for k, v in rows)
        top = s["top_operations"].slice(0, 5).to_pylist()
        ops = "".join(
            f"<tr><td>{html.escape(r['service'])}</td><td>{html.escape(r['name'])}</td>"
            f"<td>{r['count']:,}</td><td>{r['p99_ms']:.2f}</td></tr>" for r in top)
        return (
            "<div class='knhk-dataset' style='border:1px solid #ccc;border-radius:6px;"
            "padding:8px;display:inline-block'>"
            "<b>knhk Dataset</b><table>" + body + "</table>"
            "<details><summary>top operations by p99</summary><table>"
            "<tr><th>service</th><th>name</th><th>count</th><th>p99 ms</th></tr>"
            + ops + "</table></details></div>")

    # -- selections -----------------------------------------------------------------------

    def filter(self, mask: Any) -> Dataset:
        """The rows where ``mask`` (bool, one per span in row order) is true.

        A lazy dataset stays lazy: it keeps the mask (one byte a span).
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_rows,):
            raise ValueError(f"the mask has shape {mask.shape}; the dataset has "
                             f"{self.num_rows} spans")
        if self._scanner is not None:
            masks: dict[tuple[int, int], np.ndarray] = {}
            offset = 0
            for p in self._plan:
                m = mask[offset:offset + p.rows]
                offset += p.rows
                if not m.any():
                    continue
                if p.mask is None:
                    full = m.copy()
                else:
                    full = p.mask.copy()
                    full[p.mask] = m
                masks[(p.info.file, p.info.batch)] = full
            return Dataset._lazy(self._scanner, self._options, masks)
        out, offset = [], 0
        for b in self.batches:
            m = mask[offset:offset + b.num_rows]
            offset += b.num_rows
            if m.any():
                out.append(b if m.all() else b.filter(m))
        ds = Dataset(out, paths=self.paths, metrics=self.metrics)
        ds._options = self._options
        return ds

    def sample(self, sampler: Any) -> Dataset:
        """The spans a sampler keeps, through the sampler's own ``sample_mask``.

        The sampler sees the batches in file order, each once, as in eager
        mode, so stateful samplers decide the same; a lazy dataset reads every
        column once for the decisions and stays lazy (see :meth:`filter`).

        Parameters
        ----------
        sampler : a knhk sampler (``TraceIdRatio``, ``ParentBased``,
            ``AdaptiveSamplingStrategy``, ...), a :class:`~knhk.SamplingConfig`
            (adaptive sampling with it) or a float (``TraceIdRatio(rate)``).
        """
        from knhk.sampling import AdaptiveSamplingStrategy, SamplingConfig, TraceIdRatio

        if isinstance(sampler, float | int) and not isinstance(sampler, bool):
            sampler = TraceIdRatio(float(sampler))
        elif isinstance(sampler, SamplingConfig):
            sampler = AdaptiveSamplingStrategy(sampler)
        if not callable(getattr(sampler, "sample_mask", None)):
            raise TypeError(f"sample() takes a knhk sampler, a SamplingConfig or a rate; got "
                            f"{type(sampler).__name__}")
        if self._scanner is not None:
            masks = [np.asarray(sampler.sample_mask(SpanBatch._wrap(rb)), dtype=bool)
                     for rb in self._iter(None)]
        else:
            masks = [np.asarray(sampler.sample_mask(b), dtype=bool) for b in self.batches]
        return self.filter(np.concatenate(masks) if masks else np.zeros(0, bool))

    # -- the engine's analyses ------------------------------------------------------------

    def validate(self, registry: Any, **options: Any) -> Any:
        """Validate every span against a Weaver registry (``WeaverValidator.validate_batch``).

        Parameters
        ----------
        registry : a registry directory or a :class:`~knhk.WeaverValidator`
        **options : passed to ``WeaverValidator`` (``exclude``, ``min_level``, ...)

        Returns
        -------
        BatchValidationReport or ValidationSummary
            Row ``i`` of the report is span ``i`` of the dataset. A lazy
            dataset validates batch by batch and returns the merged counts (a
            :class:`~knhk.analysis._stream.ValidationSummary`).
        """
        from knhk.validation import WeaverValidator

        if isinstance(registry, WeaverValidator):
            if options:
                raise TypeError("options apply when validate() builds the validator; "
                                "pass a registry path, not a WeaverValidator, to use them")
            validator = registry
        else:
            validator = WeaverValidator(registry, **options)
        if self._scanner is not None:
            merged = _stream.ValidationSummary()
            for rb in self._iter(None):
                merged.add(validator.validate_batch(SpanBatch._wrap(rb)))
            return merged
        return validator.validate_batch(self.batch)

    def windows(self, window: Any = 60.0, **options: Any) -> pa.Table:
        """Windowed aggregates, as the pipeline's :class:`~knhk.StreamProcessor` computes them.

        Spans are fed in start-time order, so no span of a recording is late.
        A lazy dataset feeds its batches in file order instead, with the
        window's allowed lateness raised to what the batches' start-time
        ranges need for no span to be late: the same windows and figures,
        though rows of one window may come in another order.

        Parameters
        ----------
        window : WindowConfig or seconds
            Seconds mean tumbling windows of that length.
        **options : passed to ``StreamProcessor`` (``group_by``, ``quantiles``, ``mode``...)

        Returns
        -------
        pyarrow.Table
            One row per window and key: ``window_start``, ``window_end``, the
            keys, ``count``, ``p50_duration_ms``..., ``error_rate``, ...
        """
        from knhk.stream import StreamProcessor, WindowConfig

        if not isinstance(window, WindowConfig):
            window = WindowConfig.tumbling(seconds=window)
        if self._scanner is not None:
            return self._windows_lazy(window, options)
        proc = StreamProcessor(window, **options)
        batch = self.batch
        if batch.num_rows:
            order = np.argsort(batch.column("start_time_ns").to_numpy(), kind="stable")
            cols = _group_columns(options.get("group_by", ("service", "name")),
                                  options.get("value", "duration"))
            # sorting moves only the columns the processor reads (not attributes, events...)
            rb = batch.record_batch if cols is None else batch.record_batch.select(list(cols))
            ordered = rb.take(pa.array(order))
            step = 65536
            tables = []
            for off in range(0, ordered.num_rows, step):
                proc.process_batch(_fill(ordered.slice(off, step)))
                tables.append(proc.get_results(as_table=True))
            proc.flush()
            tables.append(proc.get_results(as_table=True))
            return pa.concat_tables(tables)
        proc.flush()
        return proc.get_results(as_table=True)

    def _windows_lazy(self, window: Any, options: dict[str, Any]) -> pa.Table:
        from knhk.stream import StreamProcessor

        if window.processing_time:
            raise ValueError("processing-time windows describe when spans arrive, which a "
                             "recording does not say; use event-time windows")
        late = _stream.lateness_ns([(p.info.min_start, p.info.max_start) for p in self._plan])
        if late > window.allowed_lateness_ns:
            window = replace(window, allowed_lateness_ns=late)
        proc = StreamProcessor(window, **options)
        cols = _group_columns(options.get("group_by", ("service", "name")),
                              options.get("value", "duration"))
        tables = []
        for rb in self._iter(cols, compact=False):
            proc.process_batch(_fill(rb))
            tables.append(proc.get_results(as_table=True))
        proc.flush()
        tables.append(proc.get_results(as_table=True))
        return pa.concat_tables(tables)

    # -- traces ---------------------------------------------------------------------------

    @cached_property
    def _traces(self) -> Any:
        from knhk.tracing import assemble

        return assemble(self.batch)

    def traces(self) -> Any:
        """Every trace assembled (a :class:`knhk.tracing.TraceSet`, cached).

        This holds every span: on a lazy dataset it reads them all. For a
        recording larger than memory use :meth:`iter_traces`.
        """
        return self._traces

    def _partitions(self) -> int:
        if self._options.trace_partitions is not None:
            return self._options.trace_partitions
        budget = self._options.memory_budget or DEFAULT_MEMORY_BUDGET
        return max(1, math.ceil(self.num_rows * _TRACE_BYTES_PER_SPAN / budget))

    def iter_traces(self, partitions: int | None = None, *,
                    columns: Sequence[str] | None = _TRACE_COLUMNS) -> Iterator[Any]:
        """Every trace, assembled a partition of trace ids at a time (bounded memory).

        Partition ``k`` holds the traces whose trace-id hash
        (:func:`knhk.distributed._tasks.bucket_of`) is ``k``: each trace whole,
        in one partition. A lazy dataset reads its files once per partition,
        only ``columns``; the other columns are left empty.

        Parameters
        ----------
        partitions : int, optional
            How many; by default what ``memory_budget`` (given at open) allows.
        columns : list of str, optional
            The span columns to read (None: all); by default those trace
            analysis uses.

        Returns
        -------
        iterator of knhk.tracing.TraceSet
        """
        from knhk.distributed._tasks import bucket_of
        from knhk.tracing import assemble

        k_all = self._partitions() if partitions is None else partitions
        if not isinstance(k_all, int) or isinstance(k_all, bool) or k_all < 1:
            raise ValueError(f"partitions must be a positive int, got {k_all!r}")
        cols = None if columns is None else tuple(dict.fromkeys(
            (*(check_columns(columns, "iter_traces") or ()), *_CORE_COLUMNS)))
        for k in range(k_all):
            pieces = []
            for rb in self._iter(cols, compact=True):
                keep = bucket_of(rb.column("trace_id"), k_all) == k if k_all > 1 else None
                if keep is None:
                    pieces.append(rb)
                elif keep.any():
                    pieces.append(rb.filter(pa.array(keep)))
            logger.debug("trace partition %d/%d: %d spans", k + 1, k_all,
                         sum(p.num_rows for p in pieces))
            batch = SpanBatch.concat([_fill(p) for p in pieces]) if pieces else SpanBatch.empty()
            yield assemble(batch)

    def _trace_results(self) -> dict[str, Any]:
        """Service graph and latency breakdown, partition by partition, merged as
        knhk.distributed merges its buckets (the merge is exact)."""
        from knhk.distributed._tasks import _breakdown_partial, _edges, merge_trace_results

        results = []
        for k, ts in enumerate(self.iter_traces()):
            spans = ts.spans
            results.append({"bucket": k, "spans": spans.num_rows, "traces": len(ts),
                            "anomalies": {}, "critical_paths": pa.table({}),
                            "breakdown": _breakdown_partial(ts, spans),
                            "edges": _edges(ts, spans)})
        return merge_trace_results(results)

    @cached_property
    def _trace_tables(self) -> dict[str, Any]:
        return self._trace_results()

    def trace(self, trace_id: bytes | int | str) -> Any:
        """One trace (a :class:`~knhk.Trace`); ``trace_id`` as bytes, 32 hex digits or int.

        Raises
        ------
        KeyError
            When the dataset has no span of that trace.
        """
        from knhk.tracing import assemble

        tid = _trace_id_bytes(trace_id)
        key = pa.scalar(tid, pa.binary(16))
        if self._scanner is not None:
            # which batches hold it (one column), then only those, whole
            plan = self._plan
            holding = [p for p, rb in zip(plan, self._iter(["trace_id"], compact=False,
                                                           parts=plan), strict=True)
                       if pc.any(pc.equal(rb.column(0), key)).as_py()]
            rows = [rb.filter(pc.equal(rb.column("trace_id"), key))
                    for rb in self._iter(None, parts=holding)]
            sub = SpanBatch.concat(rows) if rows else SpanBatch.empty()
        else:
            batch = self.batch
            sub = batch.filter(pc.equal(batch.column("trace_id"), key))
        if not sub.num_rows:
            raise KeyError(f"no span of trace {tid.hex()} in the dataset")
        return assemble(sub)[0]

    def critical_path(self, trace_id: bytes | int | str) -> Any:
        """The critical path of one trace (a :class:`~knhk.CriticalPath`, latest first)."""
        return self.trace(trace_id).critical_path()

    def service_graph(self) -> pa.Table:
        """Service-to-service calls: ``client``, ``server``, ``calls``, ``errors``, latencies.

        A lazy dataset computes it partition by partition (:meth:`iter_traces`).
        """
        if self._scanner is not None:
            return self._trace_tables["service_graph"]
        return self._traces.service_call_graph()

    def latency_breakdown(self) -> pa.Table:
        """Per (service, operation) durations and self times, largest self time first.

        A lazy dataset computes it partition by partition (:meth:`iter_traces`).
        """
        if self._scanner is not None:
            return self._trace_tables["latency_breakdown"]
        return self._traces.latency_breakdown()

    def slowest_traces(self, n: int = 10) -> pa.Table:
        """The ``n`` longest traces (first start to last end), ties by trace id.

        A lazy dataset takes the ``n`` longest of each partition
        (:meth:`iter_traces`) and then the ``n`` longest of those.

        Returns
        -------
        pyarrow.Table
            ``trace_id`` (hex), ``duration_ms``, ``spans``, ``errors``, and the
            ``service`` and ``name`` of the trace's earliest root.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if self._scanner is not None:
            tops = [_slowest(ts, n) for ts in self.iter_traces()]
            table = pa.concat_tables(tops)
            order = pc.sort_indices(table, [("duration_ms", "descending"),
                                            ("trace_id", "ascending")])
            return table.take(order).slice(0, n).combine_chunks()
        return _slowest(self._traces, n)

    def sql(self, query: str, **tables: Any) -> pa.Table:
        """Run SQL over the spans with DuckDB; the dataset is the table ``spans``.

        A lazy dataset hands DuckDB a stream of its batches (never a whole
        table) carrying only the span columns the query's text names (a ``*``
        other than ``count(*)`` streams every column).

        Parameters
        ----------
        query : str
        **tables : further Arrow-readable objects, visible under their keyword names

        Returns
        -------
        pyarrow.Table

        Raises
        ------
        ImportError
            When DuckDB is not installed.
        """
        try:
            import duckdb
        except ImportError:
            raise ImportError("Dataset.sql needs DuckDB, which is not installed: "
                              "pip install duckdb") from None
        if not isinstance(query, str):
            raise TypeError(f"query must be a SQL string, got {type(query).__name__}")
        con = duckdb.connect()
        try:
            if self._scanner is not None:
                cols = sql_columns(query)
                if self._options.columns is not None:
                    cols = tuple(c for c in self._options.columns
                                 if cols is None or c in cols) or self._options.columns[:1]
                con.register("spans", ReaderFactory(self, cols))
            else:
                con.register("spans", self.to_arrow())
            for name, table in tables.items():
                con.register(name, table if isinstance(table, pa.Table) else pa.table(table))
            rel = con.sql(query)
            if rel is None:  # a statement without a result (CREATE, SET, ...)
                return pa.table({})
            # to_arrow_table is DuckDB >= 1.4's name; older releases call it fetch_arrow_table
            fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
            return fetch()
        finally:
            con.close()

    # -- plots (knhk.plotting) ------------------------------------------------------------

    def plot_latency(self, **options: Any) -> Any:
        """See :func:`knhk.plotting.latency_percentiles`."""
        from knhk import plotting

        return plotting.latency_percentiles(self, **options)

    def plot_error_heatmap(self, **options: Any) -> Any:
        """See :func:`knhk.plotting.error_heatmap`."""
        from knhk import plotting

        return plotting.error_heatmap(self, **options)

    def plot_trace(self, trace_id: bytes | int | str, **options: Any) -> Any:
        """See :func:`knhk.plotting.trace_timeline`."""
        from knhk import plotting

        return plotting.trace_timeline(self.trace(trace_id), **options)

    def plot_service_graph(self, **options: Any) -> Any:
        """See :func:`knhk.plotting.service_graph`."""
        from knhk import plotting

        return plotting.service_graph(self, **options)


def _slowest(ts: Any, n: int) -> pa.Table:
    """The ``n`` longest traces of a TraceSet (see :meth:`Dataset.slowest_traces`)."""
    if not len(ts):
        return pa.table({"trace_id": pa.array([], pa.string()),
                         "duration_ms": pa.array([], pa.float64()),
                         "spans": pa.array([], pa.int64()),
                         "errors": pa.array([], pa.int64()),
                         "service": pa.array([], pa.string()),
                         "name": pa.array([], pa.string())})
    offsets = ts.trace_offsets
    dur = ts._trace_durations()
    ids = ts.trace_ids()
    # one total order (duration descending, then trace id), so a lazy dataset's
    # partitions merge to the same answer whatever the ties
    order = np.argsort(-dur, kind="stable")
    cand = order if len(order) <= n else order[dur[order] >= dur[order[n - 1]]]
    tie_key = np.array([ids[i] for i in cand.tolist()], dtype="S16")
    top = cand[np.lexsort((tie_key, -dur[cand]))][:n]
    spans = ts.spans
    status = spans.column("status_code").to_numpy()
    start = spans.column("start_time_ns").to_numpy()
    errors = np.add.reduceat((status == _ERROR).astype(np.int64), offsets[:-1])
    svc = spans.column("service")
    name = spans.column("name")
    root_rows = []
    for i in top.tolist():
        a, b = int(offsets[i]), int(offsets[i + 1])
        roots = np.flatnonzero(ts.parent[a:b] < 0) + a
        root_rows.append(int(roots[np.argmin(start[roots])]) if len(roots) else a)
    rows = pa.array(root_rows, pa.int64())
    return pa.table({
        "trace_id": pa.array([ids[i].hex() for i in top.tolist()], pa.string()),
        "duration_ms": pa.array(dur[top] / 1e6, pa.float64()),
        "spans": pa.array(np.diff(offsets)[top], pa.int64()),
        "errors": pa.array(errors[top], pa.int64()),
        "service": svc.take(rows).cast(pa.string()),
        "name": name.take(rows).cast(pa.string()),
    })
