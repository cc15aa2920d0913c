"""The stream processor: windowed aggregates, CEP rules and anomaly alerts over span batches.

A :class:`StreamProcessor` is a pipeline stage that observes: ``process(batch)``
returns None, so every span passes on to the later stages. It cuts spans into
windows (:class:`~knhk.stream.windows.WindowConfig`), groups them by key
(service and span name by default) and, when the watermark closes a window,
computes count, sum, avg, min, max, quantiles (p50/p95/p99 by default) of the
duration in milliseconds, error rate and throughput for every group, exactly
(one sort per closing, the numbers ``np.quantile`` gives) or with a mergeable
relative-error sketch (``mode="sketch"``). ``flush()`` closes what is still
open at shutdown. Results come back as an Arrow table or as
:class:`WindowResult` objects with the same field names.

Example
-------
>>> import knhk
>>> from knhk.stream import StreamProcessor, WindowConfig
>>> spans = [knhk.Span("GET /", trace_id=1, span_id=i, start_time_ns=i * 10**9,
...                    duration_ns=i * 10**6, status=2 if i == 3 else 0)
...          for i in range(1, 5)]
>>> processor = StreamProcessor(WindowConfig.tumbling(seconds=60))
>>> processor.process_batch(knhk.SpanBatch.from_spans(spans))
>>> processor.flush()
>>> [r] = processor.get_results()
>>> r.name, r.count, r.p50_duration_ms, r.error_rate, r.window_start
('GET /', 4, 2.5, 0.25, 0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from knhk.batch import SpanBatch
from knhk.stream.aggregate import grouped_stats
from knhk.stream.alerts import Alert, AlertRouter, AlertSink, InMemoryAlertSink
from knhk.stream.keys import KeyEncoder, parse_key
from knhk.stream.windows import WindowConfig

__all__ = ["StreamProcessor", "WindowResult", "quantile_name"]

logger = logging.getLogger(__name__)

_I64_MAX = np.iinfo(np.int64).max
_I64_MIN = np.iinfo(np.int64).min
_ERROR = 2
#: Group-by keys a processor remembers before it first forgets the dead ones.
_COMPACT_MIN = 4096


def quantile_name(q: float, suffix: str = "duration_ms") -> str:
    """Column name of quantile ``q``: ``quantile_name(0.99) == "p99_duration_ms"``.

    Examples
    --------
    >>> quantile_name(0.5), quantile_name(0.999, "x")
    ('p50_duration_ms', 'p99_9_x')
    """
    pct = f"{q * 100:.6g}".replace(".", "_")
    return f"p{pct}_{suffix}"


class WindowResult:
    """One group's aggregates for one closed window; fields as the table's columns.

    ``result.window_start``, ``result.count``, ``result.p99_duration_ms``,
    ``result.error_rate``, the key columns (``result.service``, ...), and
    ``result.keys`` (the key values as a tuple).
    """

    __slots__ = ("__dict__", "keys")

    def __init__(self, fields: Mapping[str, Any], key_names: Sequence[str]) -> None:
        self.__dict__.update(fields)
        self.keys = tuple(fields[k] for k in key_names)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"WindowResult({inner})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WindowResult):
            return self.__dict__ == other.__dict__
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class StreamProcessor:
    """Windowed aggregation, CEP and anomaly detection as a pipeline stage.

    Parameters
    ----------
    window : WindowConfig
        Tumbling windows of 60 s by default.
    group_by : sequence of str
        Key columns: ``service``, ``name``, ``kind``, ``status``, ``scope_name``,
        ``attributes.<key>``, ``resource.<key>``. Default ``("service", "name")``.
    quantiles : sequence of float
        Quantiles in [0, 1]; default p50, p95, p99.
    value : str
        The aggregated value: ``"duration"`` (milliseconds; columns
        ``p50_duration_ms``...) or ``"attributes.<key>"`` for a numeric
        attribute (rows without it are left out and counted as ``missing_value``).
    mode : {"exact", "sketch"}
        ``"exact"`` keeps the values of open windows and computes quantiles
        with NumPy's linear method; ``"sketch"`` keeps one DDSketch (relative
        accuracy ``alpha``) per window and key — per pane and key for sliding
        windows whose size is a multiple of the slide, merged exactly at close —
        so memory is bounded. Session windows always keep their values (exact).
    alpha : float
        Relative accuracy of the sketch.
    custom : mapping of str to callable, optional
        Extra columns: ``fn(values)`` gets the group's values (sorted, float64)
        and returns a number. Exact mode only.
    late_output : callable, optional
        Called with a SpanBatch of the late spans of each batch.
    alert_sinks : iterable of AlertSink, optional
        Where alerts go besides the in-memory list ``processor.alerts``.
    dedup_seconds : float
        Duplicate alerts (same rule and key) within this time are suppressed.
    clock : callable, optional
        Wall clock in ns for processing-time windows (``time.time_ns``).
    max_pending_results : int
        Result rows kept for :meth:`get_results` before the oldest are
        discarded (counted as ``results_discarded``), so a processor nobody
        reads from stays bounded.

    Memory follows the keys of the windows still open: once the group-by keys
    ever seen outnumber the live ones, the keys no open window holds are
    forgotten (``keys_forgotten``) and come back with a new group id if seen
    again.
    """

    def __init__(self, window: WindowConfig | None = None, *,
                 group_by: Sequence[str] = ("service", "name"),
                 quantiles: Sequence[float] = (0.5, 0.95, 0.99),
                 value: str = "duration",
                 mode: str = "exact",
                 alpha: float = 0.01,
                 custom: Mapping[str, Callable[[np.ndarray], float]] | None = None,
                 late_output: Callable[[SpanBatch], Any] | None = None,
                 alert_sinks: Iterable[AlertSink] = (),
                 dedup_seconds: float = 0.0,
                 clock: Callable[[], int] | None = None,
                 max_pending_results: int = 100_000) -> None:
        if window is None:
            window = WindowConfig.tumbling(seconds=60)
        if not isinstance(window, WindowConfig):
            raise ValueError(f"window must be a WindowConfig, got {type(window).__name__}")
        self.window = window
        self._keys = KeyEncoder(group_by)
        qs = []
        for q in quantiles:
            if isinstance(q, bool) or not isinstance(q, (int, float, np.floating, np.integer)) \
                    or not 0.0 <= float(q) <= 1.0:
                raise ValueError(f"a quantile must be a number in [0, 1], got {q!r}")
            qs.append(float(q))
        self.quantiles = tuple(qs)
        if value == "duration":
            self._value_attr, self._suffix, self._scale = None, "duration_ms", 1e6
        else:
            source, attr = parse_key(value)
            if attr is None:
                raise ValueError(f"value must be 'duration' or 'attributes.<key>', got {value!r}")
            self._value_attr, self._suffix, self._scale = (source, attr), attr, 1.0
        if mode not in ("exact", "sketch"):
            raise ValueError(f"mode must be 'exact' or 'sketch', got {mode!r}")
        self.mode = mode
        if mode == "sketch":
            from knhk.stream.sketch import DDSketch
            DDSketch(alpha)  # validates alpha now, not at the first window
        self.alpha = float(alpha)
        self._custom = dict(custom or {})
        for name, fn in self._custom.items():
            if not callable(fn):
                raise ValueError(f"custom aggregation {name!r} must be callable")
        if self._custom and mode == "sketch":
            raise ValueError("custom aggregations need the values: use mode='exact'")
        if not isinstance(max_pending_results, int) or max_pending_results < 1:
            raise ValueError("max_pending_results must be an int >= 1, got "
                             f"{max_pending_results!r}")
        self._max_results = max_pending_results
        self._pending_rows = 0
        self._compact_at = _COMPACT_MIN
        self._late_output = late_output
        self._clock = clock or time.time_ns
        self._memory = InMemoryAlertSink()
        self._router = AlertRouter([self._memory, *alert_sinks], dedup_seconds=dedup_seconds)
        self._cep: list[Any] = []
        self._detectors: list[Any] = []
        self._lock = threading.RLock()
        self._watermark = _I64_MIN
        self._chunks: list[dict[str, np.ndarray]] = []
        self._sketches: dict[tuple[int, int], Any] = {}
        # sketch mode, sliding windows: sketches per pane, merged exactly at close
        self._panes = (mode == "sketch" and window.kind == "sliding"
                       and window.size_ns % window.slide_ns == 0)
        self._next_window: int | None = None
        self._session: dict[str, np.ndarray] | None = None
        self._closed_until = np.full(0, _I64_MIN, np.int64)
        self._results: list[pa.Table] = []
        self._counters = {"spans_seen": 0, "invalid_spans": 0, "late_events": 0,
                          "missing_value": 0, "windows_closed": 0}
        self._unpopped: dict[str, int] = {}
        self._alerts_popped: dict[str, int] = {}

    # -- configuration --------------------------------------------------------------

    def add_cep_rule(self, rule: Any) -> None:
        """Evaluate ``rule`` (a :class:`~knhk.stream.cep.CepRule`) on every batch."""
        from knhk.stream.cep import CepRule, _RuleState
        if not isinstance(rule, CepRule):
            raise ValueError(f"add_cep_rule takes a CepRule, got {type(rule).__name__}")
        with self._lock:
            self._cep.append(_RuleState(rule))

    def add_detector(self, detector: Any) -> None:
        """Feed every closed window's results to ``detector`` (see :mod:`knhk.stream.anomaly`)."""
        if not callable(getattr(detector, "observe", None)):
            raise ValueError("a detector needs an observe(table) method")
        with self._lock:
            self._detectors.append(detector)

    add_anomaly_rule = add_detector

    @property
    def key_names(self) -> tuple[str, ...]:
        return self._keys.names

    @property
    def cep_rule_names(self) -> frozenset[str]:
        """Names of the CEP rules added (to tell their alerts from detectors')."""
        with self._lock:
            return frozenset(state.rule.name for state in self._cep)

    @property
    def alerts(self) -> list[Alert]:
        """Alerts delivered so far (the in-memory sink)."""
        return list(self._memory.alerts)

    @property
    def watermark_ns(self) -> int | None:
        """Largest event time seen minus the allowed lateness (None before any span)."""
        return None if self._watermark == _I64_MIN else int(self._watermark)

    def counters(self) -> dict[str, int]:
        """Cumulative counters: spans seen, invalid and late spans, windows closed, alerts."""
        with self._lock:
            out = {**self._counters, **self._router.counters()}
            if self._cep:
                out["cep_state_evictions"] = sum(st.evictions for st in self._cep)
                out["cep_keys_forgotten"] = sum(st.keys_forgotten for st in self._cep)
            return out

    # -- the stage ------------------------------------------------------------------

    def process(self, batch: SpanBatch) -> SpanBatch | None:
        """Observe ``batch`` (the pipeline stage entry point); every span passes on.

        Returns None, or, when a CEP rule with a :meth:`CepAction.emit` action
        matched, the batch with the derived spans appended.
        """
        self.process_batch(batch)
        derived = self.pop_derived()
        if not derived:
            return None
        if not isinstance(batch, SpanBatch):
            batch = SpanBatch(batch)
        return SpanBatch.concat([batch, SpanBatch.from_spans(derived)])

    def pop_derived(self) -> list[Any]:
        """Derived spans of ``CepAction.emit`` rules since the last call (and forget them)."""
        with self._lock:
            out = []
            for state in self._cep:
                out += state.derived
                state.derived = []
        return out

    def process_batch(self, batch: Any) -> None:
        """Add a batch's spans to their windows and evaluate the CEP rules.

        Spans whose end precedes their start are counted (``invalid_spans``)
        and left out. Spans behind the watermark are counted (``late_events``)
        and handed to ``late_output``, never added to a closed window.
        """
        if not isinstance(batch, SpanBatch):
            batch = SpanBatch(batch)
        n = batch.num_rows
        if n == 0:
            return
        with self._lock:
            self._bump("spans_seen", n)
            start = batch.column("start_time_ns").to_numpy()
            end = batch.column("end_time_ns").to_numpy()
            dur = end - start
            valid = dur >= 0
            if self.window.processing_time:
                t = np.full(n, self._clock(), np.int64)
            else:
                t = start
            if self._value_attr is None:
                values: np.ndarray = dur
            else:
                arr = batch.attribute(self._value_attr[1], source=self._value_attr[0])
                if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                        or pa.types.is_null(arr.type)):
                    raise ValueError(f"value attribute {self._value_attr[1]!r} is not numeric "
                                     f"(Arrow type {arr.type})")
                values = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
                missing = np.isnan(values) & valid
                self._bump("missing_value", int(missing.sum()))
                valid &= ~missing
                if self.mode == "sketch":
                    # the sketch holds finite values >= 0 only: count the rest, keep the batch
                    unfit = valid & (~np.isfinite(values) | (values < 0))
                    self._bump("value_out_of_sketch_range", int(unfit.sum()))
                    valid &= ~unfit
            n_invalid = int((dur < 0).sum())
            self._bump("invalid_spans", n_invalid)
            gid = self._keys.encode(batch)
            err = batch.column("status_code").to_numpy() == _ERROR
            if self._cep:
                self._run_cep(batch, valid, t)
            rows = np.flatnonzero(valid) if not valid.all() else None
            if rows is not None:
                t, gid, values, err = t[rows], gid[rows], values[rows], err[rows]
            if self.window.kind == "session":
                late = self._ingest_session(t, gid, values, err)
            else:
                late = self._ingest_windows(t, gid, values, err)
            if late is not None and late.size:
                self._bump("late_events", int(late.size))
                if self._late_output is not None:
                    src = late if rows is None else rows[late]
                    try:
                        self._late_output(batch.take(pa.array(src)))
                    except Exception:
                        logger.exception("late_output %r raised", self._late_output)
            if t.size:
                self._watermark = max(self._watermark,
                                      int(t.max()) - self.window.allowed_lateness_ns)
            self._close(self._watermark)
            if len(self._keys._tuples) >= self._compact_at:
                self._compact_keys()

    def poll(self) -> None:
        """Close processing-time windows by the wall clock (called when the pipeline idles)."""
        if self.window.processing_time:
            with self._lock:
                self._watermark = max(self._watermark,
                                      self._clock() - self.window.allowed_lateness_ns)
                self._close(self._watermark)
        return None

    def flush(self) -> None:
        """Close every open window (at shutdown); returns None: no spans are held."""
        with self._lock:
            self._close(_I64_MAX, final=True)
        return None

    def pop_counters(self) -> dict[str, int]:
        """Counters since the last call, for the pipeline's stats (``stream_*``)."""
        with self._lock:
            out = {f"stream_{k}": v for k, v in self._unpopped.items() if v}
            self._unpopped = {}
            now = self._router.counters()
            for k, v in now.items():
                delta = v - self._alerts_popped.get(k, 0)
                if delta:
                    out[f"stream_{k}"] = delta
            self._alerts_popped = now
        return out

    def get_results(self, *, as_table: bool = False) -> list[WindowResult] | pa.Table:
        """Results of the windows closed since the last call (and forget them).

        Parameters
        ----------
        as_table : bool
            Return one Arrow table instead of a list of :class:`WindowResult`.
        """
        with self._lock:
            tables, self._results = self._results, []
            self._pending_rows = 0
        table = pa.concat_tables(tables) if tables else self._empty_table()
        if as_table:
            return table
        names = self._keys.names
        return [WindowResult(row, names) for row in table.to_pylist()]

    # -- internals ------------------------------------------------------------------

    def _compact_keys(self) -> None:
        """Forget the group ids no open window, sketch or session holds."""
        live = [c["gid"] for c in self._chunks]
        if self._sketches:
            live.append(np.fromiter((k[1] for k in self._sketches), np.int64,
                                    len(self._sketches)))
        if self._session is not None:
            live.append(self._session["gid"])
        gap = self.window.gap_ns if self.window.kind == "session" else 0
        if self._closed_until.size:
            # a session's close time matters only while a span before it is not late anyway
            live.append(np.flatnonzero(
                self._closed_until > max(self._watermark - gap, int(_I64_MIN))))
        keep = np.unique(np.concatenate(live)) if live else np.empty(0, np.int64)
        n_before = len(self._keys._tuples)
        remap = self._keys.compact(keep)
        for c in self._chunks:
            c["gid"] = remap[c["gid"]]
        self._sketches = {(w, int(remap[g])): e for (w, g), e in self._sketches.items()}
        if self._session is not None:
            self._session["gid"] = remap[self._session["gid"]]
        if self._closed_until.size:
            kept = remap[:self._closed_until.size] >= 0
            closed = np.full(keep.size, _I64_MIN, np.int64)
            closed[remap[:self._closed_until.size][kept]] = self._closed_until[kept]
            self._closed_until = closed
        self._bump("keys_forgotten", n_before - keep.size)
        self._compact_at = max(_COMPACT_MIN, 2 * keep.size)

    def _bump(self, name: str, by: int) -> None:
        if by:
            self._counters[name] = self._counters.get(name, 0) + by
            self._unpopped[name] = self._unpopped.get(name, 0) + by

    def _ingest_windows(self, t: np.ndarray, gid: np.ndarray, values: np.ndarray,
                        err: np.ndarray) -> np.ndarray | None:
        w = self.window
        if self._panes:
            return self._ingest_panes(t, gid, values, err)
        rows, starts = w.assign(t)
        ends = starts + w.size_ns
        late_pair = ends <= self._watermark
        late = None
        if late_pair.any():
            late = np.unique(rows[late_pair])
            keep = ~late_pair
            rows, starts = rows[keep], starts[keep]
        if rows.size:
            if rows.size == t.size and w.kind == "tumbling":
                chunk = {"start": starts, "gid": gid, "value": values, "err": err}
            else:
                chunk = {"start": starts, "gid": gid[rows], "value": values[rows],
                         "err": err[rows]}
            if self.mode == "sketch":
                self._fold_sketch(chunk)
            else:
                chunk["min_start"] = np.array([starts.min()])
                self._chunks.append(chunk)
        return late

    def _ingest_panes(self, t: np.ndarray, gid: np.ndarray, values: np.ndarray,
                      err: np.ndarray) -> np.ndarray | None:
        """Sketch mode, sliding windows: one sketch per (slide-long pane, key), merged at close."""
        w = self.window
        pane = t // w.slide_ns * w.slide_ns
        # late for its earliest window (pane end passed) / for every window (all closed)
        partly = pane + w.slide_ns <= self._watermark
        if self._next_window is not None:
            partly |= pane - (w.panes - 1) * w.slide_ns < self._next_window
        wholly = pane + w.size_ns <= self._watermark
        late = np.flatnonzero(partly) if partly.any() else None
        if wholly.any():
            keep = ~wholly
            pane, gid, values, err = pane[keep], gid[keep], values[keep], err[keep]
        if pane.size:
            self._fold_sketch({"start": pane, "gid": gid, "value": values, "err": err})
        return late

    def _close_panes(self, limit: int) -> None:
        w = self.window
        size, slide, k = w.size_ns, w.slide_ns, w.panes
        if not self._sketches:
            return
        panes = sorted({key[0] for key in self._sketches})
        if self._next_window is None:
            self._next_window = panes[0] - (k - 1) * slide
        last = min((limit - size) // slide * slide, panes[-1]) if limit < _I64_MAX else panes[-1]
        starts = sorted({p - j * slide for p in panes for j in range(k)
                         if self._next_window <= p - j * slide <= last})
        by_pane: dict[int, list[tuple[int, list[Any]]]] = {}
        for (p, g), entry in self._sketches.items():
            by_pane.setdefault(p, []).append((g, entry))
        rows: list[tuple[int, int, list[Any]]] = []
        for s0 in starts:
            merged: dict[int, list[Any]] = {}
            for p in range(s0, s0 + size, slide):
                for g, (sk, errs) in by_pane.get(p, ()):
                    m = merged.get(g)
                    if m is None:
                        merged[g] = [sk.copy(), errs]
                    else:
                        m[0].merge(sk)
                        m[1] += errs
            rows += [(s0, g, merged[g]) for g in sorted(merged)]
        if last >= self._next_window:
            self._next_window = last + slide
        for key in [key for key in self._sketches if key[0] + size <= limit]:
            del self._sketches[key]
        if rows:
            wstart = np.array([r[0] for r in rows], np.int64)
            self._emit_sketches(wstart, wstart + size, np.array([r[1] for r in rows], np.int64),
                                [r[2] for r in rows])

    def _fold_sketch(self, chunk: dict[str, np.ndarray]) -> None:
        """Add a chunk to the per-(window, key) sketches and exact scalar aggregates."""
        from knhk.stream.sketch import DDSketch
        starts, gid = chunk["start"], chunk["gid"]
        order = np.lexsort((gid, starts))
        s, g = starts[order], gid[order]
        v = chunk["value"][order].astype(np.float64) / self._scale
        e = chunk["err"][order]
        brk = np.flatnonzero((s[1:] != s[:-1]) | (g[1:] != g[:-1])) + 1
        bounds = np.concatenate(([0], brk, [s.size]))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            key = (int(s[lo]), int(g[lo]))
            entry = self._sketches.get(key)
            if entry is None:
                sketch = DDSketch(self.alpha)
                sketch.add(v[lo:hi])  # registered only once it holds values
                self._sketches[key] = [sketch, int(e[lo:hi].sum())]
                continue
            entry[0].add(v[lo:hi])
            entry[1] += int(e[lo:hi].sum())

    def _close(self, limit: int, *, final: bool = False) -> None:
        if self.window.kind == "session":
            self._close_sessions(limit, final)
            return
        size = self.window.size_ns
        if self._panes:
            self._close_panes(limit)
            return
        if self.mode == "sketch":
            self._close_sketches(limit)
            return
        closing = [c for c in self._chunks if int(c["min_start"][0]) + size <= limit]
        if not closing:
            return
        rest = [c for c in self._chunks if int(c["min_start"][0]) + size > limit]
        cat = {k: np.concatenate([c[k] for c in closing]) for k in ("start", "gid", "value", "err")}
        done = cat["start"] + size <= limit
        if not done.all():
            keep = ~done
            left = {k: v[keep] for k, v in cat.items()}
            left["min_start"] = np.array([left["start"].min()])
            rest.append(left)
            cat = {k: v[done] for k, v in cat.items()}
        self._chunks = rest
        starts = cat["start"]
        w0 = int(starts.min())
        slide = self.window.slide_ns
        widx = (starts - w0) // slide
        n_win = int(widx.max()) + 1
        # group over the keys present here, not every key ever seen (O(n + keys), no sort)
        gid = cat["gid"]
        present = np.bincount(gid, minlength=self._keys.n_groups) > 0
        keys = np.flatnonzero(present)
        G = keys.size
        local = (np.cumsum(present) - 1)[gid] if present.size > G else gid
        g = widx * G + local
        stats = grouped_stats(g, cat["value"], n_win * G, self.quantiles, scale=self._scale)
        errors = np.bincount(g, weights=cat["err"], minlength=n_win * G)[stats.groups]
        wstart = w0 + (stats.groups // G) * slide
        self._emit(wstart, wstart + size, keys[stats.groups % G], stats, errors)

    def _close_sketches(self, limit: int) -> None:
        size = self.window.size_ns
        keys = sorted(k for k in self._sketches if k[0] + size <= limit)
        if not keys:
            return
        entries = [self._sketches.pop(k) for k in keys]
        wstart = np.array([k[0] for k in keys], np.int64)
        gids = np.array([k[1] for k in keys], np.int64)
        self._emit_sketches(wstart, wstart + size, gids, entries)

    def _emit_sketches(self, wstart: np.ndarray, wend: np.ndarray, gids: np.ndarray,
                       entries: list[list[Any]]) -> None:
        from knhk.stream.aggregate import GroupedStats
        sk = [e[0] for e in entries]
        stats = GroupedStats(
            groups=gids, count=np.array([s.count for s in sk], np.int64),
            sum=np.array([s.sum for s in sk]), min=np.array([s.min for s in sk]),
            max=np.array([s.max for s in sk]),
            quantiles=list(np.array([s.quantiles(self.quantiles) for s in sk]).reshape(
                len(sk), len(self.quantiles)).T),
            values=np.empty(0), starts=np.empty(0, np.int64))
        self._emit(wstart, wend, gids, stats, np.array([e[1] for e in entries], np.float64))

    def _ingest_session(self, t: np.ndarray, gid: np.ndarray, values: np.ndarray,
                        err: np.ndarray) -> np.ndarray | None:
        gap = self.window.gap_ns
        G = self._keys.n_groups
        if self._closed_until.size < G:
            self._closed_until = np.concatenate(
                [self._closed_until, np.full(G - self._closed_until.size, _I64_MIN, np.int64)])
        late_mask = (t < self._closed_until[gid]) | (t + gap <= self._watermark)
        late = np.flatnonzero(late_mask) if late_mask.any() else None
        if late is not None:
            keep = ~late_mask
            t, gid, values, err = t[keep], gid[keep], values[keep], err[keep]
        new = {"t": t, "gid": gid, "value": values, "err": err}
        if self._session is None:
            self._session = new
        else:
            self._session = {k: np.concatenate([self._session[k], new[k]]) for k in new}
        return late

    def _close_sessions(self, limit: int, final: bool) -> None:
        s = self._session
        if s is None or s["t"].size == 0:
            return
        gap = self.window.gap_ns
        order = np.lexsort((s["t"], s["gid"]))
        s = {k: v[order] for k, v in s.items()}
        t, gid = s["t"], s["gid"]
        brk = np.flatnonzero((gid[1:] != gid[:-1]) | (t[1:] - t[:-1] >= gap)) + 1
        first = np.concatenate(([0], brk))
        last = np.concatenate((brk, [t.size])) - 1
        sess_end = t[last] + gap
        closed = sess_end <= limit if not final else np.ones(first.size, bool)
        if not closed.any():
            self._session = s
            return
        sid = np.repeat(np.arange(first.size), last - first + 1)
        row_closed = closed[sid]
        cs = np.cumsum(closed) - 1
        g = cs[sid[row_closed]]
        n_closed = int(closed.sum())
        stats = grouped_stats(g, s["value"][row_closed], n_closed, self.quantiles,
                              scale=self._scale)
        errors = np.bincount(g, weights=s["err"][row_closed], minlength=n_closed)
        cfirst, clast = first[closed], last[closed]
        gids = gid[cfirst]
        np.maximum.at(self._closed_until, gids, sess_end[closed])
        self._session = {k: v[~row_closed] for k, v in s.items()}
        self._emit(t[cfirst], t[clast] + gap, gids, stats, errors)

    def _emit(self, wstart: np.ndarray, wend: np.ndarray, gids: np.ndarray, stats: Any,
              errors: np.ndarray) -> None:
        count = stats.count
        seconds = (wend - wstart) / 1e9
        cols: dict[str, Any] = {
            "window_start": pa.array(wstart, pa.int64()),
            "window_end": pa.array(wend, pa.int64()),
        }
        for name, vals in self._keys.key_columns(gids).items():
            cols[name] = vals
        cols["count"] = pa.array(count, pa.int64())
        cols["sum"] = pa.array(stats.sum, pa.float64())
        cols["avg"] = pa.array(stats.sum / count, pa.float64())
        cols["min"] = pa.array(stats.min, pa.float64())
        cols["max"] = pa.array(stats.max, pa.float64())
        for q, arr in zip(self.quantiles, stats.quantiles, strict=True):
            cols[quantile_name(q, self._suffix)] = pa.array(arr, pa.float64())
        cols["error_rate"] = pa.array(errors / count, pa.float64())
        cols["throughput"] = pa.array(count / seconds, pa.float64())
        for name, fn in self._custom.items():
            out = [fn(stats.values[a:a + c]) for a, c in zip(stats.starts.tolist(),
                                                             count.tolist(), strict=True)]
            cols[name] = pa.array(out)
        order = np.lexsort((gids, wstart))
        table = pa.table(cols).take(pa.array(order))
        self._results.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows > self._max_results and len(self._results) > 1:
            old = self._results.pop(0)
            self._pending_rows -= old.num_rows
            self._bump("results_discarded", old.num_rows)
        self._bump("windows_closed", len(np.unique(wstart)))
        for det in self._detectors:
            try:
                alerts = det.observe(table, self._keys.names)
            except Exception:
                logger.exception("detector %r raised", det)
                continue
            for alert in alerts or ():
                self._router.emit(alert)

    def _run_cep(self, batch: SpanBatch, valid: np.ndarray, t: np.ndarray) -> None:
        for state in self._cep:
            for alert in state.process(batch, valid, t):
                self._router.emit(alert)

    def _empty_table(self) -> pa.Table:
        e = np.empty(0, np.int64)
        stats = grouped_stats(e, e, 1, self.quantiles)
        old = self._results
        self._results = []
        detectors, self._detectors = self._detectors, []
        try:
            self._emit(e, e, e, stats, np.empty(0))
            table = self._results[0]
        finally:
            self._results = old
            self._detectors = detectors
        return table
