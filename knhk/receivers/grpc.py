"""OTLP/gRPC receiver: ``TraceService/Export`` and ``MetricsService/Export`` on localhost:4317.

The request arrives as raw bytes (no protobuf objects are built) and is
decoded by knhk's own codec straight into a span batch. A malformed request
is refused whole with ``INVALID_ARGUMENT``; a full pipeline answers
``UNAVAILABLE`` with ``RetryInfo`` so OTLP clients retry; nothing is dropped
silently. Metrics are decoded by :mod:`knhk.otlp.metrics` and go to the
pipeline's ``record_metric_batch``; points of metric types knhk does not
represent (Summary, ExponentialHistogram) are reported back as rejected in a
partial success.

Example
-------
>>> import knhk
>>> from knhk.receivers import OtlpGrpcReceiver
>>> sink = knhk.InMemoryExporter()
>>> with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
...     with OtlpGrpcReceiver(pipeline, endpoint="localhost:0") as receiver:
...         receiver.port > 0
True
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any

import grpc

from knhk.otlp import DEFAULT_MAX_DEPTH, OtlpDecodeError, check_max_depth, decode_traces
from knhk.otlp.metrics import decode_metrics_counted
from knhk.receivers import _common

logger = logging.getLogger(__name__)

__all__ = ["OtlpGrpcReceiver"]

_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


class OtlpGrpcReceiver(_common.ReceiverCounters):
    """An OTLP/gRPC server whose TraceService and MetricsService feed ``pipeline``.

    Parameters
    ----------
    pipeline : TelemetryPipeline
        Where decoded spans (``record_batch``) and metric points
        (``record_metric_batch``) go.
    endpoint : str
        ``host:port`` to bind; ``localhost:4317`` by default, port 0 picks a free one.
    max_request_bytes : int
        The largest request accepted, compressed and decompressed (gRPC's
        receive limit); larger ones get ``RESOURCE_EXHAUSTED``.
    max_depth : int
        The deepest nesting of AnyValue arrays / kvlists accepted.
    bearer_token : str, optional
        When set, requests must carry ``authorization: Bearer <token>``
        (compared in constant time) or get ``UNAUTHENTICATED``.
    server_credentials : grpc.ServerCredentials, optional
        TLS; plaintext when omitted.
    max_workers : int
        Threads serving requests.
    """

    def __init__(self, pipeline: Any, *, endpoint: str = "localhost:4317",
                 max_request_bytes: int = 4 * 1024 * 1024, max_depth: int = DEFAULT_MAX_DEPTH,
                 bearer_token: str | None = None,
                 server_credentials: grpc.ServerCredentials | None = None,
                 max_workers: int = 4) -> None:
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(
                f"max_request_bytes must be a positive int, got {max_request_bytes!r}.")
        if ":" not in endpoint:
            raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}.")
        self.pipeline = pipeline
        self.endpoint = endpoint
        self.max_depth = check_max_depth(max_depth)
        self._token = bearer_token
        self._creds = server_credentials
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="knhk-otlp"),
            # SO_REUSEPORT off: a second server on a port in use must fail, not share it.
            options=[("grpc.max_receive_message_length", max_request_bytes),
                     ("grpc.so_reuseport", 0)],
        )
        handler = grpc.unary_unary_rpc_method_handler(self._export_traces)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_TRACE_SERVICE, {"Export": handler}),
             grpc.method_handlers_generic_handler(_METRICS_SERVICE, {
                 "Export": grpc.unary_unary_rpc_method_handler(self._export_metrics)})))
        self.port = 0
        self._init_counters()

    def start(self) -> OtlpGrpcReceiver:
        """Bind and start serving; ``port`` is the bound port."""
        if self._creds is None:
            self.port = self._server.add_insecure_port(self.endpoint)
        else:
            self.port = self._server.add_secure_port(self.endpoint, self._creds)
        if self.port == 0:
            raise OSError(f"cannot bind the OTLP/gRPC receiver to {self.endpoint}")
        self._server.start()
        logger.info("OTLP/gRPC receiver listening on %s (port %d)", self.endpoint, self.port)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting requests; in-flight ones get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()

    def __enter__(self) -> OtlpGrpcReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._token is not None:
            meta = dict(context.invocation_metadata())
            if not _common.bearer_ok(self._token, meta.get("authorization")):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def _refuse(self, context: grpc.ServicerContext, result: _common.Admission) -> None:
        self._count(requests_refused=1)
        message = result.message
        if result.too_large:
            # RESOURCE_EXHAUSTED without RetryInfo: not retryable (OTLP specification)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        context.abort_with_status(_Status(
            grpc.StatusCode.UNAVAILABLE, message,
            (("grpc-status-details-bin", _common.status_bytes(
                _common.UNAVAILABLE, message, _common.RETRY_AFTER_S)),)))

    def _export_metrics(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count(requests=1)
        self._authorize(context)
        try:
            batch, skipped = decode_metrics_counted(request, max_depth=self.max_depth)
        except OtlpDecodeError as exc:
            self._count(requests_invalid=1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = _common.admit_metrics(self.pipeline, batch, skipped)
        if not result.accepted:
            self._refuse(context, result)
        self._count(metric_points_received=batch.num_rows
                    - max(0, result.rejected_spans - skipped))
        return _common.partial_success_bytes(result.rejected_spans, result.message)

    def _export_traces(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count(requests=1)
        self._authorize(context)
        try:
            batch = decode_traces(request, max_depth=self.max_depth)
        except OtlpDecodeError as exc:
            self._count(requests_invalid=1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = _common.admit(self.pipeline, batch)
        if not result.accepted:
            self._refuse(context, result)
        self._count(spans_received=batch.num_rows - result.rejected_spans)
        return _common.partial_success_bytes(result.rejected_spans, result.message)


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
