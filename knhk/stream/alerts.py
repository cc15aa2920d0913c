"""Alerts raised by CEP rules and anomaly detectors, and the sinks they go to.

An :class:`Alert` is a plain record. An :class:`AlertRouter` suppresses
duplicates (same rule and key within ``dedup_seconds``), counts what it
delivers by rule and severity (for the Prometheus exporter), and hands each
alert to its sinks: :class:`InMemoryAlertSink` (a list tests and users read
back), :class:`LoggingAlertSink` and :class:`CallbackAlertSink`.

Example
-------
>>> from knhk.stream.alerts import Alert, AlertRouter, InMemoryAlertSink
>>> sink = InMemoryAlertSink()
>>> router = AlertRouter([sink], dedup_seconds=60)
>>> a = Alert(rule="errors", severity="critical", message="boom", time_ns=0, key=("cart",))
>>> router.emit(a), router.emit(a)   # the second is within 60 s: suppressed
(True, False)
>>> len(sink.alerts), router.counters()["alerts_suppressed"]
(1, 1)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SEVERITIES",
    "Alert",
    "AlertRouter",
    "AlertSink",
    "CallbackAlertSink",
    "InMemoryAlertSink",
    "LoggingAlertSink",
]

logger = logging.getLogger(__name__)

#: Severities in increasing order, with the logging level each maps to.
SEVERITIES = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
              "critical": logging.CRITICAL}


def check_severity(severity: str) -> str:
    """``severity`` if it is one of :data:`SEVERITIES`, else ValueError."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    return severity


#: (rule, key) pairs remembered for deduplication before old ones are pruned
_MAX_DEDUP_KEYS = 100_000


@dataclass
class Alert:
    """One alert.

    Attributes
    ----------
    rule : str
        Name of the CEP rule or anomaly detector that raised it.
    severity : str
        One of :data:`SEVERITIES`.
    message : str
        The rendered message.
    time_ns : int
        Event time of the match (ns since the epoch).
    key : tuple
        The key it concerns (e.g. ``("checkout",)``); part of the dedup identity.
    details : dict
        What matched: counts, values, thresholds.
    """

    rule: str
    severity: str
    message: str
    time_ns: int
    key: tuple = ()
    details: dict[str, Any] = field(default_factory=dict)


class AlertSink:
    """Where alerts go; subclasses implement :meth:`send`."""

    def send(self, alert: Alert) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class InMemoryAlertSink(AlertSink):
    """Keeps the newest ``max_alerts`` alerts in ``alerts`` (a list), for tests and
    notebooks; older ones are forgotten (and counted in ``forgotten``), so a
    long-running pipeline does not grow without bound."""

    def __init__(self, max_alerts: int = 10_000) -> None:
        if max_alerts < 1:
            raise ValueError(f"max_alerts must be >= 1, got {max_alerts!r}")
        self.max_alerts = max_alerts
        self.alerts: list[Alert] = []
        self.forgotten = 0
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        with self._lock:
            self.alerts.append(alert)
            if len(self.alerts) > 2 * self.max_alerts:  # trim in amortized O(1)
                cut = len(self.alerts) - self.max_alerts
                del self.alerts[:cut]
                self.forgotten += cut

    def clear(self) -> list[Alert]:
        """Return the alerts held so far and forget them."""
        with self._lock:
            out, self.alerts = self.alerts, []
        return out


class LoggingAlertSink(AlertSink):
    """Logs each alert at the level of its severity."""

    def __init__(self, logger_: logging.Logger | None = None) -> None:
        self._logger = logger_ or logger

    def send(self, alert: Alert) -> None:
        self._logger.log(SEVERITIES[alert.severity], "[%s] %s: %s", alert.severity,
                         alert.rule, alert.message)


class CallbackAlertSink(AlertSink):
    """Calls ``callback(alert)``; an exception is logged, never propagated."""

    def __init__(self, callback: Callable[[Alert], Any]) -> None:
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        self._callback = callback

    def send(self, alert: Alert) -> None:
        try:
            self._callback(alert)
        except Exception:
            logger.exception("alert callback %r raised", self._callback)


class AlertRouter:
    """Deduplicates, counts and delivers alerts to sinks.

    Parameters
    ----------
    sinks : iterable of AlertSink
    dedup_seconds : float
        An alert with the same ``(rule, key)`` as one delivered less than this
        long before (in event time) is suppressed and counted.
    """

    def __init__(self, sinks: Iterable[AlertSink] = (), *, dedup_seconds: float = 0.0) -> None:
        if dedup_seconds < 0:
            raise ValueError(f"dedup_seconds must be >= 0, got {dedup_seconds!r}")
        self.sinks = list(sinks)
        self.dedup_ns = int(dedup_seconds * 1e9)
        self._last: dict[tuple, int] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(self, alert: Alert) -> bool:
        """Deliver ``alert`` unless it duplicates a recent one; True if delivered."""
        ident = (alert.rule, alert.key)
        with self._lock:
            last = self._last.get(ident)
            if last is not None and self.dedup_ns and 0 <= alert.time_ns - last < self.dedup_ns:
                self._counts["alerts_suppressed"] = self._counts.get("alerts_suppressed", 0) + 1
                return False
            if self.dedup_ns:
                self._last[ident] = alert.time_ns
                if len(self._last) > _MAX_DEDUP_KEYS:
                    # keys not seen within the dedup window cannot suppress anything
                    horizon = alert.time_ns - self.dedup_ns
                    self._last = {k: t for k, t in self._last.items() if t >= horizon}
            for name in ("alerts_total", f"alerts_{alert.severity}",
                         f"alerts_rule:{alert.rule}"):
                self._counts[name] = self._counts.get(name, 0) + 1
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception:
                logger.exception("alert sink %r raised", sink)
        return True

    def counters(self) -> dict[str, int]:
        """Alerts delivered (total, by severity, by rule) and suppressed so far."""
        with self._lock:
            return dict(self._counts)
