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

import numpy as np
import pyarrow as pa

from knhk._attributes import attribute_rows
from knhk.schema import METRIC_SCHEMA, MetricKind, MetricPoint, Temporality

__all__ = ["MetricBuffer", "metric_batch"]

_COLUMNS = METRIC_SCHEMA.names


_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


def _opt_str(point: MetricPoint, field: str) -> str | None:
    value = getattr(point, field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"metric {point.name!r}: {field} must be a str, "
                        f"got {type(value).__name__}")
    return value


def _time(point: MetricPoint, field: str, default: int) -> int:
    value = getattr(point, field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"metric {point.name!r}: {field} must be an int of nanoseconds, "
                        f"got {type(value).__name__}")
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"metric {point.name!r}: {field} = {value} does not fit in int64")
    return value


def _opt_float(point: MetricPoint, field: str) -> float | None:
    value = getattr(point, field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"metric {point.name!r}: {field} must be a number, "
                        f"got {type(value).__name__}")
    return float(value)


def _check(point: MetricPoint) -> dict[str, Any]:
    """One point as a row of ``METRIC_SCHEMA``; raises naming the field on bad input."""
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
    if point.attributes is not None and not isinstance(point.attributes, dict):
        raise TypeError(f"metric {point.name!r}: attributes must be a dict, "
                        f"got {type(point.attributes).__name__}")
    time_ns = _time(point, "time_ns", time.time_ns())
    start_ns = _time(point, "start_time_ns", time_ns)
    if start_ns > time_ns:
        raise ValueError(f"metric {point.name!r}: start_time_ns ({start_ns}) is after "
                         f"time_ns ({time_ns})")
    row: dict[str, Any] = {
        "name": point.name, "description": _opt_str(point, "description"),
        "unit": _opt_str(point, "unit"), "kind": int(kind), "temporality": int(temporality),
        "monotonic": (kind is MetricKind.COUNTER if point.monotonic is None
                      else bool(point.monotonic)),
        "start_time_ns": start_ns, "time_ns": time_ns,
        "flags": 0, "service": _opt_str(point, "service"),
        "attributes": attribute_rows(point.attributes, f"metric {point.name!r} attributes"),
        "resource_attributes": [], "scope_name": None, "scope_version": None,
        "value": None, "int_value": None, "count": None, "sum": None, "min": None,
        "max": None, "bounds": None, "bucket_counts": None,
    }
    if kind is MetricKind.HISTOGRAM:
        bounds, counts = point.bounds, point.bucket_counts
        if bounds is None or counts is None:
            raise ValueError(f"histogram {point.name!r} needs bounds and bucket_counts")
        try:
            bounds = [float(b) for b in bounds]
            counts = [int(c) for c in counts]
        except (TypeError, ValueError):
            raise TypeError(f"histogram {point.name!r}: bounds must be numbers and "
                            "bucket_counts ints") from None
        if any(math.isnan(b) for b in bounds):
            raise ValueError(f"histogram {point.name!r}: bounds must not be NaN")
        if len(counts) != len(bounds) + 1:
            raise ValueError(
                f"histogram {point.name!r}: bucket_counts needs len(bounds) + 1 = "
                f"{len(bounds) + 1} entries, got {len(counts)}")
        if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"histogram {point.name!r}: bounds must increase strictly")
        if any(c < 0 or c > _UINT64_MAX for c in counts):
            raise ValueError(f"histogram {point.name!r}: bucket counts must be >= 0 and "
                             "fit in uint64")
        total = sum(counts)
        if total > _UINT64_MAX:
            raise ValueError(f"histogram {point.name!r}: the total count exceeds uint64")
        row.update(bounds=bounds, bucket_counts=counts, count=total,
                   sum=_opt_float(point, "sum"), min=_opt_float(point, "min"),
                   max=_opt_float(point, "max"))
    else:
        v = point.value
        if isinstance(v, np.integer | np.floating):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"metric {point.name!r}: value must be an int or float, "
                            f"got {type(v).__name__}")
        if isinstance(v, float) and math.isnan(v) and kind is not MetricKind.GAUGE:
            raise ValueError(f"metric {point.name!r}: a {kind.name} value cannot be NaN")
        if kind is MetricKind.COUNTER and v < 0 and temporality is Temporality.DELTA:
            raise ValueError(f"counter {point.name!r}: a delta must be >= 0, got {v}")
        if isinstance(v, int):
            if not _INT64[0] <= v <= _INT64[1]:
                raise ValueError(f"metric {point.name!r}: {v} does not fit in int64")
            row["int_value"] = v
        row["value"] = float(v)
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
        self.refused = 0
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

    def offer_batch(self, rb: pa.RecordBatch, *, refuse: bool = False) -> int:
        """Queue an already-built batch in ``METRIC_SCHEMA``; return the points taken.

        With ``refuse``, a batch that cannot be taken (closed, no room) is counted as
        ``refused`` — its sender keeps and retries it — rather than received and dropped.
        """
        n = rb.num_rows
        with self._lock:
            if refuse and (self._closed or
                           self._ready_rows + len(self._rows) + n > self.capacity):
                self.refused += n
                return 0
            self.received += n
            if self._closed:
                self.dropped["shutdown"] = self.dropped.get("shutdown", 0) + n
                return 0
            if self._ready_rows + len(self._rows) + n > self.capacity:
                self.dropped["queue_full"] = self.dropped.get("queue_full", 0) + n
                return 0
            self._seal_locked()  # points recorded before go first
            self._ready.append(rb)
            self._ready_rows += n
        return n

    def _seal_locked(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        try:
            rb = metric_batch(rows)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # A row slipped past the checks: keep the good rows, count the bad.
            good = []
            for row in rows:
                try:
                    metric_batch([row])
                    good.append(row)
                except (pa.ArrowException, TypeError, ValueError, OverflowError):
                    self.dropped["invalid"] = self.dropped.get("invalid", 0) + 1
            if not good:
                return
            rows, rb = good, metric_batch(good)
        self._ready.append(rb)
        self._ready_rows += len(rows)

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
