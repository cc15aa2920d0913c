"""knhk.replay: reading recorded IPC files back, recovering damaged ones, replaying them.

Files are real (tmp_path), written by IpcExporter or by plain pyarrow writers;
damage is done to the bytes on disk. Offsets of IPC messages are found here
with pyarrow's own message reader, independently of the code under test.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from knhk_testing import ipc_messages

import knhk
from knhk import (
    CorruptFileError,
    ExportResult,
    MetricKind,
    MetricPoint,
    SchemaError,
    Span,
    SpanBatch,
)
from knhk.exporters.ipc import IpcExporter
from knhk.metrics import MetricBuffer
from knhk.replay import ReplayStats, read_batches, replay

T0 = 1_700_000_000_000_000_000


def spans(offset: int, n: int, *, step_ns: int = 1_000) -> list[Span]:
    return [Span(f"op-{(i + offset) % 5}", trace_id=1 + (i + offset) // 4,
                 span_id=i + offset + 1, parent_span_id=None if i % 4 == 0 else i + offset,
                 start_time_ns=T0 + (i + offset) * step_ns, duration_ns=1_000 + i,
                 service=f"svc-{(i + offset) % 3}",
                 attributes={"http.route": f"/r/{(i * 7 + offset) % 11}", "n": i,
                             "tags": [f"t{i % 3}", "x"]},
                 events=[knhk.SpanEvent("retry", T0 + i, {"attempt": i})] if i % 3 == 0
                 else None)
            for i in range(n)]


def batches(count: int = 4, size: int = 25) -> list[SpanBatch]:
    return [SpanBatch.from_spans(spans(k * size, size)) for k in range(count)]


def rows(bs) -> list[dict]:
    return [r for b in bs for r in b.to_pylist()]


def record(directory, bs, **kwargs) -> list[str]:
    exporter = IpcExporter(directory, **kwargs)
    for b in bs:
        assert exporter.export(b) is ExportResult.SUCCESS
    exporter.shutdown()
    return exporter.files


def batch_messages(path) -> list[tuple[int, int]]:
    return [(a, d) for t, a, _, d in ipc_messages(path) if t == "record batch"]


def batch_bodies(path) -> list[tuple[int, int]]:
    return [(c, d) for t, _, c, d in ipc_messages(path) if t == "record batch"]


def read_until_error(sources, **kwargs):
    got = []
    with pytest.raises(CorruptFileError) as err:
        for b in read_batches(sources, **kwargs):
            got.append(b)
    return got, err.value


# -- sources ------------------------------------------------------------------------------


def test_path_list_glob_and_directory(tmp_path):
    bs = batches(3)
    files = record(tmp_path, bs, max_bytes=1)  # one file per batch
    assert len(files) == 3
    assert rows(read_batches(files[1])) == rows(bs[1:2])
    assert rows(read_batches([files[2], files[0]])) == rows([bs[2], bs[0]])  # order given
    assert rows(read_batches(str(tmp_path / "*.arrow"))) == rows(bs)          # sorted
    assert rows(read_batches(tmp_path)) == rows(bs)
    assert rows(read_batches([str(tmp_path / "*-000003.arrow"), files[0]])) == \
        rows([bs[2], bs[0]])


def test_bad_sources_fail_before_anything_is_read(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.arrow"):
        read_batches(tmp_path / "nope.arrow")
    with pytest.raises(FileNotFoundError, match="no files match"):
        read_batches(str(tmp_path / "*.arrow"))
    with pytest.raises(FileNotFoundError, match=r"no \.arrow"):
        read_batches(tmp_path)
    with pytest.raises(ValueError, match="no sources"):
        read_batches([])
    with pytest.raises(TypeError, match="path"):
        read_batches([3])
    with pytest.raises(TypeError, match="sources"):
        read_batches(3.5)


# -- damaged files ----------------------------------------------------------------------------


@pytest.fixture
def one_file(tmp_path):
    bs = batches(4)
    (path,) = record(tmp_path / "rec", bs, compression="lz4")
    return path, bs


def _damaged(tmp_path, data: bytes, name: str = "damaged.arrow") -> str:
    out = tmp_path / name
    out.write_bytes(data)
    return str(out)


def test_cut_in_the_middle_of_the_last_batch(tmp_path, one_file):
    path, bs = one_file
    data = Path(path).read_bytes()
    regions = batch_messages(path)
    start, stop = regions[-1]
    cut = (start + stop) // 2
    damaged = _damaged(tmp_path, data[:cut])
    got, err = read_until_error(damaged)
    assert rows(got) == rows(bs[:-1])
    assert err.path == damaged and damaged in str(err)
    assert err.batches_read == 3
    # the damage starts after the third batch, at or before the cut
    assert regions[-2][1] <= err.offset <= start < cut
    assert str(err.offset) in str(err)


def test_writer_crash_without_footer_recovers_every_batch(tmp_path, one_file, caplog):
    path, bs = one_file
    data = Path(path).read_bytes()
    end_of_batches = batch_messages(path)[-1][1]
    damaged = _damaged(tmp_path, data[:end_of_batches])
    with pytest.raises(pa.ArrowInvalid):
        ipc.open_file(damaged)                    # plain pyarrow cannot read it at all
    with caplog.at_level(logging.WARNING, logger="knhk.replay"):
        got = list(read_batches(damaged))
    assert [b.record_batch.equals(w.record_batch) for b, w in zip(got, bs, strict=True)] == \
        [True] * 4
    assert "no footer" in caplog.text


def test_cut_inside_the_footer_delivers_everything_then_raises(tmp_path, one_file):
    path, bs = one_file
    data = Path(path).read_bytes()
    end_of_stream = batch_messages(path)[-1][1] + 8  # the end-of-stream marker is 8 bytes
    damaged = _damaged(tmp_path, data[:end_of_stream + (len(data) - end_of_stream) // 2])
    got, err = read_until_error(damaged)
    assert rows(got) == rows(bs)
    assert err.batches_read == 4
    assert err.offset == end_of_stream
    assert "footer" in str(err)


def _check_flip(tmp_path, data: bytes, bs, pos: int, bit: int, name: str) -> bool:
    """Flip one bit; the read must fail cleanly or give every value intact. True if it failed."""
    broken = bytearray(data)
    broken[pos] ^= 1 << bit
    damaged = _damaged(tmp_path, bytes(broken), name)
    got = []
    try:
        for b in read_batches(damaged):
            got.append(b)
    except CorruptFileError as err:
        assert err.path == damaged
        assert err.batches_read == len(got)
        # Where reading failed; a damaged length or dictionary id can show only later.
        assert 0 <= err.offset < len(data)
        assert rows(got) == rows(bs[:len(got)])
        return True
    # a flip in padding or in a field the reader ignores changes nothing
    assert rows(got) == rows(bs)
    return False


def test_random_bit_flips_in_batch_bodies_are_caught_at_their_batch(tmp_path, one_file):
    path, bs = one_file
    data = Path(path).read_bytes()
    rng = random.Random(20261127)
    regions = batch_messages(path)
    bodies = batch_bodies(path)
    previous_stop = [ipc_messages(path)[0][3]] + [stop for _, stop in regions[:-1]]
    detected = 0
    for trial in range(40):
        k = rng.randrange(len(bodies))
        pos = rng.randrange(*bodies[k])
        broken = bytearray(data)
        broken[pos] ^= 1 << rng.randrange(8)
        damaged = _damaged(tmp_path, bytes(broken), f"flip{trial}.arrow")
        got = []
        try:
            for b in read_batches(damaged):
                got.append(b)
        except CorruptFileError as err:
            detected += 1
            assert err.batches_read == k == len(got)
            # where the batch's messages (its dictionary deltas, then itself) begin
            assert err.offset == previous_stop[k]
            assert rows(got) == rows(bs[:k])
        else:  # padding, or a length field the decompressor does not need
            assert rows(got) == rows(bs)
    assert detected >= 30


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_flip_anywhere_in_the_file_neither_crashes_nor_misreads(tmp_path, compression):
    bs = batches(3, size=10)
    (path,) = record(tmp_path / "rec", bs, compression=compression)
    data = Path(path).read_bytes()
    for pos in range(0, len(data), 97):  # every byte in the slow variant below
        _check_flip(tmp_path, data, bs, pos, pos % 8, "flip.arrow")


@pytest.mark.slow
def test_a_flip_at_every_byte_neither_crashes_nor_misreads(tmp_path):
    bs = batches(3, size=10)
    (path,) = record(tmp_path / "rec", bs, compression="lz4")
    data = Path(path).read_bytes()
    for pos in range(len(data)):
        _check_flip(tmp_path, data, bs, pos, pos % 8, "flip.arrow")


def test_checksum_catches_a_flipped_value_that_pyarrow_reads_silently(tmp_path):
    marker = T0 + 123_456_789
    special = SpanBatch.from_spans([Span("x", trace_id=9, span_id=9, start_time_ns=marker,
                                         duration_ns=1)])
    (path,) = record(tmp_path / "rec", [*batches(2), special], compression=None)
    data = bytearray(Path(path).read_bytes())
    pos = bytes(data).rindex(marker.to_bytes(8, "little"))
    data[pos] ^= 0x01
    damaged = _damaged(tmp_path, bytes(data))
    plain = ipc.open_file(damaged).read_all().column("start_time_ns").to_pylist()
    assert plain[-1] == marker ^ 0x01                  # pyarrow has no way to notice
    got, err = read_until_error(damaged)
    assert err.batches_read == 2 and len(got) == 2
    assert "checksum" in str(err)
    # without verification the damaged value comes through, as with pyarrow
    unverified = list(read_batches(damaged, verify=False))
    assert unverified[-1].column("start_time_ns").to_pylist() == [marker ^ 0x01]


def test_checksum_covers_dictionary_values(tmp_path):
    needle = "needle-value-0123456789"
    odd = SpanBatch.from_spans([Span("y", trace_id=5, span_id=5, attributes={"k": needle})])
    bs = [*batches(2), odd, *batches(1)]
    (path,) = record(tmp_path / "rec", bs, compression=None)
    data = bytearray(Path(path).read_bytes())
    pos = bytes(data).index(needle.encode())
    data[pos + 3] = ord("X")
    damaged = _damaged(tmp_path, bytes(data))
    plain = ipc.open_file(damaged).read_all().to_pylist()
    assert plain[50]["attributes"][0]["str"] == "neeXle-value-0123456789"
    got, err = read_until_error(damaged)
    assert err.batches_read == 2 and rows(got) == rows(bs[:2])
    assert "checksum" in str(err)


@pytest.mark.parametrize("content", [b"", b"hello, not arrow at all", b"ARROW1\0\0"])
def test_files_that_are_not_arrow(tmp_path, content):
    damaged = _damaged(tmp_path, content)
    got, err = read_until_error(damaged)
    assert got == [] and err.batches_read == 0
    assert err.offset in (0, 8)


def test_a_damaged_file_in_a_list_stops_the_read_after_its_good_batches(tmp_path):
    bs = batches(3)
    files = record(tmp_path / "rec", bs, max_bytes=1)
    data = Path(files[1]).read_bytes()
    Path(files[1]).write_bytes(data[:batch_messages(files[1])[0][0] + 40])
    got, err = read_until_error(files)
    assert rows(got) == rows(bs[:1])
    assert err.path == files[1] and err.batches_read == 0


# -- files from other writers ------------------------------------------------------------------


def test_stream_files_with_replaced_dictionaries(tmp_path):
    bs = batches(3)
    path = tmp_path / "plain.arrows"
    with ipc.new_stream(str(path), knhk.SPAN_SCHEMA) as w:  # replaces dictionaries per batch
        for b in bs:
            w.write_batch(b.record_batch)
    assert [b.record_batch.equals(w.record_batch)
            for b, w in zip(read_batches(path), bs, strict=True)] == [True] * 3
    data = path.read_bytes()
    unfinished = _damaged(tmp_path, data[:-8], "unfinished.arrows")  # no end-of-stream marker
    assert rows(read_batches(unfinished)) == rows(bs)
    trailing = _damaged(tmp_path, data + b"garbage!", "trailing.arrows")
    got, err = read_until_error(trailing)
    assert rows(got) == rows(bs) and err.offset == len(data)


def test_plain_pyarrow_file_without_checksums(tmp_path):
    b = batches(1)[0]
    path = tmp_path / "plain.arrow"
    with ipc.new_file(str(path), knhk.SPAN_SCHEMA) as w:
        w.write_batch(b.record_batch)
    (got,) = list(read_batches(path))
    assert got.record_batch.equals(b.record_batch)


def test_other_schemas_are_schema_errors_naming_the_file(tmp_path):
    path = tmp_path / "other.arrow"
    with ipc.new_file(str(path), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch({"x": [1]}))
    with pytest.raises(SchemaError, match=r"other\.arrow"):
        list(read_batches(path))
    future = tmp_path / "future.arrow"
    schema = knhk.SPAN_SCHEMA.with_metadata({"knhk.schema": "spans/99"})
    with ipc.new_file(str(future), schema) as w:
        w.write_batch(batches(1)[0].record_batch.replace_schema_metadata(schema.metadata))
    with pytest.raises(SchemaError, match="spans/99"):
        list(read_batches(future))


# -- replay -------------------------------------------------------------------------------------


def test_pipeline_to_files_to_pipeline_gives_the_same_spans(tmp_path):
    recorder = IpcExporter(tmp_path / "rec", max_bytes=20_000)
    first_sink = knhk.InMemoryExporter()
    with (knhk.TelemetryPipeline.builder().with_batch_size(40)
          .with_exporter(recorder).with_exporter(first_sink).build()) as first:
        first.record_spans(spans(0, 150))
        first.record_batch(SpanBatch.from_spans(spans(500, 90)))
    assert len(recorder.files) > 1
    second_sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_batch_size(64) \
            .with_exporter(second_sink).build() as second:
        stats = replay(str(tmp_path / "rec" / "*.arrow"), second)
    assert rows(second_sink.span_batches()) == rows(first_sink.span_batches())
    assert second_sink.spans().num_rows == 240
    assert stats.files == len(recorder.files)
    assert stats.batches == len(first_sink.span_batches())
    assert stats.spans == stats.rows_accepted == 240
    assert stats.metric_points == 0
    assert stats.bytes_read == sum(os.path.getsize(p) for p in recorder.files)
    assert stats.elapsed_s > 0


class _Timed:
    """A real pipeline whose record_batch calls are timed."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.calls: list[tuple[float, int]] = []

    def record_batch(self, rb):
        self.calls.append((time.monotonic(), rb.column("start_time_ns")[0].as_py()))
        return self.pipeline.record_batch(rb)


def test_paced_replay_follows_the_recorded_timestamps(tmp_path):
    step = 150_000_000  # batches recorded 150 ms apart: 600 ms of traffic
    bs = [SpanBatch.from_spans(spans(k * 10, 10, step_ns=step // 10)) for k in range(5)]
    files = record(tmp_path, bs)
    recorded = (bs[-1].column("start_time_ns")[0].as_py()
                - bs[0].column("start_time_ns")[0].as_py()) / 1e9
    with knhk.TelemetryPipeline.builder().build() as pipeline:
        fast = replay(files, pipeline)
        timed = _Timed(pipeline)
        paced = replay(files, timed, speed=2.0)
    assert paced.spans == fast.spans == 50
    assert paced.elapsed_s >= recorded / 2.0 - 0.005
    assert paced.elapsed_s < recorded / 2.0 + 0.5
    assert fast.elapsed_s < recorded / 2.0
    t_first, ts_first = timed.calls[0]
    for t, ts in timed.calls[1:]:  # no batch is fed before its time
        assert t - t_first >= (ts - ts_first) / 1e9 / 2.0 - 0.005


def test_replay_feeds_metric_points_too(tmp_path):
    buffer = MetricBuffer(batch_size=100, capacity=1000, service="svc")
    for i in range(7):
        buffer.append(MetricPoint("hits", i, kind=MetricKind.COUNTER, time_ns=i + 1))
    buffer.seal()
    metric = knhk.MetricBatch(buffer.drain(0.0)[0])
    record(tmp_path, [batches(1)[0], metric])
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
        stats = replay(tmp_path, pipeline)
    assert stats.files == 2 and stats.batches == 2
    assert stats.metric_points == stats.metric_points_accepted == 7
    assert stats.spans == stats.rows_accepted == 25
    (delivered,) = sink.metric_batches()
    assert delivered.record_batch.column("value").to_pylist() == [float(i) for i in range(7)]
    (metrics_back,) = [b for b in read_batches(tmp_path) if isinstance(b, knhk.MetricBatch)]
    assert metrics_back.record_batch.equals(metric.record_batch)


def test_replay_of_a_damaged_file_feeds_the_batches_before_the_damage(tmp_path, one_file):
    path, bs = one_file
    data = Path(path).read_bytes()
    damaged = _damaged(tmp_path, data[:batch_messages(path)[2][0] + 100])
    sink = knhk.InMemoryExporter()
    seen: list[int] = []
    with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline, \
            pytest.raises(CorruptFileError) as err:
        replay(damaged, pipeline, progress=seen.append)
    assert err.value.batches_read == 2
    partial = err.value.replay_stats
    assert isinstance(partial, ReplayStats)
    assert partial.rows_accepted == partial.spans == 50
    assert rows(sink.span_batches()) == rows(bs[:2])
    assert seen == [25, 50]


@pytest.mark.parametrize("speed", [0, -1.0, float("nan"), float("inf"), True, "fast"])
def test_bad_speed(tmp_path, speed):
    files = record(tmp_path, batches(1))
    with knhk.TelemetryPipeline.builder().build() as pipeline, \
            pytest.raises(ValueError, match="speed"):
        replay(files, pipeline, speed=speed)


def test_replay_needs_a_pipeline(tmp_path):
    files = record(tmp_path, batches(1))
    with pytest.raises(TypeError, match="record_batch"):
        replay(files, object())


def test_large_read_uses_file_wide_dictionaries_correctly(tmp_path):
    # many batches whose dictionaries overlap only partly: indices must be remapped
    rng = np.random.default_rng(3)
    bs = []
    for k in range(12):
        chosen = rng.choice(60, size=30, replace=False)
        bs.append(SpanBatch.from_spans([Span(f"op-{c}", trace_id=k + 1, span_id=100 * k + j + 1,
                                             attributes={"v": f"x{c % 17}"})
                                        for j, c in enumerate(chosen)]))
    files = record(tmp_path, bs, compression="zstd")
    back = list(read_batches(files))
    assert [b.record_batch.equals(w.record_batch) for b, w in zip(back, bs, strict=True)] == \
        [True] * 12
