"""An exporter that keeps every batch in memory, for tests and notebooks.

>>> import knhk
>>> sink = knhk.InMemoryExporter()
>>> with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as p:
...     _ = p.record_span(knhk.Span("op", trace_id=1, span_id=1))
>>> [b.num_rows for b in sink.batches]
[1]
"""

from __future__ import annotations

import threading
from typing import Any

import pyarrow as pa

from knhk.batch import MetricBatch, SpanBatch
from knhk.exporters.base import Exporter, ExportResult

__all__ = ["InMemoryExporter"]


class InMemoryExporter(Exporter):
    """Holds every batch it receives, in order, in ``batches``."""

    name = "memory"

    def __init__(self, queue_size: int = 1 << 20) -> None:
        self.queue_size = queue_size
        self.batches: list[SpanBatch | MetricBatch] = []
        self._lock = threading.Lock()
        self._stopped = False

    def export(self, batch: Any) -> ExportResult:
        if self._stopped:
            return ExportResult.FAILURE
        with self._lock:
            self.batches.append(batch)
        return ExportResult.SUCCESS

    def span_batches(self) -> list[SpanBatch]:
        return [b for b in self.batches if isinstance(b, SpanBatch)]

    def metric_batches(self) -> list[MetricBatch]:
        return [b for b in self.batches if isinstance(b, MetricBatch)]

    def spans(self) -> SpanBatch:
        """All span rows received, as one batch."""
        return SpanBatch.concat(self.span_batches())

    def metrics_table(self) -> pa.Table:
        from knhk.schema import METRIC_SCHEMA

        return pa.Table.from_batches([b.record_batch for b in self.metric_batches()],
                                     schema=METRIC_SCHEMA)

    def clear(self) -> None:
        with self._lock:
            self.batches.clear()

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopped = True
