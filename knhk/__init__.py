"""knhk: a real-time telemetry engine over Arrow batches, with a Cython core.

>>> import knhk
>>> sink = knhk.InMemoryExporter()
>>> with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
...     pipeline.record_span(knhk.Span("GET /", trace_id=1, span_id=1,
...                                    attributes={"http.request.method": "GET"}))
True
>>> sink.spans().num_rows
1
"""

from knhk._enums import BackpressureStrategy, DropReason, SpanKind, SpanStatus
from knhk.batch import MetricBatch, SpanBatch
from knhk.errors import (
    BuildError,
    CorruptFileError,
    KnhkError,
    PipelineClosedError,
    RegistryError,
    SchemaError,
)
from knhk.exporters import Exporter, ExportResult, InMemoryExporter
from knhk.pipeline import (
    EventStream,
    PipelineBuilder,
    PipelineStats,
    StageResult,
    TelemetryPipeline,
)
from knhk.sampling import (
    AdaptivePrioritySampler,
    AdaptiveSamplingStrategy,
    AlwaysOff,
    AlwaysOn,
    ParentBased,
    Sampler,
    SamplingConfig,
    SamplingDecision,
    TraceIdRatio,
    adjusted_counts,
    reweighted_sum,
    sampler_from_env,
    sampling_probability,
)
from knhk.schema import (
    METRIC_SCHEMA,
    SPAN_SCHEMA,
    AttributeValue,
    AttrType,
    MetricKind,
    MetricPoint,
    Span,
    SpanEvent,
    SpanLink,
    Temporality,
)
from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig
from knhk.tracing import (
    CriticalPath,
    CriticalPathSection,
    Trace,
    TraceAssembler,
    TraceCompletion,
    critical_paths,
)
from knhk.validation import (
    BatchValidationReport,
    ValidationPolicy,
    ValidationResult,
    WeaverValidator,
)

__version__ = "0.1.0"

__all__ = [
    "METRIC_SCHEMA",
    "SPAN_SCHEMA",
    "AdaptivePrioritySampler",
    "AdaptiveSamplingStrategy",
    "AlwaysOff",
    "AlwaysOn",
    "AttrType",
    "AttributeValue",
    "BackpressureStrategy",
    "BatchValidationReport",
    "BuildError",
    "CorruptFileError",
    "CriticalPath",
    "CriticalPathSection",
    "DropReason",
    "EventStream",
    "ExportResult",
    "Exporter",
    "InMemoryExporter",
    "KnhkError",
    "MetricBatch",
    "MetricKind",
    "MetricPoint",
    "ParentBased",
    "PipelineBuilder",
    "PipelineClosedError",
    "PipelineStats",
    "Policy",
    "RegistryError",
    "Sampler",
    "SamplingConfig",
    "SamplingDecision",
    "SchemaError",
    "Span",
    "SpanBatch",
    "SpanEvent",
    "SpanKind",
    "SpanLink",
    "SpanStatus",
    "StageResult",
    "TailSampler",
    "TailSamplingConfig",
    "TelemetryPipeline",
    "Temporality",
    "Trace",
    "TraceAssembler",
    "TraceCompletion",
    "TraceIdRatio",
    "ValidationPolicy",
    "ValidationResult",
    "WeaverValidator",
    "__version__",
    "adjusted_counts",
    "critical_paths",
    "reweighted_sum",
    "sampler_from_env",
    "sampling_probability",
]
