"""Anomaly detectors on window results, alone and inside the StreamProcessor."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

import knhk
from knhk.stream import StreamProcessor, WindowConfig
from knhk.stream.anomaly import EwmaDetector, ThresholdRule

S = 1_000_000_000


def reference_ewma(xs, a):
    """Textbook incremental EWMA mean/variance (Finch 2009), one value at a time."""
    mean, var = xs[0], 0.0
    out = [(mean, var)]
    for x in xs[1:]:
        d = x - mean
        mean = mean + a * d
        var = (1 - a) * (var + a * d * d)
        out.append((mean, var))
    return out


def table(i, key, col, v):
    return pa.table({"window_start": [i], "window_end": [i + 1], "service": [key], col: [v]})


def test_ewma_baseline_matches_reference_and_alerts_after_warmup():
    rng = np.random.default_rng(0)
    xs = list(10 + rng.normal(0, 0.5, 30))
    det = EwmaDetector("lat", "p99_duration_ms", smoothing=0.2, z=4, warmup=10)
    alerts = []
    for i, x in enumerate(xs):
        alerts += det.observe(table(i, "api", "p99_duration_ms", x), ("service",))
    mean, var = reference_ewma(xs, 0.2)[-1]
    assert det.baseline(("api",)) == pytest.approx((mean, math.sqrt(var)), rel=1e-12)
    assert alerts == []
    [a] = det.observe(table(99, "api", "p99_duration_ms", mean + 10 * math.sqrt(var) + 5),
                      ("service",))
    assert a.key == ("api",) and a.time_ns == 100 and a.details["z"] > 4
    # a fresh key is in warm-up: no alert however odd its values
    assert det.observe(table(0, "db", "p99_duration_ms", 1e9), ("service",)) == []


def test_threshold_rule():
    rule = ThresholdRule("errors", "error_rate", above=0.1, severity="critical")
    t = pa.table({"window_start": [0, 0], "window_end": [1, 1], "service": ["a", "b"],
                  "error_rate": [0.05, 0.5]})
    [a] = rule.observe(t, ("service",))
    assert (a.key, a.severity, a.details["value"]) == (("b",), "critical", 0.5)
    with pytest.raises(ValueError, match="no column 'nope'"):
        ThresholdRule("x", "nope", above=1).observe(t, ("service",))


def test_detectors_in_processor_on_closed_windows():
    p = StreamProcessor(WindowConfig.tumbling(seconds=1), group_by=("service",))
    p.add_detector(EwmaDetector("p99", "p99_duration_ms", warmup=5, z=3))
    p.add_detector(ThresholdRule("slow", "max", above=900.0, severity="error"))
    spans = []
    for w in range(12):
        dur = 1000 if w == 11 else 10 + (w % 3)     # ms; the last window is 100x slower
        spans += [knhk.Span("op", trace_id=1, span_id=len(spans) + 1 + j,
                            start_time_ns=w * S + j, duration_ns=dur * 10**6, service="api")
                  for j in range(3)]
    p.process(knhk.SpanBatch.from_spans(spans))
    p.flush()
    assert sorted(a.rule for a in p.alerts) == ["p99", "slow"]
    assert all(a.time_ns == 12 * S for a in p.alerts)


@pytest.mark.parametrize("make, message", [
    (lambda: EwmaDetector("x", smoothing=0), "smoothing"),
    (lambda: EwmaDetector("x", warmup=0), "warmup"),
    (lambda: EwmaDetector("x", message="{bogus}"), "template"),
    (lambda: ThresholdRule("x", "count"), "above= or below="),
    (lambda: ThresholdRule("x", "count", above=1, severity="meh"), "severity"),
])
def test_bad_configuration(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_alert_memory_is_bounded():
    from knhk.stream import alerts as al

    sink = al.InMemoryAlertSink(max_alerts=100)
    router = al.AlertRouter([sink], dedup_seconds=1.0)
    for i in range(1000):
        assert router.emit(al.Alert("r", "info", "m", i * 2 * 10**9, (str(i),), {}))
    assert 100 <= len(sink.alerts) <= 200 and sink.forgotten == 1000 - len(sink.alerts)
    assert sink.alerts[-1].key == ("999",)
    # duplicates within the window are still suppressed
    assert not router.emit(al.Alert("r", "info", "m", 999 * 2 * 10**9 + 1, ("999",), {}))
    # without deduplication no (rule, key) is remembered
    plain = al.AlertRouter([], dedup_seconds=0)
    for i in range(50):
        plain.emit(al.Alert("r", "info", "m", i, (str(i),), {}))
    assert plain._last == {}


def test_ewma_forgets_the_key_updated_longest_ago():
    det = EwmaDetector("lat", "p99_duration_ms", max_keys=2, warmup=1)
    for i, key in enumerate(["a", "b", "a", "c"]):   # "b" is the least recently updated
        det.observe(table(i, key, "p99_duration_ms", 10.0 + i), ("service",))
    assert det.evictions == 1
    assert det.baseline(("b",)) is None
    assert det.baseline(("a",)) is not None and det.baseline(("c",)) is not None
    with pytest.raises(ValueError, match="max_keys"):
        EwmaDetector("x", max_keys=0)
