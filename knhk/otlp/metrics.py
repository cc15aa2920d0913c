"""OTLP protobuf and JSON for metrics: ``ExportMetricsServiceRequest`` to and from MetricBatch.

The binary codec is compiled (``knhk._core._otlp``, beside the trace codec): it
walks the protobuf bytes once and fills Arrow buffers in
:data:`knhk.METRIC_SCHEMA` directly, one row per data point, and encodes a
batch straight from its Arrow buffers. OTLP/JSON goes through
opentelemetry-proto's classes and protobuf's ``json_format`` to and from those
bytes (JSON is the slow path).

The mapping:

* ``Gauge`` -> :attr:`~knhk.MetricKind.GAUGE` (temporality ``UNSPECIFIED``);
* ``Sum`` -> :attr:`~knhk.MetricKind.COUNTER` when ``is_monotonic``, else
  :attr:`~knhk.MetricKind.UP_DOWN_COUNTER`, with its aggregation temporality;
* ``Histogram`` -> :attr:`~knhk.MetricKind.HISTOGRAM` with ``bounds``,
  ``bucket_counts``, ``count``, ``sum``, ``min``, ``max``;
* ``as_int`` sets ``int_value`` (and ``value`` to the same number as a
  float); ``as_double`` sets ``value`` only.

What METRIC_SCHEMA has no column for is dropped on decode: exemplars, the
metric's ``metadata``, scope attributes, schema URLs and dropped-attribute
counts. ``Summary`` and ``ExponentialHistogram`` metrics are not represented
either; their points are counted (see :func:`decode_metrics_counted`) and
logged, never dropped silently. Encoding groups consecutive rows sharing a
resource, then a scope, then a metric identity.

Example
-------
>>> import knhk
>>> from knhk.otlp.metrics import decode_metrics, encode_metrics
>>> from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
...     ExportMetricsServiceRequest)
>>> req = ExportMetricsServiceRequest()
>>> m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="requests")
>>> m.sum.is_monotonic = True
>>> m.sum.aggregation_temporality = 2
>>> point = m.sum.data_points.add(as_int=7, time_unix_nano=5)
>>> point.attributes.add(key="route").value.string_value = "/"
>>> batch = decode_metrics(req.SerializeToString())
>>> batch.column("kind").to_pylist() == [knhk.MetricKind.COUNTER]
True
>>> batch.column("int_value").to_pylist()
[7]
>>> ExportMetricsServiceRequest.FromString(encode_metrics(batch)) == req
True
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from knhk._build import load_core
from knhk.batch import MetricBatch

# OtlpDecodeError is what this module's decoders raise (via _run_decoder): kept in
# its namespace for the doctests and for callers importing it from here.
from knhk.otlp import DEFAULT_MAX_DEPTH, OtlpDecodeError, _run_decoder  # noqa: F401
from knhk.schema import METRIC_SCHEMA

__all__ = [
    "decode_metrics",
    "decode_metrics_counted",
    "decode_metrics_json",
    "encode_metrics",
    "encode_metrics_json",
]

logger = logging.getLogger(__name__)

_REQUEST = "ExportMetricsServiceRequest"
_codec = load_core("_otlp")


# -- decode ---------------------------------------------------------------------------


def decode_metrics_counted(data: bytes | bytearray | memoryview, *,
                           max_depth: int = DEFAULT_MAX_DEPTH,
                           default_service: str = "unknown_service") -> tuple[MetricBatch, int]:
    """Like :func:`decode_metrics`, also returning how many points could not be represented.

    Returns
    -------
    (MetricBatch, int)
        The batch, and the number of ``Summary`` / ``ExponentialHistogram``
        points skipped (a receiver reports them as rejected in a partial success).

    Examples
    --------
    >>> decode_metrics_counted(b"")[1]
    0
    """
    rb, skipped = _run_decoder(_codec.decode_metrics, data, max_depth, default_service,
                              METRIC_SCHEMA)
    if skipped:
        logger.warning("%d OTLP Summary / ExponentialHistogram points are not supported "
                       "and were dropped", skipped)
    return MetricBatch(rb), skipped


def decode_metrics(data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_MAX_DEPTH,
                   default_service: str = "unknown_service") -> MetricBatch:
    """Decode ``ExportMetricsServiceRequest`` protobuf bytes into a :class:`~knhk.MetricBatch`.

    Parameters
    ----------
    data : bytes-like
        The serialized request (uncompressed).
    max_depth : int
        The deepest nesting of AnyValue arrays / kvlists accepted.
    default_service : str
        ``service`` of points whose resource has no string ``service.name``.

    Returns
    -------
    MetricBatch
        One row per data point, in wire order.

    Raises
    ------
    OtlpDecodeError
        Not a valid request (the message says what and where).

    Examples
    --------
    >>> decode_metrics(b"").num_rows
    0
    >>> try:
    ...     decode_metrics(b"\\x0a\\x05\\x12")
    ... except OtlpDecodeError as exc:
    ...     print("ExportMetricsServiceRequest" in str(exc))
    True
    """
    return decode_metrics_counted(data, max_depth=max_depth,
                                  default_service=default_service)[0]


# -- encode ---------------------------------------------------------------------------


def encode_metrics(batch: MetricBatch | pa.RecordBatch) -> bytes:
    """Encode a metric batch as ``ExportMetricsServiceRequest`` protobuf bytes.

    Parameters
    ----------
    batch : MetricBatch or pyarrow.RecordBatch
        Points in :data:`knhk.METRIC_SCHEMA`.

    Returns
    -------
    bytes
        The serialized request. Consecutive rows sharing a resource, then a
        scope, then a metric (name, description, unit, kind, temporality)
        share one message of each. A row whose resource has no
        ``service.name`` but whose ``service`` is not ``unknown_service`` gets
        ``service.name`` added to its resource.

    Examples
    --------
    >>> import knhk
    >>> rb = pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA)
    >>> encode_metrics(rb)
    b''
    """
    rb = batch.record_batch if isinstance(batch, MetricBatch) else batch
    if not rb.schema.equals(METRIC_SCHEMA):
        rb = MetricBatch(rb).record_batch
    return _codec.encode_metrics(rb)


# -- OTLP/JSON ------------------------------------------------------------------------


def _exemplar_ids(obj: Any, convert) -> None:
    """Apply ``convert`` to exemplar trace / span ids (hex in OTLP/JSON, base64 in protobuf's)."""
    for rm in obj.get("resourceMetrics", obj.get("resource_metrics", [])) or []:
        for sm in rm.get("scopeMetrics", rm.get("scope_metrics", [])) or []:
            for m in sm.get("metrics", []) or []:
                if not isinstance(m, dict):
                    continue
                for data in m.values():
                    if not isinstance(data, dict):
                        continue
                    for p in data.get("dataPoints", data.get("data_points", [])) or []:
                        for ex in (p.get("exemplars") or []) if isinstance(p, dict) else []:
                            for key in ("traceId", "spanId", "trace_id", "span_id"):
                                if isinstance(ex, dict) and isinstance(ex.get(key), str):
                                    ex[key] = convert(ex[key], key)


def decode_metrics_json(data: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH,
                        default_service: str = "unknown_service") -> tuple[MetricBatch, int]:
    """Decode an OTLP/JSON ``ExportMetricsServiceRequest``.

    Returns
    -------
    (MetricBatch, int)
        As :func:`decode_metrics_counted`.

    Raises
    ------
    OtlpDecodeError
        Not JSON, not the request's shape, or nested too deeply.

    Examples
    --------
    >>> batch, skipped = decode_metrics_json('{"resourceMetrics": [{"scopeMetrics": [{'
    ...     '"metrics": [{"name": "t", "gauge": {"dataPoints": [{"asDouble": 2.5}]}}]}]}]}')
    >>> batch.column("value").to_pylist(), skipped
    ([2.5], 0)
    """
    from knhk.otlp.json import json_to_protobuf

    wire = json_to_protobuf(data, ExportMetricsServiceRequest, 4 * max_depth + 20,
                            _exemplar_ids)
    return decode_metrics_counted(wire, max_depth=max_depth, default_service=default_service)


def encode_metrics_json(batch: MetricBatch | pa.RecordBatch) -> str:
    """Encode a metric batch as an OTLP/JSON ``ExportMetricsServiceRequest`` string.

    Examples
    --------
    >>> import knhk
    >>> encode_metrics_json(pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA))
    '{}'
    """
    from knhk.otlp.json import protobuf_to_json

    return protobuf_to_json(encode_metrics(batch), ExportMetricsServiceRequest, _exemplar_ids)
