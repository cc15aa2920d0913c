"""What the OTLP receivers share: admission into a pipeline and google.rpc.Status bytes."""

from __future__ import annotations

import hmac
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from knhk import _attributes
from knhk.batch import SpanBatch
from knhk.errors import BatchTooLargeError, PipelineClosedError

logger = logging.getLogger(__name__)

#: gRPC / google.rpc codes used by the receivers.
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
UNAUTHENTICATED = 16
UNAVAILABLE = 14

#: How long a refused client is told to wait before retrying (seconds).
RETRY_AFTER_S = 1


class ReceiverCounters:
    """The counters every OTLP receiver keeps, updated under one lock (requests are
    served on several threads at once, and ``x += n`` on an attribute is not atomic)."""

    def _init_counters(self) -> None:
        self._counters_lock = threading.Lock()
        self.requests = 0
        self.spans_received = 0
        self.requests_refused = 0
        self.requests_invalid = 0
        self.metric_points_received = 0

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)


@dataclass(frozen=True)
class Admission:
    """What became of one request's spans."""

    accepted: bool
    rejected_spans: int = 0
    message: str = ""
    #: refused because it can never fit: the client must not retry it as it is
    too_large: bool = False


#: pipeline -> MemoryLimiter consulted before a request is taken (see set_memory_limiter)
_LIMITERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_memory_limiter(pipeline: Any, limiter: Any) -> None:
    """Make every receiver feeding ``pipeline`` consult ``limiter`` first (None removes it).

    While ``limiter.admit()`` is False (resident memory above its soft limit)
    requests are refused whole with the same retryable answer as a full
    pipeline (``UNAVAILABLE`` / 503 with retry info), so clients retry.
    ``PipelineBuilder.with_memory_limiter`` calls this when it builds;
    ``pipeline`` may also be anything a receiver is given to feed (``knhk
    serve`` registers its router between receivers and pipelines).

    Examples
    --------
    >>> from knhk.memory_limiter import MemoryLimiter
    >>> class Target: ...
    >>> t, lim = Target(), MemoryLimiter(1, 2, rss=lambda: 5 << 20)
    >>> set_memory_limiter(t, lim)
    >>> memory_limiter_of(t) is lim, _memory_refusal(t, 3, "spans").accepted
    (True, False)
    >>> set_memory_limiter(t, None); memory_limiter_of(t) is None
    True
    """
    if limiter is None:
        _LIMITERS.pop(pipeline, None)
    else:
        _LIMITERS[pipeline] = limiter


def memory_limiter_of(pipeline: Any) -> Any:
    """The limiter set for ``pipeline`` with :func:`set_memory_limiter`, or None."""
    try:
        return _LIMITERS.get(pipeline)
    except TypeError:  # an unhashable stand-in for a pipeline has no limiter
        return None


def _memory_refusal(pipeline: Any, n: int, what: str) -> Admission | None:
    limiter = memory_limiter_of(pipeline)
    if limiter is None or limiter.admit():
        return None
    return Admission(False, message=(
        f"memory is above the soft limit (the request has {n} {what}); retry later"))


def admit(pipeline, batch: SpanBatch) -> Admission:
    """Hand ``batch`` to ``pipeline`` whole, or refuse it whole when there is no room.

    A refusal is never a silent loss: the client gets UNAVAILABLE / 503 and
    retries. Invalid rows (all-zero ids, end before start) are dropped and
    counted by the pipeline and reported back as a partial success.
    """
    n = batch.num_rows
    if n == 0:
        return Admission(True)
    refusal = _memory_refusal(pipeline, n, "spans")
    if refusal is not None:
        return refusal
    try:
        accepted = pipeline.try_record_batch(batch)
    except PipelineClosedError:
        accepted = None
    except BatchTooLargeError as exc:
        return Admission(False, message=str(exc), too_large=True)
    if accepted is None:
        if pipeline.closed:
            return Admission(False, message="the pipeline is shut down")
        return Admission(False, message=(
            f"the pipeline is full (the request has {n} spans); retry later"))
    stats_invalid = n - accepted
    if stats_invalid:
        return Admission(True, stats_invalid, (
            f"{stats_invalid} of {n} spans were rejected (invalid ids or times, or no room)"))
    return Admission(True)


def admit_metrics(pipeline, batch, skipped: int) -> Admission:
    """Hand a metric batch to ``pipeline`` whole, or refuse it whole (the client retries).

    ``skipped`` points (types knhk cannot represent) are reported as rejected.
    """
    n = batch.num_rows
    if n:
        refusal = _memory_refusal(pipeline, n, "metric points")
        if refusal is not None:
            return refusal
        try:
            taken = pipeline.try_record_metric_batch(batch)
        except BatchTooLargeError as exc:
            return Admission(False, message=str(exc), too_large=True)
        if taken is None:
            if pipeline.closed:
                return Admission(False, message="the pipeline is shut down")
            return Admission(False, message=(
                f"the pipeline is full (the request has {n} metric points); retry later"))
        skipped += n - taken
    if skipped:
        return Admission(True, skipped, (
            f"{skipped} metric points were rejected (Summary and ExponentialHistogram "
            "are not supported)"))
    return Admission(True)


def bearer_ok(expected: str | None, header: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if expected is None:
        return True
    if not header:
        return False
    return hmac.compare_digest(header.encode(), f"Bearer {expected}".encode())


def status_bytes(code: int, message: str, retry_after_s: float | None = None) -> bytes:
    """A serialized ``google.rpc.Status``, with a ``RetryInfo`` detail when asked."""
    out = b""
    if code:
        out += b"\x08" + _attributes._varint(code)
    if message:
        out += _attributes._ld(2, message.encode())
    if retry_after_s is not None:
        secs = int(retry_after_s)
        nanos = round((retry_after_s - secs) * 1e9)
        duration = (b"\x08" + _attributes._varint(secs) if secs else b"") + (
            b"\x10" + _attributes._varint(nanos) if nanos else b"")
        retry_info = _attributes._ld(1, duration)
        any_msg = _attributes._ld(1, b"type.googleapis.com/google.rpc.RetryInfo") + \
            _attributes._ld(2, retry_info)
        out += _attributes._ld(3, any_msg)
    return out


def partial_success_bytes(rejected: int, message: str) -> bytes:
    """An ``Export*ServiceResponse`` with ``partial_success`` (empty when nothing was rejected)."""
    if not rejected and not message:
        return b""
    body = b"\x08" + _attributes._varint(rejected) if rejected else b""
    if message:
        body += _attributes._ld(2, message.encode())
    return _attributes._ld(1, body)
