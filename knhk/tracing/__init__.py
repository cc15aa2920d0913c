"""Trace analysis: assembly, Jaeger-compatible critical paths, call graphs, breakdowns.

- :mod:`knhk.tracing.assembler`: :func:`assemble` (every trace of some spans at
  once), :class:`TraceSet`, :class:`Trace`, :class:`TraceAssembler`,
  :func:`critical_paths`, :func:`latency_breakdown`, :func:`service_call_graph`.
- :mod:`knhk.tracing.completion`: :class:`TraceCompletion`, a pipeline stage
  that holds spans until their trace is complete and then passes the whole
  trace on.

Example
-------
>>> import knhk
>>> from knhk.tracing import critical_paths
>>> table = critical_paths(knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=1, start_time_ns=0, duration_ns=100),
...     knhk.Span("db", trace_id=1, span_id=2, parent_span_id=1, start_time_ns=10,
...               duration_ns=50),
... ]))
>>> list(zip(table.column("section_start").to_pylist(), table.column("section_end").to_pylist()))
[(60, 100), (10, 60), (0, 10)]
"""

from knhk.tracing.assembler import (
    CriticalPath,
    CriticalPathSection,
    Trace,
    TraceAssembler,
    TraceSet,
    assemble,
    critical_paths,
    latency_breakdown,
    service_call_graph,
    service_graph_metrics,
)
from knhk.tracing.completion import TraceCompletion

__all__ = [
    "CriticalPath",
    "CriticalPathSection",
    "Trace",
    "TraceAssembler",
    "TraceCompletion",
    "TraceSet",
    "assemble",
    "critical_paths",
    "latency_breakdown",
    "service_call_graph",
    "service_graph_metrics",
]
