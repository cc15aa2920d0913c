"""knhk's analysis over many Arrow IPC files on a Dask cluster.

:func:`analyze` reads recorded span files (``knhk generate --out``,
:class:`~knhk.exporters.ipc.IpcExporter`) on the workers of a Dask cluster and
returns what single-process knhk computes over the same files:

* ``"aggregates"``: windowed count, sum, avg, min, max, error rate, throughput
  and quantiles of the span duration per key (the columns of
  :class:`~knhk.stream.StreamProcessor`). Each file is aggregated on its worker
  and the partials merged: counts, sums, minima, maxima and errors exactly,
  quantiles through the mergeable :class:`~knhk.stream.DDSketch` (within its
  relative accuracy ``alpha``), or, with ``exact_quantiles=True``, exactly
  (``np.quantile``'s numbers) after a shuffle of the raw durations by a hash
  of (window, key).
* ``"validation"``: counts of semantic-convention findings by id and level
  (:meth:`~knhk.validation.WeaverValidator.validate_batch` per batch, merged).
* ``"traces"``: critical paths, service call graph and latency breakdown
  (:mod:`knhk.tracing`), computed after a shuffle of the spans by a hash of
  the trace id, so every trace is whole on one worker.
* ``"tail_sampling"``: :class:`~knhk.tail_sampling.TailSampler` decisions over
  whole traces (same shuffle), counted and optionally written to IPC files.

The cluster is reached with :func:`connect` (``"local:N"`` starts a
``LocalCluster`` of N one-thread worker processes; ``"tcp://host:8786"`` joins
a running scheduler). Dask is an optional dependency (``pip install
'knhk[distributed]'``); it is imported when first needed.

Windowed aggregates here are batch aggregates: every span counts in its
window, as a :class:`~knhk.stream.StreamProcessor` with an allowed lateness
longer than the recording would count it (files have no arrival order to
make a span late). Session and processing-time windows need arrival order and
are refused.

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters.ipc import IpcExporter
>>> from knhk.workload import generate, WorkloadConfig
>>> tmp = tempfile.TemporaryDirectory()
>>> recorder = IpcExporter(tmp.name)
>>> _ = recorder.export(generate(2_000, WorkloadConfig(seed=1)))
>>> recorder.shutdown()
>>> from knhk.distributed import analyze_local
>>> result = analyze_local(recorder.files, what=("aggregates", "traces"))
>>> result.spans, int(sum(result.aggregates.column("count").to_pylist()))
(2000, 2000)
>>> tmp.cleanup()

``analyze_local`` runs the very same tasks in this process, without Dask;
``analyze(files, connect("local:2"))`` runs them on a cluster.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from knhk.distributed import _tasks
from knhk.errors import KnhkError, SchemaError
from knhk.schema import SPAN_SCHEMA
from knhk.stream.processor import quantile_name
from knhk.stream.windows import WindowConfig

logger = logging.getLogger(__name__)

__all__ = ["BATCH_LATENESS", "AnalysisResult", "DistributedJobError", "SchedulerUnreachableError",
           "analyze", "analyze_local", "connect", "shuffle_bucket", "trace_hash", "trace_order",
           "tune_workers"]

WHAT = frozenset({"aggregates", "validation", "traces", "tail_sampling"})
#: Allowed lateness that makes a StreamProcessor count every span of a recording.
BATCH_LATENESS = timedelta(days=3650)

shuffle_bucket = _tasks.bucket_of
trace_hash = _tasks.trace_hash
trace_order = _tasks.trace_order


class SchedulerUnreachableError(KnhkError, ConnectionError):
    """The Dask scheduler could not be reached (names the address and the timeout)."""


class DistributedJobError(KnhkError, RuntimeError):
    """A distributed job failed as a whole (no partial result is returned)."""


_INSTALL_HINT = ("knhk.distributed needs Dask: pip install 'knhk[distributed]' "
                 "(or pip install 'dask[distributed]')")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT}; importing it failed: {exc}") from exc
    return distributed


# -- connecting -----------------------------------------------------------------------


def connect(address: Any, *, timeout: float = 10.0) -> Any:
    """A ``distributed.Client`` for ``address``.

    Parameters
    ----------
    address : str or distributed.Client
        ``"local:N"`` starts a ``LocalCluster`` of N worker processes with one
        thread each (closed with the client); ``"tcp://host:port"`` (or
        ``tls://``) connects to a running scheduler. A client is returned as is.
    timeout : float
        Seconds to wait for the scheduler.

    Returns
    -------
    distributed.Client

    Raises
    ------
    ValueError
        If ``address`` is neither form.
    SchedulerUnreachableError
        If the scheduler does not answer within ``timeout``.
    ImportError
        If Dask is not installed.

    Examples
    --------
    >>> connect("local:0")
    Traceback (most recent call last):
    ...
    ValueError: 'local:N' needs N >= 1 worker processes, got 'local:0'
    """
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(address, str) and address.startswith("local:"):
        text = address[len("local:"):]
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"'local:N' needs N >= 1 worker processes, got {address!r}")
        distributed = _distributed()
        import dask

        from knhk.distributed._plugin import AllocatorPlugin

        # The scheduler's HTTP server (health, metrics) always starts: port 0 keeps
        # clusters from colliding on the dashboard's 8787. The worker's sampling
        # profiler takes the GIL every 10 ms from the one thread that computes.
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            client = distributed.Client(n_workers=int(text), threads_per_worker=1,
                                        processes=True, dashboard_address=":0",
                                        scheduler_kwargs={"dashboard": False},
                                        timeout=timeout)
        client.register_plugin(AllocatorPlugin())
        return client
    if isinstance(address, str):
        if not address.startswith(("tcp://", "tls://")) or len(address) <= len("tcp://"):
            raise ValueError(f"a Dask address is 'local:N' or 'tcp://host:port', got {address!r}")
        distributed = _distributed()
        try:
            return distributed.Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachableError(
                f"cannot reach the Dask scheduler at {address} within {timeout:g} s: "
                f"{exc}") from exc
    distributed = _distributed()
    if isinstance(address, distributed.Client):
        return address
    raise ValueError(f"a Dask address is 'local:N', 'tcp://host:port' or a distributed.Client, "
                     f"got {type(address).__name__}")


def tune_workers(client: Any) -> None:
    """Raise glibc's malloc thresholds in every worker of ``client``'s cluster, now and later.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
    makes knhk's tasks about 60 % slower there than in a plain process (see
    :mod:`knhk.distributed._plugin`). :func:`connect` does this for the
    clusters it starts; call it once for a cluster started elsewhere (or
    start its workers with ``MALLOC_TRIM_THRESHOLD_`` unset).

    Parameters
    ----------
    client : distributed.Client
    """
    from knhk.distributed._plugin import AllocatorPlugin

    client.register_plugin(AllocatorPlugin())


# -- the result ---------------------------------------------------------------------------


@dataclass
class AnalysisResult:
    """What :func:`analyze` computed; parts not asked for are None.

    Attributes
    ----------
    files, spans, metric_points, invalid_spans : int
        Files read; spans and metric points in them; spans that end before
        they start (left out of the aggregates, as the stream processor does).
    aggregates : pyarrow.Table or None
        One row per (window, key), sorted by ``window_start`` then the keys;
        the columns of :meth:`StreamProcessor.get_results(as_table=True)
        <knhk.stream.StreamProcessor.get_results>`.
    validation : dict or None
        ``spans``, ``rows_invalid``, ``findings`` ({finding id: count}) and
        ``levels`` ({level: count}).
    critical_paths, service_graph, latency_breakdown : pyarrow.Table or None
        As :mod:`knhk.tracing` computes them over all spans. Critical paths
        come in :func:`trace_order` (by :func:`trace_hash`, then trace id;
        each trace's sections in their order), which needs no sort on the
        client and does not depend on the number of buckets.
    trace_anomalies : dict or None
        Duplicates, orphans, cycles and negative durations assembly repaired.
    tail_sampling : dict or None
        ``spans``, ``spans_sampled``, ``traces``, ``traces_sampled`` and the
        ``files`` written (with ``sampled_output``).
    shuffle_bytes : int
        Bytes the shuffles move: the spans' Arrow columns in the trace-id
        shuffle, and with ``exact_quantiles`` the (group, duration, error)
        rows (17 bytes each); 0 without a shuffle. Moved between machines is
        the share of it whose bucket runs elsewhere, (N - 1) / N on N workers.
    elapsed_s : float
    """

    files: int = 0
    spans: int = 0
    metric_points: int = 0
    invalid_spans: int = 0
    aggregates: pa.Table | None = None
    validation: dict[str, Any] | None = None
    critical_paths: pa.Table | None = None
    service_graph: pa.Table | None = None
    latency_breakdown: pa.Table | None = None
    trace_anomalies: dict[str, int] | None = None
    traces: int | None = None
    tail_sampling: dict[str, Any] | None = None
    shuffle_bytes: int = 0
    buckets: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shuffle_bytes_per_span(self) -> float:
        return self.shuffle_bytes / self.spans if self.spans else 0.0

    def summary(self, rows: int = 10) -> str:
        """A short plain-text report (what ``knhk replay --dask`` prints).

        Parameters
        ----------
        rows : int
            Rows shown of each table (the busiest aggregates, the slowest
            operations, the busiest service-graph edges).
        """
        rate = self.spans / self.elapsed_s if self.elapsed_s else 0.0
        out = [f"{self.files} files, {self.spans:,} spans, {self.metric_points:,} metric points "
               f"in {self.elapsed_s:.2f} s ({rate:,.0f} spans/s)"]
        if self.invalid_spans:
            out.append(f"{self.invalid_spans:,} spans end before they start (not aggregated)")
        if self.shuffle_bytes:
            out.append(f"trace-id shuffle: {self.buckets} buckets, {self.shuffle_bytes:,} bytes "
                       f"({self.shuffle_bytes_per_span:.1f} per span)")
        if self.aggregates is not None:
            out.append(f"aggregates: {self.aggregates.num_rows} (window, key) rows; busiest:")
            out += _table_lines(self.aggregates, "count", rows)
        if self.validation is not None:
            v = self.validation
            out.append(f"validation: {v['rows_invalid']:,} of {v['spans']:,} spans invalid; "
                       + ", ".join(f"{k} {n:,}" for k, n in sorted(v["findings"].items())))
        if self.latency_breakdown is not None:
            repaired = ", ".join(f"{k} {n}" for k, n in sorted(
                (self.trace_anomalies or {}).items()))
            out.append(f"traces: {self.traces:,} ({repaired}); most self time:")
            out += _table_lines(self.latency_breakdown, "self_time_ns", rows)
        if self.service_graph is not None:
            out.append(f"service graph: {self.service_graph.num_rows} edges; busiest:")
            out += _table_lines(self.service_graph, "calls", rows)
        if self.tail_sampling is not None:
            t = self.tail_sampling
            out.append(f"tail sampling: kept {t['traces_sampled']:,} of {t['traces']:,} traces, "
                       f"{t['spans_sampled']:,} of {t['spans']:,} spans"
                       + (f" in {len(t['files'])} files" if t.get("files") else ""))
        return "\n".join(out)


def _table_lines(table: pa.Table, by: str, rows: int) -> list[str]:
    import pyarrow.compute as pc

    top = table.take(pc.sort_indices(table, [(by, "descending")])[:rows])
    lines = []
    for r in top.to_pylist():
        lines.append("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in r.items()))
    return lines


# -- the job ----------------------------------------------------------------------------------


def _spec(what: Iterable[str], window: WindowConfig | None, group_by: Sequence[str],
          quantiles: Sequence[float], alpha: float, exact_quantiles: bool, buckets: int,
          registry: Any, validator_options: dict[str, Any] | None, tail_sampling: Any,
          sampled_output: Any) -> _tasks.AnalysisSpec:
    if isinstance(what, str):
        what = (what,)
    chosen = frozenset(what)
    unknown = sorted(chosen - WHAT)
    if unknown or not chosen:
        raise ValueError(f"what must name some of {sorted(WHAT)}, got {sorted(chosen)}")
    window = window if window is not None else WindowConfig.tumbling(seconds=60)
    if not isinstance(window, WindowConfig):
        raise ValueError(f"window must be a WindowConfig, got {type(window).__name__}")
    if window.kind == "session" or window.processing_time:
        raise ValueError("distributed aggregates take tumbling or sliding event-time windows; "
                         "session and processing-time windows depend on arrival order")
    from knhk.stream.keys import KeyEncoder
    from knhk.stream.sketch import DDSketch
    KeyEncoder(group_by)  # names a bad key now, not on a worker
    DDSketch(alpha)
    qs = []
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be a number in [0, 1], got {q!r}")
        qs.append(float(q))
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    if "validation" in chosen and registry is None:
        raise ValueError("what includes 'validation': pass registry= (a Weaver registry "
                         "directory the workers can read)")
    if registry is not None:
        registry = os.path.abspath(os.fspath(registry))
    if "tail_sampling" in chosen:
        from knhk.tail_sampling import TailSamplingConfig
        if not isinstance(tail_sampling, TailSamplingConfig):
            raise ValueError("what includes 'tail_sampling': pass tail_sampling= a "
                             "TailSamplingConfig")
        stateful = sorted({leaf.name for p in tail_sampling.policies for leaf in p.walk()
                           if leaf.type in ("rate_limiting", "composite")})
        if stateful:
            raise ValueError(f"tail sampling policies {stateful} spend a per-second budget in "
                             "arrival order, which files spread over workers do not have; "
                             "use stateless policies in distributed analysis")
    if sampled_output is not None:
        sampled_output = os.path.abspath(os.fspath(sampled_output))
    return _tasks.AnalysisSpec(
        what=chosen, window=window, group_by=tuple(group_by), quantiles=tuple(qs),
        alpha=float(alpha), exact_quantiles=bool(exact_quantiles), buckets=buckets,
        registry=registry, validator_options=dict(validator_options or {}),
        tail_sampling=tail_sampling if "tail_sampling" in chosen else None,
        sampled_output=sampled_output if "tail_sampling" in chosen else None)


def _check_infos(infos: list[dict[str, Any]]) -> None:
    want = SPAN_SCHEMA.metadata[b"knhk.schema"].decode()
    span_infos = [i for i in infos if i["signal"] != "metrics"]
    found = {i["schema"] for i in span_infos if i["error"] is None}
    wrong = [i for i in span_infos if i["error"] is None and i["schema"] != want]
    if wrong:
        names = ", ".join(f"{i['path']} ({i['schema'] or 'no knhk schema version'})"
                          for i in wrong[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        mixed = " (the files mix schema versions)" if len(found) > 1 else ""
        raise SchemaError(f"this knhk reads span schema {want!r}; these files hold another"
                          f"{mixed}: {names}{more}")


def _finish_aggregates(spec: _tasks.AnalysisSpec, rows: list[tuple]) -> pa.Table:
    """The result table from rows (window start, key, count, sum, min, max, errors, qs)."""
    rows = sorted(rows, key=lambda r: (r[0], tuple((v is None, str(type(v)), v) for v in r[1])))
    size = spec.window.size_ns
    wstart = np.array([r[0] for r in rows], np.int64)
    count = np.array([r[2] for r in rows], np.int64)
    sums = np.array([r[3] for r in rows], np.int64) / _tasks._NS_PER_MS
    cols: dict[str, Any] = {"window_start": pa.array(wstart, pa.int64()),
                            "window_end": pa.array(wstart + size, pa.int64())}
    for i, name in enumerate(spec.group_by):
        cols[name] = pa.array([r[1][i] for r in rows])
    cols["count"] = pa.array(count, pa.int64())
    cols["sum"] = pa.array(sums, pa.float64())
    cols["avg"] = pa.array(sums / count if rows else np.zeros(0), pa.float64())
    cols["min"] = pa.array(np.array([r[4] for r in rows], np.int64) / _tasks._NS_PER_MS,
                           pa.float64())
    cols["max"] = pa.array(np.array([r[5] for r in rows], np.int64) / _tasks._NS_PER_MS,
                           pa.float64())
    for j, q in enumerate(spec.quantiles):
        cols[quantile_name(q)] = pa.array([r[7][j] for r in rows], pa.float64())
    errors = np.array([r[6] for r in rows], np.float64)
    cols["error_rate"] = pa.array(errors / count if rows else np.zeros(0), pa.float64())
    cols["throughput"] = pa.array(count / (size / 1e9), pa.float64())
    return pa.table(cols)


def _sketch_rows(spec: _tasks.AnalysisSpec, merged: dict[tuple, list[Any]]) -> list[tuple]:
    return [(k[0], k[1], v[0], v[1], v[2], v[3], v[4],
             tuple(float(x) for x in v[5].quantiles(spec.quantiles)))
            for k, v in merged.items()]


def _default_buckets(n_workers: int) -> int:
    # a few buckets per worker, so a slow or lost worker's share is small
    return max(1, 4 * n_workers)


def _expand(files: Any) -> list[str]:
    from knhk.replay import _expand as expand_sources
    return [os.path.abspath(p) for p in expand_sources(files)]


def analyze(files: Any, client: Any, *,
            what: Iterable[str] = ("aggregates", "traces"),
            window: WindowConfig | None = None,
            group_by: Sequence[str] = ("service", "name"),
            quantiles: Sequence[float] = (0.5, 0.95, 0.99),
            alpha: float = 0.01,
            exact_quantiles: bool = False,
            registry: str | os.PathLike | None = None,
            validator_options: dict[str, Any] | None = None,
            tail_sampling: Any = None,
            sampled_output: str | os.PathLike | None = None,
            buckets: int | None = None,
            timeout: float = 10.0) -> AnalysisResult:
    """Run knhk's analysis over IPC span files on a Dask cluster.

    Parameters
    ----------
    files : path, glob, directory or list of those
        As :func:`knhk.replay.read_batches` takes them; paths must be readable
        at the same place here and on every worker (a shared file system).
    client : distributed.Client or str
        A client, or an address for :func:`connect` (then connected and closed here).
    what : iterable of str
        Any of ``"aggregates"``, ``"validation"``, ``"traces"``, ``"tail_sampling"``.
    window : WindowConfig
        Tumbling or sliding event-time windows (default tumbling 60 s).
    group_by, quantiles, alpha
        As for :class:`~knhk.stream.StreamProcessor`.
    exact_quantiles : bool
        Exact quantiles through a shuffle of the durations instead of sketches.
    registry : path
        Weaver registry for ``"validation"``; ``validator_options`` are passed
        to :class:`~knhk.validation.WeaverValidator`.
    tail_sampling : TailSamplingConfig
        Policies for ``"tail_sampling"`` (stateless ones: each trace is
        decided whole, as :meth:`TailSampler.sample_mask` decides it).
    sampled_output : path, optional
        Directory where the kept spans are written as IPC files.
    buckets : int, optional
        Shuffle buckets (default four per worker).
    timeout : float
        Seconds to wait for the scheduler when ``client`` is an address.

    Returns
    -------
    AnalysisResult

    Raises
    ------
    SchemaError
        If a file holds another knhk schema version (names the files).
    CorruptFileError, FileNotFoundError
        As :func:`knhk.replay.read_batches`, naming the file.
    DistributedJobError
        If workers died more often than the scheduler allows while running a
        task (``distributed.scheduler.allowed-failures``); tasks of a worker
        that died are otherwise rerun elsewhere, so a result is always whole.

    Examples
    --------
    See the module docstring; ``analyze`` takes the same arguments as
    :func:`analyze_local` plus the client.
    """
    started = time.perf_counter()
    paths = _expand(files)
    own = isinstance(client, str)
    client = connect(client, timeout=timeout)
    try:
        n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
        spec = _spec(what, window, group_by, quantiles, alpha, exact_quantiles,
                     buckets if buckets is not None else _default_buckets(n_workers),
                     registry, validator_options, tail_sampling, sampled_output)
        result = _run(client, paths, spec)
    finally:
        if own:
            client.close()
    result.elapsed_s = time.perf_counter() - started
    return result


def _tree(client: Any, futures: list[Any], fn: Any, key: str) -> Any:
    """Reduce futures pairwise on the workers (log depth, no single worker holds them all)."""
    level = 0
    while len(futures) > 1:
        nxt = []
        for i in range(0, len(futures) - 1, 2):
            nxt.append(client.submit(fn, futures[i], futures[i + 1],
                                     key=f"{key}-l{level}-{i}"))
        if len(futures) % 2:
            nxt.append(futures[-1])
        futures = nxt
        level += 1
    return futures[0]


def _gather(client: Any, futures: Any, what: str, keys: dict[str, str]) -> Any:
    distributed = _distributed()
    from distributed.comm.core import CommClosedError

    try:
        return client.gather(futures)
    except distributed.KilledWorker as exc:
        task = str(exc.args[0]) if exc.args else "?"
        detail = f" (file {keys[task]})" if task in keys else ""
        raise DistributedJobError(
            f"the distributed job failed while computing {what}: task {task}{detail} was "
            f"running on workers that died each time it was tried (raise "
            f"distributed.scheduler.allowed-failures, or give workers more memory); "
            f"no partial result is returned") from exc
    except CommClosedError as exc:  # the scheduler went away
        raise DistributedJobError(f"the distributed job lost its scheduler while computing "
                                  f"{what}: {exc}; no partial result is returned") from exc


def _run(client: Any, paths: list[str], spec: _tasks.AnalysisSpec) -> AnalysisResult:
    token = uuid.uuid4().hex[:8]
    # the client sees the files too (the paths were expanded here): check them before
    # any worker starts reading
    _check_infos([_tasks.file_info(p) for p in paths])
    keys = {f"knhk-read-{token}-{i}": p for i, p in enumerate(paths)}
    reads = [client.submit(_tasks.read_file, p, spec, key=k) for k, p in keys.items()]
    if spec.shuffles_traces or spec.exact_quantiles:
        # leave the pieces where they are: only their small parts go to the merge
        smalls = [client.submit(_tasks.small, f, key=f"knhk-small-{token}-{i}")
                  for i, f in enumerate(reads)]
    else:  # a file's result is small already: merge it as it is, one task less per file
        smalls = reads
    pending: dict[str, Any] = {"small": _tree(client, smalls, _tasks.merge_small,
                                              f"knhk-merge-{token}")}
    if "aggregates" in spec.what and spec.exact_quantiles:
        pending["exact"] = [
            client.submit(_tasks.exact_bucket, spec, *[
                client.submit(_tasks.pick, f, "exact_pieces", b,
                              key=f"knhk-xpiece-{token}-{i}-{b}")
                for i, f in enumerate(reads)], key=f"knhk-xbucket-{token}-{b}")
            for b in range(spec.buckets)]
    if spec.shuffles_traces:
        pending["traces"] = [
            client.submit(_tasks.trace_bucket, spec, b, *[
                client.submit(_tasks.pick, f, "trace_pieces", b,
                              key=f"knhk-piece-{token}-{i}-{b}")
                for i, f in enumerate(reads)], key=f"knhk-tbucket-{token}-{b}")
            for b in range(spec.buckets)]
    del reads, smalls  # a file's result is freed once every part of it is picked
    try:
        done = _gather(client, pending, "the analysis", keys)
    finally:
        del pending
    return _assemble_result(spec, len(paths), done)


def _assemble_result(spec: _tasks.AnalysisSpec, n_files: int,
                     done: dict[str, Any]) -> AnalysisResult:
    res = AnalysisResult(files=n_files, buckets=spec.buckets)
    head = _tasks.small(done["small"])
    if head["files"] != n_files:
        raise DistributedJobError(f"the merged results cover {head['files']} of {n_files} "
                                  "files: a partial result, refused")
    res.spans = head["spans"]
    res.metric_points = head["metric_points"]
    res.invalid_spans = head["invalid_spans"]
    if "aggregates" in head:
        res.aggregates = _finish_aggregates(spec, _sketch_rows(spec, head["aggregates"]))
    if "exact" in done:
        res.aggregates = _finish_aggregates(spec, [r for rows in done["exact"] for r in rows])
        res.shuffle_bytes += int(head.get("exact_bytes", 0))
    if res.aggregates is not None:
        counted = int(np.sum(res.aggregates.column("count").to_numpy())) \
            if res.aggregates.num_rows else 0
        expected = (res.spans - res.invalid_spans) * spec.window.panes \
            if spec.window.kind == "tumbling" else None
        if expected is not None and counted != expected:
            raise DistributedJobError(f"the merged aggregates count {counted} spans of the "
                                      f"{expected} read: a partial result, refused")
    if "validation" in head:
        res.validation = head["validation"]
    if "traces" in done:
        merged = _tasks.merge_trace_results(done["traces"])
        if merged["spans"] != res.spans:
            raise DistributedJobError(f"the trace shuffle delivered {merged['spans']} of "
                                      f"{res.spans} spans: a partial result, refused")
        res.shuffle_bytes += int(head["piece_bytes"])
        if "critical_paths" in merged:
            res.critical_paths = merged["critical_paths"]
            res.service_graph = merged["service_graph"]
            res.latency_breakdown = merged["latency_breakdown"]
            res.trace_anomalies = merged["anomalies"]
            res.traces = merged["traces"]
        if "tail_sampling" in merged:
            res.tail_sampling = merged["tail_sampling"]
    return res


def analyze_local(files: Any, *, what: Iterable[str] = ("aggregates", "traces"),
                  window: WindowConfig | None = None,
                  group_by: Sequence[str] = ("service", "name"),
                  quantiles: Sequence[float] = (0.5, 0.95, 0.99),
                  alpha: float = 0.01, exact_quantiles: bool = False,
                  registry: str | os.PathLike | None = None,
                  validator_options: dict[str, Any] | None = None,
                  tail_sampling: Any = None,
                  sampled_output: str | os.PathLike | None = None,
                  buckets: int = 1) -> AnalysisResult:
    """The tasks of :func:`analyze`, run one after the other in this process (no Dask).

    Same parameters and result as :func:`analyze` without ``client``; useful
    to check a job on a sample before sending it to a cluster.

    Examples
    --------
    See the module docstring.
    """
    started = time.perf_counter()
    paths = _expand(files)
    spec = _spec(what, window, group_by, quantiles, alpha, exact_quantiles, buckets,
                 registry, validator_options, tail_sampling, sampled_output)
    _check_infos([_tasks.file_info(p) for p in paths])
    reads = [_tasks.read_file(p, spec) for p in paths]
    head = _tasks.small(reads[0])
    for r in reads[1:]:
        head = _tasks.merge_small(head, _tasks.small(r))
    done: dict[str, Any] = {"small": head}
    if "aggregates" in spec.what and spec.exact_quantiles:
        done["exact"] = [_tasks.exact_bucket(spec, *[r["exact_pieces"][b] for r in reads])
                         for b in range(spec.buckets)]
    if spec.shuffles_traces:
        done["traces"] = [_tasks.trace_bucket(spec, b, *[r["trace_pieces"][b] for r in reads])
                          for b in range(spec.buckets)]
    result = _assemble_result(spec, len(paths), done)
    result.elapsed_s = time.perf_counter() - started
    return result
