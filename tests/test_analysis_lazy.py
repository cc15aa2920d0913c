"""knhk.analysis, lazy datasets: every analysis streamed from the files equals the eager one.

The eager Dataset (every batch read at open, the path tests/test_analysis.py
checks against pandas / DuckDB / NumPy) is the reference here; the damage
tests compare the lazy reader's errors with knhk.replay's reader on the same
bytes.
"""

from __future__ import annotations

import glob
import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import knhk
from knhk import analysis
from knhk.analysis import Dataset, open_dataset
from knhk.errors import CorruptFileError
from knhk.exporters.ipc import IpcExporter
from knhk.replay import read_batches
from knhk.workload import WorkloadConfig, generate

REGISTRY = os.path.join(os.path.dirname(__file__), os.pardir, "registry")


def record(directory, batches, **kwargs) -> list[str]:
    rec = IpcExporter(directory, **kwargs)
    for b in batches:
        assert rec.export(b) is knhk.ExportResult.SUCCESS
    rec.shutdown()
    return rec.files


def cut(batch: knhk.SpanBatch, sizes: list[int]) -> list[knhk.SpanBatch]:
    """``batch`` in pieces of these sizes (cycled): pieces split traces."""
    out, off, i = [], 0, 0
    while off < batch.num_rows:
        n = sizes[i % len(sizes)]
        out.append(batch.slice(off, n))
        off += n
        i += 1
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Three files from two workloads; batches split traces and come out of time order."""
    root = tmp_path_factory.mktemp("lazy")
    a = generate(3000, WorkloadConfig(seed=1, error_rate=0.05))
    b = generate(2000, WorkloadConfig(seed=2, error_rate=0.2))
    pieces = cut(a, [700, 333, 911])
    pieces[1], pieces[3] = pieces[3], pieces[1]  # a batch of earlier spans after later ones
    record(root, pieces[:3], prefix="a")
    record(root, pieces[3:], prefix="b")
    record(root, cut(b, [512]), prefix="c")
    return str(root)


@pytest.fixture(scope="module")
def eager(recording):
    return open_dataset(recording, lazy=False)


@pytest.fixture
def lazy(recording):
    return open_dataset(recording, lazy=True)


def same_summary(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pa.Table):
            assert a[k].equals(b[k]), (k, a[k], b[k])
        else:
            assert a[k] == b[k], k


def sorted_windows(t: pa.Table) -> pa.Table:
    """Rows by window, then key (the columns between ``window_end`` and ``count``)."""
    keys = t.column_names[:t.column_names.index("count")]
    return t.sort_by([(k, "ascending") for k in keys])


# -- opening ------------------------------------------------------------------------------


def test_a_lazy_open_reads_no_batch(recording):
    ds = open_dataset(recording, lazy=True)
    assert ds.lazy and not ds._scanner.indexed
    assert "not read yet" in repr(ds) and "3 files" in repr(ds)
    assert ds.num_rows == 5000
    assert ds._scanner.indexed and "5,000 spans" in repr(ds)


def test_size_decides_between_eager_and_lazy(recording, monkeypatch):
    assert not open_dataset(recording).lazy  # small: read at open, as always
    monkeypatch.setattr(analysis, "LAZY_THRESHOLD_BYTES", 0)
    assert open_dataset(recording).lazy
    assert not open_dataset(recording, lazy=False).lazy


def test_bad_options_name_what_is_wrong(recording):
    with pytest.raises(ValueError, match="no span column named 'nope'"):
        open_dataset(recording, columns=["service", "nope"])
    with pytest.raises(TypeError, match="not a string"):
        open_dataset(recording, columns="service")
    with pytest.raises(ValueError, match=r"start .* before end"):
        open_dataset(recording, start=10, end=10)
    with pytest.raises(ValueError, match="naive datetime"):
        open_dataset(recording, start=datetime(2025, 1, 1))
    with pytest.raises(TypeError, match="lazy must be"):
        open_dataset(recording, lazy="yes")
    with pytest.raises(ValueError, match="trace_partitions"):
        open_dataset(recording, trace_partitions=0)


# -- every analysis, lazy == eager -----------------------------------------------------------


def test_summary_and_operations_equal_the_eager_ones(eager, lazy):
    same_summary(eager.summary(), lazy.summary())
    assert lazy.operations().equals(eager.operations())
    assert lazy._repr_html_() == eager._repr_html_()
    assert lazy.num_rows == len(lazy) == eager.num_rows
    assert np.array_equal(lazy.duration_ns(), eager.duration_ns())


@pytest.mark.parametrize("window, options", [
    (1.0, {}),
    (2.0, {"group_by": ("service",), "quantiles": (0.5, 0.99)}),
    (knhk.WindowConfig.sliding(size=4.0, slide=1.0), {"group_by": ("service",)}),
    (1.0, {"mode": "sketch"}),
    (1.0, {"group_by": ("attributes.http.request.method",)}),
])
def test_windows_equal_the_eager_ones(eager, lazy, window, options):
    a = eager.windows(window, **options)
    b = lazy.windows(window, **options)
    assert b.num_rows == a.num_rows > 0
    a, b = sorted_windows(a), sorted_windows(b)
    if options.get("mode") != "sketch":
        assert b.equals(a)
        return
    # a sketch window adds float milliseconds in arrival order: sums may differ in the last bit
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        assert y == (pytest.approx(x, rel=1e-12) if name in ("sum", "avg") else x), name


def test_processing_time_windows_are_refused_lazily(lazy):
    with pytest.raises(ValueError, match="processing-time"):
        lazy.windows(knhk.WindowConfig.tumbling(seconds=1.0, processing_time=True))


def test_validation_counts_equal_the_eager_report(eager, lazy):
    a = eager.validate(REGISTRY)
    b = lazy.validate(REGISTRY)
    assert (b.num_rows, b.num_invalid, b.num_violations, b.num_findings) == \
        (a.num_rows, a.num_invalid, a.num_violations, a.num_findings)
    assert b.counts == a.counts and b.level_counts() == a.level_counts()
    assert b.is_valid() == a.is_valid()
    assert np.array_equal(b.row_level, a.row_level)
    assert np.array_equal(b.invalid, a.invalid) and b.num_findings > 0


def test_trace_analyses_equal_the_eager_ones(eager, lazy):
    assert lazy.service_graph().equals(eager.service_graph())
    assert lazy.latency_breakdown().equals(eager.latency_breakdown())
    assert lazy.slowest_traces(7).equals(eager.slowest_traces(7))
    tid = eager.slowest_traces(1).column("trace_id")[0].as_py()
    assert lazy.critical_path(tid) == eager.critical_path(tid)
    assert lazy.trace(tid).trace_id == eager.trace(tid).trace_id == bytes.fromhex(tid)
    with pytest.raises(KeyError, match="no span of trace"):
        lazy.trace(b"\x01" * 16)
    assert len(lazy.traces()) == len(eager.traces())


@pytest.mark.parametrize("k", [1, 2, 5])
def test_trace_partitions_hold_whole_traces(recording, eager, k):
    ds = open_dataset(recording, lazy=True, trace_partitions=k)
    sets = list(ds.iter_traces())
    assert len(sets) == k
    ids = [t for ts in sets for t in ts.trace_ids()]
    assert len(ids) == len(set(ids)) == len(eager.traces())
    assert sum(ts.spans.num_rows for ts in sets) == eager.num_rows
    assert ds.service_graph().equals(eager.service_graph())
    assert ds.latency_breakdown().equals(eager.latency_breakdown())


def test_memory_budget_sets_the_partitions(recording):
    ds = open_dataset(recording, lazy=True, memory_budget=5000 * 250 // 4)
    assert ds._partitions() == 4
    assert open_dataset(recording, lazy=True)._partitions() == 1


def test_sample_and_filter_stay_lazy_and_match(eager, lazy):
    a, b = eager.sample(0.3), lazy.sample(0.3)
    assert b.lazy and b.num_rows == a.num_rows > 0
    assert b.to_arrow().equals(a.to_arrow())
    same_summary(a.summary(), b.summary())
    adaptive = knhk.SamplingConfig(base_rate=0.2, slow_threshold_ms=5.0)
    assert lazy.sample(adaptive).num_rows == eager.sample(adaptive).num_rows
    mask = (eager.to_pandas()["service"].astype(str) == "frontend").to_numpy()
    fa, fb = eager.filter(mask), lazy.filter(mask)
    assert fb.lazy and fb.to_arrow().equals(fa.to_arrow())
    # a filter of a filter: the second mask is over the first one's rows
    m2 = np.arange(fa.num_rows) % 3 == 0
    assert lazy.filter(mask).filter(m2).to_arrow().equals(fa.filter(m2).to_arrow())
    assert fb.service_graph().equals(fa.service_graph())
    with pytest.raises(ValueError, match="mask"):
        lazy.filter(mask[:-1])


def test_arrow_faces_stream_batch_by_batch(eager, lazy, monkeypatch):
    n = eager.num_rows
    assert lazy.to_arrow().equals(eager.to_arrow())
    # The PyCapsule stream never builds a table first: consumers read it batch by batch.
    monkeypatch.setattr(Dataset, "to_arrow", lambda self: pytest.fail("materialised"))
    reader = pa.RecordBatchReader.from_stream(lazy)
    sizes = [rb.num_rows for rb in reader]
    assert sizes == [b.num_rows for b in eager.batches] and sum(sizes) == n
    assert pl.DataFrame(lazy).height == n
    assert duckdb.sql("SELECT count(*) FROM lazy").fetchall()[0][0] == n
    got = lazy.sql("SELECT service, count(*) AS n FROM spans GROUP BY service ORDER BY service")
    monkeypatch.undo()
    want = eager.sql("SELECT service, count(*) AS n FROM spans GROUP BY service "
                     "ORDER BY service")
    assert got.equals(want)
    # a query that scans spans twice: each scan gets a fresh stream
    twice = lazy.sql("SELECT count(*) AS n FROM spans a JOIN spans b USING (span_id, trace_id)")
    assert twice.column("n").to_pylist() == [n]
    star = lazy.sql("SELECT * FROM spans WHERE status_code = 2")
    assert star.num_rows == int((eager.to_pandas()["status_code"] == 2).sum())
    assert star.column_names == knhk.SPAN_SCHEMA.names
    # statements that name columns without spelling them see every column
    assert lazy.sql("DESCRIBE spans").num_rows == len(knhk.SPAN_SCHEMA)
    assert lazy.sql("FROM spans LIMIT 3").num_columns == len(knhk.SPAN_SCHEMA)
    svc = pa.table({"service": ["frontend"], "tier": ["edge"]})
    natural = lazy.sql("SELECT count(*) AS n FROM spans NATURAL JOIN svc", svc=svc)
    assert natural.column("n").to_pylist() == eager.sql(
        "SELECT count(*) AS n FROM spans NATURAL JOIN svc", svc=svc).column("n").to_pylist()


def test_columns_project_the_arrow_faces(recording, eager):
    cols = ["service", "start_time_ns", "status_code"]
    for lazy in (True, False):
        ds = open_dataset(recording, lazy=lazy, columns=cols)
        table = ds.to_arrow()
        assert table.column_names == cols
        assert table.equals(eager.to_arrow().select(cols))
        assert pa.table(ds).column_names == cols
        assert ds.to_pandas().shape == (eager.num_rows, 3)
        assert ds.sql("SELECT count(*) AS n FROM spans").column("n").to_pylist() == \
            [eager.num_rows]
        # analyses read what they need whatever the projection
        same_summary(ds.summary(), eager.summary())
    ds = open_dataset(recording, lazy=True)
    only = list(ds.iter_batches(["trace_id"]))
    assert all(rb.column_names == ["trace_id"] for rb in only)
    assert all(isinstance(b, knhk.SpanBatch) for b in ds.iter_batches())


def test_a_projected_pass_decodes_only_its_columns(recording):
    ds = open_dataset(recording, lazy=True)
    assert ds.num_rows == 5000  # the first pass: every column, checksummed
    full = sum(rb.nbytes for rb in ds._iter(None, compact=False))
    one = sum(rb.nbytes for rb in ds._iter(["start_time_ns"], compact=False))
    assert one == 8 * ds.num_rows and one * 20 < full


def test_time_range_keeps_spans_starting_in_it(recording, eager):
    frame = eager.to_pandas()
    start = frame["start_time_ns"]
    t0, t1 = int(start.quantile(0.3)), int(start.quantile(0.6))
    want = frame[(start >= t0) & (start < t1)]
    for lazy in (True, False):
        ds = open_dataset(recording, lazy=lazy, start=t0, end=t1)
        assert ds.num_rows == len(want)
        assert ds.summary()["start_ns"] == int(want["start_time_ns"].min())
        got = ds.to_pandas()
        assert got["span_id"].tolist() == want["span_id"].tolist()
    ds = open_dataset(recording, lazy=True, start=t0, end=t1)
    assert len(ds._plan) < len(ds._scanner.index())  # batches outside the range are skipped
    as_dt = open_dataset(recording, lazy=True,
                         start=datetime.fromtimestamp(t0 / 1e9, tz=UTC).replace(microsecond=0))
    assert as_dt.num_rows >= ds.num_rows


def test_pruned_batches_are_not_read(recording, eager, monkeypatch):
    frame = eager.to_pandas()
    t1 = int(frame["start_time_ns"].quantile(0.1))
    ds = open_dataset(recording, lazy=True, verify=False, end=t1)
    assert ds.num_rows > 0
    read = []
    real = ds._scanner.read

    def spy(columns, batches, **kw):  # counts what is read, reads it for real
        batches = list(batches)
        read.extend(batches)
        return real(columns, batches, **kw)

    monkeypatch.setattr(ds._scanner, "read", spy)
    assert ds.summary()["spans"] == int((frame["start_time_ns"] < t1).sum())
    assert 0 < len({(i.file, i.batch) for i in read}) < len(ds._scanner.index()) // 2


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), n=st.integers(1, 1500), sizes=st.lists(
    st.integers(1, 400), min_size=1, max_size=4), k=st.integers(1, 4),
    err=st.sampled_from([0.0, 0.1, 0.5]), shuffle=st.integers(0, 2**32 - 1))
def test_streamed_results_equal_eager_ones_for_any_recording(tmp_path_factory, seed, n, sizes, k,
                                                              err, shuffle):
    root = tmp_path_factory.mktemp("hyp")
    batch = generate(n, WorkloadConfig(seed=seed, error_rate=err))
    pieces = cut(batch, sizes)
    order = np.random.default_rng(shuffle).permutation(len(pieces))  # out of time order too
    record(root, [pieces[i] for i in order], max_bytes=64 << 10)
    eager = open_dataset(root, lazy=False)
    lazy = open_dataset(root, lazy=True, trace_partitions=k)
    same_summary(eager.summary(), lazy.summary())
    assert sorted_windows(lazy.windows(0.5)).equals(sorted_windows(eager.windows(0.5)))
    session = knhk.WindowConfig.session(gap=0.05)
    assert sorted_windows(lazy.windows(session, group_by=("service",))).equals(
        sorted_windows(eager.windows(session, group_by=("service",))))
    assert lazy.service_graph().equals(eager.service_graph())
    assert lazy.latency_breakdown().equals(eager.latency_breakdown())
    assert lazy.slowest_traces(3).column("duration_ms").to_pylist() == \
        eager.slowest_traces(3).column("duration_ms").to_pylist()


def test_an_empty_time_range_is_an_empty_dataset(recording):
    ds = open_dataset(recording, lazy=True, end=1)
    s = ds.summary()
    assert (s["spans"], s["traces"], s["start_ns"], s["top_operations"].num_rows) == \
        (0, 0, None, 0)
    assert ds.to_arrow().num_rows == 0 and ds.windows(1.0).num_rows == 0
    assert ds.service_graph().num_rows == 0 and ds.slowest_traces().num_rows == 0


# -- damaged files ----------------------------------------------------------------------------


def _body_flip(path: str, batch: int) -> bytes:
    from knhk_testing import ipc_messages

    bodies = [(c, d) for t, _, c, d in ipc_messages(path) if t == "record batch"]
    data = bytearray(Path(path).read_bytes())
    a, b = bodies[batch]
    data[(a + b) // 2] ^= 0x10
    return bytes(data)


def _replay_error(path: str, verify: bool = True) -> CorruptFileError:
    with pytest.raises(CorruptFileError) as err:
        for _ in read_batches(path, verify=verify):
            pass
    return err.value


def test_a_damaged_file_fails_when_read_with_the_replay_readers_offset(tmp_path, recording):
    for f in sorted(glob.glob(f"{recording}/*.arrow")):
        (tmp_path / os.path.basename(f)).write_bytes(Path(f).read_bytes())
    victim = sorted(glob.glob(f"{tmp_path}/b-*.arrow"))[0]
    Path(victim).write_bytes(_body_flip(victim, 1))
    want = _replay_error(victim)
    ds = open_dataset(tmp_path, lazy=True)  # cheap: nothing read yet, nothing to fail
    with pytest.raises(CorruptFileError) as err:
        ds.summary()
    assert (err.value.path, err.value.offset) == (victim, want.offset)
    assert victim in str(err.value) and str(want.offset) in str(err.value)
    with pytest.raises(CorruptFileError):  # and again: nothing was skipped, or cached as good
        ds.service_graph()
    with pytest.raises(CorruptFileError):
        open_dataset(tmp_path, lazy=False)  # eager fails at open, as it always did


def test_a_truncated_file_fails_lazily_even_unverified(tmp_path, recording):
    from knhk_testing import ipc_messages

    src = sorted(glob.glob(f"{recording}/c-*.arrow"))[0]
    regions = [(a, d) for t, a, _, d in ipc_messages(src) if t == "record batch"]
    data = Path(src).read_bytes()
    victim = tmp_path / "cut.arrow"
    victim.write_bytes(data[:(regions[-1][0] + regions[-1][1]) // 2])
    for verify in (True, False):
        want = _replay_error(str(victim), verify)
        with pytest.raises(CorruptFileError) as err:
            open_dataset(victim, lazy=True, verify=verify).summary()
        assert (err.value.offset, err.value.batches_read) == (want.offset, want.batches_read)


def test_a_footerless_file_reads_lazily(tmp_path, recording):
    from knhk_testing import ipc_messages

    src = sorted(glob.glob(f"{recording}/c-*.arrow"))[0]
    end = [d for t, _, _, d in ipc_messages(src) if t == "record batch"][-1]
    victim = tmp_path / "crashed.arrow"
    victim.write_bytes(Path(src).read_bytes()[:end])
    want = open_dataset(src, lazy=False)
    for verify in (True, False):
        ds = open_dataset(victim, lazy=True, verify=verify)
        same_summary(ds.summary(), {**want.summary(), "files": 1})
        assert ds.to_arrow().equals(want.to_arrow())


def test_a_file_damaged_after_it_was_verified_is_checked_again(tmp_path, recording):
    src = sorted(glob.glob(f"{recording}/c-*.arrow"))[0]
    victim = tmp_path / "later.arrow"
    victim.write_bytes(Path(src).read_bytes())
    ds = open_dataset(victim, lazy=True)
    assert ds.summary()["spans"] == 2000
    damaged = _body_flip(str(victim), 2)
    victim.write_bytes(damaged)
    os.utime(victim, ns=(1, 1))  # a changed modification time, however fast the clock
    with pytest.raises(CorruptFileError) as err:
        ds.windows(1.0)
    assert err.value.offset == _replay_error(str(victim)).offset


def test_a_file_that_lost_batches_since_it_was_indexed_is_an_error(tmp_path, recording):
    src = sorted(glob.glob(f"{recording}/c-*.arrow"))[0]
    victim = tmp_path / "shrinks.arrow"
    victim.write_bytes(Path(src).read_bytes())
    ds = open_dataset(victim, lazy=True, verify=False)
    assert ds.num_rows == 2000
    record(tmp_path / "other", [generate(10, WorkloadConfig(seed=9))])
    (other,) = glob.glob(f"{tmp_path}/other/*.arrow")
    victim.write_bytes(Path(other).read_bytes())  # one batch where there were four
    with pytest.raises(CorruptFileError, match="record batch 1 is gone"):
        ds.summary()


def test_metric_files_are_kept_aside(tmp_path):
    from knhk.metrics import MetricBuffer, MetricKind, MetricPoint

    buffer = MetricBuffer(batch_size=100, capacity=1000, service="svc")
    for i in range(7):
        buffer.append(MetricPoint("hits", i, kind=MetricKind.COUNTER, time_ns=i + 1))
    buffer.seal()
    metric = knhk.MetricBatch(buffer.drain(0.0)[0])
    files = record(tmp_path, [generate(100, WorkloadConfig(seed=4)), metric])
    lazy = open_dataset(files, lazy=True)
    eager = open_dataset(files, lazy=False)
    assert lazy.num_rows == 100 and lazy.summary()["files"] == 2
    assert [m.num_rows for m in lazy.metrics] == [m.num_rows for m in eager.metrics] == [7]


def test_from_batches_and_pandas_agree_with_a_lazy_read(eager, lazy):
    frame = lazy.to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == eager.num_rows
    again = Dataset.from_batches(lazy.to_arrow())
    same_summary({**again.summary(), "files": 3, "batches": 0},
                 {**eager.summary(), "batches": 0})


@pytest.mark.parametrize("k", [1, 4])
def test_slowest_traces_break_ties_alike(tmp_path, k):
    """Traces of equal length (common with millisecond clocks): eager and lazy agree."""
    import random

    rng = random.Random(1)
    spans = [knhk.Span("op", trace_id=rng.getrandbits(128) | 1, span_id=1,
                       start_time_ns=t * 10, duration_ns=1000, service=f"s{t}")
             for t in range(1, 21)]
    files = record(tmp_path, [knhk.SpanBatch.from_spans(spans)])
    eager = knhk.open(files, lazy=False).slowest_traces(3)
    lazy = knhk.open(files, lazy=True, trace_partitions=k).slowest_traces(3)
    assert eager.equals(lazy)
    assert eager.column("trace_id").to_pylist() == sorted(eager.column("trace_id").to_pylist())


@pytest.mark.parametrize("query", [
    "SELECT s FROM spans s ORDER BY s.span_id LIMIT 2",
    "SELECT length(to_json(spans)) AS n FROM spans ORDER BY n, span_id LIMIT 3",
])
def test_sql_using_a_whole_row_reads_every_column(eager, lazy, query):
    assert eager.sql(query).equals(lazy.sql(query))
