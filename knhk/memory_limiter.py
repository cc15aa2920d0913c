"""A memory limiter like the OpenTelemetry Collector's: refuse data while memory is high.

Resident memory (``/proc/self/statm``, else psutil) is read at most once per
``check_interval``, so asking costs a clock read almost always. Above the
soft limit the receivers refuse new requests with a retryable error
(``UNAVAILABLE`` / 503 with retry info): nothing is dropped, the clients hold
the data and retry. Above the hard limit the limiter also runs the garbage
collector and hands freed memory back to the system (Arrow's pool,
``malloc_trim``). Every refusal and every forced collection is counted.

Wire it to a pipeline's receivers with
``TelemetryPipeline.builder().with_memory_limiter(...)`` (or, for a built
pipeline, :func:`knhk.receivers._common.set_memory_limiter`).
:meth:`MemoryLimiter.from_collector` takes the Collector's
``memory_limiter`` settings (``limit_mib``, ``spike_limit_mib``,
``limit_percentage``, ``spike_limit_percentage``, ``check_interval``): the
hard limit is the limit, the soft limit is the limit minus the spike. Unlike
the Collector, which measures the Go heap, knhk measures resident memory
(RSS), which includes the interpreter and Arrow's buffers.

Example
-------
>>> limiter = MemoryLimiter(soft_limit_mib=10_000, hard_limit_mib=20_000)
>>> limiter.admit()
True
>>> tight = MemoryLimiter(soft_limit_mib=1, hard_limit_mib=2, rss=lambda: 5 << 20)
>>> tight.admit(), tight.state(), tight.stats()["refused_requests"]
(False, 'hard', 1)
>>> c = MemoryLimiter.from_collector(limit_mib=1000, spike_limit_mib=200)
>>> c.soft_limit >> 20, c.hard_limit >> 20, c.check_interval
(800, 1000, 1.0)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MemoryLimiter", "resident_bytes", "total_memory_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory in bytes (``/proc/self/statm``, else psutil)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None when there is none or it cannot be read."""
    candidates = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    candidates.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
                elif "memory" in controllers.split(","):
                    candidates.append(
                        f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    # inside a container the process's own cgroup is usually mounted as the root
    candidates += ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    for path in candidates:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):  # v1 says "no limit" with ~2**63
            return int(text)
        if text == "max" or text.isdigit():
            return None
    return None


def total_memory_bytes() -> int:
    """Memory this process may use: its cgroup's limit if it has one, else physical memory.

    What the Collector's ``limit_percentage`` is a percentage of.

    >>> total_memory_bytes() > 0
    True
    """
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * _PAGE
    except (ValueError, OSError, AttributeError):
        import psutil

        physical = int(psutil.virtual_memory().total)
    limit = _cgroup_limit()
    return min(physical, limit) if limit else physical


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
        the system (at most once per ``check_interval``, and per
        :attr:`MIN_GC_INTERVAL`). Must be >= the soft limit.
    check_interval : float
        Seconds between two reads of resident memory.
    rss : callable, optional
        Returns resident bytes; :func:`resident_bytes` by default (another
        process's memory, or a fixed figure for a test).
    """

    #: Seconds between two forced collections while above the hard limit.
    MIN_GC_INTERVAL = 1.0

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
        self._next_gc = 0.0
        self._state = "ok"
        self.last_rss = 0
        self.peak_rss = 0
        self.refused_requests = 0
        self.admitted_requests = 0
        self.forced_gcs = 0
        self.releases = 0
        self.soft_crossings = 0

    @classmethod
    def from_collector(cls, *, limit_mib: float | None = None,
                       spike_limit_mib: float | None = None,
                       limit_percentage: float | None = None,
                       spike_limit_percentage: float | None = None,
                       check_interval: float = 1.0,
                       total_bytes: int | None = None) -> MemoryLimiter:
        """A limiter from the OpenTelemetry Collector's ``memory_limiter`` settings.

        Parameters
        ----------
        limit_mib : float, optional
            The hard limit in MiB. Takes precedence over ``limit_percentage``.
        spike_limit_mib : float, optional
            The largest rise expected between two checks; the soft limit is
            ``limit_mib - spike_limit_mib``. Default: 20 % of ``limit_mib``.
            Must be below ``limit_mib``.
        limit_percentage : float, optional
            The hard limit as a percentage (0-100] of :func:`total_memory_bytes`.
        spike_limit_percentage : float, optional
            The spike as a percentage of the same total (default: 20 % of the limit).
        check_interval : float
            Seconds between two reads of resident memory; must be > 0.
        total_bytes : int, optional
            What percentages are of (default :func:`total_memory_bytes`).

        Returns
        -------
        MemoryLimiter

        Raises
        ------
        ValueError
            Naming the setting that is wrong.

        Examples
        --------
        >>> lim = MemoryLimiter.from_collector(limit_percentage=50, spike_limit_percentage=10,
        ...                                    total_bytes=4096 << 20)
        >>> lim.soft_limit >> 20, lim.hard_limit >> 20
        (1638, 2048)
        >>> MemoryLimiter.from_collector(limit_mib=100, spike_limit_mib=100)
        Traceback (most recent call last):
        ...
        ValueError: spike_limit_mib (100) must be below limit_mib (100): the soft limit is ...
        """
        def number(name: str, value: Any, upper: float | None = None) -> float | None:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
                bound = f" and at most {upper:g}" if upper is not None else ""
                raise ValueError(f"{name} must be a number >= 0{bound}, got {value!r}.")
            return float(value)

        limit = number("limit_mib", limit_mib)
        spike = number("spike_limit_mib", spike_limit_mib)
        pct = number("limit_percentage", limit_percentage, 100)
        spike_pct = number("spike_limit_percentage", spike_limit_percentage, 100)
        if isinstance(check_interval, bool) or not isinstance(check_interval, int | float) \
                or not check_interval > 0:
            raise ValueError(f"check_interval must be a duration > 0, got {check_interval!r}.")
        if limit:  # as in the Collector, a fixed limit wins over a percentage
            spike = spike or limit / 5
            if spike >= limit:
                raise ValueError(f"spike_limit_mib ({spike:g}) must be below limit_mib "
                                 f"({limit:g}): the soft limit is limit_mib - spike_limit_mib.")
            return cls(limit - spike, limit, check_interval=check_interval)
        if not pct:
            raise ValueError("set limit_mib or limit_percentage (a memory limit of 0 "
                             "limits nothing).")
        total = total_memory_bytes() if total_bytes is None else int(total_bytes)
        spike_pct = spike_pct or pct / 5
        if spike_pct >= pct:
            raise ValueError(f"spike_limit_percentage ({spike_pct:g}) must be below "
                             f"limit_percentage ({pct:g}).")
        hard = total * pct / 100 / (1 << 20)
        soft = total * (pct - spike_pct) / 100 / (1 << 20)
        return cls(soft, hard, check_interval=check_interval)

    def state(self) -> str:
        """``"ok"``, ``"soft"`` or ``"hard"``: where resident memory stands (re-read if due)."""
        now = time.monotonic()
        if now < self._next_check:
            return self._state
        with self._lock:
            if now < self._next_check:
                return self._state
            rss = self._rss()
            if rss > self.hard_limit and now >= self._next_gc:
                # at most once per MIN_GC_INTERVAL: with a short check_interval and memory
                # that cannot come down, a collection every check would eat the CPU
                self._next_gc = now + self.MIN_GC_INTERVAL
                self.forced_gcs += 1
                log = logger.warning if self._state != "hard" else logger.debug
                log("resident memory %.1f MiB is above the hard limit %.1f MiB: "
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
            # only now: a caller on the unlocked fast path must not take the old state
            # for the new one while this check is still reading memory
            self._next_check = now + self.check_interval
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
