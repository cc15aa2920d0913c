"""The validation kernel against its NumPy twin, and validate_batch against a plain
per-span validator, on random inputs (hypothesis)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from _validation_reference import (
    numpy_check_attributes,
    per_span_findings,
    report_findings,
    result_findings,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import knhk
from knhk import _attributes
from knhk._build import load_core
from knhk.validation import WeaverValidator
from knhk.validation import compiled as C
from knhk.validation.compiled import load_compiled
from knhk.validation.validator import _State

kernel = load_core("_validate")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def compiled(small_registry, session_cache):
    return load_compiled(small_registry, cache_dir=session_cache)


@pytest.fixture(scope="module")
def model(compiled):
    return compiled.registry


def _run_kernel(state, offsets, key_idx, key_map, tags, str_idx, str_vid, ints, any_off,
                any_data, row_group, row_key=None, n_row_keys=0, premap=False):
    n = len(offsets) - 1
    m = len(key_idx)
    out = {
        "entry_bits": np.zeros(m, np.uint8), "row_bits": np.empty(n, np.uint32),
        "row_level": np.empty(n, np.int8), "row_viol": np.empty(n, np.int32),
        "counts": np.zeros(C.N_CODES, np.int64), "key_viol": np.zeros(n_row_keys, np.int64),
    }
    if row_key is None:
        row_key = np.zeros(0, np.int32)
    enum_pos = np.empty(max(m, 1), np.int32)
    enum_row = np.empty(max(m, 1), np.int32)
    str_used = np.zeros(len(str_vid), np.uint8)
    cap = max(n * max(int(state.rq_count.max()) if state.rq_count.size else 0, 1), 1)
    miss = [np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int8)]
    stamp = np.full(max(state.compiled.num_keys, 1), -1, np.int32)
    empty = np.zeros(0, np.uint8)
    premapped = str_vid if premap else np.zeros(0, np.int32)
    n_enum, n_miss, out["n_invalid"] = kernel.check_attributes(
        state.tables, offsets, key_idx, key_map, tags, str_idx, empty, 0, premapped, ints,
        empty, 0,
        any_off, any_data, row_group, row_key, out["entry_bits"], out["row_bits"],
        out["row_level"], out["row_viol"], out["counts"], out["key_viol"], enum_pos, enum_row,
        str_used, *miss, stamp)
    if n_enum:
        # only entries the kernel marked are looked up; unmarked ones stay unmapped
        vid = np.where(str_used.astype(bool), str_vid, -1).astype(np.int32)
        kernel.check_enum_strings(state.tables, n_enum, enum_pos, enum_row, key_idx, key_map,
                                  str_idx, vid, out["entry_bits"], out["row_bits"],
                                  out["row_level"], out["row_viol"], out["counts"])
    out["missing"] = list(zip(miss[0][:n_miss].tolist(), miss[1][:n_miss].tolist(),
                              miss[2][:n_miss].tolist(), strict=True))
    return out


def _compare(got: dict, want: dict) -> None:
    for name in ("entry_bits", "row_bits", "row_level", "row_viol", "counts", "key_viol"):
        np.testing.assert_array_equal(got[name].astype(np.int64), want[name], err_msg=name)
    assert got["missing"] == want["missing"]
    assert got["n_invalid"] == want["n_invalid"]


# -- the kernel on raw arrays, corrupt entries included ------------------------------------

_PAYLOADS = [
    _attributes.encode_any(v) for v in
    (["a", "b"], [1, 2], [1.5, 2], [True], [], ["a", 1], [[1]], [None, "x"], [b"x"], [{"k": 1}])
]


@st.composite
def raw_inputs(draw, n_keys: int, n_groups: int):
    n = draw(st.integers(0, 12))
    lens = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    lead = draw(st.integers(0, 3))           # a sliced list: offsets need not start at 0
    offsets = np.concatenate([[lead], lead + np.cumsum(lens, dtype=np.int64)]).astype(np.int32)
    m = int(offsets[-1]) + draw(st.integers(0, 2))
    d = draw(st.integers(1, 8))
    key_map = np.array(draw(st.lists(st.integers(-2, n_keys - 1), min_size=d, max_size=d)),
                       np.int32)
    key_idx = np.array(draw(st.lists(st.integers(-1, d), min_size=m, max_size=m)), np.int32)
    tags = np.array(draw(st.lists(st.sampled_from([-1, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 9]),
                                  min_size=m, max_size=m)), np.int8)
    s = draw(st.integers(1, 6))
    str_idx = np.array(draw(st.lists(st.integers(0, s), min_size=m, max_size=m)), np.int32)
    str_vid = np.array(draw(st.lists(st.integers(-1, 4), min_size=s, max_size=s)), np.int32)
    ints = np.array(draw(st.lists(st.sampled_from([0, 1, 2, 5, -7]), min_size=m,
                                  max_size=m)), np.int64)
    blobs = []
    for _ in range(m):
        blob = draw(st.sampled_from(_PAYLOADS))
        cut = draw(st.sampled_from([None, None, None, 1, 3]))
        blobs.append(blob[:cut] if cut is not None else blob)
    any_off = np.concatenate([[0], np.cumsum([len(b) for b in blobs], dtype=np.int64)]
                             ).astype(np.int32)
    any_data = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    row_group = np.array(draw(st.lists(st.integers(-1, n_groups - 1), min_size=n,
                                       max_size=n)), np.int32)
    enabled = draw(st.sampled_from([(1 << C.N_CODES) - 1, 0b11111110111, 0b10000001111,
                                    1 << C.C_UNDEFINED_ENUM_VARIANT,
                                    (1 << C.C_SIGNAL_NOT_STABLE) | 0b111]))
    n_row_keys = draw(st.integers(0, 4))
    row_key = np.array(draw(st.lists(st.integers(-1, n_row_keys), min_size=n, max_size=n)),
                       np.int32) if n_row_keys else np.zeros(0, np.int32)
    premap = draw(st.booleans())
    return (offsets, key_idx, key_map, tags, str_idx, str_vid, ints, any_off, any_data,
            row_group, row_key, n_row_keys, enabled, premap)


@SETTINGS
@given(data=st.data())
def test_kernel_matches_numpy_reference(compiled, data):
    inputs = data.draw(raw_inputs(compiled.num_keys, compiled.num_groups))
    *arrays, enabled, premap = inputs
    state = _State(compiled, enabled)
    got = _run_kernel(state, *arrays, premap=premap)
    (offsets, key_idx, key_map, tags, str_idx, str_vid, ints, any_off, any_data, row_group,
     row_key, n_row_keys) = arrays
    want = numpy_check_attributes(compiled, enabled, offsets, key_idx, key_map, tags, str_idx,
                                  str_vid, ints, any_off, any_data, row_group, row_key,
                                  n_row_keys)
    _compare(got, want)


def test_kernel_flags_corrupt_entries_only():
    """Out-of-range key index, bad type tag, truncated array bytes, out-of-range
    string index: each marks its own entry and nothing else."""
    import tempfile

    from validation_testing import SMALL_V1, write_registry
    root = write_registry(__import__("pathlib").Path(tempfile.mkdtemp()), {"r.yaml": SMALL_V1})
    c = load_compiled(root, cache=False)
    state = _State(c, (1 << C.N_CODES) - 1)
    k = [c.key_id("t.str"), c.key_id("t.strs"), c.key_id("t.color")]
    key_map = np.array(k, np.int32)
    key_idx = np.array([0, 5, 0, 1, 2], np.int32)            # entry 1: index outside
    tags = np.array([1, 1, 11, 5, 1], np.int8)               # entry 2: tag 11
    blob = _attributes.encode_any(["a", "b"])
    any_off = np.array([0, 0, 0, 0, 3, 3], np.int32)          # entry 3: truncated array
    any_data = np.frombuffer(blob[:3], np.uint8)
    str_idx = np.array([0, 0, 0, 0, 9], np.int32)            # entry 4: string index outside
    out = _run_kernel(state, np.array([0, 1, 2, 3, 4, 5], np.int32), key_idx, key_map, tags,
                      str_idx, np.zeros(1, np.int32), np.zeros(5, np.int64), any_off, any_data,
                      np.full(5, -1, np.int32))
    invalid = 1 << C.C_INVALID_VALUE
    assert out["entry_bits"].tolist() == [0, invalid, invalid, invalid, invalid]
    assert out["row_level"].tolist() == [0, 3, 3, 3, 3]
    assert out["counts"][C.C_INVALID_VALUE] == 4


# -- validate_batch and validate_span against the per-span reference ---------------------------

_KEYS = ["t.str", "t.int", "t.dbl", "t.bool", "t.strs", "t.ints", "t.dbls", "t.bools", "t.any",
         "t.color", "t.code", "t.header.a", "t.header.b", "t.header", "t.old", "t.gone",
         "v2.size", "no.such", "other", "knhk.validation.level"]
_NAMES = ["test.op", "v2.op", "v2.op.refined", "span.v2.op", "test.metric", "GET /x", "op"]

_scalars = st.one_of(
    st.sampled_from(["red", "green", "blue", "", "x"]), st.text(max_size=4),
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 2, 5]),
    st.floats(allow_nan=False), st.booleans(), st.binary(max_size=3), st.none())
_values = st.one_of(
    _scalars,
    st.lists(st.one_of(st.text(max_size=3), st.integers(-5, 5), st.floats(-1, 1),
                       st.booleans(), st.none()), max_size=4),
    st.lists(st.sampled_from(["a", "b"]), max_size=3),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["k", "j"]), st.integers(0, 3), max_size=2),
)
_spans = st.lists(st.tuples(st.sampled_from(_NAMES),
                            st.dictionaries(st.sampled_from(_KEYS), _values, max_size=7)),
                  min_size=1, max_size=25)


@SETTINGS
@given(spans=_spans, exclude=st.sampled_from([(), ("not_stable",), ("type_mismatch",
                                                                   "template_attribute")]))
def test_validate_batch_matches_per_span_reference(small_registry, session_cache, model, spans,
                                                   exclude):
    v = WeaverValidator(small_registry, cache_dir=session_cache, exclude=exclude)
    batch = knhk.SpanBatch.from_spans(
        [knhk.Span(name, trace_id=i + 1, span_id=i + 1, attributes=attrs)
         for i, (name, attrs) in enumerate(spans)])
    report = v.validate_batch(batch)
    viol = 0
    for row, (name, attrs) in enumerate(spans):
        want = per_span_findings(model, name, attrs, exclude=set(exclude))
        assert report_findings(report, row) == want, (name, attrs)
        assert result_findings(v.validate_span(name, attrs)) == want
        n_viol = sum(c for (fid, _), c in want.items() if fid in _VIOLATION_IDS)
        assert report.row_violations[row] == n_viol
        viol += n_viol
    assert report.num_violations == viol
    assert Counter(report.table().column("id").to_pylist()) == Counter(report.counts)


_VIOLATION_IDS = {"missing_attribute", "type_mismatch", "deprecated", "invalid_attribute_value",
                  "required_attribute_not_present"}


def test_semconv_batch_matches_per_span_reference(semconv_path, session_cache):
    """The real registry: random keys drawn from it, with right and wrong values."""
    v = WeaverValidator(semconv_path, cache_dir=session_cache)
    model = v.registry
    rng = np.random.default_rng(5)
    keys = sorted(model.attributes)
    groups = [g.id for g in model.groups_of_type("span")][:20]
    spans = []
    for i in range(300):
        attrs = {}
        for k in rng.choice(keys, size=int(rng.integers(0, 8)), replace=False).tolist():
            a = model.attributes[k]
            choice = int(rng.integers(0, 4))
            if a.is_enum and a.members and choice < 2:
                attrs[k] = a.members[int(rng.integers(0, len(a.members)))].value
            elif choice == 0:
                attrs[k] = {"string": "s", "int": 3, "double": 1.5, "boolean": True,
                            "string[]": ["a"], "int[]": [1], "double[]": [1.0],
                            "boolean[]": [False], "any": "x"}.get(a.value_type, "s")
            else:
                attrs[k] = ["x", 1, 2.5, True][choice]
        if rng.random() < 0.2:
            attrs["custom.key." + str(i)] = i
        if rng.random() < 0.2:
            attrs["http.request.header.x-" + str(i)] = ["v"]
        name = groups[int(rng.integers(0, len(groups)))] if rng.random() < 0.5 else f"op{i}"
        spans.append((name, attrs))
    batch = knhk.SpanBatch.from_spans([knhk.Span(n, trace_id=i + 1, span_id=i + 1, attributes=a)
                                       for i, (n, a) in enumerate(spans)])
    report = v.validate_batch(batch)
    for row, (name, attrs) in enumerate(spans):
        assert report_findings(report, row) == per_span_findings(model, name, attrs)


def test_string_dictionary_is_mapped_per_batch(small_registry, session_cache):
    """Two batches whose string dictionaries order the same values differently."""
    v = WeaverValidator(small_registry, cache_dir=session_cache)
    a = knhk.SpanBatch.from_spans([knhk.Span("x", trace_id=1, span_id=1,
                                             attributes={"t.str": "blue", "t.color": "red"})])
    b = knhk.SpanBatch.from_spans([knhk.Span("x", trace_id=1, span_id=1,
                                             attributes={"t.str": "red", "t.color": "blue"})])
    assert v.validate_batch(a).counts == {}
    assert v.validate_batch(b).counts == {"undefined_enum_variant": 1}
    # the same key dictionary value in a pyarrow-built batch with shuffled dictionaries
    rb = b.record_batch
    lists = rb.column("attributes")
    vals = lists.values
    keys = vals.field("key")
    order = pa.array(list(reversed(keys.dictionary.to_pylist())))
    remap = np.array([len(order) - 1 - i for i in keys.indices.to_numpy()], np.int32)
    fields = [pa.DictionaryArray.from_arrays(pa.array(remap), order)] + \
        [vals.field(i) for i in range(1, vals.type.num_fields)]
    struct = pa.StructArray.from_arrays(fields, fields=list(vals.type))
    shuffled = pa.RecordBatch.from_arrays(
        [pa.ListArray.from_arrays(lists.offsets, struct, type=lists.type) if n == "attributes"
         else rb.column(n) for n in rb.schema.names], schema=rb.schema)
    assert v.validate_batch(shuffled).counts == {"undefined_enum_variant": 1}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_kernel_with_a_large_premapped_string_dictionary(compiled, data):
    """A premapped string dictionary too large for the per-batch (key, string) table:
    enum strings are then looked up entry by entry; same findings as the reference."""
    enum_keys = [k for k in range(compiled.num_keys)
                 if compiled.flags[k] & C.F_ENUM_STR]
    assert enum_keys, "the small registry has a string enum"
    n_str = 5000                                  # above the table's 4096-cell floor
    n = data.draw(st.integers(1, 30))
    lens = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    m = int(offsets[-1])
    key_map = np.array([*enum_keys[:2], -1, 0], np.int32)
    key_idx = np.array(data.draw(st.lists(st.integers(0, len(key_map) - 1), min_size=m,
                                          max_size=m)), np.int32)
    tags = np.array(data.draw(st.lists(st.sampled_from([1, 1, 3]), min_size=m, max_size=m)),
                    np.int8)
    str_idx = np.array(data.draw(st.lists(st.integers(0, n_str - 1), min_size=m, max_size=m)),
                       np.int32)
    vocab = max(len(compiled.enum_vocab), 1)
    str_vid = np.random.default_rng(data.draw(st.integers(0, 9))).integers(
        -1, vocab, n_str).astype(np.int32)
    ints = np.zeros(m, np.int64)
    any_off = np.zeros(m + 1, np.int32)
    any_data = np.zeros(0, np.uint8)
    row_group = np.full(n, -1, np.int32)
    state = _State(compiled, (1 << C.N_CODES) - 1)
    got = _run_kernel(state, offsets, key_idx, key_map, tags, str_idx, str_vid, ints, any_off,
                      any_data, row_group, premap=True)
    want = numpy_check_attributes(compiled, (1 << C.N_CODES) - 1, offsets, key_idx, key_map,
                                  tags, str_idx, str_vid, ints, any_off, any_data, row_group,
                                  np.zeros(0, np.int32), 0)
    _compare(got, want)
