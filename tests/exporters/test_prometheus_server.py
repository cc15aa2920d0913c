"""A real Prometheus server scrapes knhk; its query API returns what knhk counted."""

from __future__ import annotations

import math
import time

from knhk.exporters.prometheus import PrometheusExporter
from knhk.workload import WorkloadConfig, generate

TRICKY = 'x"} 1\nfake_metric 1'
DEADLINE_S = 20.0


def poll(query, promql: str, ready) -> list[dict]:
    """``query(promql)`` until ``ready(result)`` or the deadline; the last result."""
    deadline = time.monotonic() + DEADLINE_S
    result: list[dict] = []
    while time.monotonic() < deadline:
        try:
            result = query(promql)
        except OSError:  # the server is still starting
            result = []
        if ready(result):
            return result
        time.sleep(0.25)
    return result


def test_prometheus_scrapes_knhk_and_returns_its_series(prometheus, pipeline_factory, tmp_path):
    spans = generate(3000, WorkloadConfig(seed=4))
    prom = PrometheusExporter("127.0.0.1", port=0)
    pipeline = pipeline_factory(lambda b: b.with_exporter(prom))
    try:
        pipeline.record_batch(spans)
        pipeline.record_metric("weird", 2.5, attributes={"v": TRICKY, "0bad.key": "z"})
        pipeline.record_metric("temperature", float("-inf"), unit="Cel")
        assert pipeline.force_flush(10)
        query = prometheus(prom.port)

        up = poll(query, 'up{job="knhk"}', lambda r: r and r[0]["value"][1] == "1")
        assert up and up[0]["value"][1] == "1", (tmp_path / "prometheus.log").read_text()
        total = poll(query, "sum(calls_total)", lambda r: bool(r))
        assert float(total[0]["value"][1]) == spans.num_rows
        # one series, value and labels as knhk holds them
        weird = poll(query, "weird", lambda r: bool(r))
        assert len(weird) == 1
        labels = weird[0]["metric"]
        assert labels["v"] == TRICKY and labels["key_0bad_key"] == "z"
        assert float(weird[0]["value"][1]) == 2.5
        assert not query("fake_metric")
        temp = query("temperature_celsius")
        assert float(temp[0]["value"][1]) == -math.inf
        # a histogram: the +Inf bucket equals the count, summed over series
        inf = query('sum(duration_seconds_bucket{le="+Inf"})')
        count = query("sum(duration_seconds_count)")
        assert float(inf[0]["value"][1]) == float(count[0]["value"][1]) == spans.num_rows
        received = query("knhk_pipeline_events_received_total")
        assert float(received[0]["value"][1]) == pipeline.stats().events_received
        edges = query("sum(traces_service_graph_request_total)")
        assert float(edges[0]["value"][1]) > 0
    finally:
        pipeline.shutdown(5)
        prom.shutdown()
