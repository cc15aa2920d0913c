"""The ``knhk serve`` run loop: start, health endpoint, structured logs, graceful shutdown.

:class:`Server` builds a configuration (:mod:`knhk.serve.components`),
starts its receivers and the ``health_check`` extension, and on
:meth:`Server.shutdown` marks itself unhealthy (503), stops the receivers so
nothing new is accepted, then flushes every pipeline — open batches, stage
state, exporter queues — within ``service.shutdown_timeout``.

:func:`configure_logging` sets up ``service.telemetry.logs``: ``encoding:
json`` writes one JSON object per line on stderr (``ts``, ``level``,
``logger``, ``msg`` and any structured fields a record carries under
``extra={"knhk": {...}}``).

Example
-------
>>> import json, urllib.request
>>> from knhk.serve.server import Server
>>> server = Server({
...     "receivers": {"otlp": {"protocols": {"http": {"endpoint": "localhost:0"}}}},
...     "exporters": {"debug": {}},
...     "extensions": {"health_check": {"endpoint": "localhost:0"}},
...     "service": {"extensions": ["health_check"], "pipelines": {"traces": {
...         "receivers": ["otlp"], "exporters": ["debug"]}}}}).start()
>>> json.load(urllib.request.urlopen(server.health.url))["status"]
'Server available'
>>> server.shutdown()
True
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from knhk.serve.components import Built, build, check_port_free
from knhk.serve.config import ConfigError, parse_duration

logger = logging.getLogger(__name__)

__all__ = ["HealthServer", "JsonFormatter", "Server", "configure_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg`` and extra fields.

    Fields passed as ``extra={"knhk": {...}}`` are merged in; an exception
    becomes ``exc``.

    Examples
    --------
    >>> rec = logging.LogRecord("knhk.x", logging.INFO, __file__, 1, "got %d", (3,), None)
    >>> rec.knhk = {"spans": 3}
    >>> out = json.loads(JsonFormatter().format(rec))
    >>> out["level"], out["msg"], out["spans"]
    ('info', 'got 3', 3)
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "knhk", None)
        if isinstance(fields, Mapping):
            for k, v in fields.items():
                out.setdefault(str(k), v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_installed: logging.Handler | None = None


def configure_logging(level: str = "info", encoding: str = "console",
                      stream: Any = None) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr).

    Parameters
    ----------
    level : {"debug", "info", "warn", "warning", "error"}
    encoding : {"json", "console"}
        JSON lines, or ``time level logger: message`` text.
    stream : file, optional
        Default ``sys.stderr``.

    Returns
    -------
    logging.Handler
        The handler installed (it replaces one an earlier call installed).
    """
    global _installed
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR}
    if level not in levels:
        raise ValueError(f"log level must be one of {', '.join(levels)}, got {level!r}.")
    if encoding not in ("json", "console"):
        raise ValueError(f"log encoding must be json or console, got {encoding!r}.")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if encoding == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(levels[level])
    _installed = handler
    return handler


class HealthServer:
    """The Collector's ``health_check`` extension: JSON status over HTTP.

    ``GET <path>`` answers 200 with ``{"status": "Server available", ...}``
    while ``status()`` says serving, 503 otherwise.

    Parameters
    ----------
    endpoint : str
        ``host:port`` (port 0 picks a free one).
    path : str
        The path answered (``/`` as in the Collector).
    status : callable
        Returns ``(healthy: bool, body: dict)``.
    """

    def __init__(self, endpoint: str, path: str, status: Any) -> None:
        host, _, port = endpoint.rpartition(":")
        self._addr = (host.strip("[]") or "localhost", int(port))
        self.path = path if path.startswith("/") else "/" + path
        self._status = status
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._addr[0]}:{self.port}{self.path}"

    def start(self) -> HealthServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != health.path:
                    code, body = 404, {"status": "not found"}
                else:
                    ok, body = health._status()
                    code = 200 if ok else 503
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("health check: " + format, *args)

        server = ThreadingHTTPServer(self._addr, Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="knhk-health", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Server:
    """One ``knhk serve`` process's worth of pipelines, receivers and extensions.

    Parameters
    ----------
    config : mapping
        A checked configuration (:func:`knhk.serve.config.load_config`).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        service = config.get("service") or {}
        self.shutdown_timeout = parse_duration(service.get("shutdown_timeout", 30.0))
        self.built: Built | None = None
        self.health: HealthServer | None = None
        self.state = "starting"
        self.started_at = time.time()
        self._lock = threading.Lock()
        logs = (service.get("telemetry") or {}).get("logs") or {}
        self.stats_interval = parse_duration(logs.get("stats_interval", 60.0))
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._last_stats: dict[str, tuple[float, dict[str, Any]]] = {}

    def status(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)`` for the health endpoint."""
        up = _dt.datetime.fromtimestamp(self.started_at, _dt.UTC)
        body: dict[str, Any] = {
            "status": {"serving": "Server available",
                       "shutting down": "Server shutting down"}.get(self.state,
                                                                   "Server not available"),
            "upSince": up.isoformat().replace("+00:00", "Z"),
            "uptime": f"{time.time() - self.started_at:.3f}s",
        }
        if self.built is not None:
            body["pipelines"] = {}
            for pid, p in self.built.pipelines.items():
                s = p.stats()
                body["pipelines"][pid] = {
                    "events_received": s.events_received, "events_processed": s.events_processed,
                    "events_dropped": s.events_dropped, "export_errors": s.export_errors}
        return self.state == "serving", body

    def start(self) -> Server:
        """Build everything and start listening; raises ConfigError for a user mistake."""
        extensions = self.config.get("extensions") or {}
        service = self.config.get("service") or {}
        health_cfg = None
        for ext in service.get("extensions") or []:
            if ext.split("/", 1)[0] == "health_check":
                health_cfg = (ext, extensions.get(ext) or {})
        if health_cfg is not None:
            endpoint = health_cfg[1].get("endpoint", "localhost:13133")
            check_port_free(endpoint, f"extensions.{health_cfg[0]}.endpoint")
        self.built = build(self.config)
        try:
            self.built.start()
            if health_cfg is not None:
                self.health = HealthServer(endpoint, health_cfg[1].get("path", "/"),
                                           self.status)
                try:
                    self.health.start()
                except OSError as exc:
                    self.health = None
                    raise ConfigError(f"extensions.{health_cfg[0]}.endpoint: cannot listen on "
                                      f"{endpoint}: {exc.strerror or exc}") from None
        except BaseException:
            self.built.shutdown(1.0)
            raise
        self.state = "serving"
        for rid, protocol, address in self.built.listening:
            logger.info("%s listening on %s", protocol, address,
                        extra={"knhk": {"component": rid, "protocol": protocol,
                                        "address": address}})
        if self.stats_interval > 0:
            self.log_stats()  # the baseline the first periodic line counts from
            self._stats_thread = threading.Thread(target=self._stats_loop,
                                                  name="knhk-serve-stats", daemon=True)
            self._stats_thread.start()
        return self

    def _stats_loop(self) -> None:
        while not self._stats_stop.wait(self.stats_interval):
            try:
                self.log_stats()
            except Exception:  # a stats line never takes the server down
                logger.exception("periodic stats failed")

    def log_stats(self) -> dict[str, dict[str, Any]]:
        """Log one line per pipeline that saw anything since the last call; return them.

        Each line has what an operator watches: spans received and their rate
        since the last line, processed, sampled out, dropped by reason,
        exported and failed per exporter, and the ring buffer's occupancy.
        Quiet pipelines are not logged (``service.telemetry.logs.stats_interval``
        sets the period; 0 turns the lines off).
        """
        lines: dict[str, dict[str, Any]] = {}
        if self.built is None:
            return lines
        now = time.monotonic()
        for pid, p in self.built.pipelines.items():
            s = p.stats()
            exported, failed = _exported(p, s)
            fields: dict[str, Any] = {
                "pipeline": pid, "received": s.events_received,
                "processed": s.events_processed, "sampled_out": s.events_sampled_out,
                "dropped": sum(s.dropped_by_reason.values()),
                "dropped_by_reason": dict(s.dropped_by_reason),
                "refused": s.events_refused, "metric_points": s.metrics_received,
                "exported": exported, "export_failed": {k: v for k, v in failed.items() if v},
                "queue_occupancy": round(s.queue_occupancy, 4)}
            last = self._last_stats.get(pid)
            self._last_stats[pid] = (now, fields)
            if last is None:
                continue
            t0, before = last
            moved = {k for k in ("received", "processed", "dropped", "refused",
                                 "metric_points") if fields[k] != before[k]}
            if not moved and fields["exported"] == before["exported"] and \
                    fields["export_failed"] == before["export_failed"]:
                continue
            rate = (fields["received"] - before["received"]) / max(now - t0, 1e-9)
            fields["received_per_s"] = round(rate, 1)
            lines[pid] = fields
            dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(
                fields["dropped_by_reason"].items())) or "none"
            exported = ", ".join(f"{k} {v:,}" for k, v in fields["exported"].items())
            logger.info("%s: %s spans received (%s/s), %s processed, %s sampled out, "
                        "dropped: %s; exported: %s%s", pid, f"{fields['received']:,}",
                        f"{rate:,.0f}", f"{fields['processed']:,}",
                        f"{fields['sampled_out']:,}", dropped, exported or "none",
                        "; export failed: " + ", ".join(
                            f"{k} {v:,}" for k, v in fields["export_failed"].items())
                        if fields["export_failed"] else "",
                        extra={"knhk": fields})
        return lines

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, flush and export everything, within ``timeout`` seconds.

        Returns True when every pipeline processed and exported all it took.
        """
        with self._lock:
            if self.state in ("shutting down", "stopped"):
                return True
            self.state = "shutting down"
        timeout = self.shutdown_timeout if timeout is None else timeout
        self._stats_stop.set()
        started = time.monotonic()
        logger.info("shutting down (timeout %.1f s)", timeout)
        ok = True
        if self.built is not None:
            ok = self.built.shutdown(timeout)
        if self.health is not None:
            self.health.stop()
        self.state = "stopped"
        summary = self.summary()
        logger.info("shutdown %s in %.2f s", "complete" if ok else "timed out",
                    time.monotonic() - started, extra={"knhk": summary})
        return ok

    def summary(self) -> dict[str, Any]:
        """Per pipeline: spans received, processed, dropped, exported per exporter."""
        out: dict[str, Any] = {}
        if self.built is None:
            return out
        for pid, p in self.built.pipelines.items():
            s = p.stats()
            out[pid] = {"events_received": s.events_received,
                        "events_processed": s.events_processed,
                        "events_dropped": s.events_dropped,
                        "events_sampled_out": s.events_sampled_out,
                        "validation_errors": s.validation_errors,
                        "export_errors": s.export_errors,
                        "exported": _exported(p, s)[0]}
        return out


def _exported(pipeline: Any, stats: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Per exporter: events exported and failed. An exporter that queues (OTLP, the load
    balancer) has only handed a batch over when the pipeline counts it exported: its own
    counters say what was sent and what was given up on."""
    exported = {k: v["events_exported"] for k, v in stats.exporters.items()}
    failed = {k: v["events_failed"] for k, v in stats.exporters.items()}
    for name, ex in zip(stats.exporters, getattr(pipeline, "exporters", ()), strict=False):
        if hasattr(ex, "spans_exported") and hasattr(ex, "spans_failed"):
            exported[name], failed[name] = int(ex.spans_exported), int(ex.spans_failed)
    return exported, failed
