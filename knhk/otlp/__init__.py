"""OTLP protobuf for traces: knhk span batches to and from ``ExportTraceServiceRequest`` bytes.

All the work is done by the compiled codec (``knhk._core._otlp``), straight
between protobuf bytes and Arrow buffers in :data:`knhk.SPAN_SCHEMA` (handed
over through the Arrow C data interface, no Python object per span or per
column); this module checks arguments and words errors. Resource and scope
are stored on every span row; encoding groups consecutive rows that share
them into one ``ResourceSpans`` / ``ScopeSpans``.

Example
-------
>>> import knhk
>>> from knhk import otlp
>>> batch = knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=2, start_time_ns=10, duration_ns=5,
...               attributes={"http.response.status_code": 200})])
>>> wire = otlp.encode_traces(batch)
>>> back = otlp.decode_traces(wire)
>>> back.column("name").to_pylist(), back.attribute("http.response.status_code").to_pylist()
(['GET /'], [200])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from knhk._build import load_core
from knhk.batch import SpanBatch
from knhk.errors import KnhkError
from knhk.schema import SPAN_SCHEMA

__all__ = ["DEFAULT_MAX_DEPTH", "OtlpDecodeError", "check_max_depth", "decode_traces",
           "encode_traces"]

_codec = load_core("_otlp")

#: How deeply AnyValue arrays and kvlists may nest before a request is refused.
DEFAULT_MAX_DEPTH = 32

_EMPTY_U8 = np.zeros(0, np.uint8)


class OtlpDecodeError(KnhkError, ValueError):
    """An OTLP request that is not valid protobuf of the expected message.

    ``offset`` is the byte where the fault was found (``-1`` when no single
    byte is to blame).
    """

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message)
        self.offset = offset


#: The kernel checks nesting recursively: this bounds its stack.
_MAX_DEPTH_LIMIT = 1000


def check_max_depth(max_depth: int) -> int:
    """``max_depth`` if it is a nesting limit the codec takes, else ValueError."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) \
            or not 0 <= max_depth <= _MAX_DEPTH_LIMIT:
        raise ValueError(
            f"max_depth must be an int between 0 and {_MAX_DEPTH_LIMIT}, got {max_depth!r}")
    return max_depth


# -- decode -------------------------------------------------------------------------


def _run_decoder(kernel, data: bytes | bytearray | memoryview, max_depth: int,
                default_service: str, schema: pa.Schema):
    """Check the arguments every OTLP decoder takes, run ``kernel`` and word its failure.

    ``kernel`` is one of the compiled decoders (``decode_traces``,
    ``decode_metrics``), called as ``kernel(buf, max_depth, service, schema)``;
    its result is returned as it is. A :class:`OtlpDecodeError` carrying the
    kernel's byte offset replaces the kernel's own exception, so callers see
    one error type whichever message failed.
    """
    check_max_depth(max_depth)
    if not isinstance(default_service, str):
        raise TypeError(f"default_service must be a str, got {type(default_service).__name__}")
    try:
        buf = np.frombuffer(data, dtype=np.uint8) if len(data) else _EMPTY_U8
    except TypeError:
        raise TypeError("data must be bytes, bytearray or memoryview, "
                        f"got {type(data).__name__}") from None
    try:
        return kernel(buf, max_depth, default_service.encode(), schema)
    except _codec.DecodeError as exc:
        raise OtlpDecodeError(str(exc), exc.offset) from None



def decode_traces(data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH,
                  default_service: str = "unknown_service") -> SpanBatch:
    """Decode ``ExportTraceServiceRequest`` protobuf bytes into a :class:`SpanBatch`.

    Parameters
    ----------
    data : bytes-like
        The serialized request (uncompressed).
    max_depth : int
        The deepest nesting of AnyValue arrays / kvlists accepted.
    default_service : str
        ``service`` of spans whose resource has no string ``service.name``.

    Returns
    -------
    SpanBatch
        One row per span, in wire order, resource and scope copied onto each row.

    Raises
    ------
    OtlpDecodeError
        The bytes are not a valid request; the message names the protobuf
        message and byte offset of the first fault. Unknown fields are skipped.

    Examples
    --------
    >>> decode_traces(b"").num_rows
    0
    >>> try:
    ...     decode_traces(b"\\x0a\\x05\\x12")
    ... except OtlpDecodeError as exc:
    ...     print(exc.offset, "past the end" in str(exc))
    1 True
    """
    rb = _run_decoder(_codec.decode_traces, data, max_depth, default_service, SPAN_SCHEMA)
    if rb.num_rows == 0:
        return SpanBatch.empty()
    return SpanBatch._wrap(rb)


# -- encode -------------------------------------------------------------------------


def encode_traces(batch: SpanBatch | pa.RecordBatch) -> bytes:
    """Encode a span batch as ``ExportTraceServiceRequest`` protobuf bytes.

    Parameters
    ----------
    batch : SpanBatch or pyarrow.RecordBatch
        Spans in :data:`knhk.SPAN_SCHEMA`.

    Returns
    -------
    bytes
        The serialized request; consecutive rows with the same resource
        (attributes, dropped count, schema URL) share a ``ResourceSpans``, and
        within it the same for the instrumentation scope. A row whose resource
        has no string ``service.name`` but whose ``service`` is not
        ``unknown_service`` gets ``service.name`` added to its resource, so a
        span recorded with a service keeps it on the wire.

    Examples
    --------
    >>> encode_traces(SpanBatch.empty())
    b''
    """
    rb = batch.record_batch if isinstance(batch, SpanBatch) else batch
    if not rb.schema.equals(SPAN_SCHEMA):
        rb = SpanBatch(rb).record_batch
    return _codec.encode_traces(rb)


# The metrics codec (knhk.otlp.metrics) is imported last: it needs OtlpDecodeError
# from here.
from knhk.otlp.metrics import decode_metrics, encode_metrics  # noqa: E402

__all__ += ["decode_metrics", "encode_metrics"]
