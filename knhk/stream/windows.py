"""Window definitions of the stream processor: tumbling, sliding and session windows.

A :class:`WindowConfig` says how spans are cut into windows. Windows are
aligned to the Unix epoch (a 60 s window starts at a multiple of 60 s since
1970) and, by default, use event time (a span's ``start_time_ns``); a
watermark (the largest event time seen minus ``allowed_lateness``) closes
them. ``processing_time=True`` stamps each batch with the wall clock instead.

Example
-------
>>> from knhk.stream import WindowConfig
>>> w = WindowConfig.sliding(size=60, slide=15)
>>> w.size_ns, w.slide_ns, w.panes
(60000000000, 15000000000, 4)
>>> WindowConfig.tumbling(seconds=0)
Traceback (most recent call last):
...
ValueError: WindowConfig.tumbling: the window size must be positive, got 0 s
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np

__all__ = ["WindowConfig"]

_NS = 1_000_000_000


def _to_ns(value: float | timedelta | None, what: str, where: str, *,
           allow_zero: bool = False) -> int:
    if value is None:
        raise ValueError(f"{where}: {what} is required")
    if isinstance(value, timedelta):
        ns = value // timedelta(microseconds=1) * 1000
        shown = f"{value.total_seconds():g} s"
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if not np.isfinite(value):
            raise ValueError(f"{where}: {what} must be a finite number of seconds, got {value!r}")
        ns = round(float(value) * _NS) if isinstance(value, (float, np.floating)) \
            else int(value) * _NS
        shown = f"{value:g} s"
    else:
        raise ValueError(f"{where}: {what} must be seconds (a number) or a timedelta, "
                         f"got {type(value).__name__}")
    if ns < 0 or (ns == 0 and not allow_zero):
        raise ValueError(f"{where}: {what} must be positive, got {shown}")
    return int(ns)


@dataclass(frozen=True)
class WindowConfig:
    """How the stream processor cuts spans into windows.

    Build one with :meth:`tumbling`, :meth:`sliding` or :meth:`session`.

    Attributes
    ----------
    kind : {"tumbling", "sliding", "session"}
    size_ns : int
        Window length (for sessions: the gap).
    slide_ns : int
        Distance between window starts (``size_ns`` for tumbling windows).
    gap_ns : int
        Inactivity gap that ends a session (0 otherwise).
    allowed_lateness_ns : int
        How far behind the largest event time a span may arrive and still count.
    processing_time : bool
        Use the arrival wall clock instead of ``start_time_ns``.
    """

    kind: str
    size_ns: int
    slide_ns: int
    gap_ns: int = 0
    allowed_lateness_ns: int = 0
    processing_time: bool = False

    @classmethod
    def tumbling(cls, seconds: float | timedelta | None = None, *,
                 size: float | timedelta | None = None,
                 allowed_lateness: float | timedelta = 0,
                 processing_time: bool = False) -> WindowConfig:
        """Back-to-back windows of one length.

        Parameters
        ----------
        seconds, size : float or timedelta
            Window length (either spelling).
        allowed_lateness : float or timedelta
            Lateness tolerated before a window closes.
        processing_time : bool
            Window by arrival time instead of event time.

        Examples
        --------
        >>> WindowConfig.tumbling(seconds=60).size_ns
        60000000000
        """
        where = "WindowConfig.tumbling"
        size_ns = _to_ns(size if size is not None else seconds, "the window size", where)
        late = _to_ns(allowed_lateness, "allowed_lateness", where, allow_zero=True)
        return cls("tumbling", size_ns, size_ns, 0, late, bool(processing_time))

    @classmethod
    def sliding(cls, size: float | timedelta, slide: float | timedelta, *,
                allowed_lateness: float | timedelta = 0,
                processing_time: bool = False) -> WindowConfig:
        """Overlapping windows of length ``size`` starting every ``slide``.

        ``slide`` must not exceed ``size`` (a gap between windows would drop spans).

        Examples
        --------
        >>> WindowConfig.sliding(size=10, slide=20)
        Traceback (most recent call last):
        ...
        ValueError: WindowConfig.sliding: the slide (20 s) must not be larger than the size (10 s)
        """
        where = "WindowConfig.sliding"
        size_ns = _to_ns(size, "the window size", where)
        slide_ns = _to_ns(slide, "the slide", where)
        if slide_ns > size_ns:
            raise ValueError(f"{where}: the slide ({slide_ns / _NS:g} s) must not be larger "
                             f"than the size ({size_ns / _NS:g} s)")
        late = _to_ns(allowed_lateness, "allowed_lateness", where, allow_zero=True)
        return cls("sliding", size_ns, slide_ns, 0, late, bool(processing_time))

    @classmethod
    def session(cls, gap: float | timedelta, *, allowed_lateness: float | timedelta = 0,
                processing_time: bool = False) -> WindowConfig:
        """Per-key sessions: a session ends after ``gap`` without a span of its key.

        A session's ``window_end`` is its last span's start time plus ``gap``.

        Examples
        --------
        >>> WindowConfig.session(gap=30).gap_ns
        30000000000
        """
        where = "WindowConfig.session"
        gap_ns = _to_ns(gap, "the gap", where)
        late = _to_ns(allowed_lateness, "allowed_lateness", where, allow_zero=True)
        return cls("session", gap_ns, gap_ns, gap_ns, late, bool(processing_time))

    @property
    def panes(self) -> int:
        """How many windows one span falls into (1 for tumbling and session windows)."""
        if self.kind != "sliding":
            return 1
        return -(-self.size_ns // self.slide_ns)

    def assign(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window starts for event times ``t`` (tumbling and sliding windows).

        Returns ``(rows, starts)``: row ``rows[i]`` of ``t`` falls in the window
        starting at ``starts[i]``; a sliding window repeats each row once per
        window that holds it.

        Examples
        --------
        >>> import numpy as np
        >>> rows, starts = WindowConfig.sliding(20, 10).assign(np.array([25 * 10**9]))
        >>> rows.tolist(), (starts // 10**9).tolist()
        ([0, 0], [20, 10])
        """
        if self.kind == "session":
            raise ValueError("session windows are assigned per key, not by time alone")
        t = np.asarray(t, dtype=np.int64)
        first = t // self.slide_ns
        if self.kind == "tumbling":
            return np.arange(t.size), first * self.slide_ns
        k = self.panes
        rows = np.repeat(np.arange(t.size), k)
        starts = (np.repeat(first, k) - np.tile(np.arange(k), t.size)) * self.slide_ns
        keep = t[rows] < starts + self.size_ns
        return rows[keep], starts[keep]
