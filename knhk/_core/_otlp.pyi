"""Stubs of the OTLP trace wire codec (knhk/_core/_otlp.pyx); comments give the C types."""

from typing import Any

import numpy as np
import numpy.typing as npt

class DecodeError(ValueError):
    offset: int  # Py_ssize_t: byte offset of the first fault

def decode_traces(
    buf: npt.NDArray[np.uint8],  # const uint8_t[::1]: the serialized request
    max_depth: int = ...,  # int: deepest AnyValue nesting accepted
) -> dict[str, Any]:
    """Column buffers: int32 offsets + uint8 data for strings, fixed-width arrays otherwise."""

def encode_traces(
    cols: dict[str, Any],  # the same buffers (strings optionally with int32 indices, -1 = null)
) -> bytes: ...
