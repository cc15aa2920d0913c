"""The validation stage in a running pipeline: counting, annotate / drop / quarantine,
and reloading the registry while spans flow."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from validation_testing import SMALL_V1, SMALL_V2, write_registry

import knhk
from knhk.validation import (
    ValidationAction,
    ValidationPolicy,
    WeaverValidator,
    annotate_batch,
)


def _spans(n, start=1, valid=lambda i: i % 3 != 0):
    """workflow.execute spans; every third lacks the required workflow.pattern."""
    out = []
    for i in range(start, start + n):
        attrs = {"workflow.id": f"w{i}"}
        if valid(i):
            attrs["workflow.pattern"] = "sequence"
        out.append(knhk.Span("workflow.execute", trace_id=i, span_id=i, attributes=attrs))
    return out


def _annotations(batch):
    return batch.attribute_values("knhk.validation.level")


def _read_arrow_files(directory: str) -> pa.Table:
    tables = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            tables.append(pa.ipc.open_file(path).read_all())
        except pa.ArrowInvalid:
            tables.append(pa.ipc.open_stream(path).read_all())
    return pa.concat_tables(tables)


def test_pipeline_with_weaver_registry_counts_and_annotates(pipeline_factory,
                                                            knhk_registry_path):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(10).with_weaver_registry(knhk_registry_path)
                         .with_exporter(sink))
    for s in _spans(30):
        p.record_span(s)
    assert p.force_flush(10)
    stats = p.stats()
    assert stats.events_processed == 30
    assert stats.validation_errors == 10                     # rows with a violation
    assert stats.counters["validation_violations"] == 10
    out = sink.spans()
    assert out.num_rows == 30                                 # annotate and pass: nothing lost
    levels = _annotations(out)
    names = out.attribute_values("workflow.id")
    for wid, level in zip(names, levels, strict=True):
        i = int(wid[1:])
        assert level == (None if i % 3 else "violation")
    counts = out.attribute_values("knhk.validation.violations")
    assert [c for c in counts if c is not None] == [1] * 10


def test_drop_policy(pipeline_factory, knhk_registry_path):
    v = WeaverValidator(knhk_registry_path)
    stage = v.stage(violation="drop")
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(10).with_stage(stage).with_exporter(sink))
    for s in _spans(30):
        p.record_span(s)
    assert p.force_flush(10)
    out = sink.spans()
    assert out.num_rows == 20
    assert all(int(w[1:]) % 3 for w in out.attribute_values("workflow.id"))
    stats = p.stats()
    assert stats.counters["validation_dropped"] == 10
    assert stats.validation_errors == 10


@pytest.mark.parametrize("target", ["directory", "exporter"])
def test_quarantine_policy(pipeline_factory, knhk_registry_path, tmp_path, target):
    v = WeaverValidator(knhk_registry_path)
    quarantine = str(tmp_path / "q") if target == "directory" else knhk.InMemoryExporter()
    stage = v.stage(ValidationPolicy(violation=ValidationAction.QUARANTINE,
                                     quarantine=quarantine))
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(10).with_stage(stage).with_exporter(sink))
    for s in _spans(30):
        p.record_span(s)
    assert p.force_flush(10)
    p.shutdown(10)
    assert sink.spans().num_rows == 20
    if target == "directory":
        table = _read_arrow_files(str(tmp_path / "q"))
        q = knhk.SpanBatch(table.combine_chunks().to_batches()[0])
    else:
        q = quarantine.spans()
    ids = sorted(int(w[1:]) for w in q.attribute_values("workflow.id"))
    assert ids == [i for i in range(1, 31) if i % 3 == 0]
    assert set(_annotations(q)) == {"violation"}              # quarantined rows are annotated
    assert p.stats().counters["validation_quarantined"] == 10


def test_policy_arguments():
    with pytest.raises(ValueError, match="needs quarantine"):
        ValidationPolicy(violation="quarantine")
    with pytest.raises(ValueError, match="'pass', 'drop' or 'quarantine'"):
        ValidationPolicy(violation="explode")
    with pytest.raises(ValueError, match="exporter"):
        ValidationPolicy(violation="quarantine", quarantine=42)
    p = ValidationPolicy(improvement="drop")
    assert p.actions()[knhk.validation.FindingLevel.IMPROVEMENT] is ValidationAction.DROP


def test_level_policies_and_on_report(small_registry, session_cache):
    v = WeaverValidator(small_registry, cache_dir=session_cache)
    seen = []
    stage = v.stage(violation="pass", improvement="drop", annotate=False,
                    on_report=lambda b, r: seen.append(r.num_rows))
    batch = knhk.SpanBatch.from_spans([
        knhk.Span("x", trace_id=1, span_id=1, attributes={"t.str": "ok"}),          # nothing
        knhk.Span("x", trace_id=2, span_id=2, attributes={"t.bool": True}),         # improvement
        knhk.Span("x", trace_id=3, span_id=3, attributes={"nope": 1}),              # violation
    ])
    result = stage.process(batch)
    assert seen == [3]
    assert result.mask.tolist() == [True, False, True]
    assert result.batch is batch                              # annotate=False: unchanged
    assert result.counters == {"validation_errors": 1, "validation_violations": 1,
                               "validation_dropped": 1}
    assert stage.last_report.num_rows == 3


def test_annotate_batch_keeps_everything_else(small_registry, session_cache):
    v = WeaverValidator(small_registry, cache_dir=session_cache)
    spans = [knhk.Span("x", trace_id=i, span_id=i, attributes={"t.str": "a", "n": i})
             for i in range(1, 6)]
    batch = knhk.SpanBatch.from_spans(spans).slice(1, 3)
    rows = np.array([True, False, True])
    out = annotate_batch(batch, rows, np.array([3, 0, 2], np.int8), np.array([4, 0, 0]))
    assert out.schema.equals(knhk.SPAN_SCHEMA)
    assert out.attribute_values("n") == [2, 3, 4]
    assert out.attribute_values("t.str") == ["a"] * 3
    assert _annotations(out) == ["violation", None, "improvement"]
    assert out.attribute_values("knhk.validation.violations") == [4, None, 0]
    # the validator never reports its own annotations
    assert v.validate_batch(out).counts == v.validate_batch(batch).counts


def test_reload_while_a_pipeline_runs(pipeline_factory, tmp_path, cache_dir):
    """Spans keep flowing while the registry changes under the stage: nothing is lost,
    no stage error, and once the reload is in, spans are checked against the new
    registry (v2.size becomes a known attribute)."""
    root = write_registry(tmp_path / "reg", {"r.yaml": SMALL_V1})
    v = WeaverValidator(root, cache_dir=cache_dir)
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_batch_size(50).with_stage(v.stage())
                         .with_exporter(sink))
    stop = threading.Event()
    sent = [0]

    def produce():
        i = 0
        while not stop.is_set():
            i += 1
            p.record_span(knhk.Span("op", trace_id=i, span_id=i,
                                    attributes={"v2.size": i, "t.str": "s"}))
            sent[0] = i
            if i % 200 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=produce)
    t.start()
    try:
        time.sleep(0.1)
        write_registry(root, {"v2.yaml": SMALL_V2})
        assert v.reload() is True
        time.sleep(0.1)
        (root / "v2.yaml").unlink()
        assert v.reload() is True
        write_registry(root, {"v2.yaml": SMALL_V2})
        assert v.reload() is True
        time.sleep(0.1)
    finally:
        stop.set()
        t.join()
    assert p.force_flush(20)
    last = sent[0]
    for i in range(last + 1, last + 51):                     # after the final reload
        p.record_span(knhk.Span("op", trace_id=i, span_id=i,
                                attributes={"v2.size": i, "t.str": "s"}))
    assert p.force_flush(20)
    stats = p.stats()
    assert stats.stage_errors == 0
    assert stats.events_processed == last + 50
    out = sink.spans()
    assert out.num_rows == last + 50
    levels = _annotations(out)
    assert levels[-50:] == [None] * 50                        # valid under the new registry
    assert "violation" in levels                              # invalid under the old one
    assert stats.validation_errors == levels.count("violation")


def test_stage_accepts_metric_batches_and_shuts_down(small_registry, session_cache):
    from knhk.metrics import MetricBuffer

    v = WeaverValidator(small_registry, cache_dir=session_cache, watch=10)
    stage = v.stage()
    buf = MetricBuffer(4, 16, "svc")
    buf.append(knhk.MetricPoint("nope", 1.0))
    buf.seal()
    (rb,) = list(buf.drain(0.0))
    assert stage.process(knhk.MetricBatch(rb)) is None
    assert stage.last_report.counts == {"missing_metric": 1}
    stage.shutdown()
    assert v._watcher is None
