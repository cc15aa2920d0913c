"""Trace-aware load balancing: every span of a trace to the same one of N OTLP backends.

:class:`LoadBalancingExporter` is the OpenTelemetry Collector's
``loadbalancing`` exporter for knhk: it holds one
:class:`~knhk.exporters.otlp.OtlpExporter` per downstream endpoint (each
with its own sending queue and spec-correct retries, all built from one
protocol template) and splits each Arrow batch into one sub-batch per
endpoint by a consistent hash of the routing key — the trace id by default,
so tail sampling and trace assembly on the downstream instances see whole
traces. Metric points go by service (default) or by metric name.

The hash is rendezvous (highest-random-weight) hashing: a row goes to the
endpoint whose ``mix64(key ^ seed(endpoint))`` is largest. It is the exact
minimum of re-routing: when an endpoint leaves, only the keys it held move
(each to the runner-up); when an (N+1)-th joins, only the keys it now wins
move, about 1/(N+1) of them, all to it. ``key`` is a 64-bit digest of the
trace id (or of the service / metric name, through BLAKE2b), ``seed`` a
BLAKE2b digest of the endpoint string and ``mix64`` the SplitMix64
finalizer, all unsalted: two processes, and a process after a restart, route
the same key to the same endpoint as long as they name the endpoints with
the same strings. Routing a batch is one NumPy pass per endpoint over the
rows (no per-span Python).

The hashing lives in :mod:`knhk.exporters._lb_routing`, the resolvers in
:mod:`knhk.exporters._lb_resolvers` (both re-exported here). The set of
endpoints comes from a resolver — :class:`StaticResolver` (a
list), :class:`DnsResolver` (every A/AAAA address of a host name,
re-resolved every ``interval``) or :class:`FileResolver` (one endpoint per
line of a file, re-read when it changes) — or from
:meth:`LoadBalancingExporter.set_endpoints`. A change switches routing
atomically between two batches; an endpoint that left is drained (what is
queued for it is still sent, within ``drain_timeout``) and shut down in the
background. With no endpoint at all, batches are counted as failed with
reason ``no_endpoints``.

Example
-------
>>> from knhk import workload
>>> from knhk.exporters.loadbalancing import LoadBalancingExporter
>>> from knhk.exporters.memory import InMemoryExporter
>>> sinks = {"a:4317": InMemoryExporter(), "b:4317": InMemoryExporter()}
>>> lb = LoadBalancingExporter(["a:4317", "b:4317"], exporter_factory=sinks.get)
>>> batch = workload.generate(2000, workload.WorkloadConfig(seed=1))
>>> lb.export(batch)
<ExportResult.SUCCESS: 0>
>>> a, b = (set(s.spans().column("trace_id").to_pylist()) for s in sinks.values())
>>> sum(s.spans().num_rows for s in sinks.values()), len(a & b)   # traces stay whole
(2000, 0)
>>> lb.shutdown(1.0)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from knhk.batch import MetricBatch, SpanBatch
from knhk.exporters._lb_resolvers import (
    DnsResolver,
    FileResolver,
    ResolveError,
    StaticResolver,
    normalize_endpoint,
    unique_sorted,
)
from knhk.exporters._lb_routing import (
    METRIC_ROUTING_KEYS,
    SPAN_ROUTING_KEYS,
    endpoint_seeds,
    rendezvous_assign,
    routing_keys,
    string_keys,
    trace_id_keys,
)
from knhk.exporters.base import Exporter, ExportResult

logger = logging.getLogger(__name__)

__all__ = [
    "DnsResolver",
    "FileResolver",
    "LoadBalancingExporter",
    "ResolveError",
    "StaticResolver",
    "endpoint_seeds",
    "normalize_endpoint",
    "otlp_exporter_factory",
    "rendezvous_assign",
    "routing_keys",
    "string_keys",
    "trace_id_keys",
]


# -- the exporter ---------------------------------------------------------------------


_COUNTERS = ("batches_exported", "spans_exported", "spans_rejected", "spans_failed",
             "export_errors", "metric_points_exported", "metric_points_rejected",
             "metric_points_failed")


@dataclass(frozen=True)
class _Members:
    """One routing table; replaced whole, so a batch sees one table or the next."""

    endpoints: tuple[str, ...]
    seeds: np.ndarray
    exporters: tuple[Any, ...]


def _counts_of(exporter: Any) -> tuple[dict[str, int], Counter]:
    lock = getattr(exporter, "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        counts = {k: int(getattr(exporter, k, 0) or 0) for k in _COUNTERS}
        reasons = Counter(getattr(exporter, "errors_by_reason", None) or {})
    return counts, reasons


def otlp_exporter_factory(protocol: Any = None) -> Callable[[str], Exporter]:
    """A function ``endpoint -> OtlpExporter`` with ``protocol`` as the template.

    gRPC sends to the endpoint as it is; HTTP to ``<endpoint>/v1/traces`` and
    ``/v1/metrics``, over ``http://`` unless the template says
    ``insecure=False`` or names a ``certificate_file`` (then ``https://``),
    when the endpoint is not already a URL.

    Parameters
    ----------
    protocol : OtlpConfig, optional
        Every setting but the endpoints (which must be left unset).
    """
    from knhk.exporters.otlp import OtlpConfig, OtlpExporter

    template = protocol if protocol is not None else OtlpConfig(protocol="grpc")
    if not isinstance(template, OtlpConfig):
        raise TypeError(f"protocol must be an OtlpConfig, got {type(template).__name__}.")
    if template.endpoint is not None or template.metrics_endpoint is not None:
        raise ValueError("protocol: leave endpoint and metrics_endpoint unset; the "
                         "load balancer's resolver names the endpoints.")
    kind = template.protocol or "grpc"
    secure_http = template.insecure is False or template.certificate_file is not None

    def make(endpoint: str) -> Exporter:
        if kind == "grpc":
            return OtlpExporter(replace(template, protocol=kind, endpoint=endpoint))
        base = endpoint if "://" in endpoint else \
            f"{'https' if secure_http else 'http'}://{endpoint}"
        base = base.rstrip("/")
        if base.endswith("/v1/traces"):
            base = base[:-len("/v1/traces")]
        return OtlpExporter(replace(template, protocol=kind, endpoint=base + "/v1/traces",
                                    metrics_endpoint=base + "/v1/metrics"))

    return make


class LoadBalancingExporter(Exporter):
    """Route each span by a consistent hash of its trace id to one of N OTLP endpoints.

    Parameters
    ----------
    endpoints : list of str, optional
        A fixed set (``host:port``); or leave out and give ``resolver``, or
        neither and call :meth:`set_endpoints` later.
    resolver : StaticResolver, DnsResolver or FileResolver, optional
        Where the set comes from; one with an ``interval`` is re-resolved
        that often on a background thread.
    protocol : OtlpConfig, optional
        The template of every endpoint's :class:`~knhk.exporters.otlp.OtlpExporter`
        (protocol, timeout, TLS, headers, compression, retry, queue); its
        ``endpoint`` stays unset. Default: OTLP/gRPC with the
        ``OTEL_EXPORTER_OTLP_*`` environment for the rest.
    routing_key : {"traceID", "service"}
        What routes spans.
    metric_routing_key : {"service", "metric"}
        What routes metric points (service name or metric name).
    drain_timeout : float
        Seconds an endpoint that left gets to send what it has queued.
    exporter_factory : callable, optional
        ``endpoint -> Exporter``, instead of ``protocol`` (tests, other sinks).

    Notes
    -----
    ``spans_exported``, ``spans_failed``, ``spans_rejected``, ``export_errors``,
    ``errors_by_reason`` and the ``metric_points_*`` counters are those of
    :class:`~knhk.exporters.otlp.OtlpExporter`, summed over every endpoint
    past and present plus the load balancer's own failures
    (``no_endpoints``, ``shutdown``, ``unsupported_signal``); :meth:`stats`
    has them per endpoint, with spans routed, membership changes and
    resolution errors.
    """

    name = "loadbalancing"
    queue_size = 64

    def __init__(self, endpoints: Iterable[str] | None = None, *,
                 resolver: Any = None, protocol: Any = None,
                 routing_key: str = "traceID", metric_routing_key: str = "service",
                 drain_timeout: float = 10.0,
                 exporter_factory: Callable[[str], Exporter] | None = None) -> None:
        if endpoints is not None and resolver is not None:
            raise ValueError("LoadBalancingExporter takes endpoints or a resolver, not both.")
        if routing_key not in SPAN_ROUTING_KEYS:
            raise ValueError(f"routing_key must be one of {SPAN_ROUTING_KEYS} for spans, "
                             f"got {routing_key!r}.")
        if metric_routing_key not in METRIC_ROUTING_KEYS:
            raise ValueError(f"metric_routing_key must be one of {METRIC_ROUTING_KEYS}, "
                             f"got {metric_routing_key!r}.")
        if not isinstance(drain_timeout, int | float) or drain_timeout < 0:
            raise ValueError(f"drain_timeout must be seconds >= 0, got {drain_timeout!r}.")
        if exporter_factory is not None and protocol is not None:
            raise ValueError("give protocol or exporter_factory, not both.")
        if endpoints is not None:
            resolver = StaticResolver(endpoints)
        self.resolver = resolver
        self.routing_key = routing_key
        self.metric_routing_key = metric_routing_key
        self.drain_timeout = float(drain_timeout)
        self._factory = exporter_factory or otlp_exporter_factory(protocol)
        # _route_lock: held while a batch picks its table (counted in _inflight until
        # it has handed its parts over) and for the swap of the table; an endpoint that
        # leaves drains only once no batch still holds the old table, so it has every
        # batch it will ever get; the export itself runs unlocked, so a slow (e.g.
        # synchronous) endpoint never holds up membership changes or shutdown.
        # _change_lock serializes membership changes
        self._route_lock = threading.Lock()
        self._handed_over = threading.Condition(self._route_lock)
        self._inflight: Counter[int] = Counter()  # id(table) -> batches being handed over
        self._change_lock = threading.Lock()
        self._lock = threading.RLock()  # counters
        self._members = _Members((), np.zeros(0, dtype=np.uint64), ())
        self._closed = False
        self._stop = threading.Event()
        self._draining: dict[int, tuple[str, Any]] = {}
        self._drain_threads: list[threading.Thread] = []
        self._retired: dict[str, tuple[Counter, Counter]] = {}
        self._routed: Counter[str] = Counter()
        self._routed_points: Counter[str] = Counter()
        self._own: Counter[str] = Counter()
        self._own_reasons: Counter[str] = Counter()
        self.membership_changes = 0
        self.resolve_errors = 0
        self._last_resolve_error: str | None = None
        if isinstance(resolver, StaticResolver):
            self.set_endpoints(resolver.resolve())  # a bad static endpoint raises here
        elif resolver is not None:
            self.refresh()
        self._thread = None
        if resolver is not None and getattr(resolver, "interval", None):
            self._thread = threading.Thread(target=self._refresh_loop,
                                            name="knhk-lb-resolver", daemon=True)
            self._thread.start()

    # -- membership ----------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints routed to now, sorted."""
        return self._members.endpoints

    def set_endpoints(self, endpoints: Iterable[str]) -> bool:
        """Route to exactly ``endpoints`` from the next batch on.

        New endpoints get an exporter; those that left are drained and shut
        down in the background. Returns whether the set changed.

        Raises
        ------
        ValueError
            For an endpoint that is not ``host:port`` (nothing changes).
        """
        new = unique_sorted(endpoints, "endpoints")
        with self._change_lock:
            if self._closed:
                logger.debug("%s: shut down; endpoints %s ignored", self.name, list(new))
                return False
            cur = self._members
            if new == cur.endpoints:
                return False
            have = dict(zip(cur.endpoints, cur.exporters, strict=True))
            made: list[Any] = []
            try:
                for ep in new:
                    if ep not in have:
                        ex = self._factory(ep)
                        with contextlib.suppress(AttributeError):
                            ex.name = f"{self.name}/{ep}"
                        made.append(ex)
            except BaseException:
                for ex in made:
                    with contextlib.suppress(Exception):
                        ex.shutdown(0.5)
                raise
            fresh = iter(made)
            table = _Members(new, endpoint_seeds(new),
                             tuple(have[ep] if ep in have else next(fresh) for ep in new))
            added = [ep for ep in new if ep not in have]
            removed = [ep for ep in cur.endpoints if ep not in new]
            with self._lock:  # counted as draining from before the swap: no gap in stats
                for ep in removed:
                    self._draining[id(have[ep])] = (ep, have[ep])
            with self._route_lock:
                self._members = table
            with self._lock:
                self.membership_changes += 1
            logger.info("%s: routing to %d endpoint(s) %s (added %s, removed %s)", self.name,
                        len(new), list(new), added, removed,
                        extra={"knhk": {"exporter": self.name, "endpoints": list(new),
                                        "added": added, "removed": removed}})
            for ep in removed:
                self._retire(ep, have[ep], cur)
        return True

    def _retire(self, endpoint: str, exporter: Any, table: _Members) -> None:
        t = threading.Thread(target=self._drain, args=(endpoint, exporter, None, table),
                             name="knhk-lb-drain", daemon=True)
        self._drain_threads = [d for d in self._drain_threads if d.is_alive()] + [t]
        t.start()

    def _drain(self, endpoint: str, exporter: Any, timeout: float | None = None,
               table: _Members | None = None) -> None:
        timeout = self.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            if table is not None and not self._wait_handed_over(table, deadline):
                logger.warning("%s: a batch was still being handed to %s after %.1f s",
                               self.name, endpoint, timeout)
            if not exporter.force_flush(max(0.0, deadline - time.monotonic())):
                logger.warning("%s: endpoint %s did not drain within %.1f s; the rest is "
                               "counted as failed", self.name, endpoint, timeout)
            exporter.shutdown(max(0.05, deadline - time.monotonic()))
        except Exception:
            logger.exception("%s: endpoint %s raised while draining", self.name, endpoint)
        finally:
            self._fold(endpoint, exporter)

    def _fold(self, endpoint: str, exporter: Any) -> None:
        counts, reasons = _counts_of(exporter)
        with self._lock:
            if self._draining.pop(id(exporter), None) is None:
                return  # folded already
            acc, acc_reasons = self._retired.setdefault(endpoint, (Counter(), Counter()))
            acc.update(counts)
            acc_reasons.update(reasons)

    def refresh(self) -> bool:
        """Ask the resolver once and apply what it says; False on no change or an error."""
        if self.resolver is None:
            return False
        try:
            changed = self.set_endpoints(self.resolver.resolve())
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            with self._lock:
                self.resolve_errors += 1
                repeated = message == self._last_resolve_error
                self._last_resolve_error = message
            # a resolver failing every interval logs once, not every time
            logger.log(logging.DEBUG if repeated else logging.WARNING,
                       "%s: %s; keeping %d endpoint(s)", self.name, message,
                       len(self.endpoints))
            return False
        if self._last_resolve_error is not None:
            logger.info("%s: the resolver works again (%s)", self.name,
                        self.resolver.describe())
            self._last_resolve_error = None
        return changed

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.resolver.interval):
            self.refresh()

    # -- routing -------------------------------------------------------------------

    def _fail(self, reason: str, n: int, metrics: bool) -> ExportResult:
        with self._lock:
            self._own["export_errors"] += 1
            self._own["metric_points_failed" if metrics else "spans_failed"] += n
            self._own_reasons[reason] += 1
        logger.warning("%s: %d %s not exported: %s", self.name, n,
                       "metric points" if metrics else "spans", reason)
        return ExportResult.FAILURE

    def export(self, batch: Any) -> ExportResult:
        """Split ``batch`` by the routing key and hand each part to its endpoint.

        SUCCESS when every part was accepted (queued) by its endpoint's
        exporter; what each endpoint finally sends or gives up on is counted
        there (see :meth:`stats`).
        """
        metrics = isinstance(batch, MetricBatch)
        if not metrics and not isinstance(batch, SpanBatch):
            return self._fail("unsupported_signal", getattr(batch, "num_rows", 0) or 1, False)
        n = batch.num_rows
        if n == 0:
            return ExportResult.SUCCESS
        keys = routing_keys(batch, self.metric_routing_key if metrics else self.routing_key)
        with self._route_lock:
            if self._closed:
                return self._fail("shutdown", n, metrics)
            m = self._members
            if not m.endpoints:
                return self._fail("no_endpoints", n, metrics)
            self._inflight[id(m)] += 1
        try:
            ok, routed = self._hand_over(batch, keys, m, metrics)
        finally:
            with self._route_lock:
                self._inflight[id(m)] -= 1
                if not self._inflight[id(m)]:
                    del self._inflight[id(m)]
                    self._handed_over.notify_all()
        with self._lock:
            target = self._routed_points if metrics else self._routed
            for ep, count in routed:
                target[ep] += count
        return ExportResult.SUCCESS if ok else ExportResult.FAILURE

    def _hand_over(self, batch: Any, keys: np.ndarray, m: _Members, metrics: bool
                   ) -> tuple[bool, list[tuple[str, int]]]:
        """Split ``batch`` over table ``m`` and export each part; (all accepted, counts)."""
        n = batch.num_rows
        winner = rendezvous_assign(keys, m.seeds)
        counts = np.bincount(winner, minlength=len(m.endpoints))
        grouped = batch
        if np.count_nonzero(counts) > 1:
            # one gather into endpoint order (stable: rows keep their order within an
            # endpoint), then zero-copy slices: cheaper than one take per endpoint
            rows = pa.array(np.argsort(winner, kind="stable"))
            grouped = (MetricBatch(batch.record_batch.take(rows)) if metrics
                       else batch.take(rows))
        ok = True
        start = 0
        routed = []
        for j, count in enumerate(counts.tolist()):
            if not count:
                continue
            part = grouped if count == n else (
                MetricBatch(grouped.record_batch.slice(start, count)) if metrics
                else grouped.slice(start, count))
            start += count
            routed.append((m.endpoints[j], count))
            try:
                result = m.exporters[j].export(part)
            except Exception:
                logger.exception("%s: the exporter of %s raised", self.name,
                                 m.endpoints[j])
                self._fail("internal_error", count, metrics)
                result = ExportResult.FAILURE
            ok = ok and result is ExportResult.SUCCESS
        return ok, routed

    def _wait_handed_over(self, table: _Members, deadline: float) -> bool:
        """Wait until no batch is still handing parts to ``table``'s exporters."""
        with self._handed_over:
            return self._handed_over.wait_for(
                lambda: not self._inflight[id(table)],
                max(0.0, deadline - time.monotonic()))

    # -- counters ------------------------------------------------------------------

    def _all_counts(self) -> dict[str, tuple[Counter, Counter, bool]]:
        """Per endpoint: (counters, reasons, active), past exporters folded in."""
        live = self._members
        with self._lock:
            draining = list(self._draining.values())
            out = {ep: (Counter(c), Counter(r), False) for ep, (c, r) in self._retired.items()}
        seen: set[int] = set()
        for ep, ex, active in [*zip(live.endpoints, live.exporters, [True] * len(live.endpoints),
                                    strict=True),
                               *((ep, ex, False) for ep, ex in draining)]:
            if id(ex) in seen:
                continue  # leaving: in the table and draining for a moment
            seen.add(id(ex))
            counts, reasons = _counts_of(ex)
            c, r, was_active = out.get(ep, (Counter(), Counter(), False))
            c.update(counts)
            r.update(reasons)
            out[ep] = (c, r, was_active or active)
        return out

    def _total(self, key: str) -> int:
        with self._lock:
            own = self._own[key]
        return own + sum(c[key] for c, _, _ in self._all_counts().values())

    @property
    def spans_exported(self) -> int:
        return self._total("spans_exported")

    @property
    def spans_failed(self) -> int:
        return self._total("spans_failed")

    @property
    def spans_rejected(self) -> int:
        return self._total("spans_rejected")

    @property
    def batches_exported(self) -> int:
        return self._total("batches_exported")

    @property
    def export_errors(self) -> int:
        return self._total("export_errors")

    @property
    def metric_points_exported(self) -> int:
        return self._total("metric_points_exported")

    @property
    def metric_points_rejected(self) -> int:
        return self._total("metric_points_rejected")

    @property
    def metric_points_failed(self) -> int:
        return self._total("metric_points_failed")

    @property
    def errors_by_reason(self) -> Counter[str]:
        with self._lock:
            out = Counter(self._own_reasons)
        for _, r, _ in self._all_counts().values():
            out.update(r)
        return out

    @property
    def spans_routed(self) -> int:
        with self._lock:
            return sum(self._routed.values())

    def stats(self) -> dict[str, Any]:
        """Counters in total and per endpoint (past endpoints too, ``active`` False).

        Returns
        -------
        dict
            ``endpoints`` (endpoint -> ``active``, ``spans_routed``,
            ``metric_points_routed`` and the OTLP exporter's counters with
            ``errors_by_reason``), the totals, ``spans_routed``,
            ``membership_changes`` (the first set counts as one),
            ``resolve_errors`` and ``endpoints_active``.
        """
        per = self._all_counts()
        with self._lock:
            routed, points = Counter(self._routed), Counter(self._routed_points)
            own, own_reasons = Counter(self._own), Counter(self._own_reasons)
            changes, errors = self.membership_changes, self.resolve_errors
        endpoints = {}
        for ep in sorted(set(per) | set(routed) | set(points)):
            c, r, active = per.get(ep, (Counter(), Counter(), False))
            endpoints[ep] = {"active": active, "spans_routed": routed[ep],
                             "metric_points_routed": points[ep],
                             **{k: c[k] for k in _COUNTERS},
                             "errors_by_reason": dict(r)}
        reasons = Counter(own_reasons)
        for _, r, _ in per.values():
            reasons.update(r)
        totals = {k: own[k] + sum(c[k] for c, _, _ in per.values()) for k in _COUNTERS}
        return {**totals, "errors_by_reason": dict(reasons),
                "spans_routed": sum(routed.values()),
                "metric_points_routed": sum(points.values()),
                "membership_changes": changes, "resolve_errors": errors,
                "endpoints_active": len(self._members.endpoints), "endpoints": endpoints}

    # -- lifecycle -----------------------------------------------------------------

    def force_flush(self, timeout: float | None = None) -> bool:
        """Wait until every endpoint (and every one draining) has sent what it queued."""
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        with self._lock:
            draining = [ex for _, ex in self._draining.values()]
        ok = True
        for ex in (*self._members.exporters, *draining):
            ok = ex.force_flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def shutdown(self, timeout: float | None = None) -> None:
        """Flush and shut down every endpoint's exporter within ``timeout`` (default 10 s).

        Endpoints are shut down in parallel; what one could not send in time
        is counted as failed by it. Later batches fail with reason ``shutdown``.
        """
        timeout = 10.0 if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        self._stop.set()
        with self._change_lock, self._route_lock:
            if self._closed:
                return
            self._closed = True
            m = self._members
            self._members = _Members((), np.zeros(0, dtype=np.uint64), ())
        with self._lock:
            for ep, ex in zip(m.endpoints, m.exporters, strict=True):
                self._draining[id(ex)] = (ep, ex)
        threads = [threading.Thread(target=self._drain, args=(ep, ex, timeout, m),
                                    name="knhk-lb-shutdown", daemon=True)
                   for ep, ex in zip(m.endpoints, m.exporters, strict=True)]
        for t in threads:
            t.start()
        for t in (*threads, *self._drain_threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = len(self._draining)
        if left:
            logger.warning("%s: %d endpoint(s) still shutting down after %.1f s", self.name,
                           left, timeout)

    def __repr__(self) -> str:
        return (f"LoadBalancingExporter(routing_key={self.routing_key!r}, "
                f"endpoints={list(self.endpoints)})")
