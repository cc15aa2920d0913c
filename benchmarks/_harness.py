"""Shared helpers of the benchmarks: timing, medians, RSS, result records."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One benchmark figure: knhk beside its peer, measured in the same run."""

    name: str
    unit: str
    knhk: float
    peer: float | None = None
    peer_name: str | None = None
    target: str | None = None
    met: bool | None = None
    runs: int = 1
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.peer in (None, 0):
            return None
        return self.knhk / self.peer

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def median_rate(fn: Callable[[], tuple[int, float]], runs: int) -> tuple[float, list[float]]:
    """Run ``fn`` (returns events, seconds) ``runs`` times; median events/s and all rates."""
    rates = []
    for _ in range(runs):
        gc.collect()
        n, seconds = fn()
        rates.append(n / seconds)
    return statistics.median(rates), rates


def paired_rates(fns: list[Callable[[], tuple[int, float]]], runs: int
                 ) -> list[tuple[float, list[float]]]:
    """Like :func:`median_rate` for several sides at once, their runs interleaved
    (a, b, c, a, b, c, ...): load from outside then falls on every side alike, so
    the ratios of the medians hold still on a shared machine."""
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            gc.collect()
            n, seconds = fn()
            rates[i].append(n / seconds)
    return [(statistics.median(r), r) for r in rates]


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
