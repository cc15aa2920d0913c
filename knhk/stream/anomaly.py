"""Anomaly detection over window aggregates: fixed thresholds and per-key EWMA baselines.

Detectors watch the results of closed windows (the rows of
``StreamProcessor.get_results``) and return alerts; attach them with
``processor.add_detector(...)``.

- :class:`ThresholdRule`: a column above or below a fixed bound.
- :class:`EwmaDetector`: per key, an exponentially weighted mean and variance
  of a column (p99 latency, error rate, throughput, ...); after ``warmup``
  windows, a value more than ``z`` standard deviations from the mean alerts.

Example
-------
>>> import pyarrow as pa
>>> from knhk.stream.anomaly import EwmaDetector
>>> det = EwmaDetector("p99-jump", "p99_duration_ms", warmup=3, z=3.0)
>>> rows = [10.0, 11.0, 10.5, 10.2, 50.0]
>>> alerts = [det.observe(pa.table({"window_end": [i], "service": ["api"],
...                                  "p99_duration_ms": [v]}), ("service",))
...           for i, v in enumerate(rows)]
>>> [len(a) for a in alerts]
[0, 0, 0, 0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from knhk.stream.alerts import Alert, check_severity

__all__ = ["EwmaDetector", "ThresholdRule"]


def _fmt(template: str, what: str, **fields: Any) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{what}: message template {template!r} is invalid: {exc!r}") from None


_PROBE = {"rule": "r", "key": ("k",) * 8, "column": "c", "value": 1.0, "mean": 1.0,
          "std": 1.0, "z": 1.0, "bound": 1.0, "window_start": 0, "window_end": 0}


class ThresholdRule:
    """Alert when ``column`` of a window result is above ``above`` or below ``below``.

    Parameters
    ----------
    name : str
    column : str
        A result column, e.g. ``"p99_duration_ms"``, ``"error_rate"``.
    above, below : float, optional
        At least one bound.
    severity : str
    message : str
        Template with ``{rule}``, ``{key}``, ``{column}``, ``{value}``, ``{bound}``,
        ``{window_end}``.
    """

    def __init__(self, name: str, column: str, *, above: float | None = None,
                 below: float | None = None, severity: str = "warning",
                 message: str = "{rule}: {column} = {value:g} on {key} (bound {bound:g})") -> None:
        if above is None and below is None:
            raise ValueError(f"ThresholdRule {name!r}: give above= or below=")
        self.name, self.column = name, column
        self.above, self.below = above, below
        self.severity = check_severity(severity)
        _fmt(message, f"ThresholdRule {name!r}", **_PROBE)
        self.message = message

    def observe(self, table: pa.Table, key_names: Sequence[str]) -> list[Alert]:
        if self.column not in table.column_names:
            raise ValueError(f"ThresholdRule {self.name!r}: no column {self.column!r} in the "
                             f"results (columns: {table.column_names})")
        out = []
        for row in table.to_pylist():
            v = row[self.column]
            if v is None:
                continue
            bound = None
            if self.above is not None and v > self.above:
                bound = self.above
            elif self.below is not None and v < self.below:
                bound = self.below
            if bound is None:
                continue
            key = tuple(row[k] for k in key_names)
            msg = self.message.format(rule=self.name, key=key, column=self.column, value=v,
                                      bound=bound, window_start=row.get("window_start"),
                                      window_end=row["window_end"], mean=math.nan,
                                      std=math.nan, z=math.nan)
            out.append(Alert(self.name, self.severity, msg, row["window_end"], key,
                             {"column": self.column, "value": v, "bound": bound}))
        return out


class EwmaDetector:
    """Per-key EWMA baseline of a result column with a z-score test.

    Parameters
    ----------
    name : str
    column : str
        ``"p99_duration_ms"``, ``"error_rate"``, ``"throughput"``, ...
    smoothing : float
        EWMA weight of the newest window, in (0, 1].
    z : float
        Alert when ``|value - mean| > z * std``.
    warmup : int
        Windows per key before alerts start.
    min_std : float
        Floor on the standard deviation (a flat baseline would otherwise alert
        on any change).
    severity : str
    message : str
        Template with ``{rule}``, ``{key}``, ``{column}``, ``{value}``, ``{mean}``,
        ``{std}``, ``{z}``, ``{window_end}``.
    max_keys : int
        Baselines kept; beyond it the key updated longest ago is forgotten
        (counted in ``evictions``) and starts a new warm-up if it returns.
    """

    def __init__(self, name: str, column: str = "p99_duration_ms", *, smoothing: float = 0.3,
                 z: float = 3.0, warmup: int = 5, min_std: float = 1e-9,
                 severity: str = "warning",
                 message: str = "{rule}: {column} = {value:g} on {key}, baseline "
                                "{mean:g} ± {std:g} (z = {z:.1f})",
                 max_keys: int = 100_000) -> None:
        if not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"EwmaDetector {name!r}: max_keys must be an int >= 1, "
                             f"got {max_keys!r}")
        self.max_keys = max_keys
        self.evictions = 0
        if not 0 < smoothing <= 1:
            raise ValueError(f"EwmaDetector {name!r}: smoothing must be in (0, 1], "
                             f"got {smoothing!r}")
        if not z > 0:
            raise ValueError(f"EwmaDetector {name!r}: z must be positive, got {z!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"EwmaDetector {name!r}: warmup must be an int >= 1, "
                             f"got {warmup!r}")
        self.name, self.column = name, column
        self.smoothing, self.z, self.warmup, self.min_std = smoothing, z, warmup, min_std
        self.severity = check_severity(severity)
        _fmt(message, f"EwmaDetector {name!r}", **_PROBE)
        self.message = message
        self._state: dict[tuple, list[float]] = {}  # key -> [n, mean, var]

    def baseline(self, key: tuple) -> tuple[float, float] | None:
        """(mean, std) of ``key`` so far, or None if unseen."""
        st = self._state.get(key)
        return None if st is None else (st[1], math.sqrt(st[2]))

    def observe(self, table: pa.Table, key_names: Sequence[str]) -> list[Alert]:
        if self.column not in table.column_names:
            raise ValueError(f"EwmaDetector {self.name!r}: no column {self.column!r} in the "
                             f"results (columns: {table.column_names})")
        out = []
        a = self.smoothing
        for row in table.to_pylist():
            x = row[self.column]
            if x is None or not math.isfinite(x):
                continue
            key = tuple(row[k] for k in key_names)
            # re-inserted on every update: the dict's order is least recently updated first
            st = self._state.pop(key, None)
            if st is None:
                self._state[key] = [1, float(x), 0.0]
                if len(self._state) > self.max_keys:
                    del self._state[next(iter(self._state))]
                    self.evictions += 1
                continue
            self._state[key] = st
            n, mean, var = st
            std = max(math.sqrt(var), self.min_std)
            zscore = (x - mean) / std
            if n >= self.warmup and abs(zscore) > self.z:
                msg = self.message.format(rule=self.name, key=key, column=self.column, value=x,
                                          mean=mean, std=std, z=zscore, bound=math.nan,
                                          window_start=row.get("window_start"),
                                          window_end=row["window_end"])
                out.append(Alert(self.name, self.severity, msg, row["window_end"], key,
                                 {"column": self.column, "value": x, "mean": mean,
                                  "std": std, "z": zscore}))
            diff = x - mean
            incr = a * diff
            st[0], st[1], st[2] = n + 1, mean + incr, (1 - a) * (var + diff * incr)
        return out
