"""A memory limiter like the OpenTelemetry Collector's: refuse data while memory is high.

Resident memory (``/proc/self/statm``, else psutil) is read at most once per
``check_interval``, so asking costs a clock read almost always. Above the
soft limit the receivers refuse new requests with a retryable error
(``UNAVAILABLE`` / 503 with retry info): nothing is dropped, the clients hold
the data and retry. Above the hard limit the limiter also runs the garbage
collector and hands freed memory back to the system (Arrow's pool,
``malloc_trim``). Every refusal and every forced collection is counted.

Wire it to a pipeline's receivers with :func:`knhk.receivers._common.set_memory_limiter`.

Example
-------
>>> limiter = MemoryLimiter(soft_limit_mib=10_000, hard_limit_mib=20_000)
>>> limiter.admit()
True
>>> tight = MemoryLimiter(soft_limit_mib=1, hard_limit_mib=2, rss=lambda: 5 << 20)
>>> tight.admit(), tight.state(), tight.stats()["refused_requests"]
(False, 'hard', 1)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["MemoryLimiter", "resident_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory in bytes (``/proc/self/statm``, else psutil)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def _release_memory() -> None:
    """Give freed memory back to the system, so RSS can fall below the limits again."""
    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # an old pool without release_unused: not worth failing for
        logger.debug("pyarrow pool release failed", exc_info=True)
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(libc_name).malloc_trim(0)


class MemoryLimiter:
    """Soft and hard limits on resident memory, checked cheaply.

    Parameters
    ----------
    soft_limit_mib : float
        Above this, :meth:`admit` says no (the receiver answers a retryable error).
    hard_limit_mib : float
        Above this, the limiter also forces a collection and returns memory to
        the system (at most once per ``check_interval``). Must be >= the soft limit.
    check_interval : float
        Seconds between two reads of resident memory.
    rss : callable, optional
        Returns resident bytes; :func:`resident_bytes` by default (another
        process's memory, or a fixed figure for a test).
    """

    def __init__(self, soft_limit_mib: float, hard_limit_mib: float, *,
                 check_interval: float = 0.05, rss: Callable[[], int] | None = None) -> None:
        for name, value in (("soft_limit_mib", soft_limit_mib),
                            ("hard_limit_mib", hard_limit_mib)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"MemoryLimiter {name} must be a positive number of MiB, "
                                 f"got {value!r}.")
        if hard_limit_mib < soft_limit_mib:
            raise ValueError(f"MemoryLimiter hard_limit_mib ({hard_limit_mib}) must be >= "
                             f"soft_limit_mib ({soft_limit_mib}).")
        if not isinstance(check_interval, int | float) or check_interval < 0:
            raise ValueError(f"MemoryLimiter check_interval must be >= 0 seconds, "
                             f"got {check_interval!r}.")
        self.soft_limit = int(soft_limit_mib * (1 << 20))
        self.hard_limit = int(hard_limit_mib * (1 << 20))
        self.check_interval = float(check_interval)
        self._rss = rss or resident_bytes
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._next_release = 0.0
        self._state = "ok"
        self.last_rss = 0
        self.peak_rss = 0
        self.refused_requests = 0
        self.admitted_requests = 0
        self.forced_gcs = 0
        self.releases = 0
        self.soft_crossings = 0

    def state(self) -> str:
        """``"ok"``, ``"soft"`` or ``"hard"``: where resident memory stands (re-read if due)."""
        now = time.monotonic()
        if now < self._next_check:
            return self._state
        with self._lock:
            if now < self._next_check:
                return self._state
            self._next_check = now + self.check_interval
            rss = self._rss()
            if rss > self.hard_limit:
                self.forced_gcs += 1
                logger.warning("resident memory %.1f MiB is above the hard limit %.1f MiB: "
                               "forcing a collection", rss / 2**20, self.hard_limit / 2**20)
                _release_memory()
                rss = self._rss()
            elif rss > self.soft_limit and now >= self._next_release:
                # give back what is already free (at most once a second: a collection
                # is not free), else freed memory would keep RSS above the limit
                self._next_release = now + 1.0
                self.releases += 1
                _release_memory()
                rss = self._rss()
            state = "hard" if rss > self.hard_limit else "soft" if rss > self.soft_limit \
                else "ok"
            if state != "ok" and self._state == "ok":
                self.soft_crossings += 1
                logger.info("resident memory %.1f MiB is above the soft limit %.1f MiB: "
                            "refusing data (retryable)", rss / 2**20, self.soft_limit / 2**20)
            self._state = state
            self.last_rss = rss
            self.peak_rss = max(self.peak_rss, rss)
            return state

    def admit(self) -> bool:
        """True if a request may come in; False (counted) while above the soft limit."""
        ok = self.state() == "ok"
        with self._lock:
            if ok:
                self.admitted_requests += 1
            else:
                self.refused_requests += 1
        return ok

    def stats(self) -> dict[str, int | str]:
        """Counters: requests admitted and refused, forced collections, RSS last and peak."""
        with self._lock:
            return {"state": self._state, "admitted_requests": self.admitted_requests,
                    "refused_requests": self.refused_requests, "forced_gcs": self.forced_gcs,
                    "releases": self.releases,
                    "soft_crossings": self.soft_crossings, "last_rss_bytes": self.last_rss,
                    "peak_rss_bytes": self.peak_rss, "soft_limit_bytes": self.soft_limit,
                    "hard_limit_bytes": self.hard_limit}
