"""OTLP protobuf for traces: knhk span batches to and from ``ExportTraceServiceRequest`` bytes.

The wire work is done by the compiled codec (``knhk._core._otlp``), straight
between protobuf bytes and column buffers; this module turns those buffers
into Arrow arrays in :data:`knhk.SPAN_SCHEMA` and back. Resource and scope
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

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk._build import load_core
from knhk.batch import SpanBatch
from knhk.errors import KnhkError
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE, SPAN_SCHEMA, AttrType

__all__ = ["DEFAULT_MAX_DEPTH", "OtlpDecodeError", "decode_traces", "encode_traces"]

_codec = load_core("_otlp")

#: How deeply AnyValue arrays and kvlists may nest before a request is refused.
DEFAULT_MAX_DEPTH = 32

_EVENTS_TYPE = SPAN_SCHEMA.field("events").type
_LINKS_TYPE = SPAN_SCHEMA.field("links").type
_EMPTY_U8 = np.zeros(0, np.uint8)


class OtlpDecodeError(KnhkError, ValueError):
    """An OTLP request that is not valid protobuf of the expected message.

    ``offset`` is the byte where the fault was found (``-1`` when it was found
    after parsing, e.g. invalid UTF-8 in a string field).
    """

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message)
        self.offset = offset


# -- decode -------------------------------------------------------------------------


def _bitmap(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = int(valid.size - np.count_nonzero(valid))
    if nulls == 0:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def _strings(parts: tuple[np.ndarray, np.ndarray], field: str, *, binary: bool = False,
             valid: np.ndarray | None = None, empty_is_null: bool = False) -> pa.Array:
    off, data = parts
    n = off.size - 1
    if empty_is_null:
        valid = np.diff(off) > 0
    bitmap, nulls = _bitmap(valid) if valid is not None else (None, 0)
    arr = pa.Array.from_buffers(pa.binary() if binary else pa.string(), n,
                                [bitmap, pa.py_buffer(off), pa.py_buffer(data)],
                                null_count=nulls)
    if not binary:
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid:
            raise OtlpDecodeError(
                f"malformed ExportTraceServiceRequest: {field} is not valid UTF-8") from None
    return arr


def _ids(buf: np.ndarray, width: int, n: int, valid: np.ndarray | None = None) -> pa.Array:
    bitmap, nulls = _bitmap(valid) if valid is not None else (None, 0)
    return pa.Array.from_buffers(pa.binary(width), n, [bitmap, pa.py_buffer(buf)],
                                 null_count=nulls)


_EMPTY_ATTRS = pa.array([], ATTRIBUTE_STRUCT)
_EMPTY_EVENTS = pa.array([], _EVENTS_TYPE.value_type)
_EMPTY_LINKS = pa.array([], _LINKS_TYPE.value_type)


def _attr_struct(a: dict, where: str) -> pa.StructArray:
    t = a["type"]
    if t.size == 0:
        return _EMPTY_ATTRS
    return pa.StructArray.from_arrays(
        [
            _strings(a["key"], f"{where} key").dictionary_encode(),
            pa.array(t, pa.int8()),
            _strings(a["str"], f"{where} string value", valid=t == 1).dictionary_encode(),
            pa.array(a["int"], pa.int64(), mask=t != 3),
            pa.array(a["double"], pa.float64(), mask=t != 4),
            pa.array(a["bool"].astype(bool), pa.bool_(), mask=t != 2),
            _strings(a["bytes"], where, binary=True, valid=t == 7),
            _strings(a["any"], where, binary=True, valid=(t == 5) | (t == 6)),
        ],
        fields=list(ATTRIBUTE_STRUCT),
    )


def _attr_list(offsets: np.ndarray, a: dict, where: str) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _attr_struct(a, where),
                                    type=ATTRIBUTES_TYPE)


def _spread(group_off: np.ndarray, ix: np.ndarray, values: pa.Array,
            list_type: pa.DataType) -> pa.ListArray:
    """Per-row list column from per-group ranges ``group_off`` and each row's group ``ix``."""
    lengths = np.diff(group_off)[ix]
    offsets = np.zeros(ix.size + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    starts = group_off[:-1][ix]
    take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values.take(take),
                                    type=list_type)


def _per_row(values: pa.StringArray, ix: np.ndarray) -> pa.DictionaryArray:
    """A per-resource (or per-scope) string spread over the span rows as a dictionary column.

    The dictionary is made unique on the few group values, then indexed per row.
    """
    enc = values.dictionary_encode()
    codes = pc.fill_null(enc.indices, -1).to_numpy()[ix]
    mask = codes < 0
    indices = pa.array(codes, pa.int32(), mask=mask if mask.any() else None)
    return pa.DictionaryArray.from_arrays(indices, enc.dictionary)


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
    buf = np.frombuffer(data, dtype=np.uint8) if len(data) else _EMPTY_U8
    try:
        c = _codec.decode_traces(buf, max_depth)
    except _codec.DecodeError as exc:
        raise OtlpDecodeError(str(exc), exc.offset) from None
    n = c["n_spans"]
    if n == 0:
        return SpanBatch.empty()
    rix, six = c["resource_ix"], c["scope_ix"]

    events = _EMPTY_EVENTS if c["ev_time"].size == 0 else pa.StructArray.from_arrays(
        [pa.array(c["ev_time"], pa.int64()), _strings(c["ev_name"], "Span.Event.name"),
         _attr_list(c["ev_attr_off"], c["ev_attrs"], "Span.Event.attributes"),
         pa.array(c["ev_dropped"], pa.uint32())],
        fields=list(_EVENTS_TYPE.value_type))
    nl = c["ln_flags"].size
    links = _EMPTY_LINKS if nl == 0 else pa.StructArray.from_arrays(
        [_ids(c["ln_trace_id"], 16, nl), _ids(c["ln_span_id"], 8, nl),
         _strings(c["ln_trace_state"], "Span.Link.trace_state", empty_is_null=True),
         pa.array(c["ln_flags"], pa.uint32()),
         _attr_list(c["ln_attr_off"], c["ln_attrs"], "Span.Link.attributes"),
         pa.array(c["ln_dropped"], pa.uint32())],
        fields=list(_LINKS_TYPE.value_type))

    res_attrs = _attr_struct(c["res_attrs"], "Resource.attributes")
    sc_attrs = _attr_struct(c["sc_attrs"], "InstrumentationScope.attributes")
    services = pc.fill_null(
        _strings(c["res_service"], "service.name", empty_is_null=True), default_service)
    res_url = _strings(c["res_schema_url"], "ResourceSpans.schema_url", empty_is_null=True)
    sc_name = _strings(c["sc_name"], "InstrumentationScope.name", empty_is_null=True)
    sc_version = _strings(c["sc_version"], "InstrumentationScope.version", empty_is_null=True)
    sc_url = _strings(c["sc_schema_url"], "ScopeSpans.schema_url", empty_is_null=True)
    rix_a, six_a = pa.array(rix), pa.array(six)

    columns = [
        _ids(c["trace_id"], 16, n),
        _ids(c["span_id"], 8, n),
        _ids(c["parent_span_id"], 8, n, c["parent_valid"]),
        _strings(c["trace_state"], "Span.trace_state", empty_is_null=True).dictionary_encode(),
        pa.array(c["flags"], pa.uint32()),
        _strings(c["name"], "Span.name").dictionary_encode(),
        pa.array(c["kind"], pa.int8()),
        pa.array(c["start_time_ns"], pa.int64()),
        pa.array(c["end_time_ns"], pa.int64()),
        pa.array(c["status_code"], pa.int8()),
        _strings(c["status_message"], "Status.message", empty_is_null=True),
        _per_row(services, rix),
        _attr_list(c["attr_off"], c["attrs"], "Span.attributes"),
        pa.array(c["dropped_attributes_count"], pa.uint32()),
        pa.ListArray.from_arrays(pa.array(c["event_off"], pa.int32()), events,
                                 type=_EVENTS_TYPE),
        pa.array(c["dropped_events_count"], pa.uint32()),
        pa.ListArray.from_arrays(pa.array(c["link_off"], pa.int32()), links,
                                 type=_LINKS_TYPE),
        pa.array(c["dropped_links_count"], pa.uint32()),
        _spread(c["res_attr_off"], rix, res_attrs, ATTRIBUTES_TYPE),
        pa.array(c["res_dropped"], pa.uint32()).take(rix_a),
        _per_row(res_url, rix),
        _per_row(sc_name, six),
        _per_row(sc_version, six),
        _spread(c["sc_attr_off"], six, sc_attrs, ATTRIBUTES_TYPE),
        pa.array(c["sc_dropped"], pa.uint32()).take(six_a),
        _per_row(sc_url, six),
    ]
    return SpanBatch._wrap(pa.RecordBatch.from_arrays(columns, schema=SPAN_SCHEMA))


# -- encode -------------------------------------------------------------------------


def _str_parts(arr: pa.Array) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(indices or None, int32 offsets, uint8 data) of a string/binary/dictionary array."""
    if isinstance(arr, pa.DictionaryArray):
        idx = pc.fill_null(arr.indices.cast(pa.int32()), -1).to_numpy().astype(np.int32)
        _, off, data = _str_parts(arr.dictionary)
        return idx, off, data
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else _EMPTY_U8
    idx = None
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        idx = np.where(valid, np.arange(len(arr), dtype=np.int32), -1).astype(np.int32)
    return idx, np.ascontiguousarray(off), data


def _fixed(arr: pa.Array, width: int) -> np.ndarray:
    buf = arr.buffers()[1]
    if buf is None:
        return _EMPTY_U8
    raw = np.frombuffer(buf, np.uint8)
    return np.ascontiguousarray(raw[arr.offset * width:(arr.offset + len(arr)) * width])


def _num(arr: pa.Array, dtype: Any) -> np.ndarray:
    """The values buffer of a fixed-width column (values under nulls are never read)."""
    n = len(arr)
    if arr.null_count == 0 or n == 0:
        return np.ascontiguousarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)
    buf = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")
        return np.ascontiguousarray(bits[arr.offset:arr.offset + n], dtype=dtype)
    width = np.dtype(dtype).itemsize
    return np.frombuffer(buf, dtype, count=n, offset=arr.offset * width)


def _used_values(lists: pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, the child rows they cover): a slice never drags its parent's rows."""
    off = lists.offsets.to_numpy()
    start = int(off[0]) if off.size else 0
    stop = int(off[-1]) if off.size else 0
    return np.ascontiguousarray(off - start, np.int32), lists.values.slice(start, stop - start)


_NO_STR = (None, np.zeros(1, np.int32), _EMPTY_U8)
_EMPTY_ATTR_PARTS = {
    "key": _NO_STR, "type": np.zeros(0, np.int8), "str": _NO_STR,
    "int": np.zeros(0, np.int64), "double": np.zeros(0, np.float64),
    "bool": np.zeros(0, np.uint8), "bytes": _NO_STR, "any": _NO_STR,
}


def _attr_parts(lists: pa.ListArray) -> dict:
    list_off, vals = _used_values(lists)
    if len(vals) == 0:
        return {"list_off": list_off, **_EMPTY_ATTR_PARTS}
    return {
        "list_off": list_off,
        "key": _str_parts(vals.field("key")),
        "type": _num(vals.field("type"), np.int8),
        "str": _str_parts(vals.field("str")),
        "int": _num(vals.field("int"), np.int64),
        "double": _num(vals.field("double"), np.float64),
        "bool": _num(vals.field("bool"), np.uint8),
        "bytes": _str_parts(vals.field("bytes")),
        "any": _str_parts(vals.field("any")),
    }


def _with_service_name(rb: pa.RecordBatch) -> pa.ListArray:
    """``resource_attributes``, plus ``service.name`` where a row's resource lacks it.

    Spans recorded with a ``service`` but no resource would otherwise reach
    the backend without their service; the default ``unknown_service`` is not
    added, so resources decoded without one encode back unchanged.
    """
    ra = rb.column("resource_attributes")
    if rb.num_rows == 0:
        return ra
    have = SpanBatch._wrap(rb).attribute("service.name", source="resource_attributes",
                                         type=AttrType.STRING)
    service = rb.column("service")
    add = np.asarray(pc.and_(pc.is_null(have),
                             pc.not_equal(service.cast(pa.string()), "unknown_service")))
    k = int(np.count_nonzero(add))
    if k == 0:
        return ra
    old_off = ra.offsets.to_numpy().astype(np.int64)
    old_len = np.diff(old_off)
    new_off = np.zeros(rb.num_rows + 1, np.int64)
    np.cumsum(old_len + add, out=new_off[1:])
    values = ra.values
    idx = np.empty(new_off[-1], np.int64)
    idx[np.repeat(new_off[:-1] - old_off[:-1], old_len)
        + np.arange(old_off[0], old_off[-1])] = np.arange(old_off[0], old_off[-1])
    idx[new_off[1:][add] - 1] = len(values) + np.arange(k)
    names = service.filter(pa.array(add)).cast(pa.string())
    extra = pa.StructArray.from_arrays(
        [pa.array(["service.name"] * k).dictionary_encode(), pa.array(np.ones(k, np.int8)),
         names.dictionary_encode(), pa.nulls(k, pa.int64()), pa.nulls(k, pa.float64()),
         pa.nulls(k, pa.bool_()), pa.nulls(k, pa.binary()), pa.nulls(k, pa.binary())],
        fields=list(ATTRIBUTE_STRUCT))
    merged = pa.concat_arrays([values, extra]).take(pa.array(idx))
    return pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), merged,
                                    type=ATTRIBUTES_TYPE)


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
        within it the same for the instrumentation scope.

    Examples
    --------
    >>> encode_traces(SpanBatch.empty())
    b''
    """
    rb = batch.record_batch if isinstance(batch, SpanBatch) else batch
    if not rb.schema.equals(SPAN_SCHEMA):
        rb = SpanBatch(rb).record_batch
    resource_attributes = _with_service_name(rb)
    col = rb.column
    n = rb.num_rows
    event_off, ev = _used_values(col("events"))
    link_off, ln = _used_values(col("links"))
    parent = col("parent_span_id")
    cols = {
        "n": n,
        "trace_id": _fixed(col("trace_id"), 16),
        "span_id": _fixed(col("span_id"), 8),
        "parent_span_id": _fixed(parent, 8) if n else _EMPTY_U8,
        "parent_valid": parent.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8),
        "trace_state": _str_parts(col("trace_state")),
        "flags": _num(col("flags"), np.uint32),
        "name": _str_parts(col("name")),
        "kind": _num(col("kind"), np.int8),
        "start_time_ns": _num(col("start_time_ns"), np.int64),
        "end_time_ns": _num(col("end_time_ns"), np.int64),
        "status_code": _num(col("status_code"), np.int8),
        "status_message": _str_parts(col("status_message")),
        "attributes": _attr_parts(col("attributes")),
        "dropped_attributes_count": _num(col("dropped_attributes_count"), np.uint32),
        "event_off": event_off,
        "dropped_events_count": _num(col("dropped_events_count"), np.uint32),
        "link_off": link_off,
        "dropped_links_count": _num(col("dropped_links_count"), np.uint32),
        "ev_time": _num(ev.field("time_unix_nano"), np.int64),
        "ev_name": _str_parts(ev.field("name")),
        "ev_attrs": _attr_parts(ev.field("attributes")),
        "ev_dropped": _num(ev.field("dropped_attributes_count"), np.uint32),
        "ln_trace_id": _fixed(ln.field("trace_id"), 16),
        "ln_span_id": _fixed(ln.field("span_id"), 8),
        "ln_trace_state": _str_parts(ln.field("trace_state")),
        "ln_flags": _num(ln.field("flags"), np.uint32),
        "ln_attrs": _attr_parts(ln.field("attributes")),
        "ln_dropped": _num(ln.field("dropped_attributes_count"), np.uint32),
        "resource_attributes": _attr_parts(resource_attributes),
        "resource_dropped_attributes_count": _num(col("resource_dropped_attributes_count"),
                                                  np.uint32),
        "resource_schema_url": _str_parts(col("resource_schema_url")),
        "scope_name": _str_parts(col("scope_name")),
        "scope_version": _str_parts(col("scope_version")),
        "scope_attributes": _attr_parts(col("scope_attributes")),
        "scope_dropped_attributes_count": _num(col("scope_dropped_attributes_count"),
                                               np.uint32),
        "scope_schema_url": _str_parts(col("scope_schema_url")),
    }
    return _codec.encode_traces(cols)


# Metrics go through opentelemetry-proto's classes (knhk.otlp.metrics); imported
# last because that module needs OtlpDecodeError from here.
from knhk.otlp.metrics import decode_metrics, encode_metrics  # noqa: E402

__all__ += ["decode_metrics", "encode_metrics"]
