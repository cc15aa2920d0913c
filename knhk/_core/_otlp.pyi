"""Stubs of the OTLP wire codec for traces and metrics (_otlp.pyx); comments give C types."""

import numpy as np
import numpy.typing as npt
import pyarrow as pa

class DecodeError(ValueError):
    offset: int  # Py_ssize_t: byte offset of the first fault

def decode_traces(
    buf: npt.NDArray[np.uint8],  # const uint8_t[::1]: the serialized request
    max_depth: int,  # int: deepest AnyValue nesting accepted
    default_service: bytes,  # UTF-8 service of resources without service.name
    schema: pa.Schema,  # knhk.SPAN_SCHEMA: the layout the buffers are built in
) -> pa.RecordBatch:
    """The request as one record batch, imported through the Arrow C data interface."""

def encode_traces(
    batch: pa.RecordBatch,  # in knhk.SPAN_SCHEMA, exported through the C data interface
) -> bytes: ...

def decode_metrics(
    buf: npt.NDArray[np.uint8],  # const uint8_t[::1]: the serialized request
    max_depth: int,  # int: deepest AnyValue nesting accepted
    default_service: bytes,  # UTF-8 service of resources without service.name
    schema: pa.Schema,  # knhk.METRIC_SCHEMA
) -> tuple[pa.RecordBatch, int]:
    """(the points, Py_ssize_t count of Summary / ExponentialHistogram points skipped)."""

def encode_metrics(
    batch: pa.RecordBatch,  # in knhk.METRIC_SCHEMA, exported through the C data interface
) -> bytes: ...
