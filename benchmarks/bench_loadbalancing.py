"""Load balancing: knhk's vectorized trace-id router beside the per-span Python a user
would otherwise write, and spans/s through LoadBalancingExporter to real receivers.

Run with ``python benchmarks/run.py loadbalancing`` (figures go to RESULTS.md).

Batches are 8192 spans of the synthetic workload (``knhk.workload``).

- Route: the winning endpoint of every span of a batch (routing keys from the
  trace_id column, rendezvous over 4 endpoints) — ``trace_id_keys`` +
  ``rendezvous_assign`` beside the same rendezvous hash computed span by span
  in plain Python (``int.from_bytes`` halves, SplitMix64 finalizer, BLAKE2b
  endpoint seeds precomputed).
- Route and split: the whole of ``LoadBalancingExporter.export`` into 4
  in-memory sinks (keys, assignment, one ``take`` per endpoint) beside a
  per-span loop that hashes each trace id with ``hashlib.blake2b`` modulo N,
  groups row indices in Python lists and takes one sub-batch per endpoint.
- Re-routing: the fraction of 100,000 traces whose endpoint changes when a 3rd
  endpoint joins 2 — rendezvous beside hash-modulo-N (lower is better; the
  minimum possible is 1/3).
- End to end: spans/s from ``LoadBalancingExporter`` (OTLP/gRPC, 2 endpoints)
  into two in-process ``OtlpGrpcReceiver`` pipelines on loopback, until both
  have every span; beside one ``OtlpExporter`` to one receiver (no balancing).
  Sender, receivers and their pipelines share the machine's 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate, timer

import knhk
from knhk.exporters._retry import RetryConfig
from knhk.exporters.base import Exporter, ExportResult
from knhk.exporters.loadbalancing import (
    LoadBalancingExporter,
    endpoint_seeds,
    rendezvous_assign,
    trace_id_keys,
)
from knhk.exporters.memory import InMemoryExporter
from knhk.exporters.otlp import OtlpConfig, OtlpExporter
from knhk.receivers import OtlpGrpcReceiver
from knhk.workload import WorkloadConfig, generate

BATCH = 8192
ENDPOINTS = [f"knhk-{i}.tail.svc:4317" for i in range(4)]
M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def python_route(trace_ids: list[bytes], seeds: list[int]) -> list[int]:
    """The same rendezvous hash, span by span."""
    out = []
    for t in trace_ids:
        key = _mix(int.from_bytes(t[:8], "big") ^ _mix(int.from_bytes(t[8:], "big")))
        best, winner = -1, 0
        for j, s in enumerate(seeds):
            score = _mix(key ^ s)
            if score > best:
                best, winner = score, j
        out.append(winner)
    return out


def python_split(rb: pa.RecordBatch, n: int) -> list[pa.RecordBatch]:
    """hashlib per span, modulo N; row indices grouped in lists; one take per endpoint."""
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, t in enumerate(rb.column("trace_id").to_pylist()):
        groups[int.from_bytes(hashlib.blake2b(t, digest_size=8).digest(), "big") % n].append(i)
    return [rb.take(pa.array(g, pa.int64())) for g in groups if g]


def _batches(n_batches: int) -> list[knhk.SpanBatch]:
    batch = generate(BATCH * n_batches, WorkloadConfig(seed=17))
    return [batch.slice(i * BATCH, BATCH) for i in range(n_batches)]


def _timed(fn, items) -> tuple[int, float]:
    elapsed = timer()
    n = 0
    for item in items:
        fn(item)
        n += BATCH
    return n, elapsed()


class _Count(Exporter):
    name = "count"

    def __init__(self) -> None:
        self.rows = 0
        self._lock = threading.Lock()

    def export(self, batch) -> ExportResult:
        with self._lock:
            self.rows += batch.num_rows
        return ExportResult.SUCCESS


class _Receiver:
    def __init__(self) -> None:
        self.count = _Count()
        self.pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(BATCH)
                         .with_channel_capacity(1 << 20).with_flush_interval(0.01)
                         .with_exporter(self.count).build())
        self.receiver = OtlpGrpcReceiver(self.pipeline, endpoint="127.0.0.1:0",
                                         max_request_bytes=64 << 20).start()
        self.endpoint = f"127.0.0.1:{self.receiver.port}"

    def close(self) -> None:
        self.receiver.stop(0.5)
        self.pipeline.shutdown(10.0)


_PROTOCOL = OtlpConfig(protocol="grpc", insecure=True, timeout=30.0, consumers=2,
                       retry=RetryConfig(initial_interval=0.05, max_elapsed_time=30.0))


def _end_to_end(batches, balanced: bool) -> tuple[int, float]:
    receivers = [_Receiver() for _ in range(2 if balanced else 1)]
    try:
        if balanced:
            exporter: Exporter = LoadBalancingExporter([r.endpoint for r in receivers],
                                                       protocol=_PROTOCOL)
        else:
            from dataclasses import replace
            exporter = OtlpExporter(replace(_PROTOCOL, endpoint=receivers[0].endpoint))
        total = BATCH * len(batches)
        elapsed = timer()
        for b in batches:
            exporter.export(b)
        deadline = time.monotonic() + 120
        while sum(r.count.rows for r in receivers) < total:
            if time.monotonic() > deadline:
                raise RuntimeError("end-to-end benchmark: spans did not all arrive")
            time.sleep(0.002)
        seconds = elapsed()
        exporter.shutdown(10.0)
        if exporter.spans_failed:
            raise RuntimeError(f"{exporter.spans_failed} spans failed")
        return total, seconds
    finally:
        for r in receivers:
            r.close()


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    batches = _batches(8 if quick else 24)
    seeds = endpoint_seeds(ENDPOINTS)
    py_seeds = [int(s) for s in seeds]
    id_lists = [b.record_batch.column("trace_id").to_pylist() for b in batches]
    # the vectorized router and the Python one agree: checked once, outside the timing
    check = rendezvous_assign(trace_id_keys(batches[0].record_batch.column("trace_id")), seeds)
    assert check.tolist() == python_route(id_lists[0], py_seeds)
    results = []

    def route(b):
        return rendezvous_assign(trace_id_keys(b.record_batch.column("trace_id")), seeds)

    k, k_all = median_rate(lambda: _timed(route, batches), runs)
    p, p_all = median_rate(lambda: _timed(lambda ids: python_route(ids, py_seeds),
                                          id_lists[:2]), runs)
    results.append(Result(
        f"route {BATCH}-span batches over {len(ENDPOINTS)} endpoints (rendezvous on trace_id)",
        "spans/s", k, p, "the same rendezvous hash span by span in plain Python",
        None, None, runs, "", {"knhk_runs": k_all, "peer_runs": p_all}))

    sinks = {e: InMemoryExporter() for e in ENDPOINTS}
    lb = LoadBalancingExporter(ENDPOINTS, exporter_factory=sinks.__getitem__)

    def lb_export(b):
        lb.export(b)
        for s in sinks.values():
            s.clear()

    k, k_all = median_rate(lambda: _timed(lb_export, batches), runs)
    p, p_all = median_rate(lambda: _timed(lambda b: python_split(b.record_batch, 4),
                                          batches[:4]), runs)
    lb.shutdown(1.0)
    results.append(Result(
        f"route and split {BATCH}-span batches into {len(ENDPOINTS)} sub-batches "
        "(LoadBalancingExporter.export)", "spans/s", k, p,
        "hashlib.blake2b per trace id modulo N, Python index lists, one take per endpoint",
        None, None, runs, "", {"knhk_runs": k_all, "peer_runs": p_all}))

    rng = np.random.default_rng(3)
    ids = pa.array([rng.bytes(16) for _ in range(100_000)], pa.binary(16))
    keys = trace_id_keys(ids)
    two, three = ENDPOINTS[:2], ENDPOINTS[:3]
    before = np.array(two)[rendezvous_assign(keys, endpoint_seeds(two))]
    after = np.array(three)[rendezvous_assign(keys, endpoint_seeds(three))]
    moved = float(np.mean(before != after))
    all_to_new = bool(np.all(after[before != after] == three[2]))
    digests = np.array([int.from_bytes(hashlib.blake2b(t, digest_size=8).digest(), "big")
                        for t in ids.to_pylist()], dtype=np.uint64)
    moved_mod = float(np.mean(digests % np.uint64(2) != digests % np.uint64(3)))
    results.append(Result(
        "traces re-routed when a 3rd endpoint joins 2 (lower is better)", "fraction",
        moved, moved_mod, "hash modulo N", "<= 1/3 + 0.01 (1/3 is the minimum)",
        moved <= 1 / 3 + 0.01 and all_to_new, 1,
        "every moved trace went to the new endpoint" if all_to_new else
        "SOME MOVED TRACES WENT TO AN OLD ENDPOINT"))

    e2e = batches[:6] if quick else batches[:16]
    _end_to_end(e2e[:1], True)  # warm up channels and the codec
    k, k_all = median_rate(lambda: _end_to_end(e2e, True), runs)
    p, p_all = median_rate(lambda: _end_to_end(e2e, False), runs)
    results.append(Result(
        f"end to end: {len(e2e) * BATCH:,} spans through LoadBalancingExporter to 2 "
        "OtlpGrpcReceivers on loopback", "spans/s", k, p,
        "one OtlpExporter to one OtlpGrpcReceiver (no balancing)", None, None, runs,
        "sender, receivers and their pipelines share 2 cores",
        {"knhk_runs": k_all, "peer_runs": p_all}))
    return results
