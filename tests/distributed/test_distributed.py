"""knhk.distributed on a real LocalCluster of two worker processes, against single-process knhk.

Every expected value is computed by the single-process machinery the
distributed job must agree with (StreamProcessor, knhk.tracing, the
validator, TailSampler) or by NumPy from the raw durations, over the very
files the job reads. One cluster serves the module (starting one costs about
a second); the tests that kill workers run last and start their own.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pytest

import knhk
from knhk.distributed import (
    BATCH_LATENESS,
    DistributedJobError,
    SchedulerUnreachableError,
    analyze,
    analyze_local,
    connect,
    trace_order,
)
from knhk.errors import SchemaError
from knhk.exporters.ipc import IpcExporter
from knhk.replay import read_batches
from knhk.stream import StreamProcessor, WindowConfig
from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig
from knhk.tracing import assemble
from knhk.workload import WorkloadConfig, generate_batches

REGISTRY = Path(__file__).resolve().parents[2] / "registry"
KEYS = [("window_start", "ascending"), ("service", "ascending"), ("name", "ascending")]
WINDOW = WindowConfig.tumbling(seconds=1)
QS = (0.5, 0.95, 0.99)


def _record(directory: Path, n: int, seed: int, max_bytes: int) -> list[str]:
    rec = IpcExporter(directory, max_bytes=max_bytes)
    for b in generate_batches(n, config=WorkloadConfig(seed=seed), batch_size=2_500):
        rec.export(b)
    rec.shutdown()
    return list(rec.files)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = _record(tmp_path_factory.mktemp("spans"), 12_000, seed=5, max_bytes=250_000)
    assert len(out) >= 3  # several partitions, or nothing is merged
    return out


@pytest.fixture(scope="module")
def batches(files: list[str]) -> list[knhk.SpanBatch]:
    return list(read_batches(files))


@pytest.fixture(scope="module")
def client():
    c = connect("local:2")
    yield c
    c.close()


def _sorted(t: pa.Table) -> pa.Table:
    return t.take(pc.sort_indices(t, KEYS))


def _processor(batches: list[knhk.SpanBatch], mode: str) -> pa.Table:
    sp = StreamProcessor(WindowConfig.tumbling(seconds=1, allowed_lateness=BATCH_LATENESS),
                         mode=mode, quantiles=QS)
    for b in batches:
        sp.process_batch(b)
    sp.flush()
    assert sp.counters()["late_events"] == 0
    return _sorted(sp.get_results(as_table=True))


def test_connect_refuses_bad_addresses() -> None:
    for bad in ("localhost:8786", "local:", "local:-1", "tcp://", 8786):
        with pytest.raises(ValueError, match="local:N"):
            connect(bad)


def test_unreachable_scheduler_fails_within_the_timeout() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match=f"127.0.0.1:{port} within 1 s"):
        connect(f"tcp://127.0.0.1:{port}", timeout=1.0)
    assert time.monotonic() - t0 < 8.0


def test_aggregates_exact_columns_equal_single_process(client, files, batches) -> None:
    res = analyze(files, client, what=("aggregates",), window=WINDOW, quantiles=QS)
    assert res.spans == sum(b.num_rows for b in batches) == 12_000
    assert res.files == len(files)
    got, exact = _sorted(res.aggregates), _processor(batches, "exact")
    assert got.column_names == exact.column_names
    assert got.num_rows == exact.num_rows > 10
    for name in ("window_start", "window_end", "service", "name", "count", "sum", "avg",
                 "min", "max", "error_rate", "throughput"):
        assert got.column(name).equals(exact.column(name)), name
    assert pc.sum(got.column("error_rate")).as_py() > 0  # errors were there to count


def test_sketched_quantiles_within_alpha(client, files, batches) -> None:
    alpha = 0.01
    res = analyze(files, client, what=("aggregates",), window=WINDOW, quantiles=QS,
                  alpha=alpha)
    got = _sorted(res.aggregates)
    # the merged sketches hold the very buckets one sketch over everything holds
    sketch = _processor(batches, "sketch")
    for q in QS:
        name = f"p{round(q * 100)}_duration_ms"
        assert got.column(name).equals(sketch.column(name))
    # and each estimate is within alpha of the order statistic it stands for
    whole = knhk.SpanBatch.concat(batches)
    start = whole.column("start_time_ns").to_numpy()
    dur_ms = (whole.column("end_time_ns").to_numpy() - start) / 1e6
    win = start // WINDOW.size_ns * WINDOW.size_ns
    svc = np.array(whole.column("service").to_pylist(), dtype=object)
    op = np.array(whole.column("name").to_pylist(), dtype=object)
    checked = 0
    for row in got.to_pylist():
        v = np.sort(dur_ms[(win == row["window_start"]) & (svc == row["service"])
                           & (op == row["name"])])
        assert v.size == row["count"]
        for q in QS:
            true = v[math.floor(q * (v.size - 1))]
            est = row[f"p{round(q * 100)}_duration_ms"]
            assert abs(est - true) <= alpha * true + 1e-12, (row["service"], row["name"], q)
            checked += 1
    assert checked > 30


def test_exact_quantiles_through_a_shuffle(client, files, batches) -> None:
    res = analyze(files, client, what=("aggregates",), window=WINDOW, quantiles=QS,
                  exact_quantiles=True, buckets=3)
    assert _sorted(res.aggregates).equals(_processor(batches, "exact"))
    assert res.shuffle_bytes == 17 * res.spans  # group id, duration, error flag per span


def test_sliding_windows_equal_single_process(client, files, batches) -> None:
    window = WindowConfig.sliding(size=2, slide=1)
    res = analyze(files, client, what=("aggregates",), window=window, exact_quantiles=True)
    sp = StreamProcessor(WindowConfig.sliding(size=2, slide=1, allowed_lateness=BATCH_LATENESS))
    for b in batches:
        sp.process_batch(b)
    sp.flush()
    assert _sorted(res.aggregates).equals(_sorted(sp.get_results(as_table=True)))


def test_trace_analysis_equals_single_process(client, files, batches) -> None:
    res = analyze(files, client, what=("traces",), buckets=5)
    ts = assemble(knhk.SpanBatch.concat(batches))
    cp = ts.critical_paths()
    by_id = [("trace_id", "ascending")]  # a stable sort: sections keep their order
    assert res.critical_paths.take(pc.sort_indices(res.critical_paths, by_id)).equals(
        cp.take(pc.sort_indices(cp, by_id)))
    # the documented order: by trace hash, then trace id, whatever the bucket count
    assert res.critical_paths.equals(cp.take(pa.array(trace_order(cp))))
    assert res.service_graph.equals(ts.service_call_graph())
    assert res.latency_breakdown.equals(ts.latency_breakdown())
    assert res.traces == len(ts) > 100
    assert res.trace_anomalies == ts.anomalies()
    assert res.aggregates is None and res.validation is None
    # every span crossed the shuffle once, as Arrow columns of the analysis only
    assert 20 < res.shuffle_bytes_per_span < 200


def test_validation_counts_equal_single_process(client, files, batches) -> None:
    res = analyze(files, client, what=("validation",), registry=REGISTRY)
    v = knhk.WeaverValidator(str(REGISTRY))
    findings: dict[str, int] = {}
    levels: dict[str, int] = {}
    invalid = 0
    for b in batches:
        report = v.validate_batch(b)
        invalid += report.num_invalid
        for k, n in report.counts.items():
            findings[k] = findings.get(k, 0) + n
        for k, n in report.level_counts().items():
            levels[k] = levels.get(k, 0) + n
    assert findings  # the workload does break conventions
    assert res.validation == {"spans": 12_000, "rows_invalid": invalid,
                              "findings": findings, "levels": levels}


def test_tail_sampling_whole_traces(client, files, batches, tmp_path: Path) -> None:
    cfg = TailSamplingConfig([Policy.status_code("errors", ["ERROR"]),
                              Policy.latency("slow", threshold_ms=200),
                              Policy.probabilistic("some", sampling_percentage=5)])
    res = analyze(files, client, what=("tail_sampling",), tail_sampling=cfg,
                  sampled_output=tmp_path / "kept")
    whole = knhk.SpanBatch.concat(batches)
    mask = TailSampler(cfg).sample_mask(whole)
    kept = whole.filter(pa.array(mask))
    ts = res.tail_sampling
    assert 0 < ts["spans_sampled"] == int(mask.sum()) < whole.num_rows
    assert ts["traces_sampled"] == len(kept.column("trace_id").unique())
    assert ts["traces"] == len(whole.column("trace_id").unique())
    written = knhk.SpanBatch.concat(list(read_batches(ts["files"])))
    assert sorted(written.column("span_id").to_pylist()) == \
        sorted(kept.column("span_id").to_pylist())
    assert set(written.attribute("tailsampling.policy").to_pylist()) <= {"errors", "slow", "some"}


def test_stateful_tail_policies_are_refused(client, files) -> None:
    cfg = TailSamplingConfig([Policy.rate_limiting("budget", spans_per_second=10)])
    with pytest.raises(ValueError, match="budget"):
        analyze(files, client, what=("tail_sampling",), tail_sampling=cfg)


def test_local_run_equals_cluster_run(client, files) -> None:
    kw = dict(what=("aggregates", "traces"), window=WINDOW, buckets=4)
    a, b = analyze(files, client, **kw), analyze_local(files, **kw)
    assert a.aggregates.equals(b.aggregates)
    assert a.critical_paths.equals(b.critical_paths)
    assert a.shuffle_bytes == b.shuffle_bytes


def test_a_file_of_another_schema_version_is_named(client, files, tmp_path: Path) -> None:
    rb = next(iter(read_batches(files[0]))).record_batch
    meta = dict(rb.schema.metadata)
    meta[b"knhk.schema"] = b"spans/0"
    old = tmp_path / "old-spans.arrow"
    with ipc.new_file(old, rb.schema.with_metadata(meta)) as w:
        w.write_batch(rb)
    with pytest.raises(SchemaError, match=r"old-spans\.arrow \(spans/0\)") as info:
        analyze([*files, str(old)], client, what=("aggregates",))
    assert "mix schema versions" in str(info.value)


def test_a_damaged_file_fails_the_job_naming_it(client, files, tmp_path: Path) -> None:
    from knhk.errors import CorruptFileError

    cut = tmp_path / "cut-spans.arrow"
    data = Path(files[1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cut-spans\.arrow"):
        analyze([files[0], str(cut)], client, what=("aggregates",))


def test_summary_reports_what_was_computed(client, files) -> None:
    res = analyze(files, client, what=("aggregates", "traces"), window=WINDOW)
    text = res.summary(rows=3)
    assert f"{len(files)} files, 12,000 spans" in text
    assert f"({res.shuffle_bytes_per_span:.1f} per span)" in text
    assert "service graph:" in text and "aggregates:" in text
    assert "validation" not in text and "tail sampling" not in text


def test_bad_arguments_fail_before_any_work(client, files) -> None:
    with pytest.raises(ValueError, match="session"):
        analyze(files, client, window=WindowConfig.session(gap=5))
    with pytest.raises(ValueError, match="registry="):
        analyze(files, client, what=("validation",))
    with pytest.raises(ValueError, match="what must name"):
        analyze(files, client, what=("everything",))
    with pytest.raises(FileNotFoundError):
        analyze(["/nonexistent/x.arrow"], client)


# -- workers dying mid-job (last: they disturb the cluster) ----------------------------------


def _kill_a_reader(c, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first worker seen running a file-reading task."""
    pids = c.run(os.getpid)
    while not stop.is_set():
        for addr, keys in c.processing().items():
            if any(str(k).startswith("knhk-read") for k in keys):
                os.kill(pids[addr], signal.SIGKILL)
                killed.append(pids[addr])
                return
        time.sleep(0.002)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    # enough reading that a kill lands while a file is being read
    return _record(tmp_path_factory.mktemp("big"), 60_000, seed=9, max_bytes=300_000)


def test_a_worker_killed_mid_job_is_replaced_and_the_result_is_whole(client, big_files) -> None:
    expected = analyze_local(big_files, what=("aggregates", "traces"), window=WINDOW)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_reader, args=(client, stop, killed))
    killer.start()
    try:
        res = analyze(big_files, client, what=("aggregates", "traces"), window=WINDOW)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught reading: the test proved nothing"
    assert res.spans == expected.spans == 60_000
    assert res.aggregates.equals(expected.aggregates)
    assert res.critical_paths.equals(expected.critical_paths)
    # the restarted worker got the allocator plugin too
    client.wait_for_workers(2, timeout=30)
    assert all(client.run(_has_allocator_plugin).values())


def _has_allocator_plugin(dask_worker) -> bool:
    return "knhk-allocator" in dask_worker.plugins


def test_a_job_whose_workers_keep_dying_fails_clearly(big_files) -> None:
    import dask
    import distributed  # noqa: F401 -- its config defaults must exist before they are overridden

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        c = connect("local:1")
    try:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_a_reader, args=(c, stop, killed))
        killer.start()
        try:
            with pytest.raises(DistributedJobError, match="no partial result") as info:
                analyze(big_files, c, what=("aggregates",))
        finally:
            stop.set()
            killer.join()
        assert killed
        assert ".arrow" in str(info.value)  # names the file whose task died
    finally:
        c.close()
