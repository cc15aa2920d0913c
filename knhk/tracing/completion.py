"""Trace completion detection: a pipeline stage that passes on whole traces.

:class:`TraceCompletion` holds spans until their trace is complete, then
releases all of the trace's spans together to the stages after it (trace
analysis, tail sampling) and, optionally, hands the assembled traces to a
callback. A trace is complete when its root span has arrived and no span of
it came for ``idle_timeout`` seconds, or when ``max_wait`` seconds have passed
since its first span (then it is counted as timed out). Memory is bounded: at
most ``max_traces`` traces and ``max_spans`` spans are held; beyond that the
oldest traces are released early and counted as evicted. Spans that arrive
after their trace was released pass straight through and are counted as late.
Nothing is dropped.

Example
-------
>>> import knhk
>>> from knhk.tracing import TraceCompletion
>>> now = [0.0]
>>> stage = TraceCompletion(idle_timeout=1.0, max_wait=10.0, clock=lambda: now[0])
>>> stage.process(knhk.SpanBatch.from_spans([
...     knhk.Span("db", trace_id=1, span_id=2, parent_span_id=1, start_time_ns=1,
...               duration_ns=1),
...     knhk.Span("GET /", trace_id=1, span_id=1, start_time_ns=0, duration_ns=5),
... ])).num_rows
0
>>> now[0] = 1.5
>>> stage.poll().num_rows
2
>>> stage.pop_counters()["traces_completed"]
1
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk.batch import SpanBatch
from knhk.tracing.assembler import TraceSet, _as_batch, _id_matrix, _k, assemble

__all__ = ["TraceCompletion"]

logger = logging.getLogger(__name__)

_COUNTERS = ("traces_completed", "traces_timed_out", "traces_evicted", "traces_flushed",
             "trace_late_spans")


def _positive(value: Any, what: str, *, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise ValueError(f"TraceCompletion: {what} must be {kind}, got {value!r}.")
    return int(value) if integer else float(value)


class TraceCompletion:
    """Pipeline stage that holds spans until their trace is complete.

    Parameters
    ----------
    idle_timeout : float
        Seconds without a new span after which a trace whose root has arrived
        is complete.
    max_wait : float
        Seconds after a trace's first span after which it is released anyway.
    max_traces, max_spans : int
        Bounds on what is held; the oldest traces are released early beyond them.
    on_complete : callable, optional
        Called with the :class:`~knhk.tracing.TraceSet` of every release.
    late_cache : int
        How many released trace ids are remembered to recognise late spans.
    clock : callable, optional
        Seconds, monotonic (``time.monotonic`` by default); tests pass a fake.
    """

    def __init__(self, idle_timeout: float = 1.0, max_wait: float = 30.0, *,
                 max_traces: int = 50_000, max_spans: int = 1_000_000,
                 on_complete: Callable[[TraceSet], Any] | None = None,
                 late_cache: int = 100_000, clock: Callable[[], float] | None = None) -> None:
        self.idle_timeout = _positive(idle_timeout, "idle_timeout")
        self.max_wait = _positive(max_wait, "max_wait")
        self.max_traces = _positive(max_traces, "max_traces", integer=True)
        self.max_spans = _positive(max_spans, "max_spans", integer=True)
        self._late_cap = _positive(late_cache, "late_cache", integer=True)
        if on_complete is not None and not callable(on_complete):
            raise ValueError("TraceCompletion: on_complete must be callable or None.")
        self._on_complete = on_complete
        self._clock = clock or time.monotonic
        self._held: list[SpanBatch] = []
        self._held_spans = 0
        self._slot_of: dict[bytes, int] = {}
        self._keys: list[bytes | None] = []
        self._free: list[int] = []
        self._first = np.zeros(0, dtype=np.float64)
        self._last = np.zeros(0, dtype=np.float64)
        self._root = np.zeros(0, dtype=bool)
        self._count = np.zeros(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)
        self._released: OrderedDict[bytes, None] = OrderedDict()
        self._counters = dict.fromkeys(_COUNTERS, 0)

    # -- state ---------------------------------------------------------------------

    @property
    def pending_traces(self) -> int:
        """Traces held now."""
        return len(self._slot_of)

    @property
    def pending_spans(self) -> int:
        """Spans held now."""
        return self._held_spans

    def _slot(self, key: bytes, now: float) -> int:
        if self._free:
            s = self._free.pop()
            self._keys[s] = key
        else:
            s = len(self._keys)
            self._keys.append(key)
            if s >= len(self._first):
                grow = max(16, 2 * len(self._first))
                self._first = np.resize(self._first, grow)
                self._last = np.resize(self._last, grow)
                self._root = np.resize(self._root, grow)
                self._count = np.resize(self._count, grow)
                live = np.zeros(grow, dtype=bool)
                live[:len(self._live)] = self._live
                self._live = live
        self._first[s] = now
        self._root[s] = False
        self._count[s] = 0
        self._live[s] = True
        self._slot_of[key] = s
        return s

    # -- stage protocol --------------------------------------------------------------

    def process(self, batch: Any) -> SpanBatch:
        """Hold the spans of ``batch``; return the spans of traces now complete."""
        batch = _as_batch(batch)
        now = self._clock()
        passed: list[SpanBatch] = []
        if batch.num_rows:
            rb = batch.record_batch
            tids, _ = _id_matrix(rb.column("trace_id"), 16)
            sids, _ = _id_matrix(rb.column("span_id"), 8)
            pids, has_parent = _id_matrix(rb.column("parent_span_id"), 8)
            rows, offsets, *_ = _k.assemble(tids, sids, pids, has_parent)
            first_rows = rows[offsets[:-1]]
            is_root = (has_parent == 0) | ~pids.any(axis=1)
            # Roots and counts per trace of the batch (duplicates count once).
            roots = np.logical_or.reduceat(is_root[rows], offsets[:-1]) if len(rows) else \
                np.zeros(0, dtype=bool)
            counts = np.diff(offsets)
            late_traces: list[int] = []
            slots = np.empty(len(first_rows), dtype=np.int64)
            for t, r in enumerate(first_rows.tolist()):
                key = tids[r].tobytes()
                s = self._slot_of.get(key)
                if s is None:
                    if key in self._released:
                        late_traces.append(t)
                        slots[t] = -1
                        continue
                    s = self._slot(key, now)
                slots[t] = s
            if late_traces:
                # By trace id, so that duplicates of late spans are late too.
                late_ids = pa.array([tids[first_rows[t]].tobytes() for t in late_traces],
                                    pa.binary(16))
                late = pc.is_in(rb.column("trace_id"), value_set=late_ids).to_numpy(
                    zero_copy_only=False)
                passed.append(batch.filter(late))
                self._counters["trace_late_spans"] += int(late.sum())
                batch = batch.filter(~late)
            ok = slots >= 0
            s = slots[ok]
            self._last[s] = now
            self._root[s] |= roots[ok]
            self._count[s] += counts[ok]
            if batch.num_rows:
                self._held.append(batch)
                self._held_spans += batch.num_rows
        out = self._release(now, final=False)
        if passed:
            out = SpanBatch.concat([*passed, out]) if out.num_rows else \
                SpanBatch.concat(passed)
        return out

    def poll(self) -> SpanBatch | None:
        """Release the traces that completed while the pipeline was idle."""
        out = self._release(self._clock(), final=False)
        return out if out.num_rows else None

    def flush(self) -> SpanBatch | None:
        """Release every held trace (at shutdown)."""
        out = self._release(self._clock(), final=True)
        return out if out.num_rows else None

    def pop_counters(self) -> dict[str, int]:
        """Counters since the last call (completed, timed out, evicted, flushed; late spans)."""
        out, self._counters = self._counters, dict.fromkeys(_COUNTERS, 0)
        return out

    # -- release -----------------------------------------------------------------------

    def _release(self, now: float, *, final: bool) -> SpanBatch:
        n = len(self._keys)
        live = self._live[:n]
        if not live.any():
            return SpanBatch.empty()
        if final:
            chosen = live.copy()
            self._counters["traces_flushed"] += int(chosen.sum())
        else:
            done = live & self._root[:n] & (now - self._last[:n] >= self.idle_timeout)
            timed_out = live & ~done & (now - self._first[:n] >= self.max_wait)
            chosen = done | timed_out
            self._counters["traces_completed"] += int(done.sum())
            self._counters["traces_timed_out"] += int(timed_out.sum())
            # Bounds: the oldest of what remains goes early.
            left = live & ~chosen
            over_t = int(left.sum()) - self.max_traces
            over_s = self._held_spans - int(self._count[:n][chosen].sum()) - self.max_spans
            if over_t > 0 or over_s > 0:
                cand = np.flatnonzero(left)
                cand = cand[np.argsort(self._first[cand], kind="stable")]
                need = max(over_t, 0)
                if over_s > 0:
                    need = max(need, int(np.searchsorted(np.cumsum(self._count[cand]), over_s)) + 1)
                evict = cand[:need]
                chosen[evict] = True
                self._counters["traces_evicted"] += len(evict)
                logger.debug("trace completion evicted %d trace(s) over its bounds", len(evict))
        idx = np.flatnonzero(chosen)
        if not len(idx):
            return SpanBatch.empty()
        keys = [self._keys[i] for i in idx]
        held = SpanBatch.concat(self._held) if len(self._held) > 1 else self._held[0]
        mask = pc.is_in(held.column("trace_id"), value_set=pa.array(keys, pa.binary(16)))
        out = held.filter(mask)
        rest = held.filter(pc.invert(mask))
        self._held = [rest] if rest.num_rows else []
        self._held_spans = rest.num_rows
        for i, key in zip(idx.tolist(), keys, strict=False):
            del self._slot_of[key]
            self._keys[i] = None
            self._free.append(i)
            self._released[key] = None
        self._live[idx] = False
        while len(self._released) > self._late_cap:
            self._released.popitem(last=False)
        if self._on_complete is not None and out.num_rows:
            try:
                self._on_complete(assemble(out))
            except Exception:
                logger.exception("trace completion: on_complete raised; the spans go on")
        return out
