"""Batches: the one interface between every stage of knhk.

A :class:`SpanBatch` is an immutable Arrow RecordBatch in :data:`SPAN_SCHEMA`
with analysis helpers; :class:`MetricBatch` is the same for metric points.
:func:`coerce_spans` turns what users hand to ``record_batch`` (an Arrow
RecordBatch or Table, or a dict of NumPy / Arrow columns) into that schema,
with a :class:`~knhk.errors.SchemaError` naming the column when it cannot.

Example
-------
>>> import numpy as np, knhk
>>> batch = knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=1, start_time_ns=0, duration_ns=2_000,
...               attributes={"http.response.status_code": 200}),
...     knhk.Span("SELECT", trace_id=1, span_id=2, parent_span_id=1, start_time_ns=500,
...               duration_ns=1_000),
... ])
>>> batch.attribute("http.response.status_code").to_pylist()
[200, None]
>>> batch.duration_ns().tolist()
[2000, 1000]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk import _attributes
from knhk._build import load_core
from knhk.errors import SchemaError
from knhk.schema import (
    ATTRIBUTES_TYPE,
    METRIC_SCHEMA,
    SPAN_SCHEMA,
    AttrType,
    Span,
    SpanEvent,
    SpanLink,
)

__all__ = ["MetricBatch", "SpanBatch", "coerce_spans", "trace_id_low64"]

_RING = load_core("_ringbuffer")
_SPAN_FIELDS = {f.name: f for f in SPAN_SCHEMA}
_REQUIRED = ("trace_id", "span_id", "name", "start_time_ns")
_ID_COLUMNS = {"trace_id": 16, "span_id": 8, "parent_span_id": 8}
_DEFAULTS: dict[str, Any] = {"kind": 1, "status_code": 0, "flags": 0}


class _ArrowBatch:
    """What every knhk batch is: one immutable Arrow RecordBatch, and its Arrow face."""

    __slots__ = ("_rb",)
    _rb: pa.RecordBatch

    @property
    def record_batch(self) -> pa.RecordBatch:
        return self._rb

    @property
    def schema(self) -> pa.Schema:
        return self._rb.schema

    @property
    def num_rows(self) -> int:
        return self._rb.num_rows

    def __len__(self) -> int:
        return self._rb.num_rows

    @property
    def nbytes(self) -> int:
        return self._rb.nbytes

    def column(self, name: str) -> pa.Array:
        return self._rb.column(name)

    def __arrow_c_array__(self, requested_schema: Any = None) -> Any:
        return self._rb.__arrow_c_array__(requested_schema)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return pa.Table.from_batches([self._rb]).__arrow_c_stream__(requested_schema)

    def to_pandas(self, **kwargs: Any) -> Any:
        return self._rb.to_pandas(**kwargs)

    def to_pylist(self) -> list[dict]:
        return self._rb.to_pylist()


class SpanBatch(_ArrowBatch):
    """An immutable batch of spans (an Arrow RecordBatch in ``SPAN_SCHEMA``).

    Arrow consumers take it directly (``pa.table(batch)``, Polars, DuckDB)
    through the Arrow PyCapsule interface; ``batch.record_batch`` is the
    underlying ``pyarrow.RecordBatch``.
    """

    __slots__ = ()

    def __init__(self, data: Any, *, default_service: str = "unknown_service") -> None:
        if isinstance(data, SpanBatch):
            self._rb = data._rb
        else:
            rb, invalid = coerce_spans(data, default_service=default_service)
            if invalid.any():
                rows = np.flatnonzero(invalid)[:5].tolist()
                raise SchemaError(
                    f"{int(invalid.sum())} invalid span row(s) (null or all-zero ids, "
                    f"null times, or end before start), first at rows {rows}")
            self._rb = rb

    # -- construction ----------------------------------------------------------

    @classmethod
    def _wrap(cls, rb: pa.RecordBatch) -> SpanBatch:
        obj = cls.__new__(cls)
        obj._rb = rb
        return obj

    @classmethod
    def from_spans(cls, spans: Iterable[Span], *,
                   default_service: str = "unknown_service") -> SpanBatch:
        """Build one batch from ``Span`` objects (through the same kernel as ``record_span``)."""
        spans = list(spans)
        if not spans:
            return cls.empty()
        ring = _RING.SpanRing(len(spans), len(spans), default_service=default_service)
        ring.append_many(spans)
        ring.seal()
        return cls._wrap(ring.pop()[0])

    @classmethod
    def empty(cls) -> SpanBatch:
        return cls._wrap(pa.RecordBatch.from_pylist([], schema=SPAN_SCHEMA))

    @classmethod
    def concat(cls, batches: Sequence[SpanBatch | pa.RecordBatch]) -> SpanBatch:
        """One batch holding the rows of ``batches`` in order."""
        rbs = [b._rb if isinstance(b, SpanBatch) else b for b in batches]
        if not rbs:
            return cls.empty()
        table = pa.Table.from_batches(rbs, schema=SPAN_SCHEMA).combine_chunks()
        return cls._wrap(table.to_batches()[0] if table.num_rows else cls.empty()._rb)

    # -- Arrow -----------------------------------------------------------------

    def slice(self, offset: int = 0, length: int | None = None) -> SpanBatch:
        return SpanBatch._wrap(self._rb.slice(offset, length))

    def filter(self, mask: Any) -> SpanBatch:
        """Rows where ``mask`` (bool NumPy or Arrow array) is true."""
        if isinstance(mask, np.ndarray):
            mask = pa.array(mask, type=pa.bool_())
        return SpanBatch._wrap(self._rb.filter(mask))

    def take(self, indices: Any) -> SpanBatch:
        return SpanBatch._wrap(self._rb.take(indices))

    def equals(self, other: SpanBatch) -> bool:
        return self._rb.equals(other._rb)

    # -- analysis --------------------------------------------------------------

    def duration_ns(self) -> np.ndarray:
        """``end_time_ns - start_time_ns`` as an int64 NumPy array."""
        start = self._rb.column("start_time_ns").to_numpy()
        end = self._rb.column("end_time_ns").to_numpy()
        return end - start

    def attribute(self, key: str, *, source: str = "attributes",
                  type: AttrType | None = None) -> pa.Array:
        """The value of attribute ``key`` on every row, as a typed Arrow array.

        Rows without the key are null. Strings come back dictionary-encoded,
        ints as int64, doubles as float64, bools as bool, bytes as binary,
        arrays and kvlists as Python-derived Arrow values. A key seen with
        both int and double values is returned as float64; any other mix
        raises ``SchemaError`` unless ``type`` picks one (other rows null).

        Parameters
        ----------
        source : {"attributes", "resource_attributes", "scope_attributes"}
        """
        if source not in ("attributes", "resource_attributes", "scope_attributes"):
            raise ValueError(
                "source must be 'attributes', 'resource_attributes' or 'scope_attributes', "
                f"got {source!r}")
        n = self._rb.num_rows
        lists = self._rb.column(source)
        offsets = lists.offsets.to_numpy()
        values = lists.values
        base = offsets[0]
        keys = values.field("key")
        if not isinstance(keys, pa.DictionaryArray):
            keys = keys.dictionary_encode()
        pos_in_dict = keys.dictionary.index(key).as_py()
        if pos_in_dict < 0:
            return pa.nulls(n)
        key_idx = keys.indices.to_numpy(zero_copy_only=False)
        end = offsets[-1]
        match = np.flatnonzero(key_idx[base:end] == pos_in_dict) + base
        if match.size == 0:
            return pa.nulls(n)
        rows = np.searchsorted(offsets, match, side="right") - 1
        tags = values.field("type").to_numpy()[match]
        present = np.unique(tags)
        if type is not None:
            chosen = int(type)
            keep = tags == chosen
            match, rows, tags = match[keep], rows[keep], tags[keep]
        elif present.size == 1:
            chosen = int(present[0])
        elif set(present.tolist()) == {int(AttrType.INT), int(AttrType.DOUBLE)}:
            chosen = -1
        else:
            names = ", ".join(AttrType(int(t)).name for t in present)
            raise SchemaError(
                f"attribute {key!r} has values of several types ({names}); "
                "pass type=AttrType.<one> to pick one")
        gather = np.full(n, -1, dtype=np.int64)
        gather[rows] = match
        indices = pa.array(gather, mask=gather < 0)
        if chosen == -1:
            ints = values.field("int").cast(pa.float64())
            merged = pc.if_else(pc.equal(values.field("type"), int(AttrType.INT)),
                                ints, values.field("double"))
            return merged.take(indices)
        child = _TAG_CHILD.get(chosen)
        if child is None:
            return pa.nulls(n)
        if child == "any":
            decoded = _decode_any_column(values.field("any").take(indices))
            try:
                return pa.array(decoded)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise SchemaError(
                    f"attribute {key!r} holds arrays or kvlists of mixed types that no Arrow "
                    "type can hold; attribute_values() returns them as Python objects"
                ) from None
        return values.field(child).take(indices)

    def attribute_values(self, key: str, *, source: str = "attributes") -> list[Any]:
        """The value of attribute ``key`` on every row as Python objects (None if absent)."""
        out: list[Any] = []
        for row in self._rb.column(source).to_pylist():
            out.append(next((_attributes.attribute_value(a) for a in reversed(row)
                             if a["key"] == key), None))
        return out

    def to_spans(self) -> list[Span]:
        """The rows as ``Span`` objects (the slow, convenient path)."""
        out = []
        for row in self._rb.to_pylist():
            out.append(Span(
                name=row["name"], trace_id=row["trace_id"], span_id=row["span_id"],
                parent_span_id=row["parent_span_id"],
                attributes=_attributes.attributes_dict(row["attributes"]) or None,
                start_time_ns=row["start_time_ns"], end_time_ns=row["end_time_ns"],
                kind=row["kind"], status=row["status_code"],
                status_message=row["status_message"], service=row["service"],
                events=[SpanEvent(e["name"], e["time_unix_nano"],
                                  _attributes.attributes_dict(e["attributes"]),
                                  e["dropped_attributes_count"])
                        for e in row["events"]] or None,
                links=[SpanLink(ln["trace_id"], ln["span_id"], ln["trace_state"], ln["flags"],
                                _attributes.attributes_dict(ln["attributes"]),
                                ln["dropped_attributes_count"])
                       for ln in row["links"]] or None,
                trace_state=row["trace_state"], flags=row["flags"],
                resource_attributes=_attributes.attributes_dict(row["resource_attributes"])
                or None,
                scope_name=row["scope_name"], scope_version=row["scope_version"],
            ))
        return out

    def __repr__(self) -> str:
        return f"SpanBatch({self.num_rows} spans)"

    def _repr_html_(self) -> str:
        head = self._rb.slice(0, 10).select(
            ["name", "service", "kind", "start_time_ns", "end_time_ns", "status_code"])
        return (f"<p><b>SpanBatch</b>: {self.num_rows} spans</p>"
                + head.to_pandas()._repr_html_())


def _decode_any_column(raw: pa.Array) -> list[Any]:
    return [None if b is None else _attributes.decode_any(b) for b in raw.to_pylist()]


_TAG_CHILD = {
    int(AttrType.STRING): "str", int(AttrType.INT): "int", int(AttrType.DOUBLE): "double",
    int(AttrType.BOOL): "bool", int(AttrType.BYTES): "bytes", int(AttrType.ARRAY): "any",
    int(AttrType.KVLIST): "any",
}


class MetricBatch(_ArrowBatch):
    """An immutable batch of metric points (an Arrow RecordBatch in ``METRIC_SCHEMA``)."""

    __slots__ = ()

    def __init__(self, data: pa.RecordBatch) -> None:
        if not isinstance(data, pa.RecordBatch) or not data.schema.equals(METRIC_SCHEMA):
            raise SchemaError("MetricBatch takes a RecordBatch in knhk.METRIC_SCHEMA")
        self._rb = data

    def __repr__(self) -> str:
        return f"MetricBatch({self.num_rows} points)"


# -- coercion of user input --------------------------------------------------------


def trace_id_low64(trace_ids: pa.FixedSizeBinaryArray) -> np.ndarray:
    """Low 64 bits of each trace id, big-endian, as OpenTelemetry's ratio sampler reads them."""
    n = len(trace_ids)
    raw = np.frombuffer(trace_ids.buffers()[1], dtype=np.uint8,
                        count=(trace_ids.offset + n) * 16)[trace_ids.offset * 16:]
    return raw.reshape(n, 16)[:, 8:].copy().view(">u8").ravel().astype(np.uint64)


def _columns_of(data: Any) -> tuple[dict[str, Any], int]:
    if isinstance(data, SpanBatch):
        data = data.record_batch
    if isinstance(data, pa.RecordBatch):
        return {name: data.column(i) for i, name in enumerate(data.schema.names)}, data.num_rows
    if isinstance(data, pa.Table):
        cols = {name: data.column(i).combine_chunks()
                for i, name in enumerate(data.schema.names)}
        return cols, data.num_rows
    if isinstance(data, Mapping):
        cols = dict(data)
        lengths = {name: len(col) for name, col in cols.items()}
        if len(set(lengths.values())) > 1:
            raise SchemaError(f"columns differ in length: {lengths}")
        return cols, next(iter(lengths.values()), 0)
    if hasattr(data, "__arrow_c_stream__") or hasattr(data, "__arrow_c_array__"):
        return _columns_of(pa.table(data))
    raise SchemaError(
        "record_batch takes a pyarrow RecordBatch or Table, a SpanBatch, or a dict of "
        f"NumPy / Arrow columns; got {type(data).__name__}")


def _id_column(name: str, col: Any, width: int) -> pa.Array:
    target = pa.binary(width)
    if isinstance(col, np.ndarray):
        if col.dtype == np.uint8 and col.ndim == 2 and col.shape[1] == width:
            buf = pa.py_buffer(np.ascontiguousarray(col).copy())
            return pa.Array.from_buffers(target, col.shape[0], [None, buf])
        if col.dtype.kind == "S" and col.dtype.itemsize == width:
            buf = pa.py_buffer(np.ascontiguousarray(col).copy())
            return pa.Array.from_buffers(target, col.shape[0], [None, buf])
        if col.dtype == object:
            col = pa.array(col.tolist())
        else:
            raise SchemaError(
                f"column {name!r}: expected {width}-byte ids as an (n, {width}) uint8 array, "
                f"an 'S{width}' array or Arrow fixed_size_binary({width}); got NumPy {col.dtype}"
                f" with shape {col.shape}")
    if not isinstance(col, pa.Array | pa.ChunkedArray):
        col = pa.array(col)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.type == target:
        return col
    if pa.types.is_null(col.type):  # e.g. a parent_span_id column of roots only
        return pa.nulls(len(col), type=target)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) or \
            pa.types.is_fixed_size_binary(col.type):
        lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((lengths != width) & ~np.isnan(lengths.astype(float)))
        if bad.size:
            raise ValueError(f"column {name!r}: ids must be {width} bytes; row {int(bad[0])} "
                             f"has {int(lengths[bad[0]])}")
        return col.cast(target)
    raise SchemaError(f"column {name!r}: expected fixed_size_binary({width}) ids, got {col.type}")


def _typed_column(name: str, col: Any, target: pa.DataType) -> pa.Array:
    if isinstance(col, np.ndarray):
        if col.dtype.kind == "M" and pa.types.is_integer(target):
            col = col.astype("datetime64[ns]").view(np.int64)
        if pa.types.is_integer(target) and col.dtype.kind not in "iub":
            raise SchemaError(f"column {name!r}: expected integers ({target}), "
                              f"got NumPy {col.dtype}")
        col = pa.array(col.copy() if col.dtype.kind in "iufb" else col)
    elif not isinstance(col, pa.Array | pa.ChunkedArray):
        try:
            col = pa.array(col)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise SchemaError(f"column {name!r}: cannot convert to {target}: {exc}") from None
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.type == target:
        return col
    if pa.types.is_dictionary(target):
        if pa.types.is_dictionary(col.type):
            if pa.types.is_string(col.type.value_type) or \
                    pa.types.is_large_string(col.type.value_type):
                return col.cast(target)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or \
                pa.types.is_null(col.type):
            return col.cast(pa.string()).dictionary_encode().cast(target)
        raise SchemaError(f"column {name!r}: expected strings, got {col.type}")
    if pa.types.is_timestamp(col.type) and pa.types.is_integer(target):
        col = col.cast(pa.timestamp("ns", col.type.tz)).cast(pa.int64())
        return col
    compatible = (
        (pa.types.is_integer(target) and (pa.types.is_integer(col.type)
                                          or pa.types.is_null(col.type)))
        or (pa.types.is_string(target) and (pa.types.is_string(col.type)
                                            or pa.types.is_large_string(col.type)
                                            or pa.types.is_dictionary(col.type)
                                            or pa.types.is_null(col.type)))
        or col.type.equals(target)
        or (pa.types.is_list(target) and pa.types.is_null(col.type))
    )
    if not compatible:
        raise SchemaError(f"column {name!r}: expected {target}, got {col.type}")
    try:
        return col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaError(f"column {name!r}: cannot convert {col.type} to {target}: {exc}") \
            from None


def _zeros(nbytes: int) -> pa.Buffer:
    """The ring buffer's shared read-only zero buffer (calloc'd, so cheap)."""
    return _RING.zeros(nbytes)


def _default_column(name: str, n: int, default_service: str) -> pa.Array:
    """The column a span has when the input lacks it: zeros and nulls over shared memory."""
    field = _SPAN_FIELDS[name]
    t = field.type
    validity = _zeros((n + 7) // 8)
    if name == "service":
        return pa.DictionaryArray.from_buffers(t, n, [None, _zeros(4 * n)],
                                               pa.array([default_service]), 0)
    if name == "kind":
        return pa.array(np.full(n, _DEFAULTS["kind"], dtype=np.int8))
    if pa.types.is_integer(t):
        return pa.Array.from_buffers(t, n, [None, _zeros(n * t.bit_width // 8)])
    if pa.types.is_list(t):
        return pa.Array.from_buffers(t, n, [None, _zeros(4 * (n + 1))],
                                     children=[pa.array([], type=t.value_type)])
    if pa.types.is_dictionary(t):
        return pa.DictionaryArray.from_buffers(t, n, [validity, _zeros(4 * n)],
                                               pa.array([], type=pa.string()), n)
    if pa.types.is_string(t):
        return pa.Array.from_buffers(t, n, [validity, _zeros(4 * (n + 1)), _zeros(1)],
                                     null_count=n)
    if pa.types.is_fixed_size_binary(t):
        return pa.Array.from_buffers(t, n, [validity, _zeros(n * t.byte_width)], null_count=n)
    return pa.nulls(n, type=t)


def coerce_spans(data: Any, *, default_service: str = "unknown_service"
                 ) -> tuple[pa.RecordBatch, np.ndarray]:
    """Convert ``record_batch`` input to a RecordBatch in ``SPAN_SCHEMA``.

    Returns the batch with *every* input row and a bool mask of the rows that
    are invalid as spans (null or all-zero ids, null times, end before start);
    the caller drops and counts those. Raises ``SchemaError`` naming the column
    for a missing or mistyped column. NumPy input is copied, so later changes
    to the caller's arrays cannot reach a sealed batch.
    """
    if isinstance(data, pa.RecordBatch) and data.schema.equals(SPAN_SCHEMA):
        _check_enums(data.column("kind"), data.column("status_code"))
        return data, _invalid_rows(data)
    cols, n = _columns_of(data)
    duration = cols.pop("duration_ns", None)
    unknown = sorted(set(cols) - set(_SPAN_FIELDS))
    if unknown:
        raise SchemaError(
            f"unknown column(s) {', '.join(map(repr, unknown))}; span columns are "
            f"{', '.join(SPAN_SCHEMA.names)} (and duration_ns)")
    missing = [c for c in _REQUIRED if c not in cols]
    if "end_time_ns" not in cols and duration is None:
        missing.append("end_time_ns (or duration_ns)")
    if missing:
        raise SchemaError(f"missing required column(s): {', '.join(missing)}")
    arrays = []
    for field in SPAN_SCHEMA:
        name = field.name
        if name == "end_time_ns" and name not in cols:
            start = arrays[SPAN_SCHEMA.get_field_index("start_time_ns")]
            dur = _typed_column("duration_ns", duration, pa.int64())
            arrays.append(pc.add(start, dur))
            continue
        if name not in cols:
            arrays.append(_default_column(name, n, default_service))
        elif name in _ID_COLUMNS:
            arrays.append(_id_column(name, cols[name], _ID_COLUMNS[name]))
        elif name in ("attributes", "resource_attributes", "scope_attributes"):
            arrays.append(_attributes_column(name, cols[name]))
        else:
            arrays.append(_typed_column(name, cols[name], field.type))
    svc_i = SPAN_SCHEMA.get_field_index("service")
    if arrays[svc_i].null_count:
        arrays[svc_i] = _typed_column(
            "service", pc.fill_null(arrays[svc_i].dictionary_decode(), default_service),
            _SPAN_FIELDS["service"].type)
    # Nulls in non-nullable columns make rows invalid; fill them so the batch is valid.
    invalid = np.zeros(n, dtype=bool)
    for i, field in enumerate(SPAN_SCHEMA):
        arr = arrays[i]
        if not field.nullable and arr.null_count:
            invalid |= ~np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))
            arrays[i] = _fill(arr, field.type)
    _check_enums(arrays[SPAN_SCHEMA.get_field_index("kind")],
                 arrays[SPAN_SCHEMA.get_field_index("status_code")])
    rb = pa.RecordBatch.from_arrays(arrays, schema=SPAN_SCHEMA)
    return rb, invalid | _invalid_rows(rb)


def _check_enums(kind: pa.Array, status: pa.Array) -> None:
    for name, col, hi in (("kind", kind, 5), ("status_code", status, 2)):
        v = col.to_numpy(zero_copy_only=False)
        if v.size and (v.min() < 0 or v.max() > hi):
            bad = int(np.flatnonzero((v < 0) | (v > hi))[0])
            raise SchemaError(f"column {name!r}: values must be in 0..{hi}; row {bad} "
                              f"has {int(v[bad])}")


def _fill(arr: pa.Array, t: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_binary(t):
        return pc.fill_null(arr, pa.scalar(b"\0" * t.byte_width, type=t))
    if pa.types.is_dictionary(t):
        return pc.fill_null(arr.dictionary_decode(), "").dictionary_encode().cast(t)
    if pa.types.is_list(t):
        return pc.fill_null(arr, pa.scalar([], type=t))
    return pc.fill_null(arr, pa.scalar(0, type=t))


def _invalid_rows(rb: pa.RecordBatch) -> np.ndarray:
    n = rb.num_rows
    bad = np.zeros(n, dtype=bool)
    for name, words in (("trace_id", 2), ("span_id", 1)):
        col = rb.column(name)
        raw = np.frombuffer(col.buffers()[1], np.uint64, count=(col.offset + n) * words)
        raw = raw[col.offset * words:].reshape(n, words)
        nonzero = raw[:, 0] != 0
        if words == 2:
            nonzero |= raw[:, 1] != 0
        bad |= ~nonzero
    start = rb.column("start_time_ns").to_numpy()
    end = rb.column("end_time_ns").to_numpy()
    bad |= end < start
    return bad


def _attributes_column(name: str, col: Any) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if col.type == ATTRIBUTES_TYPE:
            return col
        if pa.types.is_list(col.type) and pa.types.is_struct(col.type.value_type):
            try:
                return col.cast(ATTRIBUTES_TYPE)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"column {name!r}: cannot convert {col.type} to the "
                                  f"knhk attribute list: {exc}") from None
        if pa.types.is_map(col.type) or pa.types.is_struct(col.type):
            col = col.to_pylist()
        else:
            raise SchemaError(f"column {name!r}: expected a list of attributes or dicts, "
                              f"got {col.type}")
    rows = []
    for i, item in enumerate(col):
        if item is None:
            rows.append([])
        elif isinstance(item, dict):
            rows.append(_attributes.attribute_rows(item, f"{name}[{i}]"))
        elif isinstance(item, list):  # map_ items: [(key, value), ...]
            rows.append(_attributes.attribute_rows(dict(item), f"{name}[{i}]"))
        else:
            raise SchemaError(f"column {name!r}: row {i} is {type(item).__name__}, "
                              "expected a dict of attributes")
    return pa.array(rows, type=ATTRIBUTES_TYPE)
