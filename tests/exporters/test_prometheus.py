"""The Prometheus exporter, checked against prometheus-client's parsers and promtool."""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

import knhk
from knhk.exporters._prom_families import Family
from knhk.exporters._prom_names import label_name, label_pairs, metric_name
from knhk.exporters._prom_spans import ServiceGraph
from knhk.exporters.base import Exporter, ExportResult
from knhk.exporters.prometheus import PrometheusExporter
from knhk.sampling import TraceIdRatio
from knhk.schema import MetricKind, MetricPoint, Temporality
from knhk.stream import StreamProcessor, WindowConfig
from knhk.stream.anomaly import ThresholdRule
from knhk.stream.cep import CepAction, CepPattern, CepRule, Matcher
from knhk.tracing import service_call_graph
from knhk.workload import WorkloadConfig, generate

REGISTRY = Path(__file__).resolve().parents[2] / "registry"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TRICKY = 'x"} 1\nfake_metric 1'


def samples(text: bytes | str) -> dict[tuple, float]:
    """Every sample of a 0.0.4 exposition: (name, sorted labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def family_types(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


def of(smp: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in smp.items() if n == name}


def promtool(text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)


def exporter(**kw) -> PrometheusExporter:
    return PrometheusExporter(start_server=False, **kw)


def metric_batch(points: list[MetricPoint]) -> knhk.MetricBatch:
    from knhk.metrics import _check, metric_batch

    rows = []
    for p in points:
        row = _check(p)
        row["service"] = row["service"] or "test"
        rows.append(row)
    return knhk.MetricBatch(metric_batch(rows))


# -- names -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    # the compatibility specification's and the Collector's normalization examples
    ("system.filesystem.usage", "By", "gauge", "system_filesystem_usage_bytes"),
    ("system.network.dropped", "{packets}", "gauge", "system_network_dropped"),
    ("system.network.dropped", "packets", "gauge", "system_network_dropped_packets"),
    ("system.memory.utilization", "1", "gauge", "system_memory_utilization_ratio"),
    ("system.cpu.time", "1", "counter", "system_cpu_time_total"),
    ("(lambda).function.executions(#)", "", "gauge", "lambda_function_executions"),
    ("http.server.request.duration", "s", "histogram", "http_server_request_duration_seconds"),
    ("network.io", "By/s", "gauge", "network_io_bytes_per_second"),
    ("requests_total", "", "counter", "requests_total"),
    ("latency", "ms", "histogram", "latency_milliseconds"),
    ("latency_seconds", "s", "gauge", "latency_seconds"),
    ("2xx", "", "counter", "_2xx_total"),
])
def test_metric_names_follow_the_compatibility_spec(name, unit, kind, expected):
    assert metric_name(name, unit, kind) == expected


def test_label_names_are_sanitized_and_collisions_joined():
    assert label_name("http.request.method") == "http_request_method"
    assert label_name("0day") == "key_0day"
    assert label_name("__name__") == "key__name__"
    assert label_name("näme-x") == "n_me_x"
    # keys that collide after sanitizing: values joined with ';' in key order
    assert label_pairs([("b.c", "2"), ("b_c", "1"), ("a", 3)]) == (("a", "3"), ("b_c", "2;1"))


# -- span metrics ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spans() -> knhk.SpanBatch:
    return generate(6000, WorkloadConfig(seed=11))


def test_red_metrics_count_every_span_before_sampling(spans, pipeline_factory):
    prom = exporter()
    sink = knhk.InMemoryExporter()
    pipeline = pipeline_factory(lambda b: b.with_batch_size(500).with_exporter(prom)
                                .with_exporter(sink).with_sampler(TraceIdRatio(0.1)))
    pipeline.record_batch(spans)
    assert pipeline.force_flush(10)
    exported = sum(b.num_rows for b in sink.batches)
    assert 0 < exported < spans.num_rows  # the sampler did drop spans
    smp = samples(prom.collect_text())
    calls = of(smp, "calls_total")
    assert sum(calls.values()) == spans.num_rows
    # per key, against an independent group-by of the input
    t = pa.table({"service": spans.column("service").cast(pa.string()),
                  "name": spans.column("name").cast(pa.string()),
                  "kind": spans.column("kind"), "status": spans.column("status_code")})
    expect = t.group_by(["service", "name", "kind", "status"]).aggregate([("name", "count")])
    kinds = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"]
    statuses = ["UNSET", "OK", "ERROR"]
    want = {(("service", r["service"]), ("span_kind", f"SPAN_KIND_{kinds[r['kind']]}"),
             ("span_name", r["name"]), ("status_code", f"STATUS_CODE_{statuses[r['status']]}")):
            r["name_count"] for r in expect.to_pylist()}
    assert calls == want


def test_duration_histogram_is_cumulative_and_matches_numpy(spans):
    prom = exporter(duration_buckets_ms=(1, 5, 25, 100))
    stage = prom.pipeline_stage()
    for off in range(0, spans.num_rows, 700):
        stage.process(spans.slice(off, 700))
    smp = samples(prom.collect_text())
    dur_ms = (spans.column("end_time_ns").to_numpy() - spans.column("start_time_ns").to_numpy()
              ) / 1e6
    svc = spans.column("service").cast(pa.string()).to_numpy(zero_copy_only=False)
    name = spans.column("name").cast(pa.string()).to_numpy(zero_copy_only=False)
    rows = (svc == "frontend") & (name == "GET") & (spans.column("status_code").to_numpy() == 0)
    assert rows.sum() > 10
    labels = {"service": "frontend", "span_kind": "SPAN_KIND_CLIENT", "span_name": "GET",
              "status_code": "STATUS_CODE_UNSET"}
    d = dur_ms[rows]
    for le, bound in (("0.001", 1), ("0.005", 5), ("0.025", 25), ("0.1", 100),
                      ("+Inf", math.inf)):
        key = ("duration_seconds_bucket", tuple(sorted({**labels, "le": le}.items())))
        assert smp[key] == np.sum(d <= bound)
    base = tuple(sorted(labels.items()))
    assert smp[("duration_seconds_count", base)] == len(d)
    assert smp[("duration_seconds_sum", base)] == pytest.approx(d.sum() / 1000)
    # every histogram: +Inf bucket == _count, buckets never decrease
    for fam in text_string_to_metric_families(prom.collect_text().decode()):
        if fam.type != "histogram":
            continue
        by_series: dict[tuple, list] = {}
        count = {}
        for s in fam.samples:
            lab = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                by_series.setdefault(lab, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                count[lab] = s.value
        for lab, buckets in by_series.items():
            vals = [v for _, v in sorted(buckets)]
            assert vals == sorted(vals) and vals[-1] == count[lab]


def test_service_graph_pairs_spans_across_batches(spans):
    prom = exporter()
    stage = prom.pipeline_stage()
    rng = np.random.default_rng(5)
    cuts = np.sort(rng.choice(np.arange(1, spans.num_rows), 12, replace=False))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, spans.num_rows], strict=True):
        stage.process(spans.slice(int(a), int(b - a)))
    smp = samples(prom.collect_text())
    edges = service_call_graph(spans).to_pylist()
    assert len(edges) > 3
    want = {(("client", e["client"]), ("server", e["server"])): e["calls"] for e in edges}
    failed = {(("client", e["client"]), ("server", e["server"])): e["errors"] for e in edges}
    assert of(smp, "traces_service_graph_request_total") == want
    assert of(smp, "traces_service_graph_request_failed_total") == failed
    assert of(smp, "traces_service_graph_request_server_seconds_count") == want
    assert not of(smp, "traces_service_graph_unpaired_spans_total")


def test_service_graph_store_expires_and_bounds_waiting_children(make_span):
    now = [0.0]
    g = ServiceGraph((0.1,), limit=100, ttl=5.0, max_items=2, clock=lambda: now[0])

    def child(i: int, svc: str) -> knhk.Span:
        return knhk.Span("c", trace_id=1, span_id=100 + i, parent_span_id=i, service=svc,
                         start_time_ns=0, duration_ns=10)

    def batch(*s: knhk.Span) -> knhk.SpanBatch:
        return knhk.SpanBatch.from_spans(list(s))

    g.update(batch(child(1, "db")))                 # waits for parent 1
    g.update(batch(child(2, "db"), child(3, "db"), child(4, "cache")))  # 4 waiting > 2
    assert g.waiting == 2 and g.dropped.values == [2]  # the two oldest pushed out
    now[0] = 1.0
    # parent 4 arrives in time: one edge front -> cache
    g.update(batch(knhk.Span("p", trace_id=1, span_id=4, service="front", start_time_ns=0,
                             duration_ns=50)))
    assert g.requests.pairs == [(("client", "front"), ("server", "cache"))]
    assert g.requests.values == [1] and g.waiting == 1
    now[0] = 10.0
    g.expire()
    assert g.waiting == 0 and g.unpaired.pairs == [(("server", "db"),)]
    assert g.unpaired.values == [1]
    # a late child finds its parent among the recent spans (parent first)
    g.update(batch(knhk.Span("p", trace_id=2, span_id=9, service="a", start_time_ns=0,
                             duration_ns=50)))
    g.update(batch(knhk.Span("c", trace_id=2, span_id=10, parent_span_id=9, service="b",
                             start_time_ns=0, duration_ns=5, status=2)))
    assert g.failed.values[g.failed.index[(("client", "a"), ("server", "b"))]] == 1


# -- user metrics ------------------------------------------------------------------------

def test_delta_sums_become_cumulative_and_kinds_map_to_types():
    prom = exporter()
    d = Temporality.DELTA
    pts = [MetricPoint("jobs", 1, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "a"}),
           MetricPoint("jobs", 2, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "a"}),
           MetricPoint("jobs", 4, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "b"}),
           MetricPoint("bytes", 10, kind=MetricKind.COUNTER, unit="By"),
           MetricPoint("bytes", 25, kind=MetricKind.COUNTER, unit="By"),
           MetricPoint("inflight", 5, kind=MetricKind.UP_DOWN_COUNTER, temporality=d),
           MetricPoint("inflight", -2, kind=MetricKind.UP_DOWN_COUNTER, temporality=d),
           MetricPoint("temp", 21.5, unit="Cel"),
           MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms", temporality=d,
                       bounds=[10, 100], bucket_counts=[1, 2, 0], sum=120.0),
           MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms", temporality=d,
                       bounds=[10, 100], bucket_counts=[0, 1, 3], sum=900.0)]
    assert prom.export(metric_batch(pts)) is ExportResult.SUCCESS
    text = prom.collect_text()
    smp = samples(text)
    assert of(smp, "jobs_total") == {(("q", "a"),): 3, (("q", "b"),): 4}
    assert of(smp, "bytes_total") == {(): 25}  # the unit word is there already
    assert of(smp, "inflight") == {(): 3}
    assert of(smp, "temp_celsius") == {(): 21.5}
    assert of(smp, "lat_milliseconds_bucket") == {
        (("le", "10.0"),): 1, (("le", "100.0"),): 4, (("le", "+Inf"),): 7}
    assert of(smp, "lat_milliseconds_count") == {(): 7}
    assert of(smp, "lat_milliseconds_sum") == {(): 1020.0}
    types = family_types(text)
    assert types["jobs"] == "counter" and types["inflight"] == "gauge"
    assert types["lat_milliseconds"] == "histogram"
    # a cumulative histogram replaces
    prom.export(metric_batch([MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms",
                                          bounds=[10, 100], bucket_counts=[0, 0, 1], sum=5.0)]))
    assert of(samples(prom.collect_text()), "lat_milliseconds_count") == {(): 1}


def test_parser_reads_back_exactly_the_series_written_with_tricky_label_values():
    prom = exporter()
    values = {TRICKY: 1.0, "back\\slash": 2.0, 'quo"te': 3.0, "new\nline": 4.0,
              "ünïcødé ✓": 5.0, "": 6.0, "a,b=c{d}": 7.0}
    pts = [MetricPoint("weird", v, attributes={"v": k}) for k, v in values.items()]
    prom.export(metric_batch(pts))
    text = prom.collect_text()
    assert b"\nfake_metric" not in text
    fams = list(text_string_to_metric_families(text.decode()))
    weird = [f for f in fams if f.name == "weird"]
    assert len(weird) == 1 and not [f for f in fams if f.name == "fake_metric"]
    assert {s.labels["v"]: s.value for s in weird[0].samples} == values
    assert promtool(text).returncode == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                min_size=1, max_size=6, unique=True))
def test_any_label_value_reads_back_exactly(values):
    prom = exporter()
    prom.export(metric_batch([MetricPoint("v", float(i), attributes={"k": v})
                              for i, v in enumerate(values)]))
    got = {s.labels["k"]: s.value
           for f in text_string_to_metric_families(prom.collect_text().decode())
           if f.name == "v" for s in f.samples}
    assert got == {v: float(i) for i, v in enumerate(values)}
    om = {s.labels["k"]: s.value for f in om_parse(prom.collect_text(openmetrics=True).decode())
          if f.name == "v" for s in f.samples}
    assert om == got


def test_fast_renderer_equals_prometheus_client_exposition(spans):
    prom = exporter()
    stage = prom.pipeline_stage()
    stage.process(spans.slice(0, 3000))
    prom.export(metric_batch([
        MetricPoint("weird", 1.5, attributes={"v": TRICKY, "n": 3}),
        MetricPoint("c", 2, kind=MetricKind.COUNTER, description='help "with"\nnewline\\'),
        MetricPoint("h", kind=MetricKind.HISTOGRAM, bounds=[0.5, 1e21], bucket_counts=[1, 1, 1],
                    sum=3.0)]))
    registry = CollectorRegistry()
    registry.register(prom)
    assert samples(prom.collect_text()) == samples(generate_latest(registry))
    ours = {f.name: f for f in text_string_to_metric_families(prom.collect_text().decode())}
    theirs = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert {n: (f.type, f.documentation) for n, f in ours.items()} == \
        {n: (f.type, f.documentation) for n, f in theirs.items()}
    # OpenMetrics: both read by prometheus-client's strict OpenMetrics parser, equal
    om_ours = prom.collect_text(openmetrics=True).decode()
    om_theirs = om_generate_latest(registry).decode()
    assert om_ours.endswith("# EOF\n")

    def om_samples(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in om_parse(text) for s in f.samples}
    assert om_samples(om_ours) == om_samples(om_theirs)


def test_cardinality_limit_folds_into_an_overflow_series_with_exact_totals():
    prom = exporter(cardinality_limit=5)
    d = Temporality.DELTA
    pts = [MetricPoint("hits", i + 1, kind=MetricKind.COUNTER, temporality=d,
                       attributes={"user": f"u{i}"}) for i in range(20)]
    prom.export(metric_batch(pts))
    # cumulative points past the limit: the overflow series gets the increments
    cum = [MetricPoint("seen", v, kind=MetricKind.COUNTER, attributes={"k": f"k{i}"})
           for v in (10, 15) for i in range(8)]
    prom.export(metric_batch(cum))
    smp = samples(prom.collect_text())
    hits = of(smp, "hits_total")
    assert len(hits) == 5 and sum(hits.values()) == sum(range(1, 21))
    assert hits[(("otel_metric_overflow", "true"),)] == sum(range(5, 21))
    seen = of(smp, "seen_total")
    assert len(seen) == 5 and sum(seen.values()) == 15 * 8
    over = of(smp, "knhk_prometheus_overflow_label_sets_total")
    assert over == {(("metric", "hits_total"),): 16, (("metric", "seen_total"),): 4}


def test_span_metrics_respect_the_cardinality_limit(make_span):
    prom = exporter(cardinality_limit=10)
    batch = knhk.SpanBatch.from_spans([knhk.Span(f"op{i}", trace_id=1, span_id=i + 1)
                                       for i in range(50)])
    prom.pipeline_stage().process(batch)
    smp = samples(prom.collect_text())
    calls = of(smp, "calls_total")
    assert len(calls) == 10 and sum(calls.values()) == 50
    assert len(of(smp, "duration_seconds_count")) == 10
    assert sum(of(smp, "duration_seconds_count").values()) == 50


def test_bad_input_labels_values_and_bytes():
    prom = exporter()
    pts = [MetricPoint("g", float("nan"), attributes={"0bad-key.x": "a", "__name__": "b"}),
           MetricPoint("g", float("inf"), attributes={"w": "pos"}),
           MetricPoint("g", float("-inf"), attributes={"w": "neg"}),
           MetricPoint("b", 1, attributes={"raw": b"\xff\xfe\x00bin", "arr": [1, "x"],
                                           "ok": True}),
           MetricPoint("h", kind=MetricKind.HISTOGRAM, bounds=[1.0, math.inf],
                       bucket_counts=[1, 2, 0], sum=float("inf"), attributes={"le": "x"})]
    assert prom.export(metric_batch(pts)) is ExportResult.SUCCESS
    text = prom.collect_text()
    smp = samples(text)
    g = of(smp, "g")
    assert math.isnan(g[(("key_0bad_key_x", "a"), ("key__name__", "b"))])
    assert g[(("w", "pos"),)] == math.inf and g[(("w", "neg"),)] == -math.inf
    assert of(smp, "b") == {(("arr", '[1,"x"]'), ("ok", "true"), ("raw", "//4AYmlu")): 1}
    assert of(smp, "h_bucket") == {(("key_le", "x"), ("le", "1.0")): 1,
                                   (("key_le", "x"), ("le", "+Inf")): 3}
    assert of(smp, "h_sum")[(("key_le", "x"),)] == math.inf
    assert promtool(text).returncode == 0, promtool(text).stderr
    # points that cannot be exposed are counted, never raised
    conflict = [MetricPoint("calls", 1, kind=MetricKind.COUNTER),  # knhk's own calls_total
                MetricPoint("h", kind=MetricKind.HISTOGRAM, bounds=[2.0], bucket_counts=[1, 1]),
                MetricPoint("h", 3.0)]
    prom.export(metric_batch(conflict))
    assert of(samples(prom.collect_text()), "knhk_prometheus_points_dropped_total") == {
        (("reason", "histogram_bounds_changed"),): 1, (("reason", "reserved_name"),): 1,
        (("reason", "type_conflict"),): 1}
    # a lone surrogate never reaches a batch: recording it fails with a clear error
    with pytest.raises((ValueError, TypeError, UnicodeError)):
        metric_batch([MetricPoint("s", 1, attributes={"k": "\udcff"})])


def test_export_of_something_else_fails_without_raising():
    prom = exporter()
    assert prom.export(knhk.SpanBatch.from_spans([])) is ExportResult.SUCCESS
    assert prom.export(pa.record_batch({"x": [1]})) is ExportResult.FAILURE


@pytest.mark.parametrize("kwargs", [
    {"port": -1}, {"port": 70000}, {"host": ""}, {"cardinality_limit": 1},
    {"duration_buckets_ms": [5, 1]}, {"duration_buckets_ms": [1, float("nan")]},
    {"duration_buckets_ms": "abc"}, {"service_graph_ttl": 0},
])
def test_constructor_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PrometheusExporter(**kwargs)


def test_family_rejects_bad_limits_and_bounds():
    with pytest.raises(ValueError, match="limit"):
        Family("x", "counter", "", limit=1)
    with pytest.raises(ValueError, match="increase"):
        Family("x", "histogram", "", limit=5, bounds=[2, 1])


# -- the pipeline, stream processors, validation, the endpoint ---------------------------

class FailingExporter(Exporter):
    """A real exporter that always fails (what a broken backend looks like)."""

    name = "broken"

    def export(self, batch):
        return ExportResult.FAILURE


def test_pipeline_self_metrics_and_validation_findings(spans, pipeline_factory):
    prom = exporter()
    pipeline = pipeline_factory(lambda b: b.with_batch_size(1000).with_exporter(prom)
                                .with_exporter(FailingExporter())
                                .with_weaver_registry(str(REGISTRY)))
    pipeline.record_batch(spans)
    assert pipeline.force_flush(10)
    stats = pipeline.stats()
    smp = samples(prom.collect_text())
    assert of(smp, "knhk_pipeline_events_received_total") == {(): stats.events_received}
    assert of(smp, "knhk_pipeline_events_processed_total") == {(): spans.num_rows}
    assert of(smp, "knhk_pipeline_export_errors_total")[(("exporter", "broken"),)] == \
        stats.exporters["broken"]["export_errors"] > 0
    assert of(smp, "knhk_pipeline_export_errors_total")[(("exporter", "prometheus"),)] == 0
    assert of(smp, "knhk_pipeline_processing_latency_seconds_count") == {
        (): stats.batches_processed}
    assert of(smp, "knhk_pipeline_queue_occupancy_ratio") == {(): stats.queue_occupancy}
    findings = of(smp, "knhk_validation_findings_total")
    vs = pipeline.validator.stats()
    assert vs.total_findings > 0
    assert {dict(k)["id"]: v for k, v in findings.items()} == vs.findings_by_type
    assert {dict(k)["level"] for k in findings} <= {"violation", "improvement", "information"}


def test_stream_windows_and_alerts(spans, pipeline_factory):
    proc = StreamProcessor(WindowConfig.tumbling(seconds=60), group_by=("service",))
    proc.add_cep_rule(CepRule("error-burst", CepPattern.count_threshold(
        Matcher(status="error"), 3, within=10, by="service"),
        CepAction.alert("error", "{count} errors on {key}")))
    proc.add_detector(ThresholdRule("slow", "max", above=0.0, severity="warning"))
    prom = exporter(stream_processor=proc)
    pipeline = pipeline_factory(lambda b: b.with_stage(proc).with_exporter(prom))
    pipeline.record_batch(spans)
    pipeline.shutdown(10)  # closes every window
    results = proc.get_results()  # the exporter did not take them
    assert results
    smp = samples(prom.collect_text())
    last = {}
    for r in results:
        if r.service not in last or r.window_end >= last[r.service].window_end:
            last[r.service] = r
    p99 = of(smp, "knhk_window_duration_p99_seconds")
    assert p99 == {(("service", s),): pytest.approx(r.p99_duration_ms / 1000)
                   for s, r in last.items()}
    assert of(smp, "knhk_window_spans") == {(("service", s),): r.count for s, r in last.items()}
    assert of(smp, "knhk_window_error_ratio") == {(("service", s),): r.error_rate
                                                  for s, r in last.items()}
    alerts = of(smp, "knhk_stream_alerts_total")
    by_rule = {}
    for a in proc.alerts:
        by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
    assert by_rule["error-burst"] > 0 and by_rule["slow"] > 0
    assert alerts == {(("rule", "error-burst"), ("source", "cep")): by_rule["error-burst"],
                      (("rule", "slow"), ("source", "anomaly")): by_rule["slow"]}
    text = prom.collect_text()
    assert promtool(text).returncode == 0, promtool(text).stderr


def get(url: str, accept: str | None = None, encoding: str | None = None):
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    if encoding:
        req.add_header("Accept-Encoding", encoding)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers, resp.read()


def test_endpoint_negotiates_formats_and_passes_promtool(spans, pipeline_factory):
    prom = PrometheusExporter(port=0)
    pipeline = pipeline_factory(lambda b: b.with_exporter(prom))
    try:
        assert prom.port > 0  # bind_pipeline started the server
        pipeline.record_batch(spans.slice(0, 2000))
        pipeline.record_metric("weird", 1.0, attributes={"v": TRICKY})
        assert pipeline.force_flush(10)
        headers, body = get(prom.url)
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert sum(of(samples(body), "calls_total").values()) == 2000
        check = promtool(body)
        assert check.returncode == 0, check.stderr
        # Prometheus 2.x's own Accept header prefers OpenMetrics
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                  "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        headers, om = get(prom.url, accept)
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert om.endswith(b"# EOF\n")
        fams = {f.name: f for f in om_parse(om.decode())}
        assert sum(s.value for s in fams["calls"].samples) == 2000
        headers, _ = get(prom.url, "text/plain;q=0.9,application/openmetrics-text;q=0.5")
        assert headers["Content-Type"].startswith("text/plain")
        headers, zipped = get(prom.url, encoding="gzip")
        assert headers["Content-Encoding"] == "gzip"
        assert samples(gzip.decompress(zipped)).keys() == samples(body).keys()
        with pytest.raises(urllib.error.HTTPError) as err:
            get(prom.url.replace("/metrics", "/other"))
        assert err.value.code == 404
        err.value.close()
        assert prom.start() is prom  # idempotent
    finally:
        pipeline.shutdown(5)
        prom.shutdown()
    with pytest.raises(urllib.error.URLError):
        get(prom.url)


def test_registry_registration_uses_the_same_families():
    prom = exporter()
    prom.export(metric_batch([MetricPoint("x", 1.0)]))
    registry = CollectorRegistry()
    registry.register(prom)
    assert registry.get_sample_value("x") == 1.0


def test_labels_are_written_sorted_by_name(spans):
    prom = exporter()
    prom.pipeline_stage().process(spans)
    text = prom.collect_text().decode()
    # labels are written sorted by name, the order promtool and parsers expect
    line = next(x for x in text.splitlines() if x.startswith("calls_total{"))
    names = [p.split("=")[0] for p in line[line.index("{") + 1:line.index("}")].split('",')]
    assert names == sorted(names) and len(names) == 4


def test_a_busy_port_is_a_clear_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        prom = PrometheusExporter("127.0.0.1", port=port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            prom.start()
        assert prom.port == port and "not serving" in repr(prom)
        # the metrics stay readable without the endpoint
        prom.pipeline_stage().process(knhk.SpanBatch.from_spans(
            [knhk.Span("a", trace_id=1, span_id=1)]))
        assert of(samples(prom.collect_text()), "calls_total")


def test_children_still_waiting_at_shutdown_count_as_unpaired(pipeline_factory):
    prom = exporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(prom))
    pipeline.record_span(knhk.Span("orphan", trace_id=7, span_id=2, parent_span_id=1,
                                   service="db"))
    pipeline.shutdown(5)
    assert of(samples(prom.collect_text()), "traces_service_graph_unpaired_spans_total") == {
        (("server", "db"),): 1}


class _Clock:
    """The exporter's monotonic clock, moved by hand (expiry is about minutes)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_series_nothing_updates_expire_and_come_back_fresh(monkeypatch):
    import knhk.exporters.prometheus as prom_module

    clock = _Clock()
    monkeypatch.setattr(prom_module.time, "monotonic", clock)
    prom = exporter(metric_expiration=60.0)
    d = Temporality.DELTA
    prom.export(metric_batch([
        MetricPoint("jobs", 2, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "a"}),
        MetricPoint("jobs", 3, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "b"}),
        MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms", attributes={"q": "a"},
                    bounds=[10], bucket_counts=[1, 1], sum=15.0),
        MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms", attributes={"q": "b"},
                    bounds=[10], bucket_counts=[2, 0], sum=3.0)]))
    clock.now += 45
    prom.export(metric_batch([  # only q=a is still reported
        MetricPoint("jobs", 1, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "a"}),
        MetricPoint("lat", kind=MetricKind.HISTOGRAM, unit="ms", attributes={"q": "a"},
                    bounds=[10], bucket_counts=[1, 2], sum=40.0)]))
    smp = samples(prom.collect_text())
    assert of(smp, "jobs_total") == {(("q", "a"),): 3, (("q", "b"),): 3}  # 45 s: both live
    clock.now += 30  # q=b last updated 75 s ago, q=a 30 s ago
    text = prom.collect_text()
    smp = samples(text)
    assert of(smp, "jobs_total") == {(("q", "a"),): 3}
    assert of(smp, "lat_milliseconds_count") == {(("q", "a"),): 3}
    assert of(smp, "lat_milliseconds_sum") == {(("q", "a"),): 40.0}
    assert of(smp, "knhk_prometheus_series_expired_total") == {(): 2}
    # the text is still well formed for the parser (histogram rows kept aligned)
    assert {f.name for f in text_string_to_metric_families(text.decode())} >= {
        "jobs", "lat_milliseconds"}
    # q=b comes back: a new series, counted from its new points (a counter reset)
    prom.export(metric_batch([
        MetricPoint("jobs", 7, kind=MetricKind.COUNTER, temporality=d, attributes={"q": "b"})]))
    assert of(samples(prom.collect_text()), "jobs_total") == {
        (("q", "a"),): 3, (("q", "b"),): 7}


def test_window_gauges_of_keys_that_stopped_expire(monkeypatch):
    import knhk.exporters.prometheus as prom_module

    clock = _Clock()
    monkeypatch.setattr(prom_module.time, "monotonic", clock)
    prom = exporter(metric_expiration=120.0)
    t = pa.table({"service": ["a", "b"], "window_start": [0, 0], "window_end": [60, 60],
                  "count": [5, 7]})
    prom._observe_windows(t, ("service",))
    clock.now += 100
    prom._observe_windows(t.slice(0, 1), ("service",))  # b had no spans in this window
    assert of(samples(prom.collect_text()), "knhk_window_spans") == {
        (("service", "a"),): 5, (("service", "b"),): 7}
    clock.now += 60
    assert of(samples(prom.collect_text()), "knhk_window_spans") == {(("service", "a"),): 5}


def test_metric_expiration_none_keeps_every_series_and_bad_values_are_refused(monkeypatch):
    import knhk.exporters.prometheus as prom_module

    clock = _Clock()
    monkeypatch.setattr(prom_module.time, "monotonic", clock)
    prom = exporter(metric_expiration=None)
    prom.export(metric_batch([MetricPoint("temp", 20.0, attributes={"room": "x"})]))
    clock.now += 10 ** 6
    assert of(samples(prom.collect_text()), "temp") == {(("room", "x"),): 20.0}
    for bad in (0, -5, "5m", True):
        with pytest.raises(ValueError, match="metric_expiration"):
            PrometheusExporter(start_server=False, metric_expiration=bad)


def test_family_drop_stale_keeps_the_overflow_series_and_its_index():
    fam = Family("x_total", "counter", "x", limit=3, expires=True)
    for i, k in enumerate(["a", "b", "c", "d"]):  # c and d overflow
        fam.add((("k", k),), 1, now=float(i))
    assert len(fam) == 3 and fam.overflow == 2
    assert fam.drop_stale(0.5) == 1  # a (updated at 0) goes; the overflow series stays
    assert [dict(p).get("k") for p in fam.pairs] == ["b", None]
    assert fam.overflow == 1 and fam.index == {(("k", "b"),): 0}
    fam.add((("k", "b"),), 5, now=9.0)
    assert fam.values == [6, 2]


def test_load_balancer_endpoints_are_exposed(pipeline_factory):
    from knhk.exporters.loadbalancing import LoadBalancingExporter
    from knhk.exporters.memory import InMemoryExporter

    sinks = {ep: InMemoryExporter() for ep in ("a:4317", "b:4317", "c:4317")}
    lb = LoadBalancingExporter(["a:4317", "b:4317"], exporter_factory=sinks.get)
    prom = exporter()
    pipeline = pipeline_factory(lambda b: b.with_exporter(lb).with_exporter(prom))
    pipeline.record_batch(generate(3000, WorkloadConfig(seed=2)))
    assert pipeline.force_flush(10.0)
    lb.set_endpoints(["b:4317", "c:4317"])
    smp = samples(prom.collect_text())
    routed = of(smp, "knhk_loadbalancer_spans_routed_total")
    assert sum(routed.values()) == 3000
    # c joined after the batch: it is listed, with nothing routed to it yet
    assert routed == {(("endpoint", ep),): sinks[ep].spans().num_rows
                      for ep in ("a:4317", "b:4317")} | {(("endpoint", "c:4317"),): 0}
    assert min(routed[(("endpoint", ep),)] for ep in ("a:4317", "b:4317")) > 0
    assert of(smp, "knhk_loadbalancer_endpoint_active")[(("endpoint", "a:4317"),)] == 0
    assert of(smp, "knhk_loadbalancer_endpoint_active")[(("endpoint", "b:4317"),)] == 1
    assert of(smp, "knhk_loadbalancer_endpoints") == {(): 2}
    assert of(smp, "knhk_loadbalancer_membership_changes_total") == {(): 2}
    assert promtool(prom.collect_text()).returncode == 0
