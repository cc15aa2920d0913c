"""OTLP receivers: servers that decode OTLP requests into a knhk pipeline.

``OtlpGrpcReceiver`` serves OTLP/gRPC (default ``localhost:4317``),
``OtlpHttpReceiver`` OTLP/HTTP with binary protobuf (default ``localhost:4318``).

Example
-------
>>> import knhk
>>> from knhk.receivers import OtlpGrpcReceiver
>>> pipeline = knhk.TelemetryPipeline.builder().build()
>>> receiver = OtlpGrpcReceiver(pipeline, endpoint="localhost:0").start()
>>> receiver.stop(); pipeline.shutdown()
True
"""

from knhk.receivers.grpc import OtlpGrpcReceiver
from knhk.receivers.http import OtlpHttpReceiver

__all__ = ["OtlpGrpcReceiver", "OtlpHttpReceiver"]
