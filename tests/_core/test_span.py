"""``knhk.Span`` construction, and attribute values through the ring buffer.

Ids in every accepted spelling give the same span; bad input raises an error
naming the field; every attribute value type survives
``SpanBatch.from_spans(...).to_spans()`` and ``SpanBatch.attribute(key)`` with
its type intact (1, 1.0 and True stay different).
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from knhk_testing import same

import knhk
from knhk import AttributeValue, AttrType, Span, SpanBatch, SpanEvent, SpanKind, SpanLink


def roundtrip(attrs: dict) -> dict:
    out = SpanBatch.from_spans([Span("op", trace_id=1, span_id=1, start_time_ns=0,
                                     attributes=attrs)]).to_spans()
    return out[0].attributes or {}


# -- ids --------------------------------------------------------------------------------


@settings(max_examples=50)
@given(trace=st.integers(1, 2**128 - 1), span=st.integers(1, 2**64 - 1),
       parent=st.integers(1, 2**64 - 1))
def test_ids_as_bytes_hex_and_int_give_the_same_span(trace, span, parent):
    forms = [
        (trace, span, parent),
        (trace.to_bytes(16, "big"), span.to_bytes(8, "big"), parent.to_bytes(8, "big")),
        (f"{trace:032x}", f"{span:016x}", f"{parent:016x}"),
        (f"{trace:032X}", f"{span:016X}", f"{parent:016X}"),
        (bytearray(trace.to_bytes(16, "big")), memoryview(span.to_bytes(8, "big")),
         parent.to_bytes(8, "big")),
    ]
    spans = [Span("op", trace_id=t, span_id=s, parent_span_id=p, start_time_ns=1)
             for t, s, p in forms]
    assert spans[0].trace_id == trace.to_bytes(16, "big")
    assert spans[0].span_id == span.to_bytes(8, "big")
    assert spans[0].parent_span_id == parent.to_bytes(8, "big")
    assert all(s == spans[0] for s in spans[1:])
    assert len({hash(s) for s in spans}) == 1
    assert all(type(s.trace_id) is bytes for s in spans)


_BAD_ID_TYPES = [1.5, [1, 2], None, True, np.int64(3), object()]


@pytest.mark.parametrize(("field", "bad"), [
    (field, bad) for field in ("trace_id", "span_id", "parent_span_id") for bad in _BAD_ID_TYPES
    if not (bad is None and field == "parent_span_id")   # None: a root span
])
def test_wrong_id_types_raise_type_error_naming_the_field(field, bad):
    ids = {"trace_id": 1, "span_id": 1, field: bad}
    with pytest.raises(TypeError, match=field):
        Span("op", **ids)


@pytest.mark.parametrize(("field", "size"), [("trace_id", 16), ("span_id", 8),
                                             ("parent_span_id", 8)])
@pytest.mark.parametrize("form", ["short bytes", "long bytes", "short hex", "long hex",
                                  "big int", "negative int", "not hex"])
def test_wrong_id_length_or_value_raises_value_error_naming_the_field(field, size, form):
    bad = {
        "short bytes": b"\x01" * (size - 1),
        "long bytes": b"\x01" * (size + 1),
        "short hex": "01" * (size - 1),
        "long hex": "01" * (size + 1),
        "big int": 2 ** (8 * size),
        "negative int": -5,
        "not hex": "zz" * size,
    }[form]
    ids = {"trace_id": 1, "span_id": 1, field: bad}
    with pytest.raises(ValueError, match=field):
        Span("op", **ids)


@pytest.mark.parametrize(("field", "size"), [("trace_id", 16), ("span_id", 8),
                                             ("parent_span_id", 8)])
@pytest.mark.parametrize("spelling", ["bytes", "hex", "int"])
def test_all_zero_ids_are_rejected(field, size, spelling):
    zero = {"bytes": bytes(size), "hex": "0" * (2 * size), "int": 0}[spelling]
    ids = {"trace_id": 1, "span_id": 1, field: zero}
    with pytest.raises(ValueError, match=field):
        Span("op", **ids)


# -- other fields -----------------------------------------------------------------------


@pytest.mark.parametrize(("field", "bad"), [
    ("attributes", [("a", 1)]),
    ("attributes", "a=1"),
    ("start_time_ns", 1.5),
    ("start_time_ns", "10"),
    ("end_time_ns", 2.0),
    ("duration_ns", "5"),
    ("kind", "SERVER"),
    ("kind", 2.0),
    ("status", "ERROR"),
    ("status", 1.0),
    ("status_message", 5),
    ("service", b"svc"),
    ("trace_state", 1),
    ("scope_name", 1),
    ("scope_version", 1.0),
    ("resource_attributes", [("host", "h")]),
    ("events", [5]),
    ("links", ["not a link"]),
])
def test_wrong_types_raise_type_error_naming_the_field(field, bad):
    args = {"trace_id": 1, "span_id": 1, "start_time_ns": 0, field: bad}
    if field in ("start_time_ns", "end_time_ns", "duration_ns"):
        args = {"trace_id": 1, "span_id": 1, field: bad}
    with pytest.raises(TypeError, match=field):
        Span("op", **args)


def test_name_must_be_a_str():
    with pytest.raises(TypeError, match="name"):
        Span(5, trace_id=1, span_id=1)
    with pytest.raises(TypeError, match="name"):
        Span(None, trace_id=1, span_id=1)


@pytest.mark.parametrize(("field", "bad"), [("kind", 6), ("kind", -1), ("status", 3),
                                            ("status", -1)])
def test_out_of_range_enums_raise_value_error(field, bad):
    with pytest.raises(ValueError, match=field):
        Span("op", trace_id=1, span_id=1, **{field: bad})


@pytest.mark.parametrize(("make", "word"), [
    pytest.param(lambda: Span("op", trace_id=1, span_id=1, start_time_ns=2**63),
                 "start_time_ns", id="start_time_ns beyond int64"),
    pytest.param(lambda: Span("op", trace_id=1, span_id=1, start_time_ns=0, kind=2**70),
                 "kind", id="kind beyond C long"),
    pytest.param(lambda: Span("op", trace_id=1, span_id=1, start_time_ns=2**62,
                              duration_ns=2**62), "int64", id="start + duration beyond int64"),
    pytest.param(lambda: SpanEvent("e", time_ns=1, dropped_attributes_count=-1),
                 "dropped_attributes_count", id="event dropped_attributes_count negative"),
    pytest.param(lambda: SpanLink(1, 1, flags="x"), "flags", id="link flags not an int"),
])
def test_out_of_range_numbers_name_the_field(make, word):
    with pytest.raises((TypeError, ValueError, OverflowError), match=word):
        make()


def test_times_from_any_two_of_start_end_duration():
    a = Span("op", trace_id=1, span_id=1, start_time_ns=100, duration_ns=25)
    b = Span("op", trace_id=1, span_id=1, end_time_ns=125, duration_ns=25)
    c = Span("op", trace_id=1, span_id=1, start_time_ns=100, end_time_ns=125)
    d = Span("op", trace_id=1, span_id=1, start_time_ns=100, end_time_ns=125, duration_ns=25)
    for s in (a, b, c, d):
        assert (s.start_time_ns, s.end_time_ns, s.duration_ns) == (100, 125, 25)
    assert a == b == c == d
    e = Span("op", trace_id=1, span_id=1, start_time_ns=100)
    assert (e.end_time_ns, e.duration_ns) == (100, 0)
    f = Span("op", trace_id=1, span_id=1, end_time_ns=100)
    assert f.start_time_ns == 100


def test_no_times_means_now():
    before = time.time_ns()
    s = Span("op", trace_id=1, span_id=1, duration_ns=7)
    after = time.time_ns()
    assert before <= s.start_time_ns <= after
    assert s.duration_ns == 7


@pytest.mark.parametrize("times", [
    {"start_time_ns": 10, "end_time_ns": 9},
    {"start_time_ns": 10, "duration_ns": -1},
    {"end_time_ns": 10, "duration_ns": -1},
    {"start_time_ns": 10, "end_time_ns": 20, "duration_ns": 5},
])
def test_inconsistent_or_backwards_times_are_rejected(times):
    with pytest.raises(ValueError, match=r"end_time_ns|duration_ns"):
        Span("op", trace_id=1, span_id=1, **times)


def test_enums_and_plain_ints_are_the_same():
    a = Span("op", trace_id=1, span_id=1, start_time_ns=0, kind=SpanKind.SERVER,
             status=knhk.SpanStatus.ERROR)
    b = Span("op", trace_id=1, span_id=1, start_time_ns=0, kind=2, status=2)
    assert a == b
    assert b.kind is SpanKind.SERVER and b.status is knhk.SpanStatus.ERROR
    assert Span("op", trace_id=1, span_id=1).kind is SpanKind.INTERNAL   # the default


def test_events_and_links_as_objects_or_dicts():
    ev = [SpanEvent("retry", 5, {"attempt": 2}), SpanEvent("done", 9)]
    ln = [SpanLink(7, 8, "k=v", 1, {"why": "fan-in"})]
    as_objects = Span("op", trace_id=1, span_id=1, start_time_ns=0, events=ev, links=ln)
    as_dicts = Span("op", trace_id=1, span_id=1, start_time_ns=0,
                    events=[{"name": "retry", "time_ns": 5, "attributes": {"attempt": 2}},
                            {"name": "done", "time_ns": 9}],
                    links=[{"trace_id": f"{7:032x}", "span_id": 8, "trace_state": "k=v",
                            "flags": 1, "attributes": {"why": "fan-in"}}])
    assert as_objects == as_dicts
    assert as_dicts.events == ev and as_dicts.links == ln
    assert Span("op", trace_id=1, span_id=1, start_time_ns=0, events=[]).events is None


def test_event_and_link_errors_name_the_item():
    with pytest.raises(TypeError, match=r"events\[1\]"):
        Span("op", trace_id=1, span_id=1, events=[SpanEvent("a", 1), 5])
    with pytest.raises(ValueError, match="link span_id"):
        Span("op", trace_id=1, span_id=1, links=[{"trace_id": 1, "span_id": 0}])


def test_equality_looks_at_every_field():
    base = {"trace_id": 1, "span_id": 2, "start_time_ns": 0, "attributes": {"a": "b"}}
    s = Span("op", **base)
    assert s == Span("op", **base)
    assert s != Span("op2", **base)
    assert s != Span("op", **{**base, "attributes": {"a": "c"}})
    assert s != Span("op", **{**base, "service": "x"})
    assert s != Span("op", **{**base, "status_message": "x"})
    assert s != Span("op", **{**base, "parent_span_id": 3})
    assert s != Span("op", **{**base, "start_time_ns": 1})
    assert s != "op"
    assert s.is_root() and not Span("op", **{**base, "parent_span_id": 3}).is_root()


def test_repr_shows_the_fields_in_hex():
    s = Span("GET /", trace_id=0xABC, span_id=0x12, parent_span_id=0x34, start_time_ns=0,
             duration_ns=5, kind=SpanKind.SERVER, status=2, service="web",
             attributes={"k": 1})
    r = repr(s)
    for part in ("'GET /'", f"{0xABC:032x}", f"{0x12:016x}", f"{0x34:016x}", "SERVER",
                 "ERROR", "duration_ns=5", "'web'", "{'k': 1}"):
        assert part in r, (part, r)


def test_fields_are_read_only():
    s = Span("op", trace_id=1, span_id=1)
    with pytest.raises(AttributeError):
        s.name = "other"


# -- attribute values through the ring ----------------------------------------------------

_I64 = (-(2**63), 2**63 - 1)

# (value given, value read back, Arrow type of SpanBatch.attribute)
_CASES = [
    ("text", "text", pa.string()),
    ("", "", pa.string()),
    ("üñï€😀", "üñï€😀", pa.string()),
    (True, True, pa.bool_()),
    (False, False, pa.bool_()),
    (0, 0, pa.int64()),
    (_I64[0], _I64[0], pa.int64()),
    (_I64[1], _I64[1], pa.int64()),
    (1.5, 1.5, pa.float64()),
    (-0.0, -0.0, pa.float64()),
    (math.inf, math.inf, pa.float64()),
    (b"\x00\xff", b"\x00\xff", pa.binary()),
    (b"", b"", pa.binary()),
    ([1, 2, 3], [1, 2, 3], pa.list_(pa.int64())),
    (("a", "b"), ["a", "b"], pa.list_(pa.string())),
    ([], [], None),
    ({"a": 1, "b": "x"}, {"a": 1, "b": "x"}, None),
    ({"outer": {"inner": [True, False]}}, {"outer": {"inner": [True, False]}}, None),
    (None, None, None),
    (np.int8(-7), -7, pa.int64()),
    (np.uint32(7), 7, pa.int64()),
    (np.uint64(2**63 - 1), 2**63 - 1, pa.int64()),
    (np.float32(0.5), 0.5, pa.float64()),
    (np.float64(2.5), 2.5, pa.float64()),
    (np.bool_(True), True, pa.bool_()),
    (np.str_("np"), "np", pa.string()),
    (np.array([4, 5]), [4, 5], pa.list_(pa.int64())),
    (AttributeValue.double(5), 5.0, pa.float64()),
    (AttributeValue.int(5), 5, pa.int64()),
    (AttributeValue.string("s"), "s", pa.string()),
    (AttributeValue.bool(True), True, pa.bool_()),
    (AttributeValue.bytes(bytearray(b"ab")), b"ab", pa.binary()),
    (AttributeValue.array([1.0, 2.0]), [1.0, 2.0], pa.list_(pa.float64())),
    (AttributeValue.kvlist({"k": "v"}), {"k": "v"}, None),
    (AttributeValue(AttrType.EMPTY, None), None, None),
    ([AttributeValue.double(1), 2.5], [1.0, 2.5], pa.list_(pa.float64())),
]


@pytest.mark.parametrize(("given_", "expected", "arrow_type"), _CASES,
                         ids=[repr(c[0])[:30] for c in _CASES])
def test_attribute_value_roundtrip(given_, expected, arrow_type):
    got = roundtrip({"k": given_, "other": "x"})
    assert same(got["k"], expected), (got["k"], expected)
    assert got["other"] == "x"
    batch = SpanBatch.from_spans([
        Span("op", trace_id=1, span_id=1, attributes={"k": given_}),
        Span("op", trace_id=1, span_id=2, attributes={"unrelated": 1}),
    ])
    col = batch.attribute("k")
    assert len(col) == 2 and col[1].as_py() is None
    if arrow_type is not None:
        value_type = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        assert value_type == arrow_type
        assert same(col[0].as_py(), expected)
    assert same(batch.attribute_values("k")[0], expected)


def test_nan_attribute_roundtrip():
    got = roundtrip({"k": math.nan, "arr": [math.nan]})
    assert math.isnan(got["k"]) and math.isnan(got["arr"][0])


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**100, np.uint64(2**64 - 1)])
@pytest.mark.parametrize("wrap", ["plain", "list", "dict", "AttributeValue"])
def test_int64_overflow_raises_value_error_naming_the_key(value, wrap):
    if wrap == "AttributeValue":
        with pytest.raises(ValueError, match="int64"):
            AttributeValue.int(int(value))
        return
    v = {"plain": value, "list": [1, value], "dict": {"x": value}}[wrap]
    ring = knhk._build.load_core("_ringbuffer").SpanRing(4, 4)
    with pytest.raises(ValueError, match=r"'the\.key'"):
        ring.append(Span("op", trace_id=1, span_id=1, attributes={"the.key": v}))
    assert ring.received == 0


@pytest.mark.parametrize("value", [object(), {1, 2}, 1 + 2j, [object()], {"a": {3: "x"}}])
def test_unsupported_values_raise_type_error_naming_the_key(value):
    with pytest.raises(TypeError, match=r"'the\.key'"):
        SpanBatch.from_spans([Span("op", trace_id=1, span_id=1,
                                   attributes={"the.key": value})])


@pytest.mark.parametrize(("make", "error"), [
    (lambda: AttributeValue.string(5), TypeError),
    (lambda: AttributeValue.bool(1), TypeError),
    (lambda: AttributeValue.int(1.5), TypeError),
    (lambda: AttributeValue.int(True), TypeError),
    (lambda: AttributeValue.bytes("s"), TypeError),
    (lambda: AttributeValue.array({"a": 1}), TypeError),
    (lambda: AttributeValue.kvlist([1]), TypeError),
    (lambda: AttributeValue(99, 1), ValueError),
])
def test_attribute_value_rejects_mismatched_values(make, error):
    with pytest.raises(error):
        make()


def test_attribute_value_equality_and_repr():
    assert AttributeValue.double(5) == AttributeValue.double(5.0)
    assert AttributeValue.double(5) != AttributeValue.int(5)
    assert AttributeValue.int(5).type is AttrType.INT
    assert repr(AttributeValue.double(5)) == "AttributeValue.double(5.0)"
    assert len({AttributeValue.int(1), AttributeValue.int(1)}) == 1


_leaf = st.one_of(
    st.text(max_size=8), st.booleans(), st.integers(*_I64),
    st.floats(allow_nan=False), st.binary(max_size=8), st.none())
_nested = st.recursive(
    st.one_of(st.text(max_size=4), st.booleans(), st.integers(*_I64),
              st.floats(allow_nan=False), st.binary(max_size=4), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(spans=st.lists(st.dictionaries(st.text(min_size=1, max_size=6),
                                      st.one_of(_leaf, _nested), max_size=5),
                      min_size=1, max_size=6),
       resource=st.dictionaries(st.sampled_from(["host", "pid", "tags"]), _nested,
                                max_size=2))
def test_random_attributes_roundtrip(spans, resource):
    originals = [Span("op", trace_id=1, span_id=i + 1, start_time_ns=i, attributes=a,
                      resource_attributes=resource or None) for i, a in enumerate(spans)]
    back = SpanBatch.from_spans(originals).to_spans()
    for o, b in zip(originals, back, strict=True):
        assert same(b.attributes or {}, o.attributes or {})
        assert same(b.resource_attributes or {}, o.resource_attributes or {})
        for key, value in (o.attributes or {}).items():
            if isinstance(value, int | float | str | bool | bytes):
                assert same(SpanBatch.from_spans([o]).attribute(key)[0].as_py(), value)


def test_every_span_field_roundtrips():
    s = Span("op", trace_id=1, span_id=2, parent_span_id=3, start_time_ns=5, end_time_ns=9,
             kind=SpanKind.CLIENT, status=2, status_message="boom", service="svc",
             trace_state="a=b", flags=1, resource_attributes={"host": "h"},
             scope_name="lib", scope_version="1.0", attributes={"n": 1},
             events=[SpanEvent("e", 6, {"x": 1.5}), {"name": "e2", "time_ns": 7}],
             links=[SpanLink(4, 5, "k=v", 1, {"y": b"z"}), {"trace_id": 6, "span_id": 7}])
    (back,) = SpanBatch.from_spans([s]).to_spans()
    assert back == s
    assert same(back.events[0].attributes, {"x": 1.5})
    assert same(back.links[0].attributes, {"y": b"z"})
    assert (back.scope_name, back.scope_version, back.trace_state, back.flags) == \
        ("lib", "1.0", "a=b", 1)


def test_service_defaults_to_the_resource_service_name():
    import types

    s = knhk.Span("a", trace_id=1, span_id=1, resource_attributes={"service.name": "cart"})
    assert s.service == "cart"
    given = knhk.Span("a", trace_id=1, span_id=1, service="front",
                      resource_attributes={"service.name": "cart"})
    assert given.service == "front"
    batch = knhk.SpanBatch.from_spans([s, knhk.Span("b", trace_id=1, span_id=2)])
    assert batch.column("service").to_pylist() == ["cart", "unknown_service"]
    # any mapping is accepted, and copied
    attrs = types.MappingProxyType({"k": 1})
    assert knhk.Span("a", trace_id=1, span_id=1, attributes=attrs).attributes == {"k": 1}
    with pytest.raises(TypeError, match="attributes must be a mapping"):
        knhk.Span("a", trace_id=1, span_id=1, attributes=[("k", 1)])


# -- the fast constructor against Cython's generic one ----------------------------------

_PARAMS = ["name", "trace_id", "span_id", "parent_span_id", "attributes", "duration_ns",
           "status", "start_time_ns", "end_time_ns", "kind", "service", "events", "links",
           "status_message", "trace_state", "flags", "resource_attributes", "scope_name",
           "scope_version"]
_ARG_VALUES = {
    "name": st.sampled_from(["op", "", None, 3, b"op"]),
    "trace_id": st.sampled_from([1, "0af7651916cd43dd8448eb211c80319c", bytes(16), 1.5]),
    "span_id": st.sampled_from([2, b"\x00" * 7 + b"\x01", "zz", None]),
    "parent_span_id": st.sampled_from([None, 3, "0000000000000000"]),
    "attributes": st.sampled_from([None, {}, {"k": "v", "n": 1}, [("k", "v")], {1: 2}]),
    "duration_ns": st.sampled_from([None, 5, -1, 2.5]),
    "status": st.sampled_from([0, 2, knhk.SpanStatus.OK, 7, "x"]),
    "start_time_ns": st.sampled_from([None, 10, 2**63, 1.0]),
    "end_time_ns": st.sampled_from([None, 15, 0]),
    "kind": st.sampled_from([1, 2, SpanKind.CLIENT, 9, None]),
    "service": st.sampled_from([None, "svc", 1]),
    # events carry their time: one without would take "now", which differs between calls
    "events": st.sampled_from([None, [], [SpanEvent("e", time_ns=1)],
                               [{"name": "e", "time_ns": 2}], [1]]),
    "links": st.sampled_from([None, [SpanLink(1, 1)], ["x"]]),
    "status_message": st.sampled_from([None, "m", 1]),
    "trace_state": st.sampled_from([None, "", "k=v", 2]),
    "flags": st.sampled_from([0, 1, -1, 2**32]),
    "resource_attributes": st.sampled_from([None, {"service.name": "r"}, 1]),
    "scope_name": st.sampled_from([None, "lib", 1]),
    "scope_version": st.sampled_from([None, "1.0"]),
}


def _outcome(make):
    try:
        return ("ok", make()._key())
    except Exception as exc:   # the comparison is of the errors themselves
        # (a span given no times starts "now": clock readings differ between calls)
        return (type(exc), re.sub(r"\d{12,}", "<ns>", str(exc)))


def _generic(*args, **kwargs):
    # __new__ then __init__: Cython's own argument parsing, not the fast constructor
    span = Span.__new__(Span)
    span.__init__(*args, **kwargs)
    return span


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_constructor_matches_generic_construction(data):
    n_pos = data.draw(st.integers(0, 4))
    names = data.draw(st.lists(st.sampled_from(_PARAMS), unique=True, max_size=8))
    args = [data.draw(_ARG_VALUES[p]) for p in _PARAMS[:n_pos]]
    kwargs = {p: data.draw(_ARG_VALUES[p]) for p in names}
    if data.draw(st.booleans()):
        # a keyword spelled by a string that is equal to, not identical with, the name
        kwargs = {"".join(list(k)) if k == "name" else k: v for k, v in kwargs.items()}
    extra = data.draw(st.sampled_from([{}, {"bogus": 1}, {"trace_id": 5}]))
    for k, v in extra.items():
        kwargs.setdefault(k, v) if k != "trace_id" else kwargs.update({k: v})
    fast = _outcome(lambda: Span(*args, **kwargs))
    slow = _outcome(lambda: _generic(*args, **kwargs))
    if fast[0] == "ok" == slow[0] and kwargs.get("start_time_ns") is None \
            and kwargs.get("end_time_ns") is None:
        # a span given neither time starts "now": compare durations, not the times
        fast = ("ok", (*fast[1][:5], fast[1][6] - fast[1][5], *fast[1][7:]))
        slow = ("ok", (*slow[1][:5], slow[1][6] - slow[1][5], *slow[1][7:]))
    assert fast == slow


def test_fast_constructor_errors_for_bad_calls_are_cythons():
    with pytest.raises(TypeError, match="name"):
        Span(None, trace_id=1, span_id=1)
    with pytest.raises(TypeError, match="positional arguments"):
        Span("op", trace_id=1)
    with pytest.raises(TypeError, match="bogus"):
        Span("op", trace_id=1, span_id=1, bogus=2)
    with pytest.raises(TypeError, match="trace_id"):
        Span("op", 1, 1, trace_id=1)
    with pytest.raises(TypeError):
        Span(*(["op", 1, 1] + [None] * 17))


def test_subclass_keeps_the_generic_constructor():
    class Sub(Span):
        pass

    s = Sub("op", trace_id=1, span_id=2, start_time_ns=1)
    assert type(s) is Sub and s.span_id == (2).to_bytes(8, "big")
