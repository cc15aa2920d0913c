"""OTLP/HTTP receiver: ``POST /v1/traces`` and ``/v1/metrics`` (protobuf or JSON, gzip) on :4318.

Requests are size-checked before and after decompression (gzip is inflated
in bounded steps, so a small gzip bomb costs at most ``max_request_bytes``
of memory), decoded by knhk's codec and handed to a pipeline. Errors follow
the OTLP/HTTP specification: 400 with a ``google.rpc.Status`` body (protobuf
or JSON, as the request) for a
malformed request, 413 when too large, 415 for an unsupported content type or
encoding, 401 without the bearer token, 503 with ``Retry-After`` when the
pipeline is full. Metric points go to the pipeline's ``record_metric_batch``
under the same limits; points of types knhk does not represent are reported
as rejected in a partial success.

Example
-------
>>> import knhk, urllib.request
>>> from knhk.receivers import OtlpHttpReceiver
>>> with knhk.TelemetryPipeline.builder().build() as pipeline:
...     with OtlpHttpReceiver(pipeline, endpoint="localhost:0") as receiver:
...         req = urllib.request.Request(f"http://localhost:{receiver.port}/v1/traces",
...             data=b"", headers={"Content-Type": "application/x-protobuf"})
...         urllib.request.urlopen(req).status
200
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from knhk.otlp import DEFAULT_MAX_DEPTH, OtlpDecodeError, check_max_depth, decode_traces
from knhk.otlp.json import decode_traces_json
from knhk.otlp.metrics import decode_metrics_counted, decode_metrics_json
from knhk.receivers import _common

logger = logging.getLogger(__name__)

__all__ = ["OtlpHttpReceiver"]

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


class _TooLarge(Exception):
    pass


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip ``data``, refusing output beyond ``limit`` bytes without producing it."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise _TooLarge
    out += d.flush()
    if len(out) > limit:
        raise _TooLarge
    if not d.eof:
        raise zlib.error("truncated gzip stream")
    return out


class OtlpHttpReceiver(_common.ReceiverCounters):
    """An OTLP/HTTP server whose ``/v1/traces`` and ``/v1/metrics`` feed ``pipeline``.

    Parameters
    ----------
    pipeline : TelemetryPipeline
        Where decoded spans and metric points go.
    endpoint : str
        ``host:port`` to bind (``localhost:4318``; port 0 picks a free one).
    max_request_bytes : int
        The largest body accepted, both as sent and after decompression (413).
    max_depth : int
        The deepest nesting of AnyValue arrays / kvlists accepted.
    bearer_token : str, optional
        When set, requests must carry ``Authorization: Bearer <token>`` (401).
    ssl_context : ssl.SSLContext, optional
        Serve HTTPS with this server context.
    """

    def __init__(self, pipeline: Any, *, endpoint: str = "localhost:4318",
                 max_request_bytes: int = 4 * 1024 * 1024, max_depth: int = DEFAULT_MAX_DEPTH,
                 bearer_token: str | None = None, ssl_context: Any = None) -> None:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}.")
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(
                f"max_request_bytes must be a positive int, got {max_request_bytes!r}.")
        self.pipeline = pipeline
        self.max_request_bytes = max_request_bytes
        self.max_depth = check_max_depth(max_depth)
        self._token = bearer_token
        self._ssl = ssl_context
        self._addr = (host or "localhost", int(port))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ctype = threading.local()  # the request's content type, for error bodies
        self.port = 0
        self.read_timeout = 30.0
        self._init_counters()

    def start(self) -> OtlpHttpReceiver:
        """Bind and serve on a background thread; ``port`` is the bound port."""
        server = ThreadingHTTPServer(self._addr, _handler_for(self))
        server.daemon_threads = True
        server.handle_error = lambda request, address: logger.debug(  # type: ignore[method-assign]
            "OTLP/HTTP request from %s failed", address, exc_info=True)
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="knhk-otlp-http",
                                        daemon=True)
        self._thread.start()
        logger.info("OTLP/HTTP receiver listening on %s:%d", self._addr[0], self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OtlpHttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one request -------------------------------------------------------------

    def _handle(self, path: str, headers: Any, body_reader: Any) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one POST."""
        self._count(requests=1)
        self._ctype.value = None
        signal = {"/v1/traces": "traces", "/v1/metrics": "metrics"}.get(path.split("?", 1)[0])
        if signal is None:
            return self._error(404, f"no OTLP endpoint at {path!r}; traces go to /v1/traces "
                                    "and metrics to /v1/metrics")
        if not _common.bearer_ok(self._token, headers.get("Authorization")):
            return self._error(401, "missing or wrong bearer token", _common.UNAUTHENTICATED)
        ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype not in (_PROTOBUF, _JSON):
            return self._error(415, f"unsupported Content-Type {ctype!r}; expected "
                                    f"{_PROTOBUF} or {_JSON}")
        self._ctype.value = ctype
        encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            return self._error(415, f"unsupported Content-Encoding {encoding!r}; "
                                    "expected gzip or none")
        length = headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            return self._error(411, "a Content-Length header is required")
        n = int(length)
        if n > self.max_request_bytes:
            return self._error(413, f"the request body of {n} bytes exceeds the limit of "
                                    f"{self.max_request_bytes}", _common.RESOURCE_EXHAUSTED)
        data = body_reader(n)
        if len(data) != n:
            return self._error(400, f"the body ended after {len(data)} of {n} bytes")
        if encoding == "gzip":
            try:
                data = _gunzip(data, self.max_request_bytes)
            except _TooLarge:
                return self._error(413, "the decompressed request exceeds the limit of "
                                        f"{self.max_request_bytes} bytes",
                                   _common.RESOURCE_EXHAUSTED)
            except zlib.error as exc:
                self._count(requests_invalid=1)
                return self._error(400, f"the gzip body is corrupt: {exc}")
        if signal == "metrics":
            return self._metrics(data, ctype)
        try:
            if ctype == _JSON:
                batch = decode_traces_json(data, max_depth=self.max_depth)
            else:
                batch = decode_traces(data, max_depth=self.max_depth)
        except OtlpDecodeError as exc:
            self._count(requests_invalid=1)
            return self._error(400, str(exc))
        result = _common.admit(self.pipeline, batch)
        if not result.accepted:
            return self._refused(result)
        self._count(spans_received=batch.num_rows - result.rejected_spans)
        if ctype == _JSON:
            body = {}
            if result.rejected_spans:
                body = {"partialSuccess": {"rejectedSpans": str(result.rejected_spans),
                                           "errorMessage": result.message}}
            return 200, {"Content-Type": _JSON}, json.dumps(body).encode()
        return 200, {"Content-Type": _PROTOBUF}, _common.partial_success_bytes(
            result.rejected_spans, result.message)

    def _metrics(self, data: bytes, ctype: str) -> tuple[int, dict, bytes]:
        """The answer to a decompressed, size-checked ``/v1/metrics`` body."""
        try:
            if ctype == _JSON:
                batch, skipped = decode_metrics_json(data, max_depth=self.max_depth)
            else:
                batch, skipped = decode_metrics_counted(data, max_depth=self.max_depth)
        except OtlpDecodeError as exc:
            self._count(requests_invalid=1)
            return self._error(400, str(exc))
        result = _common.admit_metrics(self.pipeline, batch, skipped)
        if not result.accepted:
            return self._refused(result)
        rejected = result.rejected_spans
        self._count(metric_points_received=batch.num_rows - max(0, rejected - skipped))
        if ctype == _JSON:
            body = {}
            if rejected:
                body = {"partialSuccess": {"rejectedDataPoints": str(rejected),
                                           "errorMessage": result.message}}
            return 200, {"Content-Type": _JSON}, json.dumps(body).encode()
        return 200, {"Content-Type": _PROTOBUF}, _common.partial_success_bytes(
            rejected, result.message)

    def _refused(self, result: _common.Admission) -> tuple[int, dict, bytes]:
        self._count(requests_refused=1)
        if result.too_large:  # 413 is not retryable (OTLP specification)
            return self._error(413, result.message, _common.RESOURCE_EXHAUSTED)
        status, hdrs, body = self._error(503, result.message, _common.UNAVAILABLE,
                                         retry=_common.RETRY_AFTER_S)
        hdrs["Retry-After"] = str(_common.RETRY_AFTER_S)
        return status, hdrs, body

    def _error(self, status: int, message: str, code: int = _common.INVALID_ARGUMENT,
               retry: float | None = None) -> tuple[int, dict, bytes]:
        """An error answer with a ``google.rpc.Status`` body in the request's encoding."""
        logger.debug("OTLP/HTTP %d: %s", status, message)
        if getattr(self._ctype, "value", None) == _JSON:
            return status, {"Content-Type": _JSON}, json.dumps(
                {"code": code, "message": message}).encode()
        return status, {"Content-Type": _PROTOBUF}, _common.status_bytes(code, message, retry)


def _handler_for(receiver: OtlpHttpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "knhk-otlp"
        # a client that stalls mid-request must not hold a server thread forever
        timeout = receiver.read_timeout

        def do_POST(self) -> None:
            try:
                status, headers, body = receiver._handle(self.path, self.headers,
                                                         self.rfile.read)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                if status >= 400:
                    # the body may not have been read: do not reuse the connection
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)
            except OSError as exc:  # the client went away or timed out
                logger.debug("OTLP/HTTP connection from %s failed: %s",
                             self.address_string(), exc)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler
