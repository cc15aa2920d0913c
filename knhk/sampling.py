"""Head samplers: decide which spans are exported, per span or as a vectorized mask.

Every ratio decision is a deterministic function of the trace id, so all spans
of a trace get the same decision on every instance, and a higher rate keeps a
superset of what a lower one keeps. The default rule is OpenTelemetry's
``TraceIdRatioBased``: the low 64 bits of the id, read big-endian, are kept when
below ``round(rate * 2**64)``. ``rule="consistent"`` uses the OpenTelemetry
probability-sampling spec instead (keep when the low 56 bits ``R >= th``), which
composes with thresholds that upstream samplers wrote into ``trace_state``.

Kept spans carry their sampling probability in ``trace_state`` (when it is
below 1), so aggregates over sampled data can be re-weighted with
:func:`adjusted_counts` / :func:`reweighted_sum`. A consistent decision, made
on the spec's randomness ``R``, writes the spec's ``ot=th:<hex>``; a
traceidratio decision is not one on ``R`` and must not claim a ``th`` (a later
consistent stage would combine it as if it were), so it writes the
knhk-specific ``knhk=p:<probability>``. Stages combine exactly with an
upstream probability of their own kind; one of the other kind makes the
probability unknown (both are erased), as the spec does for unknown
probabilities.

Samplers: :class:`AlwaysOn`, :class:`AlwaysOff`, :class:`TraceIdRatio`,
:class:`ParentBased`, :class:`AdaptiveSamplingStrategy` (alias
:data:`AdaptivePrioritySampler`); tail sampling lives in
:mod:`knhk.tail_sampling`. Each has ``sample_mask(batch)`` (the fast path),
``should_sample(span)``, ``process(batch)`` (a pipeline stage) and ``stats()``.

>>> import knhk
>>> s = knhk.AdaptiveSamplingStrategy(knhk.SamplingConfig(base_rate=0.0))
>>> s.should_sample(knhk.Span("op", trace_id=1, span_id=1, status=knhk.SpanStatus.ERROR))
<SamplingDecision.SAMPLE: 1>
>>> s.should_sample(knhk.Span("op", trace_id=1, span_id=1))
<SamplingDecision.DROP: 0>
>>> TraceIdRatio(0.25).process(knhk.SpanBatch.from_spans(
...     [knhk.Span("op", trace_id=1, span_id=1)])).batch.column("trace_state").to_pylist()
['knhk=p:0.25']
>>> TraceIdRatio(0.25, rule="consistent").process(knhk.SpanBatch.from_spans(
...     [knhk.Span("op", trace_id=2**64 - 1, span_id=1)])).batch.column("trace_state").to_pylist()
['ot=th:c']
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from knhk._build import load_core
from knhk._sampling_common import RULES as _RULES
from knhk._sampling_common import TWO56 as _TWO56
from knhk._sampling_common import TWO64 as _TWO64
from knhk._sampling_common import annotate as _annotate
from knhk._sampling_common import as_batch as _as_batch
from knhk._sampling_common import bound as _bound
from knhk._sampling_common import check_rule as _check_rule
from knhk._sampling_common import (
    encode_threshold,
    parse_threshold,
    probability_to_threshold,
    threshold_to_probability,
)
from knhk._sampling_common import probability_in as _probability_in
from knhk._sampling_common import ratio_bound as _ratio_bound
from knhk._sampling_common import trace_id_matrix as _trace_id_matrix
from knhk.batch import SpanBatch
from knhk.environment import OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG
from knhk.pipeline import StageResult

logger = logging.getLogger(__name__)

_k = load_core("_sampling")

__all__ = [
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "AdaptivePrioritySampler",
    "AdaptiveSamplingStrategy",
    "AlwaysOff",
    "AlwaysOn",
    "ParentBased",
    "Sampler",
    "SamplingConfig",
    "SamplingDecision",
    "TraceIdRatio",
    "adjusted_counts",
    "encode_threshold",
    "parse_threshold",
    "probability_to_threshold",
    "reweighted_sum",
    "sampler_from_env",
    "sampling_probability",
    "threshold_to_probability",
    "trace_id_ratio_mask",
]

# OTLP Span.flags: bits 0-7 are the W3C trace flags; bits 8 and 9 say whether
# the parent is known to be remote and whether it is.
_FLAG_SAMPLED = 0x01
_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200


class SamplingDecision(enum.IntEnum):
    """What a sampler decided for a span: export it (SAMPLE) or not (DROP)."""

    DROP = 0
    SAMPLE = 1


# -- rates (bounds, thresholds and trace_state live in knhk._sampling_common) ---------


def _check_rate(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a rate in [0, 1], got {value!r}.")
    return float(value)


def sampling_probability(batch: SpanBatch | pa.RecordBatch) -> np.ndarray:
    """The probability each span was kept with (NaN where unknown).

    Read from the spec's ``ot=th`` or knhk's ``knhk=p`` in ``trace_state``; a
    state with neither, or with both, has no known probability.

    >>> import knhk
    >>> b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=1,
    ...                                          trace_state="ot=th:c"),
    ...                                knhk.Span("b", trace_id=2, span_id=2,
    ...                                          trace_state="knhk=p:0.125")])
    >>> sampling_probability(b).tolist()
    [0.25, 0.125]
    """
    rb = batch.record_batch if isinstance(batch, SpanBatch) else batch
    col = rb.column("trace_state")
    n = rb.num_rows
    if n == 0:
        return np.empty(0, dtype=np.float64)
    if not isinstance(col, pa.DictionaryArray):
        col = col.dictionary_encode()
    per_value = np.array(
        [np.nan if (p := _probability_in(s)) is None else p
         for s in col.dictionary.to_pylist()] + [np.nan], dtype=np.float64)
    idx = col.indices.to_numpy(zero_copy_only=False)
    if col.null_count:
        idx = np.where(col.is_valid().to_numpy(zero_copy_only=False), idx, per_value.size - 1)
    return per_value[idx.astype(np.intp)]


def adjusted_counts(batch: SpanBatch | pa.RecordBatch, *, missing: float = 1.0) -> np.ndarray:
    """How many original spans each sampled span stands for: ``1 / probability``.

    Spans without a known probability (kept with certainty, by a
    non-probabilistic rule, or by stages whose probabilities do not combine)
    count ``missing`` (1.0 by default; NaN to flag them).

    >>> import knhk
    >>> b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=1,
    ...                                          trace_state="ot=th:8"),
    ...                                knhk.Span("b", trace_id=2, span_id=2)])
    >>> adjusted_counts(b).tolist()
    [2.0, 1.0]
    """
    p = sampling_probability(batch)
    out = np.full(p.shape, float(missing))
    known = ~np.isnan(p)
    out[known] = 1.0 / p[known]
    return out


def reweighted_sum(batch: SpanBatch | pa.RecordBatch, values: Any = None, *,
                   missing: float = 1.0) -> float:
    """An unbiased estimate of ``sum(values)`` over the spans before sampling.

    ``values`` is a per-row array (None counts spans), each weighted by its
    adjusted count (Horvitz-Thompson estimation).

    >>> import knhk
    >>> b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=1,
    ...                                          trace_state="ot=th:c")])
    >>> reweighted_sum(b), reweighted_sum(b, [10.0])
    (4.0, 40.0)
    """
    w = adjusted_counts(batch, missing=missing)
    if values is None:
        return float(w.sum())
    v = np.asarray(values.to_numpy(zero_copy_only=False) if hasattr(values, "to_numpy")
                   and not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if v.shape != w.shape:
        raise ValueError(
            f"values must have one entry per span ({w.size}), got shape {v.shape}.")
    return float((w * v).sum())


def trace_id_ratio_mask(low64: np.ndarray, rate: float | np.ndarray) -> np.ndarray:
    """Keep mask for trace ids (their low 64 bits) at ``rate`` (scalar or per row).

    >>> trace_id_ratio_mask(np.array([0, 2**63, 2**64 - 1], dtype=np.uint64), 0.5).tolist()
    [True, False, False]
    """
    low64 = np.asarray(low64, dtype=np.uint64)
    rates = np.broadcast_to(np.asarray(rate, dtype=np.float64), low64.shape)
    out = np.zeros(low64.shape, dtype=bool)
    for r in np.unique(rates):
        sel = rates == r
        b = _bound(float(r))
        if b >= _TWO64:
            out[sel] = True
        elif b > 0:
            out[sel] = low64[sel] < np.uint64(b)
    return out


def _span_key(trace_id: bytes, rule: str) -> int:
    low = int.from_bytes(trace_id[8:16], "big")
    return ((_TWO64 - 1 - low) & (_TWO56 - 1)) if rule == "consistent" else low


# -- samplers --------------------------------------------------------------------------


class Sampler:
    """Base of the head samplers: a decision per span, as a mask over a batch.

    Subclasses implement ``_decide(batch) -> (mask, codes, probs)`` where the
    probability a kept row was kept with is ``probs[codes[row]]`` (codes None:
    ``probs[0]`` for every row) and ``_decide_one(span) -> (keep, prob)``.
    """

    rule = "traceidratio"
    record_probability = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sampled = 0
        self._dropped = 0

    # subclass hooks
    def _decide(self, batch: SpanBatch) -> tuple[np.ndarray, np.ndarray | None,
                                                 Sequence[float]]:
        raise NotImplementedError

    def _decide_one(self, span: Any) -> tuple[bool, float]:
        raise NotImplementedError

    @property
    def description(self) -> str:
        """What the sampler is, with its configuration (as the SDK's ``get_description``)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return self.description

    def _count(self, kept: int, total: int) -> None:
        with self._lock:
            self._sampled += kept
            self._dropped += total - kept

    def sample_mask(self, batch: SpanBatch) -> np.ndarray:
        """Vectorized decisions for every row of ``batch`` (True = export)."""
        mask, _, _ = self._decide(_as_batch(batch))
        return mask

    def should_sample(self, span: Any) -> SamplingDecision:
        """The decision for one ``Span`` (the same rule as :meth:`sample_mask`)."""
        keep, _ = self._decide_one(span)
        return SamplingDecision(int(keep))

    def process(self, batch: SpanBatch) -> StageResult:
        """The pipeline stage: the batch (with ``th`` on kept rows) and the keep mask."""
        batch = _as_batch(batch)
        mask, codes, probs = self._decide(batch)
        if self.record_probability and mask.any():
            batch = SpanBatch._wrap(_annotate(batch.record_batch, codes, probs, self.rule))
        return StageResult(batch, mask=mask)

    def stats(self) -> dict[str, float]:
        """Counters: ``sample_count``, ``drop_count`` and ``effective_rate`` (kept share)."""
        with self._lock:
            total = self._sampled + self._dropped
            return {"sample_count": self._sampled, "drop_count": self._dropped,
                    "effective_rate": self._sampled / total if total else 0.0}


class AlwaysOn(Sampler):
    """Keeps every span.

    >>> AlwaysOn().sample_mask(SpanBatch.empty()).shape
    (0,)
    """

    def _decide(self, batch):
        return self._decide_ids(_trace_id_matrix(batch.column("trace_id")))

    def _decide_ids(self, ids):
        n = len(ids)
        self._count(n, n)
        return np.ones(n, dtype=bool), None, (1.0,)

    def _mask_ids(self, ids):
        return np.ones(len(ids), dtype=bool), 1.0

    def _decide_one(self, span):
        self._count(1, 1)
        return True, 1.0

    @property
    def description(self) -> str:
        return "AlwaysOnSampler"


class AlwaysOff(Sampler):
    """Drops every span."""

    def _decide(self, batch):
        return self._decide_ids(_trace_id_matrix(batch.column("trace_id")))

    def _decide_ids(self, ids):
        n = len(ids)
        self._count(0, n)
        return np.zeros(n, dtype=bool), None, (1.0,)

    def _mask_ids(self, ids):
        return np.zeros(len(ids), dtype=bool), 1.0

    def _decide_one(self, span):
        self._count(0, 1)
        return False, 1.0

    @property
    def description(self) -> str:
        return "AlwaysOffSampler"


class TraceIdRatio(Sampler):
    """Keeps a fraction ``rate`` of traces, decided from the trace id alone.

    With the default rule it decides exactly as opentelemetry-sdk's
    ``TraceIdRatioBased(rate)``.

    Parameters
    ----------
    rate : float
        In [0, 1].
    rule : {"traceidratio", "consistent"}
        ``consistent`` keeps a trace when the low 56 bits of its id are at least
        the spec's rejection threshold, and composes with upstream ``th``.
    record_probability : bool
        Record the probability in ``trace_state`` of kept spans (in
        ``process``): ``ot=th:`` under the consistent rule, ``knhk=p:`` under
        the traceidratio rule.

    Examples
    --------
    >>> import knhk
    >>> s = TraceIdRatio(0.5)
    >>> s.should_sample(knhk.Span("op", trace_id=1, span_id=1))
    <SamplingDecision.SAMPLE: 1>
    >>> s.should_sample(knhk.Span("op", trace_id=(2**64 - 1), span_id=1))
    <SamplingDecision.DROP: 0>
    """

    def __init__(self, rate: float, *, rule: str = "traceidratio",
                 record_probability: bool = True) -> None:
        super().__init__()
        self.rate = _check_rate(rate, "The TraceIdRatio rate")
        self.rule = _check_rule(rule, "The TraceIdRatio rule")
        self.record_probability = bool(record_probability)
        self._b, self._all, self.probability = _ratio_bound(self.rate, self.rule)

    @property
    def bound(self) -> int:
        """The bound a key is compared with (``round(rate * 2**64)`` by default)."""
        return _TWO64 if self._all else self._b

    @property
    def description(self) -> str:
        return f"TraceIdRatio{{{self.rate}}}"

    def _decide(self, batch):
        return self._decide_ids(_trace_id_matrix(batch.column("trace_id")))

    def _decide_ids(self, ids):
        mask, kept = _k.ratio_mask(ids, self._b, self._all, _RULES[self.rule])
        self._count(kept, len(ids))
        return mask, None, (self.probability,)

    def _mask_ids(self, ids):
        # Samplers that read only the trace id can decide for a whole batch
        # from the id matrix alone (ParentBased then picks rows by category).
        return _k.ratio_mask(ids, self._b, self._all, _RULES[self.rule])[0], self.probability

    def _decide_one(self, span):
        keep = self._all or _span_key(span.trace_id, self.rule) < self._b
        self._count(int(keep), 1)
        return keep, self.probability


class ParentBased(Sampler):
    """Follows the parent's decision; ``root`` decides for spans without a parent.

    A pipeline sees finished spans, so the parent's decision is read from the
    span itself as OTLP carries it: the W3C *sampled* bit of ``flags`` (a child's
    trace flags are its parent's) and, in bits 8-9, whether the parent is
    remote (unknown counts as local). The delegates are chosen as in
    opentelemetry-sdk's ``ParentBased``.

    Examples
    --------
    >>> import knhk
    >>> s = ParentBased(AlwaysOff())
    >>> s.should_sample(knhk.Span("child", trace_id=1, span_id=2, parent_span_id=1, flags=1))
    <SamplingDecision.SAMPLE: 1>
    >>> s.should_sample(knhk.Span("root", trace_id=1, span_id=1))
    <SamplingDecision.DROP: 0>
    """

    def __init__(self, root: Sampler, *, remote_parent_sampled: Sampler | None = None,
                 remote_parent_not_sampled: Sampler | None = None,
                 local_parent_sampled: Sampler | None = None,
                 local_parent_not_sampled: Sampler | None = None) -> None:
        super().__init__()
        delegates = {
            "root": root,
            "remote_parent_sampled": remote_parent_sampled or AlwaysOn(),
            "remote_parent_not_sampled": remote_parent_not_sampled or AlwaysOff(),
            "local_parent_sampled": local_parent_sampled or AlwaysOn(),
            "local_parent_not_sampled": local_parent_not_sampled or AlwaysOff(),
        }
        for name, d in delegates.items():
            if not isinstance(d, Sampler) or isinstance(d, ParentBased):
                raise ValueError(
                    f"ParentBased {name} must be a knhk head sampler other than ParentBased, "
                    f"got {type(d).__name__}.")
        self._delegates = list(delegates.values())
        self.root = root
        rules = {d.rule for d in self._delegates if not isinstance(d, AlwaysOn | AlwaysOff)}
        if len(rules) > 1:
            raise ValueError("The delegates of a ParentBased sampler must share one rule, "
                             f"got {sorted(rules)}.")
        self.rule = rules.pop() if rules else "traceidratio"
        self.record_probability = all(d.record_probability for d in self._delegates)

    @property
    def description(self) -> str:
        names = ("root", "remoteParentSampled", "remoteParentNotSampled",
                 "localParentSampled", "localParentNotSampled")
        inner = ",".join(f"{n}:{d.description}" for n, d in zip(names, self._delegates,
                                                                   strict=True))
        return f"ParentBased{{{inner}}}"

    @staticmethod
    def _category(has_parent: Any, flags: Any) -> Any:
        # 0 root, 1 remote sampled, 2 remote not sampled, 3 local sampled, 4 local not.
        both = _FLAG_HAS_IS_REMOTE | _FLAG_IS_REMOTE
        local = ((flags & both) != both).astype(np.uint8)
        not_sampled = ((flags & _FLAG_SAMPLED) == 0).astype(np.uint8)
        return (1 + 2 * local + not_sampled) * np.asarray(has_parent, dtype=np.uint8)

    def _decide(self, batch):
        n = batch.num_rows
        has_parent = batch.column("parent_span_id").is_valid().to_numpy(zero_copy_only=False)
        flags = batch.column("flags").to_numpy()
        cat = self._category(has_parent, flags)
        if all(hasattr(d, "_mask_ids") for d in self._delegates):
            return self._decide_by_ids(batch, cat)
        mask = np.zeros(n, dtype=bool)
        codes = np.zeros(n, dtype=np.intp)
        probs: list[float] = []
        ids = _trace_id_matrix(batch.column("trace_id"))
        for c, d in enumerate(self._delegates):
            sel = cat == c
            if not sel.any():
                continue
            if hasattr(d, "_decide_ids"):
                m, sub_codes, sub_probs = d._decide_ids(ids if sel.all() else ids[sel])
            else:
                m, sub_codes, sub_probs = d._decide(batch if sel.all() else batch.filter(sel))
            mask[sel] = m
            codes[sel] = len(probs) + (0 if sub_codes is None else sub_codes)
            probs.extend(sub_probs)
        self._count(int(mask.sum()), n)
        return mask, codes, probs or (1.0,)

    def _decide_by_ids(self, batch, cat):
        ids = _trace_id_matrix(batch.column("trace_id"))
        rows = np.bincount(cat, minlength=5)
        choices: list[Any] = []
        probs = []
        for c, d in enumerate(self._delegates):
            if rows[c]:
                m, p = d._mask_ids(ids)
            else:
                m, p = False, 1.0
            choices.append(m)
            probs.append(p)
        mask = np.choose(cat, choices)
        kept = np.bincount(cat, weights=mask, minlength=5)
        for c, d in enumerate(self._delegates):
            if rows[c]:
                d._count(int(kept[c]), int(rows[c]))
        self._count(int(kept.sum()), batch.num_rows)
        return mask, cat, probs

    def _decide_one(self, span):
        has_parent = span.parent_span_id is not None
        c = int(self._category(np.bool_(has_parent), np.uint32(span.flags)))
        keep, p = self._delegates[c]._decide_one(span)
        self._count(int(keep), 1)
        return keep, p


@dataclass
class SamplingConfig:
    """Rates of the adaptive priority sampler.

    Errors are kept at ``error_rate``, spans of at least ``slow_threshold_ms``
    at ``slow_rate``, the rest at ``base_rate``. With
    ``target_spans_per_second`` set, the base rate is re-computed every
    ``adjust_interval_s`` from the arrival rates of the last interval so that
    the kept spans per second meet the target, within ``[min_rate,
    max_rate]``; ``smoothing`` is the weight of the newest interval in the
    arrival-rate estimate (1.0: no memory). Under backpressure the base rate
    is scaled down towards ``min_rate`` as the ring buffer fills.
    ``rule`` and ``record_probability`` are as for :class:`TraceIdRatio`.
    """

    base_rate: float = 0.01
    error_rate: float = 1.0
    slow_rate: float = 0.5
    slow_threshold_ms: float = 1000.0
    min_rate: float = 0.0001
    max_rate: float = 1.0
    target_spans_per_second: float | None = None
    adjust_interval_s: float = 1.0
    smoothing: float = 0.8
    rule: str = "traceidratio"
    record_probability: bool = True

    def __post_init__(self) -> None:
        for name in ("base_rate", "error_rate", "slow_rate", "min_rate", "max_rate"):
            _check_rate(getattr(self, name), f"SamplingConfig.{name}")
        if self.min_rate > self.max_rate:
            raise ValueError(
                f"SamplingConfig.min_rate ({self.min_rate}) must not exceed max_rate "
                f"({self.max_rate}).")
        t = self.slow_threshold_ms
        if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0:
            raise ValueError(
                f"SamplingConfig.slow_threshold_ms must be a number >= 0, got {t!r}.")
        tgt = self.target_spans_per_second
        if tgt is not None and (isinstance(tgt, bool) or not isinstance(tgt, int | float)
                                or not 0 < tgt < math.inf):
            raise ValueError(
                "SamplingConfig.target_spans_per_second must be a positive number or None, "
                f"got {tgt!r}.")
        iv = self.adjust_interval_s
        if isinstance(iv, bool) or not isinstance(iv, int | float) or not 0 < iv < math.inf:
            raise ValueError(
                f"SamplingConfig.adjust_interval_s must be a positive number, got {iv!r}.")
        sm = self.smoothing
        if isinstance(sm, bool) or not isinstance(sm, int | float) or not 0 < sm <= 1:
            raise ValueError(f"SamplingConfig.smoothing must be in (0, 1], got {sm!r}.")
        _check_rule(self.rule, "SamplingConfig.rule")


class AdaptiveSamplingStrategy(Sampler):
    """Priority sampling: errors, then slow spans, then the rest at the base rate.

    Each class is decided from the trace id at its own rate, so each is
    trace-consistent. ``clock`` (seconds, monotonic) drives the rate
    controller; tests pass a fake one.

    Examples
    --------
    >>> import knhk
    >>> s = AdaptiveSamplingStrategy(SamplingConfig(base_rate=0.0, slow_threshold_ms=1))
    >>> s.should_sample(knhk.Span("slow", trace_id=1, span_id=1, duration_ns=2_000_000))
    <SamplingDecision.SAMPLE: 1>
    >>> s.stats()["slow_count"]
    1
    """

    def __init__(self, config: SamplingConfig | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, SamplingConfig):
            raise ValueError(
                f"AdaptiveSamplingStrategy takes a knhk.SamplingConfig, got "
                f"{type(config).__name__}.")
        self.config = cfg = config or SamplingConfig()
        self.rule = cfg.rule
        self.record_probability = cfg.record_probability
        self._clock = clock or time.monotonic
        self._slow_ns = min(math.ceil(cfg.slow_threshold_ms * 1e6), 2**63 - 1)
        self._target_base = cfg.base_rate
        self._pressure = 0.0
        self._errors = self._slow = 0
        self._window_start: float | None = None
        self._window = np.zeros(3, dtype=np.int64)  # arrivals: base, slow, error
        self._estimate: tuple[float, float] | None = None  # base/s, fixed kept/s
        self._adjustments = 0
        self._set_base(cfg.base_rate)

    def _set_base(self, rate: float) -> None:
        self._base = rate
        cfg = self.config
        parts = [_ratio_bound(r, self.rule) for r in (rate, cfg.slow_rate, cfg.error_rate)]
        self._bounds = np.array([p[0] for p in parts], dtype=np.uint64)
        self._all = np.array([p[1] for p in parts], dtype=np.uint8)
        self._probs = tuple(p[2] for p in parts)

    @property
    def current_base_rate(self) -> float:
        """The base rate in force: the configured or controlled one, after backpressure."""
        return self._base

    def _effective(self) -> float:
        cfg = self.config
        if self._pressure <= 0.5:
            return self._target_base
        x = min(1.0, (self._pressure - 0.5) / 0.5)
        # Never raise the rate above the unpressured one (min_rate may exceed it).
        return min(self._target_base, max(cfg.min_rate, self._target_base * (1.0 - x)))

    def on_pressure(self, occupancy: float) -> None:
        """Scale the base rate down as ring occupancy passes one half."""
        with self._lock:
            self._pressure = float(occupancy)
            self._set_base(self._effective())

    def _adjust_locked(self, now: float) -> None:
        cfg = self.config
        if cfg.target_spans_per_second is None:
            return
        if self._window_start is None:
            self._window_start = now
            return
        elapsed = now - self._window_start
        if elapsed < cfg.adjust_interval_s:
            return
        n_base, n_slow, n_err = (float(x) for x in self._window)
        base_s = n_base / elapsed
        fixed_s = (n_slow * cfg.slow_rate + n_err * cfg.error_rate) / elapsed
        if self._estimate is None:
            est_base, est_fixed = base_s, fixed_s
        else:
            a = cfg.smoothing
            est_base = a * base_s + (1 - a) * self._estimate[0]
            est_fixed = a * fixed_s + (1 - a) * self._estimate[1]
        self._estimate = (est_base, est_fixed)
        room = cfg.target_spans_per_second - est_fixed
        desired = room / est_base if est_base > 0 else cfg.max_rate
        self._target_base = min(cfg.max_rate, max(cfg.min_rate, desired))
        self._window_start = now
        self._window[:] = 0
        self._adjustments += 1
        self._set_base(self._effective())
        logger.debug("adaptive sampling: base rate %.6g (arrivals %.1f/s, fixed %.1f/s)",
                     self._base, est_base, fixed_s)

    def _decide(self, batch):
        ids = _trace_id_matrix(batch.column("trace_id"))
        status = batch.column("status_code").to_numpy()
        start = batch.column("start_time_ns").to_numpy()
        end = batch.column("end_time_ns").to_numpy()
        classes = np.empty(batch.num_rows, dtype=np.uint8)
        with self._lock:
            self._adjust_locked(self._clock())
            bounds, keep_all, probs = self._bounds, self._all, self._probs
        mask, counts = _k.priority_mask(ids, status, start, end, self._slow_ns, bounds,
                                        keep_all, _RULES[self.rule], classes)
        kept = int(counts[3:].sum())
        with self._lock:
            self._window += counts[:3]
            self._sampled += kept
            self._dropped += batch.num_rows - kept
            self._errors += int(counts[2])
            self._slow += int(counts[1])
        return mask, classes, probs

    def _decide_one(self, span):
        error = int(span.status) == 2
        slow = not error and span.duration_ns >= self._slow_ns
        c = 2 if error else 1 if slow else 0
        with self._lock:
            self._adjust_locked(self._clock())
            keep = bool(self._all[c]) or _span_key(span.trace_id, self.rule) < \
                int(self._bounds[c])
            p = self._probs[c]
            self._window[c] += 1
            self._sampled += keep
            self._dropped += not keep
            self._errors += error
            self._slow += slow
        return keep, p

    @property
    def description(self) -> str:
        cfg = self.config
        return (f"AdaptivePriority{{base:{self._base},slow:{cfg.slow_rate}"
                f"@{cfg.slow_threshold_ms}ms,error:{cfg.error_rate}}}")

    def stats(self) -> dict[str, float]:
        """Counters: sample/drop/error/slow counts, the base rate in force, the kept share.

        ``slow_count`` counts slow spans that are not errors (each span has one
        class); ``rate_adjustments`` how often the rate controller ran.
        """
        with self._lock:
            total = self._sampled + self._dropped
            return {
                "sample_count": self._sampled, "drop_count": self._dropped,
                "error_count": self._errors, "slow_count": self._slow,
                "current_base_rate": self._base,
                "effective_rate": self._sampled / total if total else 0.0,
                "rate_adjustments": self._adjustments,
            }


#: The issue's name for the adaptive priority sampler; the same class.
AdaptivePrioritySampler = AdaptiveSamplingStrategy


# -- environment -----------------------------------------------------------------------

_ENV_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
                 "parentbased_always_off", "parentbased_traceidratio")


def sampler_from_env(environ: Mapping[str, str] | None = None) -> Sampler | None:
    """The head sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name.

    Returns None when the variable is unset (export everything). As the
    OpenTelemetry SDK does, an unknown sampler name is logged and ignored and
    a missing or bad ratio is logged and 1.0 used.

    >>> sampler_from_env({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    ...                   "OTEL_TRACES_SAMPLER_ARG": "0.25"}).description[:40]
    'ParentBased{root:TraceIdRatio{0.25},remo'
    """
    env = os.environ if environ is None else environ
    name = env.get(OTEL_TRACES_SAMPLER, "").strip().lower()
    if not name:
        return None
    if name not in _ENV_SAMPLERS:
        logger.warning("ignoring %s=%r: knhk knows %s", OTEL_TRACES_SAMPLER, name,
                       ", ".join(_ENV_SAMPLERS))
        return None
    if name.endswith("always_on"):
        inner: Sampler = AlwaysOn()
    elif name.endswith("always_off"):
        inner = AlwaysOff()
    else:
        raw = env.get(OTEL_TRACES_SAMPLER_ARG)
        try:
            rate = float(raw if raw is not None else "")
            inner = TraceIdRatio(rate)
        except ValueError:
            logger.warning("%s=%r is not a rate in [0, 1]; using 1.0",
                           OTEL_TRACES_SAMPLER_ARG, raw)
            inner = TraceIdRatio(1.0)
    return ParentBased(inner) if name.startswith("parentbased_") else inner


def __getattr__(name: str) -> Any:
    # Tail sampling lives in its own module (it imports this one).
    if name in ("TailSampler", "TailSamplingConfig", "Policy"):
        from knhk import tail_sampling

        return getattr(tail_sampling, name)
    raise AttributeError(f"module 'knhk.sampling' has no attribute {name!r}")

