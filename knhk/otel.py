"""The OpenTelemetry SDK bridge: feed a knhk pipeline from an instrumented application.

An application already instrumented with OpenTelemetry adds
:class:`KnhkSpanProcessor` to its ``TracerProvider`` and every span it ends
lands in a knhk pipeline in the same process: no collector, no network hop, no
protobuf. :class:`KnhkSpanExporter` is the ``SpanExporter`` twin, for use
behind the SDK's own ``BatchSpanProcessor`` or ``SimpleSpanProcessor``.

Every field of an SDK span is kept: ids, parent, kind, status, attributes of
every type (arrays included), events, links (with their trace state and
flags), the resource's attributes and schema URL, the instrumentation scope's
name, version, attributes and schema URL, the dropped counts, the trace state
and the flags (W3C trace flags, plus OTLP's ``HAS_IS_REMOTE`` / ``IS_REMOTE``
bits of the parent). :func:`spans_to_batch` is the conversion on its own.

Example
-------
>>> import knhk
>>> from opentelemetry.sdk.trace import TracerProvider
>>> sink = knhk.InMemoryExporter()
>>> pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
>>> provider = TracerProvider()
>>> provider.add_span_processor(KnhkSpanProcessor(pipeline))
>>> with provider.get_tracer("shop").start_as_current_span("checkout") as span:
...     span.set_attribute("order.items", 3)
>>> provider.shutdown()
>>> pipeline.shutdown()
True
>>> sink.spans().to_pylist()[0]["name"], sink.spans().attribute("order.items").to_pylist()
('checkout', [3])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from knhk._attributes import attribute_rows
from knhk.batch import SpanBatch
from knhk.schema import ATTRIBUTES_TYPE, SPAN_SCHEMA, Span, SpanEvent, SpanLink

try:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
except ImportError as exc:  # pragma: no cover - the SDK is a test dependency
    raise ImportError(
        "knhk.otel needs the OpenTelemetry SDK: pip install opentelemetry-sdk") from exc

__all__ = ["KnhkSpanExporter", "KnhkSpanProcessor", "spans_to_batch"]

logger = logging.getLogger(__name__)

# OTLP Span.flags bits above the W3C trace flags (opentelemetry-proto trace.proto SpanFlags).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_DEFAULT_SERVICE = "unknown_service"
_SCOPE_CACHE_MAX = 256

_DICT_STR = SPAN_SCHEMA.field("resource_schema_url").type
_EXTRA = ("dropped_attributes_count", "dropped_events_count", "dropped_links_count",
          "resource_dropped_attributes_count", "resource_schema_url", "scope_attributes",
          "scope_dropped_attributes_count", "scope_schema_url")


def _trace_state(ts: Any) -> str | None:
    if not ts:
        return None
    return ",".join(f"{k}={v}" for k, v in ts.items())


def _flags(trace_flags: int, parent: Any) -> int:
    flags = int(trace_flags) | _HAS_IS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= _IS_REMOTE
    return flags


def _dropped(attrs: Any) -> int:
    return int(getattr(attrs, "dropped", 0) or 0)


def _plain(attrs: Any) -> dict | None:
    """Attributes as the plain dict ``Span`` takes (the SDK's BoundedAttributes wraps one)."""
    if not attrs:
        return None
    inner = getattr(attrs, "_dict", None)
    return inner if type(inner) is dict else dict(attrs)


class _Converter:
    """ReadableSpan -> knhk columns, with resource and scope conversions cached.

    Spans become :class:`~knhk.Span` objects and go through the ring buffer's
    compiled encoder (the same one ``record_span`` uses). The few fields a
    ``Span`` does not carry (dropped counts, schema URLs, scope attributes) are
    patched in as columns of a batch, built only when some span has them (see
    :meth:`record`).
    """

    def __init__(self, default_service: str = _DEFAULT_SERVICE) -> None:
        self.default_service = default_service
        # Keyed by id(); the value holds the object itself so the id cannot be reused.
        self._resources: dict[int, tuple[Any, dict, str, int, str | None]] = {}
        self._scopes: dict[int, tuple[Any, str | None, str | None, dict | None, int,
                                      str | None]] = {}
        self._lock = threading.Lock()

    def _resource(self, res: Any) -> tuple[Any, dict, str, int, str | None]:
        key = id(res)
        hit = self._resources.get(key)
        if hit is None or hit[0] is not res:
            attrs = dict(res.attributes) if res is not None else {}
            svc = attrs.get("service.name")
            service = svc if isinstance(svc, str) and svc else self.default_service
            url = (res.schema_url or None) if res is not None else None
            hit = (res, attrs, service, _dropped(getattr(res, "attributes", None)), url)
            with self._lock:
                if len(self._resources) >= _SCOPE_CACHE_MAX:
                    self._resources.clear()
                self._resources[key] = hit
        return hit

    def _scope(self, scope: Any) -> tuple[Any, str | None, str | None, dict | None, int,
                                          str | None]:
        key = id(scope)
        hit = self._scopes.get(key)
        if hit is None or hit[0] is not scope:
            if scope is None:
                hit = (None, None, None, None, 0, None)
            else:
                attrs = scope.attributes
                hit = (scope, scope.name or None, scope.version or None,
                       dict(attrs) if attrs else None, _dropped(attrs),
                       scope.schema_url or None)
            with self._lock:
                if len(self._scopes) >= _SCOPE_CACHE_MAX:
                    self._scopes.clear()
                self._scopes[key] = hit
        return hit

    def span(self, s: ReadableSpan) -> tuple[Span, tuple | None]:
        """One SDK span as a knhk ``Span``, and the fields a ``Span`` cannot carry
        (None when they are all zero or empty, as they nearly always are)."""
        ctx = s.context
        parent = s.parent
        _, res_attrs, service, res_dropped, res_url = self._resource(s.resource)
        _, scope_name, scope_version, scope_attrs, scope_dropped, scope_url = \
            self._scope(s.instrumentation_scope)
        start = s.start_time or 0
        end = s.end_time if s.end_time is not None else start
        status = s.status
        # The SDK's own containers: its public properties copy them (a MappingProxy,
        # a tuple) for every span, and the copy costs more than the conversion.
        events = s._events
        links = s._links
        attrs = s._attributes
        ev = [SpanEvent(e.name, e.timestamp, _plain(e.attributes), _dropped(e.attributes))
              for e in events] if events else None
        ln = [SpanLink(lk.context.trace_id.to_bytes(16, "big"),
                       lk.context.span_id.to_bytes(8, "big"),
                       _trace_state(lk.context.trace_state),
                       _flags(lk.context.trace_flags, lk.context),
                       _plain(lk.attributes), _dropped(lk.attributes))
              for lk in links] if links else None
        span = Span(
            s.name, ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big"),
            parent.span_id.to_bytes(8, "big") if parent is not None else None,
            _plain(attrs), None, status.status_code.value, start, end, s.kind.value + 1,
            service, ev, ln, status.description or None, _trace_state(ctx.trace_state),
            _flags(ctx.trace_flags, parent), res_attrs or None, scope_name, scope_version)
        d_attr = _dropped(attrs)
        d_ev = getattr(events, "dropped", 0)
        d_ln = getattr(links, "dropped", 0)
        if d_attr or d_ev or d_ln or res_dropped or res_url or scope_attrs \
                or scope_dropped or scope_url:
            return span, (d_attr, int(d_ev), int(d_ln), res_dropped, res_url, scope_attrs,
                          scope_dropped, scope_url)
        return span, None

    def spans(self, spans: Sequence[ReadableSpan]) -> tuple[list[Span], list[tuple[int, tuple]]]:
        """knhk ``Span`` objects, and ``(row, extras)`` for rows with fields a Span lacks."""
        out: list[Span] = []
        extras: list[tuple[int, tuple]] = []
        one = self.span
        for row, s in enumerate(spans):
            span, extra = one(s)
            out.append(span)
            if extra is not None:
                extras.append((row, extra))
        return out, extras

    def batch(self, spans: list[Span], extras: list[tuple[int, tuple]]) -> SpanBatch:
        if not spans:
            return SpanBatch.empty()
        batch = SpanBatch.from_spans(spans, default_service=self.default_service)
        if extras:
            batch = SpanBatch._wrap(_patch(batch.record_batch, len(spans), extras))
        return batch

    def convert(self, spans: Sequence[ReadableSpan]) -> SpanBatch:
        """SDK spans -> one SpanBatch in ``SPAN_SCHEMA``."""
        return self.batch(*self.spans(spans))

    def record(self, pipeline: Any, spans: Sequence[ReadableSpan]) -> int:
        """Record SDK spans into ``pipeline``; return how many it took.

        Spans whose every field a ``Span`` carries (nearly all) go straight into
        the pipeline's ring buffer in one call (``record_spans``); when some span
        has dropped counts, schema URLs or scope attributes, the whole lot is
        built as a batch, patched, and recorded with ``record_batch``. Measured:
        the direct path is about twice as fast, as the batch path encodes every
        span twice (into a batch, then into the pipeline's ring).
        """
        objs, extras = self.spans(spans)
        record_spans = getattr(pipeline, "record_spans", None)
        if not extras and callable(record_spans):
            return record_spans(objs)
        return pipeline.record_batch(self.batch(objs, extras))


def _patch(rb: pa.RecordBatch, n: int, extras: list[tuple[int, Any]]) -> pa.RecordBatch:
    rows = np.array([r for r, _ in extras], dtype=np.int64)
    vals = [v for _, v in extras]
    cols: dict[str, pa.Array] = {}
    for j, name in ((0, "dropped_attributes_count"), (1, "dropped_events_count"),
                    (2, "dropped_links_count"), (3, "resource_dropped_attributes_count"),
                    (6, "scope_dropped_attributes_count")):
        arr = np.zeros(n, dtype=np.uint32)
        arr[rows] = [v[j] for v in vals]
        cols[name] = pa.array(arr)
    for j, name in ((4, "resource_schema_url"), (7, "scope_schema_url")):
        full: list[str | None] = [None] * n
        for r, v in zip(rows.tolist(), vals, strict=True):
            full[r] = v[j]
        cols[name] = pa.array(full, pa.string()).dictionary_encode().cast(_DICT_STR)
    scope_rows: list[list[dict]] = [[] for _ in range(n)]
    for r, v in zip(rows.tolist(), vals, strict=True):
        if v[5]:
            scope_rows[r] = attribute_rows(v[5], "scope attributes")
    cols["scope_attributes"] = pa.array(scope_rows, type=ATTRIBUTES_TYPE)
    arrays = [cols.get(f.name, rb.column(i)) for i, f in enumerate(SPAN_SCHEMA)]
    return pa.RecordBatch.from_arrays(arrays, schema=SPAN_SCHEMA)


def spans_to_batch(spans: Iterable[ReadableSpan], *,
                   default_service: str = _DEFAULT_SERVICE) -> SpanBatch:
    """Convert OpenTelemetry SDK spans to one :class:`~knhk.SpanBatch`.

    Parameters
    ----------
    spans : iterable of opentelemetry.sdk.trace.ReadableSpan
        Ended spans, as a span processor or exporter receives them.
    default_service : str
        The ``service`` of spans whose resource has no ``service.name``.

    Returns
    -------
    SpanBatch
        One row per span, in order, every field mapped (see the module docstring).

    Examples
    --------
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    ...     InMemorySpanExporter)
    >>> memory = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(memory))
    >>> provider.get_tracer("t").start_span("work", attributes={"tags": ["a", "b"]}).end()
    >>> batch = spans_to_batch(memory.get_finished_spans())
    >>> batch.num_rows, batch.attribute_values("tags")
    (1, [['a', 'b']])
    """
    if isinstance(spans, ReadableSpan):
        raise TypeError("spans_to_batch takes an iterable of spans; wrap a single span "
                        "in a list")
    spans = list(spans)
    for i, s in enumerate(spans):
        if not isinstance(s, ReadableSpan):
            raise TypeError(f"spans[{i}] is {type(s).__name__}, expected an OpenTelemetry "
                            "SDK ReadableSpan")
    return _Converter(default_service).convert(spans)


def _check_pipeline(pipeline: Any, who: str) -> None:
    if not callable(getattr(pipeline, "record_batch", None)):
        raise TypeError(f"{who} needs a knhk.TelemetryPipeline (anything with record_batch), "
                        f"got {type(pipeline).__name__}")


class KnhkSpanProcessor(SpanProcessor):
    """An OpenTelemetry SDK ``SpanProcessor`` that records ended spans into a knhk pipeline.

    ``on_end`` only appends the span to a buffer (one lock, no conversion); a
    full buffer (``max_batch_size`` spans) is converted and recorded in one
    call into the pipeline's ring buffer, as is whatever is buffered every
    ``schedule_delay`` seconds (on a daemon thread) and on :meth:`force_flush`
    and :meth:`shutdown`. The instrumented thread that fills the buffer pays
    for the conversion of that batch; the others pay for an append. See
    ``benchmarks/bench_otel.py`` for what the choices cost.

    Parameters
    ----------
    pipeline : TelemetryPipeline
        Where spans go. It is not shut down with the processor unless
        ``shutdown_pipeline`` is True.
    max_batch_size : int
        Spans buffered before they are converted and recorded.
    schedule_delay : float
        Seconds after which buffered spans are recorded even if the buffer is
        not full; 0 disables the timer (then only a full buffer, force_flush
        or shutdown records them).
    export_unsampled : bool
        Also record spans whose trace flags say not sampled (spans that are
        recording only). Off by default, as the SDK's own processors.
    shutdown_pipeline : bool
        Shut the pipeline down when the processor is shut down (e.g. by
        ``TracerProvider.shutdown()``).

    Attributes
    ----------
    spans_received, spans_recorded, spans_dropped : int
        Spans ``on_end`` took, that the pipeline accepted, and that it refused
        or that arrived after shutdown.
    """

    def __init__(self, pipeline: Any, *, max_batch_size: int = 512,
                 schedule_delay: float = 0.2, export_unsampled: bool = False,
                 shutdown_pipeline: bool = False) -> None:
        _check_pipeline(pipeline, "KnhkSpanProcessor")
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) \
                or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(schedule_delay, int | float) or schedule_delay < 0:
            raise ValueError(f"schedule_delay must be seconds >= 0, got {schedule_delay!r}")
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.schedule_delay = float(schedule_delay)
        self.export_unsampled = bool(export_unsampled)
        self.shutdown_pipeline = bool(shutdown_pipeline)
        self._converter = _Converter(getattr(pipeline, "_service", None) or _DEFAULT_SERVICE)
        self._buffer: list[ReadableSpan] = []
        self._lock = threading.Lock()
        # Serialises conversions, so the pipeline sees spans in on_end order per flush.
        self._flush_lock = threading.Lock()
        self._closed = False
        self.spans_received = 0
        self.spans_recorded = 0
        self.spans_dropped = 0
        self._wake = threading.Event()
        self._timer: threading.Thread | None = None
        if self.schedule_delay > 0:
            self._timer = threading.Thread(target=self._tick, name="knhk-otel-flush",
                                           daemon=True)
            self._timer.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Buffer an ended span; record the buffer when it is full."""
        if not self.export_unsampled and not span.context.trace_flags.sampled:
            return
        with self._lock:
            if self._closed:
                self.spans_dropped += 1
                return
            self._buffer.append(span)
            self.spans_received += 1
            if len(self._buffer) < self.max_batch_size:
                return
            todo, self._buffer = self._buffer, []
        self._record(todo)

    def _record(self, todo: list[ReadableSpan]) -> None:
        with self._flush_lock:
            try:
                taken = self._converter.record(self.pipeline, todo)
            except Exception:
                # A span processor must never raise into the instrumented application.
                logger.exception("knhk: could not record %d spans", len(todo))
                taken = 0
            with self._lock:
                self.spans_recorded += taken
                self.spans_dropped += len(todo) - taken

    def _drain(self) -> None:
        with self._lock:
            todo, self._buffer = self._buffer, []
        if todo:
            self._record(todo)

    def _tick(self) -> None:
        while not self._wake.wait(self.schedule_delay):
            self._drain()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Record everything buffered and wait until the pipeline has exported it.

        Returns False if that took longer than ``timeout_millis``.
        """
        deadline = time.monotonic() + timeout_millis / 1000.0
        self._drain()
        flush = getattr(self.pipeline, "force_flush", None)
        if not callable(flush) or getattr(self.pipeline, "closed", False):
            return True
        return bool(flush(max(0.0, deadline - time.monotonic())))

    def shutdown(self) -> None:
        """Record everything buffered, stop the timer; spans ended later are dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        if self._timer is not None:
            self._timer.join()
        self._drain()
        if self.shutdown_pipeline:
            self.pipeline.shutdown()
        elif not getattr(self.pipeline, "closed", False):
            self.pipeline.force_flush()


class KnhkSpanExporter(SpanExporter):
    """An OpenTelemetry SDK ``SpanExporter`` that records span batches into a knhk pipeline.

    Use it behind the SDK's ``BatchSpanProcessor`` (which buffers on its own
    thread) or ``SimpleSpanProcessor``; :class:`KnhkSpanProcessor` does the
    same with one layer less.

    Parameters
    ----------
    pipeline : TelemetryPipeline
    shutdown_pipeline : bool
        Shut the pipeline down when the exporter is shut down.

    Examples
    --------
    >>> import knhk
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import BatchSpanProcessor
    >>> sink = knhk.InMemoryExporter()
    >>> pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(BatchSpanProcessor(
    ...     KnhkSpanExporter(pipeline, shutdown_pipeline=True)))
    >>> provider.get_tracer("t").start_span("a").end()
    >>> provider.shutdown()
    >>> sink.spans().num_rows
    1
    """

    def __init__(self, pipeline: Any, *, shutdown_pipeline: bool = False) -> None:
        _check_pipeline(pipeline, "KnhkSpanExporter")
        self.pipeline = pipeline
        self.shutdown_pipeline = bool(shutdown_pipeline)
        self._converter = _Converter(getattr(pipeline, "_service", None) or _DEFAULT_SERVICE)
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Record ``spans``; FAILURE if the pipeline refused any (or is shut down)."""
        if self._closed:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            taken = self._converter.record(self.pipeline, spans)
        except Exception:
            logger.exception("knhk: could not record %d spans", len(spans))
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if taken == len(spans) else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the pipeline has processed and exported what was recorded."""
        if self._closed or getattr(self.pipeline, "closed", False):
            return True
        return bool(self.pipeline.force_flush(timeout_millis / 1000.0))

    def shutdown(self) -> None:
        """Refuse further exports; flush (or shut down) the pipeline."""
        if self._closed:
            return
        self._closed = True
        if self.shutdown_pipeline:
            self.pipeline.shutdown()
        elif not getattr(self.pipeline, "closed", False):
            self.pipeline.force_flush()
