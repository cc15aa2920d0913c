"""WeaverValidator: per-event checks, batches, metrics, options, stats, reload."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from validation_testing import SMALL_V1, SMALL_V2, write_registry

import knhk
from knhk.errors import RegistryError, SchemaError
from knhk.validation import FindingLevel, WeaverValidator
from knhk.validation.compiled import CompiledRegistry
from knhk.validation.loader import load_registry


@pytest.fixture(scope="module")
def v(small_registry, session_cache):
    return WeaverValidator(small_registry, cache_dir=session_cache)


def ids(result) -> Counter:
    return Counter((f.id, f.attribute_key) for f in result.findings)


def _span(i, name, attrs):
    return knhk.Span(name, trace_id=i, span_id=i, start_time_ns=0, duration_ns=1,
                     attributes=attrs)


# -- every finding id, per event -----------------------------------------------------------


def test_valid_span(v):
    r = v.validate_span("test.op", {"t.str": "x", "t.int": 3, "t.color": "red",
                                    "t.header.accept": "json", "t.bool": True})
    assert r.is_valid() and r.group == "test.op"
    # template_attribute (information) and t.bool not stable (improvement) remain
    assert ids(r) == Counter({("template_attribute", "t.header.accept"): 1,
                              ("not_stable", "t.bool"): 1})
    assert r.highest_level is FindingLevel.IMPROVEMENT


def test_missing_required_and_other_levels(v):
    r = v.validate_span("test.op", {})
    assert not r.is_valid()
    assert ids(r) == Counter({
        ("required_attribute_not_present", "t.str"): 1,
        ("conditionally_required_attribute_not_present", "t.int"): 1,
        ("recommended_attribute_not_present", "t.color"): 1,
        ("opt_in_attribute_not_present", "t.header"): 1,
        ("opt_in_attribute_not_present", "t.bool"): 1,
    })
    levels = {f.id: f.level for f in r.findings}
    assert levels["required_attribute_not_present"] is FindingLevel.VIOLATION
    assert levels["recommended_attribute_not_present"] is FindingLevel.IMPROVEMENT
    assert levels["opt_in_attribute_not_present"] is FindingLevel.INFORMATION
    assert levels["conditionally_required_attribute_not_present"] is FindingLevel.INFORMATION
    (req,) = r.violations
    assert req.message == "Required attribute 't.str' is not present."
    assert req.context == {"attribute_key": "t.str"}
    assert req.signal_type == "span" and req.signal_name == "test.op"


def test_unknown_attribute_type_mismatch_and_int_for_double(v):
    r = v.validate_attributes({"who.knows": 1, "t.int": "3", "t.dbl": 3, "t.str": 2.5,
                               "t.bool": 1})
    assert ids(r) == Counter({("missing_attribute", "who.knows"): 1,
                              ("type_mismatch", "t.int"): 1,
                              ("type_mismatch", "t.str"): 1,
                              ("type_mismatch", "t.bool"): 1,
                              ("not_stable", "t.bool"): 1})
    mism = next(f for f in r.findings if f.id == "type_mismatch" and f.attribute_key == "t.int")
    assert mism.context == {"attribute_key": "t.int", "attribute_type": "string",
                            "expected": "int"}
    assert mism.message == "Attribute 't.int' has type 'string'. Type should be 'int'."
    assert r.signal_type is None


def test_arrays(v):
    ok = v.validate_attributes({"t.strs": ["a", "b"], "t.ints": [1, 2], "t.dbls": [1, 2.5],
                                "t.bools": [True], "t.any": {"k": [1, "x"]},
                                "t.header.x": "v"})
    assert {f.id for f in ok.findings} == {"template_attribute"}
    bad = v.validate_attributes({"t.strs": ["a", 1], "t.ints": [1.5], "t.bools": "no",
                                 "t.str": ["a"], "t.dbls": [], "t.int": [1]})
    assert ids(bad) == Counter({("type_mismatch", "t.strs"): 1, ("type_mismatch", "t.ints"): 1,
                                ("type_mismatch", "t.bools"): 1, ("type_mismatch", "t.str"): 1,
                                ("type_mismatch", "t.int"): 1})
    assert next(f for f in bad.findings if f.attribute_key == "t.strs").context[
        "attribute_type"] == "any"


def test_enums(v):
    r = v.validate_attributes({"t.color": "blue", "t.code": 1})
    assert ids(r) == Counter({("undefined_enum_variant", "t.color"): 1,
                              ("undefined_enum_variant", "t.code"): 1,
                              ("not_stable", "t.code"): 1})
    blue = next(f for f in r.findings if f.attribute_key == "t.color")
    assert blue.level is FindingLevel.INFORMATION and blue.context["attribute_value"] == "blue"
    assert v.validate_attributes({"t.color": "green", "t.code": 2}).by_id() == \
        {"not_stable": 1}
    # an int for a string enum is a value, not a type error; a double is a type error
    assert ids(v.validate_attributes({"t.color": 7, "t.code": 0.0})) == Counter({
        ("undefined_enum_variant", "t.color"): 1, ("type_mismatch", "t.code"): 1,
        ("not_stable", "t.code"): 1})


def test_deprecated_with_renamed_to(v):
    r = v.validate_attributes({"t.old": "x", "t.gone": "y"})
    old = next(f for f in r.findings if f.id == "deprecated" and f.attribute_key == "t.old")
    assert old.level is FindingLevel.VIOLATION
    assert old.context["renamed_to"] == "t.str"
    assert old.context["deprecation_reason"] == "renamed"
    assert "Use 't.str' instead" in old.message
    gone = next(f for f in r.findings if f.id == "deprecated" and f.attribute_key == "t.gone")
    assert gone.context["deprecation_reason"] == "uncategorized"
    assert gone.context["deprecation_note"] == "Removed, no replacement."
    assert {f.attribute_key for f in r.findings if f.id == "not_stable"} == {"t.old", "t.gone"}


def test_values_the_schema_cannot_hold(v):
    r = v.validate_attributes({"t.str": {1, 2}, "t.int": 2**70, "t.dbl": 1.0})
    bad = {f.attribute_key: f for f in r.findings if f.id == "invalid_attribute_value"}
    assert set(bad) == {"t.str", "t.int"}
    assert bad["t.int"].level is FindingLevel.VIOLATION
    assert "int64" in bad["t.int"].message and "set" in bad["t.str"].message
    with pytest.raises(TypeError, match="keys must be str"):
        v.validate_attributes({3: "x"})


def test_span_name_matching_and_explicit_group(v, small_registry, session_cache):
    assert v.validate_span("not.a.group", {}).group is None
    assert v.validate_span("v2.op", {}).group == "span.v2.op"       # a v2 span type
    r = v.validate_span("whatever", {}, group="v2.op.refined")
    assert r.group == "v2.op.refined"
    assert {f.attribute_key for f in r.violations} == {"v2.size", "t.color"}
    assert ("not_stable", None) in ids(r)                             # a development span
    with pytest.raises(ValueError, match="no group"):
        v.validate_span("x", {}, group="missing")
    mapped = WeaverValidator(small_registry, cache_dir=session_cache,
                             span_groups={"GET /users/*": "test.op", "exact": "span.v2.op"},
                             match_span_names=False)
    assert mapped.validate_span("GET /users/42", {}).group == "test.op"
    assert mapped.validate_span("exact", {}).group == "span.v2.op"
    assert mapped.validate_span("test.op", {}).group is None
    with pytest.raises(ValueError, match="not a group"):
        WeaverValidator(small_registry, cache_dir=session_cache, span_groups={"a": "nope"})


def test_exclude_and_min_level(small_registry, session_cache):
    strict = WeaverValidator(small_registry, cache_dir=session_cache, min_level="violation")
    r = strict.validate_span("test.op", {"t.bool": True, "t.color": "blue"})
    assert {f.id for f in r.findings} == {"required_attribute_not_present"}
    quiet = WeaverValidator(small_registry, cache_dir=session_cache,
                            exclude={"not_stable", "opt_in_attribute_not_present"})
    r = quiet.validate_span("test.op", {"t.bool": True})
    assert not {f.id for f in r.findings} & {"not_stable", "opt_in_attribute_not_present"}
    assert "recommended_attribute_not_present" in r.by_id()
    with pytest.raises(ValueError, match="Unknown finding id"):
        WeaverValidator(small_registry, cache_dir=session_cache, exclude={"nope"})
    with pytest.raises(ValueError, match="finding level"):
        WeaverValidator(small_registry, cache_dir=session_cache, min_level="severe")


def test_metric_checks(v):
    ok = v.validate_metric("v2.latency", {"v2.size": 3}, instrument="histogram", unit="s")
    assert ok.findings == [] and ok.group == "metric.v2.latency"
    bad = v.validate_metric("v2.latency", {}, instrument="counter", unit="ms")
    assert ids(bad) == Counter({("unexpected_instrument", None): 1, ("unit_mismatch", None): 1,
                                ("recommended_attribute_not_present", "v2.size"): 1})
    unit = next(f for f in bad.findings if f.id == "unit_mismatch")
    assert unit.context == {"unit": "ms", "expected": "s"}
    assert unit.message == "Unit should be 's', but found 'ms'."
    assert next(f for f in bad.findings if f.id == "unexpected_instrument").context == {
        "instrument": "counter", "expected": "histogram"}
    missing = v.validate_metric("no.such.metric", {"t.str": "x"})
    assert ids(missing) == Counter({("missing_metric", None): 1})
    assert missing.findings[0].context == {"metric_name": "no.such.metric"}
    dev = v.validate_metric("test.requests", {"t.code": 0}, instrument=knhk.MetricKind.COUNTER)
    assert ids(dev) == Counter({("not_stable", None): 1, ("not_stable", "t.code"): 1})


# -- batches -----------------------------------------------------------------------------------


def test_batch_rows_match_per_event_results(v):
    attrs = [
        {"t.str": "x", "t.int": 1},
        {"t.color": "blue", "nope": 1},
        {},
        {"t.strs": ["a", 2], "t.header.h": "v", "t.old": "o"},
        {"t.code": 5, "t.dbl": 3},
    ]
    names = ["test.op", "test.op", "v2.op", "other", "test.op"]
    batch = knhk.SpanBatch.from_spans([_span(i + 1, n, a) for i, (n, a)
                                       in enumerate(zip(names, attrs, strict=True))])
    report = v.validate_batch(batch)
    assert report.num_rows == 5
    for row, (name, a) in enumerate(zip(names, attrs, strict=True)):
        single = v.validate_span(name, a)
        assert Counter((f.id, f.attribute_key) for f in report.findings(row)) == ids(single)
        assert bool(report.invalid[row]) == (not single.is_valid())
        assert report.group_of(row) == single.group
        levels = [f.level for f in single.findings]
        assert report.row_level[row] == (max(levels) if levels else 0)
        assert report.row_violations[row] == len(single.violations)
    table = report.table()
    assert table.num_rows == report.num_findings == sum(report.counts.values())
    assert sorted(table.column("row").to_pylist()) == table.column("row").to_pylist()
    assert Counter(table.column("id").to_pylist()) == Counter(report.counts)
    assert report.level_counts()["violation"] == report.num_violations
    np.testing.assert_array_equal(report.rows_with("violation"), report.invalid)


def test_sliced_batch(v):
    spans = [_span(i + 1, "test.op", {"t.str": "x"} if i % 2 else {"nope": i})
             for i in range(10)]
    batch = knhk.SpanBatch.from_spans(spans)
    whole = v.validate_batch(batch)
    part = v.validate_batch(batch.slice(3, 4))
    np.testing.assert_array_equal(part.row_level, whole.row_level[3:7])
    assert [len(part.findings(r)) for r in range(4)] == \
        [len(whole.findings(r)) for r in range(3, 7)]


def test_batch_input_forms(v):
    batch = knhk.SpanBatch.from_spans([_span(1, "test.op", {"t.str": "x"})])
    a = v.validate_batch(batch)
    b = v.validate_batch(batch.record_batch)
    c = v.validate_batch(pa.Table.from_batches([batch.record_batch]))
    assert a.counts == b.counts == c.counts
    with pytest.raises(SchemaError, match="span batch"):
        v.validate_batch(pa.record_batch({"x": [1]}))
    with pytest.raises(TypeError):
        v.validate_batch([1, 2])


def test_empty_batches(v):
    report = v.validate_batch(knhk.SpanBatch.empty())
    assert report.num_rows == 0 and report.counts == {} and report.table().num_rows == 0
    assert report.is_valid()
    empty_metrics = pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA)
    assert v.validate_batch(knhk.MetricBatch(empty_metrics)).num_rows == 0


def test_resource_attributes_source(small_registry, session_cache):
    both = WeaverValidator(small_registry, cache_dir=session_cache,
                           sources=("attributes", "resource_attributes"))
    span = knhk.Span("test.op", trace_id=1, span_id=1, attributes={"t.str": "x"},
                     resource_attributes={"service.name": "svc", "t.int": 4})
    report = both.validate_batch(knhk.SpanBatch.from_spans([span]))
    table = report.table().to_pylist()
    res = {(r["id"], r["attribute_key"]) for r in table if r["source"] == "resource_attributes"}
    assert res == {("missing_attribute", "service.name")}
    with pytest.raises(ValueError, match="sources"):
        WeaverValidator(small_registry, cache_dir=session_cache, sources=("events",))


def test_metric_batch(v):
    from knhk.metrics import MetricBuffer

    buf = MetricBuffer(16, 64, "svc")
    buf.append(knhk.MetricPoint("v2.latency", kind=knhk.MetricKind.HISTOGRAM, unit="s",
                                attributes={"v2.size": 1}, bounds=[1.0], bucket_counts=[1, 0],
                                sum=1.0))
    buf.append(knhk.MetricPoint("v2.latency", 1.0, kind=knhk.MetricKind.GAUGE, unit="ms"))
    buf.append(knhk.MetricPoint("nope", 1.0))
    buf.seal()
    (rb,) = list(buf.drain(0.0))
    report = v.validate_batch(knhk.MetricBatch(rb))
    assert report.signal_type == "metric"
    assert [sorted(f.id for f in report.findings(r)) for r in range(3)] == [
        [],
        ["recommended_attribute_not_present", "unexpected_instrument", "unit_mismatch"],
        ["missing_metric"],
    ]
    assert report.findings(1)[0].signal_name == "v2.latency"


def test_bad_row_does_not_stop_the_batch(v):
    """A corrupt entry (a type tag outside AttrType, a key index outside the
    dictionary) marks its own row; the other rows are checked as usual."""
    batch = knhk.SpanBatch.from_spans([_span(i + 1, "test.op", {"t.str": "x", "t.int": i})
                                       for i in range(4)])
    rb = batch.record_batch
    lists = rb.column("attributes")
    values = lists.values
    tags = values.field("type").to_numpy().copy()
    tags[2] = 42                              # row 1's first attribute
    keys = values.field("key")
    key_idx = keys.indices.to_numpy().copy()
    key_idx[7] = 99                           # row 3's second attribute
    children = [pa.DictionaryArray.from_arrays(pa.array(key_idx), keys.dictionary,
                                               safe=False), pa.array(tags)] + \
        [values.field(i) for i in range(2, values.type.num_fields)]
    struct = pa.StructArray.from_arrays(children, fields=list(values.type))
    bad_lists = pa.ListArray.from_arrays(lists.offsets, struct, type=lists.type)
    bad = pa.RecordBatch.from_arrays(
        [bad_lists if n == "attributes" else rb.column(n) for n in rb.schema.names],
        schema=rb.schema)
    report = v.validate_batch(bad)
    per_row = [sorted(f.id for f in report.findings(r) if f.level is FindingLevel.VIOLATION)
               for r in range(4)]
    assert per_row == [[], ["invalid_attribute_value"], [], ["invalid_attribute_value"]]
    assert report.invalid.tolist() == [False, True, False, True]


# -- stats ---------------------------------------------------------------------------------------


def test_stats(small_registry, session_cache):
    v = WeaverValidator(small_registry, cache_dir=session_cache)
    v.validate_span("test.op", {"t.str": "x"})
    v.validate_span("test.op", {})                            # 1 violation
    batch = knhk.SpanBatch.from_spans(
        [_span(1, "a", {"x": 1, "y": 2}), _span(2, "b", {"z": 1}), _span(3, "a", {"t.str": "s"})])
    v.validate_batch(batch)                                   # a: 2, b: 1
    s = v.stats()
    assert s.total_validations == 5 and s.batches_validated == 1
    assert s.total_violations == 4 and s.invalid_events == 3
    assert s.violations_by_type == {"missing_attribute": 3, "required_attribute_not_present": 1}
    assert s.most_violated_spans == [("a", 2), ("b", 1), ("test.op", 1)]
    assert s.findings_by_type["recommended_attribute_not_present"] == 2
    v.reset_stats()
    assert v.stats().total_validations == 0


# -- reload ----------------------------------------------------------------------------------------


def test_reload_on_call_and_when_files_change(tmp_path, cache_dir):
    root = write_registry(tmp_path / "reg", {"r.yaml": SMALL_V1})
    v = WeaverValidator(root, cache_dir=cache_dir)
    assert v.validate_attributes({"v2.size": 1}).by_id() == {"missing_attribute": 1}
    assert v.check_for_changes() is False
    write_registry(root, {"v2.yaml": SMALL_V2})
    assert v.check_for_changes() is True
    assert v.validate_attributes({"v2.size": 1}).findings == []
    assert v.stats().reloads == 1
    # a broken edit keeps the previous registry, and is reported
    (root / "v2.yaml").write_text("attributes: [oops")
    assert v.check_for_changes() is False
    assert v.validate_attributes({"v2.size": 1}).findings == []
    with pytest.raises(RegistryError):
        v.reload()
    assert "malformed YAML" in v.stats().last_reload_error
    (root / "v2.yaml").unlink()
    assert v.reload(root) is True              # content changed: back to SMALL_V1 alone
    assert v.stats().last_reload_error is None
    assert v.reload() is False                 # same content again


def test_watch_reloads_in_the_background(tmp_path, cache_dir):
    root = write_registry(tmp_path / "reg", {"r.yaml": SMALL_V1})
    v = WeaverValidator(root, cache_dir=cache_dir, watch=0.02)
    try:
        write_registry(root, {"v2.yaml": SMALL_V2})
        deadline = time.monotonic() + 10
        while v.validate_attributes({"v2.size": 1}).findings and time.monotonic() < deadline:
            time.sleep(0.02)
        assert v.validate_attributes({"v2.size": 1}).findings == []
    finally:
        v.close()
    assert v._watcher is None


def test_reload_is_atomic_under_concurrent_validation(tmp_path, cache_dir):
    """Batches validated while another thread reloads see either registry whole,
    never a mix: with A, t.str is known and v2.size unknown; with B the reverse."""
    a = write_registry(tmp_path / "a", {"r.yaml": SMALL_V1})
    b = write_registry(tmp_path / "b", {"r.yaml": SMALL_V2.replace(
        "ref: t.str", "ref: v2.size").replace("ref: t.color", "ref: v2.size")})
    v = WeaverValidator(a, cache_dir=cache_dir)
    batch = knhk.SpanBatch.from_spans([_span(i + 1, "x", {"t.str": "s", "v2.size": 1})
                                       for i in range(200)])
    seen, stop, errors = set(), threading.Event(), []

    def validate():
        while not stop.is_set():
            c = v.validate_batch(batch).counts.get("missing_attribute", 0)
            seen.add(c)
            if c != 200:
                errors.append(c)

    t = threading.Thread(target=validate)
    t.start()
    try:
        for i in range(20):
            v.reload(b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join()
    assert errors == [] and seen == {200}


def test_validator_from_model_and_compiled(small_registry):
    reg = load_registry(small_registry)
    for source in (reg, CompiledRegistry.from_registry(reg)):
        v = WeaverValidator(source)
        assert v.validate_span("test.op", {}).by_id()["required_attribute_not_present"] == 1
        assert v.registry.group("test.op") is not None
    with pytest.raises(TypeError):
        WeaverValidator(42)


def test_span_group_requirements_are_not_checked_against_resource_attributes(knhk_registry_path):
    span = knhk.Span("workflow.execute", trace_id=1, span_id=1,
                     attributes={"workflow.id": "w-1", "workflow.pattern": "sequence"},
                     resource_attributes={"service.name": "svc"})
    batch = knhk.SpanBatch.from_spans([span])
    for sources in (("attributes",), ("resource_attributes",),
                    ("attributes", "resource_attributes")):
        report = WeaverValidator(knhk_registry_path, sources=sources).validate_batch(batch)
        assert "required_attribute_not_present" not in report.counts, sources


def test_violations_by_span_name_stay_bounded(small_registry):
    from knhk.validation import validator as vmod

    v = WeaverValidator(small_registry)
    n = vmod._MAX_NAMES + 500
    spans = [knhk.Span(f"GET /users/{i}", trace_id=i + 1, span_id=i + 1,
                       attributes={"no.such.attribute": 1}) for i in range(n)]
    v.validate_batch(knhk.SpanBatch.from_spans(spans))
    assert len(v._by_name) <= vmod._MAX_NAMES
    assert v.stats().total_violations >= n
