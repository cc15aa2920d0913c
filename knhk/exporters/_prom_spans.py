"""Metrics derived from spans for the Prometheus exporter: RED metrics and a service graph.

:class:`SpanMetrics` counts every span by service, span name, kind and status
(``calls_total``) and buckets its duration (``duration_seconds``), as the
Collector's spanmetrics connector does (in the base unit, seconds, as Prometheus
asks and ``promtool check metrics`` checks, where the connector's default is
milliseconds). :class:`ServiceGraph` pairs each span
with its parent, also across batches, and counts the calls between services
(``traces_service_graph_request_total``, ``..._failed_total``, the server-side
latency histogram ``..._request_server_seconds``), as the servicegraph
connector names them; its edges are those of
:func:`knhk.tracing.service_call_graph` (the parent's service calls the
child's; a call failed when either span is an error).

Pairing across batches: children usually end, and so arrive, before their
parent. A child whose parent is neither in its own batch nor among the recent
spans waits in a bounded store (``ttl`` seconds, ``max_items`` children);
every batch's spans are kept, as sorted 64-bit keys, for ``ttl`` seconds (at
most ``max_items`` spans) so that a late child finds its parent. A waiting
child that expires is counted as unpaired, one pushed out of a full store as
dropped. Keys are a 64-bit hash of (trace id, span id): a false match needs a
collision among the spans held at once, about ``n**2 / 2**65``.

Example
-------
>>> import knhk
>>> from knhk.exporters._prom_spans import ServiceGraph, SpanMetrics
>>> from knhk.exporters._prom_families import Family
>>> spans = knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=1, service="front", start_time_ns=0,
...               duration_ns=9_000_000),
...     knhk.Span("query", trace_id=1, span_id=2, parent_span_id=1, service="db",
...               start_time_ns=1, duration_ns=3_000_000)])
>>> red = SpanMetrics((5.0, 10.0), limit=100)
>>> red.update(spans)
>>> sorted(red.calls.values)
[1, 1]
>>> graph = ServiceGraph((0.005,), limit=100)
>>> graph.update(spans)
>>> graph.requests.pairs, graph.requests.values
([(('client', 'front'), ('server', 'db'))], [1])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from knhk.exporters._prom_families import Family

__all__ = ["KIND_NAMES", "STATUS_NAMES", "ServiceGraph", "SpanMetrics"]

KIND_NAMES = ("SPAN_KIND_UNSPECIFIED", "SPAN_KIND_INTERNAL", "SPAN_KIND_SERVER",
              "SPAN_KIND_CLIENT", "SPAN_KIND_PRODUCER", "SPAN_KIND_CONSUMER")
STATUS_NAMES = ("STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR")

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


class _Strings:
    """Dictionary-encoded string columns -> stable small ints (and back)."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.names: list[str] = []

    def codes(self, col: pa.Array) -> np.ndarray:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if not pa.types.is_dictionary(col.type):
            col = col.dictionary_encode()
        table = np.empty(len(col.dictionary), dtype=np.int64)
        for j, s in enumerate(col.dictionary.to_pylist()):
            c = self.code.get(s)
            if c is None:
                c = self.code[s] = len(self.names)
                self.names.append(s)
            table[j] = c
        idx = col.indices.fill_null(0).to_numpy(zero_copy_only=False)
        return table[idx] if len(table) else np.zeros(len(col), np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: array arithmetic wraps modulo 2**64
    x = (x ^ (x >> np.uint64(30))) * _M2
    x = (x ^ (x >> np.uint64(27))) * _M3
    return x ^ (x >> np.uint64(31))


def _words(col: pa.Array, width: int) -> np.ndarray:
    """A fixed_size_binary column as (n, width // 8) uint64 words (nulls as zeros)."""
    n = len(col)
    per = width // 8
    buf = col.buffers()[1]
    raw = np.frombuffer(buf, dtype=np.uint64, count=(col.offset + n) * per)
    return raw[col.offset * per:].reshape(n, per)


def span_keys(trace_id: pa.Array, span_id: pa.Array) -> np.ndarray:
    """A 64-bit hash of (trace id, span id) per row."""
    t = _words(trace_id, 16)
    s = _words(span_id, 8)[:, 0]
    return _mix(_mix(t[:, 0] * _M1 + t[:, 1]) ^ (s * _M1))


class SpanMetrics:
    """``calls_total`` and ``duration_seconds`` by service, span name, kind, status.

    ``bounds_ms`` are the histogram's bounds in milliseconds (as configured);
    they are exposed in seconds.
    """

    LABELS = ("service", "span_kind", "span_name", "status_code")

    def __init__(self, bounds_ms: Sequence[float], *, limit: int,
                 services: _Strings | None = None) -> None:
        self.calls = Family("calls_total", "counter",
                            "Spans counted by service, span name, kind and status, before "
                            "sampling.", limit=limit)
        self.duration = Family("duration_seconds", "histogram",
                               "Span durations in seconds, before sampling.",
                               limit=limit, bounds=[b / 1000.0 for b in bounds_ms])
        self.bounds = np.asarray(self.duration.bounds, dtype=np.float64)
        self.services = services or _Strings()
        self.names = _Strings()

    def update(self, batch) -> None:
        n = batch.num_rows
        if n == 0:
            return
        svc = self.services.codes(batch.column("service"))
        name = self.names.codes(batch.column("name"))
        kind = batch.column("kind").to_numpy(zero_copy_only=False).astype(np.int64)
        kind = np.where((kind >= 0) & (kind < len(KIND_NAMES)), kind, 0)
        status = batch.column("status_code").to_numpy(zero_copy_only=False).astype(np.int64)
        status = np.where((status >= 0) & (status < len(STATUS_NAMES)), status, 0)
        key = (svc << 36) | (name << 5) | (kind << 2) | status
        uniq, inv = np.unique(key, return_inverse=True)
        inv = inv.reshape(-1)
        sidx = np.empty(len(uniq), dtype=np.int64)
        names_s, names_n = self.services.names, self.names.names
        for j, k in enumerate(uniq.tolist()):
            pairs = (("service", names_s[k >> 36]), ("span_kind", KIND_NAMES[(k >> 2) & 7]),
                     ("span_name", names_n[(k >> 5) & 0x7FFFFFFF]),
                     ("status_code", STATUS_NAMES[k & 3]))
            sidx[j] = self.calls.series(pairs)
            self.duration.series(pairs)  # the same decisions: same keys, same order
        counts = np.bincount(inv, minlength=len(uniq))
        values = self.calls.values
        for i, c in zip(sidx.tolist(), counts.tolist(), strict=True):
            values[i] += c
        start = batch.column("start_time_ns").to_numpy(zero_copy_only=False)
        end = batch.column("end_time_ns").to_numpy(zero_copy_only=False)
        dur_s = (end - start) / 1e9
        nb = len(self.bounds) + 1
        bucket = np.searchsorted(self.bounds, dur_s, side="left")
        local = np.bincount(inv * nb + bucket, minlength=len(uniq) * nb).reshape(len(uniq), nb)
        sums = np.bincount(inv, weights=dur_s, minlength=len(uniq))
        self.duration.observe_many(sidx, local, sums)


class ServiceGraph:
    """Calls between services from parent/child span pairs, across batches.

    Parameters
    ----------
    bounds_s : sequence of float
        Latency histogram bounds in seconds.
    limit : int
        Cardinality limit of each family.
    ttl : float
        Seconds a span (as a possible parent) or a waiting child is kept.
    max_items : int
        Most spans kept as possible parents, and most waiting children.
    clock : callable
        Monotonic seconds (``time.monotonic``); tests pass their own.
    """

    def __init__(self, bounds_s: Sequence[float], *, limit: int, ttl: float = 10.0,
                 max_items: int = 100_000, services: _Strings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = Family("traces_service_graph_request_total", "counter",
                               "Requests between two services (parent span's service calls "
                               "the child span's).", limit=limit)
        self.failed = Family("traces_service_graph_request_failed_total", "counter",
                             "Requests between two services where either span is an error.",
                             limit=limit)
        self.latency = Family("traces_service_graph_request_server_seconds", "histogram",
                              "Duration of the server (child) span of a request, seconds.",
                              limit=limit, bounds=bounds_s)
        self.unpaired = Family("traces_service_graph_unpaired_spans_total", "counter",
                               "Child spans whose parent did not arrive within the TTL.",
                               limit=limit)
        self.dropped = Family("traces_service_graph_dropped_spans_total", "counter",
                              "Child spans pushed out of the full store of waiting spans.",
                              limit=limit)
        self.bounds = np.asarray(self.latency.bounds, dtype=np.float64)
        self.services = services or _Strings()
        self.ttl = float(ttl)
        self.max_items = int(max_items)
        self.clock = clock
        # recent spans as possible parents: (deadline, sorted keys, services, errors)
        self._spans: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []
        self._held = 0
        # children waiting for their parent
        self._w_key = np.zeros(0, np.uint64)
        self._w_svc = np.zeros(0, np.int64)
        self._w_err = np.zeros(0, bool)
        self._w_dur = np.zeros(0, np.float64)
        self._w_deadline = np.zeros(0, np.float64)

    @property
    def waiting(self) -> int:
        """Children waiting for their parent."""
        return len(self._w_key)

    @property
    def held(self) -> int:
        """Spans held as possible parents."""
        return self._held

    def update(self, batch) -> None:
        n = batch.num_rows
        now = self.clock()
        self.expire(now)
        if n == 0:
            return
        svc = self.services.codes(batch.column("service"))
        err = batch.column("status_code").to_numpy(zero_copy_only=False) == 2
        start = batch.column("start_time_ns").to_numpy(zero_copy_only=False)
        end = batch.column("end_time_ns").to_numpy(zero_copy_only=False)
        dur = (end - start) / 1e9
        keys = span_keys(batch.column("trace_id"), batch.column("span_id"))
        pcol = batch.column("parent_span_id")
        has_parent = np.asarray(pcol.is_valid(), dtype=bool)
        pkeys = (span_keys(batch.column("trace_id"), pcol) if has_parent.any()
                 else np.zeros(n, np.uint64))
        order = np.argsort(keys, kind="stable")
        skeys, ssvc, serr = keys[order], svc[order], err[order]

        # children of this batch: parent in the batch, else among recent spans, else wait
        child = np.flatnonzero(has_parent)
        found, psvc, perr = self._lookup(skeys, ssvc, serr, pkeys[child])
        for _, k, s, e in reversed(self._spans):
            if found.all():
                break
            miss = np.flatnonzero(~found)
            f2, s2, e2 = self._lookup(k, s, e, pkeys[child[miss]])
            hit = miss[f2]
            found[hit], psvc[hit], perr[hit] = True, s2[f2], e2[f2]
        c = child[found]
        self._edges(psvc[found], svc[c], perr[found] | err[c], dur[c])
        wait = child[~found]

        # children that waited: their parent may be in this batch
        if len(self._w_key):
            f, ps, pe = self._lookup(skeys, ssvc, serr, self._w_key)
            if f.any():
                self._edges(ps[f], self._w_svc[f], pe[f] | self._w_err[f], self._w_dur[f])
                keep = ~f
                self._w_key, self._w_svc = self._w_key[keep], self._w_svc[keep]
                self._w_err, self._w_dur = self._w_err[keep], self._w_dur[keep]
                self._w_deadline = self._w_deadline[keep]
        if len(wait):
            self._w_key = np.concatenate([self._w_key, pkeys[wait]])
            self._w_svc = np.concatenate([self._w_svc, svc[wait]])
            self._w_err = np.concatenate([self._w_err, err[wait]])
            self._w_dur = np.concatenate([self._w_dur, dur[wait]])
            self._w_deadline = np.concatenate([self._w_deadline,
                                               np.full(len(wait), now + self.ttl)])
            over = len(self._w_key) - self.max_items
            if over > 0:  # the oldest children go first
                self._count(self.dropped, self._w_svc[:over])
                self._trim_waiting(np.arange(over, len(self._w_key)))

        self._spans.append((now + self.ttl, skeys, ssvc, serr))
        self._held += n
        while self._held > self.max_items and len(self._spans) > 1:
            self._held -= len(self._spans.pop(0)[1])

    def expire(self, now: float | None = None) -> None:
        """Forget spans past their TTL; waiting children past it count as unpaired."""
        if now is None:
            now = self.clock()
        while self._spans and self._spans[0][0] <= now:
            self._held -= len(self._spans.pop(0)[1])
        if len(self._w_key):
            gone = self._w_deadline <= now
            if gone.any():
                self._count(self.unpaired, self._w_svc[gone])
                self._trim_waiting(np.flatnonzero(~gone))

    def flush(self) -> None:
        """At shutdown: every waiting child is unpaired."""
        if len(self._w_key):
            self._count(self.unpaired, self._w_svc)
            self._trim_waiting(np.zeros(0, np.int64))
        self._spans.clear()
        self._held = 0

    def _trim_waiting(self, keep: np.ndarray) -> None:
        self._w_key, self._w_svc = self._w_key[keep], self._w_svc[keep]
        self._w_err, self._w_dur = self._w_err[keep], self._w_dur[keep]
        self._w_deadline = self._w_deadline[keep]

    @staticmethod
    def _lookup(skeys: np.ndarray, ssvc: np.ndarray, serr: np.ndarray, want: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not len(skeys) or not len(want):
            z = np.zeros(len(want), np.int64)
            return np.zeros(len(want), bool), z, np.zeros(len(want), bool)
        pos = np.searchsorted(skeys, want)
        pos = np.minimum(pos, len(skeys) - 1)
        found = skeys[pos] == want
        return found, ssvc[pos].copy(), serr[pos].copy()

    def _count(self, family: Family, svc: np.ndarray) -> None:
        codes, counts = np.unique(svc, return_counts=True)
        for c, k in zip(codes.tolist(), counts.tolist(), strict=True):
            family.add((("server", self.services.names[c]),), k)

    def _edges(self, client: np.ndarray, server: np.ndarray, failed: np.ndarray,
               dur_s: np.ndarray) -> None:
        edge = client != server
        if not edge.any():
            return
        client, server, failed, dur_s = client[edge], server[edge], failed[edge], dur_s[edge]
        key = (client << 32) | server
        uniq, inv = np.unique(key, return_inverse=True)
        inv = inv.reshape(-1)
        names = self.services.names
        sidx = np.empty(len(uniq), np.int64)
        fidx = np.empty(len(uniq), np.int64)
        for j, k in enumerate(uniq.tolist()):
            pairs = (("client", names[k >> 32]), ("server", names[k & 0xFFFFFFFF]))
            sidx[j] = self.requests.series(pairs)
            fidx[j] = self.failed.series(pairs)
            self.latency.series(pairs)
        calls = np.bincount(inv, minlength=len(uniq)).tolist()
        fails = np.bincount(inv, weights=failed, minlength=len(uniq)).astype(np.int64).tolist()
        for i, f, c, e in zip(sidx.tolist(), fidx.tolist(), calls, fails, strict=True):
            self.requests.values[i] += c
            self.failed.values[f] += e
        nb = len(self.bounds) + 1
        bucket = np.searchsorted(self.bounds, dur_s, side="left")
        local = np.bincount(inv * nb + bucket, minlength=len(uniq) * nb).reshape(len(uniq), nb)
        sums = np.bincount(inv, weights=dur_s, minlength=len(uniq))
        self.latency.observe_many(sidx, local, sums)
