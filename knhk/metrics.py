"""Metric points recorded one at a time, sealed into batches of ``METRIC_SCHEMA``.

Metric points are far fewer than spans, so this buffer is plain Python: it
checks each point, appends its fields to column lists and seals a
``pyarrow.RecordBatch`` every ``batch_size`` points or flush interval.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import pyarrow as pa

from knhk._attributes import attribute_rows
from knhk.schema import METRIC_SCHEMA, MetricKind, MetricPoint, Temporality

__all__ = ["MetricBuffer", "metric_batch"]

_COLUMNS = METRIC_SCHEMA.names


def _check(point: MetricPoint) -> dict[str, Any]:
    if not isinstance(point.name, str) or not point.name:
        raise TypeError(f"metric name must be a non-empty str, got {point.name!r}")
    try:
        kind = MetricKind(point.kind)
    except ValueError:
        raise ValueError(f"metric {point.name!r}: kind must be a MetricKind, "
                         f"got {point.kind!r}") from None
    try:
        temporality = Temporality(point.temporality)
    except ValueError:
        raise ValueError(f"metric {point.name!r}: temporality must be a Temporality, "
                         f"got {point.temporality!r}") from None
    now = time.time_ns()
    row: dict[str, Any] = {
        "name": point.name, "description": point.description or None,
        "unit": point.unit or None, "kind": int(kind), "temporality": int(temporality),
        "monotonic": (kind is MetricKind.COUNTER if point.monotonic is None
                      else bool(point.monotonic)),
        "time_ns": now if point.time_ns is None else int(point.time_ns),
        "flags": 0, "service": point.service,
        "attributes": attribute_rows(point.attributes, f"metric {point.name!r} attributes"),
        "resource_attributes": [], "scope_name": None, "scope_version": None,
        "value": None, "int_value": None, "count": None, "sum": None, "min": None,
        "max": None, "bounds": None, "bucket_counts": None,
    }
    row["start_time_ns"] = row["time_ns"] if point.start_time_ns is None \
        else int(point.start_time_ns)
    if kind is MetricKind.HISTOGRAM:
        bounds, counts = point.bounds, point.bucket_counts
        if bounds is None or counts is None:
            raise ValueError(f"histogram {point.name!r} needs bounds and bucket_counts")
        bounds = [float(b) for b in bounds]
        counts = [int(c) for c in counts]
        if len(counts) != len(bounds) + 1:
            raise ValueError(
                f"histogram {point.name!r}: bucket_counts needs len(bounds) + 1 = "
                f"{len(bounds) + 1} entries, got {len(counts)}")
        if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"histogram {point.name!r}: bounds must increase strictly")
        if any(c < 0 for c in counts):
            raise ValueError(f"histogram {point.name!r}: bucket counts must be >= 0")
        row.update(bounds=bounds, bucket_counts=counts, count=sum(counts),
                   sum=point.sum, min=point.min, max=point.max)
    else:
        v = point.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"metric {point.name!r}: value must be an int or float, "
                            f"got {type(v).__name__}")
        if isinstance(v, float) and math.isnan(v) and kind is not MetricKind.GAUGE:
            raise ValueError(f"metric {point.name!r}: a {kind.name} value cannot be NaN")
        if kind is MetricKind.COUNTER and v < 0 and temporality is Temporality.DELTA:
            raise ValueError(f"counter {point.name!r}: a delta must be >= 0, got {v}")
        row["value"] = float(v)
        if isinstance(v, int):
            if not -(2**63) <= v < 2**63:
                raise ValueError(f"metric {point.name!r}: {v} does not fit in int64")
            row["int_value"] = v
    return row


def metric_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Rows as checked by the buffer -> a RecordBatch in ``METRIC_SCHEMA``."""
    return pa.RecordBatch.from_pylist(rows, schema=METRIC_SCHEMA)


class MetricBuffer:
    """Thread-safe buffer of metric points, sealed into RecordBatches."""

    def __init__(self, batch_size: int, capacity: int, service: str) -> None:
        self.batch_size = batch_size
        self.capacity = capacity
        self.service = service
        self._rows: list[dict[str, Any]] = []
        self._opened = 0.0
        self._ready: deque = deque()
        self._ready_rows = 0
        self._lock = threading.Lock()
        self._closed = False
        self.received = 0
        self.dropped: dict[str, int] = {}

    def count_dropped(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.received += n
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def append(self, point: MetricPoint) -> bool:
        row = _check(point)
        if row["service"] is None:
            row["service"] = self.service
        with self._lock:
            self.received += 1
            if self._closed:
                self.dropped["shutdown"] = self.dropped.get("shutdown", 0) + 1
                return False
            if self._ready_rows + len(self._rows) >= self.capacity:
                self.dropped["queue_full"] = self.dropped.get("queue_full", 0) + 1
                return False
            if not self._rows:
                self._opened = time.monotonic()
            self._rows.append(row)
            if len(self._rows) >= self.batch_size:
                self._seal_locked()
        return True

    def _seal_locked(self) -> None:
        if self._rows:
            self._ready.append(metric_batch(self._rows))
            self._ready_rows += len(self._rows)
            self._rows = []

    def seal(self) -> None:
        with self._lock:
            self._seal_locked()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._seal_locked()

    def drain(self, interval: float) -> list[pa.RecordBatch]:
        """Sealed batches, sealing the open one first if it is ``interval`` old."""
        with self._lock:
            if self._rows and time.monotonic() - self._opened >= interval:
                self._seal_locked()
            out = list(self._ready)
            self._ready.clear()
            self._ready_rows = 0
        return out

    @property
    def pending(self) -> int:
        with self._lock:
            return self._ready_rows + len(self._rows)
