"""SpanBatch, coerce_spans and ``record_batch``: every input form, every bad column.

Expected values are computed here from the raw input (ids as big-endian ints,
times as plain integers), never by the code under test.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import knhk
from knhk import AttrType, SchemaError, Span, SpanBatch
from knhk.batch import coerce_spans, trace_id_low64

N = 6


def _ids(values, width: int) -> np.ndarray:
    """Big-endian ``width``-byte ids as an (n, width) uint8 array."""
    return np.array([int(v).to_bytes(width, "big") for v in values], dtype=f"S{width}") \
        .view(np.uint8).reshape(-1, width)


def numpy_columns(n: int = N) -> dict:
    ids = np.arange(1, n + 1)
    return {
        "trace_id": _ids(ids * 1000 + 7, 16),
        "span_id": _ids(ids, 8),
        "name": np.array([f"op{i % 3}" for i in range(n)]),
        "start_time_ns": np.arange(n, dtype=np.int64) * 100,
        "end_time_ns": np.arange(n, dtype=np.int64) * 100 + 50,
    }


def expected_rows(n: int = N) -> dict:
    return {
        "trace_id": [int(i * 1000 + 7).to_bytes(16, "big") for i in range(1, n + 1)],
        "span_id": [int(i).to_bytes(8, "big") for i in range(1, n + 1)],
        "name": [f"op{i % 3}" for i in range(n)],
        "start_time_ns": [i * 100 for i in range(n)],
        "end_time_ns": [i * 100 + 50 for i in range(n)],
    }


def assert_coerced(data, n: int = N) -> pa.RecordBatch:
    rb, invalid = coerce_spans(data, default_service="svc")
    assert rb.schema.equals(knhk.SPAN_SCHEMA)
    rb.validate(full=True)
    assert not invalid.any()
    want = expected_rows(n)
    for name, values in want.items():
        assert rb.column(name).to_pylist() == values, name
    assert rb.column("service").to_pylist() == ["svc"] * n
    assert rb.column("kind").to_pylist() == [1] * n          # INTERNAL by default
    assert rb.column("status_code").to_pylist() == [0] * n
    assert rb.column("parent_span_id").null_count == n
    return rb


# -- accepted input forms ------------------------------------------------------------


def test_dict_of_numpy_columns():
    assert_coerced(numpy_columns())


def test_ids_as_fixed_width_bytes_arrays():
    cols = numpy_columns()
    cols["trace_id"] = cols["trace_id"].copy().view("S16").ravel()
    cols["span_id"] = cols["span_id"].copy().view("S8").ravel()
    assert_coerced(cols)


def test_arrow_record_batch_with_plain_utf8():
    cols = numpy_columns()
    rb = pa.RecordBatch.from_pydict({
        "trace_id": pa.array(expected_rows()["trace_id"], pa.binary(16)),
        "span_id": pa.array(expected_rows()["span_id"], pa.binary()),   # variable width
        "name": pa.array(cols["name"].tolist(), pa.string()),
        "start_time_ns": pa.array(cols["start_time_ns"]),
        "end_time_ns": pa.array(cols["end_time_ns"]),
    })
    assert_coerced(rb)


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string(),
                                         pa.dictionary(pa.int8(), pa.string()),
                                         pa.dictionary(pa.int32(), pa.large_string())])
def test_string_columns_plain_or_dictionary(string_type):
    cols = numpy_columns()
    names = pa.array(cols["name"].tolist())
    cols["name"] = names.dictionary_encode().cast(string_type) \
        if pa.types.is_dictionary(string_type) else names.cast(string_type)
    cols["service"] = pa.array(["svc"] * N).cast(cols["name"].type)
    assert_coerced(cols)


def test_table_with_chunks_and_different_dictionaries():
    want = expected_rows()
    chunks = []
    for lo, hi in ((0, 2), (2, 3), (3, N)):
        names = want["name"][lo:hi]
        # A different dictionary per chunk: reversed order, plus an unused entry.
        dictionary = pa.array([*sorted(set(names), reverse=lo % 2 == 0), f"unused{lo}"])
        indices = pa.array([dictionary.to_pylist().index(x) for x in names], pa.int32())
        chunks.append(pa.RecordBatch.from_pydict({
            "trace_id": pa.array(want["trace_id"][lo:hi], pa.binary(16)),
            "span_id": pa.array(want["span_id"][lo:hi], pa.binary(8)),
            "name": pa.DictionaryArray.from_arrays(indices, dictionary),
            "start_time_ns": pa.array(want["start_time_ns"][lo:hi], pa.int64()),
            "end_time_ns": pa.array(want["end_time_ns"][lo:hi], pa.int64()),
        }))
    table = pa.Table.from_batches(chunks)
    assert table.column("name").num_chunks == 3
    assert_coerced(table)


def test_table_of_sealed_batches_keeps_attributes():
    b1 = SpanBatch.from_spans([Span("x", trace_id=1, span_id=1, start_time_ns=0,
                                    attributes={"k1": 1, "k": "v1"}, service="s1")])
    b2 = SpanBatch.from_spans([
        Span("y", trace_id=2, span_id=2, start_time_ns=0, attributes={"k": "v2", "k1": 2},
             service="s2"),
        Span("x", trace_id=3, span_id=3, start_time_ns=0, attributes={"k": 5.5})])
    rb, invalid = coerce_spans(pa.Table.from_batches([b1.record_batch, b2.record_batch]))
    assert not invalid.any()
    batch = SpanBatch(rb)
    assert batch.column("name").to_pylist() == ["x", "y", "x"]
    assert batch.column("service").to_pylist() == ["s1", "s2", "unknown_service"]
    assert batch.attribute("k1").to_pylist() == [1, 2, None]
    assert batch.attribute_values("k") == ["v1", "v2", 5.5]


def test_duration_instead_of_end_time():
    cols = numpy_columns()
    del cols["end_time_ns"]
    cols["duration_ns"] = np.full(N, 50, dtype=np.int32)
    assert_coerced(cols)


@pytest.mark.parametrize("form", ["numpy ns", "numpy us", "arrow ns utc", "arrow ms"])
def test_timestamp_columns(form):
    cols = numpy_columns()
    start = cols["start_time_ns"].astype("datetime64[ns]")
    end = cols["end_time_ns"].astype("datetime64[ns]")
    if form == "numpy ns":
        cols["start_time_ns"], cols["end_time_ns"] = start, end
    elif form == "numpy us":
        # 100 ns steps do not survive microseconds: use whole microseconds.
        cols["start_time_ns"] = (cols["start_time_ns"] * 1000).astype("datetime64[ns]") \
            .astype("datetime64[us]")
        cols["end_time_ns"] = (cols["end_time_ns"] * 1000).astype("datetime64[ns]") \
            .astype("datetime64[us]")
    elif form == "arrow ns utc":
        cols["start_time_ns"] = pa.array(start).cast(pa.timestamp("ns", "UTC"))
        cols["end_time_ns"] = pa.array(end).cast(pa.timestamp("ns", "UTC"))
    else:
        cols["start_time_ns"] = pa.array(cols["start_time_ns"] * 10**6, pa.int64()) \
            .cast(pa.timestamp("ns")).cast(pa.timestamp("ms"))
        cols["end_time_ns"] = pa.array(cols["end_time_ns"] * 10**6, pa.int64()) \
            .cast(pa.timestamp("ns")).cast(pa.timestamp("ms"))
    rb, invalid = coerce_spans(cols)
    scale = {"numpy ns": 1, "numpy us": 1000, "arrow ns utc": 1, "arrow ms": 10**6}[form]
    assert rb.column("start_time_ns").type == pa.int64()
    assert rb.column("start_time_ns").to_pylist() == \
        [v * scale for v in expected_rows()["start_time_ns"]]
    assert rb.column("end_time_ns").to_pylist() == \
        [v * scale for v in expected_rows()["end_time_ns"]]
    assert not invalid.any()


def test_optional_columns_are_taken():
    cols = numpy_columns()
    cols["parent_span_id"] = pa.array([None, *expected_rows()["span_id"][:-1]], pa.binary(8))
    cols["kind"] = np.array([0, 1, 2, 3, 4, 5], dtype=np.int64)
    cols["status_code"] = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    cols["status_message"] = pa.array([None, None, "boom", None, None, "bang"])
    cols["service"] = np.array(["a", "b", "a", "b", "a", "b"])
    cols["attributes"] = [{"http.status": 200}, None, {"ok": True}, {}, {"x": [1]},
                          {"y": b"z"}]
    rb, invalid = coerce_spans(cols)
    assert not invalid.any()
    assert rb.column("parent_span_id").to_pylist()[1:] == expected_rows()["span_id"][:-1]
    assert rb.column("kind").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert rb.column("status_code").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert rb.column("service").to_pylist() == ["a", "b"] * 3
    batch = SpanBatch(rb)
    assert batch.attribute("http.status").to_pylist() == [200, None, None, None, None, None]
    assert batch.attribute_values("y")[5] == b"z"


# -- bad columns ---------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["trace_id", "span_id", "name", "start_time_ns",
                                     "end_time_ns"])
def test_missing_column_is_named(missing):
    cols = numpy_columns()
    del cols[missing]
    with pytest.raises(SchemaError, match=missing):
        coerce_spans(cols)


@pytest.mark.parametrize(("column", "bad"), [
    ("trace_id", np.arange(N, dtype=np.int64)),
    ("trace_id", pa.array(np.arange(N, dtype=np.int64))),
    ("trace_id", np.zeros((N, 8), np.uint8)),
    ("span_id", np.arange(N, dtype=np.float64)),
    ("span_id", np.zeros((N, 16), np.uint8)),
    ("name", np.arange(N)),
    ("name", pa.array(np.arange(N))),
    ("service", pa.array([1.5] * N)),
    ("start_time_ns", np.arange(N, dtype=np.float64)),
    ("start_time_ns", pa.array([str(i) for i in range(N)])),
    ("end_time_ns", pa.array([float(i) for i in range(N)])),
    ("kind", np.ones(N, dtype=np.float32)),
    ("status_code", pa.array(["ok"] * N)),
    ("attributes", pa.array(np.arange(N))),
], ids=lambda v: getattr(v, "dtype", getattr(v, "type", v)).__str__())
def test_mistyped_column_is_named(column, bad):
    cols = numpy_columns()
    cols[column] = bad
    with pytest.raises(SchemaError, match=column):
        coerce_spans(cols)


@pytest.mark.parametrize(("column", "values"), [
    ("kind", [1, 1, 6, 1, 1, 1]), ("kind", [-1, 1, 1, 1, 1, 1]), ("kind", [1, 300, 1, 1, 1, 1]),
    ("status_code", [0, 0, 0, 0, 0, 3]),
])
def test_enum_columns_out_of_range(column, values):
    cols = numpy_columns()
    cols[column] = np.array(values, dtype=np.int64)
    with pytest.raises(SchemaError, match=column):
        coerce_spans(cols)


def test_unknown_column_and_ragged_lengths():
    cols = numpy_columns()
    cols["nmae"] = cols["name"]
    with pytest.raises(SchemaError, match="nmae"):
        coerce_spans(cols)
    cols = numpy_columns()
    cols["name"] = cols["name"][:-1]
    with pytest.raises(SchemaError, match="length"):
        coerce_spans(cols)
    with pytest.raises(SchemaError, match="record_batch takes"):
        coerce_spans([{"name": "op"}])


def test_enum_range_checked_for_batches_already_in_span_schema():
    rb = SpanBatch.from_spans([Span("op", trace_id=1, span_id=1, start_time_ns=0)]).record_batch
    i = rb.schema.get_field_index("kind")
    bad = rb.set_column(i, rb.schema.field(i), pa.array([9], pa.int8()))
    assert bad.schema.equals(knhk.SPAN_SCHEMA)
    with pytest.raises(SchemaError, match="kind"):
        coerce_spans(pa.Table.from_batches([bad]))   # rejected as a Table ...
    with pytest.raises(SchemaError, match="kind"):
        coerce_spans(bad)                            # ... and must be as a RecordBatch


def test_empty_inputs_are_fine(pipeline_factory):
    p = pipeline_factory()
    cols = {"trace_id": np.zeros((0, 16), np.uint8), "span_id": np.zeros((0, 8), np.uint8),
            "name": np.array([], dtype=str), "start_time_ns": np.zeros(0, np.int64),
            "duration_ns": np.zeros(0, np.int64)}
    assert p.record_batch(cols) == 0
    assert p.record_batch(SpanBatch.empty()) == 0
    assert p.record_batch(pa.table(cols | {"trace_id": pa.array([], pa.binary(16)),
                                           "span_id": pa.array([], pa.binary(8))})) == 0
    assert p.stats().events_received == 0


def test_bad_attribute_value_names_row_and_key():
    cols = numpy_columns()
    cols["attributes"] = [None, None, {"k": object()}, None, None, None]
    with pytest.raises(TypeError, match=r"attributes\[2\].*'k'"):
        coerce_spans(cols)


# -- invalid rows ----------------------------------------------------------------------


def _with_invalid_rows() -> tuple[dict, list[int]]:
    cols = numpy_columns()
    cols["trace_id"][1] = 0                                   # all-zero trace id
    cols["span_id"] = pa.array([*expected_rows()["span_id"][:3], None,
                                *expected_rows()["span_id"][4:]], pa.binary(8))  # null id
    cols["end_time_ns"] = cols["end_time_ns"].copy()
    cols["end_time_ns"][5] = cols["start_time_ns"][5] - 1     # ends before it starts
    return cols, [1, 3, 5]


def test_invalid_rows_are_flagged_not_raised():
    cols, bad = _with_invalid_rows()
    rb, invalid = coerce_spans(cols)
    assert np.flatnonzero(invalid).tolist() == bad
    rb.validate(full=True)
    with pytest.raises(SchemaError, match="invalid"):
        SpanBatch(cols)


def test_record_batch_drops_and_counts_invalid_rows(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink))
    cols, bad = _with_invalid_rows()
    assert p.record_batch(cols) == N - len(bad)
    assert p.force_flush(5)
    spans = sink.spans()
    good = [i for i in range(N) if i not in bad]
    assert spans.column("span_id").to_pylist() == [expected_rows()["span_id"][i] for i in good]
    stats = p.stats()
    assert stats.dropped_by_reason.get("invalid") == len(bad)
    assert stats.events_received == N
    assert stats.events_processed == N - len(bad)


def test_record_batch_copies_numpy_input(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink))
    cols = numpy_columns()
    cols["span_id"] = cols["span_id"].copy().view("S8").ravel()   # ids as 'S8' here
    cols["duration_ns"] = cols.pop("end_time_ns") - cols["start_time_ns"]
    cols["kind"] = np.full(N, 2, dtype=np.int8)
    assert p.record_batch(cols) == N
    # Mutate every caller array after the call, before the batch is even sealed.
    cols["trace_id"][:] = 0xEE
    cols["span_id"][:] = b"\xee" * 8
    cols["name"][:] = "mutated"
    cols["start_time_ns"][:] = -1
    cols["duration_ns"][:] = 123
    cols["kind"][:] = 5
    assert p.force_flush(5)
    rb = sink.spans().record_batch
    want = expected_rows()
    for name in ("trace_id", "span_id", "name", "start_time_ns", "end_time_ns"):
        assert rb.column(name).to_pylist() == want[name], name
    assert rb.column("kind").to_pylist() == [2] * N


def test_bad_record_batch_loses_nothing_accepted_before(pipeline_factory, make_span):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink).with_batch_size(4))
    assert p.record_span(make_span(100))
    assert p.record_batch(numpy_columns()) == N
    bad = numpy_columns()
    bad["name"] = np.arange(N)
    with pytest.raises(SchemaError, match="name"):
        p.record_batch(bad)
    assert p.record_span(make_span(101))
    assert p.force_flush(5)
    ids = sink.spans().column("span_id").to_pylist()
    assert sorted(ids) == sorted(expected_rows()["span_id"] + [(100).to_bytes(8, "big"),
                                                                (101).to_bytes(8, "big")])
    stats = p.stats()
    assert stats.events_received == N + 2 and stats.events_dropped == 0


def test_record_batch_splits_into_batch_size(pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_exporter(sink).with_batch_size(4))
    assert p.record_batch(numpy_columns(10)) == 10
    assert p.force_flush(5)
    sizes = [b.num_rows for b in sink.span_batches()]
    assert sum(sizes) == 10 and max(sizes) <= 4


# -- SpanBatch ----------------------------------------------------------------------------


def _mixed_batch() -> SpanBatch:
    return SpanBatch.from_spans([
        Span("a", trace_id=1, span_id=1, start_time_ns=0, duration_ns=5,
             attributes={"n": 1, "s": "x", "dup": 1}),
        Span("b", trace_id=1, span_id=2, start_time_ns=10, duration_ns=7,
             attributes={"n": 2.5, "s": 3}),
        Span("c", trace_id=1, span_id=3, start_time_ns=20, duration_ns=0),
        Span("d", trace_id=1, span_id=4, start_time_ns=30, duration_ns=1,
             attributes={"n": 4, "s": "y"}),
    ])


def test_attribute_merges_int_and_double():
    col = _mixed_batch().attribute("n")
    assert col.type == pa.float64()
    assert col.to_pylist() == [1.0, 2.5, None, 4.0]


def test_attribute_of_mixed_types_needs_a_type():
    batch = _mixed_batch()
    with pytest.raises(SchemaError, match=r"'s'.*(STRING.*INT|INT.*STRING)"):
        batch.attribute("s")
    assert batch.attribute("s", type=AttrType.STRING).to_pylist() == ["x", None, None, "y"]
    assert batch.attribute("s", type=AttrType.INT).to_pylist() == [None, 3, None, None]


def test_attribute_of_missing_key_is_all_null():
    col = _mixed_batch().attribute("nope")
    assert len(col) == 4 and col.null_count == 4


def test_attribute_on_slices_and_filters():
    batch = _mixed_batch()
    assert batch.slice(1, 3).attribute("n").to_pylist() == [2.5, None, 4.0]
    assert batch.slice(3).attribute("s").to_pylist() == ["y"]
    kept = batch.filter(np.array([False, True, False, True]))
    assert kept.attribute("n").to_pylist() == [2.5, 4.0]
    assert batch.take([3, 0]).attribute("s", type=AttrType.STRING).to_pylist() == ["y", "x"]
    assert batch.slice(1, 2).attribute("dup").null_count == 2


def test_attribute_source_must_be_known():
    with pytest.raises(ValueError, match="source"):
        _mixed_batch().attribute("n", source="events")


def test_concat_duration_and_arrow_interop():
    batch = _mixed_batch()
    both = SpanBatch.concat([batch.slice(0, 2), batch.slice(2).record_batch])
    assert both.to_pylist() == batch.to_pylist()
    assert both.attribute("n").to_pylist() == [1.0, 2.5, None, 4.0]
    assert batch.duration_ns().tolist() == [5, 7, 0, 1]
    assert pa.table(batch).num_rows == 4
    assert pa.record_batch(batch).num_rows == 4
    assert SpanBatch.empty().num_rows == 0 and SpanBatch.concat([]).num_rows == 0
    assert len(batch) == 4 and "4" in repr(batch)


def test_span_batch_is_read_only():
    batch = _mixed_batch()
    with pytest.raises(AttributeError):
        batch.x = 1
    buf = batch.column("start_time_ns").buffers()[1]
    view = np.frombuffer(buf, dtype=np.int64)
    assert not view.flags.writeable


def test_trace_id_low64_is_big_endian_low_half():
    ids = [int.from_bytes(bytes(range(i, i + 16)), "big") for i in range(5)]
    arr = pa.array([i.to_bytes(16, "big") for i in ids], pa.binary(16))
    want = [i & (2**64 - 1) for i in ids]
    assert trace_id_low64(arr).tolist() == want
    assert trace_id_low64(arr.slice(2)).tolist() == want[2:]
    assert trace_id_low64(arr).dtype == np.uint64


def test_metric_batch_takes_only_metric_schema():
    with pytest.raises(SchemaError):
        knhk.MetricBatch(_mixed_batch().record_batch)
    mb = knhk.MetricBatch(pa.RecordBatch.from_pylist([], schema=knhk.METRIC_SCHEMA))
    assert mb.num_rows == 0


def test_invalid_rows_helper_handles_sliced_id_columns():
    rb = SpanBatch.from_spans([Span("a", trace_id=i, span_id=i, start_time_ns=0)
                               for i in range(1, 5)]).record_batch
    cols = {name: rb.column(name).slice(1) for name in ("trace_id", "span_id", "name",
                                                        "start_time_ns", "end_time_ns")}
    out, invalid = coerce_spans(cols)
    assert not invalid.any()
    assert pc.equal(out.column("span_id"), rb.column("span_id").slice(1)).to_pylist() == \
        [True] * 3


def test_an_all_null_parent_column_means_all_roots():
    batch = knhk.SpanBatch({"trace_id": [b"\x01" * 16, b"\x02" * 16],
                            "span_id": [b"\x01" * 8, b"\x02" * 8],
                            "parent_span_id": [None, None], "name": ["a", "b"],
                            "start_time_ns": [0, 5], "end_time_ns": [1, 9]})
    assert batch.column("parent_span_id").null_count == 2
    assert batch.column("parent_span_id").type == knhk.SPAN_SCHEMA.field("parent_span_id").type
