"""Exporters: where batches leave knhk."""

from knhk.exporters.base import Exporter, ExporterStats, ExportResult
from knhk.exporters.ipc import IpcExporter
from knhk.exporters.jaeger import JaegerExporter
from knhk.exporters.loadbalancing import (
    DnsResolver,
    FileResolver,
    LoadBalancingExporter,
    StaticResolver,
)
from knhk.exporters.memory import InMemoryExporter
from knhk.exporters.prometheus import PrometheusExporter

__all__ = [
    "DnsResolver",
    "ExportResult",
    "Exporter",
    "ExporterStats",
    "FileResolver",
    "InMemoryExporter",
    "IpcExporter",
    "JaegerExporter",
    "LoadBalancingExporter",
    "OtlpConfig",
    "OtlpExporter",
    "PrometheusExporter",
    "RetryConfig",
    "StaticResolver",
]


def __getattr__(name: str):
    # the OTLP exporter pulls in grpcio and protobuf: imported on first use
    if name in ("OtlpConfig", "OtlpExporter"):
        from knhk.exporters import otlp

        return getattr(otlp, name)
    if name == "RetryConfig":
        from knhk.exporters._retry import RetryConfig

        return RetryConfig
    raise AttributeError(f"module 'knhk.exporters' has no attribute {name!r}")
