"""Prometheus exporter: a scrape endpoint for span metrics, service graphs, the pipeline's
own counters, stream aggregates and alerts, validation findings and user metric points.

What a scrape of ``/metrics`` shows:

* span-derived RED metrics, counted on every span before sampling (as the
  Collector's spanmetrics connector): ``calls_total{service, span_name,
  span_kind, status_code}`` and the histogram ``duration_seconds``;
* the service graph (as the servicegraph connector):
  ``traces_service_graph_request_total{client, server}``, ``..._failed_total``,
  ``traces_service_graph_request_server_seconds``, unpaired and dropped spans;
* the pipeline's own metrics (``knhk_pipeline_*``): events received,
  processed, dropped by reason, queue occupancy, export errors by exporter,
  processing latency; validation findings by id and level;
* stream processors' last closed windows as gauges (``knhk_window_*``: count,
  p50/p95/p99, error ratio, throughput by key) and alert counters;
* metric points recorded with ``record_metric``: counters, up-down counters,
  gauges and histograms, their attributes as labels, delta sums made cumulative.

Names follow OpenTelemetry's Prometheus compatibility specification
(:mod:`knhk.exporters._prom_names`); each metric has at most
``cardinality_limit`` series, new label sets beyond that folding into one
``otel_metric_overflow="true"`` series so that totals stay exact. The endpoint
answers in the text format 0.0.4, or OpenMetrics 1.0 when the ``Accept``
header asks for it; the exporter is also a ``prometheus_client`` collector
(``registry.register(exporter)``).

Example
-------
>>> import knhk
>>> from knhk.exporters.prometheus import PrometheusExporter
>>> prom = PrometheusExporter(start_server=False)
>>> with (knhk.TelemetryPipeline.builder().with_exporter(prom).build()) as pipeline:
...     _ = pipeline.record_span(knhk.Span("GET /", trace_id=1, span_id=1, service="api"))
...     _ = pipeline.record_metric("queue.depth", 3, unit="{items}")
...     _ = pipeline.force_flush()
>>> text = prom.collect_text().decode()
>>> for line in text.splitlines():
...     if line.startswith(("calls_total", "queue")):
...         print(line)
calls_total{service="api",span_kind="SPAN_KIND_INTERNAL",span_name="GET /",\
status_code="STATUS_CODE_UNSET"} 1
queue_depth 3
"""

from __future__ import annotations

import gzip
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from knhk.batch import MetricBatch, SpanBatch
from knhk.exporters._prom_families import Family
from knhk.exporters._prom_names import label_pairs, metric_name
from knhk.exporters._prom_spans import ServiceGraph, SpanMetrics, _Strings
from knhk.exporters.base import Exporter, ExportResult
from knhk.schema import MetricKind, Temporality

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "DEFAULT_DURATION_BUCKETS_MS",
    "PrometheusExporter",
]

logger = logging.getLogger(__name__)

#: The spanmetrics connector's default buckets, in milliseconds.
DEFAULT_DURATION_BUCKETS_MS = (2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0,
                               1000.0, 1400.0, 2000.0, 5000.0, 10000.0, 15000.0)
#: Buckets of the pipeline's processing latency, in seconds.
LATENCY_BUCKETS_S = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                     0.1, 0.25, 0.5, 1.0)

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_FINDING_LEVELS = {1: "information", 2: "improvement", 3: "violation"}
_WINDOW_TIME_COLUMNS = ("window_start", "window_end")


def _finding_levels() -> dict[str, str]:
    """Finding id -> level name, as the compiled validator assigns them."""
    try:
        from knhk.validation.validator import C
    except Exception:  # pragma: no cover - the validator's kernels are not built
        return {}
    return {cid: _FINDING_LEVELS.get(int(lvl), "unknown")
            for cid, lvl in zip(C.CODE_IDS, C.CODE_LEVELS, strict=True)}


def _window_metric(column: str, duration: bool) -> tuple[str, float]:
    """A window result column -> its gauge's name and the factor to its unit
    (``p99_duration_ms`` -> ``knhk_window_duration_p99_seconds``, 1e-3).

    ``duration``: the processor aggregates span durations (milliseconds), so
    sum, avg, min and max are durations too.
    """
    fixed = {"count": "knhk_window_spans", "error_rate": "knhk_window_error_ratio",
             "throughput": "knhk_window_throughput_per_second"}
    if column in fixed:
        return fixed[column], 1.0
    if column in ("sum", "avg", "min", "max"):
        if duration:
            return f"knhk_window_duration_{column}_seconds", 1e-3
        return f"knhk_window_value_{column}", 1.0
    if column.endswith("_duration_ms"):
        return f"knhk_window_duration_{column[:-len('_duration_ms')]}_seconds", 1e-3
    return metric_name(f"knhk_window_{column}", None, "gauge"), 1.0


def _accepts_openmetrics(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers OpenMetrics to the text format 0.0.4."""
    if not accept:
        return False
    best_om, best_text = -1.0, -1.0
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if media == "application/openmetrics-text":
            best_om = max(best_om, q)
        elif media in ("text/plain", "text/*", "*/*"):
            best_text = max(best_text, q)
    return best_om > 0 and best_om >= best_text


class _Handler(BaseHTTPRequestHandler):
    exporter: PrometheusExporter  # set on the subclass the server is built with

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/metrics/"):
            self.send_error(404, "knhk serves /metrics")
            return
        om = _accepts_openmetrics(self.headers.get("Accept"))
        try:
            payload = self.exporter.collect_text(openmetrics=om)
        except Exception:
            logger.exception("the Prometheus scrape failed")
            self.send_error(500, "collecting the metrics failed; see the knhk log")
            return
        headers = {"Content-Type": CONTENT_TYPE_OPENMETRICS if om else CONTENT_TYPE_TEXT}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            payload = gzip.compress(payload, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("scrape from %s: " + format, self.address_string(), *args)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Stage:
    """The pipeline stage: span metrics and the service graph from every span."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def process(self, batch: SpanBatch) -> None:
        self._exporter._observe_spans(batch)
        return None

    def poll(self) -> None:
        self._exporter._expire()
        return None

    def flush(self) -> None:
        self._exporter._flush_graph()
        return None

    def __repr__(self) -> str:
        return "PrometheusExporter.pipeline_stage()"


class _WindowObserver:
    """Registered as a stream processor's detector: sees every closed window's results
    (without taking them from ``get_results``) and raises no alerts."""

    name = "knhk.prometheus"

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def observe(self, table: Any, key_names: Sequence[str] = ()) -> list:
        self._exporter._observe_windows(table, tuple(key_names))
        return []


class PrometheusExporter(Exporter):
    """A Prometheus scrape endpoint over what a pipeline sees.

    Parameters
    ----------
    host : str
        Interface to listen on.
    port : int
        TCP port (0 picks a free one; :attr:`port` is the bound one).
    duration_buckets_ms : sequence of float
        Upper bounds of the span duration histogram, milliseconds (the
        service graph's latency uses the same bounds in seconds).
    cardinality_limit : int
        Most series per metric, the overflow series included.
    start_server : bool
        Start the HTTP server when the pipeline binds this exporter.
    stream_processor : StreamProcessor, optional
        Same as :meth:`add_stream_processor`.
    service_graph_ttl : float
        Seconds a span waits for its parent (or its children) across batches.
    service_graph_max_items : int
        Most spans held for pairing (and most waiting children).
    metric_expiration : float or None
        Seconds after which a stream-window gauge or a user metric's series
        that nothing updated is no longer exposed (as the Collector's
        Prometheus exporter's ``metric_expiration``, default 5 minutes): a
        key that stopped appearing does not keep its last value forever.
        None keeps every series. Span-derived counters never expire.

    Examples
    --------
    >>> prom = PrometheusExporter(port=0).start()
    >>> prom.url.startswith("http://localhost:") and prom.port > 0
    True
    >>> prom.shutdown()
    """

    name = "prometheus"

    def __init__(self, host: str = "localhost", port: int = 9464, *,
                 duration_buckets_ms: Sequence[float] = DEFAULT_DURATION_BUCKETS_MS,
                 cardinality_limit: int = 2000, start_server: bool = True,
                 stream_processor: Any = None, service_graph_ttl: float = 10.0,
                 service_graph_max_items: int = 100_000,
                 metric_expiration: float | None = 300.0) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"The host must be a non-empty str, got {host!r}.")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"The port must be an int in [0, 65535], got {port!r}.")
        if not isinstance(cardinality_limit, int) or isinstance(cardinality_limit, bool) \
                or cardinality_limit < 2:
            raise ValueError(
                f"The cardinality limit must be an int >= 2, got {cardinality_limit!r}.")
        try:
            bounds = [float(b) for b in duration_buckets_ms]
        except (TypeError, ValueError):
            raise ValueError("duration_buckets_ms must be a sequence of numbers, got "
                             f"{duration_buckets_ms!r}.") from None
        if not bounds or any(not math.isfinite(b) for b in bounds) or \
                any(b >= a for b, a in itertools.pairwise(bounds)):
            raise ValueError("duration_buckets_ms must be finite numbers, increasing strictly, "
                             f"got {duration_buckets_ms!r}.")
        if not isinstance(service_graph_ttl, int | float) or not service_graph_ttl > 0:
            raise ValueError(f"service_graph_ttl must be a positive number of seconds, "
                             f"got {service_graph_ttl!r}.")
        if not isinstance(service_graph_max_items, int) or service_graph_max_items < 1:
            raise ValueError(f"service_graph_max_items must be a positive int, "
                             f"got {service_graph_max_items!r}.")
        if metric_expiration is not None and (
                isinstance(metric_expiration, bool)
                or not isinstance(metric_expiration, int | float)
                or not metric_expiration > 0):
            raise ValueError(f"metric_expiration must be a positive number of seconds or "
                             f"None, got {metric_expiration!r}.")
        self.metric_expiration = metric_expiration
        self._series_expired = 0
        self.host = host
        self._port = port
        self.cardinality_limit = cardinality_limit
        self.start_server = bool(start_server)
        self.duration_buckets_ms = tuple(bounds)
        self._lock = threading.RLock()
        services = _Strings()
        self._red = SpanMetrics(bounds, limit=cardinality_limit, services=services)
        self._graph = ServiceGraph([b / 1000.0 for b in bounds], limit=cardinality_limit,
                                   ttl=float(service_graph_ttl),
                                   max_items=service_graph_max_items, services=services)
        self._windows: dict[str, Family] = {}
        self._user: dict[str, Family] = {}
        self._user_names: dict[tuple, tuple[str, str]] = {}
        self._points_dropped: dict[str, int] = {}
        self._points = 0
        self._reserved = {f.name for f in self._span_families()}
        self._pipeline: Any = None
        self._latency = Family("knhk_pipeline_processing_latency_seconds", "histogram",
                               "Time a batch spends in the pipeline's stages.",
                               limit=2, bounds=LATENCY_BUCKETS_S)
        self._latency_seen = 0
        self._processors: list[Any] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._levels: dict[str, str] | None = None
        if stream_processor is not None:
            self.add_stream_processor(stream_processor)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once the server runs, else the configured one."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> PrometheusExporter:
        """Start the scrape server (once; later calls do nothing). Returns self.

        Raises
        ------
        OSError
            The address cannot be bound (in use, not an address of this host);
            the message names host and port.
        """
        with self._lock:
            if self._server is not None:
                return self
            handler = type("KnhkMetricsHandler", (_Handler,), {"exporter": self})
            server_cls = _Server6 if ":" in self.host else ThreadingHTTPServer
            try:
                server = server_cls((self.host, self._port), handler)
            except OSError as exc:
                raise OSError(exc.errno, f"the Prometheus endpoint cannot listen on "
                                         f"{self.host}:{self._port}: {exc.strerror or exc}"
                              ) from None
            server.daemon_threads = True
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever,
                                            kwargs={"poll_interval": 0.2},
                                            name="knhk-prometheus", daemon=True)
            self._thread.start()
            logger.info("serving Prometheus metrics at %s", self.url)
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the scrape server (the metrics stay readable with :meth:`collect_text`)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            if thread is not None:
                thread.join(timeout)

    # -- pipeline hooks --------------------------------------------------------------

    def pipeline_stage(self) -> _Stage:
        """The stage the pipeline runs before sampling: RED metrics and the service graph."""
        return _Stage(self)

    def bind_pipeline(self, pipeline: Any) -> None:
        """Report on ``pipeline``'s stats (and its validator); start the server if asked.

        Raises
        ------
        OSError
            The port cannot be bound (as :meth:`start`).
        """
        with self._lock:
            self._pipeline = pipeline
            self._latency_seen = 0
        if self.start_server:
            self.start()

    def add_stream_processor(self, processor: Any) -> None:
        """Expose ``processor``'s closed windows as gauges and its alerts as counters.

        The exporter registers itself as a detector of the processor (it raises
        no alerts), so it sees every closed window without taking the results
        that ``get_results()`` returns.
        """
        if not callable(getattr(processor, "add_detector", None)) or \
                not callable(getattr(processor, "counters", None)):
            raise ValueError("add_stream_processor takes a knhk.stream.StreamProcessor, got "
                             f"{type(processor).__name__}")
        with self._lock:
            if any(p is processor for p in self._processors):
                return
            self._processors.append(processor)
        processor.add_detector(_WindowObserver(self))

    # -- input -----------------------------------------------------------------------

    def _observe_spans(self, batch: SpanBatch) -> None:
        with self._lock:
            self._red.update(batch)
            self._graph.update(batch)
            self._fold_latency()

    def _expire(self) -> None:
        with self._lock:
            self._graph.expire()

    def _flush_graph(self) -> None:
        with self._lock:
            self._graph.flush()

    def _observe_windows(self, table: Any, key_names: tuple[str, ...]) -> None:
        if table.num_rows == 0:
            return
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        keys = [k for k in key_names if k in cols]
        values = [c for c in table.column_names
                  if c not in keys and c not in _WINDOW_TIME_COLUMNS]
        duration = any(c.endswith("_duration_ms") for c in values)
        with self._lock:
            fams = []
            for c in [*values, "window_end"]:
                if c == "window_end":
                    name, scale = "knhk_window_end_timestamp_seconds", 1e-9
                else:
                    name, scale = _window_metric(c, duration)
                fam = self._windows.get(name)
                if fam is None:
                    fam = self._windows[name] = Family(
                        name, "gauge", f"Stream window aggregate {c!r} of the last closed "
                        "window, by key.", limit=self.cardinality_limit, expires=True)
                fams.append((c, fam, scale))
            now = time.monotonic()
            for r in range(table.num_rows):
                pairs = label_pairs((k, cols[k][r]) for k in keys)
                for c, fam, scale in fams:
                    v = cols[c][r]
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        continue
                    fam.set(pairs, v * scale if scale != 1.0 else v, now=now)

    def export(self, batch: Any) -> ExportResult:
        """Fold metric points into the exposed families; spans need nothing here.

        Returns FAILURE (and logs why) for something that is neither a
        SpanBatch nor a MetricBatch (nor a RecordBatch in ``METRIC_SCHEMA``).
        """
        if isinstance(batch, SpanBatch):
            return ExportResult.SUCCESS
        if not isinstance(batch, MetricBatch):
            try:
                batch = MetricBatch(batch)
            except Exception as exc:
                logger.error("PrometheusExporter.export takes a SpanBatch or MetricBatch, "
                             "got %s (%s)", type(batch).__name__, exc)
                return ExportResult.FAILURE
        self._fold_points(batch)
        return ExportResult.SUCCESS

    def _drop(self, reason: str, name: str) -> None:
        self._points_dropped[reason] = self._points_dropped.get(reason, 0) + 1
        if self._points_dropped[reason] == 1:
            logger.warning("metric %r not exposed to Prometheus: %s (counted in "
                           "knhk_prometheus_points_dropped_total)", name, reason)

    def _user_family(self, name: str, unit: str | None, prom_type: str, help: str,
                     bounds: Sequence[float] | None) -> Family | None:
        key = (name, unit, prom_type)
        hit = self._user_names.get(key)
        pname = hit[0] if hit else metric_name(name, unit, prom_type)
        if hit is None:
            self._user_names[key] = (pname, prom_type)
        if pname in self._reserved or pname.startswith("knhk_"):
            self._drop("reserved_name", name)
            return None
        fam = self._user.get(pname)
        if fam is None:
            # a histogram's family keeps its first point's bounds
            return self._user.setdefault(pname, Family(
                pname, prom_type, help or name, limit=self.cardinality_limit, bounds=bounds,
                expires=True))
        if fam.type != prom_type:
            self._drop("type_conflict", name)
            return None
        if prom_type == "histogram" and \
                tuple(b for b in bounds or () if b != math.inf) != fam.bounds:
            self._drop("histogram_bounds_changed", name)
            return None
        return fam

    def _fold_points(self, batch: MetricBatch) -> None:
        from knhk._attributes import attribute_value

        rb = batch.record_batch
        cols = {c: rb.column(c).to_pylist() for c in (
            "name", "description", "unit", "kind", "temporality", "monotonic", "value",
            "int_value", "sum", "bounds", "bucket_counts", "attributes")}
        with self._lock:
            now = time.monotonic()
            for i in range(rb.num_rows):
                name = cols["name"][i]
                kind = cols["kind"][i]
                delta = cols["temporality"][i] == Temporality.DELTA
                if kind == MetricKind.HISTOGRAM:
                    prom_type = "histogram"
                elif kind == MetricKind.COUNTER and cols["monotonic"][i]:
                    prom_type = "counter"
                else:
                    prom_type = "gauge"
                raw_bounds = cols["bounds"][i] if prom_type == "histogram" else None
                try:
                    pairs = label_pairs((a["key"], attribute_value(a))
                                        for a in cols["attributes"][i])
                except Exception as exc:  # an unreadable attribute value
                    logger.debug("metric %r: unreadable attribute (%s)", name, exc)
                    self._drop("invalid_attribute", name)
                    continue
                fam = self._user_family(name, cols["unit"][i], prom_type,
                                        cols["description"][i] or "", raw_bounds)
                if fam is None:
                    continue
                if prom_type == "histogram":
                    if any(k == "le" for k, _ in pairs):
                        pairs = tuple(sorted(("key_le" if k == "le" else k, v)
                                             for k, v in pairs))
                    counts = list(cols["bucket_counts"][i] or ())
                    if len(raw_bounds or ()) and raw_bounds[-1] == math.inf:
                        counts[-2:] = [counts[-2] + counts[-1]]  # a +Inf bound is the +Inf bucket
                    s = cols["sum"][i]
                    fam.set_histogram(pairs, counts, math.nan if s is None else s,
                                      cumulative=not delta, now=now)
                else:
                    v = cols["int_value"][i]
                    if v is None:
                        v = cols["value"][i]
                    is_sum = kind in (MetricKind.COUNTER, MetricKind.UP_DOWN_COUNTER)
                    if is_sum and delta:
                        fam.add(pairs, v, now=now)
                    else:
                        fam.set(pairs, v, cumulative_sum=is_sum, now=now)
                self._points += 1

    # -- output ----------------------------------------------------------------------

    def _span_families(self) -> list[Family]:
        g = self._graph
        return [self._red.calls, self._red.duration, g.requests, g.failed, g.latency,
                g.unpaired, g.dropped]

    def _fold_latency(self) -> None:
        """Add the batches processed since the last look to the latency histogram.

        Batches that left the pipeline's window of recent latencies unseen (more
        than its length between two looks) are counted in
        ``knhk_pipeline_batches_processed_total`` only.
        """
        p = self._pipeline
        if p is None:
            return
        self._latency_seen, lat_us = p.processing_latencies(self._latency_seen)
        if lat_us.size:
            v = lat_us / 1e6  # microseconds -> seconds
            b = np.asarray(self._latency.bounds)
            counts = np.bincount(np.searchsorted(b, v, side="left"), minlength=len(b) + 1)
            i = self._latency.series(())
            self._latency.buckets[i] += counts
            self._latency.sums[i] += float(v.sum())

    def _snapshot(self) -> dict[str, Any]:
        """What the scrape reads from others, taken before the exporter's lock: a stream
        processor holds its own lock while it hands windows to this exporter."""
        p = self._pipeline
        snap: dict[str, Any] = {"stats": None, "validation": None, "processors": [],
                                "balancers": []}
        if p is not None:
            snap["stats"] = p.stats()
            from knhk.exporters.loadbalancing import LoadBalancingExporter

            snap["balancers"] = [ex.stats() for ex in getattr(p, "exporters", ())
                                 if isinstance(ex, LoadBalancingExporter)]
            validator = getattr(p, "validator", None)
            if validator is not None:
                snap["validation"] = validator.stats()
        for proc in list(self._processors):
            snap["processors"].append((proc.cep_rule_names, proc.counters()))
        return snap

    def _scrape_families(self, snap: dict[str, Any]) -> list[Family]:
        """Families computed at scrape time: the pipeline's stats, validation, stream
        counters, the exporter's own counters."""
        lim = self.cardinality_limit
        out: list[Family] = []

        def fam(name: str, kind: str, help: str, items: Iterable[tuple[tuple, Any]]) -> None:
            f = Family(name, kind, help, limit=lim)
            for pairs, v in items:
                f.set(pairs, v, cumulative_sum=kind == "counter")
            out.append(f)

        s = snap["stats"]
        if s is not None:
            fam("knhk_pipeline_events_received_total", "counter",
                "Spans offered to the pipeline.", [((), s.events_received)])
            fam("knhk_pipeline_events_processed_total", "counter",
                "Spans that went through the pipeline's stages.", [((), s.events_processed)])
            fam("knhk_pipeline_events_dropped_total", "counter",
                "Events dropped, by reason.",
                [((("reason", str(r)),), n) for r, n in sorted(s.dropped_by_reason.items())])
            fam("knhk_pipeline_events_sampled_out_total", "counter",
                "Spans a sampler decided not to export.", [((), s.events_sampled_out)])
            fam("knhk_pipeline_events_refused_total", "counter",
                "Spans refused whole (their sender retries).", [((), s.events_refused)])
            fam("knhk_pipeline_metric_points_received_total", "counter",
                "Metric points offered to the pipeline.", [((), s.metrics_received)])
            fam("knhk_pipeline_batches_processed_total", "counter",
                "Batches that went through the stages.", [((), s.batches_processed)])
            fam("knhk_pipeline_stage_errors_total", "counter",
                "Stages that raised on a batch.", [((), s.stage_errors)])
            fam("knhk_pipeline_queue_occupancy_ratio", "gauge",
                "Fill of the pipeline's ring buffer, 0 to 1.", [((), s.queue_occupancy)])
            fam("knhk_pipeline_queued_events", "gauge",
                "Spans waiting in the ring buffer.", [((), s.queued_events)])
            ex = sorted(s.exporters.items())
            fam("knhk_pipeline_export_errors_total", "counter",
                "Batches an exporter failed to export, by exporter.",
                [((("exporter", n),), st.get("export_errors", 0)) for n, st in ex])
            fam("knhk_pipeline_exported_events_total", "counter",
                "Events an exporter exported, by exporter.",
                [((("exporter", n),), st.get("events_exported", 0)) for n, st in ex])
            fam("knhk_pipeline_export_queue_batches", "gauge",
                "Batches waiting in an exporter's queue, by exporter.",
                [((("exporter", n),), st.get("queued_batches", 0)) for n, st in ex])
            fam("knhk_pipeline_processing_latency_p99_seconds", "gauge",
                "p99 of the time recent batches spent in the stages.",
                [((), s.p99_processing_latency_us / 1e6)])
            self._fold_latency()
            if len(self._latency):
                out.append(self._latency)
            vs = snap["validation"]
            if vs is not None:
                if self._levels is None:
                    self._levels = _finding_levels()
                fam("knhk_validation_findings_total", "counter",
                    "Weaver validation findings, by finding id and level.",
                    [((("id", fid), ("level", self._levels.get(fid, "unknown"))), n)
                     for fid, n in sorted(vs.findings_by_type.items())])
                fam("knhk_validation_events_total", "counter",
                    "Events validated against the registry.", [((), vs.total_validations)])
        alerts: dict[tuple, int] = {}
        severities: dict[str, int] = {}
        stream: dict[str, int] = {}
        for cep, counters in snap["processors"]:
            for k, v in counters.items():
                if k.startswith("alerts_rule:"):
                    rule = k[len("alerts_rule:"):]
                    src = "cep" if rule in cep else "anomaly"
                    alerts[(rule, src)] = alerts.get((rule, src), 0) + v
                elif k == "alerts_total":
                    continue  # the sum of knhk_stream_alerts_total's series
                elif k.startswith("alerts_") and k != "alerts_suppressed":
                    sev = k[len("alerts_"):]
                    severities[sev] = severities.get(sev, 0) + v
                else:
                    stream[k] = stream.get(k, 0) + v
        if snap["processors"]:
            fam("knhk_stream_alerts_total", "counter",
                "Alerts raised by CEP rules and anomaly detectors, by rule and source.",
                [((("rule", r), ("source", src)), n) for (r, src), n in sorted(alerts.items())])
            fam("knhk_stream_alerts_by_severity_total", "counter", "Alerts by severity.",
                [((("severity", sev),), n) for sev, n in sorted(severities.items())])
            for k, v in sorted(stream.items()):
                fam(metric_name(f"knhk_stream_{k}", None, "counter"), "counter",
                    f"Stream processor counter {k!r}.", [((), v)])
        balancers = snap.get("balancers") or []
        if balancers:
            per = [(ep, st) for b in balancers for ep, st in sorted(b["endpoints"].items())]
            fam("knhk_loadbalancer_endpoints", "gauge",
                "Endpoints the load-balancing exporter routes to now.",
                [((), sum(b["endpoints_active"] for b in balancers))])
            fam("knhk_loadbalancer_membership_changes_total", "counter",
                "Changes of the load balancer's set of endpoints.",
                [((), sum(b["membership_changes"] for b in balancers))])
            fam("knhk_loadbalancer_resolve_errors_total", "counter",
                "Failed resolutions of the load balancer's endpoints (DNS, file).",
                [((), sum(b["resolve_errors"] for b in balancers))])
            fam("knhk_loadbalancer_spans_routed_total", "counter",
                "Spans routed to each endpoint by the load balancer.",
                [((("endpoint", ep),), st["spans_routed"]) for ep, st in per])
            fam("knhk_loadbalancer_spans_exported_total", "counter",
                "Spans each endpoint accepted.",
                [((("endpoint", ep),), st["spans_exported"]) for ep, st in per])
            fam("knhk_loadbalancer_spans_failed_total", "counter",
                "Spans given up on, by endpoint.",
                [((("endpoint", ep),), st["spans_failed"]) for ep, st in per])
            fam("knhk_loadbalancer_endpoint_active", "gauge",
                "1 while an endpoint is in the routing table, 0 once it left.",
                [((("endpoint", ep),), int(st["active"])) for ep, st in per])
        fam("knhk_prometheus_points_dropped_total", "counter",
            "Metric points not exposed (name or type conflicts, unreadable attributes).",
            [((("reason", r),), n) for r, n in sorted(self._points_dropped.items())])
        fam("knhk_prometheus_series_expired_total", "counter",
            "Window and metric-point series dropped after metric_expiration without "
            "an update.", [((), self._series_expired)])
        over = [f for f in (*self._span_families(), *self._windows.values(),
                            *self._user.values()) if f.overflowed_sets]
        fam("knhk_prometheus_overflow_label_sets_total", "counter",
            "Label sets folded into a metric's otel_metric_overflow series, by metric.",
            [((("metric", f.name),), f.overflowed_sets) for f in over])
        return out

    def _families(self, snap: dict[str, Any]) -> list[Family]:
        self._graph.expire()
        if self.metric_expiration is not None:
            cutoff = time.monotonic() - self.metric_expiration
            for f in (*self._windows.values(), *self._user.values()):
                self._series_expired += f.drop_stale(cutoff)
        fams = [*self._span_families(), *self._scrape_families(snap)]
        fams += list(self._windows.values())
        fams += list(self._user.values())
        return fams

    def collect_text(self, openmetrics: bool = False) -> bytes:
        """What a scrape returns: the text format 0.0.4, or OpenMetrics 1.0.

        Examples
        --------
        >>> PrometheusExporter(start_server=False).collect_text(openmetrics=True)[-6:]
        b'# EOF\\n'
        """
        out: list[str] = []
        snap = self._snapshot()
        with self._lock:
            fams = [f.snapshot() for f in self._families(snap)]
        for f in fams:
            f.render(out, openmetrics=openmetrics)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode("utf-8")

    def collect(self) -> Iterator[Any]:
        """The metric families as ``prometheus_client`` metrics: the exporter is a
        collector (``prometheus_client.REGISTRY.register(exporter)``)."""
        snap = self._snapshot()
        with self._lock:
            fams = [f.snapshot() for f in self._families(snap) if len(f)]
        yield from (f.to_metric() for f in fams)

    def force_flush(self, timeout: float | None = None) -> bool:
        return True

    def __repr__(self) -> str:
        state = "serving " + self.url if self._server is not None else "not serving"
        return f"PrometheusExporter({state})"

