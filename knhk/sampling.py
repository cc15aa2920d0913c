"""Samplers: decide which spans are exported, per span or as a vectorized mask.

Every ratio decision is a deterministic function of the trace id (its low 64
bits compared with ``rate * 2**64``, as OpenTelemetry's ``TraceIdRatioBased``
does), so all spans of a trace get the same decision on every instance, and a
higher rate keeps a superset of what a lower one keeps.

>>> import knhk
>>> s = knhk.AdaptiveSamplingStrategy(knhk.SamplingConfig(base_rate=0.0))
>>> s.should_sample(knhk.Span("op", trace_id=1, span_id=1, status=knhk.SpanStatus.ERROR))
<SamplingDecision.SAMPLE: 1>
>>> s.should_sample(knhk.Span("op", trace_id=1, span_id=1))
<SamplingDecision.DROP: 0>
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from knhk.batch import SpanBatch, trace_id_low64
from knhk.pipeline import StageResult

__all__ = [
    "AdaptiveSamplingStrategy",
    "SamplingConfig",
    "SamplingDecision",
    "trace_id_ratio_mask",
]

_TWO64 = 1 << 64


class SamplingDecision(enum.IntEnum):
    DROP = 0
    SAMPLE = 1


def _bound(rate: float) -> int:
    # OpenTelemetry's TraceIdRatioBased: round(rate * 2**64), compared with `<`.
    return round(rate * _TWO64)


def trace_id_ratio_mask(low64: np.ndarray, rate: float | np.ndarray) -> np.ndarray:
    """Keep mask for trace ids (their low 64 bits) at ``rate`` (scalar or per row)."""
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


@dataclass
class SamplingConfig:
    """Rates of the adaptive priority sampler.

    Errors are kept at ``error_rate``, spans of at least ``slow_threshold_ms``
    at ``slow_rate``, the rest at ``base_rate``. Under backpressure the base
    rate is scaled down towards ``min_rate`` as the ring buffer fills.
    """

    base_rate: float = 0.01
    error_rate: float = 1.0
    slow_rate: float = 0.5
    slow_threshold_ms: float = 1000.0
    min_rate: float = 0.0001
    max_rate: float = 1.0

    def __post_init__(self) -> None:
        for name in ("base_rate", "error_rate", "slow_rate", "min_rate", "max_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"SamplingConfig.{name} must be a rate in [0, 1], got {v!r}.")
        if self.min_rate > self.max_rate:
            raise ValueError("SamplingConfig.min_rate must not exceed max_rate.")
        if not isinstance(self.slow_threshold_ms, int | float) or self.slow_threshold_ms < 0:
            raise ValueError(
                f"SamplingConfig.slow_threshold_ms must be >= 0, got {self.slow_threshold_ms!r}.")


class AdaptiveSamplingStrategy:
    """Priority sampling: errors, then slow spans, then the rest at the base rate."""

    def __init__(self, config: SamplingConfig | None = None) -> None:
        self.config = config or SamplingConfig()
        self._base = self.config.base_rate
        self._pressure = 0.0
        self._lock = threading.Lock()
        self._sampled = self._dropped = self._errors = self._slow = 0

    @property
    def current_base_rate(self) -> float:
        return self._base

    def on_pressure(self, occupancy: float) -> None:
        """Scale the base rate down as ring occupancy passes one half."""
        cfg = self.config
        self._pressure = occupancy
        if occupancy <= 0.5:
            self._base = cfg.base_rate
        else:
            x = min(1.0, (occupancy - 0.5) / 0.5)
            self._base = max(cfg.min_rate, cfg.base_rate * (1.0 - x))

    def _rates(self, errors: np.ndarray, slow: np.ndarray) -> np.ndarray:
        cfg = self.config
        return np.where(errors, cfg.error_rate, np.where(slow, cfg.slow_rate, self._base))

    def sample_mask(self, batch: SpanBatch) -> np.ndarray:
        """Vectorized decisions for every row of ``batch`` (True = export)."""
        errors = batch.column("status_code").to_numpy() == 2
        slow = batch.duration_ns() >= self.config.slow_threshold_ms * 1e6
        mask = trace_id_ratio_mask(trace_id_low64(batch.column("trace_id")),
                                   self._rates(errors, slow))
        with self._lock:
            kept = int(mask.sum())
            self._sampled += kept
            self._dropped += mask.size - kept
            self._errors += int(errors.sum())
            self._slow += int((slow & ~errors).sum())
        return mask

    def should_sample(self, span: Any) -> SamplingDecision:
        """The decision for one ``Span`` (the same rule as :meth:`sample_mask`)."""
        cfg = self.config
        error = int(span.status) == 2
        slow = span.duration_ns >= cfg.slow_threshold_ms * 1e6
        rate = cfg.error_rate if error else cfg.slow_rate if slow else self._base
        keep = int.from_bytes(span.trace_id[8:], "big") < _bound(rate)
        with self._lock:
            self._sampled += keep
            self._dropped += not keep
            self._errors += error
            self._slow += slow and not error
        return SamplingDecision(keep)

    def process(self, batch: SpanBatch) -> StageResult:
        return StageResult(batch, mask=self.sample_mask(batch))

    def stats(self) -> dict[str, float]:
        with self._lock:
            total = self._sampled + self._dropped
            return {
                "sample_count": self._sampled, "drop_count": self._dropped,
                "error_count": self._errors, "slow_count": self._slow,
                "current_base_rate": self._base,
                "effective_rate": self._sampled / total if total else 0.0,
            }
