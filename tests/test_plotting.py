"""knhk.plotting: the figures' contents (artists, labels, data), not their pixels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

import knhk
from knhk import plotting
from knhk.analysis import Dataset
from knhk.workload import WorkloadConfig, generate


@pytest.fixture(scope="module")
def ds():
    return Dataset.from_batches(generate(3000, WorkloadConfig(seed=5, error_rate=0.1)))


@pytest.fixture(scope="module")
def frame(ds):
    df = ds.to_arrow().select(["trace_id", "span_id", "parent_span_id", "service", "name",
                               "start_time_ns", "end_time_ns", "status_code"]).to_pandas()
    df["service"] = df["service"].astype(str)
    df["dur"] = df["end_time_ns"] - df["start_time_ns"]
    return df


def _span(name, sid, parent, start, dur, service, status=0):
    return knhk.Span(name, trace_id=7, span_id=sid, parent_span_id=parent,
                     start_time_ns=start, duration_ns=dur, service=service, status=status)


@pytest.fixture
def small_trace():
    """root [0, 100) calls a [10, 25) and b [30, 90); b calls c [35, 50) (ms)."""
    return Dataset.from_batches(knhk.SpanBatch.from_spans([
        _span("root", 1, None, 0, 100_000_000, "front"),
        _span("a", 2, 1, 10_000_000, 15_000_000, "auth"),
        _span("b", 3, 1, 30_000_000, 60_000_000, "db", status=2),
        _span("c", 4, 3, 35_000_000, 15_000_000, "db"),
    ]))


def test_latency_percentiles_draws_one_line_per_service_and_quantile(ds, frame):
    fig = plotting.latency_percentiles(ds, quantiles=(0.5, 0.99), bin_seconds=0.5,
                                       services=["frontend", "checkout"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = sorted(line.get_label() for line in ax.get_lines())
    assert labels == ["checkout p50", "checkout p99", "frontend p50", "frontend p99"]
    assert ax.get_ylabel() == "duration (ms)"
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "frontend p99")
    f = frame[frame["service"] == "frontend"]
    windows = f["start_time_ns"] // 500_000_000
    want = [np.percentile(g["dur"].to_numpy() / 1e6, 99) for _, g in f.groupby(windows)]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-9)
    # by default the services with most spans, at most max_services of them
    fig2 = ds.plot_latency(quantiles=(0.99,), max_services=3)
    assert len(fig2.axes[0].get_lines()) == 3
    with pytest.raises(ValueError, match="bin_seconds"):
        plotting.latency_percentiles(ds, bin_seconds=0)


def test_error_heatmap_holds_the_error_rates(ds, frame):
    fig = plotting.error_heatmap(ds, bin_seconds=1.0)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    services = sorted(frame["service"].unique())
    assert [t.get_text() for t in ax.get_yticklabels()] == services
    window = frame["start_time_ns"] // 10**9
    assert grid.shape == (len(services), window.max() - window.min() + 1)
    for i, svc in enumerate(services):
        f = frame[frame["service"] == svc]
        w = f["start_time_ns"] // 10**9 - window.min()
        for col, g in f.groupby(w):
            assert grid[i, col] == pytest.approx((g["status_code"] == 2).mean())
    assert len(fig.axes) == 2  # the colorbar
    assert ds.plot_error_heatmap(services=["frontend"]).axes[0].images[0].get_array().shape[0] \
        == 1


def test_trace_timeline_bars_and_critical_path(small_trace):
    fig = plotting.trace_timeline(small_trace, 7)
    ax = fig.axes[0]
    spans, path = ax.containers
    assert len(spans) == 4
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["front: root", "auth: a", "db: b", "db: c"]  # depth first
    assert [round(p.get_x(), 6) for p in spans] == [0, 10, 30, 35]
    assert [round(p.get_width(), 6) for p in spans] == [100, 15, 60, 15]
    # Critical path (as Jaeger computes it): root 90-100, b 50-90, c 35-50, b 30-35,
    # root 25-30, a 10-25, root 0-10, drawn on their spans' rows in the path color.
    segs = sorted((round(p.get_x(), 6), round(p.get_x() + p.get_width(), 6),
                   round(p.get_y() + p.get_height() / 2)) for p in path)
    assert segs == [(0, 10, 0), (10, 25, 1), (25, 30, 0), (30, 35, 2), (35, 50, 3),
                    (50, 90, 2), (90, 100, 0)]
    assert all(p.get_facecolor()[:3] == pytest.approx(
        matplotlib.colors.to_rgb(plotting.CRITICAL_PATH_COLOR)) for p in path)
    assert path.get_label() == "critical path"
    # the error span is outlined
    assert spans[2].get_edgecolor()[:3] == (0.0, 0.0, 0.0)
    bare = plotting.trace_timeline(small_trace.trace(7), critical_path=False)
    assert len(bare.axes[0].containers) == 1


def test_trace_timeline_of_a_real_trace_follows_the_engine(ds):
    tid = ds.slowest_traces(1).column("trace_id")[0].as_py()
    trace = ds.trace(tid)
    fig = ds.plot_trace(tid)
    spans, path = fig.axes[0].containers
    assert len(spans) == trace.spans.num_rows
    sections = trace.critical_path()
    assert len(path) == len(sections)
    t0 = trace.spans.column("start_time_ns").to_numpy().min()
    got = sorted(round(p.get_width(), 6) for p in path)
    want = sorted(round((s.section_end - s.section_start) / 1e6, 6) for s in sections)
    assert got == pytest.approx(want)
    assert min(p.get_x() for p in path) == pytest.approx(
        (min(s.section_start for s in sections) - t0) / 1e6)
    with pytest.raises(TypeError, match="trace_id"):
        plotting.trace_timeline(ds)


def test_service_graph_has_an_arrow_and_a_label_per_edge(ds, frame):
    fig = plotting.service_graph(ds, latency="p99")
    ax = fig.axes[0]
    edges = ds.service_graph().to_pylist()
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(edges) > 3
    texts = [t.get_text() for t in ax.texts]
    for e in edges:
        assert any(t.startswith(f"{e['calls']:,} calls\n{e['latency_p99_ns'] / 1e6:.1f} ms p99")
                   for t in texts)
    services = sorted(set(frame["service"]))
    assert set(services) <= set(texts)
    # thicker arrows for more calls
    widths = {(e["client"], e["server"]): a.get_linewidth() for e, a in zip(edges, arrows,
                                                                            strict=True)}
    busiest = max(edges, key=lambda e: e["calls"])
    assert widths[(busiest["client"], busiest["server"])] == max(widths.values())
    # the table itself plots the same
    again = plotting.service_graph(ds.service_graph())
    assert len([p for p in again.axes[0].patches if isinstance(p, FancyArrowPatch)]) == \
        len(edges)
    with pytest.raises(ValueError, match="latency"):
        plotting.service_graph(ds, latency="p50")


def test_service_graph_counts_on_a_known_graph(small_trace):
    fig = small_trace.plot_service_graph()
    texts = [t.get_text() for t in fig.axes[0].texts]
    # front->auth and front->db (b failed: an error), db->db is not an edge
    assert sorted(t for t in texts if "calls" in t) == [
        "1 calls\n15.0 ms avg", "1 calls\n60.0 ms avg, 1 err"]


def test_plots_draw_into_a_given_axes(ds):
    fig = Figure()
    ax = fig.add_subplot()
    assert plotting.latency_percentiles(ds, quantiles=(0.5,), ax=ax) is fig
    assert ax.get_lines()


def test_plots_take_batches_and_tables(ds):
    batch = ds.batch
    assert plotting.error_heatmap(batch).axes[0].images
    assert plotting.latency_percentiles(ds.to_arrow(), quantiles=(0.5,)).axes[0].get_lines()
    with pytest.raises(TypeError, match="Dataset"):
        plotting.error_heatmap(pd.DataFrame({"x": [1]}))
