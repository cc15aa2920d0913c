"""Retry policy shared by network exporters: what is retryable, and how long to wait.

The table is the OTLP specification's: gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``ABORTED``, ``OUT_OF_RANGE``, ``CANCELLED``, ``DATA_LOSS`` are retried, and
``RESOURCE_EXHAUSTED`` only when the server sent ``RetryInfo``; HTTP 429, 502,
503 and 504 are retried. A server's ``RetryInfo`` or ``Retry-After`` wins;
otherwise the delay is exponential backoff with jitter, with the
OpenTelemetry Collector's defaults.

Example
-------
>>> b = Backoff(RetryConfig(initial_interval=1.0, randomization_factor=0.0))
>>> [b.next_delay() for _ in range(4)]
[1.0, 1.5, 2.25, 3.375]
>>> retry_after_seconds("120")
120.0
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from knhk import _attributes

__all__ = [
    "GRPC_RETRYABLE",
    "HTTP_RETRYABLE",
    "Backoff",
    "RetryConfig",
    "grpc_retry_delay",
    "retry_after_seconds",
]

#: gRPC status codes (by name) retried whatever the details say.
GRPC_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE",
                            "CANCELLED", "DATA_LOSS"})
#: HTTP statuses retried.
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})

_RETRY_INFO_URL = b"type.googleapis.com/google.rpc.RetryInfo"


@dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with jitter; defaults are the OpenTelemetry Collector's.

    Parameters
    ----------
    enabled : bool
        ``False`` sends once and never retries.
    initial_interval, max_interval : float
        First wait and largest wait, in seconds.
    multiplier : float
        Growth of the wait per attempt.
    randomization_factor : float
        Each wait is drawn uniformly from ``wait * (1 ± factor)``.
    max_elapsed_time : float
        Give up when the next attempt would start later than this after the
        first; ``0`` never gives up (the Collector's meaning).
    """

    enabled: bool = True
    initial_interval: float = 5.0
    randomization_factor: float = 0.5
    multiplier: float = 1.5
    max_interval: float = 30.0
    max_elapsed_time: float = 300.0

    def __post_init__(self) -> None:
        for name in ("initial_interval", "max_interval", "max_elapsed_time"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"RetryConfig.{name} must be a number >= 0, got {value!r}.")
        if not 0 <= self.randomization_factor <= 1:
            raise ValueError("RetryConfig.randomization_factor must be in [0, 1], "
                             f"got {self.randomization_factor!r}.")
        if not isinstance(self.multiplier, int | float) or self.multiplier < 1:
            raise ValueError(f"RetryConfig.multiplier must be >= 1, got {self.multiplier!r}.")
        if self.enabled and self.initial_interval == 0:
            raise ValueError("RetryConfig.initial_interval must be > 0 while retries are "
                             "enabled (0 would retry in a busy loop).")
        if self.initial_interval > self.max_interval:
            raise ValueError(f"RetryConfig.initial_interval ({self.initial_interval!r}) must "
                             f"not exceed max_interval ({self.max_interval!r}).")

    def gives_up(self, elapsed: float, delay: float) -> bool:
        """True if an attempt ``delay`` seconds from now, ``elapsed`` after the first, is
        past ``max_elapsed_time`` (never when it is 0).

        >>> RetryConfig(max_elapsed_time=10).gives_up(9.0, 2.0)
        True
        >>> RetryConfig(max_elapsed_time=0).gives_up(1e9, 30.0)
        False
        """
        return self.max_elapsed_time > 0 and elapsed + delay > self.max_elapsed_time


class Backoff:
    """The successive waits of one export under ``config``."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._current = config.initial_interval
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The next wait in seconds (jittered), advancing the schedule."""
        c = self.config
        base = self._current
        self._current = min(self._current * c.multiplier, c.max_interval)
        if c.randomization_factor == 0:
            return base
        spread = base * c.randomization_factor
        return self._rng.uniform(base - spread, base + spread)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def grpc_retry_delay(trailing_metadata) -> float | None:
    """The ``RetryInfo.retry_delay`` in ``grpc-status-details-bin``, if the server sent one."""
    raw = None
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            raw = value
    if not raw:
        return None
    try:
        for no, wt, detail in _attributes._fields(raw):
            if no != 3 or wt != 2:
                continue
            fields = {n: v for n, w, v in _attributes._fields(detail) if w == 2}
            if fields.get(1) != _RETRY_INFO_URL:
                continue
            secs = nanos = 0
            for n, w, duration in _attributes._fields(fields.get(2, b"")):
                if n == 1 and w == 2:
                    for n2, w2, v in _attributes._fields(duration):
                        if n2 == 1 and w2 == 0:
                            secs = struct.unpack("<q", struct.pack("<Q", v))[0]
                        elif n2 == 2 and w2 == 0:
                            nanos = v & 0xFFFFFFFF
            return max(0.0, secs + nanos / 1e9)
    except ValueError:
        return None
    return None
