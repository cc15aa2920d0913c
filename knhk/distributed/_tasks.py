"""What the workers of :mod:`knhk.distributed` run: pure functions over files and Arrow pieces.

Nothing here imports Dask, so every step can be run (and tested) in one
process: :func:`read_file` is the map step over one IPC file, :func:`merge_aggregates`
/ :func:`merge_counts` / :func:`merge_trace_results` are the associative
merges, :func:`exact_bucket` and :func:`trace_bucket` are the reduce steps
after a shuffle, and :func:`bucket_of` is the shuffle's hash of the trace id.

Example
-------
>>> import knhk
>>> from knhk.distributed._tasks import bucket_of
>>> batch = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=t, span_id=1) for t in (1, 1, 2)])
>>> b = bucket_of(batch.column("trace_id"), 8)
>>> bool(b[0] == b[1]), bool(((b >= 0) & (b < 8)).all())
(True, True)
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from knhk._ipc_format import file_schema
from knhk.batch import SpanBatch
from knhk.schema import SPAN_SCHEMA
from knhk.stream.windows import WindowConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AnalysisSpec",
    "bucket_of",
    "exact_bucket",
    "file_info",
    "merge_aggregates",
    "merge_counts",
    "merge_small",
    "merge_trace_results",
    "pick",
    "read_file",
    "small",
    "trace_bucket",
    "trace_hash",
    "trace_order",
]

_NS_PER_MS = 1e6
_ERROR = 2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Columns trace analysis needs; the rest of a span is left behind in the shuffle.
_TRACE_COLUMNS = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start_time_ns",
                  "end_time_ns", "status_code", "service")
_SAMPLING_COLUMNS = ("attributes", "resource_attributes", "trace_state", "flags")


@dataclass(frozen=True)
class AnalysisSpec:
    """Everything a worker needs to know about a job (pickled to every task)."""

    what: frozenset[str]
    window: WindowConfig
    group_by: tuple[str, ...]
    quantiles: tuple[float, ...]
    alpha: float
    exact_quantiles: bool
    buckets: int
    registry: str | None = None
    validator_options: dict[str, Any] = field(default_factory=dict)
    tail_sampling: Any = None
    sampled_output: str | None = None

    @property
    def shuffles_traces(self) -> bool:
        return bool(self.what & {"traces", "tail_sampling"})

    @property
    def trace_columns(self) -> tuple[str, ...] | None:
        """Columns shipped in the trace shuffle (None: all of them)."""
        if self.sampled_output is not None:
            return None
        if "tail_sampling" in self.what:
            return _TRACE_COLUMNS + _SAMPLING_COLUMNS
        return _TRACE_COLUMNS


# -- the shuffle's hash ---------------------------------------------------------------


def trace_hash(trace_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash (uint64) of every trace id.

    Both 64-bit halves of the id are folded and multiplied by the golden-ratio
    constant (Fibonacci hashing), so the high bits are well mixed even for ids
    that differ only in a few low or high bytes (small integers, or W3C ids
    whose random part is the low half).
    """
    if isinstance(trace_ids, pa.ChunkedArray):
        trace_ids = trace_ids.combine_chunks()
    n = len(trace_ids)
    if n == 0:
        return np.zeros(0, np.uint64)
    words = np.frombuffer(trace_ids.buffers()[1], dtype=np.uint64,
                          count=(trace_ids.offset + n) * 2)[trace_ids.offset * 2:].reshape(n, 2)
    return (words[:, 0] ^ words[:, 1]) * _GOLDEN


def bucket_of(trace_ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The shuffle bucket (int64 in ``[0, buckets)``) of every trace id.

    Buckets are ranges of :func:`trace_hash` (multiply-shift range reduction
    of its high 32 bits), so listing bucket after bucket, each sorted by
    (hash, trace id), is one order whatever the number of buckets.
    """
    h = trace_hash(trace_ids) >> np.uint64(32)
    return ((h * np.uint64(buckets)) >> np.uint64(32)).astype(np.int64)


def trace_order(table: pa.Table) -> np.ndarray:
    """Row order of ``table`` by (trace hash, trace id), stable: the order of merged results."""
    col = table.column("trace_id")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros(0, np.int64)
    big = np.frombuffer(col.buffers()[1], dtype=">u8",
                        count=(col.offset + n) * 2)[col.offset * 2:].reshape(n, 2)
    return np.lexsort((big[:, 1], big[:, 0], trace_hash(col)))


def _take(table: pa.Table, order: np.ndarray) -> pa.Table:
    """``table.take(order)``, fixed-size binary columns gathered as NumPy byte rows (faster)."""
    cols = []
    for name in table.column_names:
        c = table.column(name)
        if isinstance(c, pa.ChunkedArray):
            c = c.combine_chunks()
        if pa.types.is_fixed_size_binary(c.type) and c.null_count == 0:
            w = c.type.byte_width
            m = np.frombuffer(c.buffers()[1], dtype=np.uint8,
                              count=(c.offset + len(c)) * w)[c.offset * w:].reshape(-1, w)
            cols.append(pa.FixedSizeBinaryArray.from_buffers(
                c.type, len(order), [None, pa.py_buffer(np.ascontiguousarray(m[order]))]))
        else:
            cols.append(c.take(pa.array(order)))
    return pa.Table.from_arrays(cols, schema=table.schema)


def _split(table: pa.Table, bucket: np.ndarray, buckets: int) -> list[pa.Table]:
    """Rows of ``table`` per bucket, each in its original order."""
    order = np.argsort(bucket, kind="stable")
    ends = np.cumsum(np.bincount(bucket, minlength=buckets))
    taken = table.take(pa.array(order))
    starts = ends - np.bincount(bucket, minlength=buckets)
    return [taken.slice(int(a), int(b - a)).combine_chunks()
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _nbytes(table: pa.Table) -> int:
    return int(table.nbytes)


# -- map step: one file ------------------------------------------------------------------


def file_info(path: str) -> dict[str, Any]:
    """What a file declares: its knhk schema version and signal (read from the schema only)."""

    info: dict[str, Any] = {"path": path, "bytes": None, "schema": None, "signal": None,
                            "error": None}
    try:
        info["bytes"] = os.path.getsize(path)
        schema = file_schema(path)
    except (pa.ArrowException, OSError) as exc:
        # read_file names the byte offset of the damage; here it is only noted
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info
    meta = schema.metadata or {}
    info["schema"] = meta.get(b"knhk.schema", b"").decode(errors="replace") or None
    info["signal"] = meta.get(b"knhk.signal", b"").decode(errors="replace") or None
    return info


_VALIDATORS: dict[tuple, Any] = {}


def _validator(spec: AnalysisSpec) -> Any:
    """One compiled validator per worker process and configuration."""
    key = (spec.registry, tuple(sorted((k, repr(v)) for k, v in spec.validator_options.items())))
    v = _VALIDATORS.get(key)
    if v is None:
        from knhk.validation import WeaverValidator
        v = _VALIDATORS[key] = WeaverValidator(spec.registry, **spec.validator_options)
    return v


def read_file(path: str, spec: AnalysisSpec) -> dict[str, Any]:
    """The map step: read one IPC file and compute every partial result the job asks for.

    Returns a dict: ``spans`` / ``metric_points`` read, ``aggregates`` (mergeable
    per (window, key) partials, or ``exact_pieces`` per bucket when quantiles are
    exact), ``validation`` (finding counts) and ``trace_pieces`` (this file's
    spans split by trace-id bucket, for the shuffle) with their ``piece_bytes``.
    """
    from knhk.replay import read_batches
    from knhk.stream.keys import KeyEncoder

    out: dict[str, Any] = {"path": path, "spans": 0, "metric_points": 0, "invalid_spans": 0}
    enc = KeyEncoder(spec.group_by) if "aggregates" in spec.what else None
    chunks: list[tuple[np.ndarray, ...]] = []
    val = _empty_counts() if "validation" in spec.what else None
    columns = spec.trace_columns
    trace_parts: list[pa.RecordBatch] = []
    for batch in read_batches(path):
        if not isinstance(batch, SpanBatch):
            out["metric_points"] += batch.num_rows
            continue
        n = batch.num_rows
        if n == 0:
            continue
        out["spans"] += n
        if enc is not None:
            chunks.append(_window_rows(batch, enc, spec.window, out))
        if val is not None:
            _add_report(val, _validator(spec).validate_batch(batch), n)
        if spec.shuffles_traces:
            rb = batch.record_batch
            trace_parts.append(rb if columns is None else rb.select(list(columns)))
    if enc is not None:
        if spec.exact_quantiles:
            out["exact_pieces"] = _exact_pieces(chunks, enc, spec)
            out["exact_bytes"] = sum(p[k].nbytes for p in out["exact_pieces"]
                                     for k in ("group", "duration", "error"))
        else:
            out["aggregates"] = _sketch_partials(chunks, enc, spec)
    if val is not None:
        out["validation"] = val
    if spec.shuffles_traces:
        if trace_parts:
            table = pa.Table.from_batches(trace_parts)
            pieces = _split(table, bucket_of(table.column("trace_id"), spec.buckets),
                            spec.buckets)
        else:
            schema = SPAN_SCHEMA if columns is None else pa.schema(
                [SPAN_SCHEMA.field(c) for c in columns])
            pieces = [schema.empty_table() for _ in range(spec.buckets)]
        out["trace_pieces"] = pieces
        out["piece_bytes"] = [_nbytes(p) for p in pieces]
    return out


def pick(result: dict[str, Any], key: str, index: int | None = None) -> Any:
    """One part of a :func:`read_file` result (run where the result lives, so only it moves)."""
    part = result.get(key)
    return part if index is None else part[index]


_SMALL = ("spans", "metric_points", "invalid_spans", "aggregates", "validation", "piece_bytes",
          "exact_bytes")


def small(result: dict[str, Any]) -> dict[str, Any]:
    """The mergeable parts of a :func:`read_file` result (one task instead of one per part)."""
    if "files" in result:  # small already (a merge's output)
        return result
    out = {k: result[k] for k in _SMALL if k in result}
    if "piece_bytes" in out:
        out["piece_bytes"] = sum(out["piece_bytes"])
    out["files"] = 1
    return out


def merge_small(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two :func:`small` results: counts add, aggregates and validation counts merge."""
    a, b = small(a), small(b)
    out = {}
    for k in a.keys() | b.keys():
        if k not in a or k not in b:
            out[k] = a[k] if k in a else b[k]
        elif k == "aggregates":
            out[k] = merge_aggregates(a[k], b[k])
        elif k == "validation":
            out[k] = merge_counts(a[k], b[k])
        else:
            out[k] = a[k] + b[k]
    return out


def _window_rows(batch: SpanBatch, enc: Any, window: WindowConfig,
                 out: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """(window start, group id, duration ns, error) of every (span, window) pair."""
    start = batch.column("start_time_ns").to_numpy()
    dur = batch.column("end_time_ns").to_numpy() - start
    valid = dur >= 0
    n_invalid = int(valid.size - np.count_nonzero(valid))
    out["invalid_spans"] += n_invalid
    gid = enc.encode(batch)
    err = batch.column("status_code").to_numpy() == _ERROR
    idx = np.flatnonzero(valid) if n_invalid else np.arange(valid.size)
    rows, wstart = window.assign(start[idx])
    r = idx[rows]
    return wstart, gid[r], dur[r], err[r]


def _grouped(chunks: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...] | None:
    if not chunks:
        return None
    ws, g, v, e = (np.concatenate([c[i] for c in chunks]) for i in range(4))
    if ws.size == 0:
        return None
    order = np.lexsort((g, ws))
    ws, g, v, e = ws[order], g[order], v[order], e[order]
    brk = np.flatnonzero((ws[1:] != ws[:-1]) | (g[1:] != g[:-1])) + 1
    bounds = np.concatenate(([0], brk, [ws.size]))
    return ws, g, v, e, bounds


def _sketch_partials(chunks: list[tuple[np.ndarray, ...]], enc: Any,
                     spec: AnalysisSpec) -> dict[tuple, list[Any]]:
    """``{(window start, key values): [count, sum_ns, min_ns, max_ns, errors, DDSketch]}``."""
    from knhk.stream.sketch import DDSketch

    grouped = _grouped(chunks)
    if grouped is None:
        return {}
    ws, g, v, e, bounds = grouped
    lo_hi = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    firsts = bounds[:-1]
    counts = np.diff(bounds)
    sums = np.add.reduceat(v, firsts)
    mins = np.minimum.reduceat(v, firsts)
    maxs = np.maximum.reduceat(v, firsts)
    errs = np.add.reduceat(e.astype(np.int64), firsts)
    # the same float64 values the stream processor's sketch mode adds, so buckets agree
    ms = v.astype(np.float64) / _NS_PER_MS
    out: dict[tuple, list[Any]] = {}
    for i, (lo, hi) in enumerate(lo_hi):
        sketch = DDSketch(spec.alpha)
        sketch.add(ms[lo:hi])
        out[(int(ws[lo]), enc.key_values(int(g[lo])))] = [
            int(counts[i]), int(sums[i]), int(mins[i]), int(maxs[i]), int(errs[i]), sketch]
    return out


Partials = dict[tuple, list[Any]]


def merge_aggregates(a: Partials, b: Partials) -> Partials:
    """Merge two partial aggregates (exactly: sketches merge bucket by bucket)."""
    if len(a) < len(b):
        a, b = b, a
    out = dict(a)
    for key, right in b.items():
        left = out.get(key)
        if left is None:
            out[key] = right
            continue
        sketch = left[5].copy()
        sketch.merge(right[5])
        out[key] = [left[0] + right[0], left[1] + right[1], min(left[2], right[2]),
                    max(left[3], right[3]), left[4] + right[4], sketch]
    return out


def _key_hash(wstart: int, key: tuple) -> int:
    # crc32 of the repr: stable across processes, unlike hash() of a str
    return zlib.crc32(repr((wstart, key)).encode())


def _exact_pieces(chunks: list[tuple[np.ndarray, ...]], enc: Any,
                  spec: AnalysisSpec) -> list[dict[str, Any]]:
    """Raw (window, key, duration, error) rows split by a hash of (window, key)."""
    grouped = _grouped(chunks)
    pieces: list[dict[str, Any]] = [
        {"keys": [], "group": [], "duration": [], "error": []} for _ in range(spec.buckets)]
    if grouped is not None:
        ws, g, v, e, bounds = grouped
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            key = (int(ws[lo]), enc.key_values(int(g[lo])))
            p = pieces[_key_hash(*key) % spec.buckets]
            p["group"].append(np.full(hi - lo, len(p["keys"]), np.int64))
            p["keys"].append(key)
            p["duration"].append(v[lo:hi])
            p["error"].append(e[lo:hi])
    for p in pieces:
        for name, dtype in (("group", np.int64), ("duration", np.int64), ("error", bool)):
            p[name] = np.concatenate(p[name]) if p[name] else np.zeros(0, dtype)
    return pieces


def exact_bucket(spec: AnalysisSpec, *pieces: dict[str, Any]) -> list[tuple]:
    """Reduce after the (window, key) shuffle: exact statistics of every group of one bucket.

    Rows ``(window start, key values, count, sum_ns, min_ns, max_ns, errors,
    quantiles...)`` with quantiles in milliseconds as ``np.quantile`` computes them.
    """
    from knhk.stream.aggregate import grouped_stats

    index: dict[tuple, int] = {}
    groups, durs, errs = [], [], []
    for p in pieces:
        remap = np.array([index.setdefault(k, len(index)) for k in p["keys"]], np.int64)
        if remap.size:
            groups.append(remap[p["group"]])
            durs.append(p["duration"])
            errs.append(p["error"])
    if not index:
        return []
    gid = np.concatenate(groups)
    dur = np.concatenate(durs)
    err = np.concatenate(errs)
    stats = grouped_stats(gid, dur, len(index), spec.quantiles, scale=_NS_PER_MS)
    ns_sum = np.zeros(len(index), np.int64)
    np.add.at(ns_sum, gid, dur)
    ns_min = np.full(len(index), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(ns_min, gid, dur)
    ns_max = np.full(len(index), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(ns_max, gid, dur)
    n_err = np.bincount(gid, weights=err, minlength=len(index)).astype(np.int64)
    keys = list(index)
    rows = []
    for j, g in enumerate(stats.groups.tolist()):
        rows.append((keys[g][0], keys[g][1], int(stats.count[j]), int(ns_sum[g]), int(ns_min[g]),
                     int(ns_max[g]), int(n_err[g]),
                     tuple(float(q[j]) for q in stats.quantiles)))
    return rows


# -- validation counts -------------------------------------------------------------------


def _empty_counts() -> dict[str, Any]:
    return {"spans": 0, "rows_invalid": 0, "findings": {}, "levels": {}}


def _add_report(acc: dict[str, Any], report: Any, n: int) -> None:
    acc["spans"] += n
    acc["rows_invalid"] += report.num_invalid
    for k, v in report.counts.items():
        acc["findings"][k] = acc["findings"].get(k, 0) + v
    for k, v in report.level_counts().items():
        acc["levels"][k] = acc["levels"].get(k, 0) + v


def merge_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts of counts by adding them."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = merge_counts(out.get(k, {}), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


# -- reduce step after the trace shuffle -------------------------------------------------------


def _filler(f: pa.Field, n: int) -> pa.Array:
    """A column of ``n`` empty values of field ``f`` (for the columns the shuffle left behind)."""
    if f.nullable:
        return pa.nulls(n, f.type)
    t = f.type
    if pa.types.is_list(t):
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)),
                                        pa.array([], t.value_type), type=t)
    if pa.types.is_integer(t):
        return pa.array(np.zeros(n, t.to_pandas_dtype()), t)
    raise TypeError(f"no empty value for non-nullable column {f.name!r} of type {t}")


def _full_batch(pieces: tuple[pa.Table, ...]) -> SpanBatch:
    tables = [p for p in pieces if p.num_rows]
    if not tables:
        return SpanBatch.empty()
    table = pa.concat_tables(tables).combine_chunks()
    n = table.num_rows
    have = set(table.column_names)
    cols = [table.column(f.name) if f.name in have else _filler(f, n) for f in SPAN_SCHEMA]
    return SpanBatch.concat(pa.Table.from_arrays(cols, schema=SPAN_SCHEMA).to_batches())


def trace_bucket(spec: AnalysisSpec, bucket: int, *pieces: pa.Table) -> dict[str, Any]:
    """Reduce after the trace-id shuffle: trace analysis and tail sampling of whole traces.

    ``pieces`` are this bucket's rows from every file, in file order, so spans
    keep the order a single process reading the files one after the other sees.
    """
    from knhk.tracing import assemble

    batch = _full_batch(pieces)
    out: dict[str, Any] = {"bucket": bucket, "spans": batch.num_rows}
    if "traces" in spec.what:
        ts = assemble(batch)
        out["anomalies"] = ts.anomalies()
        out["traces"] = len(ts)
        cp = ts.critical_paths()
        # sorted here, in parallel: the client then only concatenates the buckets
        out["critical_paths"] = _take(cp, trace_order(cp))
        spans = ts.spans
        out["breakdown"] = _breakdown_partial(ts, spans)
        out["edges"] = _edges(ts, spans)
    if "tail_sampling" in spec.what:
        out["tail_sampling"] = _tail_sample(spec, bucket, batch)
    return out


def _breakdown_partial(ts: Any, spans: SpanBatch) -> dict[str, Any]:
    lb = ts.latency_breakdown()
    rows = {}
    for r in lb.select(["service", "operation", "count", "total_time_ns", "self_time_ns",
                        "min_ns", "max_ns"]).to_pylist():
        rows[(r["service"], r["operation"])] = [r["count"], r["total_time_ns"],
                                                r["self_time_ns"], r["min_ns"], r["max_ns"]]
    start = spans.column("start_time_ns").to_numpy()
    end = np.maximum(spans.column("end_time_ns").to_numpy(), start)
    first = ts.trace_offsets[:-1]
    total = int((np.maximum.reduceat(end, first) - np.minimum.reduceat(start, first)).sum()) \
        if len(first) else 0
    return {"rows": rows, "trace_total_ns": total}


def _edges(ts: Any, spans: SpanBatch) -> dict[tuple[str, str], list[Any]]:
    """Service call graph edges with every call's latency (for an exact merged p99)."""
    svc = spans.column("service")
    if isinstance(svc, pa.ChunkedArray):
        svc = svc.combine_chunks()
    names = np.asarray(svc.dictionary.to_pylist(), dtype=object)
    code = svc.indices.to_numpy()
    status = spans.column("status_code").to_numpy()
    start = spans.column("start_time_ns").to_numpy()
    end = np.maximum(spans.column("end_time_ns").to_numpy(), start)
    child = np.flatnonzero(ts.parent >= 0)
    par = ts.parent[child]
    client, server = names[code[par]], names[code[child]]
    keep = client != server
    child, par, client, server = child[keep], par[keep], client[keep], server[keep]
    lat = end[child] - start[child]
    err = (status[child] == _ERROR) | (status[par] == _ERROR)
    out: dict[tuple[str, str], list[Any]] = {}
    if not child.size:
        return out
    pair = np.array([f"{c}\x00{s}" for c, s in zip(client, server, strict=True)], dtype=object)
    uniq, inv = np.unique(pair, return_inverse=True)
    for i, p in enumerate(uniq.tolist()):
        sel = inv == i
        c, s = p.split("\x00", 1)
        out[(c, s)] = [int(sel.sum()), int(err[sel].sum()), np.sort(lat[sel])]
    return out


def _tail_sample(spec: AnalysisSpec, bucket: int, batch: SpanBatch) -> dict[str, Any]:
    """Decide every trace of the bucket whole, as a sampler that saw it all before deciding."""
    from dataclasses import replace

    from knhk.tail_sampling import TailSampler

    res = {"spans": batch.num_rows, "spans_sampled": 0, "traces": 0, "traces_sampled": 0,
           "files": []}
    if batch.num_rows == 0:
        return res
    tid = batch.column("trace_id")
    res["traces"] = n_traces = len(tid.unique())
    # room for every trace, a clock that never times one out: flush decides each on all
    # its spans and records the deciding policy, as the pipeline stage does
    cfg = replace(spec.tail_sampling, num_traces=max(spec.tail_sampling.num_traces, n_traces),
                  drop_pending_traces_on_shutdown=False)
    sampler = TailSampler(cfg, clock=lambda: 0.0)
    parts = [sampler.process(batch).batch, sampler.flush()]
    kept = SpanBatch.concat([p for p in parts if p is not None and p.num_rows])
    res["spans_sampled"] = kept.num_rows
    res["traces_sampled"] = len(kept.column("trace_id").unique()) if kept.num_rows else 0
    if spec.sampled_output is not None and kept.num_rows:
        from knhk.exporters.base import ExportResult
        from knhk.exporters.ipc import IpcExporter

        recorder = IpcExporter(spec.sampled_output, prefix=f"sampled-b{bucket:04d}")
        try:
            if recorder.export(kept) is not ExportResult.SUCCESS:
                raise OSError(f"could not write the sampled spans of bucket {bucket} to "
                              f"{spec.sampled_output}")
        finally:
            recorder.shutdown()
        res["files"] = list(recorder.files)
    return res


def merge_trace_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge every bucket's trace results (client side: small, except the critical paths)."""
    out: dict[str, Any] = {"spans": sum(r["spans"] for r in results)}
    if results and "critical_paths" in results[0]:
        anomalies: dict[str, int] = {}
        breakdown: dict[tuple, list[Any]] = {}
        edges: dict[tuple, list[Any]] = {}
        trace_total = 0
        for r in results:
            anomalies = merge_counts(anomalies, r["anomalies"])
            trace_total += r["breakdown"]["trace_total_ns"]
            for k, v in r["breakdown"]["rows"].items():
                old = breakdown.get(k)
                breakdown[k] = v if old is None else [
                    old[0] + v[0], old[1] + v[1], old[2] + v[2], min(old[3], v[3]),
                    max(old[4], v[4])]
            for k, v in r["edges"].items():
                old = edges.get(k)
                edges[k] = v if old is None else [old[0] + v[0], old[1] + v[1],
                                                  np.concatenate([old[2], v[2]])]
        out["traces"] = sum(r["traces"] for r in results)
        out["anomalies"] = anomalies
        # buckets are hash ranges, each sorted: in bucket order they are sorted as a whole
        ordered = sorted(results, key=lambda r: r["bucket"])
        out["critical_paths"] = pa.concat_tables(
            [r["critical_paths"] for r in ordered]).combine_chunks()
        out["latency_breakdown"] = _breakdown_table(breakdown, trace_total)
        out["service_graph"] = _graph_table(edges)
    if results and "tail_sampling" in results[0]:
        ts: dict[str, Any] = {}
        for r in results:
            ts = merge_counts(ts, {k: v for k, v in r["tail_sampling"].items() if k != "files"})
        ts["files"] = sorted(f for r in results for f in r["tail_sampling"]["files"])
        out["tail_sampling"] = ts
    return out


def _breakdown_table(rows: dict[tuple, list[Any]], trace_total: int) -> pa.Table:
    import pyarrow.compute as pc

    keys = sorted(rows, key=lambda k: (str(k[0]), str(k[1])))
    v = [rows[k] for k in keys]
    count = np.array([r[0] for r in v], np.int64)
    total = np.array([r[1] for r in v], np.int64)
    self_t = np.array([r[2] for r in v], np.int64)
    percent = 100.0 * self_t / trace_total if trace_total > 0 else np.zeros(len(v))
    out = pa.table({
        "service": pa.array([k[0] for k in keys], pa.string()),
        "operation": pa.array([k[1] for k in keys], pa.string()),
        "count": pa.array(count, pa.int64()), "total_time_ns": pa.array(total, pa.int64()),
        "self_time_ns": pa.array(self_t, pa.int64()),
        "min_ns": pa.array([r[3] for r in v], pa.int64()),
        "avg_ns": pa.array(total / np.maximum(count, 1), pa.float64()),
        "max_ns": pa.array([r[4] for r in v], pa.int64()),
        "percent": pa.array(percent, pa.float64()),
    })
    order = pc.sort_indices(out, [("self_time_ns", "descending"), ("service", "ascending"),
                                  ("operation", "ascending")])
    return out.take(order)


def _graph_table(edges: dict[tuple, list[Any]]) -> pa.Table:
    keys = sorted(edges)
    calls = np.array([edges[k][0] for k in keys], np.int64)
    total = np.array([int(edges[k][2].sum()) for k in keys], np.int64)
    p99 = []
    for k in keys:
        lat = np.sort(edges[k][2])
        p99.append(int(lat[math.ceil(0.99 * lat.size) - 1]))
    return pa.table({
        "client": pa.array([k[0] for k in keys], pa.string()),
        "server": pa.array([k[1] for k in keys], pa.string()),
        "calls": pa.array(calls, pa.int64()),
        "errors": pa.array([edges[k][1] for k in keys], pa.int64()),
        "latency_total_ns": pa.array(total, pa.int64()),
        "latency_avg_ns": pa.array(total / np.maximum(calls, 1), pa.float64()),
        "latency_p99_ns": pa.array(p99, pa.int64()),
    })
