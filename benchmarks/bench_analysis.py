"""Analysis of a recording: knhk's lazy Dataset beside the eager one and beside pandas / DuckDB.

``python benchmarks/run.py analysis --quick`` records 1,000,000 generated
spans (``knhk.workload``) with the default ``IpcExporter`` (lz4 files of at
most 256 MB); without ``--quick``, 5,000,000. ``KNHK_BENCH_ANALYSIS_SPANS``
overrides the size.

Every measurement runs in a fresh Python process that imports, opens the
recording and runs one analysis, so the time is a cold analysis (open
included; the files are in the page cache) and the peak RSS is that
analysis's own: ``ru_maxrss`` at the end less ``ru_maxrss`` once the imports
are done (about 290 MB of pyarrow, pandas, DuckDB and knhk, the same for
every side). Each figure is the median of three runs. Pages of a
memory-mapped file count while mapped: a lazy pass maps one file at a time.

* ``summary``: ``ds.summary()`` (counts, distinct traces, time range, error
  rate, top operations by exact p99). Peer: pandas, as an analyst would write
  it — ``pyarrow.ipc.open_file(f).read_all()``, the six columns ``to_pandas``,
  then ``groupby([service, name])`` quantile(0.99), ``nunique``, min / max.
* ``windows``: ``ds.windows(60)`` (60 s tumbling, service x name, p50/p95/p99,
  error rate). Peer: pandas, the same files, ``groupby([window, service,
  name])`` with the three quantiles.
* ``service_graph``: ``ds.service_graph()``. Peer: pandas, the spans merged
  with their parents on (trace_id, parent_span_id), cross-service pairs counted.
* ``sql count``: ``ds.sql("SELECT service, count(*) ... GROUP BY service")``.
  Peer: DuckDB over the Arrow table ``read_all`` gives.

"lazy" is ``knhk.open(path, lazy=True)``, "eager" ``lazy=False`` (what
``knhk.open`` did before: every batch read and kept at open). For ``sql
count`` a third row, ``verify=False``, shows what the first pass's checksums
cost (the peer checks none). The ratio is
knhk / peer: below 1 is faster / smaller than the peer.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result

QUICK = 1_000_000
FULL = 5_000_000

_PRELUDE = r"""
import json, resource, sys, time
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.ipc as ipc, duckdb, knhk
paths = sys.argv[2:]
what = sys.argv[1]
SQL = "SELECT service, count(*) AS n FROM spans GROUP BY service ORDER BY service"

def table(columns=None):
    tables = [ipc.open_file(p).read_all() for p in paths]
    t = pa.concat_tables(tables)
    return t if columns is None else t.select(columns)

def frame(columns):
    df = table(columns).to_pandas()
    for c in ("service", "name"):
        if c in df:
            df[c] = df[c].astype(str)
    return df

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
mode, op = what.split(":")
if mode in ("lazy", "eager", "unverified"):
    ds = knhk.open(paths, lazy=(mode != "eager"), verify=(mode != "unverified"))
    if op == "summary":
        out = ds.summary()["spans"]
    elif op == "windows":
        out = int(pa.compute.sum(ds.windows(60.0).column("count")).as_py())
    elif op == "service_graph":
        out = int(pa.compute.sum(ds.service_graph().column("calls")).as_py())
    else:
        out = int(pa.compute.sum(ds.sql(SQL).column("n")).as_py())
elif op == "summary":
    df = frame(["trace_id", "service", "name", "start_time_ns", "end_time_ns", "status_code"])
    df["dur"] = df["end_time_ns"] - df["start_time_ns"]
    g = df.groupby(["service", "name"])["dur"]
    top = pd.DataFrame({"count": g.size(), "p99": g.quantile(0.99)}).nlargest(10, "p99")
    _ = (df["trace_id"].nunique(), df["start_time_ns"].min(), df["end_time_ns"].max(),
         (df["status_code"] == 2).mean(), sorted(df["service"].unique()), top)
    out = len(df)
elif op == "windows":
    df = frame(["service", "name", "start_time_ns", "end_time_ns", "status_code"])
    df["dur"] = (df["end_time_ns"] - df["start_time_ns"]) / 1e6
    df["w"] = df["start_time_ns"] // 60_000_000_000
    df["err"] = df["status_code"] == 2
    g = df.groupby(["w", "service", "name"])
    res = g["dur"].quantile([0.5, 0.95, 0.99]).unstack()
    res["count"] = g.size()
    res["error_rate"] = g["err"].mean()
    out = int(res["count"].sum())
elif op == "service_graph":
    df = frame(["trace_id", "span_id", "parent_span_id", "service"])
    parents = df[["trace_id", "span_id", "service"]].rename(
        columns={"span_id": "parent_span_id", "service": "client"})
    edges = df.merge(parents, on=["trace_id", "parent_span_id"])
    edges = edges[edges["client"] != edges["service"]]
    out = int(edges.groupby(["client", "service"]).size().sum())
else:
    spans = table()
    out = int(duckdb.sql(SQL).fetchnumpy()["n"].sum())
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_mb": peak - base, "out": out}))
"""


def write_recording(directory: str, n: int) -> list[str]:
    from knhk.exporters.ipc import IpcExporter
    from knhk.workload import WorkloadConfig, generate_batches

    rec = IpcExporter(directory)
    for b in generate_batches(n, config=WorkloadConfig(seed=11), batch_size=50_000):
        rec.export(b)
    rec.shutdown()
    return list(rec.files)


def measure(what: str, paths: list[str], runs: int) -> tuple[float, float, int]:
    """Median seconds, median peak RSS (MB) and the result of ``what`` in fresh processes."""
    secs, peaks, outs = [], [], set()
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", _PRELUDE, what, *paths],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        secs.append(r["seconds"])
        peaks.append(r["peak_mb"])
        outs.add(r["out"])
    if len(outs) != 1:
        raise RuntimeError(f"{what} gave different results across runs: {outs}")
    return statistics.median(secs), statistics.median(peaks), outs.pop()


_LABEL = {"lazy": "lazy", "eager": "eager", "unverified": "lazy, verify=False"}
_PEERS = {"summary": "pandas (pyarrow read_all, groupby quantile)",
          "windows": "pandas (pyarrow read_all, groupby window x key quantiles)",
          "service_graph": "pandas (pyarrow read_all, merge with parents, groupby)",
          "sql count": "DuckDB over the pyarrow table read_all gives"}


def scenarios(quick: bool = False) -> list[Result]:
    n = int(os.environ.get("KNHK_BENCH_ANALYSIS_SPANS", QUICK if quick else FULL))
    runs = 3
    out: list[Result] = []
    directory = tempfile.mkdtemp(prefix="knhk-bench-analysis-")
    try:
        paths = write_recording(directory, n)
        size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        for op in ("summary", "windows", "service_graph", "sql count"):
            key = op.replace(" ", "_")
            peer_s, peer_mb, peer_out = measure(f"peer:{key}", paths, runs)
            figures = {}
            modes = ("lazy", "eager", "unverified") if op == "sql count" else ("lazy", "eager")
            for mode in modes:
                s, mb, got = measure(f"{mode}:{key}", paths, runs)
                if got != peer_out:
                    raise RuntimeError(f"{op}: knhk {mode} gave {got}, the peer {peer_out}")
                figures[mode] = (s, mb)
            note = (f"{n:,} spans, {len(paths)} file(s), {size_mb:,.0f} MB on disk; "
                    f"median of {runs} fresh processes, open included")
            for mode in modes:
                s, mb = figures[mode]
                out.append(Result(f"{op}: time, {_LABEL[mode]}", "s", s, peer_s, _PEERS[op],
                                  runs=runs, notes=note if mode == "lazy" else "",
                                  extra={"spans": n, "files": len(paths)}))
            for mode in modes:
                s, mb = figures[mode]
                out.append(Result(f"{op}: peak RSS above imports, {_LABEL[mode]}", "MB", mb,
                                  peer_mb, None, runs=runs))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


if __name__ == "__main__":
    for r in scenarios(quick="--quick" in sys.argv):
        print(r.as_dict())
