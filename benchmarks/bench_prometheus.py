"""Prometheus exporter: the cost of a scrape, and of counting spans into RED metrics.

Run the side-by-side scenarios with ``python benchmarks/run.py prometheus``
(figures go to RESULTS.md).

Scrape: 10,000 counter series with four labels (service, span name, kind,
status, as ``calls_total`` has them), then 10,000 histogram series with 16
buckets, rendered by ``PrometheusExporter.collect_text()`` (text format
0.0.4). The peer is prometheus-client's own ``Counter`` / ``Histogram`` with
the same label names and values in a registry of their own, rendered by
``prometheus_client.generate_latest`` (``_created`` series disabled, so both
sides write the same series). Median of several scrapes; the rendered texts
are parsed back in the benchmark and must hold the same samples.

Span metrics: ``calls_total`` + ``duration_seconds`` + the service graph from
workload spans in batches of 4,096 (the exporter's pipeline stage), beside
the per-span code a user would otherwise write: ``Counter.labels(...).inc()``
and ``Histogram.labels(...).observe()`` with prometheus-client.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Result, median_rate
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from knhk.batch import MetricBatch
from knhk.exporters.prometheus import DEFAULT_DURATION_BUCKETS_MS, PrometheusExporter
from knhk.metrics import _check, metric_batch
from knhk.schema import MetricKind, MetricPoint
from knhk.workload import WorkloadConfig, generate

LABELS = ("service", "span_kind", "span_name", "status_code")
BOUNDS_S = [b / 1000 for b in DEFAULT_DURATION_BUCKETS_MS]


def label_sets(n: int) -> list[dict[str, str]]:
    return [{"service": f"svc-{i % 20}", "span_kind": "SPAN_KIND_SERVER",
             "span_name": f"GET /api/v1/items/{i}", "status_code": "STATUS_CODE_UNSET"}
            for i in range(n)]


def knhk_exporter(sets: list[dict[str, str]], histogram: bool) -> PrometheusExporter:
    prom = PrometheusExporter(start_server=False, cardinality_limit=len(sets) + 1)
    rng = np.random.default_rng(1)
    rows = []
    for attrs in sets:
        if histogram:
            counts = rng.integers(0, 50, len(BOUNDS_S) + 1).tolist()
            p = MetricPoint("span.duration", kind=MetricKind.HISTOGRAM, unit="s",
                            attributes=attrs, bounds=BOUNDS_S, bucket_counts=counts,
                            sum=float(sum(counts)) * 0.01, service="bench")
        else:
            p = MetricPoint("requests", int(rng.integers(1, 10**6)), kind=MetricKind.COUNTER,
                            attributes=attrs, service="bench")
        rows.append(_check(p))
    prom.export(MetricBatch(metric_batch(rows)))
    return prom


def client_registry(prom: PrometheusExporter, histogram: bool) -> CollectorRegistry:
    """prometheus-client's own metric holding the same series as ``prom``'s."""
    reg = CollectorRegistry()
    [fam] = [f for f in prom._user.values()]
    if histogram:
        h = Histogram("span_duration_seconds", "h", LABELS, buckets=BOUNDS_S, registry=reg)
        for pairs in fam.pairs:
            child = h.labels(**dict(pairs))
            # the same per-bucket counts and sum, set through the child's own state
            i = fam.index[pairs]
            for b, c in zip(child._buckets, fam.buckets[i].tolist(), strict=True):
                b.set(c)
            child._sum.set(float(fam.sums[i]))
    else:
        c = Counter("requests", "c", LABELS, registry=reg)
        for pairs, v in zip(fam.pairs, fam.values, strict=True):
            c.labels(**dict(pairs)).inc(v)
    return reg


def median_ms(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), times


def samples(text: bytes, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) if f.name == name
            for s in f.samples}


def scrape(n: int, histogram: bool, runs: int) -> Result:
    sets = label_sets(n)
    prom = knhk_exporter(sets, histogram)
    reg = client_registry(prom, histogram)
    name = "span_duration_seconds" if histogram else "requests"
    ours, theirs = prom.collect_text(), generate_latest(reg)
    assert samples(ours, name) == samples(theirs, name), "the two scrapes differ"
    k, k_all = median_ms(prom.collect_text, runs)
    p, p_all = median_ms(lambda: generate_latest(reg), runs)
    what = "histogram series (16 buckets)" if histogram else "counter series (4 labels)"
    peer = "prometheus-client Histogram" if histogram else "prometheus-client Counter"
    return Result(
        f"scrape of {n:,} {what}, text format 0.0.4", "ms per scrape", k, p,
        f"{peer} with labels, generate_latest", "<= 50 ms" if not histogram else None,
        k <= 50 if not histogram else None, runs,
        f"{len(ours):,} bytes; both texts parse to the same samples",
        {"knhk_runs_ms": k_all, "peer_runs_ms": p_all, "bytes": len(ours)})


def span_metrics(n: int, runs: int) -> Result:
    spans = generate(n, WorkloadConfig(seed=2))
    step = 4096
    chunks = [spans.slice(off, step) for off in range(0, n, step)]

    def knhk_run() -> tuple[int, float]:
        stage = PrometheusExporter(start_server=False).pipeline_stage()
        t0 = time.perf_counter()
        for c in chunks:
            stage.process(c)
        return n, time.perf_counter() - t0

    small = spans.slice(0, min(n, 100_000))
    svc = small.column("service").cast("string").to_pylist()
    name = small.column("name").cast("string").to_pylist()
    kind = small.column("kind").to_pylist()
    status = small.column("status_code").to_pylist()
    dur = ((small.column("end_time_ns").to_numpy() - small.column("start_time_ns").to_numpy())
           / 1e9).tolist()

    def client_run() -> tuple[int, float]:
        reg = CollectorRegistry()
        calls = Counter("calls", "c", LABELS, registry=reg)
        hist = Histogram("duration_seconds", "h", LABELS, buckets=BOUNDS_S, registry=reg)
        t0 = time.perf_counter()
        for s, nm, k, st, d in zip(svc, name, kind, status, dur, strict=True):
            labels = (s, str(k), nm, str(st))
            calls.labels(*labels).inc()
            hist.labels(*labels).observe(d)
        return len(svc), time.perf_counter() - t0

    k, k_all = median_rate(knhk_run, runs)
    p, p_all = median_rate(client_run, max(1, runs // 2))
    return Result(
        f"RED metrics + service graph from {n:,} workload spans, batches of {step:,}",
        "spans/s", k, p, "prometheus-client Counter.inc + Histogram.observe per span", None,
        None, runs, f"peer on {small.num_rows:,} spans; it has no service graph",
        {"knhk_runs": k_all, "peer_runs": p_all})


def scenarios(quick: bool = False) -> list[Result]:
    runs = 5 if quick else 9
    return [scrape(10_000, False, runs), scrape(10_000, True, max(3, runs // 2)),
            span_metrics(200_000 if quick else 1_000_000, 3 if quick else 5)]


if __name__ == "__main__":
    for r in scenarios(quick="--quick" in sys.argv):
        print(r.as_dict())
