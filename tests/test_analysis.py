"""knhk.analysis: the Dataset, checked against plain pyarrow / polars / pandas / DuckDB /
NumPy computations over the same files, and against opentelemetry-sdk's sampler."""

from __future__ import annotations

import glob
import os
import sys

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import knhk
from knhk.analysis import Dataset, open_dataset
from knhk.exporters.ipc import IpcExporter
from knhk.tracing import TraceAssembler
from knhk.workload import WorkloadConfig, generate_batches

REGISTRY = os.path.join(os.path.dirname(__file__), os.pardir, "registry")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Two recordings of different workloads (so their dictionaries differ)."""
    root = tmp_path_factory.mktemp("recording")
    for prefix, seed, n, err in (("a", 1, 3000, 0.02), ("b", 2, 2000, 0.2)):
        rec = IpcExporter(root, prefix=prefix)
        for batch in generate_batches(n, config=WorkloadConfig(seed=seed, error_rate=err),
                                      batch_size=700):
            rec.export(batch)
        rec.shutdown()
    return str(root)


@pytest.fixture(scope="module")
def ds(recording):
    return open_dataset(recording)


@pytest.fixture(scope="module")
def frame(recording):
    """The same files read by plain pyarrow, into pandas (durations and keys as strings)."""
    tables = [ipc.open_file(p).read_all() for p in sorted(glob.glob(f"{recording}/*.arrow"))]
    df = pd.concat([t.select(["trace_id", "span_id", "parent_span_id", "name", "service",
                              "start_time_ns", "end_time_ns", "status_code"]).to_pandas()
                    for t in tables], ignore_index=True)
    df["name"] = df["name"].astype(str)
    df["service"] = df["service"].astype(str)
    df["dur"] = df["end_time_ns"] - df["start_time_ns"]
    return df


def test_open_takes_a_directory_a_glob_a_list_and_a_file(recording, frame):
    files = sorted(glob.glob(f"{recording}/*.arrow"))
    assert len(files) == 2
    n = sum(ipc.open_file(p).read_all().num_rows for p in files)
    assert n == len(frame) == 5000
    assert open_dataset(recording).num_rows == n
    assert open_dataset(f"{recording}/*.arrow").num_rows == n
    assert open_dataset(files).num_rows == n
    assert open_dataset(files[0]).num_rows == ipc.open_file(files[0]).read_all().num_rows
    assert open_dataset(files[0]).paths == [files[0]]


def test_a_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.arrow")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        open_dataset(pattern)
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        open_dataset(str(tmp_path / "no-such-file.arrow"))


def test_arrow_faces_agree_with_polars_pandas_and_duckdb(ds, frame):
    table = ds.to_arrow()
    assert table.schema.equals(knhk.SPAN_SCHEMA) and table.num_rows == len(frame)
    # The PyCapsule stream: every consumer reads it directly, without to_arrow().
    assert pl.DataFrame(ds).height == len(frame)
    assert pd.DataFrame.from_arrow(ds).shape[0] == len(frame)
    n = duckdb.sql("SELECT count(*) FROM ds").fetchall()[0][0]
    assert n == len(frame)
    # ... without copying: the stream's buffers are the batches' own.
    streamed = pa.table(ds)
    a = streamed.column("start_time_ns").chunk(0).buffers()[1]
    b = ds.batches[0].column("start_time_ns").buffers()[1]
    assert a.address == b.address
    assert ds.to_polars().height == ds.to_pandas().shape[0] == len(frame)
    assert ds.to_polars()["service"].n_unique() == frame["service"].nunique()


def test_summary_matches_plain_computations(ds, frame):
    s = ds.summary()
    assert s["spans"] == len(frame)
    assert s["traces"] == frame["trace_id"].nunique()
    assert s["services"] == frame["service"].nunique()
    assert s["service_names"] == sorted(frame["service"].unique())
    assert s["start_ns"] == frame["start_time_ns"].min()
    assert s["end_ns"] == frame["end_time_ns"].max()
    assert s["error_rate"] == pytest.approx((frame["status_code"] == 2).mean(), abs=0)
    assert s["files"] == 2
    top = s["top_operations"]
    assert top.column_names == ["service", "name", "count", "p99_ms"]
    want = [(svc, name, len(g), float(np.percentile(g["dur"].to_numpy(), 99)) / 1e6)
            for (svc, name), g in frame.groupby(["service", "name"])]
    want.sort(key=lambda r: (-r[3], r[0], r[1]))
    got = top.to_pylist()
    assert len(got) == 10
    for g, (svc, name, count, p99) in zip(got, want[:10], strict=True):
        assert (g["service"], g["name"], g["count"]) == (svc, name, count)
        assert g["p99_ms"] == pytest.approx(p99, rel=1e-12)
    assert ds.operations().num_rows == len(want)


def test_summary_of_an_empty_dataset():
    s = Dataset([]).summary()
    assert (s["spans"], s["traces"], s["services"], s["start_ns"], s["end_ns"],
            s["error_rate"]) == (0, 0, 0, None, None, 0.0)
    assert s["top_operations"].num_rows == 0
    assert "0" in Dataset([])._repr_html_()


def test_repr_html_is_a_summary_card(ds, frame):
    card = ds._repr_html_()
    assert f"{len(frame):,}" in card
    assert f"{frame['trace_id'].nunique():,}" in card
    assert f"{(frame['status_code'] == 2).mean():.2%}" in card
    assert "top operations" in card and "<table>" in card


def test_sql_through_duckdb(ds, frame):
    got = ds.sql("SELECT service, count(*) AS n FROM spans GROUP BY service ORDER BY service")
    want = frame.groupby("service").size()
    assert got.column("service").to_pylist() == list(want.index)
    assert got.column("n").to_pylist() == want.tolist()
    joined = ds.sql("SELECT count(*) AS n FROM spans JOIN svc USING (service)",
                    svc=pa.table({"service": ["frontend"]}))
    assert joined.column("n").to_pylist() == [int((frame["service"] == "frontend").sum())]


def test_sql_without_duckdb_says_what_to_install(ds, monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # what an absent package looks like
    with pytest.raises(ImportError, match="pip install duckdb"):
        ds.sql("SELECT 1")


def test_validate_is_the_validators_batch_check(ds):
    report = ds.validate(REGISTRY)
    assert report.num_rows == ds.num_rows
    validator = knhk.WeaverValidator(REGISTRY)
    per_batch: dict[str, int] = {}
    invalid = 0
    for b in ds.batches:
        r = validator.validate_batch(b)
        invalid += r.num_invalid
        for k, v in r.counts.items():
            per_batch[k] = per_batch.get(k, 0) + v
    assert report.counts == per_batch and report.num_invalid == invalid
    assert sum(per_batch.values()) > 0  # the workload does break some conventions
    with pytest.raises(TypeError, match="options"):
        ds.validate(validator, exclude={"not_stable"})


def test_windows_match_numpy_percentiles(ds, frame):
    table = ds.windows(1.0, group_by=("service",), quantiles=(0.99,))
    assert sum(table.column("count").to_pylist()) == len(frame)
    frame = frame.assign(w=frame["start_time_ns"] // 10**9 * 10**9)
    for row in table.to_pylist()[:20]:
        g = frame[(frame["service"] == row["service"]) & (frame["w"] == row["window_start"])]
        assert row["count"] == len(g)
        assert row["p99_duration_ms"] == pytest.approx(
            np.percentile(g["dur"].to_numpy() / 1e6, 99), rel=1e-9)
    assert ds.windows(knhk.WindowConfig.tumbling(seconds=3600)).num_rows > 0


def test_traces_critical_path_and_slowest(ds, frame):
    assert len(ds.traces()) == frame["trace_id"].nunique()
    per_trace = frame.groupby("trace_id").agg(start=("start_time_ns", "min"),
                                              end=("end_time_ns", "max"), n=("span_id", "size"))
    per_trace["dur"] = per_trace["end"] - per_trace["start"]
    want = per_trace.sort_values("dur", ascending=False).head(5)
    slow = ds.slowest_traces(5)
    assert slow.column("trace_id").to_pylist() == [t.hex() for t in want.index]
    assert slow.column("duration_ms").to_pylist() == pytest.approx((want["dur"] / 1e6).tolist())
    assert slow.column("spans").to_pylist() == want["n"].tolist()
    tid = want.index[0]
    asm = TraceAssembler()
    asm.add_batch(pa.Table.from_pandas(frame[frame["trace_id"] == tid][[
        "trace_id", "span_id", "parent_span_id", "name", "service", "start_time_ns",
        "end_time_ns", "status_code"]], preserve_index=False))
    assert ds.critical_path(tid.hex()) == asm.assemble_trace(tid).critical_path()
    assert ds.critical_path(tid) == ds.critical_path(int.from_bytes(tid, "big"))
    with pytest.raises(KeyError, match="no span of trace"):
        ds.trace(b"\x01" * 16)
    with pytest.raises(ValueError, match="trace id"):
        ds.trace("not hex")


def test_service_graph_counts_cross_service_calls(ds, frame):
    parents = frame[["trace_id", "span_id", "service"]].rename(
        columns={"span_id": "parent_span_id", "service": "client"})
    edges = frame.merge(parents, on=["trace_id", "parent_span_id"])
    edges = edges[edges["client"] != edges["service"]]
    want = edges.groupby(["client", "service"]).size()
    graph = ds.service_graph()
    got = {(r["client"], r["server"]): r["calls"] for r in graph.to_pylist()}
    assert got == {k: int(v) for k, v in want.items()}


def test_latency_breakdown_covers_every_span(ds, frame):
    table = ds.latency_breakdown()
    assert sum(table.column("count").to_pylist()) == len(frame)
    row = table.to_pylist()[0]
    g = frame[(frame["service"] == row["service"]) & (frame["name"] == row["operation"])]
    assert row["max_ns"] == g["dur"].max() and row["count"] == len(g)


def test_sample_keeps_what_the_sdks_ratio_sampler_keeps(ds, frame):
    sampled = ds.sample(0.3)
    sdk = TraceIdRatioBased(0.3)
    keep = {t for t in frame["trace_id"].unique()
            if sdk.should_sample(None, int.from_bytes(t, "big"), "x").decision.is_sampled()}
    assert sampled.num_rows == int(frame["trace_id"].isin(keep).sum())
    assert set(sampled.to_pandas()["trace_id"]) == keep
    assert ds.sample(knhk.TraceIdRatio(0.3)).num_rows == sampled.num_rows
    kept_all = ds.sample(knhk.SamplingConfig(base_rate=1.0))
    assert kept_all.num_rows == ds.num_rows
    with pytest.raises(TypeError, match="sampler"):
        ds.sample("half")


def test_filter_and_from_batches(ds, frame):
    mask = (frame["service"] == "frontend").to_numpy()
    sub = ds.filter(mask)
    assert sub.num_rows == int(mask.sum())
    assert set(sub.to_pandas()["service"].astype(str)) == {"frontend"}
    with pytest.raises(ValueError, match="mask"):
        ds.filter(mask[:-1])
    again = Dataset.from_batches(ds.to_arrow())
    assert again.num_rows == ds.num_rows and again.summary()["traces"] == \
        ds.summary()["traces"]
    with pytest.raises(TypeError, match="SpanBatch"):
        Dataset(["x"])
