"""Arrow schemas of knhk's batches, and the per-event value types.

Spans and metric points travel as Arrow record batches with one fixed schema
per signal, versioned in the schema metadata under ``knhk.schema``. The
per-event API (``Span``, ``SpanKind``, ``SpanStatus``, ``AttributeValue``) is a
convenience over the same columns.

Example
-------
>>> import knhk
>>> span = knhk.Span(name="GET /users", trace_id=1, span_id=2,
...                  start_time_ns=0, duration_ns=1_000,
...                  attributes={"http.request.method": "GET"})
>>> span.end_time_ns
1000
>>> knhk.SPAN_SCHEMA.field("trace_id").type
FixedSizeBinaryType(fixed_size_binary[16])
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from knhk._build import load_core
from knhk._enums import SpanKind, SpanStatus

_span_mod = load_core("_span")
Span = _span_mod.Span
SpanEvent = _span_mod.SpanEvent
SpanLink = _span_mod.SpanLink

__all__ = [
    "ATTRIBUTES_TYPE",
    "METRIC_SCHEMA",
    "METRIC_SCHEMA_VERSION",
    "SPAN_SCHEMA",
    "SPAN_SCHEMA_VERSION",
    "AttrType",
    "AttributeValue",
    "MetricKind",
    "MetricPoint",
    "Span",
    "SpanEvent",
    "SpanKind",
    "SpanLink",
    "SpanStatus",
    "Temporality",
]

SPAN_SCHEMA_VERSION = "spans/1"
METRIC_SCHEMA_VERSION = "metrics/1"


class AttrType(enum.IntEnum):
    """The ``type`` tag of an attribute; numbered as OTLP's AnyValue oneof fields."""

    EMPTY = 0
    STRING = 1
    BOOL = 2
    INT = 3
    DOUBLE = 4
    ARRAY = 5
    KVLIST = 6
    BYTES = 7


class MetricKind(enum.IntEnum):
    """What a metric point measures."""

    GAUGE = 1
    COUNTER = 2
    UP_DOWN_COUNTER = 3
    HISTOGRAM = 4


class Temporality(enum.IntEnum):
    """Aggregation temporality, numbered as in OTLP."""

    UNSPECIFIED = 0
    DELTA = 1
    CUMULATIVE = 2


class AttributeValue:
    """An attribute value with an explicit type.

    Plain Python values (``str``, ``bool``, ``int``, ``float``, ``bytes``,
    lists and dicts of those) are typed automatically; ``AttributeValue``
    pins a type where Python's would be wrong, e.g. a double that happens to
    be integral.

    >>> AttributeValue.double(5).value
    5.0
    >>> AttributeValue.int(5).type
    <AttrType.INT: 3>
    """

    __slots__ = ("type", "value")

    def __init__(self, type: AttrType, value: Any) -> None:
        type = AttrType(type)
        self.type = type
        self.value = _coerce_attr(type, value)

    @classmethod
    def string(cls, value: str) -> AttributeValue:
        return cls(AttrType.STRING, value)

    @classmethod
    def bool(cls, value: bool) -> AttributeValue:
        return cls(AttrType.BOOL, value)

    @classmethod
    def int(cls, value: int) -> AttributeValue:
        return cls(AttrType.INT, value)

    @classmethod
    def double(cls, value: float) -> AttributeValue:
        return cls(AttrType.DOUBLE, value)

    @classmethod
    def bytes(cls, value: bytes) -> AttributeValue:
        return cls(AttrType.BYTES, value)

    @classmethod
    def array(cls, values: list) -> AttributeValue:
        return cls(AttrType.ARRAY, values)

    @classmethod
    def kvlist(cls, values: dict) -> AttributeValue:
        return cls(AttrType.KVLIST, values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AttributeValue):
            return self.type == other.type and self.value == other.value
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.type, repr(self.value)))

    def __repr__(self) -> str:
        return f"AttributeValue.{self.type.name.lower()}({self.value!r})"


def _coerce_attr(type: AttrType, value: Any) -> Any:
    import builtins

    if type is AttrType.STRING and isinstance(value, str):
        return value
    if type is AttrType.BOOL and isinstance(value, builtins.bool):
        return value
    if type is AttrType.INT and isinstance(value, builtins.int) and not isinstance(
        value, builtins.bool
    ):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"an INT attribute must fit in int64, got {value}")
        return value
    if type is AttrType.DOUBLE and isinstance(value, (builtins.int, float)):
        return float(value)
    if type is AttrType.BYTES and isinstance(value, (builtins.bytes, bytearray, memoryview)):
        return builtins.bytes(value)
    if type is AttrType.ARRAY and isinstance(value, (list, tuple)):
        return list(value)
    if type is AttrType.KVLIST and isinstance(value, dict):
        return dict(value)
    if type is AttrType.EMPTY and value is None:
        return None
    raise TypeError(
        f"AttributeValue of type {type.name} expected a matching Python value, "
        f"got {builtins.type(value).__name__}"
    )


_DICT_STR = pa.dictionary(pa.int32(), pa.string())

#: One attribute: a key and a typed value. Exactly one value child is set,
#: chosen by ``type`` (:class:`AttrType`); arrays and kvlists are kept as the
#: OTLP ``AnyValue`` protobuf bytes in ``any``, so nesting survives a round trip.
ATTRIBUTE_STRUCT = pa.struct(
    [
        pa.field("key", _DICT_STR, nullable=False),
        pa.field("type", pa.int8(), nullable=False),
        pa.field("str", _DICT_STR),
        pa.field("int", pa.int64()),
        pa.field("double", pa.float64()),
        pa.field("bool", pa.bool_()),
        pa.field("bytes", pa.binary()),
        pa.field("any", pa.binary()),
    ]
)
ATTRIBUTES_TYPE = pa.list_(pa.field("item", ATTRIBUTE_STRUCT, nullable=False))

EVENT_STRUCT = pa.struct(
    [
        pa.field("time_unix_nano", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("dropped_attributes_count", pa.uint32(), nullable=False),
    ]
)
LINK_STRUCT = pa.struct(
    [
        pa.field("trace_id", pa.binary(16), nullable=False),
        pa.field("span_id", pa.binary(8), nullable=False),
        pa.field("trace_state", pa.string()),
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("dropped_attributes_count", pa.uint32(), nullable=False),
    ]
)

SPAN_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.binary(16), nullable=False),
        pa.field("span_id", pa.binary(8), nullable=False),
        pa.field("parent_span_id", pa.binary(8)),
        pa.field("trace_state", _DICT_STR),
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("name", _DICT_STR, nullable=False),
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("start_time_ns", pa.int64(), nullable=False),
        pa.field("end_time_ns", pa.int64(), nullable=False),
        pa.field("status_code", pa.int8(), nullable=False),
        pa.field("status_message", pa.string()),
        pa.field("service", _DICT_STR, nullable=False),
        pa.field("attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("dropped_attributes_count", pa.uint32(), nullable=False),
        pa.field("events", pa.list_(pa.field("item", EVENT_STRUCT, nullable=False)),
                 nullable=False),
        pa.field("dropped_events_count", pa.uint32(), nullable=False),
        pa.field("links", pa.list_(pa.field("item", LINK_STRUCT, nullable=False)),
                 nullable=False),
        pa.field("dropped_links_count", pa.uint32(), nullable=False),
        pa.field("resource_attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("resource_dropped_attributes_count", pa.uint32(), nullable=False),
        pa.field("resource_schema_url", _DICT_STR),
        pa.field("scope_name", _DICT_STR),
        pa.field("scope_version", _DICT_STR),
        pa.field("scope_attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("scope_dropped_attributes_count", pa.uint32(), nullable=False),
        pa.field("scope_schema_url", _DICT_STR),
    ],
    metadata={"knhk.schema": SPAN_SCHEMA_VERSION, "knhk.signal": "spans"},
)

METRIC_SCHEMA = pa.schema(
    [
        pa.field("name", _DICT_STR, nullable=False),
        pa.field("description", _DICT_STR),
        pa.field("unit", _DICT_STR),
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("temporality", pa.int8(), nullable=False),
        pa.field("monotonic", pa.bool_(), nullable=False),
        pa.field("start_time_ns", pa.int64(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("int_value", pa.int64()),
        pa.field("count", pa.uint64()),
        pa.field("sum", pa.float64()),
        pa.field("min", pa.float64()),
        pa.field("max", pa.float64()),
        pa.field("bounds", pa.list_(pa.float64())),
        pa.field("bucket_counts", pa.list_(pa.uint64())),
        pa.field("flags", pa.uint32(), nullable=False),
        pa.field("service", _DICT_STR, nullable=False),
        pa.field("attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("resource_attributes", ATTRIBUTES_TYPE, nullable=False),
        pa.field("scope_name", _DICT_STR),
        pa.field("scope_version", _DICT_STR),
    ],
    metadata={"knhk.schema": METRIC_SCHEMA_VERSION, "knhk.signal": "metrics"},
)


@dataclass(slots=True)
class MetricPoint:
    """One metric data point for ``TelemetryPipeline.record_metric``.

    ``value`` is the number for counters, up-down counters and gauges; a
    histogram point gives ``bounds`` and ``bucket_counts`` (one more count
    than bounds) and optionally ``sum``, ``min``, ``max``.
    """

    name: str
    value: float | int | None = None
    kind: MetricKind = MetricKind.GAUGE
    unit: str = ""
    description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    temporality: Temporality = Temporality.CUMULATIVE
    monotonic: bool | None = None
    time_ns: int | None = None
    start_time_ns: int | None = None
    bounds: list[float] | None = None
    bucket_counts: list[int] | None = None
    sum: float | None = None
    min: float | None = None
    max: float | None = None
    service: str | None = None


def _bind_core() -> None:
    from types import SimpleNamespace

    from knhk import _attributes

    types = SimpleNamespace(
        ID16=pa.binary(16), ID8=pa.binary(8), DICT_STR=_DICT_STR,
        ATTRIBUTE_STRUCT=ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE=ATTRIBUTES_TYPE,
        EVENTS_TYPE=SPAN_SCHEMA.field("events").type,
        LINKS_TYPE=SPAN_SCHEMA.field("links").type,
        SPAN_SCHEMA=SPAN_SCHEMA,
        event_rows=_attributes.event_rows, link_rows=_attributes.link_rows,
    )
    load_core("_ringbuffer")._bind_python(types, _attributes.encode_slow)


_bind_core()
