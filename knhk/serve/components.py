"""Factories: a checked ``knhk serve`` configuration -> running knhk objects.

:func:`build` turns the configuration of :mod:`knhk.serve.config` into one
:class:`~knhk.TelemetryPipeline` per entry of ``service.pipelines`` (each with
its own processors and exporter instances) and the OTLP receivers feeding
them. Nothing listens until :meth:`Built.start`.

How processors map onto a knhk pipeline, whose stage order is fixed (the
order of ``processors`` in a pipeline only matters among ``red_windows`` and
``service_graph``): ``batch`` and ``memory_limiter`` configure the ring
buffer; ``knhk_validation`` is the first stage; ``red_windows`` and
``service_graph`` see every span, before sampling; then
``probabilistic_sampler`` or ``adaptive_sampling``; ``tail_sampling`` last.

A receiver's spans go to the ``traces`` pipeline that lists it; its metric
points to the ``metrics`` pipeline that lists it or, without one, to its
traces pipeline (a knhk pipeline carries both signals).

Example
-------
>>> import tempfile
>>> from knhk.serve.components import build
>>> built = build({"receivers": {"otlp": {"protocols": {"http": {"endpoint": "localhost:0"}}}},
...                "exporters": {"debug": {}},
...                "service": {"pipelines": {"traces": {"receivers": ["otlp"],
...                                                     "exporters": ["debug"]}}}})
>>> sorted(built.pipelines)
['traces']
>>> built.start().listening[0][1]
'OTLP/HTTP'
>>> built.shutdown(5.0)
True
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from knhk.exporters.base import Exporter, ExportResult
from knhk.serve.config import ConfigError, component_type, parse_duration

logger = logging.getLogger(__name__)

__all__ = ["Built", "DebugExporter", "ServiceGraphStage", "build", "default_registry",
           "otlp_config_from"]


def default_registry() -> str | None:
    """``./registry``, else the registry bundled with the package (or beside a source tree)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.getcwd(), "registry"),
                      os.path.join(package, "_registry"),
                      os.path.join(os.path.dirname(package), "registry")):
        if os.path.isfile(os.path.join(candidate, "registry_manifest.yaml")) or \
                os.path.isfile(os.path.join(candidate, "manifest.yaml")):
            return candidate
    return None


# -- knhk components without a home elsewhere ------------------------------------------


class DebugExporter(Exporter):
    """The Collector's ``debug`` exporter: logs what passes, at ``verbosity``.

    ``basic`` logs one line per batch; ``normal`` adds spans per service;
    ``detailed`` logs every span.

    Examples
    --------
    >>> import knhk
    >>> DebugExporter("normal").export(knhk.SpanBatch.from_spans(
    ...     [knhk.Span("op", trace_id=1, span_id=1)]))
    <ExportResult.SUCCESS: 0>
    """

    name = "debug"
    queue_size = 64

    def __init__(self, verbosity: str = "basic") -> None:
        if verbosity not in ("basic", "normal", "detailed"):
            raise ValueError(f"verbosity must be basic, normal or detailed, got {verbosity!r}.")
        self.verbosity = verbosity
        self.spans = 0
        self.metric_points = 0

    def export(self, batch: Any) -> ExportResult:
        from knhk.batch import SpanBatch

        rb = batch.record_batch
        if isinstance(batch, SpanBatch):
            self.spans += rb.num_rows
            what = "spans"
        else:
            self.metric_points += rb.num_rows
            what = "metric points"
        extra: dict[str, Any] = {}
        if self.verbosity != "basic" and "service" in rb.schema.names:
            counts = pc.value_counts(rb.column("service").dictionary_decode()
                                             if pa.types.is_dictionary(rb.column("service").type)
                                             else rb.column("service"))
            extra["by_service"] = {str(v["values"]): int(v["counts"])
                                   for v in counts.to_pylist()}
        logger.info("debug exporter: %d %s", rb.num_rows, what,
                    extra={"knhk": {"rows": rb.num_rows, "signal": what, **extra}})
        if self.verbosity == "detailed":
            for row in rb.to_pylist():
                logger.info("debug exporter: %s", {k: v for k, v in row.items()
                                                   if k not in ("attributes", "events", "links")})
        return ExportResult.SUCCESS


class ServiceGraphStage:
    """A pipeline stage that builds the service call graph of completed traces.

    Spans pass through untouched; a private
    :class:`~knhk.tracing.TraceCompletion` holds references to them until
    their trace is complete, then :meth:`~knhk.tracing.TraceSet.service_call_graph`
    adds the trace's edges to running totals. Every ``metrics_interval``
    seconds the edges of the traces completed since the last emission are
    recorded into the bound pipeline as the Collector servicegraph
    connector's metrics (:func:`~knhk.tracing.service_graph_metrics`), unless
    the processor says ``metrics: false``; the interval's p99 latency is the
    largest p99 of its releases.

    Parameters
    ----------
    idle_timeout, max_wait : float
        As for :class:`~knhk.tracing.TraceCompletion`.
    max_traces : int
        Traces held at most.
    metrics_interval : float
        Seconds between metric emissions.

    Examples
    --------
    >>> import knhk
    >>> stage = ServiceGraphStage(idle_timeout=0.01)
    >>> stage.process(knhk.SpanBatch.from_spans([
    ...     knhk.Span("GET /", trace_id=1, span_id=1, duration_ns=9, service="front"),
    ...     knhk.Span("q", trace_id=1, span_id=2, parent_span_id=1, duration_ns=4,
    ...               service="db")]))
    >>> stage.flush()
    >>> stage.edges().to_pylist()[0]["client"], stage.edges().to_pylist()[0]["calls"]
    ('front', 1)
    """

    def __init__(self, idle_timeout: float = 2.0, max_wait: float = 30.0, *,
                 max_traces: int = 50_000, metrics_interval: float = 15.0) -> None:
        from knhk.tracing import TraceCompletion

        if not metrics_interval > 0:
            raise ValueError(f"metrics_interval must be positive, got {metrics_interval!r}.")
        self._completion = TraceCompletion(idle_timeout, max_wait, max_traces=max_traces,
                                           on_complete=self._on_complete)
        self.metrics_interval = float(metrics_interval)
        self.pipeline: Any = None
        self._lock = threading.Lock()
        self._total: dict[tuple[str, str], list[int]] = {}
        self._interval: dict[tuple[str, str], list[float]] = {}
        self._next_emit = time.monotonic() + self.metrics_interval
        self.traces = 0

    def _on_complete(self, traces: Any) -> None:
        edges = traces.service_call_graph().to_pylist()
        with self._lock:
            self.traces += len(traces)
            for e in edges:
                key = (e["client"], e["server"])
                tot = self._total.setdefault(key, [0, 0, 0])
                tot[0] += e["calls"]
                tot[1] += e["errors"]
                tot[2] += e["latency_total_ns"]
                cur = self._interval.setdefault(key, [0, 0, 0, 0])
                cur[0] += e["calls"]
                cur[1] += e["errors"]
                cur[2] += e["latency_total_ns"]
                cur[3] = max(cur[3], e["latency_p99_ns"])

    def process(self, batch: Any) -> None:
        self._completion.process(batch)
        self._completion.pop_counters()
        return None  # spans go on unchanged

    def poll(self) -> None:
        self._completion.poll()
        self._completion.pop_counters()
        if time.monotonic() >= self._next_emit:
            self._next_emit = time.monotonic() + self.metrics_interval
            self._emit()
        return None

    def flush(self) -> None:
        self._completion.flush()
        self._completion.pop_counters()
        return None

    def _emit(self) -> None:
        from knhk.tracing import service_graph_metrics

        with self._lock:
            interval, self._interval = self._interval, {}
        if not interval or self.pipeline is None:
            return
        table = pa.table({
            "client": [k[0] for k in interval], "server": [k[1] for k in interval],
            "calls": pa.array([v[0] for v in interval.values()], pa.int64()),
            "errors": pa.array([v[1] for v in interval.values()], pa.int64()),
            "latency_avg_ns": pa.array([v[2] / max(v[0], 1) for v in interval.values()],
                                       pa.float64()),
            "latency_p99_ns": pa.array([v[3] for v in interval.values()], pa.int64()),
        })
        metrics = service_graph_metrics(table, time_ns=time.time_ns())
        taken = self.pipeline.try_record_metric_batch(metrics)
        if taken is None:
            logger.warning("service graph: the pipeline had no room for %d metric points",
                           metrics.num_rows)

    def edges(self) -> pa.Table:
        """Running totals: ``client``, ``server``, ``calls``, ``errors``, ``latency_avg_ms``."""
        with self._lock:
            items = sorted(self._total.items())
        return pa.table({
            "client": pa.array([k[0] for k, _ in items], pa.string()),
            "server": pa.array([k[1] for k, _ in items], pa.string()),
            "calls": pa.array([v[0] for _, v in items], pa.int64()),
            "errors": pa.array([v[1] for _, v in items], pa.int64()),
            "latency_avg_ms": pa.array([v[2] / max(v[0], 1) / 1e6 for _, v in items],
                                       pa.float64()),
        })


class _Router:
    """What a receiver feeds: spans to its traces pipelines, metric points to its metrics
    pipelines (to its traces pipelines when it feeds no metrics pipeline).

    A receiver in several pipelines of one signal fans out: every pipeline gets
    every batch. The first pipeline listed decides whether a request is taken
    (when it is full the request is refused and the client retries, as with
    one pipeline); the others then record the batch under their own
    backpressure strategy, and what one of them cannot hold is dropped there
    and counted by reason. So a retry never duplicates spans in a pipeline,
    and a slow side pipeline cannot make clients resend to the main one.
    """

    def __init__(self, traces: Sequence[Any], metrics: Sequence[Any]) -> None:
        self.traces = list(traces)
        self.metrics = list(metrics) if metrics else list(traces)

    @property
    def closed(self) -> bool:
        return any(p.closed for p in (*self.traces, *self.metrics))

    def try_record_batch(self, batch: Any) -> int | None:
        if not self.traces:
            return 0  # no traces pipeline: every span is reported back as rejected
        taken = self.traces[0].try_record_batch(batch)
        if taken is not None:
            for p in self.traces[1:]:
                p.record_batch(batch)
        return taken

    def record_batch(self, batch: Any) -> int:
        if not self.traces:
            return 0
        taken = self.traces[0].record_batch(batch)
        for p in self.traces[1:]:
            p.record_batch(batch)
        return taken

    def try_record_metric_batch(self, batch: Any) -> int | None:
        if not self.metrics:
            return 0
        taken = self.metrics[0].try_record_metric_batch(batch)
        if taken is not None:
            for p in self.metrics[1:]:
                p.record_metric_batch(batch)
        return taken

    def record_metric_batch(self, batch: Any) -> int:
        if not self.metrics:
            return 0
        taken = self.metrics[0].record_metric_batch(batch)
        for p in self.metrics[1:]:
            p.record_metric_batch(batch)
        return taken


# -- building ------------------------------------------------------------------------


@dataclass
class Built:
    """Everything one configuration builds; ``start`` binds the receivers."""

    pipelines: dict[str, Any]
    receivers: list[tuple[str, str, Any]] = field(default_factory=list)
    listening: list[tuple[str, str, str]] = field(default_factory=list)
    writing: list[tuple[str, str]] = field(default_factory=list)
    stream_processors: dict[str, Any] = field(default_factory=dict)
    service_graphs: dict[str, ServiceGraphStage] = field(default_factory=dict)
    exporters: dict[str, list[Any]] = field(default_factory=dict)
    _started: list[Any] = field(default_factory=list)

    def start(self) -> Built:
        """Bind and start every receiver; on failure stop those started and raise ConfigError."""
        # every port checked before anything listens, so a clash leaves nothing half started
        for rid, _, receiver in self.receivers:
            check_port_free(receiver_endpoint(receiver), f"receivers.{rid}")
        for rid, protocol, receiver in self.receivers:
            try:
                receiver.start()
            except (OSError, RuntimeError) as exc:
                self.stop_receivers()
                raise ConfigError(f"receivers.{rid}: cannot listen for {protocol} on "
                                  f"{receiver_endpoint(receiver)}: {_reason(exc)}") from None
            self._started.append(receiver)
            host = receiver_endpoint(receiver).rpartition(":")[0]
            self.listening.append((rid, protocol, f"{host}:{receiver.port}"))
        for pid, exporters in self.exporters.items():
            for ex in exporters:
                url = getattr(ex, "url", None)
                if isinstance(url, str):
                    self.listening.append((f"{pid} {getattr(ex, 'name', '?')}",
                                           "Prometheus", url))
        return self

    def stop_receivers(self, grace: float = 1.0) -> None:
        """Stop accepting: every started receiver closes its socket."""
        from knhk.receivers import OtlpGrpcReceiver

        for receiver in self._started:
            try:
                if isinstance(receiver, OtlpGrpcReceiver):  # in-flight calls get ``grace``
                    receiver.stop(grace)
                else:
                    receiver.stop()
            except Exception:
                logger.exception("receiver %r raised while stopping", receiver)
        self._started = []

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop the receivers, then flush and shut down every pipeline within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.stop_receivers(min(1.0, timeout / 4))
        ok = True
        for pipeline in self.pipelines.values():
            ok = pipeline.shutdown(max(0.1, deadline - time.monotonic())) and ok
        return ok


def receiver_endpoint(receiver: Any) -> str:
    addr = getattr(receiver, "_addr", None)
    if addr is not None:
        return f"{addr[0]}:{addr[1]}"
    return receiver.endpoint


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "the address is already in use"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_port_free(endpoint: str, where: str) -> None:
    """Raise ConfigError if ``host:port`` (port > 0) cannot be bound now.

    gRPC binds with ``SO_REUSEPORT``, so without this check a second server
    would silently share a port another one holds.
    """
    host, _, port_text = endpoint.rpartition(":")
    port = int(port_text)
    if port == 0:
        return
    host = host.strip("[]") or "localhost"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"{where}: cannot resolve host {host!r}: {exc.strerror}") from None
    for family, stype, proto, _, sockaddr in infos[:1]:
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                raise ConfigError(f"{where}: cannot listen on {endpoint}: "
                                  f"{_reason(exc)}") from None


def _check_writable(path: str, where: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write to {path!r}: "
                          f"{exc.strerror or exc}") from None
    return path


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def otlp_config_from(body: Mapping[str, Any], where: str, protocol: str) -> Any:
    """The :class:`~knhk.exporters.otlp.OtlpConfig` of an ``otlp`` / ``otlphttp`` body.

    Parameters
    ----------
    body : mapping
        The exporter's checked keys (``endpoint``, ``tls``, ``sending_queue``,
        ``retry_on_failure``, ...).
    where : str
        Its key path, named in errors (``exporters.otlp/backend``).
    protocol : {"grpc", "http"}
        ``grpc`` reads the ``otlp`` exporter's keys; ``http`` the ``otlphttp``
        exporter's (``encoding`` picks ``http/protobuf`` or ``http/json``).

    Returns
    -------
    OtlpConfig
        ``retry_on_failure`` mapped onto its ``retry``; ``sending_queue`` onto
        ``queue_size`` / ``consumers``, or ``synchronous`` when
        ``sending_queue.enabled`` is false. (``sending_queue.storage`` is the
        pipeline's business: see :func:`_storage_directory`.)

    Examples
    --------
    >>> c = otlp_config_from({"endpoint": "collector:4317", "tls": {"insecure": True},
    ...                       "retry_on_failure": {"initial_interval": "1s"}},
    ...                      "exporters.otlp", "grpc")
    >>> c.endpoint, c.protocol, c.retry.initial_interval
    ('collector:4317', 'grpc', 1.0)
    """
    from knhk.exporters.otlp import OtlpConfig
    from knhk.serve.config import retry_config

    tls = body.get("tls") or {}
    queue = body.get("sending_queue") or {}
    endpoint = body.get("endpoint")
    metrics_endpoint = None
    if protocol == "grpc":
        if not endpoint:
            raise ConfigError(f"{where}.endpoint: required (host:port of the OTLP/gRPC "
                              "server)")
    else:
        protocol = "http/json" if body.get("encoding") == "json" else "http/protobuf"
        base = (endpoint or "").rstrip("/")
        endpoint = body.get("traces_endpoint") or (base + "/v1/traces" if base else None)
        metrics_endpoint = body.get("metrics_endpoint") or (
            base + "/v1/metrics" if base else None)
        if not endpoint:
            raise ConfigError(f"{where}.endpoint: required (the base URL, "
                              "e.g. http://localhost:4318)")
    compression = body.get("compression")
    try:
        retry = retry_config(body.get("retry_on_failure"))
    except ValueError as exc:
        raise ConfigError(f"{where}.retry_on_failure: {exc}") from None
    return OtlpConfig(
        endpoint=endpoint, protocol=protocol, headers=body.get("headers"),
        compression=None if compression == "none" else compression,
        timeout=parse_duration(body["timeout"]) if "timeout" in body else None,
        insecure=tls.get("insecure"), certificate_file=tls.get("ca_file"),
        retry=retry,
        queue_size=queue.get("queue_size", 1000), consumers=queue.get("num_consumers", 4),
        metrics_endpoint=metrics_endpoint, synchronous=queue.get("enabled", True) is False)


def _storage_directory(eid: str, body: Mapping[str, Any], pid: str,
                       config: Mapping[str, Any]) -> tuple[str, bool] | None:
    """``(directory, fsync)`` of the persistent queue an exporter's
    ``sending_queue.storage`` names, made and checked; None without one.

    Each exporter of each pipeline gets its own subdirectory of the
    file_storage directory (a queue belongs to one exporter).
    """
    storage = (body.get("sending_queue") or {}).get("storage")
    if not storage:
        return None
    ext = (config.get("extensions") or {}).get(storage) or {}
    name = f"exporter_{eid}_{pid}".replace("/", "_")
    directory = _check_writable(
        os.path.join(ext.get("directory") or ".", name),
        f"extensions.{storage}.directory (for exporters.{eid}.sending_queue.storage)")
    return directory, bool(ext.get("fsync", False))


def _exporter(eid: str, body: Mapping[str, Any], pid: str, built: Built) -> Any:
    ctype = component_type(eid)
    where = f"exporters.{eid}"
    if ctype in ("otlp", "otlphttp"):
        from knhk.exporters.otlp import OtlpExporter

        config = otlp_config_from(body, where, "grpc" if ctype == "otlp" else "http")
        exporter = OtlpExporter(config)
        built.writing.append((f"{pid} {eid}", f"{config.protocol} {config.endpoint}"))
        return exporter
    if ctype == "loadbalancing":
        import dataclasses

        from knhk.exporters.loadbalancing import (
            DnsResolver,
            FileResolver,
            LoadBalancingExporter,
            StaticResolver,
        )

        signal = component_type(pid)
        key = body.get("routing_key", "traceID" if signal == "traces" else "service")
        if (signal, key) in (("traces", "metric"), ("metrics", "traceID")):
            raise ConfigError(f"{where}.routing_key: {key!r} cannot route the {signal} of "
                              f"pipeline {pid!r}; use " +
                              ("traceID or service" if signal == "traces" else
                               "service or metric"))
        proto = dict((body.get("protocol") or {}).get("otlp") or {})
        if (proto.get("sending_queue") or {}).get("storage"):
            raise ConfigError(f"{where}.protocol.otlp.sending_queue.storage: a persistent "
                              "queue per endpoint is not supported by loadbalancing")
        # the otlp exporter's own reading of its keys, with the endpoint left to the resolver
        template = dataclasses.replace(
            otlp_config_from({**proto, "endpoint": "resolver:0"}, f"{where}.protocol.otlp",
                             "grpc"), endpoint=None, metrics_endpoint=None)
        kind, spec = next(iter((body.get("resolver") or {}).items()), (None, None))
        spec = spec or {}
        if kind == "static":
            resolver: Any = StaticResolver(spec.get("hostnames") or [])
        elif kind == "dns":
            resolver = DnsResolver(spec.get("hostname", ""), spec.get("port", 4317),
                                   interval=parse_duration(spec.get("interval", "5s")),
                                   timeout=parse_duration(spec.get("timeout", "1s")))
        elif kind == "file":
            if not spec.get("path"):
                raise ConfigError(f"{where}.resolver.file.path: required (a file with one "
                                  "host:port per line)")
            resolver = FileResolver(os.path.abspath(spec["path"]),
                                    interval=parse_duration(spec.get("interval", "1s")))
        else:
            raise ConfigError(f"{where}.resolver: required: static, dns or file")
        try:
            exporter = LoadBalancingExporter(
                resolver=resolver, protocol=template,
                routing_key="service" if key == "service" else "traceID",
                metric_routing_key="metric" if key == "metric" else "service",
                drain_timeout=parse_duration(body.get("drain_timeout", "10s")))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot start: {_reason(exc)}") from None
        built.writing.append((f"{pid} {eid}", f"load balancing by {key} over OTLP/gRPC "
                              f"({resolver.describe()})"))
        return exporter
    if ctype == "prometheus":
        host, port = _split(body.get("endpoint", "localhost:9464"))
        check_port_free(f"{host}:{port}", f"{where}.endpoint")
        try:
            from knhk.exporters.prometheus import PrometheusExporter
        except ImportError as exc:
            raise ConfigError(f"{where}: the Prometheus exporter is not available ({exc})"
                              ) from None
        kwargs: dict[str, Any] = {}
        if "cardinality_limit" in body:
            kwargs["cardinality_limit"] = body["cardinality_limit"]
        if "duration_buckets_ms" in body:
            kwargs["duration_buckets_ms"] = tuple(body["duration_buckets_ms"])
        if "metric_expiration" in body:  # 0: keep every series
            kwargs["metric_expiration"] = parse_duration(body["metric_expiration"]) or None
        return PrometheusExporter(host, port, **kwargs)
    if ctype == "jaeger":
        host, port = _split(body.get("endpoint", "localhost:6831"))
        try:
            from knhk.exporters.jaeger import JaegerExporter
        except ImportError as exc:
            raise ConfigError(f"{where}: the Jaeger exporter is not available ({exc})") from None
        built.writing.append((f"{pid} {eid}", f"Jaeger agent (UDP) {host}:{port}"))
        return JaegerExporter(host, port)
    if ctype == "file":
        from knhk.exporters.ipc import IpcExporter

        path = _check_writable(body.get("path", "./knhk-data"), f"{where}.path")
        rotation = body.get("rotation") or {}
        compression = body.get("compression", "lz4")
        try:
            exporter = IpcExporter(
                path, prefix=body.get("prefix", "knhk"),
                compression=None if compression == "none" else compression,
                compression_level=body.get("compression_level"),
                max_bytes=int(rotation.get("max_megabytes", 256)) << 20,
                max_seconds=parse_duration(rotation["max_age"]) if "max_age" in rotation
                else None)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        built.writing.append((f"{pid} {eid}", f"Arrow IPC files ({compression}) in {path}"))
        return exporter
    if ctype == "debug":
        return DebugExporter(body.get("verbosity", "basic"))
    raise ConfigError(f"{where}: unknown exporter type {ctype!r}")  # pragma: no cover


def _window(body: Mapping[str, Any], where: str) -> Any:
    from knhk.stream import WindowConfig

    size = parse_duration(body.get("window", "60s"))
    late = parse_duration(body.get("allowed_lateness", 0))
    kind = body.get("kind", "sliding" if "slide" in body else "tumbling")
    try:
        if kind == "tumbling":
            return WindowConfig.tumbling(seconds=size, allowed_lateness=late)
        if kind == "sliding":
            slide = parse_duration(body.get("slide", size))
            return WindowConfig.sliding(size=size, slide=slide, allowed_lateness=late)
        return WindowConfig.session(gap=size, allowed_lateness=late)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _pipeline(pid: str, body: Mapping[str, Any], config: Mapping[str, Any],
              built: Built) -> Any:
    import knhk

    processors = config.get("processors") or {}
    builder = knhk.TelemetryPipeline.builder()
    prom: list[Any] = []
    windows: list[Any] = []
    graphs: list[ServiceGraphStage] = []
    batch_size, capacity = 4096, 100_000
    for name in body.get("processors") or []:
        p = processors.get(name) or {}
        where = f"processors.{name}"
        ctype = component_type(name)
        try:
            if ctype == "batch":
                batch_size = p.get("send_batch_size", batch_size)
                if "timeout" in p:
                    builder.with_flush_interval(parse_duration(p["timeout"]))
            elif ctype == "memory_limiter":
                capacity = p.get("limit_spans", capacity)
                from knhk.serve.config import memory_limiter_settings

                limiter = memory_limiter_settings(p)
                if limiter is not None:
                    builder.with_memory_limiter(limiter)
                    built.writing.append((f"{pid} {name}", (
                        f"refusing data above {limiter.soft_limit / 2**20:.0f} MiB resident "
                        f"(hard limit {limiter.hard_limit / 2**20:.0f} MiB)")))
                strategy = p.get("strategy")
                if strategy is not None:
                    timeout = parse_duration(p["block_timeout"]) if "block_timeout" in p \
                        else None
                    builder.with_backpressure_strategy(
                        knhk.BackpressureStrategy[strategy.upper()], block_timeout=timeout)
            elif ctype == "knhk_validation":
                from knhk.validation import ValidationPolicy

                registry = p.get("registry") or default_registry()
                if registry is None:
                    # the embedded default must run anywhere: without a registry to
                    # find, validation is off (and said so); a named one must exist
                    logger.warning("no Weaver registry found (./registry or the bundled one); "
                                   "%s does not validate", where)
                    built.writing.append((f"{pid} {name}", "validation off: no registry found "
                                          "(set processors.knhk_validation.registry)"))
                    continue
                if not os.path.isdir(registry):
                    raise ConfigError(f"{where}.registry: {registry!r} is not a directory")
                fields = {k: p[k] for k in ("violation", "improvement", "information",
                                            "annotate", "quarantine") if k in p}
                builder.with_weaver_registry(registry, policy=ValidationPolicy(**fields))
                built.writing.append((f"{pid} {name}", f"validating against {registry}"))
            elif ctype == "probabilistic_sampler":
                from knhk.sampling import TraceIdRatio

                builder.with_sampler(TraceIdRatio(p.get("sampling_percentage", 100) / 100.0))
            elif ctype == "adaptive_sampling":
                fields = {k: p[k] for k in ("base_rate", "error_rate", "slow_rate", "min_rate",
                                            "max_rate", "target_spans_per_second") if k in p}
                if "slow_threshold" in p:
                    fields["slow_threshold_ms"] = parse_duration(p["slow_threshold"]) * 1000
                if "adjust_interval" in p:
                    fields["adjust_interval_s"] = parse_duration(p["adjust_interval"])
                builder.with_adaptive_sampling(knhk.SamplingConfig(**fields))
            elif ctype == "tail_sampling":
                builder.with_tail_sampling(p)
            elif ctype == "red_windows":
                kwargs = {k: (tuple(p[k]) if isinstance(p[k], list) else p[k])
                          for k in ("group_by", "quantiles", "mode") if k in p}
                proc = knhk.StreamProcessor(_window(p, where), **kwargs)
                windows.append(proc)
                built.stream_processors[f"{pid} {name}"] = proc
                builder.with_stage(proc)
            elif ctype == "service_graph":
                stage = ServiceGraphStage(
                    parse_duration(p.get("idle_timeout", 2.0)),
                    parse_duration(p.get("max_wait", 30.0)),
                    max_traces=p.get("max_traces", 50_000),
                    metrics_interval=parse_duration(p.get("metrics_interval", 15.0)))
                if p.get("metrics", True):
                    graphs.append(stage)
                built.service_graphs[f"{pid} {name}"] = stage
                builder.with_stage(stage)
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if capacity < batch_size:
        raise ConfigError(f"processors: the batch size ({batch_size}) is larger than the "
                          f"memory limit ({capacity} spans)")
    builder.with_batch_size(batch_size).with_channel_capacity(capacity)
    exporters = []
    defined = config.get("exporters") or {}
    for eid in body.get("exporters") or []:
        try:
            exporter = _exporter(eid, defined.get(eid) or {}, pid, built)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"exporters.{eid}: {exc}") from None
        with contextlib.suppress(AttributeError):
            exporter.name = eid
        if component_type(eid) == "prometheus":
            prom.append(exporter)
        exporters.append(exporter)
        storage = _storage_directory(eid, defined.get(eid) or {}, pid, config)
        if storage is None:
            builder.with_exporter(exporter)
        else:
            from knhk.exporters._persistent_queue import PersistentQueue

            # the Collector's persistent queue: queue_size batches, kept on disk
            size = ((defined.get(eid) or {}).get("sending_queue") or {}).get("queue_size", 1000)
            try:
                queue = PersistentQueue(storage[0], fsync=storage[1])
            except OSError as exc:
                raise ConfigError(f"exporters.{eid}.sending_queue.storage: cannot open the "
                                  f"queue in {storage[0]!r}: {exc.strerror or exc}") from None
            builder.with_exporter(exporter, queue_size=size, persistent_queue=queue)
            built.writing.append((f"{pid} {eid}", f"persistent queue in {storage[0]}"))
    for exporter in prom:
        for proc in windows:
            exporter.add_stream_processor(proc)
    try:
        pipeline = builder.build()
    except OSError as exc:
        for ex in exporters:
            with contextlib.suppress(Exception):
                ex.shutdown(1.0)
        raise ConfigError(f"service.pipelines.{pid}: cannot start: {_reason(exc)}") from None
    built.exporters[pid] = exporters
    for stage in graphs:
        stage.pipeline = pipeline
    return pipeline


def build(config: Mapping[str, Any], *,
          on_error: Callable[[str], None] | None = None) -> Built:
    """Build the pipelines and receivers of a checked configuration.

    Parameters
    ----------
    config : mapping
        As returned by :func:`knhk.serve.config.load_config` (or checked by
        :func:`~knhk.serve.config.validate_config`).

    Returns
    -------
    Built
        Pipelines running; receivers built but not yet listening.

    Raises
    ------
    ConfigError
        For a user mistake found while building (a port in use, a directory
        that cannot be written, a component that cannot be configured so);
        whatever was already built is shut down.
    """
    service = config.get("service") or {}
    built = Built(pipelines={})
    try:
        for pid, body in (service.get("pipelines") or {}).items():
            built.pipelines[pid] = _pipeline(pid, body or {}, config, built)
        receivers = config.get("receivers") or {}
        routes: dict[str, dict[str, list[Any]]] = {}
        for pid, body in (service.get("pipelines") or {}).items():
            for rid in (body or {}).get("receivers") or []:
                routes.setdefault(rid, {}).setdefault(component_type(pid), []).append(
                    built.pipelines[pid])
        for rid, signals in routes.items():
            router = _Router(signals.get("traces", []), signals.get("metrics", []))
            _route_memory_limiter(router)
            built.receivers.extend(_receivers(rid, receivers.get(rid) or {}, router))
    except BaseException:
        for pipeline in built.pipelines.values():
            pipeline.shutdown(1.0)
        raise
    return built


def _route_memory_limiter(router: _Router) -> None:
    """A receiver consults the memory limiter of the pipelines it feeds (resident
    memory is the whole process's: the first limiter set is enough, and the
    strictest soft limit when both pipelines have one)."""
    from knhk.receivers._common import memory_limiter_of, set_memory_limiter

    limiters = [lim for lim in (memory_limiter_of(p) for p in (*router.traces, *router.metrics))
                if lim is not None]
    if limiters:
        set_memory_limiter(router, min(limiters, key=lambda lim: lim.soft_limit))


def _receivers(rid: str, body: Mapping[str, Any], router: _Router) -> list[tuple[str, str, Any]]:
    from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver

    protocols = body.get("protocols") or {}
    if not protocols:
        raise ConfigError(f"receivers.{rid}.protocols: name at least one of grpc, http")
    out = []
    if "grpc" in protocols:
        g = protocols["grpc"] or {}
        kwargs: dict[str, Any] = {"endpoint": g.get("endpoint", "localhost:4317")}
        if "max_recv_msg_size_mib" in g:
            kwargs["max_request_bytes"] = g["max_recv_msg_size_mib"] << 20
        if "bearer_token" in g:
            kwargs["bearer_token"] = g["bearer_token"]
        out.append((f"{rid}.protocols.grpc", "OTLP/gRPC", OtlpGrpcReceiver(router, **kwargs)))
    if "http" in protocols:
        h = protocols["http"] or {}
        kwargs = {"endpoint": h.get("endpoint", "localhost:4318")}
        if "max_request_body_size" in h:
            kwargs["max_request_bytes"] = h["max_request_body_size"]
        if "bearer_token" in h:
            kwargs["bearer_token"] = h["bearer_token"]
        out.append((f"{rid}.protocols.http", "OTLP/HTTP", OtlpHttpReceiver(router, **kwargs)))
    return out
