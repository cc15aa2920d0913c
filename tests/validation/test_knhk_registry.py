"""knhk's own output validated against knhk's own registry (``registry/``)."""

from __future__ import annotations

import pytest

import knhk
from knhk.validation import WeaverValidator

workload = pytest.importorskip("knhk.workload", reason="the workload generator is required")


@pytest.fixture(scope="module")
def v(knhk_registry_path, session_cache):
    return WeaverValidator(knhk_registry_path, cache_dir=session_cache,
                           sources=("attributes", "resource_attributes"))


def test_workload_spans_conform_to_the_registry(v):
    batch = workload.generate(5_000, workload.WorkloadConfig(seed=3))
    report = v.validate_batch(batch)
    assert report.num_rows == 5_000
    table = report.table()
    violations = [r for r in table.to_pylist() if r["level"] == "violation"]
    assert report.num_violations == 0, violations[:10]
    assert "missing_attribute" not in report.counts
    names = batch.column("name").to_pylist()
    wf = [i for i, n in enumerate(names) if n == "workflow.execute"]
    assert wf, "the workload emits workflow.execute spans"
    for row in wf[:50]:
        assert report.group_of(row) == "workflow.execute"
        assert not any(f.id == "required_attribute_not_present" for f in report.findings(row))


def test_workflow_execute_per_event(v):
    ok = v.validate_span("workflow.execute", {"workflow.id": "w-1", "workflow.pattern":
                                              "sequence"})
    assert ok.is_valid() and ok.group == "workflow.execute"
    bad = v.validate_span("workflow.execute", {"workflow.id": "w-1"})
    assert [(f.id, f.attribute_key) for f in bad.violations] == [
        ("required_attribute_not_present", "workflow.pattern")]


def test_pipeline_annotations_are_not_findings(v, pipeline_factory):
    sink = knhk.InMemoryExporter()
    p = pipeline_factory(lambda b: b.with_stage(v.stage()).with_exporter(sink))
    p.record_span(knhk.Span("workflow.execute", trace_id=1, span_id=1,
                            attributes={"workflow.id": "w"}))
    assert p.force_flush(10)
    out = sink.spans()
    assert out.attribute_values("knhk.validation.level") == ["violation"]
    again = v.validate_batch(out)
    assert again.counts.get("missing_attribute", 0) == 0
