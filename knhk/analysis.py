"""The analyst's side: a recording opened as a dataset of span batches.

:func:`open_dataset` (``knhk.open``) reads Arrow IPC recordings (a file, a
directory, a glob or a list of those, as :func:`knhk.replay.read_batches`
takes them) into a :class:`Dataset`. A dataset is the Arrow data itself —
``to_arrow()``, ``to_pandas()``, ``to_polars()`` and the Arrow PyCapsule
stream protocol (``__arrow_c_stream__``), so Polars, DuckDB and pandas read it
without a copy — and it runs the same engine as the pipeline on it:
validation against a Weaver registry, windowed aggregates, trace assembly,
critical paths, the service graph, the latency breakdown and samplers. In
Jupyter it shows itself as a summary card. Plots live in :mod:`knhk.plotting`
(and as ``Dataset.plot_*`` methods).

The batches are read eagerly when the dataset is opened (every batch is
validated and checksummed as it is read, so a damaged file fails at
``open``, not half way through an analysis); analyses that need the spans of
every batch at once concatenate them once and cache the result.

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters.ipc import IpcExporter
>>> from knhk.workload import generate, WorkloadConfig
>>> recorder = IpcExporter(tempfile.mkdtemp())
>>> _ = recorder.export(generate(2_000, WorkloadConfig(seed=1)))
>>> recorder.shutdown()
>>> ds = open_dataset(recorder.directory)
>>> s = ds.summary()
>>> s["spans"], s["traces"] > 0, sorted(s["top_operations"].column_names)
(2000, True, ['count', 'name', 'p99_ms', 'service'])
>>> ds.sql("SELECT count(*) AS n FROM spans").column("n").to_pylist()
[2000]
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk.batch import MetricBatch, SpanBatch
from knhk.schema import SPAN_SCHEMA

__all__ = ["Dataset", "open_dataset"]

logger = logging.getLogger(__name__)

_ERROR = 2
_TOP_OPERATIONS = 10


def open_dataset(source: str | os.PathLike | Iterable[str | os.PathLike], *,
                 verify: bool = True) -> Dataset:
    """Open Arrow IPC recordings as a :class:`Dataset` (exported as ``knhk.open``).

    Parameters
    ----------
    source : path, directory, glob string, or a list of those
        Files written by :class:`~knhk.exporters.ipc.IpcExporter` or
        ``knhk generate``; a directory or glob expands to its ``.arrow`` /
        ``.arrows`` files in sorted (time) order.
    verify : bool
        Check each batch's checksum while reading.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        When a path does not exist or a glob matches nothing (the message
        names it).
    knhk.CorruptFileError
        When a file is damaged (names the file and the byte offset).

    Examples
    --------
    >>> open_dataset("/nonexistent/*.arrow")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no files match '/nonexistent/*.arrow'
    """
    from knhk.replay import _expand, read_batches

    paths = _expand(source)
    spans: list[SpanBatch] = []
    metrics: list[MetricBatch] = []
    for batch in read_batches(paths, verify=verify):
        if isinstance(batch, SpanBatch):
            if batch.num_rows:
                spans.append(batch)
        else:
            metrics.append(batch)
    logger.debug("opened %d files: %d span batches, %d metric batches",
                 len(paths), len(spans), len(metrics))
    return Dataset(spans, paths=paths, metrics=metrics)


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
    return new datasets.

    Attributes
    ----------
    batches : list of SpanBatch
        The span batches, in file order.
    paths : list of str
        The files read (empty for a dataset built in memory).
    metrics : list of MetricBatch
        Metric batches found in the files (kept aside; the analyses are of spans).
    """

    def __init__(self, batches: Sequence[SpanBatch], *, paths: Sequence[str] = (),
                 metrics: Sequence[MetricBatch] = ()) -> None:
        for i, b in enumerate(batches):
            if not isinstance(b, SpanBatch):
                raise TypeError(f"batches[{i}] is {type(b).__name__}, expected a SpanBatch")
        self.batches = list(batches)
        self.paths = list(paths)
        self.metrics = list(metrics)

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

    # -- Arrow faces ----------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return sum(b.num_rows for b in self.batches)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"Dataset({self.num_rows:,} spans in {len(self.batches)} batches from "
                f"{len(self.paths)} files)")

    def to_arrow(self) -> pa.Table:
        """All spans as one ``pyarrow.Table`` in ``SPAN_SCHEMA`` (one chunk per batch)."""
        return pa.Table.from_batches([b.record_batch for b in self.batches], schema=SPAN_SCHEMA)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """The Arrow PyCapsule stream of the batches (no copy)."""
        return self.to_arrow().__arrow_c_stream__(requested_schema)

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
        """The rows where ``mask`` (bool, one per span in row order) is true."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_rows,):
            raise ValueError(f"the mask has shape {mask.shape}; the dataset has "
                             f"{self.num_rows} spans")
        out, offset = [], 0
        for b in self.batches:
            m = mask[offset:offset + b.num_rows]
            offset += b.num_rows
            if m.any():
                out.append(b if m.all() else b.filter(m))
        return Dataset(out, paths=self.paths, metrics=self.metrics)

    def sample(self, sampler: Any) -> Dataset:
        """The spans a sampler keeps, through the sampler's own ``sample_mask``.

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
        BatchValidationReport
            Row ``i`` of the report is span ``i`` of the dataset.
        """
        from knhk.validation import WeaverValidator

        if isinstance(registry, WeaverValidator):
            if options:
                raise TypeError("options apply when validate() builds the validator; "
                                "pass a registry path, not a WeaverValidator, to use them")
            validator = registry
        else:
            validator = WeaverValidator(registry, **options)
        return validator.validate_batch(self.batch)

    def windows(self, window: Any = 60.0, **options: Any) -> pa.Table:
        """Windowed aggregates, as the pipeline's :class:`~knhk.StreamProcessor` computes them.

        Spans are fed in start-time order, so no span of a recording is late.

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
        proc = StreamProcessor(window, **options)
        batch = self.batch
        if batch.num_rows:
            order = np.argsort(batch.column("start_time_ns").to_numpy(), kind="stable")
            ordered = batch.take(pa.array(order))
            step = 65536
            tables = []
            for off in range(0, ordered.num_rows, step):
                proc.process_batch(ordered.slice(off, step))
                tables.append(proc.get_results(as_table=True))
            proc.flush()
            tables.append(proc.get_results(as_table=True))
            return pa.concat_tables(tables)
        proc.flush()
        return proc.get_results(as_table=True)

    @cached_property
    def _traces(self) -> Any:
        from knhk.tracing import assemble

        return assemble(self.batch)

    def traces(self) -> Any:
        """Every trace assembled (a :class:`knhk.tracing.TraceSet`, cached)."""
        return self._traces

    def trace(self, trace_id: bytes | int | str) -> Any:
        """One trace (a :class:`~knhk.Trace`); ``trace_id`` as bytes, 32 hex digits or int.

        Raises
        ------
        KeyError
            When the dataset has no span of that trace.
        """
        from knhk.tracing import assemble

        tid = _trace_id_bytes(trace_id)
        batch = self.batch
        sub = batch.filter(pc.equal(batch.column("trace_id"), pa.scalar(tid, pa.binary(16))))
        if not sub.num_rows:
            raise KeyError(f"no span of trace {tid.hex()} in the dataset")
        return assemble(sub)[0]

    def critical_path(self, trace_id: bytes | int | str) -> Any:
        """The critical path of one trace (a :class:`~knhk.CriticalPath`, latest first)."""
        return self.trace(trace_id).critical_path()

    def service_graph(self) -> pa.Table:
        """Service-to-service calls: ``client``, ``server``, ``calls``, ``errors``, latencies."""
        return self._traces.service_call_graph()

    def latency_breakdown(self) -> pa.Table:
        """Per (service, operation) durations and self times, largest self time first."""
        return self._traces.latency_breakdown()

    def slowest_traces(self, n: int = 10) -> pa.Table:
        """The ``n`` longest traces (first start to last end).

        Returns
        -------
        pyarrow.Table
            ``trace_id`` (hex), ``duration_ms``, ``spans``, ``errors``, and the
            ``service`` and ``name`` of the trace's earliest root.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        ts = self._traces
        if not len(ts):
            return pa.table({"trace_id": pa.array([], pa.string()),
                             "duration_ms": pa.array([], pa.float64()),
                             "spans": pa.array([], pa.int64()),
                             "errors": pa.array([], pa.int64()),
                             "service": pa.array([], pa.string()),
                             "name": pa.array([], pa.string())})
        offsets = ts.trace_offsets
        dur = ts._trace_durations()
        top = np.argsort(-dur, kind="stable")[:n]
        spans = ts.spans
        status = spans.column("status_code").to_numpy()
        start = spans.column("start_time_ns").to_numpy()
        errors = np.add.reduceat((status == _ERROR).astype(np.int64), offsets[:-1])
        ids = ts.trace_ids()
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

    def sql(self, query: str, **tables: Any) -> pa.Table:
        """Run SQL over the spans with DuckDB; the dataset is the table ``spans``.

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
