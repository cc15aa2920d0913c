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
from knhk.analysis import Dataset, open_dataset
from knhk.batch import MetricBatch, SpanBatch
from knhk.errors import (
    BatchTooLargeError,
    BuildError,
    CorruptFileError,
    KnhkError,
    PipelineClosedError,
    RegistryError,
    SchemaError,
)
from knhk.exporters import (
    Exporter,
    ExportResult,
    InMemoryExporter,
    IpcExporter,
    JaegerExporter,
    LoadBalancingExporter,
    PrometheusExporter,
)
from knhk.memory_limiter import MemoryLimiter
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
from knhk.stream import (
    CepAction,
    CepPattern,
    CepRule,
    DDSketch,
    Matcher,
    StreamProcessor,
    WindowConfig,
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

#: ``knhk.open("knhk-data/*.arrow")``: a recording as a :class:`Dataset`. Not in
#: ``__all__``, so ``from knhk import *`` leaves the built-in ``open`` alone.
open = open_dataset

# OTLP pulls in grpcio and protobuf (~0.2 s): imported on first use, not with knhk.
_LAZY = {
    "OtlpConfig": "knhk.exporters.otlp",
    "OtlpExporter": "knhk.exporters.otlp",
    "RetryConfig": "knhk.exporters._retry",
    "KnhkSpanProcessor": "knhk.otel",
    "KnhkSpanExporter": "knhk.otel",
    "OtlpGrpcReceiver": "knhk.receivers",
    "OtlpHttpReceiver": "knhk.receivers",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'knhk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

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
    "BatchTooLargeError",
    "BatchValidationReport",
    "BuildError",
    "CepAction",
    "CepPattern",
    "CepRule",
    "CorruptFileError",
    "CriticalPath",
    "CriticalPathSection",
    "DDSketch",
    "Dataset",
    "DropReason",
    "EventStream",
    "ExportResult",
    "Exporter",
    "InMemoryExporter",
    "IpcExporter",
    "JaegerExporter",
    "KnhkError",
    "KnhkSpanExporter",
    "KnhkSpanProcessor",
    "LoadBalancingExporter",
    "Matcher",
    "MemoryLimiter",
    "MetricBatch",
    "MetricKind",
    "MetricPoint",
    "OtlpConfig",
    "OtlpExporter",
    "OtlpGrpcReceiver",
    "OtlpHttpReceiver",
    "ParentBased",
    "PipelineBuilder",
    "PipelineClosedError",
    "PipelineStats",
    "Policy",
    "PrometheusExporter",
    "RegistryError",
    "RetryConfig",
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
    "StreamProcessor",
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
    "WindowConfig",
    "__version__",
    "adjusted_counts",
    "critical_paths",
    "reweighted_sum",
    "sampler_from_env",
    "sampling_probability",
]
