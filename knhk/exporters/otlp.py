"""OTLP exporter: span and metric batches to an OpenTelemetry Collector over gRPC or HTTP.

Each batch is encoded once by knhk's codec (``knhk.otlp``; metric batches by
:mod:`knhk.otlp.metrics`) and put on a
bounded sending queue served by several consumer threads; each consumer
sends, retrying exactly what the OTLP specification calls retryable
(:mod:`knhk.exporters._retry`). What is finally given up on is counted in
``export_errors`` and, by reason, in ``errors_by_reason``. Spans a server
rejects in a partial success are counted in ``spans_rejected`` and never
retried; metric points likewise in ``metric_points_exported`` /
``metric_points_rejected`` / ``metric_points_failed``. Metrics go to
``MetricsService/Export`` over gRPC and to ``/v1/metrics`` over HTTP.
:meth:`OtlpExporter.shutdown` leaves the counters complete: a batch whose
send is still running at its deadline is counted as failed (``shutdown``)
then, and never again. ``OtlpConfig(synchronous=True)`` has no sending
queue: ``export`` sends on the caller's thread and returns the outcome.

Configuration follows the OpenTelemetry specification's environment
variables when an argument is left out: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``,
``…_HEADERS``, ``…_COMPRESSION``, ``…_TIMEOUT`` (milliseconds), ``…_PROTOCOL``,
``…_INSECURE``; for metrics, ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (else
the general endpoint plus ``/v1/metrics``).

Example
-------
>>> from knhk.exporters.otlp import OtlpConfig, OtlpExporter
>>> exporter = OtlpExporter(OtlpConfig(endpoint="localhost:4317", protocol="grpc"))
>>> exporter.target, exporter.config.protocol
('localhost:4317', 'grpc')
>>> exporter.shutdown(timeout=1.0)
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from knhk import _attributes
from knhk.batch import MetricBatch, SpanBatch
from knhk.exporters._retry import (
    GRPC_RETRYABLE,
    HTTP_RETRYABLE,
    Backoff,
    RetryConfig,
    grpc_retry_delay,
    retry_after_seconds,
)
from knhk.exporters.base import Exporter, ExportResult
from knhk.otlp import encode_traces
from knhk.otlp.json import encode_traces_json
from knhk.otlp.metrics import encode_metrics, encode_metrics_json

logger = logging.getLogger(__name__)

__all__ = ["OtlpConfig", "OtlpExporter", "RetryConfig"]

_PROTOCOLS = ("grpc", "http/protobuf", "http/json")
_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_GRPC_METRICS_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


@dataclass(frozen=True)
class OtlpConfig:
    """Where and how :class:`OtlpExporter` sends.

    Every ``None`` is taken from the environment as the OpenTelemetry
    specification defines it, else the default shown.

    Parameters
    ----------
    endpoint : str, optional
        gRPC: ``host:port`` or ``http(s)://host:port``; HTTP: the full URL of
        ``/v1/traces`` (``localhost:4317`` / ``http://localhost:4318/v1/traces``).
    protocol : {"grpc", "http/protobuf", "http/json"}, optional
        Default ``grpc``. ``http/json`` goes through protobuf's JSON mapping
        (slower than binary protobuf).
    headers : dict, optional
        Extra request headers / gRPC metadata.
    compression : {"gzip", None}
        Body compression.
    timeout : float, optional
        Seconds per attempt (default 10).
    insecure : bool, optional
        gRPC without TLS (default: TLS unless the endpoint says ``http://``).
    certificate_file : str, optional
        PEM roots to trust for TLS.
    retry : RetryConfig
        Backoff schedule; ``RetryConfig(enabled=False)`` sends once.
    queue_size : int
        Batches waiting to be sent before new ones are refused (and counted).
    consumers : int
        Threads sending concurrently.
    synchronous : bool
        No sending queue (the Collector's ``sending_queue.enabled: false``):
        :meth:`OtlpExporter.export` sends and retries on the caller's thread and
        returns the final result; ``queue_size`` and ``consumers`` are unused.
    metrics_endpoint : str, optional
        Where metric batches go: gRPC ``host:port`` (default: ``endpoint``);
        HTTP the full URL of ``/v1/metrics`` (default: ``endpoint`` with
        ``/v1/traces`` replaced by ``/v1/metrics``).
    """

    endpoint: str | None = None
    protocol: str | None = None
    headers: dict[str, str] | None = None
    compression: str | None = None
    timeout: float | None = None
    insecure: bool | None = None
    certificate_file: str | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    queue_size: int = 1000
    consumers: int = 4
    metrics_endpoint: str | None = None
    synchronous: bool = False

    def __post_init__(self) -> None:
        if self.protocol is not None and self.protocol not in _PROTOCOLS:
            raise ValueError(f"OtlpConfig.protocol must be one of {_PROTOCOLS}, "
                             f"got {self.protocol!r}.")
        if self.compression not in (None, "gzip", "none"):
            raise ValueError(f"OtlpConfig.compression must be 'gzip' or None, "
                             f"got {self.compression!r}.")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"OtlpConfig.timeout must be > 0 seconds, got {self.timeout!r}.")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"OtlpConfig.queue_size must be a positive int, "
                             f"got {self.queue_size!r}.")
        if not isinstance(self.consumers, int) or self.consumers < 1:
            raise ValueError(f"OtlpConfig.consumers must be a positive int, "
                             f"got {self.consumers!r}.")

    def resolved(self, env: dict[str, str] | None = None) -> OtlpConfig:
        """This config with every ``None`` filled from ``env`` (``os.environ``) or defaults."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            for key in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
                value = env.get(key)
                if value is not None and value.strip():
                    return value.strip()
            return None

        protocol = self.protocol
        if protocol is None:
            protocol = get("PROTOCOL") or "grpc"
            if protocol not in _PROTOCOLS:
                logger.warning("ignoring OTEL_EXPORTER_OTLP_PROTOCOL=%r (not one of %s)",
                               protocol, _PROTOCOLS)
                protocol = "grpc"
        endpoint = self.endpoint
        if endpoint is None:
            specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
            general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            if specific:
                endpoint = specific
            elif general:
                endpoint = general
                if protocol != "grpc":
                    # the spec: the signal path is appended to the general endpoint
                    endpoint = general.rstrip("/") + "/v1/traces"
            else:
                endpoint = ("localhost:4317" if protocol == "grpc"
                            else "http://localhost:4318/v1/traces")
        metrics_endpoint = self.metrics_endpoint
        if metrics_endpoint is None:
            specific = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
            general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            if specific:
                metrics_endpoint = specific
            elif protocol == "grpc":
                metrics_endpoint = (endpoint if self.endpoint is not None
                                    else general or "localhost:4317")
            elif general and self.endpoint is None:
                metrics_endpoint = general.rstrip("/") + "/v1/metrics"
            elif self.endpoint is None:
                # only the traces endpoint was configured: metrics keep the spec's default
                metrics_endpoint = "http://localhost:4318/v1/metrics"
            elif endpoint.rstrip("/").endswith("/v1/traces"):
                metrics_endpoint = endpoint.rstrip("/")[:-len("/v1/traces")] + "/v1/metrics"
            else:
                metrics_endpoint = endpoint
        headers = self.headers
        if headers is None:
            headers = {}
            for key in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
                headers.update(_parse_headers(env.get(key, "")))
        compression = self.compression
        if compression is None:
            raw = (get("COMPRESSION") or "none").lower()
            if raw not in ("gzip", "none"):
                logger.warning("ignoring OTLP compression %r (gzip or none)", raw)
                raw = "none"
            compression = raw
        timeout = self.timeout
        if timeout is None:
            raw = get("TIMEOUT")
            timeout = 10.0
            if raw is not None:
                try:
                    timeout = float(raw) / 1000.0  # the spec's unit is milliseconds
                    if timeout <= 0:
                        raise ValueError
                except ValueError:
                    logger.warning("ignoring OTLP timeout %r (positive milliseconds)", raw)
                    timeout = 10.0
        insecure = self.insecure
        if insecure is None:
            raw = get("INSECURE")
            insecure = raw is not None and raw.lower() == "true"
        return replace(self, endpoint=endpoint, metrics_endpoint=metrics_endpoint,
                       protocol=protocol, headers=headers,
                       compression=None if compression == "none" else compression,
                       timeout=timeout, insecure=insecure)


def _parse_headers(raw: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (the W3C baggage format the spec names)."""
    out = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            logger.warning("ignoring malformed OTLP header entry %r", item)
            continue
        out[key.strip().lower()] = urllib.parse.unquote(value.strip())
    return out


@dataclass
class _Outcome:
    ok: bool
    retryable: bool = False
    delay: float | None = None
    reason: str = ""
    rejected: int = 0


class OtlpExporter(Exporter):
    """Send span and metric batches over OTLP (gRPC or HTTP) with spec-correct retries.

    Parameters
    ----------
    config : OtlpConfig, optional
        Unset fields come from the ``OTEL_EXPORTER_OTLP_*`` environment.
    """

    name = "otlp"

    def __init__(self, config: OtlpConfig | None = None) -> None:
        self.config = (config or OtlpConfig()).resolved()
        self._lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(self.config.queue_size)
        self._stop = threading.Event()
        self._closed = False
        # one token per batch being sent: whoever removes it (the send finishing, or
        # shutdown giving up on it at its deadline) is the one who counts the batch
        self._inflight: dict[object, tuple[int, bool]] = {}
        #: batches shutdown counted as failed whose send still succeeded afterwards
        self.late_successes = 0
        self.batches_exported = 0
        self.spans_exported = 0
        self.spans_rejected = 0
        self.export_errors = 0
        self.spans_failed = 0
        self.metric_points_exported = 0
        self.metric_points_rejected = 0
        self.metric_points_failed = 0
        self.errors_by_reason: Counter[str] = Counter()
        self._setup_transport()
        consumers = 0 if self.config.synchronous else self.config.consumers
        self._threads = [threading.Thread(target=self._consume, name=f"knhk-otlp-{i}",
                                          daemon=True) for i in range(consumers)]
        for t in self._threads:
            t.start()

    # -- transport ---------------------------------------------------------------

    def _setup_transport(self) -> None:
        c = self.config
        endpoint = c.endpoint
        if c.protocol == "grpc":
            import grpc

            secure = not c.insecure
            parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else "//" + endpoint)
            if parsed.scheme in ("http", "https"):
                secure = parsed.scheme == "https"
            self.target = parsed.netloc or endpoint
            roots = None
            if secure and c.certificate_file:
                with open(c.certificate_file, "rb") as f:
                    roots = f.read()

            def channel(target: str, secure: bool) -> Any:
                if secure:
                    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots))
                return grpc.insecure_channel(target)

            self._channel = channel(self.target, secure)
            self._call = self._channel.unary_unary(_GRPC_METHOD)
            self._channels = [self._channel]
            m_parsed = urllib.parse.urlparse(c.metrics_endpoint if "://" in c.metrics_endpoint
                                             else "//" + c.metrics_endpoint)
            m_secure = (m_parsed.scheme == "https" if m_parsed.scheme in ("http", "https")
                        else not c.insecure)
            self.metrics_target = m_parsed.netloc or c.metrics_endpoint
            m_channel = self._channel
            if (self.metrics_target, m_secure) != (self.target, secure):
                m_channel = channel(self.metrics_target, m_secure)
                self._channels.append(m_channel)
            self._metrics_call = m_channel.unary_unary(_GRPC_METRICS_METHOD)
            self._grpc = grpc
        else:
            if "://" not in endpoint:
                endpoint = "http://" + endpoint
            self.target = endpoint
            m = c.metrics_endpoint
            self.metrics_target = m if "://" in m else "http://" + m
            self._ssl = None
            if c.certificate_file:
                import ssl

                self._ssl = ssl.create_default_context(cafile=c.certificate_file)

    def _send(self, payload: bytes, timeout: float, metrics: bool = False) -> _Outcome:
        if self.config.protocol == "grpc":
            return self._send_grpc(payload, timeout, metrics)
        return self._send_http(payload, timeout, metrics)

    def _send_grpc(self, payload: bytes, timeout: float, metrics: bool = False) -> _Outcome:
        grpc = self._grpc
        compression = grpc.Compression.Gzip if self.config.compression == "gzip" else None
        call = self._metrics_call if metrics else self._call
        try:
            response = call(payload, timeout=timeout,
                                  metadata=tuple(self.config.headers.items()) or None,
                                  compression=compression)
        except grpc.RpcError as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            delay = grpc_retry_delay(exc.trailing_metadata())
            retryable = name in GRPC_RETRYABLE or (name == "RESOURCE_EXHAUSTED"
                                                   and delay is not None)
            return _Outcome(False, retryable, delay, f"grpc:{name}")
        return _Outcome(True, rejected=_rejected(response))

    def _send_http(self, payload: bytes, timeout: float, metrics: bool = False) -> _Outcome:
        is_json = self.config.protocol == "http/json"
        headers = {"Content-Type": "application/json" if is_json else "application/x-protobuf",
                   **self.config.headers}
        if self.config.compression == "gzip":
            payload = gzip.compress(payload, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        url = self.metrics_target if metrics else self.target
        req = urllib.request.Request(url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            delay = retry_after_seconds(exc.headers.get("Retry-After")) if exc.headers else None
            exc.close()
            return _Outcome(False, status in HTTP_RETRYABLE, delay, f"http:{status}")
        except (urllib.error.URLError, OSError) as exc:
            # connection refused / reset / timed out: the backend is unreachable
            reason = getattr(exc, "reason", exc)
            return _Outcome(False, True, None, f"http:unreachable ({type(reason).__name__})")
        return _Outcome(True, rejected=_rejected_json(body, metrics) if is_json
                        else _rejected(body))

    # -- queue -------------------------------------------------------------------

    def export(self, batch: Any) -> ExportResult:
        """Encode ``batch`` and queue it; FAILURE (counted) when the queue is full or closed.

        With ``synchronous`` set, send it now (retrying) and return the outcome.
        """
        metrics = isinstance(batch, MetricBatch)
        if not metrics and not isinstance(batch, SpanBatch):
            # neither spans nor metric points: counted (as one, if it has no rows), never raised
            self._fail("unsupported_signal", getattr(batch, "num_rows", 0) or 1)
            return ExportResult.FAILURE
        n = batch.num_rows
        if n == 0:
            return ExportResult.SUCCESS
        if self._closed:
            self._fail("shutdown", n, metrics)
            return ExportResult.FAILURE
        json_out = self.config.protocol == "http/json"
        if metrics:
            payload = encode_metrics_json(batch).encode() if json_out else encode_metrics(batch)
        else:
            payload = encode_traces_json(batch).encode() if json_out else encode_traces(batch)
        if self.config.synchronous:
            token = object()
            with self._lock:
                self._inflight[token] = (n, metrics)
            try:
                ok = self._deliver(payload, n, metrics, token)
            except Exception:  # an exporter never takes the pipeline down
                logger.exception("OTLP send failed")
                self._fail("internal_error", n, metrics, token)
                ok = False
            finally:
                with self._lock:
                    self._inflight.pop(token, None)
            return ExportResult.SUCCESS if ok else ExportResult.FAILURE
        # closed-check and enqueue under one lock, so shutdown() cannot slip in between
        # and leave this batch behind its consumers' stop markers
        with self._admit_lock:
            if self._closed:
                reason = "shutdown"
            else:
                try:
                    self._queue.put_nowait((payload, n, metrics))
                    return ExportResult.SUCCESS
                except queue.Full:
                    reason = "queue_full"
        self._fail(reason, n, metrics)
        return ExportResult.FAILURE

    def _drop_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._fail("shutdown", item[1], item[2])
            self._queue.task_done()

    def _fail(self, reason: str, n: int, metrics: bool = False, token: object = None) -> None:
        with self._lock:
            if token is not None and self._inflight.pop(token, None) is None:
                return  # shutdown already counted this batch as failed at its deadline
            self.export_errors += 1
            if metrics:
                self.metric_points_failed += n
            else:
                self.spans_failed += n
            self.errors_by_reason[reason] += 1
        logger.warning("OTLP export of %d %s to %s failed: %s", n,
                       "metric points" if metrics else "spans",
                       self.metrics_target if metrics else self.target, reason)

    def _consume(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            token = object()
            with self._lock:
                self._inflight[token] = (item[1], item[2])
            try:
                self._deliver(*item, token)
            except Exception:  # an exporter never takes the pipeline down
                logger.exception("OTLP consumer failed")
                self._fail("internal_error", item[1], item[2], token)
            finally:
                with self._lock:
                    self._inflight.pop(token, None)
                self._queue.task_done()

    def _deliver(self, payload: bytes, n: int, metrics: bool, token: object) -> bool:
        """Send until delivered or given up on, counting the outcome once; True if delivered."""
        retry = self.config.retry
        backoff = Backoff(retry)
        start = time.monotonic()
        while True:
            if self._stop.is_set():
                self._fail("shutdown", n, metrics, token)
                return False
            outcome = self._send(payload, self.config.timeout, metrics)
            if outcome.ok:
                with self._lock:
                    if self._inflight.pop(token, None) is None:
                        # counted as failed when shutdown gave up on it; it arrived anyway
                        self.late_successes += 1
                        logger.info("OTLP: a batch of %d given up on at shutdown was "
                                    "delivered afterwards", n)
                        return True
                    self.batches_exported += 1
                    if metrics:
                        self.metric_points_exported += n - outcome.rejected
                        self.metric_points_rejected += outcome.rejected
                    else:
                        self.spans_exported += n - outcome.rejected
                        self.spans_rejected += outcome.rejected
                return True
            if not outcome.retryable or not retry.enabled:
                self._fail(outcome.reason, n, metrics, token)
                return False
            delay = outcome.delay if outcome.delay is not None else backoff.next_delay()
            if retry.gives_up(time.monotonic() - start, delay):
                self._fail(f"retries_exhausted:{outcome.reason}", n, metrics, token)
                return False
            logger.debug("OTLP %s; retrying in %.3fs", outcome.reason, delay)
            if self._stop.wait(delay):
                self._fail("shutdown", n, metrics, token)
                return False

    # -- lifecycle ---------------------------------------------------------------

    def force_flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been sent or given up on."""
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        while time.monotonic() < deadline:
            with self._lock:
                if self._queue.unfinished_tasks == 0 and not self._inflight:
                    return True
            time.sleep(0.005)
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        """Send what is queued until ``timeout`` (default 10 s); count the rest as failed.

        Returns within ``timeout`` (a few milliseconds more at worst), even
        with the backend down or hung: waits between retries are
        cut short, and a batch whose send attempt is still running then is
        counted as failed (reason ``shutdown``) before this returns, so the
        counters are complete when it does. If that attempt still succeeds
        later, the batch is not counted again (only in ``late_successes``).
        """
        with self._admit_lock:
            if self._closed:
                return
            self._closed = True
        total = 10.0 if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + total
        # the last tenth (at most 0.2 s) is for the consumers to stop and count
        self.force_flush(max(0.0, deadline - min(0.2, total / 10) - time.monotonic()))
        self._stop.set()
        self._drop_queued()
        for _ in self._threads:
            self._queue.put(None)
        # consumers waiting between retries wake at once and count their batch; one
        # stuck in a send is counted below, so no need to wait past the deadline for it
        end = max(deadline, time.monotonic() + 0.01)
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._drop_queued()  # anything still queued now has no consumer: count it
        with self._lock:
            abandoned = list(self._inflight.values())
            self._inflight.clear()
        for n, metrics in abandoned:
            self._fail("shutdown", n, metrics)
        if self.config.protocol == "grpc":
            for channel in self._channels:
                channel.close()


def _rejected(response: bytes) -> int:
    """``partial_success.rejected_spans`` (traces) / ``rejected_data_points`` (metrics):
    field 1 of field 1 in both responses (0 if none)."""
    try:
        for no, wt, body in _attributes._fields(response):
            if no == 1 and wt == 2:
                for n2, w2, v in _attributes._fields(body):
                    if n2 == 1 and w2 == 0:
                        return int(v)
    except ValueError:
        logger.warning("unreadable OTLP response body (%d bytes)", len(response))
    return 0


def _rejected_json(response: bytes, metrics: bool = False) -> int:
    """``partialSuccess.rejectedSpans`` (``rejectedDataPoints`` for metrics) of an
    OTLP/JSON response (0 if none)."""
    keys = ("rejectedDataPoints", "rejected_data_points") if metrics else (
        "rejectedSpans", "rejected_spans")
    try:
        obj = json.loads(response or b"{}")
        part = obj.get("partialSuccess") or obj.get("partial_success") or {}
        return int(part.get(keys[0]) or part.get(keys[1]) or 0)
    except (ValueError, AttributeError, TypeError):
        logger.warning("unreadable OTLP/JSON response body (%d bytes)", len(response))
        return 0
