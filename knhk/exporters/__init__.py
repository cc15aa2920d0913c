"""Exporters: where batches leave knhk."""

from knhk.exporters.base import Exporter, ExporterStats, ExportResult
from knhk.exporters.memory import InMemoryExporter

__all__ = ["ExportResult", "Exporter", "ExporterStats", "InMemoryExporter"]
