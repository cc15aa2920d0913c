"""Plots of recordings and traces (matplotlib, imported on first use).

Every function takes what it plots — a :class:`~knhk.analysis.Dataset`, a
:class:`~knhk.SpanBatch`, an Arrow table of spans, or a :class:`~knhk.Trace`
— and returns a ``matplotlib.figure.Figure``. Pass ``ax=`` to draw into an
existing Axes instead (its figure is returned). Figures are made without
``pyplot``, so nothing accumulates in pyplot's global state; in Jupyter a
returned Figure shows inline once ``%matplotlib inline`` is active.
:class:`~knhk.analysis.Dataset` has the same plots as methods
(``ds.plot_latency()``, ``ds.plot_error_heatmap()``, ``ds.plot_trace(id)``,
``ds.plot_service_graph()``).

The numbers come from the same engine as the pipeline: percentiles and error
rates from :class:`~knhk.StreamProcessor` windows, the trace's critical path
from :meth:`knhk.Trace.critical_path`, the service graph from
:meth:`knhk.tracing.TraceSet.service_call_graph`.

Example
-------
>>> import knhk
>>> from knhk.workload import generate, WorkloadConfig
>>> fig = latency_percentiles(generate(2_000, WorkloadConfig(seed=3)), quantiles=(0.99,))
>>> type(fig).__name__, fig.axes[0].get_ylabel()
('Figure', 'duration (ms)')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["error_heatmap", "latency_percentiles", "service_graph", "trace_timeline"]

#: The color of critical-path segments on a trace timeline.
CRITICAL_PATH_COLOR = "#d62728"
_NICE_SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30,
                 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def _figure(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _dataset(data: Any) -> Any:
    from knhk.analysis import Dataset

    if isinstance(data, Dataset):
        return data
    try:
        return Dataset.from_batches(data)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected a knhk Dataset, SpanBatch or Arrow table of spans; got "
                        f"{type(data).__name__} ({exc})") from None


def _auto_bin(ds: Any, target: int = 40) -> float:
    s = ds.summary()
    if not s["spans"]:
        return 60.0
    span = max((s["end_ns"] - s["start_ns"]) / 1e9, 1e-3)
    want = span / target
    for nice in _NICE_SECONDS:
        if nice >= want:
            return float(nice)
    return float(_NICE_SECONDS[-1])


def _check_bin(bin_seconds: Any) -> None:
    if not isinstance(bin_seconds, int | float) or isinstance(bin_seconds, bool) \
            or not math.isfinite(bin_seconds) or bin_seconds <= 0:
        raise ValueError(f"bin_seconds must be a positive number of seconds, got "
                         f"{bin_seconds!r}")


def _top_services(ds: Any, services: Sequence[str] | None, limit: int) -> list[str]:
    if services is not None:
        return list(services)
    ops = ds.operations()
    counts: dict[str, int] = {}
    for svc, n in zip(ops.column("service").to_pylist(), ops.column("count").to_pylist(),
                      strict=True):
        counts[svc] = counts.get(svc, 0) + n
    return [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def latency_percentiles(data: Any, *, quantiles: Sequence[float] = (0.5, 0.99),
                        bin_seconds: float | None = None,
                        services: Sequence[str] | None = None, max_services: int = 8,
                        ax: Any = None) -> Any:
    """Duration percentiles over time, one line per service and percentile.

    Parameters
    ----------
    data : Dataset, SpanBatch or Arrow table of spans
    quantiles : sequence of float
        Each gets its own line style (p50 solid, the next dashed, ...).
    bin_seconds : float, optional
        Width of the tumbling windows; by default about 40 windows over the data.
    services : sequence of str, optional
        Services to draw; by default the ``max_services`` with the most spans.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        x is seconds since the first window, y the duration in milliseconds;
        each line's label is ``"<service> p<q>"``.
    """
    from knhk.stream.processor import quantile_name

    ds = _dataset(data)
    bin_seconds = _auto_bin(ds) if bin_seconds is None else bin_seconds
    _check_bin(bin_seconds)
    quantiles = tuple(quantiles)
    if not quantiles:
        raise ValueError("quantiles must name at least one quantile")
    table = ds.windows(bin_seconds, group_by=("service",), quantiles=quantiles)
    fig, ax = _figure(ax, (9, 4.5))
    chosen = _top_services(ds, services, max_services)
    styles = ["-", "--", ":", "-."]
    svc = np.asarray(table.column("service").to_pylist(), dtype=object)
    start = table.column("window_start").to_numpy().astype(np.int64)
    t0 = int(start.min()) if len(start) else 0
    for i, name in enumerate(chosen):
        rows = np.flatnonzero(svc == name)
        rows = rows[np.argsort(start[rows], kind="stable")]
        x = (start[rows] - t0) / 1e9
        for j, q in enumerate(quantiles):
            y = table.column(quantile_name(q)).to_numpy()[rows]
            ax.plot(x, y, linestyle=styles[j % len(styles)], color=f"C{i % 10}",
                    marker="." if len(rows) < 60 else None,
                    label=f"{name} {quantile_name(q, '').rstrip('_')}")
    ax.set_xlabel(f"time (s, {bin_seconds:g} s windows)")
    ax.set_ylabel("duration (ms)")
    ax.set_title("latency percentiles by service")
    if chosen:
        ax.legend(fontsize="small", ncols=max(1, len(quantiles)), loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, alpha=0.3)
    return fig


def error_heatmap(data: Any, *, bin_seconds: float | None = None,
                  services: Sequence[str] | None = None, ax: Any = None,
                  cmap: str = "Reds") -> Any:
    """Error rate per service (rows) and time window (columns).

    Parameters
    ----------
    data : Dataset, SpanBatch or Arrow table of spans
    bin_seconds : float, optional
        Width of the tumbling windows; by default about 40 windows over the data.
    services : sequence of str, optional
        Rows to draw, in order; by default every service, sorted by name.
    ax : matplotlib Axes, optional
    cmap : str

    Returns
    -------
    matplotlib.figure.Figure
        The image's array (``fig.axes[0].images[0].get_array()``) is the
        error-rate matrix; a window without spans of a service is masked
        (drawn grey).
    """
    ds = _dataset(data)
    bin_seconds = _auto_bin(ds) if bin_seconds is None else bin_seconds
    _check_bin(bin_seconds)
    table = ds.windows(bin_seconds, group_by=("service",), quantiles=(0.5,))
    svc = table.column("service").to_pylist()
    rows_names = list(services) if services is not None else sorted(set(svc))
    start = table.column("window_start").to_numpy().astype(np.int64)
    bin_ns = round(bin_seconds * 1e9)
    t0 = int(start.min()) if len(start) else 0
    n_cols = int((start.max() - t0) // bin_ns) + 1 if len(start) else 0
    grid = np.full((len(rows_names), n_cols), np.nan)
    index = {s: i for i, s in enumerate(rows_names)}
    rate = table.column("error_rate").to_numpy()
    col = ((start - t0) // bin_ns).astype(np.int64)
    for k, s in enumerate(svc):
        r = index.get(s)
        if r is not None:
            grid[r, col[k]] = rate[k]
    fig, ax = _figure(ax, (9, 0.45 * max(len(rows_names), 4) + 1.2))
    from matplotlib import colormaps

    # windows without spans of a service are grey, not "no errors"
    colors = colormaps[cmap].with_extremes(bad="#e8e8e8")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=colors, vmin=0.0,
                      vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0,
                               1e-9),
                      interpolation="nearest",
                      extent=(0, n_cols * bin_seconds, len(rows_names) - 0.5, -0.5))
    ax.set_yticks(range(len(rows_names)), labels=rows_names)
    ax.set_xlabel(f"time (s, {bin_seconds:g} s windows)")
    ax.set_title("error rate by service")
    fig.colorbar(image, ax=ax, label="error rate")
    return fig


def _trace_of(data: Any, trace_id: Any) -> Any:
    from knhk.tracing import Trace

    if isinstance(data, Trace):
        if trace_id is not None:
            raise TypeError("trace_timeline: pass a Trace, or a dataset and a trace_id")
        return data
    if trace_id is None:
        raise TypeError("trace_timeline: a dataset or batch needs a trace_id")
    return _dataset(data).trace(trace_id)


def _display_order(parent: np.ndarray, start: np.ndarray) -> list[int]:
    """Rows in depth-first order, children by start time (as trace viewers list spans)."""
    children: dict[int, list[int]] = {}
    roots = []
    for i, p in enumerate(parent.tolist()):
        (children.setdefault(p, []) if p >= 0 else roots).append(i)
    out: list[int] = []
    stack = sorted(roots, key=lambda i: start[i], reverse=True)
    while stack:
        i = stack.pop()
        out.append(i)
        stack.extend(sorted(children.get(i, ()), key=lambda c: start[c], reverse=True))
    return out


def trace_timeline(data: Any, trace_id: Any = None, *, critical_path: bool = True,
                   max_spans: int = 300, ax: Any = None) -> Any:
    """A trace as a Gantt chart, its critical path highlighted.

    Parameters
    ----------
    data : Trace, or a Dataset / SpanBatch with ``trace_id``
    trace_id : bytes, 32 hex digits or int, optional
    critical_path : bool
        Overlay the critical path: one narrow bar (color
        :data:`CRITICAL_PATH_COLOR`, label ``"critical path"`` on the first)
        per section, on its span's row.
    max_spans : int
        Draw at most this many spans (in display order); a trace viewer for
        bigger traces is a better tool.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Row ``i`` (top first) is a span in depth-first order, labelled
        ``"service: name"``; x is milliseconds since the trace's start. The
        span bars are ``ax.containers[0]``; the critical path sections
        ``ax.containers[1]``.
    """
    trace = _trace_of(data, trace_id)
    spans = trace.spans
    start = spans.column("start_time_ns").to_numpy()
    end = np.maximum(spans.column("end_time_ns").to_numpy(), start)
    status = spans.column("status_code").to_numpy()
    names = spans.column("name").to_pylist()
    services = spans.column("service").to_pylist()
    sids = spans.column("span_id").to_pylist()
    order = _display_order(trace.parent, start)[:max_spans]
    row_of = {sids[r]: k for k, r in enumerate(order)}
    t0 = int(start.min())
    palette = {s: f"C{i % 10}" for i, s in enumerate(sorted(set(services)))}
    fig, ax = _figure(ax, (10, 0.28 * len(order) + 1.5))
    y = np.arange(len(order))
    left = (start[order] - t0) / 1e6
    width = (end[order] - start[order]) / 1e6
    colors = [palette[services[r]] for r in order]
    ax.barh(y, width, left=left, height=0.7, color=colors, alpha=0.55,
            edgecolor=["black" if status[r] == 2 else "none" for r in order],
            label="spans")
    if critical_path:
        cy, cl, cw = [], [], []
        for sec in trace.critical_path():
            k = row_of.get(sec.span_id)
            if k is None:
                continue
            cy.append(k)
            cl.append((sec.section_start - t0) / 1e6)
            cw.append((sec.section_end - sec.section_start) / 1e6)
        ax.barh(cy, cw, left=cl, height=0.3, color=CRITICAL_PATH_COLOR,
                label="critical path")
    ax.set_yticks(y, labels=[f"{services[r]}: {names[r]}" for r in order],
                  fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("time since trace start (ms)")
    ax.set_title(f"trace {trace.trace_id.hex()} ({len(start)} spans, "
                 f"{(end.max() - t0) / 1e6:.1f} ms)")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _layers(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Each service's column: the longest call chain reaching it (back edges of cycles ignored)."""
    out: dict[str, list[str]] = {n: [] for n in nodes}
    incoming = {n: 0 for n in nodes}
    for a, b in edges:
        out[a].append(b)
        incoming[b] += 1
    # Depth-first from the services nothing calls, then from the rest: edges into a
    # service still on the stack close a cycle and are left out of the layering.
    state: dict[str, int] = {}
    order: list[str] = []
    dag: dict[str, list[str]] = {n: [] for n in nodes}
    for root in sorted(nodes, key=lambda n: (incoming[n] != 0, n)):
        if root in state:
            continue
        stack = [(root, iter(out[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state.get(nxt) != 1:
                dag[node].append(nxt)
                if nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(out[nxt])))
    layer = {n: 0 for n in nodes}
    for node in reversed(order):  # topological order of the DAG
        for m in dag[node]:
            layer[m] = max(layer[m], layer[node] + 1)
    return layer


def service_graph(data: Any, *, ax: Any = None, latency: str = "avg") -> Any:
    """The service call graph on a circle; edges labelled with calls and latency.

    Parameters
    ----------
    data : Dataset, SpanBatch, Arrow table of spans, or the table of
        ``service_call_graph()`` / ``Dataset.service_graph()`` itself
    latency : {"avg", "p99"}
        Which latency the edge labels give.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Services on a circle, callers first clockwise from the left; one
        arrow (a ``FancyArrowPatch`` in ``ax.patches``) per edge, grey, or
        red as more of its calls fail, and one labelled node per service;
        each edge's label, a third of the way from its caller, reads ``"<calls> calls\\n<ms> ms"``
        (with ``", <errors> err"`` when calls failed); edge widths grow with calls.
    """
    import pyarrow as pa
    from matplotlib.patches import FancyArrowPatch

    if latency not in ("avg", "p99"):
        raise ValueError(f"latency must be 'avg' or 'p99', got {latency!r}")
    if isinstance(data, pa.Table) and {"client", "server", "calls"} <= set(data.column_names):
        table = data
    else:
        table = _dataset(data).service_graph()
    rows = table.to_pylist()
    nodes = sorted({r["client"] for r in rows} | {r["server"] for r in rows})
    edges = [(r["client"], r["server"]) for r in rows]
    # A circle, callers first (clockwise from the left), keeps a dense graph readable.
    layer = _layers(nodes, edges)
    ordered = sorted(nodes, key=lambda n: (layer[n], n))
    k = max(len(ordered), 1)
    pos = {n: (-math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k))
           for i, n in enumerate(ordered)}
    fig, ax = _figure(ax, (9, 8))
    max_calls = max((r["calls"] for r in rows), default=1)
    from matplotlib import colormaps

    # grey for clean edges shading to red at 25% failed calls
    error_cmap = colormaps["Greys"].resampled(256)
    red = colormaps["Reds"]

    def error_cmap(x: float, _grey: Any = error_cmap, _red: Any = red) -> Any:
        return _grey(0.55) if x <= 0 else _red(0.35 + 0.65 * x)

    for r in rows:
        a, b = pos[r["client"]], pos[r["server"]]
        rad = 0.12
        arrow = FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14,
                                connectionstyle=f"arc3,rad={rad}",
                                linewidth=0.8 + 3.2 * r["calls"] / max_calls,
                                color=error_cmap(min(1.0, 4 * r["errors"] / r["calls"])),
                                shrinkA=20, shrinkB=20, alpha=0.8, zorder=1)
        ax.add_patch(arrow)
        ms = (r["latency_avg_ns"] if latency == "avg" else r["latency_p99_ns"]) / 1e6
        label = f"{r['calls']:,} calls\n{ms:.1f} ms {latency}"
        if r["errors"]:
            label += f", {r['errors']:,} err"
        ax.text(a[0] + 0.3 * (b[0] - a[0]), a[1] + 0.3 * (b[1] - a[1]), label, fontsize=7,
                ha="center", va="bottom", color="#333333", zorder=3,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                      "alpha": 0.7})
    if nodes:
        xs = [pos[n][0] for n in nodes]
        ys = [pos[n][1] for n in nodes]
        ax.scatter(xs, ys, s=1400, color="#9ecae1", edgecolors="#3182bd", zorder=2)
        for n in nodes:
            ax.text(pos[n][0], pos[n][1], n, ha="center", va="center", fontsize=8,
                    fontweight="bold", zorder=4)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(f"service graph ({len(nodes)} services, {len(rows)} edges)")
    return fig
