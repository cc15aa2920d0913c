"""knhk's AnyValue protobuf codec against opentelemetry-proto's real ``AnyValue``.

Values are generated as Python objects; the expected protobuf message is built
from them with the real generated class (``common_pb2``). knhk's bytes must
parse into that message, and the real class's bytes must decode back to the
value with knhk's decoder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from knhk_testing import same
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from knhk import AttributeValue, AttrType, _attributes

_I64 = (-(2**63), 2**63 - 1)


def to_pb(value, out: AnyValue | None = None) -> AnyValue:
    """A Python value as the real protobuf message (independent of knhk)."""
    out = AnyValue() if out is None else out
    if value is None:
        pass
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif isinstance(value, list):
        out.array_value.SetInParent()
        for v in value:
            to_pb(v, out.array_value.values.add())
    elif isinstance(value, dict):
        out.kvlist_value.SetInParent()
        for k, v in value.items():
            kv = out.kvlist_value.values.add()
            kv.key = k
            kv.value.SetInParent()   # an empty AnyValue is OTLP's null
            to_pb(v, kv.value)
    else:
        raise AssertionError(f"no protobuf form for {value!r}")
    return out


def from_pb(v: AnyValue):
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [from_pb(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: from_pb(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


_doubles = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan,
                                                   5e-324, 1.7976931348623157e308]))
_ints = st.one_of(st.integers(*_I64), st.sampled_from([_I64[0], _I64[1], -1, 0, 1, 127, 128]))
_leaves = st.one_of(st.text(), st.just(""), st.booleans(), _ints, _doubles, st.binary(),
                    st.none())
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)


@settings(max_examples=300)
@given(_values)
def test_knhk_bytes_parse_with_the_real_class(value):
    raw = _attributes.encode_any(value)
    parsed = AnyValue()
    parsed.ParseFromString(raw)
    assert same(from_pb(parsed), value)
    if not _has_nan(value):
        assert parsed == to_pb(value)


@settings(max_examples=300)
@given(_values)
def test_real_bytes_decode_with_knhk(value):
    raw = to_pb(value).SerializeToString()
    assert same(_attributes.decode_any(raw), value)


@settings(max_examples=100)
@given(_values)
def test_knhk_roundtrip_is_exact(value):
    assert same(_attributes.decode_any(_attributes.encode_any(value)), value)


def _has_nan(v) -> bool:
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, list):
        return any(map(_has_nan, v))
    if isinstance(v, dict):
        return any(map(_has_nan, v.values()))
    return False


def test_negative_zero_and_nan_keep_their_bits():
    for v in (-0.0, math.nan, -math.inf):
        parsed = AnyValue.FromString(_attributes.encode_any(v))
        assert np.float64(parsed.double_value).tobytes() == np.float64(v).tobytes()


def test_attribute_value_double_forces_a_double_on_the_wire():
    raw = _attributes.encode_any([AttributeValue.double(5), 5, AttributeValue.int(6)])
    parsed = AnyValue.FromString(raw)
    kinds = [v.WhichOneof("value") for v in parsed.array_value.values]
    assert kinds == ["double_value", "int_value", "int_value"]
    assert parsed.array_value.values[0].double_value == 5.0


def test_numpy_values_encode_as_their_python_types():
    raw = _attributes.encode_any([np.int16(-3), np.float32(0.25), np.bool_(False),
                                  np.array([1, 2])])
    assert from_pb(AnyValue.FromString(raw)) == [-3, 0.25, False, [1, 2]]
    assert [v.WhichOneof("value") for v in AnyValue.FromString(raw).array_value.values] == \
        ["int_value", "double_value", "bool_value", "array_value"]


def test_oneof_last_field_wins_like_protobuf():
    raw = AnyValue(string_value="a").SerializeToString() + \
        AnyValue(int_value=5).SerializeToString()
    assert AnyValue.FromString(raw).int_value == 5
    assert same(_attributes.decode_any(raw), 5)


def test_unknown_fields_are_skipped():
    # field 15 varint, field 14 length-delimited, field 13 fixed32: not in AnyValue
    unknown = b"\x78\x01" + b"\x72\x02ab" + b"\x6d\x00\x00\x00\x00"
    raw = unknown + AnyValue(string_value="kept").SerializeToString()
    assert AnyValue.FromString(raw).string_value == "kept"
    assert _attributes.decode_any(raw) == "kept"


@pytest.mark.parametrize("raw", [
    AnyValue(string_value="truncated").SerializeToString()[:-3],
    AnyValue(int_value=-1).SerializeToString()[:-1],
    AnyValue(double_value=1.5).SerializeToString()[:-2],
    b"\x2a\x05\x0a\x03\x0a",
])
def test_truncated_bytes_raise_value_error(raw):
    with pytest.raises(ValueError, match="truncated"):
        _attributes.decode_any(raw)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, [1, [2**64]], {"a": {"b": 2**70}}])
def test_int64_overflow_names_the_key(value):
    with pytest.raises(ValueError, match=r"'http\.x'"):
        _attributes.encode_any(value, "attributes", "http.x")


def test_kvlist_keys_must_be_strings():
    with pytest.raises(TypeError, match=r"'k'.*kvlist keys must be str"):
        _attributes.encode_any({"ok": 1, 2: "x"}, "attributes", "k")


@pytest.mark.parametrize(("value", "tag"), [
    ("s", AttrType.STRING), (True, AttrType.BOOL), (np.bool_(False), AttrType.BOOL),
    (1, AttrType.INT), (np.uint8(1), AttrType.INT), (1.0, AttrType.DOUBLE),
    (np.float16(1), AttrType.DOUBLE), (b"", AttrType.BYTES), (bytearray(b"x"), AttrType.BYTES),
    ([1], AttrType.ARRAY), ((1,), AttrType.ARRAY), (np.zeros(2), AttrType.ARRAY),
    ({"a": 1}, AttrType.KVLIST), (None, AttrType.EMPTY),
    (AttributeValue.double(1), AttrType.DOUBLE), (AttributeValue.array([]), AttrType.ARRAY),
])
def test_encode_slow_classifies_values(value, tag):
    got, payload = _attributes.encode_slow(value, "attributes", "k")
    assert got == tag
    if tag in (AttrType.ARRAY, AttrType.KVLIST):
        assert AnyValue.FromString(payload).WhichOneof("value") == \
            ("array_value" if tag == AttrType.ARRAY else "kvlist_value")


@settings(max_examples=100)
@given(st.dictionaries(st.text(max_size=5), _values, max_size=5))
def test_attribute_rows_reference_path_roundtrips(attrs):
    rows = _attributes.attribute_rows(attrs)
    assert [r["key"] for r in rows] == list(attrs)
    for r in rows:
        set_children = [c for c in ("str", "int", "double", "bool", "bytes", "any")
                        if r[c] is not None]
        assert len(set_children) <= 1
    assert same(_attributes.attributes_dict(rows), attrs)
