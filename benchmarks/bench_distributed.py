"""Distributed analysis (knhk.distributed on Dask) beside single-process knhk, same files, same run.

``python benchmarks/run.py distributed --quick`` aggregates 2,000,000 spans;
without ``--quick``, 20,000,000 (the issue's figure: take it on a quiet
machine, it needs about 1 GB of disk under $TMPDIR and a few minutes).
``KNHK_BENCH_DISTRIBUTED_SPANS`` overrides the size.

What is compared, every side reading the same lz4 Arrow IPC files
(``IpcExporter``, about 24 of them) written once before timing:

* single process, as a user would write it: ``read_batches`` into a
  ``StreamProcessor`` (sketch mode, 60 s tumbling windows, service x name);
* single process, the distributed job's own tasks run in a loop
  (``analyze_local``): the same work without Dask;
* ``analyze`` on a LocalCluster of 1 and of 2 worker processes (one thread
  each; cluster started before timing, as a cluster is in use).

Dask's overhead is the 1-worker job against ``analyze_local``; the speed-up
the 2-worker job against the faster single-process figure. The trace-id
shuffle (critical paths, service graph, latency breakdown) is measured the
same way, with its bytes per span.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate

from knhk.distributed import BATCH_LATENESS, analyze, analyze_local, connect
from knhk.exporters.ipc import IpcExporter
from knhk.replay import read_batches
from knhk.stream import StreamProcessor, WindowConfig
from knhk.workload import WorkloadConfig, generate_batches

WINDOW_S = 60
#: The issue's size: "met" is judged only at it (smaller runs are indicative).
FULL = 20_000_000


def write_files(directory: str, n: int, files: int = 24) -> list[str]:
    """``n`` workload spans as lz4 IPC files of about equal size."""
    rec = IpcExporter(directory, max_bytes=max(1 << 20, n * 48 // files))
    for b in generate_batches(n, config=WorkloadConfig(seed=10), batch_size=50_000):
        rec.export(b)
    rec.shutdown()
    return list(rec.files)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def single_stream(paths: list[str], n: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    sp = StreamProcessor(WindowConfig.tumbling(seconds=WINDOW_S, allowed_lateness=BATCH_LATENESS),
                         mode="sketch")
    for b in read_batches(paths):
        sp.process_batch(b)
    sp.flush()
    rows = sp.get_results(as_table=True)
    dt = time.perf_counter() - t0
    assert sum(rows.column("count").to_pylist()) == n
    return n, dt


def local_job(paths: list[str], n: int, what: tuple[str, ...],
              cpu: list[float] | None = None) -> tuple[int, float]:
    c0, t0 = _cpu(), time.perf_counter()
    res = analyze_local(paths, what=what, buckets=8)
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(_cpu() - c0)
    assert res.spans == n
    return n, dt


def dask_job(paths: list[str], n: int, client, what: tuple[str, ...],
             out: dict | None = None) -> tuple[int, float]:
    """One job; ``out`` collects worker and client CPU seconds and the shuffle bytes."""
    w0, c0 = client.run(_cpu), _cpu()
    t0 = time.perf_counter()
    res = analyze(paths, client, what=what)
    dt = time.perf_counter() - t0
    w1, c1 = client.run(_cpu), _cpu()
    assert res.spans == n
    if out is not None:
        out.setdefault("worker_cpu", []).append(sum(w1[k] - w0[k] for k in w1 if k in w0))
        out.setdefault("client_cpu", []).append(c1 - c0)
        out["shuffle_bytes_per_span"] = res.shuffle_bytes_per_span
        out["buckets"] = res.buckets
    return n, dt


def scenarios(quick: bool = False) -> list[Result]:
    n = int(os.environ.get("KNHK_BENCH_DISTRIBUTED_SPANS", 2_000_000 if quick else FULL))
    runs = 3
    results: list[Result] = []
    load_before = os.getloadavg()[0]  # what else was running: the run's own load comes after
    tmp = tempfile.mkdtemp(prefix="knhk-bench-distributed-")
    try:
        t0 = time.perf_counter()
        paths = write_files(tmp, n)
        written = time.perf_counter() - t0
        size = sum(os.path.getsize(p) for p in paths)
        agg = ("aggregates",)
        local_cpu: list[float] = []
        s_rate, s_all = median_rate(lambda: single_stream(paths, n), runs)
        l_rate, l_all = median_rate(lambda: local_job(paths, n, agg, local_cpu), runs)
        cpu1: dict = {}
        cpu2: dict = {}
        shuffle: dict = {}
        with connect("local:1") as c1:
            dask_job(paths, n, c1, agg)  # workers import knhk once, as a cluster in use has
            d1_rate, d1_all = median_rate(lambda: dask_job(paths, n, c1, agg, cpu1), runs)
        with connect("local:2") as c2:
            dask_job(paths, n, c2, agg)
            d2_rate, d2_all = median_rate(lambda: dask_job(paths, n, c2, agg, cpu2), runs)
            t2_rate, t2_all = median_rate(
                lambda: dask_job(paths, n, c2, ("traces",), shuffle), runs)
        lt_rate, lt_all = median_rate(lambda: local_job(paths, n, ("traces",)), runs)
        best_single = max(s_rate, l_rate)
        med = statistics.median
        l_cpu = med(local_cpu)
        w1_cpu, k1_cpu = med(cpu1["worker_cpu"]), med(cpu1["client_cpu"])
        w2_cpu = med(cpu2["worker_cpu"])
        note = (f"{n:,} spans in {len(paths)} lz4 IPC files ({size / n:.1f} B/span on disk, "
                f"written in {written:.1f} s); 60 s tumbling windows by service x name, "
                f"sketch quantiles. 1-minute load average before the run {load_before:.1f} "
                "(other work on the 2 cores: above ~0.5 the wall-clock ratios are pessimistic)")
        results.append(Result(
            "aggregate spans from IPC files, 2-worker LocalCluster vs best single process",
            "spans/s", d2_rate, best_single,
            "single process: max of StreamProcessor over read_batches and analyze_local",
            ">= 1.6x single process at 20,000,000 spans",
            d2_rate / best_single >= 1.6 if n >= FULL else None, runs,
            note, {"dask2_runs": d2_all, "stream_runs": s_all, "local_runs": l_all,
                   "stream_rate": s_rate, "local_rate": l_rate, "spans": n}))
        results.append(Result(
            "aggregate spans, 1-worker LocalCluster vs the same tasks without Dask",
            "spans/s", d1_rate, l_rate, "analyze_local (same tasks, one process, no Dask)",
            "overhead <= 15% (ratio >= 0.85) at 20,000,000 spans",
            d1_rate / l_rate >= 0.85 if n >= FULL else None, runs,
            "Dask's own cost in wall time: scheduling, result transfer, tree merge",
            {"dask1_runs": d1_all, "local_runs": l_all}))
        results.append(Result(
            "aggregate spans, CPU seconds: 1 worker (worker + client/scheduler) vs no Dask",
            "CPU s", w1_cpu + k1_cpu, l_cpu, "analyze_local, CPU seconds of the process",
            None, None, runs,
            f"worker {w1_cpu:.2f} s + client/scheduler {k1_cpu:.2f} s; CPU time does not "
            "depend on what else shares the cores",
            {"worker_cpu": cpu1["worker_cpu"], "client_cpu": cpu1["client_cpu"],
             "local_cpu": local_cpu}))
        results.append(Result(
            "per-worker throughput, aggregates (spans per worker CPU second, 2 workers)",
            "spans/s", n / w2_cpu, n / l_cpu, "one process without Dask (per CPU second)",
            None, None, runs, "the figure docs/scaling.md plans with",
            {"worker_cpu": cpu2["worker_cpu"], "client_cpu": cpu2["client_cpu"]}))
        results.append(Result(
            "aggregate spans, 1-worker LocalCluster vs StreamProcessor over read_batches",
            "spans/s", d1_rate, s_rate, "StreamProcessor(mode='sketch') fed by read_batches",
            None, None, runs, "what a user would run without knhk.distributed",
            {"stream_runs": s_all}))
        t_cpu = med(shuffle["worker_cpu"])
        results.append(Result(
            "trace analysis after the trace-id shuffle, 2-worker LocalCluster vs analyze_local",
            "spans/s", t2_rate, lt_rate,
            "analyze_local(what=('traces',)): same tasks in one process",
            None, None, runs,
            f"critical paths + service graph + latency breakdown; "
            f"{shuffle['shuffle_bytes_per_span']:.1f} shuffle B/span "
            f"(Arrow, 9 columns), {shuffle['buckets']} buckets; "
            f"{n / t_cpu:,.0f} spans per worker CPU second",
            {"dask2_runs": t2_all, "local_runs": lt_all, **shuffle}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
