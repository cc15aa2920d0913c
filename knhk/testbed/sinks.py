"""Backend sinks: OTLP/gRPC and OTLP/HTTP servers that record every span id and fail on command.

Both decode requests with opentelemetry-proto (independent of knhk's codec)
and keep, per span id, how many times it arrived in an accepted request
(``received``) and in a request they refused for good (``rejected``). Faults
are set on the live sink through :class:`Faults`:

* ``down()`` / ``up()``: stop listening (connection refused) and come back on the same port;
* ``unavailable``: the fraction of requests answered UNAVAILABLE / 503 (retryable);
* ``permanent``: the fraction answered INVALID_ARGUMENT / 400 (not retryable);
* ``delay_s``: a pause before every answer (a slow backend); a gRPC request
  whose client stopped waiting meanwhile is not counted as received.

Example
-------
>>> sink = GrpcSink().start()
>>> sink.port > 0, sink.count()
(True, 0)
>>> sink.stop()
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["Faults", "GrpcSink", "HttpSink"]


@dataclass
class Faults:
    """What a sink does to the requests it gets (change the fields while it runs)."""

    unavailable: float = 0.0
    permanent: float = 0.0
    delay_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("unavailable", "permanent"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Faults.{name} must be a fraction in [0, 1], got {v!r}.")
        if self.unavailable + self.permanent > 1.0:
            raise ValueError("Faults.unavailable + Faults.permanent must not exceed 1.")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str:
        """``"ok"``, ``"unavailable"`` or ``"permanent"`` for the next request."""
        with self._lock:
            x = self._rng.random()
        if x < self.permanent:
            return "permanent"
        if x < self.permanent + self.unavailable:
            return "unavailable"
        return "ok"


class _Sink:
    """What both sinks share: the span-id record by outcome, and the fault-driven lifecycle.

    A subclass implements :meth:`start` / :meth:`stop` for its protocol and
    answers each request by passing the decoded request to :meth:`handle` and
    translating the verdict it returns.
    """

    def __init__(self, port: int = 0, faults: Faults | None = None,
                 keep_spans: bool = False) -> None:
        self.port = port
        self.faults = faults or Faults()
        #: span id -> digest of the span as received, with ``keep_spans``
        self.spans: dict[bytes, tuple] | None = {} if keep_spans else None
        self.received: Counter = Counter()
        self.rejected: Counter = Counter()
        self.answers: Counter = Counter()
        self.requests = 0
        self._lock = threading.Lock()

    def handle(self, req: Any, alive: Any = None) -> str:
        """Record ``req``'s spans under the drawn verdict; ``alive()`` False: the client left."""
        verdict = self.faults.draw()
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)
        if alive is not None and not alive():
            # the client gave up waiting (its deadline passed): it never learns of an
            # answer, so the spans are not counted as received
            verdict = "abandoned"
        spans = [sp for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        ids = [sp.span_id for sp in spans]
        with self._lock:
            self.requests += 1
            self.answers[verdict] += 1
            if verdict == "ok":
                self.received.update(ids)
                if self.spans is not None:
                    from knhk.testbed.load import span_digest

                    for sp in spans:
                        self.spans[sp.span_id] = span_digest(sp)
            elif verdict == "permanent":
                self.rejected.update(ids)
        return verdict

    def count(self) -> int:
        """Distinct span ids received."""
        with self._lock:
            return len(self.received)

    def ids(self) -> set:
        with self._lock:
            return set(self.received)

    def duplicates(self) -> int:
        with self._lock:
            return sum(c - 1 for c in self.received.values())

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` distinct span ids arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(0.02)
        return self.count() >= n

    def start(self) -> _Sink:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        """Stop listening: clients get connection refused until :meth:`up`."""
        self.stop()

    def up(self) -> None:
        """Listen again, on the same port."""
        self.start()


class GrpcSink(_Sink):
    """An OTLP/gRPC TraceService on opentelemetry-proto's generated stubs.

    Parameters
    ----------
    port : int
        0 picks a free port (kept across ``down()`` / ``up()``).
    faults : Faults, optional
    keep_spans : bool
        Also keep a digest of every span received (``spans``).
    """

    #: verdict -> the status a request is aborted with ("ok" and "abandoned" answer normally)
    _ABORT = {"unavailable": (grpc.StatusCode.UNAVAILABLE, "testbed: injected UNAVAILABLE"),
              "permanent": (grpc.StatusCode.INVALID_ARGUMENT,
                            "testbed: injected INVALID_ARGUMENT")}

    def __init__(self, port: int = 0, faults: Faults | None = None,
                 keep_spans: bool = False) -> None:
        super().__init__(port, faults, keep_spans)
        self._server: grpc.Server | None = None

    def start(self) -> GrpcSink:
        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                abort = sink._ABORT.get(sink.handle(request, context.is_active))
                if abort is not None:
                    context.abort(*abort)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                             options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"the gRPC sink cannot bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None


class HttpSink(_Sink):
    """An OTLP/HTTP ``/v1/traces`` endpoint (protobuf and JSON), recording span ids.

    Parameters are those of :class:`GrpcSink`.
    """

    #: verdict -> HTTP status and google.rpc.Status code of the answer
    _STATUS = {"ok": (200, 0), "unavailable": (503, 14), "permanent": (400, 3)}

    def __init__(self, port: int = 0, faults: Faults | None = None,
                 keep_spans: bool = False) -> None:
        super().__init__(port, faults, keep_spans)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> HttpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if (self.headers.get("Content-Encoding") or "") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest()
                try:
                    if "json" in (self.headers.get("Content-Type") or ""):
                        json_format.Parse(body, req)
                    else:
                        req.ParseFromString(body)
                except Exception:
                    self._answer(400, b"unparseable")
                    return
                status, code = sink._STATUS[sink.handle(req)]
                self._answer(status, b"" if status == 200 else json.dumps(
                    {"code": code, "message": "testbed"}).encode(), retry=status == 503)

            def _answer(self, status: int, body: bytes, retry: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                if retry:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        # (ThreadingHTTPServer sets SO_REUSEADDR, so up() can rebind the port down()
        # released while it is in TIME_WAIT, and its handler threads are daemons)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True,
                         name="testbed-http-sink").start()
        self._server = server
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
