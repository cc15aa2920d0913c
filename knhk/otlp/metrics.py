"""OTLP protobuf and JSON for metrics: ``ExportMetricsServiceRequest`` to and from MetricBatch.

Metric points arrive in far smaller numbers than spans, so this path goes
through opentelemetry-proto's generated classes (``metrics_service_pb2`` /
``metrics_pb2``) instead of a compiled codec: protobuf parses and serializes,
and this module maps each data point to a row of :data:`knhk.METRIC_SCHEMA`.

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

import base64
import binascii
import json
import logging
from typing import Any

import pyarrow as pa
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from knhk.batch import MetricBatch
from knhk.otlp import DEFAULT_MAX_DEPTH, OtlpDecodeError
from knhk.schema import METRIC_SCHEMA, AttrType, MetricKind, Temporality

__all__ = [
    "decode_metrics",
    "decode_metrics_counted",
    "decode_metrics_json",
    "encode_metrics",
    "encode_metrics_json",
]

logger = logging.getLogger(__name__)

_REQUEST = "ExportMetricsServiceRequest"
_SLOT = {"string_value": ("str", AttrType.STRING), "bool_value": ("bool", AttrType.BOOL),
         "int_value": ("int", AttrType.INT), "double_value": ("double", AttrType.DOUBLE),
         "bytes_value": ("bytes", AttrType.BYTES), "array_value": ("any", AttrType.ARRAY),
         "kvlist_value": ("any", AttrType.KVLIST)}


# -- decode ---------------------------------------------------------------------------


def _depth_ok(value: AnyValue, limit: int) -> bool:
    """Whether ``value`` nests arrays / kvlists at most ``limit`` deep (iteratively)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        kind = v.WhichOneof("value")
        if kind == "array_value":
            children = list(v.array_value.values)
        elif kind == "kvlist_value":
            children = [kv.value for kv in v.kvlist_value.values]
        else:
            continue
        if d + 1 > limit:
            return False
        stack.extend((c, d + 1) for c in children)
    return True


def _rows(kvs, where: str, max_depth: int) -> list[dict]:
    """Repeated ``KeyValue`` -> rows of ``ATTRIBUTE_STRUCT`` (order and duplicates kept)."""
    out = []
    for kv in kvs:
        row = {"key": kv.key, "type": int(AttrType.EMPTY), "str": None, "int": None,
               "double": None, "bool": None, "bytes": None, "any": None}
        kind = kv.value.WhichOneof("value")
        if kind is not None:
            slot, tag = _SLOT[kind]
            row["type"] = int(tag)
            if slot == "any":
                if not _depth_ok(kv.value, max_depth):
                    raise OtlpDecodeError(f"malformed {_REQUEST}: {where}[{kv.key!r}] nests "
                                          f"arrays / kvlists deeper than {max_depth}")
                row["any"] = kv.value.SerializeToString()
            else:
                row[slot] = getattr(kv.value, kind)
        out.append(row)
    return out


def _parse(data: bytes | bytearray | memoryview) -> ExportMetricsServiceRequest:
    try:
        return ExportMetricsServiceRequest.FromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        # RuntimeError: protobuf's recursion limit on absurdly deep nesting
        raise OtlpDecodeError(f"malformed {_REQUEST}: {exc}") from None


def _from_message(req: ExportMetricsServiceRequest, max_depth: int,
                  default_service: str) -> tuple[MetricBatch, int]:
    rows: list[dict] = []
    unsupported = 0
    for ri, rm in enumerate(req.resource_metrics):
        res = _rows(rm.resource.attributes, f"resource_metrics[{ri}].resource.attributes",
                    max_depth)
        service = next((r["str"] for r in res if r["key"] == "service.name"
                        and r["type"] == AttrType.STRING and r["str"]), default_service)
        for si, sm in enumerate(rm.scope_metrics):
            scope_name = sm.scope.name or None
            scope_version = sm.scope.version or None
            for mi, m in enumerate(sm.metrics):
                where = f"resource_metrics[{ri}].scope_metrics[{si}].metrics[{mi}]"
                data = m.WhichOneof("data")
                base = {"name": m.name, "description": m.description or None,
                        "unit": m.unit or None, "service": service,
                        "resource_attributes": res, "scope_name": scope_name,
                        "scope_version": scope_version}
                if data == "gauge":
                    points, kind, temp, mono = (m.gauge.data_points, MetricKind.GAUGE,
                                                Temporality.UNSPECIFIED, False)
                elif data == "sum":
                    mono = m.sum.is_monotonic
                    points, kind, temp = (m.sum.data_points, MetricKind.COUNTER if mono
                                          else MetricKind.UP_DOWN_COUNTER,
                                          m.sum.aggregation_temporality)
                elif data == "histogram":
                    points, kind, temp, mono = (m.histogram.data_points, MetricKind.HISTOGRAM,
                                                m.histogram.aggregation_temporality, False)
                else:
                    if data is not None:
                        unsupported += len(getattr(m, data).data_points)
                        logger.warning("OTLP metric %r: %s is not supported; %d points "
                                       "dropped", m.name, data,
                                       len(getattr(m, data).data_points))
                    continue
                if temp not in (0, 1, 2):
                    raise OtlpDecodeError(f"malformed {_REQUEST}: {where} has aggregation "
                                          f"temporality {temp}, not 0, 1 or 2")
                for pi, p in enumerate(points):
                    row = dict(base, kind=int(kind), temporality=int(temp), monotonic=mono,
                               start_time_ns=_i64(p.start_time_unix_nano, where),
                               time_ns=_i64(p.time_unix_nano, where), flags=p.flags,
                               attributes=_rows(p.attributes,
                                                f"{where}.data_points[{pi}].attributes",
                                                max_depth),
                               value=None, int_value=None, count=None, sum=None, min=None,
                               max=None, bounds=None, bucket_counts=None)
                    if kind is MetricKind.HISTOGRAM:
                        counts, nb = p.bucket_counts, len(p.explicit_bounds)
                        # bucket_counts is optional; when present the spec fixes its shape
                        if counts and (len(counts) != nb + 1 or sum(counts) != p.count):
                            raise OtlpDecodeError(
                                f"malformed {_REQUEST}: {where}.data_points[{pi}] has "
                                f"{len(counts)} bucket counts summing to {sum(counts)} for "
                                f"{nb} bounds and count {p.count} (expected {nb + 1} "
                                "summing to count)")
                        row.update(count=p.count, bounds=list(p.explicit_bounds),
                                   bucket_counts=list(p.bucket_counts),
                                   sum=p.sum if p.HasField("sum") else None,
                                   min=p.min if p.HasField("min") else None,
                                   max=p.max if p.HasField("max") else None)
                    else:
                        which = p.WhichOneof("value")
                        if which == "as_int":
                            row.update(int_value=p.as_int, value=float(p.as_int))
                        elif which == "as_double":
                            row["value"] = p.as_double
                    rows.append(row)
    if not rows:
        return MetricBatch(pa.RecordBatch.from_pylist([], schema=METRIC_SCHEMA)), unsupported
    try:
        rb = pa.RecordBatch.from_pylist(rows, schema=METRIC_SCHEMA)
    except (pa.ArrowException, OverflowError) as exc:
        raise OtlpDecodeError(f"malformed {_REQUEST}: {exc}") from None
    return MetricBatch(rb), unsupported


def _i64(t: int, where: str) -> int:
    if t >= 1 << 63:
        raise OtlpDecodeError(f"malformed {_REQUEST}: {where} has a timestamp {t} beyond int64")
    return t


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
    return _from_message(_parse(data), max_depth, default_service)


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


def _kvs(rows: list[dict] | None, out) -> None:
    for r in rows or ():
        kv: KeyValue = out.add(key=r["key"])
        tag = r["type"]
        if tag == AttrType.STRING:
            kv.value.string_value = r["str"]
        elif tag == AttrType.BOOL:
            kv.value.bool_value = r["bool"]
        elif tag == AttrType.INT:
            kv.value.int_value = r["int"]
        elif tag == AttrType.DOUBLE:
            kv.value.double_value = r["double"]
        elif tag == AttrType.BYTES:
            kv.value.bytes_value = r["bytes"]
        elif tag in (AttrType.ARRAY, AttrType.KVLIST):
            kv.value.ParseFromString(r["any"])


def _attr_key(rows: list[dict]) -> tuple:
    return tuple((r["key"], r["type"], r["str"], r["int"], r["double"], r["bool"], r["bytes"],
                  r["any"]) for r in rows)


def _to_message(batch: MetricBatch | pa.RecordBatch) -> ExportMetricsServiceRequest:
    rb = batch.record_batch if isinstance(batch, MetricBatch) else batch
    if not rb.schema.equals(METRIC_SCHEMA):
        rb = MetricBatch(rb).record_batch
    req = ExportMetricsServiceRequest()
    res_key = scope_key = metric_key = None
    rm = sm = metric = None
    for row in rb.to_pylist():
        res = row["resource_attributes"] or []
        if row["service"] != "unknown_service" and not any(
                r["key"] == "service.name" and r["type"] == AttrType.STRING for r in res):
            # a point recorded with a service but no resource keeps its service
            res = [*res, {"key": "service.name", "type": int(AttrType.STRING),
                          "str": row["service"], "int": None, "double": None, "bool": None,
                          "bytes": None, "any": None}]
        key = _attr_key(res)
        if key != res_key:
            res_key, scope_key, metric_key = key, None, None
            rm = req.resource_metrics.add()
            _kvs(res, rm.resource.attributes)
        key = (row["scope_name"], row["scope_version"])
        if key != scope_key:
            scope_key, metric_key = key, None
            sm = rm.scope_metrics.add()
            if row["scope_name"]:
                sm.scope.name = row["scope_name"]
            if row["scope_version"]:
                sm.scope.version = row["scope_version"]
        kind = MetricKind(row["kind"])
        key = (row["name"], row["description"], row["unit"], kind, row["temporality"],
               row["monotonic"])
        if key != metric_key:
            metric_key = key
            metric = sm.metrics.add(name=row["name"], description=row["description"] or "",
                                    unit=row["unit"] or "")
            if kind is MetricKind.GAUGE:
                data = metric.gauge
            elif kind is MetricKind.HISTOGRAM:
                data = metric.histogram
                data.aggregation_temporality = row["temporality"]
            else:
                data = metric.sum
                data.aggregation_temporality = row["temporality"]
                data.is_monotonic = kind is MetricKind.COUNTER
        p = data.data_points.add(start_time_unix_nano=row["start_time_ns"],
                                 time_unix_nano=row["time_ns"], flags=row["flags"])
        _kvs(row["attributes"], p.attributes)
        if kind is MetricKind.HISTOGRAM:
            counts = row["bucket_counts"] or []
            p.count = row["count"] if row["count"] is not None else sum(counts)
            p.explicit_bounds.extend(row["bounds"] or [])
            p.bucket_counts.extend(counts)
            for f in ("sum", "min", "max"):
                if row[f] is not None:
                    setattr(p, f, row[f])
        elif row["int_value"] is not None:
            p.as_int = row["int_value"]
        elif row["value"] is not None:
            p.as_double = row["value"]
    return req


def encode_metrics(batch: MetricBatch | pa.RecordBatch) -> bytes:
    """Encode a metric batch as ``ExportMetricsServiceRequest`` protobuf bytes.

    Parameters
    ----------
    batch : MetricBatch or pyarrow.RecordBatch
        Points in :data:`knhk.METRIC_SCHEMA`.

    Returns
    -------
    bytes
        The serialized request. A row whose resource has no ``service.name``
        but whose ``service`` is not ``unknown_service`` gets ``service.name``
        added to its resource.

    Examples
    --------
    >>> import knhk
    >>> rb = pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA)
    >>> encode_metrics(rb)
    b''
    """
    return _to_message(batch).SerializeToString()


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
    from knhk.otlp.json import hex_to_b64, load_request

    obj = load_request(data, 4 * max_depth + 20)
    try:
        _exemplar_ids(obj, hex_to_b64)
        msg = json_format.ParseDict(obj, ExportMetricsServiceRequest(),
                                    ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError) as exc:
        raise OtlpDecodeError(f"malformed OTLP/JSON request: {exc}") from None
    return _from_message(msg, max_depth, default_service)


def encode_metrics_json(batch: MetricBatch | pa.RecordBatch) -> str:
    """Encode a metric batch as an OTLP/JSON ``ExportMetricsServiceRequest`` string.

    Examples
    --------
    >>> import knhk
    >>> encode_metrics_json(pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA))
    '{}'
    """
    obj = json_format.MessageToDict(_to_message(batch), use_integers_for_enums=True)

    def b64_to_hex(value: str, key: str) -> str:
        try:
            return base64.b64decode(value).hex()
        except binascii.Error:  # pragma: no cover - protobuf wrote it
            return value

    _exemplar_ids(obj, b64_to_hex)
    return json.dumps(obj, separators=(", ", ": "))
