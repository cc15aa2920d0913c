"""IpcExporter and IpcFileWriter: real files in tmp_path, read back by plain pyarrow.

pyarrow's own IPC readers (``pyarrow.ipc.open_file`` / ``open_stream``) are
the independent peer: what knhk writes must read back with them to the values
the batches held, computed here from the input batches' ``to_pylist``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from knhk_testing import ipc_messages

import knhk
from knhk import AttributeValue, ExportResult, MetricKind, MetricPoint, Span, SpanBatch
from knhk.exporters.ipc import IpcExporter, IpcFileWriter
from knhk.metrics import MetricBuffer
from knhk.replay import read_batches

NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<signal>spans|metrics)-(?P<stamp>\d{8}T\d{6}Z)-"
                     r"(?P<seq>\d{6})\.arrow$")


def varied_spans(offset: int, n: int) -> list[Span]:
    """Spans whose dictionaries differ from one ``offset`` to the next."""
    out = []
    for i in range(n):
        j = i + offset
        attrs = {
            f"key.{j % 5}": f"value-{(j * 7) % 13}",
            "http.response.status_code": 200 + j % 3,
            "ratio": j / 7,
            "flag": j % 2 == 0,
            "blob": bytes([j % 256, 0, 255]),
            "list": [j, j + 1],
            "names": [f"n{j % 4}", "x"],
            "nested": {"a": j, "b": [True, False]},
            "pinned": AttributeValue.double(j),
        }
        out.append(Span(
            f"op-{j % 7}", trace_id=1000 + j // 3, span_id=j + 1,
            parent_span_id=None if j % 3 == 0 else j,
            start_time_ns=1_700_000_000_000_000_000 + j * 1_000, duration_ns=100 + j,
            attributes=attrs if j % 4 else None,
            kind=j % 6, status=j % 3, status_message=None if j % 3 != 2 else f"boom {j % 2}",
            service=f"svc-{j % 3}",
            events=[knhk.SpanEvent(f"ev-{j % 2}", 1_700_000_000_000_000_000 + j,
                                   {"ek": f"e{j}", "n": j})] if j % 2 else None,
            links=[knhk.SpanLink(99, j + 7, f"ts={j % 2}", 1, {"lk": f"l{j % 3}"})]
            if j % 5 == 0 else None,
            trace_state=None if j % 2 else f"vendor=v{j % 3}",
            resource_attributes={"host.name": f"host-{j % 2}"} if j % 3 else None,
            scope_name="scope.a" if j % 2 else None,
            scope_version="1.0" if j % 2 else None,
        ))
    return out


def span_batches() -> list[SpanBatch]:
    return [SpanBatch.from_spans(varied_spans(off, n))
            for off, n in ((0, 12), (5, 20), (40, 7), (3, 1))]


def metric_batches() -> list[knhk.MetricBatch]:
    buffer = MetricBuffer(batch_size=1000, capacity=10_000, service="svc")
    out = []
    for round_ in range(2):
        for i in range(6):
            buffer.append(MetricPoint(f"requests.{(i + round_) % 4}", i + 0.5,
                                      kind=MetricKind.COUNTER, unit="1",
                                      attributes={"route": f"/r/{i + round_}"},
                                      time_ns=1_000 + i))
        buffer.append(MetricPoint("latency", kind=MetricKind.HISTOGRAM, bounds=[1.0, 5.0],
                                  bucket_counts=[1, 2, round_], sum=9.0, time_ns=5,
                                  description="request latency", unit="ms"))
        buffer.seal()
        out.extend(knhk.MetricBatch(rb) for rb in buffer.drain(0.0))
    return out


def rows(batches) -> list[dict]:
    return [r for b in batches for r in b.to_pylist()]


def pyarrow_rows(paths: list[str]) -> list[dict]:
    """What plain pyarrow reads from finished IPC files."""
    return [r for p in paths for r in ipc.open_file(p).read_all().to_pylist()]


# -- round trips ----------------------------------------------------------------------------


def test_span_batches_with_different_dictionaries_round_trip_exactly(tmp_path):
    batches = span_batches()
    names = [b.column("name").dictionary.to_pylist() for b in batches]
    assert names[0] != names[1]  # the batches really carry different dictionaries
    exporter = IpcExporter(tmp_path, compression="lz4")
    for b in batches:
        assert exporter.export(b) is ExportResult.SUCCESS
    exporter.shutdown()
    assert len(exporter.files) == 1

    # the independent reader sees every value, in order
    assert pyarrow_rows(exporter.files) == rows(batches)
    # knhk's reader gives back the very batches (dictionaries included)
    back = list(read_batches(exporter.files))
    assert [b.num_rows for b in back] == [b.num_rows for b in batches]
    for got, want in zip(back, batches, strict=True):
        assert isinstance(got, SpanBatch)
        assert got.record_batch.equals(want.record_batch)
        assert got.to_spans() == want.to_spans()


def test_two_batches_with_disjoint_dictionaries_read_by_plain_pyarrow(tmp_path):
    a = SpanBatch.from_spans([Span("alpha", trace_id=1, span_id=1, service="s1",
                                   attributes={"k": "x"}),
                              Span("beta", trace_id=1, span_id=2, service="s1")])
    b = SpanBatch.from_spans([Span("gamma", trace_id=2, span_id=3, service="s2",
                                   attributes={"other": "y", "k": "z"}),
                              Span("alpha", trace_id=2, span_id=4, service="s2")])
    path = tmp_path / "two.arrow"
    with IpcFileWriter(path, knhk.SPAN_SCHEMA, compression=None) as w:
        w.write(a)
        w.write(b)
    reader = ipc.open_file(path)
    assert reader.num_record_batches == 2
    got = [reader.get_batch(i) for i in range(2)]
    assert got[0].column("name").to_pylist() == ["alpha", "beta"]
    assert got[1].column("name").to_pylist() == ["gamma", "alpha"]
    assert got[1].column("service").to_pylist() == ["s2", "s2"]
    assert [r["attributes"] for r in got[1].to_pylist()] == \
        [r["attributes"] for r in b.to_pylist()]
    # one dictionary per field in the file, extended by deltas: never replaced
    assert reader.stats.num_replaced_dictionaries == 0
    assert reader.stats.num_dictionary_deltas >= 2


def test_metric_batches_round_trip_to_their_own_files(tmp_path):
    spans = span_batches()[:2]
    metrics = metric_batches()
    assert len(metrics) == 2
    exporter = IpcExporter(tmp_path, prefix="mix", compression="zstd")
    for s, m in zip(spans, metrics, strict=True):
        assert exporter.export(s) is ExportResult.SUCCESS
        assert exporter.export(m) is ExportResult.SUCCESS
    exporter.shutdown()
    by_signal = {NAME_RE.match(os.path.basename(p))["signal"]: p for p in exporter.files}
    assert set(by_signal) == {"spans", "metrics"}
    assert pyarrow_rows([by_signal["metrics"]]) == rows(metrics)
    assert pyarrow_rows([by_signal["spans"]]) == rows(spans)
    back = list(read_batches(by_signal["metrics"]))
    assert all(isinstance(b, knhk.MetricBatch) for b in back)
    for got, want in zip(back, metrics, strict=True):
        assert got.record_batch.equals(want.record_batch)


def test_sliced_and_filtered_batches_keep_their_values(tmp_path):
    big = SpanBatch.from_spans(varied_spans(0, 40))
    sliced = big.slice(13, 9)                     # offsets inside every nested column
    filtered = big.filter(np.arange(40) % 3 == 0)  # dictionaries keep unused values
    exporter = IpcExporter(tmp_path)
    for b in (sliced, filtered, big.slice(39, 1)):
        assert exporter.export(b) is ExportResult.SUCCESS
    exporter.shutdown()
    want = rows([sliced, filtered, big.slice(39, 1)])
    assert pyarrow_rows(exporter.files) == want
    assert rows(read_batches(exporter.files)) == want


def test_schema_metadata_is_in_the_file(tmp_path):
    exporter = IpcExporter(tmp_path)
    exporter.export(span_batches()[0])
    exporter.export(metric_batches()[0])
    exporter.shutdown()
    for path in exporter.files:
        schema = ipc.open_file(path).schema
        signal = NAME_RE.match(os.path.basename(path))["signal"]
        expected = knhk.SPAN_SCHEMA if signal == "spans" else knhk.METRIC_SCHEMA
        assert schema.equals(expected, check_metadata=True)
        assert schema.metadata[b"knhk.schema"] == expected.metadata[b"knhk.schema"]


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_files_are_readable_by_plain_pyarrow_and_smaller(tmp_path, compression):
    spans = [Span(f"op-{i % 5}", trace_id=1 + i // 10, span_id=i + 1,
                  start_time_ns=1_700_000_000_000_000_000 + i * 1000, duration_ns=500,
                  attributes={"http.route": f"/api/{i % 7}", "http.request.method": "GET"})
             for i in range(3000)]
    batches = [SpanBatch.from_spans(spans[i:i + 1000]) for i in range(0, 3000, 1000)]
    sizes = {}
    for comp in (compression, None):
        exporter = IpcExporter(tmp_path / str(comp), compression=comp)
        for b in batches:
            assert exporter.export(b) is ExportResult.SUCCESS
        exporter.shutdown()
        assert pyarrow_rows(exporter.files) == rows(batches)
        sizes[comp] = sum(os.path.getsize(p) for p in exporter.files)
    assert sizes[compression] * 2 < sizes[None]


# -- rotation ---------------------------------------------------------------------------------


def test_rotation_by_size_spreads_batches_over_sorted_files(tmp_path):
    batches = [SpanBatch.from_spans(varied_spans(off, 30)) for off in range(0, 300, 30)]
    exporter = IpcExporter(tmp_path, prefix="size", max_bytes=30_000)
    for b in batches:
        assert exporter.export(b) is ExportResult.SUCCESS
    exporter.shutdown()
    files = exporter.files
    assert len(files) >= 3
    assert sorted(files) == files                  # names sort in creation order
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in files]
    counts = [ipc.open_file(p).num_record_batches for p in files]
    assert sum(counts) == len(batches)
    assert pyarrow_rows(files) == rows(batches)
    # every file but the last was closed by the batch that took it past max_bytes
    for path in files[:-1]:
        batch_messages = [(t, a, d) for t, a, _, d in ipc_messages(path)
                          if t == "record batch"]
        before_last = batch_messages[-2][2] if len(batch_messages) > 1 else 0
        assert before_last < 30_000 <= batch_messages[-1][2]
    for path in files:
        m = NAME_RE.match(os.path.basename(path))
        assert m and m["prefix"] == "size" and m["signal"] == "spans"
    assert [int(NAME_RE.match(os.path.basename(p))["seq"]) for p in files] == \
        list(range(1, len(files) + 1))


def test_rotation_by_time_with_an_injected_clock(tmp_path):
    now = [100.0]
    exporter = IpcExporter(tmp_path, max_seconds=10, clock=lambda: now[0])
    batches = span_batches()
    exporter.export(batches[0])          # opens file 1 at t=100
    now[0] = 109.9
    exporter.export(batches[1])          # still file 1
    now[0] = 110.0
    exporter.export(batches[2])          # file 1 has been open 10 s: file 2
    now[0] = 115.0
    exporter.export(batches[3])
    exporter.shutdown()
    files = exporter.files
    assert len(files) == 2
    assert [ipc.open_file(p).num_record_batches for p in files] == [2, 2]
    assert pyarrow_rows(files) == rows(batches)


def test_an_idle_file_is_closed_by_the_timer(tmp_path):
    exporter = IpcExporter(tmp_path, max_seconds=0.05)
    try:
        exporter.export(span_batches()[0])
        path = exporter.files[0]
        deadline = time.monotonic() + 2.0
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                closed = ipc.open_file(path).num_record_batches == 1  # footer written
            except pa.ArrowInvalid:
                time.sleep(0.02)
        assert closed, "the timer never wrote the footer of the idle file"
        assert exporter.export(span_batches()[1]) is ExportResult.SUCCESS
        assert len(exporter.files) == 2
    finally:
        exporter.shutdown()
    assert pyarrow_rows(exporter.files) == rows(span_batches()[:2])


def test_large_dictionaries_rotate_the_file(tmp_path):
    unique = [SpanBatch.from_spans([Span("op", trace_id=1, span_id=i + 1 + 100 * k,
                                         attributes={"url": f"/item/{k}/{i}" + "x" * 40})
                                    for i in range(100)]) for k in range(6)]
    exporter = IpcExporter(tmp_path, max_dictionary_bytes=10_000)
    for b in unique:
        assert exporter.export(b) is ExportResult.SUCCESS
    exporter.shutdown()
    # ~5 kB of new strings per batch: a new file every second batch
    assert [ipc.open_file(p).num_record_batches for p in exporter.files] == [2, 2, 2]
    assert pyarrow_rows(exporter.files) == rows(unique)


# -- lifecycle and failures ----------------------------------------------------------------


def test_export_after_shutdown_and_wrong_types_fail_without_raising(tmp_path):
    exporter = IpcExporter(tmp_path)
    assert exporter.force_flush(1.0) is True
    assert exporter.export(pa.record_batch({"x": [1]})) is ExportResult.FAILURE
    assert exporter.export(SpanBatch.empty()) is ExportResult.SUCCESS
    assert exporter.files == []                  # nothing to write, no file
    exporter.shutdown()
    exporter.shutdown()                          # idempotent
    assert exporter.export(span_batches()[0]) is ExportResult.FAILURE
    assert exporter.force_flush() is False
    assert exporter.failures == 2


def test_directory_removed_counts_failures_in_the_pipeline(tmp_path):
    target = tmp_path / "out"
    recorder = IpcExporter(target, max_bytes=1)   # every batch closes its file
    sink = knhk.InMemoryExporter()
    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(5)
                .with_exporter(recorder).with_exporter(sink).build())
    try:
        for i in range(1, 11):
            pipeline.record_span(Span("before", trace_id=i, span_id=i))
        assert pipeline.force_flush(5.0)
        written = recorder.files
        assert len(written) == 2
        for p in written:
            os.remove(p)
        os.rmdir(target)
        for i in range(11, 21):
            pipeline.record_span(Span("after", trace_id=i, span_id=i))
        pipeline.force_flush(5.0)
    finally:
        pipeline.shutdown(5.0)
    stats = pipeline.stats()
    assert stats.export_errors == 2              # two batches of 5 could not be written
    assert stats.exporters["ipc"]["events_failed"] == 10
    assert recorder.failures == 2
    assert "FileNotFoundError" in recorder.last_error
    assert sink.spans().num_rows == 20           # the other exporter was not disturbed


def _run_with_file_size_limit(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a child whose files cannot grow past ``LIMIT`` bytes.

    A real write error: RLIMIT_FSIZE makes write() fail with EFBIG past the
    limit, as a full disk fails with ENOSPC. A child, so the limit binds
    nothing else. ``body`` finds ``span_batches`` and ``IpcExporter`` in scope
    and calls ``limit(n)`` to set the limit.
    """
    here = os.path.dirname(__file__)
    script = textwrap.dedent(f"""
        import json, os, resource, signal, sys
        sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]  # test_ipc, knhk_testing
        from test_ipc import span_batches
        from knhk.exporters.ipc import IpcExporter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        def limit(n):
            resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
    """) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "File too large" in done.stderr  # the exporter logged the OS error
    return done


def test_disk_full_mid_file_fails_the_batch_and_keeps_the_batches_before(tmp_path):
    done = _run_with_file_size_limit(f"""
        limit(60_000)
        e = IpcExporter({str(tmp_path)!r}, compression=None)
        print(json.dumps([e.export(b).name for b in span_batches() * 3]))
        print(e.failures, e.files[0])
    """)
    results_line, tail = done.stdout.strip().splitlines()
    results = json.loads(results_line)
    first_failure = results.index("FAILURE")
    assert first_failure > 0 and set(results[:first_failure]) == {"SUCCESS"}
    failures, first_file = tail.split(" ", 1)
    assert int(failures) == results.count("FAILURE")
    # the first file holds exactly the batches that succeeded: the half-written message
    # of the failed write was cut off, so it reads back whole (as a file with no footer)
    got = list(read_batches(first_file))
    assert len(got) == first_failure
    assert rows(got) == rows(span_batches() * 3)[:sum(b.num_rows for b in got)]


def test_disk_full_at_the_footer_keeps_the_batch(tmp_path):
    done = _run_with_file_size_limit(f"""
        batch = span_batches()[0]
        from knhk import SPAN_SCHEMA
        from knhk.exporters.ipc import IpcFileWriter
        probe = IpcFileWriter({str(tmp_path / "probe.arrow")!r}, SPAN_SCHEMA, compression=None)
        probe.write(batch)
        before_footer = probe.nbytes
        probe.close()
        limit(before_footer + 12)   # room for the end-of-stream marker, not the footer
        e = IpcExporter({str(tmp_path / "out")!r}, compression=None, max_bytes=1)
        print(json.dumps([e.export(batch).name for _ in range(2)]))
        print(e.failures)
    """)
    results_line, failures = done.stdout.strip().splitlines()
    assert json.loads(results_line) == ["SUCCESS", "SUCCESS"]
    assert int(failures) == 2
    files = sorted(str(p) for p in (tmp_path / "out").iterdir())
    assert len(files) == 2
    for path in files:
        with pytest.raises(pa.ArrowInvalid):
            ipc.open_file(path)
        got = []
        with pytest.raises(knhk.CorruptFileError, match="footer"):
            for b in read_batches(path):
                got.append(b)
        assert rows(got) == rows(span_batches()[:1])


def test_concurrent_exports_from_many_threads_are_all_written(tmp_path):
    exporter = IpcExporter(tmp_path, max_bytes=40_000)
    batches = [SpanBatch.from_spans(varied_spans(100 * t + k, 5)) for t in range(4)
               for k in range(5)]
    results: list[ExportResult] = []

    def work(chunk):
        for b in chunk:
            results.append(exporter.export(b))

    threads = [threading.Thread(target=work, args=(batches[t * 5:(t + 1) * 5],))
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exporter.shutdown()
    assert results == [ExportResult.SUCCESS] * 20
    got = sorted(pyarrow_rows(exporter.files), key=lambda r: r["span_id"])
    assert got == sorted(rows(batches), key=lambda r: r["span_id"])


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"compression": "gzip"}, "compression"),
    ({"prefix": "a/b"}, "prefix"),
    ({"prefix": ""}, "prefix"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": 1.5}, "max_bytes"),
    ({"max_seconds": 0}, "max_seconds"),
    ({"max_seconds": True}, "max_seconds"),
    ({"queue_size": 0}, "queue_size"),
    ({"max_dictionary_bytes": -1}, "max_dictionary_bytes"),
])
def test_bad_arguments_are_value_errors_naming_the_argument(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        IpcExporter(tmp_path, **kwargs)


def test_file_writer_refuses_to_overwrite_and_checks_the_schema(tmp_path):
    path = tmp_path / "taken.arrow"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        IpcFileWriter(path, knhk.SPAN_SCHEMA)
    assert path.read_bytes() == b"precious"
    with IpcFileWriter(tmp_path / "m.arrow", knhk.METRIC_SCHEMA) as w, \
            pytest.raises(ValueError, match="schema"):
        w.write(span_batches()[0])


def test_queue_size_is_what_the_pipeline_uses(tmp_path):
    exporter = IpcExporter(tmp_path, queue_size=3)
    from knhk.exporters.base import ExporterWorker

    worker = ExporterWorker(exporter)
    try:
        assert worker.capacity == 3
    finally:
        worker.close(time.monotonic() + 1.0)


# -- bytes on disk ------------------------------------------------------------------------------


def _bytes_per_span(tmp_path, n_spans: int, batch_size: int) -> float:
    from knhk.workload import WorkloadConfig, generate_batches

    exporter = IpcExporter(tmp_path, compression="lz4")
    for batch in generate_batches(n_spans, config=WorkloadConfig(seed=1),
                                  batch_size=batch_size):
        assert exporter.export(batch) is ExportResult.SUCCESS
    exporter.shutdown()
    assert sum(ipc.open_file(p).count_rows() for p in exporter.files) == n_spans
    return sum(os.path.getsize(p) for p in exporter.files) / n_spans


def test_bytes_per_span_on_disk_meets_the_target(tmp_path):
    # issue 2: <= 50 bytes per span on disk with lz4 (reference workload, 10k-row batches;
    # with 1k-row batches the per-batch metadata adds ~8 bytes per span)
    assert _bytes_per_span(tmp_path, 100_000, 10_000) <= 50


def test_a_failed_write_leaves_every_exported_batch_readable(tmp_path):
    """After a write fails half way (file size limit), the file is cut back to its last
    whole batch: every batch reported SUCCESS is read back, in order."""
    script = textwrap.dedent(f"""
        import json, logging, resource, signal
        from knhk.exporters.ipc import IpcExporter
        from knhk.replay import read_batches
        from knhk.workload import WorkloadConfig, generate_batches
        logging.disable(logging.CRITICAL)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        e = IpcExporter({str(tmp_path)!r}, compression=None)
        batches = list(generate_batches(4000, config=WorkloadConfig(seed=1), batch_size=500))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
        results = [e.export(b).name for b in batches[:4]]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results += [e.export(b).name for b in batches[4:]]
        e.shutdown()
        ok = [b for b, r in zip(batches, results) if r == "SUCCESS"]
        back = list(read_batches({str(tmp_path)!r}))
        print(json.dumps({{"results": results, "ok_rows": sum(b.num_rows for b in ok),
                          "back_rows": sum(b.num_rows for b in back),
                          "same": [a.record_batch.column("span_id").to_pylist()
                                   == b.record_batch.column("span_id").to_pylist()
                                   for a, b in zip(ok, back)]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    got = json.loads(out)
    assert "FAILURE" in got["results"] and got["results"][-1] == "SUCCESS"
    assert got["back_rows"] == got["ok_rows"] > 0
    assert all(got["same"]) and len(got["same"]) == got["results"].count("SUCCESS")


def test_a_field_whose_first_batch_has_no_values_takes_values_later(tmp_path):
    """pyarrow refuses a dictionary delta against an empty dictionary: a first batch
    without scope names followed by one with them must still be written whole."""
    from knhk.otlp import decode_traces, encode_traces
    from knhk.workload import WorkloadConfig, generate

    first = SpanBatch.from_spans([Span("GET /", trace_id=1, span_id=1)])
    assert first.column("scope_name").null_count == 1
    second = decode_traces(encode_traces(generate(50, WorkloadConfig(seed=1))))
    assert second.column("scope_name").null_count < second.num_rows
    recorder = IpcExporter(str(tmp_path))
    assert recorder.export(first) is ExportResult.SUCCESS
    assert recorder.export(second) is ExportResult.SUCCESS
    recorder.shutdown()
    back = list(read_batches(recorder.files))
    assert len(recorder.files) == 1 and [b.num_rows for b in back] == [1, 50]
    for got, want in zip(back, (first, second), strict=True):
        for name in ("scope_name", "scope_version", "trace_state", "name", "service"):
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
        # the placeholder value is not visible in what the reader hands out
        assert "" not in got.column("scope_name").dictionary.to_pylist()


def test_a_higher_lz4_level_writes_fewer_bytes_and_reads_back_the_same(tmp_path):
    from knhk.replay import read_batches
    from knhk.workload import WorkloadConfig, generate_batches

    batches = list(generate_batches(40_000, config=WorkloadConfig(seed=3), batch_size=4096))
    sizes, back = {}, {}
    for level in (None, 6):
        rec = IpcExporter(tmp_path / str(level), compression="lz4", compression_level=level)
        for b in batches:
            assert rec.export(b) is ExportResult.SUCCESS
        rec.shutdown()
        sizes[level] = sum(os.path.getsize(f) for f in rec.files)
        back[level] = pa.Table.from_batches([b.record_batch for b in read_batches(rec.files)])
    assert sizes[6] < 0.9 * sizes[None]
    # the level changes the bytes, not what they hold (the default is checked against
    # the recorded spans row by row elsewhere in this file)
    assert back[6].equals(back[None]) and back[6].num_rows == 40_000
    assert back[6].column("span_id").to_pylist() == [
        x for b in batches for x in b.column("span_id").to_pylist()]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"compression": None, "compression_level": 3}, "needs a compression"),
    ({"compression": "lz4", "compression_level": "high"}, "must be an int"),
    ({"compression": "lz4", "compression_level": True}, "must be an int"),
])
def test_bad_compression_levels_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        IpcExporter(tmp_path, **kwargs)
