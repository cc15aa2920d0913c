"""knhk.exporters._persistent_queue and ExporterWorker's use of it: at-least-once over a crash."""

from __future__ import annotations

import os
import threading

import pytest

import knhk
from knhk.exporters._persistent_queue import PersistentQueue
from knhk.exporters.base import Exporter, ExporterWorker, ExportResult
from knhk.testbed.disk import corrupt_record, records_on_disk


def _batch(first: int, n: int = 3) -> knhk.SpanBatch:
    return knhk.SpanBatch.from_spans([
        knhk.Span(f"op{i}", trace_id=1, span_id=i, start_time_ns=i, duration_ns=5,
                  attributes={"k": i}) for i in range(first, first + n)])


def _ids(batch) -> list:
    return batch.column("span_id").to_pylist()


def test_records_round_trip_and_are_replayed_until_acked(tmp_path):
    q = PersistentQueue(tmp_path)
    seqs = [q.append(_batch(1 + 3 * i)) for i in range(4)]
    assert seqs == [1, 2, 3, 4]
    q.ack(2)
    q.close()
    q2 = PersistentQueue(tmp_path)
    replayed = q2.replay()
    assert [s for s, _ in replayed] == [3, 4]
    assert replayed[0][1].record_batch.equals(_batch(7).record_batch)
    assert q2.stats()["records_replayed"] == 2
    assert q2.append(_batch(100)) == 5  # numbering goes on after a restart
    q2.ack(5)
    q2.close()
    assert PersistentQueue(tmp_path).replay() == []


def test_metric_batches_round_trip(tmp_path):
    sink = knhk.InMemoryExporter()
    with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as p:
        p.record_metric("requests", 3.0)
        assert p.force_flush(5)
    metric = next(b for b in sink.batches if isinstance(b, knhk.MetricBatch))
    q = PersistentQueue(tmp_path)
    q.append(metric)
    q.close()
    (_, back), = PersistentQueue(tmp_path).replay()
    assert isinstance(back, knhk.MetricBatch)
    assert back.record_batch.equals(metric.record_batch)


def test_acknowledged_segments_are_deleted(tmp_path):
    q = PersistentQueue(tmp_path, segment_bytes=1)  # one record per segment
    for i in range(5):
        q.append(_batch(1 + 3 * i))
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".knq")]) == 5
    q.ack(4)
    left = [n for n in os.listdir(tmp_path) if n.endswith(".knq")]
    assert len(left) == 1
    q.close()


def test_a_corrupt_record_is_skipped_and_counted(tmp_path):
    q = PersistentQueue(tmp_path)
    for i in range(3):
        q.append(_batch(1 + 3 * i))
    q.close()
    lost = corrupt_record(str(tmp_path), 1)
    assert len(lost) == 3
    q2 = PersistentQueue(tmp_path)
    got = [i for _, b in q2.replay() for i in _ids(b)]
    assert q2.stats()["records_corrupted"] == 1
    assert set(got) == {i.to_bytes(8, "big") for i in (1, 2, 3, 7, 8, 9)}
    q2.close()


def test_garbage_between_records_and_a_torn_tail_are_survived(tmp_path):
    q = PersistentQueue(tmp_path)
    q.append(_batch(1))
    q.append(_batch(4))
    q.close()
    first, second = records_on_disk(str(tmp_path))
    path = first[0]
    with open(path, "rb") as f:
        data = f.read()
    # garbage spliced before the second record, and half a header at the end
    data = data[:second[1]] + b"\xde\xad" * 20 + data[second[1]:] + data[:10]
    with open(path, "wb") as f:
        f.write(data)
    q2 = PersistentQueue(tmp_path)
    assert [s for s, _ in q2.replay()] == [1, 2]
    assert q2.stats()["records_corrupted"] == 2
    q2.close()


def test_a_corrupt_ack_file_replays_everything(tmp_path):
    q = PersistentQueue(tmp_path)
    q.append(_batch(1))
    q.append(_batch(4))
    q.ack(1)
    q.close()
    with open(tmp_path / "ack", "r+b") as f:
        f.write(b"\xff")
    assert [s for s, _ in PersistentQueue(tmp_path).replay()] == [1, 2]


def test_max_bytes_refuses_appends(tmp_path):
    probe = PersistentQueue(tmp_path / "probe")
    probe.append(_batch(1))
    one = probe.stats()["bytes_on_disk"]
    probe.close()
    q = PersistentQueue(tmp_path / "q", max_bytes=3 * one + one // 2)
    results = [q.append(_batch(1 + 3 * i)) for i in range(5)]
    assert results == [1, 2, 3, None, None]
    q.ack(3)  # all done with: the space is free again
    assert q.append(_batch(100)) == 4
    assert q.stats()["bytes_on_disk"] == one
    q.close()


@pytest.mark.parametrize("kwargs", [{"segment_bytes": 0}, {"max_bytes": -1},
                                    {"segment_bytes": 1.5}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PersistentQueue(tmp_path, **kwargs)


class _Gate(Exporter):
    """Exports only while ``open`` is set; records the span ids it exported."""

    name = "gate"

    def __init__(self) -> None:
        self.open = threading.Event()
        self.ids: list = []
        self.started = threading.Event()

    def export(self, batch):
        self.started.set()
        self.open.wait()
        self.ids.extend(_ids(batch))
        return ExportResult.SUCCESS


def test_worker_replays_unacknowledged_batches_after_a_crash(tmp_path):
    hung = _Gate()
    worker = ExporterWorker(hung, persistent_queue=str(tmp_path))
    for i in range(4):
        assert worker.submit(_batch(1 + 3 * i))
    assert hung.started.wait(5)
    # a crash: the worker is abandoned with one batch in flight and three queued
    worker._disk.close()
    fresh = _Gate()
    fresh.open.set()
    worker2 = ExporterWorker(fresh, persistent_queue=str(tmp_path))
    import time

    assert worker2.wait_idle(time.monotonic() + 5)
    assert sorted(fresh.ids) == sorted(i.to_bytes(8, "big") for i in range(1, 13))
    stats = worker2.stats.extra["persistent_queue"]
    assert stats["records_replayed"] == 4 and stats["records_acked"] == 4
    assert worker2.close(time.monotonic() + 5)
    assert PersistentQueue(tmp_path).replay() == []
    hung.open.set()


def test_exporter_attribute_enables_the_queue(tmp_path):
    sink = knhk.InMemoryExporter()
    sink.persistent_queue = str(tmp_path / "q")
    with knhk.TelemetryPipeline.builder().with_exporter(sink).with_flush_interval(0.01) \
            .build() as p:
        p.record_batch(_batch(1, 10))
        assert p.force_flush(5)
        extra = p.stats().exporters["memory"]["extra"]
    assert extra["persistent_queue"]["records_appended"] >= 1
    assert extra["persistent_queue"]["records_acked"] == extra["persistent_queue"][
        "records_appended"]
    assert sum(b.num_rows for b in sink.batches) == 10
