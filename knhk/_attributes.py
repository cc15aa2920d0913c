"""Attribute values between Python and knhk's typed attribute struct.

The compiled ring buffer handles ``str``/``bool``/``int``/``float`` values
itself; everything else (``AttributeValue``, subclasses, NumPy scalars, bytes,
arrays, kvlists, ``None``) comes through :func:`encode_slow`. Arrays and kvlists
are stored as OTLP ``AnyValue`` protobuf bytes, written and read here by a small
codec of the five message fields involved (checked against opentelemetry-proto
in the tests).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

EMPTY, STRING, BOOL, INT, DOUBLE, ARRAY, KVLIST, BYTES = range(8)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _type_error(field: str, key: object, value: object) -> TypeError:
    return TypeError(
        f"{field}[{key!r}]: unsupported value type {type(value).__name__}; expected str, "
        "bool, int, float, bytes, a list or dict of those, None or knhk.AttributeValue"
    )


def encode_slow(value: Any, field: str, key: object) -> tuple[int, Any]:
    """Classify a value the fast path did not; return ``(type tag, payload)``."""
    from knhk.schema import AttributeValue

    if isinstance(value, AttributeValue):
        tag = int(value.type)
        value = value.value
        if tag in (ARRAY, KVLIST):
            return tag, encode_any(value, field, key)
        if tag == BYTES:
            return tag, bytes(value)
        if tag == DOUBLE:
            return tag, float(value)
        return tag, value
    if isinstance(value, bool | np.bool_):
        return BOOL, bool(value)
    if isinstance(value, str):
        return STRING, str(value)
    if isinstance(value, int | np.integer):
        iv = int(value)
        if not _INT64_MIN <= iv <= _INT64_MAX:
            raise ValueError(f"{field}[{key!r}] = {iv} does not fit in int64")
        return INT, iv
    if isinstance(value, float | np.floating):
        return DOUBLE, float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES, bytes(value)
    if isinstance(value, list | tuple | np.ndarray):
        return ARRAY, encode_any(list(value), field, key)
    if isinstance(value, dict):
        return KVLIST, encode_any(value, field, key)
    if value is None:
        return EMPTY, None
    raise _type_error(field, key, value)


# -- OTLP AnyValue protobuf -------------------------------------------------------
# AnyValue: 1 string, 2 bool, 3 int64, 4 double, 5 ArrayValue, 6 KeyValueList, 7 bytes
# ArrayValue: 1 repeated AnyValue; KeyValueList: 1 repeated KeyValue{1 key, 2 value}


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field_no: int, payload: bytes) -> bytes:
    return _varint(field_no << 3 | 2) + _varint(len(payload)) + payload


def encode_any(value: Any, field: str = "attributes", key: object = "") -> bytes:
    """Python value -> serialized OTLP ``AnyValue``."""
    from knhk.schema import AttributeValue

    if isinstance(value, AttributeValue):
        if value.type == DOUBLE:
            return b"\x21" + struct.pack("<d", float(value.value))
        value = value.value
    if value is None:
        return b""
    if isinstance(value, bool | np.bool_):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _ld(1, value.encode("utf-8"))
    if isinstance(value, int | np.integer):
        iv = int(value)
        if not _INT64_MIN <= iv <= _INT64_MAX:
            raise ValueError(f"{field}[{key!r}] contains {iv}, which does not fit in int64")
        return b"\x18" + _varint(iv)
    if isinstance(value, float | np.floating):
        return b"\x21" + struct.pack("<d", float(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return _ld(7, bytes(value))
    if isinstance(value, list | tuple | np.ndarray):
        return _ld(5, b"".join(_ld(1, encode_any(v, field, key)) for v in value))
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{field}[{key!r}]: kvlist keys must be str, got {k!r}")
            items.append(_ld(1, _ld(1, k.encode("utf-8")) + _ld(2, encode_any(v, field, key))))
        return _ld(6, b"".join(items))
    raise _type_error(field, key, value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in AnyValue")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes in AnyValue")


def _fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        no, wt = tag >> 3, tag & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt} in AnyValue")
        if pos > len(buf):
            raise ValueError("truncated AnyValue")
        yield no, wt, val


def decode_any(buf: bytes) -> Any:
    """Serialized OTLP ``AnyValue`` -> Python value (unknown fields skipped)."""
    out: Any = None
    for no, wt, val in _fields(buf):
        if no == 1 and wt == 2:
            out = val.decode("utf-8")
        elif no == 2 and wt == 0:
            out = bool(val)
        elif no == 3 and wt == 0:
            out = val - (1 << 64) if val >= 1 << 63 else val
        elif no == 4 and wt == 1:
            out = struct.unpack("<d", val)[0]
        elif no == 5 and wt == 2:
            out = [decode_any(v) for n, w, v in _fields(val) if n == 1 and w == 2]
        elif no == 6 and wt == 2:
            kv = {}
            for n, w, item in _fields(val):
                if n != 1 or w != 2:
                    continue
                k, v = "", None
                for n2, w2, x in _fields(item):
                    if n2 == 1 and w2 == 2:
                        k = x.decode("utf-8")
                    elif n2 == 2 and w2 == 2:
                        v = decode_any(x)
                kv[k] = v
            out = kv
        elif no == 7 and wt == 2:
            out = bytes(val)
    return out


# -- Python rows of the attribute struct -------------------------------------------


def attribute_rows(attrs: dict | None, field: str = "attributes") -> list[dict]:
    """A dict of attributes as rows of ``ATTRIBUTE_STRUCT`` (the plain reference path)."""
    if not attrs:
        return []
    rows = []
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise TypeError(f"{field} keys must be str, got {type(key).__name__} ({key!r})")
        tag, payload = encode_slow(value, field, key)
        row = {"key": key, "type": tag, "str": None, "int": None, "double": None,
               "bool": None, "bytes": None, "any": None}
        slot = {STRING: "str", INT: "int", DOUBLE: "double", BOOL: "bool", BYTES: "bytes",
                ARRAY: "any", KVLIST: "any"}.get(tag)
        if slot is not None:
            row[slot] = payload
        rows.append(row)
    return rows


def attribute_value(row: dict) -> Any:
    """One ``ATTRIBUTE_STRUCT`` row (as ``to_pylist`` gives it) -> Python value."""
    tag = row["type"]
    if tag == STRING:
        return row["str"]
    if tag == INT:
        return row["int"]
    if tag == DOUBLE:
        return row["double"]
    if tag == BOOL:
        return row["bool"]
    if tag == BYTES:
        return row["bytes"]
    if tag in (ARRAY, KVLIST):
        return decode_any(row["any"])
    return None


def attributes_dict(rows: list[dict] | None) -> dict:
    return {r["key"]: attribute_value(r) for r in rows or ()}


def event_rows(events) -> list[dict]:
    return [
        {"time_unix_nano": e.time_ns, "name": e.name,
         "attributes": attribute_rows(e.attributes, "event attributes"),
         "dropped_attributes_count": e.dropped_attributes_count}
        for e in events
    ]


def link_rows(links) -> list[dict]:
    return [
        {"trace_id": ln.trace_id, "span_id": ln.span_id, "trace_state": ln.trace_state,
         "flags": ln.flags, "attributes": attribute_rows(ln.attributes, "link attributes"),
         "dropped_attributes_count": ln.dropped_attributes_count}
        for ln in links
    ]
