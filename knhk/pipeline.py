"""TelemetryPipeline: ring buffer in, stages on a worker, exporters on their own threads.

>>> import knhk
>>> sink = knhk.InMemoryExporter()
>>> pipeline = (knhk.TelemetryPipeline.builder()
...             .with_batch_size(2)
...             .with_exporter(sink)
...             .build())
>>> for i in range(1, 6):
...     _ = pipeline.record_span(knhk.Span("op", trace_id=i, span_id=i))
>>> pipeline.shutdown()
True
>>> [b.num_rows for b in sink.batches], pipeline.stats().events_processed
([2, 2, 1], 5)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import numpy as np

from knhk import environment
from knhk._build import load_core
from knhk._enums import BackpressureStrategy, DropReason
from knhk.batch import MetricBatch, SpanBatch, coerce_spans, trace_id_low64
from knhk.errors import BatchTooLargeError, PipelineClosedError
from knhk.exporters.base import Exporter, ExporterWorker
from knhk.metrics import MetricBuffer
from knhk.schema import MetricPoint

logger = logging.getLogger(__name__)

__all__ = [
    "BackpressureStrategy",
    "EventStream",
    "PipelineBuilder",
    "PipelineStats",
    "Stage",
    "StageResult",
    "TelemetryPipeline",
]

_COMPRESSIONS = (None, "gzip", "lz4", "zstd")


@dataclass
class StageResult:
    """What a stage may return instead of a plain batch.

    ``mask`` keeps rows for the stages after this one and the exporters; the
    rows it removes are counted under ``removed_as`` (``"sampled_out"`` for a
    sampler's decision), or not at all when ``removed_as`` is None because the
    stage counts them in its own ``counters``. ``counters`` are added to the
    pipeline's stats under their names; ``validation_errors`` is reported by
    name, and a counter whose name ends in ``_dropped`` or ``_lost`` is also a
    drop reason in ``dropped_by_reason``.
    """

    batch: SpanBatch
    mask: np.ndarray | None = None
    counters: dict[str, int] = field(default_factory=dict)
    removed_as: str | None = "sampled_out"


@runtime_checkable
class Stage(Protocol):
    """A pipeline stage: takes a batch, returns a batch, a StageResult or None."""

    def process(self, batch: SpanBatch) -> SpanBatch | StageResult | None: ...


@dataclass
class PipelineStats:
    """A snapshot of a pipeline's counters (``stats()``).

    ``events_dropped`` counts spans the ring buffer refused or evicted (never
    processed); ``dropped_by_reason`` also names spans an exporter or an
    event stream could not take (``export_queue_full:<exporter>``, ...), and
    metric points (``metrics_<reason>``). ``events_refused`` counts spans that
    ``try_record_batch`` turned away whole (their sender keeps and retries them:
    not received, not dropped). Latencies: *processing* is the time
    a batch spends in the stages; *pipeline* is from sealing to leaving them.
    """

    events_received: int
    events_processed: int
    events_dropped: int
    dropped_by_reason: dict[str, int]
    events_sampled_out: int
    events_refused: int
    batches_created: int
    batches_processed: int
    validation_errors: int
    export_errors: int
    avg_batch_size: float
    avg_processing_latency_us: float
    p99_processing_latency_us: float
    avg_pipeline_latency_us: float
    p99_pipeline_latency_us: float
    queue_occupancy: float
    queued_events: int
    metrics_received: int
    metrics_refused: int
    stage_errors: int
    counters: dict[str, int]
    exporters: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PipelineBuilder:
    """Configures a :class:`TelemetryPipeline`; every ``with_*`` returns the builder."""

    def __init__(self) -> None:
        self._batch_size = environment.positive_int(environment.KNHK_BATCH_SIZE, 4096)
        self._flush_interval = 0.1
        self._capacity = environment.positive_int(environment.KNHK_CHANNEL_CAPACITY, 100_000)
        self._compression: str | None = None
        self._strategy = BackpressureStrategy.DROP_OLDEST
        self._block_timeout = 1.0
        self._registry: str | None = None
        self._sampling: Any = None
        self._head: Any = None
        self._tail: Any = None
        self._exporters: list[Exporter] = []
        self._stages: list[Any] = []
        self._service = environment.service_name()
        self._latency_window = 4096
        self._memory_limiter: Any = None

    def with_batch_size(self, size: int) -> PipelineBuilder:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"The batch size must be a positive int, got {size!r}.")
        self._batch_size = size
        return self

    def with_flush_interval(self, interval: timedelta | float) -> PipelineBuilder:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or \
                not math.isfinite(seconds) or seconds <= 0 or seconds > 86_400:
            raise ValueError(
                f"The flush interval must be a positive timedelta or number of seconds "
                f"of at most a day, got {interval!r}.")
        self._flush_interval = float(seconds)
        return self

    def with_channel_capacity(self, capacity: int) -> PipelineBuilder:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"The channel capacity must be a positive int, got {capacity!r}.")
        self._capacity = capacity
        return self

    def with_compression(self, compression: str | None) -> PipelineBuilder:
        """Default compression of the exporters that compress (IPC files, OTLP).

        An exporter built without an explicit compression takes this one
        (through its ``set_default_compression`` method); ``None`` leaves each
        exporter's own default.
        """
        if compression not in _COMPRESSIONS:
            raise ValueError(
                f"The compression must be one of gzip, lz4, zstd or None, got {compression!r}.")
        self._compression = compression
        return self

    def with_backpressure_strategy(self, strategy: BackpressureStrategy, *,
                                   block_timeout: timedelta | float | None = None
                                   ) -> PipelineBuilder:
        try:
            self._strategy = BackpressureStrategy(strategy)
        except ValueError:
            raise ValueError(
                f"The backpressure strategy must be a BackpressureStrategy, got {strategy!r}."
            ) from None
        if block_timeout is not None:
            seconds = (block_timeout.total_seconds() if isinstance(block_timeout, timedelta)
                       else block_timeout)
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or \
                    not math.isfinite(seconds) or seconds < 0:
                raise ValueError(
                    f"The block timeout must be a finite, non-negative duration, "
                    f"got {block_timeout!r}.")
            self._block_timeout = float(seconds)
        return self

    def with_weaver_registry(self, path: str, *, policy: Any = None,
                             **validator_options: Any) -> PipelineBuilder:
        """Validate every span against a Weaver registry (the first stage).

        ``policy`` (a ``knhk.validation.ValidationPolicy``; default: annotate and
        pass) says what happens to spans with findings; ``validator_options`` go
        to :class:`~knhk.validation.WeaverValidator` (``span_groups``, ``watch``, ...).
        """
        import os

        if not isinstance(path, str | os.PathLike) or not os.path.isdir(path):
            raise ValueError(f"The Weaver registry must be an existing directory, got {path!r}.")
        self._registry = (os.fspath(path), policy, validator_options)
        return self

    def with_adaptive_sampling(self, config: Any = None) -> PipelineBuilder:
        from knhk.sampling import SamplingConfig

        if config is None:
            config = SamplingConfig()
        if not isinstance(config, SamplingConfig):
            raise ValueError(
                f"Adaptive sampling takes a knhk.SamplingConfig, got {type(config).__name__}.")
        self._sampling = config
        return self

    def with_sampler(self, sampler: Any) -> PipelineBuilder:
        """A head sampler (``TraceIdRatio``, ``ParentBased``, ...) deciding what is exported."""
        from knhk.sampling import Sampler

        if not isinstance(sampler, Sampler):
            raise ValueError(
                f"A head sampler must be a knhk.sampling.Sampler, got {type(sampler).__name__}.")
        self._head = sampler
        return self

    def with_tail_sampling(self, config: Any) -> PipelineBuilder:
        """Tail sampling: hold spans per trace until complete, then decide by policies."""
        from collections.abc import Mapping

        from knhk.tail_sampling import TailSamplingConfig

        if isinstance(config, Mapping):
            config = TailSamplingConfig.from_dict(config)
        if not isinstance(config, TailSamplingConfig):
            raise ValueError(
                "Tail sampling takes a knhk.TailSamplingConfig or a mapping, "
                f"got {type(config).__name__}.")
        self._tail = config
        return self

    def with_exporter(self, exporter: Exporter, *, persistent_queue: Any = None,
                      queue_size: int | None = None) -> PipelineBuilder:
        """Send what leaves the stages to ``exporter``, on its own thread behind a queue.

        Parameters
        ----------
        exporter : Exporter
            Anything with ``export(batch) -> ExportResult``.
        persistent_queue : str, os.PathLike or PersistentQueue, optional
            Keep the exporter's queue on disk in this directory (created if
            missing; one exporter per directory): each batch is written
            before it is queued and removed once the exporter is done with
            it, so batches not yet exported survive a crash or a shutdown and
            are exported again (at least once) by the next pipeline built on
            the same directory. Sets ``exporter.persistent_queue``. The queue
            locks its directory: :meth:`build` raises ``OSError`` while another
            queue (this process's or another's) holds it.
        queue_size : int, optional
            Batches held for this exporter before new ones are dropped and
            counted (default ``exporter.queue_size``). Sets ``exporter.queue_size``.

        Examples
        --------
        >>> import tempfile, knhk
        >>> sink = knhk.InMemoryExporter()
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with (knhk.TelemetryPipeline.builder()
        ...       .with_exporter(sink, persistent_queue=tmp.name, queue_size=128).build()) as p:
        ...     _ = p.record_span(knhk.Span("op", trace_id=1, span_id=1))
        >>> sum(b.num_rows for b in sink.batches)
        1
        >>> tmp.cleanup()
        """
        if not callable(getattr(exporter, "export", None)):
            raise ValueError(
                f"An exporter needs an export(batch) method; {type(exporter).__name__} has none.")
        if queue_size is not None:
            if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
                raise ValueError(f"The queue size of exporter {_exporter_name(exporter)} must "
                                 f"be a positive int, got {queue_size!r}.")
            exporter.queue_size = queue_size
        if persistent_queue is not None:
            exporter.persistent_queue = _persistent_queue_spec(persistent_queue, exporter)
        self._exporters.append(exporter)
        return self

    def with_memory_limiter(self, limiter: Any = None, *, soft_limit_mib: float | None = None,
                            hard_limit_mib: float | None = None,
                            check_interval: float = 0.05) -> PipelineBuilder:
        """Refuse data at the receivers while resident memory is above a soft limit.

        OTLP receivers feeding the pipeline (``OtlpGrpcReceiver``,
        ``OtlpHttpReceiver``) then answer ``UNAVAILABLE`` / 503 with retry
        information while memory is above the soft limit, so clients keep
        the data and retry; above the hard limit the limiter also forces a
        collection. Spans recorded directly (``record_span``/``record_batch``)
        are not refused.

        Parameters
        ----------
        limiter : knhk.MemoryLimiter, optional
            A limiter of your own (e.g. ``MemoryLimiter.from_collector(limit_mib=...)``,
            or shared by several pipelines); else one is made from the limits below.
        soft_limit_mib, hard_limit_mib : float, optional
            Limits in MiB; the hard limit defaults to 1.25 x the soft one.
        check_interval : float
            Seconds between two reads of resident memory.

        Examples
        --------
        >>> import knhk
        >>> p = knhk.TelemetryPipeline.builder().with_memory_limiter(soft_limit_mib=4096).build()
        >>> from knhk.receivers._common import memory_limiter_of
        >>> memory_limiter_of(p).hard_limit >> 20
        5120
        >>> p.shutdown()
        True
        """
        from knhk.memory_limiter import MemoryLimiter

        if limiter is not None:
            if soft_limit_mib is not None or hard_limit_mib is not None:
                raise ValueError("with_memory_limiter takes a MemoryLimiter or limits, "
                                 "not both.")
            if not callable(getattr(limiter, "admit", None)):
                raise ValueError(f"A memory limiter needs an admit() method; "
                                 f"{type(limiter).__name__} has none.")
            self._memory_limiter = limiter
            return self
        if soft_limit_mib is None:
            raise ValueError("with_memory_limiter needs a MemoryLimiter or soft_limit_mib.")
        if hard_limit_mib is None and isinstance(soft_limit_mib, int | float) \
                and not isinstance(soft_limit_mib, bool):
            hard_limit_mib = soft_limit_mib * 1.25
        self._memory_limiter = MemoryLimiter(soft_limit_mib, hard_limit_mib,
                                             check_interval=check_interval)
        return self

    def with_stage(self, stage: Any) -> PipelineBuilder:
        if not callable(getattr(stage, "process", None)) and not callable(stage):
            raise ValueError(
                f"A stage needs a process(batch) method or must be callable; "
                f"{type(stage).__name__} is neither.")
        self._stages.append(stage)
        return self

    def with_service_name(self, name: str) -> PipelineBuilder:
        if not isinstance(name, str) or not name:
            raise ValueError(f"The service name must be a non-empty str, got {name!r}.")
        self._service = name
        return self

    def build(self) -> TelemetryPipeline:
        if self._capacity < self._batch_size:
            raise ValueError(
                f"The channel capacity ({self._capacity}) must be at least the batch size "
                f"({self._batch_size}).")
        import os

        seen: dict[str, Any] = {}
        for exporter in self._exporters:
            spec = getattr(exporter, "persistent_queue", None)
            if spec is None:
                continue
            path = os.path.realpath(getattr(spec, "directory", spec))
            if path in seen and seen[path] is not exporter:
                raise ValueError(
                    f"Exporters {_exporter_name(seen[path])} and {_exporter_name(exporter)} "
                    f"both keep their persistent queue in {path!r}; give each its own "
                    "directory.")
            seen[path] = exporter
        pipeline = TelemetryPipeline(self)
        if self._memory_limiter is not None:
            from knhk.receivers._common import set_memory_limiter

            set_memory_limiter(pipeline, self._memory_limiter)
        return pipeline


def _exporter_name(exporter: Any) -> str:
    return repr(getattr(exporter, "name", None) or type(exporter).__name__)


def _persistent_queue_spec(spec: Any, exporter: Any) -> Any:
    """``spec`` checked: a PersistentQueue, or a directory that exists (or can be made)
    and can be written; raises ValueError naming the exporter and the directory."""
    import os
    import tempfile

    from knhk.exporters._persistent_queue import PersistentQueue

    if isinstance(spec, PersistentQueue):
        return spec
    if not isinstance(spec, str | os.PathLike) or not os.fspath(spec):
        raise ValueError(f"The persistent queue of exporter {_exporter_name(exporter)} must be "
                         f"a directory or a PersistentQueue, got {spec!r}.")
    path = os.path.abspath(os.fspath(spec))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"The persistent queue directory {path!r} of exporter "
                         f"{_exporter_name(exporter)} cannot be written: "
                         f"{exc.strerror or exc}.") from None
    return path


class _Sink:
    """The event_stream(): a bounded queue of processed batches for one consumer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0


class EventStream:
    """Iterator over a pipeline's processed batches; ``close()`` (or dropping it) unsubscribes."""

    def __init__(self, pipeline: TelemetryPipeline, sink: _Sink) -> None:
        self._pipeline = pipeline
        self._sink = sink

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> SpanBatch | MetricBatch:
        sink = self._sink
        with sink.cond:
            while not sink.queue and not sink.closed:
                sink.cond.wait()
            if not sink.queue:
                self.close()
                raise StopIteration
            return sink.queue.popleft()

    def close(self) -> None:
        self._pipeline._unsubscribe(self._sink)
        with self._sink.cond:
            self._sink.queue.clear()

    def __del__(self) -> None:
        self._pipeline._unsubscribe(self._sink)


class TelemetryPipeline:
    """Spans and metric points in; stages and exporters behind a ring buffer.

    Build one with :meth:`builder`. ``record_span`` is the per-event entry
    (a direct call into the compiled ring buffer); ``record_batch`` the fast
    path for columns. Use as a context manager, or call :meth:`shutdown`.
    """

    record_span: Callable[[Any], bool]

    @staticmethod
    def builder() -> PipelineBuilder:
        return PipelineBuilder()

    def __init__(self, config: PipelineBuilder) -> None:
        ring_mod = load_core("_ringbuffer")
        self._batch_size = config._batch_size
        self._flush_interval = config._flush_interval
        self._strategy = config._strategy
        self._service = config._service
        self.compression = config._compression
        self._ring = ring_mod.SpanRing(
            config._batch_size, config._capacity, int(config._strategy),
            config._block_timeout, config._service)
        # record_span is the ring's own method: one C call per span.
        self.record_span = self._ring.append
        self._metrics = MetricBuffer(config._batch_size, config._capacity, config._service)
        self._stages: list[Any] = []
        self.validator = None
        if config._registry is not None:
            from knhk.validation import WeaverValidator

            path, policy, options = config._registry
            self.validator = WeaverValidator(path, **options)
            self._stages.append(self.validator.stage(policy))
        self._stages.extend(config._stages)
        # Exporters that derive data from every span (span metrics, service graphs)
        # contribute a stage here, before sampling, so what they derive is unbiased.
        for exporter in config._exporters:
            stage_of = getattr(exporter, "pipeline_stage", None)
            if callable(stage_of):
                stage = stage_of()
                if stage is not None:
                    self._stages.append(stage)
        # Sampling runs after every other stage: they see every span.
        self._sampler = None
        if config._sampling is not None:
            from knhk.sampling import AdaptiveSamplingStrategy

            self._sampler = AdaptiveSamplingStrategy(config._sampling)
            self._stages.append(self._sampler)
        elif config._head is not None:
            self._stages.append(config._head)
        else:
            from knhk.sampling import sampler_from_env

            env_sampler = sampler_from_env()
            if env_sampler is not None:
                self._stages.append(env_sampler)
        if config._tail is not None:
            from knhk.tail_sampling import TailSampler

            self._stages.append(TailSampler(config._tail))
        if config._compression is not None:
            for exporter in config._exporters:
                setter = getattr(exporter, "set_default_compression", None)
                if callable(setter):
                    setter(config._compression)
        self._pollable = any(callable(getattr(s, "poll", None)) for s in self._stages)
        self._workers = []
        names: dict[str, int] = {}
        for exporter in config._exporters:
            try:
                worker = ExporterWorker(exporter)
            except BaseException:
                # (a persistent queue's directory in use, ...): the workers already
                # started hold threads and directory locks; release them
                for w in self._workers:
                    w.close(time.monotonic() + 1.0)
                raise
            seen = names.get(worker.name, 0)
            names[worker.name] = seen + 1
            if seen:
                worker.name = f"{worker.name}#{seen + 1}"
            self._workers.append(worker)
        self._sinks: list[_Sink] = []
        self._lock = threading.Lock()
        self._processed = 0
        self._batches_processed = 0
        self._sampled_out = 0
        self._stage_errors = 0
        self._counters: dict[str, int] = {}
        self._latency = deque(maxlen=config._latency_window)
        self._e2e_latency = deque(maxlen=config._latency_window)
        self._busy = False
        self._closed = False
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="knhk-pipeline", daemon=True)
        self._worker.start()
        # Exporters that report on the pipeline itself (its stats) learn which one.
        # One that cannot (a scrape port in use) fails the build: nothing keeps running.
        try:
            for exporter in config._exporters:
                bind = getattr(exporter, "bind_pipeline", None)
                if callable(bind):
                    bind(self)
        except BaseException:
            self.shutdown(timeout=1.0)
            raise

    # -- input -------------------------------------------------------------------

    def record_spans(self, spans: Iterable[Any]) -> int:
        """Record many ``Span`` objects; return how many were accepted."""
        return self._ring.append_many(spans)

    def record_batch(self, data: Any) -> int:
        """Record columns of spans: the fast path. Return the rows accepted.

        ``data`` is a pyarrow RecordBatch or Table, a :class:`SpanBatch`, or a
        dict of NumPy / Arrow columns named as in :data:`knhk.SPAN_SCHEMA`
        (``duration_ns`` may stand in for ``end_time_ns``). A missing or
        mistyped column raises :class:`~knhk.errors.SchemaError` naming it, and
        nothing of ``data`` is taken; invalid rows (null or all-zero ids, end
        before start) are dropped and counted as ``invalid``, the rest go on.
        """
        rb, invalid = coerce_spans(data, default_service=self._service)
        n_bad = int(invalid.sum())
        if n_bad:
            self._ring.count_invalid(n_bad)
            rb = rb.filter(np.logical_not(invalid))
        accepted = 0
        adaptive = self._strategy is BackpressureStrategy.ADAPTIVE_SAMPLING
        for offset in range(0, rb.num_rows, self._batch_size):
            chunk = rb.slice(offset, self._batch_size)
            if adaptive:
                low = trace_id_low64(chunk.column("trace_id"))
                errors = chunk.column("status_code").to_numpy() == 2
                accepted += self._ring.offer(chunk, low, errors)
            else:
                accepted += self._ring.offer(chunk)
        return accepted

    def try_record_batch(self, data: Any) -> int | None:
        """Record all valid rows of ``data``, or none: for senders that retry.

        Returns the rows taken, or None when the pipeline is full or shut down —
        then nothing was taken, no backpressure strategy applied, and the rows
        are counted as ``events_refused`` (the sender still holds them; an OTLP
        receiver answers UNAVAILABLE so its client retries). Invalid rows are
        dropped and counted as for :meth:`record_batch` once the batch is taken.
        Raises :class:`~knhk.errors.BatchTooLargeError` when the valid rows exceed
        the channel capacity, which no retry can fix.
        """
        rb, invalid = coerce_spans(data, default_service=self._service)
        n_bad = int(invalid.sum())
        if n_bad:
            rb = rb.filter(np.logical_not(invalid))
        if rb.num_rows > self._ring.capacity:
            raise BatchTooLargeError(
                f"{rb.num_rows} spans exceed the pipeline's channel capacity "
                f"({self._ring.capacity}); send smaller batches")
        chunks = [rb.slice(off, self._batch_size)
                  for off in range(0, rb.num_rows, self._batch_size)]
        if not self._ring.offer_all(chunks):
            return None  # nothing taken or counted: the sender retries the whole batch
        if n_bad:
            self._ring.count_invalid(n_bad)
        return rb.num_rows

    def record_metric(self, point: MetricPoint | str, value: float | int | None = None,
                      **fields: Any) -> bool:
        """Record one metric point: a :class:`MetricPoint`, or its name, value and fields."""
        if self._closed:
            self._metrics.count_dropped("shutdown")
            return False
        if not isinstance(point, MetricPoint):
            if not isinstance(point, str):
                raise TypeError(
                    f"record_metric takes a MetricPoint or a metric name, got "
                    f"{type(point).__name__}")
            point = MetricPoint(point, value, **fields)
        elif value is not None or fields:
            raise TypeError("record_metric(MetricPoint) takes no further arguments")
        return self._metrics.append(point)

    def record_metric_batch(self, batch: MetricBatch | Any) -> int:
        """Record a whole batch of metric points (a MetricBatch or a RecordBatch in
        ``METRIC_SCHEMA``, e.g. read back from an IPC file); return the points taken."""
        if not isinstance(batch, MetricBatch):
            batch = MetricBatch(batch)
        return self._metrics.offer_batch(batch.record_batch)

    def try_record_metric_batch(self, batch: MetricBatch | Any) -> int | None:
        """Record a whole batch of metric points or none (for senders that retry).

        Returns the points taken, or None when the pipeline is full or shut down:
        then nothing was taken and the points count as ``metrics_refused``.
        """
        if not isinstance(batch, MetricBatch):
            batch = MetricBatch(batch)
        n = batch.num_rows
        if n == 0:
            return 0
        if n > self._metrics.capacity:
            raise BatchTooLargeError(
                f"{n} metric points exceed the pipeline's channel capacity "
                f"({self._metrics.capacity}); send smaller batches")
        taken = self._metrics.offer_batch(batch.record_batch, refuse=True)
        return taken if taken else None

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        ring = self._ring
        interval = self._flush_interval
        next_poll = time.monotonic() + interval
        while True:
            wait = ring.seal_if_due(interval)
            item = ring.pop(timeout=max(0.001, min(wait, interval)))
            if self._metrics.pending:
                with self._lock:
                    self._busy = True
                try:
                    for mb in self._metrics.drain(interval):
                        self._deliver(MetricBatch(mb))
                except Exception:
                    logger.exception("pipeline worker failed delivering metric batches")
                finally:
                    with self._lock:
                        self._busy = False
            if item is None:
                if self._stop.is_set() and ring.queued == 0 and ring.open_rows == 0:
                    return
                if self._pollable and time.monotonic() >= next_poll:
                    # Stages that hold spans (tail sampling) decide without new input.
                    next_poll = time.monotonic() + interval
                    with self._lock:
                        self._busy = True
                    try:
                        self._drain_stages("poll")
                    finally:
                        with self._lock:
                            self._busy = False
                continue
            try:
                self._process(item[0], item[1])
            except Exception:
                logger.exception("pipeline worker failed on a batch; continuing")
                with self._lock:
                    self._stage_errors += 1
            finally:
                ring.release(item[0].num_rows)

    def _process(self, rb: Any, sealed_ns: int) -> None:
        batch = SpanBatch._wrap(rb)
        n = batch.num_rows
        t0 = time.monotonic_ns()
        if self._sampler is not None and self._strategy is BackpressureStrategy.ADAPTIVE_SAMPLING:
            self._sampler.on_pressure(self._ring.occupancy)
        counters: dict[str, int] = {}
        batch = self._run_stages(batch, 0, counters)
        t1 = time.monotonic_ns()
        if batch.num_rows:
            self._deliver(batch)
        with self._lock:
            self._processed += n
            self._batches_processed += 1
            self._add_counters(counters)
            self._latency.append((t1 - t0) / 1000.0)
            self._e2e_latency.append((t1 - sealed_ns) / 1000.0)

    def _run_stages(self, batch: SpanBatch, start: int, counters: dict[str, int]) -> SpanBatch:
        """``batch`` through the stages from index ``start`` on."""
        for stage in self._stages[start:]:
            try:
                out = stage.process(batch) if hasattr(stage, "process") else stage(batch)
            except Exception:
                logger.exception("stage %r raised; the batch goes on unchanged", stage)
                self._stage_errors += 1
                continue
            if out is None:
                continue
            try:
                batch = self._apply(out, batch, counters)
            except Exception as exc:
                logger.error("stage %r returned a result the pipeline cannot use (%s); "
                             "the batch goes on unchanged", stage, exc)
                self._stage_errors += 1
        return batch

    def _add_counters(self, counters: dict[str, int]) -> None:
        """Fold stage counters into the stats (lock held)."""
        self._sampled_out += counters.pop("sampled_out", 0)
        for k, v in counters.items():
            self._counters[k] = self._counters.get(k, 0) + v

    def _drain_stages(self, method: str) -> None:
        """Call ``poll`` or ``flush`` on the stages that hold spans, in order; what one
        releases goes through the stages after it, then to the exporters."""
        for i, stage in enumerate(self._stages):
            call = getattr(stage, method, None)
            if not callable(call):
                continue
            counters: dict[str, int] = {}
            try:
                out = call()
            except Exception:
                logger.exception("stage %r raised in %s", stage, method)
                self._stage_errors += 1
                out = None
            pop = getattr(stage, "pop_counters", None)
            if callable(pop):
                counters.update(pop())
            if isinstance(out, SpanBatch) and out.num_rows:
                out = self._run_stages(out, i + 1, counters)
                if out.num_rows:
                    self._deliver(out)
            with self._lock:
                self._add_counters(counters)

    @staticmethod
    def _apply(out: Any, batch: SpanBatch, counters: dict[str, int]) -> SpanBatch:
        """The batch after a stage's result; raises if the result is unusable."""
        if isinstance(out, SpanBatch):
            return out
        if not isinstance(out, StageResult):
            return SpanBatch(out)
        result = out.batch if isinstance(out.batch, SpanBatch) else SpanBatch(out.batch)
        if out.mask is not None:
            mask = np.asarray(out.mask)
            if mask.dtype != np.bool_ or mask.shape != (result.num_rows,):
                raise ValueError(f"a mask must be {result.num_rows} bools, got "
                                 f"{mask.dtype} of shape {mask.shape}")
            kept = result.filter(mask)
            if out.removed_as is not None:
                counters[out.removed_as] = counters.get(out.removed_as, 0) + (
                    result.num_rows - kept.num_rows)
            result = kept
        for k, v in out.counters.items():
            counters[k] = counters.get(k, 0) + int(v)
        return result

    def _deliver(self, batch: Any) -> None:
        for w in self._workers:
            w.submit(batch)
        for sink in self._sinks:
            with sink.cond:
                if len(sink.queue) >= sink.capacity:
                    sink.dropped += batch.num_rows
                else:
                    sink.queue.append(batch)
                    sink.cond.notify()

    # -- output --------------------------------------------------------------------

    def event_stream(self, max_batches: int = 1024) -> EventStream:
        """Yield batches as they leave the stages, until the pipeline shuts down.

        Subscribes when called; if the consumer falls ``max_batches`` behind,
        newer batches are dropped for it and counted (``event_stream_full``).
        """
        if not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"max_batches must be a positive int, got {max_batches!r}.")
        sink = _Sink(max_batches)
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is shut down")
            self._sinks.append(sink)
        return EventStream(self, sink)

    def _unsubscribe(self, sink: _Sink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    # -- control -------------------------------------------------------------------

    def _drained(self) -> bool:
        with self._lock:
            busy = self._busy
        ring = self._ring
        return (not busy and ring.queued == 0 and ring.open_rows == 0 and ring.inflight == 0
                and self._metrics.pending == 0)

    def force_flush(self, timeout: float | timedelta | None = None) -> bool:
        """Seal and process everything recorded so far and wait for the exporters.

        Returns False if ``timeout`` (seconds; None waits up to 30 s) passed first.
        """
        deadline = time.monotonic() + _seconds(timeout, 30.0)
        self._ring.seal()
        self._metrics.seal()
        while not self._drained():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        ok = all(w.wait_idle(deadline) for w in self._workers)
        for w in self._workers:
            try:
                ok = w.exporter.force_flush(max(0.0, deadline - time.monotonic())) and ok
            except Exception:
                logger.exception("exporter %s raised in force_flush", w.name)
                ok = False
        return ok

    def shutdown(self, timeout: float | timedelta | None = None) -> bool:
        """Stop taking input, flush everything, shut the stages and exporters down.

        Returns within ``timeout`` seconds (default 30) even if an exporter
        hangs; True if everything recorded was processed and every batch
        handed to an exporter was exported (none failed or was dropped, now or
        earlier: ``stats().exporters`` says which and why).
        """
        deadline = time.monotonic() + _seconds(timeout, 30.0)
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        self._ring.close()
        self._metrics.close()
        self._stop.set()
        self._ring.wake()
        self._worker.join(max(0.0, deadline - time.monotonic()))
        ok = not self._worker.is_alive()
        if ok:
            # Metric points sealed by close() after the worker's last look, then what
            # the stages still hold (open windows, pending traces).
            for mb in self._metrics.drain(0.0):
                self._deliver(MetricBatch(mb))
            self._drain_stages("flush")
        else:
            logger.error("the pipeline worker did not finish within the shutdown timeout; "
                         "%d spans were not processed", self._ring.queued + self._ring.inflight)
        for w in self._workers:
            ok = w.close(deadline) and ok
            st = w.stats
            ok = ok and not (st.events_failed or st.events_dropped_queue_full
                             or st.events_dropped_shutdown)
        for sink in self._sinks:
            with sink.cond:
                sink.closed = True
                sink.cond.notify_all()
        for stage in self._stages:
            close = getattr(stage, "shutdown", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    logger.exception("stage %r raised in shutdown", stage)
        return ok

    def __enter__(self) -> TelemetryPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exporters(self) -> tuple[Exporter, ...]:
        """The exporters this pipeline sends to, in the order they were added."""
        return tuple(w.exporter for w in self._workers)

    def processing_latencies(self, since: int = 0) -> tuple[int, np.ndarray]:
        """Per-batch processing latencies (µs) of the batches after the ``since``-th.

        Returns ``(batches_processed, latencies)``: pass the first back as
        ``since`` next time to get only newer batches (a histogram exporter
        folds them in). Only the most recent batches are kept (the window of
        the p99 in :meth:`stats`); older ones beyond it are not returned.
        """
        with self._lock:
            done = self._batches_processed
            new = min(max(done - int(since), 0), len(self._latency))
            lat = [self._latency[-new + j] for j in range(new)] if new else []
        return done, np.asarray(lat, dtype=np.float64)

    def stats(self) -> PipelineStats:
        ring = self._ring
        drops = ring.dropped_counts()
        by_reason = {DropReason(i).label: int(v) for i, v in enumerate(drops) if v}
        for w in self._workers:
            if w.stats.events_dropped_queue_full:
                by_reason[f"export_queue_full:{w.name}"] = w.stats.events_dropped_queue_full
            if w.stats.events_dropped_shutdown:
                by_reason[f"export_shutdown:{w.name}"] = w.stats.events_dropped_shutdown
        for sink in self._sinks:
            if sink.dropped:
                by_reason["event_stream_full"] = by_reason.get("event_stream_full", 0) + \
                    sink.dropped
        for reason, count in self._metrics.dropped.items():
            by_reason[f"metrics_{reason}"] = count
        with self._lock:
            for name, count in self._counters.items():
                if count and (name.endswith("_dropped") or name.endswith("_lost")):
                    by_reason[name] = count
            lat = np.fromiter(self._latency, dtype=np.float64)
            e2e = np.fromiter(self._e2e_latency, dtype=np.float64)
            processed, nb = self._processed, self._batches_processed
            counters = dict(self._counters)
            sampled, stage_errors = self._sampled_out, self._stage_errors
        return PipelineStats(
            events_received=int(ring.received),
            events_processed=processed,
            events_dropped=int(sum(drops)),
            dropped_by_reason=by_reason,
            events_sampled_out=sampled,
            events_refused=int(ring.refused),
            batches_created=int(ring.batches_created),
            batches_processed=nb,
            validation_errors=counters.get("validation_errors", 0),
            export_errors=sum(w.stats.export_errors for w in self._workers),
            avg_batch_size=processed / nb if nb else 0.0,
            avg_processing_latency_us=float(lat.mean()) if lat.size else 0.0,
            p99_processing_latency_us=float(np.percentile(lat, 99)) if lat.size else 0.0,
            avg_pipeline_latency_us=float(e2e.mean()) if e2e.size else 0.0,
            p99_pipeline_latency_us=float(np.percentile(e2e, 99)) if e2e.size else 0.0,
            queue_occupancy=float(ring.occupancy),
            queued_events=int(ring.queued + ring.open_rows),
            metrics_received=self._metrics.received,
            metrics_refused=self._metrics.refused,
            stage_errors=stage_errors,
            counters=counters,
            exporters={w.name: asdict(w.stats) for w in self._workers},
        )


def _seconds(value: float | timedelta | None, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)
