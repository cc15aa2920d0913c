"""knhk.tracing.TraceCompletion: completion by root + idle timeout or max wait, bounds, late spans.

Driven with a fake clock, except the two pipeline tests, which run a real
TelemetryPipeline with an InMemoryExporter.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

import knhk
from knhk.tracing import TraceCompletion, TraceSet
from knhk.workload import WorkloadConfig, generate


def sp(trace: int, span: int, parent: int | None = None) -> knhk.Span:
    return knhk.Span(f"op{span}", trace_id=trace, span_id=span, parent_span_id=parent,
                     start_time_ns=span, duration_ns=10)


def feed(stage, *spans):
    return stage.process(knhk.SpanBatch.from_spans(list(spans)))


def traces_of(batch) -> list[int]:
    return sorted({int.from_bytes(t, "big") for t in batch.column("trace_id").to_pylist()})


@pytest.fixture
def clock():
    now = [0.0]
    return now


def make(clock, **kw):
    return TraceCompletion(clock=lambda: clock[0], **{"idle_timeout": 1.0, "max_wait": 10.0, **kw})


def test_root_then_idle_releases_the_whole_trace(clock):
    st = make(clock)
    assert feed(st, sp(1, 2, 1), sp(2, 5, 4)).num_rows == 0
    clock[0] = 0.5
    assert feed(st, sp(1, 1)).num_rows == 0          # the root; trace 1 not idle yet
    clock[0] = 1.4
    assert st.poll() is None                         # only 0.9 s idle
    clock[0] = 1.6
    out = st.poll()
    assert traces_of(out) == [1] and out.num_rows == 2
    assert st.pending_traces == 1 and st.pending_spans == 1
    c = st.pop_counters()
    assert c["traces_completed"] == 1 and c["traces_timed_out"] == 0
    assert st.pop_counters()["traces_completed"] == 0


def test_a_new_span_resets_the_idle_timer(clock):
    st = make(clock)
    feed(st, sp(1, 1))
    clock[0] = 0.9
    feed(st, sp(1, 2, 1))
    clock[0] = 1.5
    assert st.poll() is None
    clock[0] = 1.95
    assert st.poll().num_rows == 2


def test_without_root_the_trace_waits_for_max_wait(clock):
    st = make(clock)
    feed(st, sp(1, 2, 1))
    clock[0] = 9.9
    assert st.poll() is None
    clock[0] = 10.0
    assert st.poll().num_rows == 1
    assert st.pop_counters()["traces_timed_out"] == 1


def test_max_traces_evicts_the_oldest_and_loses_nothing(clock):
    st = make(clock, max_traces=3)
    out = []
    for t in range(1, 7):
        clock[0] = t * 0.01
        out.append(feed(st, sp(t, 2, 1)))
    assert st.pending_traces == 3
    released = knhk.SpanBatch.concat(out)
    assert traces_of(released) == [1, 2, 3]
    assert st.pop_counters()["traces_evicted"] == 3
    rest = st.flush()
    assert traces_of(rest) == [4, 5, 6]
    assert st.pop_counters()["traces_flushed"] == 3
    assert st.flush() is None


def test_max_spans_bounds_held_spans(clock):
    st = make(clock, max_spans=5)
    feed(st, *[sp(1, i, 1) for i in range(2, 6)])     # 4 spans of trace 1
    clock[0] = 0.1
    out = feed(st, sp(2, 2, 1), sp(2, 3, 1))          # 6 held > 5: trace 1 goes
    assert traces_of(out) == [1] and st.pending_spans == 2
    assert st.pop_counters()["traces_evicted"] == 1


def test_late_spans_pass_through_and_are_counted(clock):
    st = make(clock)
    feed(st, sp(1, 1))
    clock[0] = 2.0
    assert st.poll().num_rows == 1
    out = feed(st, sp(1, 2, 1), sp(2, 1))
    assert traces_of(out) == [1] and out.num_rows == 1
    assert st.pop_counters()["trace_late_spans"] == 1
    assert st.pending_traces == 1


def test_on_complete_gets_assembled_traces(clock):
    got: list[TraceSet] = []
    st = make(clock, on_complete=got.append)
    b = generate(400, WorkloadConfig(seed=2))
    st.process(b)
    clock[0] = 2.0
    out = st.poll()
    assert out.num_rows == b.num_rows
    assert len(got) == 1 and got[0].spans.num_rows == b.num_rows
    assert got[0].critical_paths().num_rows > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="idle_timeout"):
        TraceCompletion(idle_timeout=0)
    with pytest.raises(ValueError, match="max_traces"):
        TraceCompletion(max_traces=1.5)
    with pytest.raises(ValueError, match="on_complete"):
        TraceCompletion(on_complete=3)


def test_in_a_pipeline_flush_at_shutdown(pipeline_factory):
    sink = knhk.InMemoryExporter()
    st = TraceCompletion(idle_timeout=60.0, max_wait=60.0)
    p = pipeline_factory(lambda b: b.with_batch_size(4).with_stage(st).with_exporter(sink))
    spans = [sp(t, j, None if j == 1 else 1) for t in range(1, 4) for j in range(1, 4)]
    for s in spans:
        assert p.record_span(s)
    assert p.shutdown()
    got = sink.spans()
    assert got.num_rows == 9 and traces_of(got) == [1, 2, 3]
    # Released a whole trace at a time: each trace's spans are adjacent.
    tids = got.column("trace_id").to_pylist()
    assert sum(a != b for a, b in itertools.pairwise(tids)) == 2


def test_in_a_pipeline_poll_when_idle(pipeline_factory):
    sink = knhk.InMemoryExporter()
    st = TraceCompletion(idle_timeout=0.05, max_wait=5.0)
    p = pipeline_factory(lambda b: b.with_batch_size(2).with_flush_interval(0.02)
                         .with_stage(st).with_exporter(sink))
    for s in [sp(1, 1), sp(1, 2, 1)]:
        assert p.record_span(s)
    deadline = time.monotonic() + 5.0
    while sink.spans().num_rows < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sink.spans().num_rows == 2
    assert np.all(np.array(traces_of(sink.spans())) == 1)
