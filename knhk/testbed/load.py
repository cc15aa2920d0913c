"""Load generator: OTLP trace requests at a set rate, every span id unique and recorded.

The requests are built with opentelemetry-proto's generated classes, not
knhk's codec, so the system under test decodes what an independent OTLP
client encodes. A request the server accepts (gRPC OK / HTTP 200) adds its
span ids to :attr:`LoadGenerator.acked`; a retryable refusal (UNAVAILABLE,
RESOURCE_EXHAUSTED with RetryInfo, 429/502/503/504, connection refused) is
retried after the server's hint or a short backoff, as an OTLP SDK would; a
permanent refusal or exhausted retries adds them to :attr:`LoadGenerator.gave_up`.

Example
-------
>>> gen = LoadGenerator("localhost:1", protocol="grpc", spans_per_request=3, run_id=7)
>>> req, ids = gen.make_request()
>>> len(ids), len(set(ids)), len(req.SerializeToString()) > 0
(3, 3, True)
>>> gen.close()
"""

from __future__ import annotations

import gzip
import http.client
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

logger = logging.getLogger(__name__)

__all__ = ["LoadGenerator", "LoadResult", "span_digest", "span_id_bytes"]

_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED"}
_RETRYABLE_HTTP = {429, 502, 503, 504}


def span_id_bytes(run_id: int, seq: int) -> bytes:
    """The 8-byte span id of span ``seq`` of run ``run_id`` (never all zero)."""
    return struct.pack(">Q", ((run_id & 0xFFFF) << 44) | ((seq + 1) & ((1 << 44) - 1)))


def span_digest(span: Any) -> tuple:
    """What must survive the trip unchanged: ids, name, kind, times and attributes."""
    attrs = tuple(sorted((kv.key, kv.value.SerializeToString(deterministic=True))
                         for kv in span.attributes))
    return (bytes(span.trace_id), bytes(span.span_id), bytes(span.parent_span_id), span.name,
            span.kind, span.start_time_unix_nano, span.end_time_unix_nano, attrs)


@dataclass
class LoadResult:
    """What a load run did: span ids the server took, and what became of the rest."""

    acked: set = field(default_factory=set)
    gave_up: dict = field(default_factory=dict)  # span id -> reason
    requests: int = 0
    retries: int = 0
    refusals_by_reason: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    target_rate: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.acked)

    @property
    def achieved_rate(self) -> float:
        return (len(self.acked) + len(self.gave_up)) / self.elapsed_s if self.elapsed_s else 0.0


class LoadGenerator:
    """Send OTLP trace requests to ``endpoint`` at a set span rate.

    Parameters
    ----------
    endpoint : str
        gRPC ``host:port``, or for HTTP the full ``http://host:port/v1/traces`` URL.
    protocol : {"grpc", "http/protobuf", "http/json"}
    spans_per_request : int
        Spans in each request (10 spans per trace).
    run_id : int
        Distinguishes this generator's span ids from another's (16 bits).
    retry : bool
        Retry retryable refusals (as OTLP SDKs do); False sends each request once.
    max_retry_s : float
        Give up on a request (counting it in ``gave_up``) after this long.
    gzip : bool
        Compress the bodies.
    keep_spans : bool
        Keep a digest of every span made in :attr:`spans` (to compare with the backend's).
    padding_bytes : int
        A string attribute of this many bytes on every span (memory pressure).
    """

    def __init__(self, endpoint: str, *, protocol: str = "grpc", spans_per_request: int = 100,
                 run_id: int = 1, retry: bool = True, max_retry_s: float = 60.0,
                 gzip: bool = False, timeout: float = 5.0, keep_spans: bool = False,
                 padding_bytes: int = 0) -> None:
        if protocol not in ("grpc", "http/protobuf", "http/json"):
            raise ValueError(
                f"protocol must be grpc, http/protobuf or http/json, got {protocol!r}.")
        if spans_per_request < 1:
            raise ValueError(f"spans_per_request must be >= 1, got {spans_per_request!r}.")
        self.endpoint = endpoint
        self.protocol = protocol
        self.spans_per_request = spans_per_request
        self.run_id = run_id
        self.retry = retry
        self.max_retry_s = max_retry_s
        self.gzip = gzip
        self.timeout = timeout
        self.padding = "x" * padding_bytes
        self.result = LoadResult()
        #: span id -> digest (see :func:`span_digest`) of every span made, with ``keep_spans``
        self.spans: dict[bytes, tuple] | None = {} if keep_spans else None
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._channel = None
        if protocol == "grpc":
            import grpc

            self._grpc = grpc
            self._channel = grpc.insecure_channel(endpoint)
            self._call = self._channel.unary_unary(_GRPC_METHOD)

    def close(self) -> None:
        """Release the channel; a running :meth:`run` stops at its next request."""
        self._stop.set()
        if self._channel is not None:
            self._channel.close()

    # -- requests ----------------------------------------------------------------

    def make_request(self, n: int | None = None) -> tuple[Any, list[bytes]]:
        """A fresh ``ExportTraceServiceRequest`` of ``n`` spans and their span ids."""
        n = self.spans_per_request if n is None else n
        with self._lock:
            first = self._seq
            self._seq += n
        req = trace_service_pb2.ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        attr = rs.resource.attributes.add()
        attr.key, attr.value.string_value = "service.name", f"loadgen-{self.run_id}"
        ss = rs.scope_spans.add()
        ss.scope.name = "knhk.testbed"
        now = time.time_ns()
        ids = []
        for i in range(first, first + n):
            sid = span_id_bytes(self.run_id, i)
            ids.append(sid)
            sp = ss.spans.add()
            sp.trace_id = struct.pack(">QQ", self.run_id + 1, i // 10 + 1)
            sp.span_id = sid
            if i % 10:
                sp.parent_span_id = span_id_bytes(self.run_id, i - i % 10)
            sp.name = f"op-{i % 7}"
            sp.kind = 2 if i % 10 == 0 else 3
            sp.start_time_unix_nano = now - 5_000_000
            sp.end_time_unix_nano = now - 5_000_000 + 1_000 * (1 + i % 997)
            a = sp.attributes.add()
            a.key, a.value.int_value = "testbed.seq", i
            if self.padding:
                a = sp.attributes.add()
                a.key, a.value.string_value = "testbed.padding", self.padding
            if self.spans is not None:
                self.spans[sid] = span_digest(sp)
        return req, ids

    def _body(self, req: Any) -> tuple[bytes, str]:
        if self.protocol == "http/json":
            from google.protobuf import json_format

            return json_format.MessageToJson(req).encode(), "application/json"
        return req.SerializeToString(), "application/x-protobuf"

    def send_once(self, req: Any) -> tuple[bool, bool, float | None, str]:
        """One attempt: ``(ok, retryable, server_delay_s, reason)``."""
        if self.protocol == "grpc":
            grpc = self._grpc
            try:
                self._call(req.SerializeToString(), timeout=self.timeout,
                           compression=grpc.Compression.Gzip if self.gzip else None)
                return True, False, None, "ok"
            except grpc.RpcError as exc:
                name = exc.code().name if exc.code() is not None else "UNKNOWN"
                from knhk.exporters._retry import grpc_retry_delay

                delay = grpc_retry_delay(exc.trailing_metadata())
                retryable = name in _RETRYABLE_GRPC or (name == "RESOURCE_EXHAUSTED"
                                                        and delay is not None)
                return False, retryable, delay, f"grpc:{name}"
        body, ctype = self._body(req)
        headers = {"Content-Type": ctype}
        if self.gzip:
            body = gzip.compress(body, 3)
            headers["Content-Encoding"] = "gzip"
        return http_post(self.endpoint, body, headers, self.timeout)

    def send(self, req: Any, ids: list[bytes]) -> bool:
        """Send ``req`` until accepted, refused for good, or ``max_retry_s``; record its ids."""
        start = time.monotonic()
        wait = 0.02
        while True:
            ok, retryable, delay, reason = self.send_once(req)
            with self._lock:
                self.result.requests += 1
                if not ok:
                    self.result.refusals_by_reason[reason] = \
                        self.result.refusals_by_reason.get(reason, 0) + 1
            if ok:
                with self._lock:
                    self.result.acked.update(ids)
                return True
            give_up = not (retryable and self.retry) or self._stop.is_set()
            pause = min(delay if delay is not None else wait, 1.0)
            if not give_up and time.monotonic() - start + pause > self.max_retry_s:
                give_up, reason = True, f"retries_exhausted:{reason}"
            if give_up:
                with self._lock:
                    for sid in ids:
                        self.result.gave_up[sid] = reason
                return False
            with self._lock:
                self.result.retries += 1
            time.sleep(pause)
            wait = min(wait * 2, 0.5)

    def run(self, rate: float, duration_s: float, *, senders: int = 2) -> LoadResult:
        """Send ``rate`` spans/s for ``duration_s`` seconds from ``senders`` threads.

        Each thread paces itself on an absolute schedule, so a slow request is
        made up for afterwards (up to the rate the server allows).
        """
        if rate <= 0 or duration_s <= 0:
            raise ValueError("rate and duration_s must be > 0.")
        per_thread = rate / senders
        interval = self.spans_per_request / per_thread
        n_requests = max(1, round(duration_s / interval))
        t0 = time.monotonic()

        def sender() -> None:
            for k in range(n_requests):
                if self._stop.is_set():
                    return
                due = t0 + k * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                req, ids = self.make_request()
                self.send(req, ids)

        threads = [threading.Thread(target=sender, name=f"loadgen-{i}", daemon=True)
                   for i in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.result.elapsed_s += time.monotonic() - t0
        self.result.target_rate = rate
        return self.result


def http_post(url: str, body: bytes, headers: dict, timeout: float = 5.0
              ) -> tuple[bool, bool, float | None, str]:
    """POST ``body``: ``(ok, retryable, retry_after_s, reason)``; unreachable is retryable."""
    from urllib.parse import urlsplit

    from knhk.exporters._retry import retry_after_seconds

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path or "/", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        status = resp.status
        delay = retry_after_seconds(resp.getheader("Retry-After"))
    except OSError as exc:
        return False, True, None, f"http:unreachable ({type(exc).__name__})"
    finally:
        conn.close()
    if status == 200:
        return True, False, None, "ok"
    return False, status in _RETRYABLE_HTTP, delay, f"http:{status}"
