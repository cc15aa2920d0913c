"""Queue overflow under each BackpressureStrategy: every span delivered or counted by reason.

In-process on purpose: the OTLP receivers never apply a backpressure strategy
(they refuse whole requests so clients retry), so the strategies are only
reachable through ``record_batch``. A slow stage backs the ring buffer up and
a slow exporter with a two-batch queue backs the exporter queue up, so both
overflow; spans are matched by id between what was recorded and what the
exporter got.
"""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

import knhk
from knhk.exporters.base import Exporter, ExportResult
from knhk.testbed import ScenarioResult, account


class _SlowRecorder(Exporter):
    """Keeps the span ids of every batch it is given, slowly."""

    name = "slow"
    queue_size = 2

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.ids: set = set()
        self._lock = threading.Lock()

    def export(self, batch):
        time.sleep(self.delay)
        with self._lock:
            self.ids.update(batch.column("span_id").to_pylist())
        return ExportResult.SUCCESS


class _SlowStage:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def process(self, batch):
        time.sleep(self.delay)
        return batch


def _chunk(first: int, n: int) -> dict:
    seq = np.arange(first, first + n, dtype=np.uint64) + 1
    ids = [struct.pack(">Q", int(s)) for s in seq]
    return {
        "trace_id": pa.array([b"\0" * 8 + i for i in ids], pa.binary(16)),
        "span_id": pa.array(ids, pa.binary(8)),
        "name": pa.array(["op"] * n),
        "start_time_ns": pa.array(np.full(n, 1_000, dtype=np.int64)),
        # every tenth span is an error, which ADAPTIVE_SAMPLING keeps preferentially
        "status_code": pa.array((seq % 10 == 0).astype(np.int32) * 2, pa.int32()),
        "duration_ns": pa.array(np.full(n, 50, dtype=np.int64)),
    }


@pytest.mark.parametrize("version,total", [
    ("short", 30_000),
    pytest.param("long", 1_000_000, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("strategy", list(knhk.BackpressureStrategy), ids=lambda s: s.name)
def test_queue_overflow_every_span_delivered_or_counted(strategy, version, total, report):
    t0 = time.monotonic()
    exporter = _SlowRecorder(0.004)
    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(500)
                .with_flush_interval(0.01).with_channel_capacity(3000)
                .with_backpressure_strategy(strategy, block_timeout=0.01)
                .with_stage(_SlowStage(0.003)).with_exporter(exporter).build())
    sent: set = set()
    accepted = 0
    for first in range(0, total, 1000):
        chunk = _chunk(first, 1000)
        accepted += pipeline.record_batch(chunk)
        sent.update(chunk["span_id"].to_pylist())
    # shutdown says False when anything was dropped (here, by design); what must hold
    # is that it finished: nothing left queued, every exporter idle
    started = time.monotonic()
    pipeline.shutdown(timeout=30)
    assert time.monotonic() - started < 30
    stats = pipeline.stats()
    assert stats.queued_events == 0
    assert all(e["queued_batches"] == 0 for e in stats.exporters.values())
    drops = dict(stats.dropped_by_reason)
    if stats.events_sampled_out:
        drops["sampled_out"] = stats.events_sampled_out
    acc = account(sent, exporter.ids, drops)
    report.add(ScenarioResult(
        f"overflow-{strategy.name.lower()}", f"queue overflow under {strategy.name}",
        "every span delivered or counted as dropped by reason", passed=acc.balanced,
        version=version, load=f"{total} spans as fast as record_batch takes them",
        faults="slow stage (3 ms/batch) and slow exporter (4 ms/batch, queue of 2)",
        sent=acc.sent, received=acc.received, counted_drops=acc.counted_drops,
        lost=max(0, acc.unaccounted), details=f"drops by reason {acc.drops}; record_batch "
        f"accepted {accepted}", duration_s=round(time.monotonic() - t0, 2)))
    assert acc.missing > 0, "the scenario must overflow something"
    assert acc.unexpected == 0
    assert acc.balanced, acc.summary()
