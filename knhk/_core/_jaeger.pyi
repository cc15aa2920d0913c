"""Stubs of the Jaeger agent wire encoder (knhk/_core/_jaeger.pyx); comments give the C types."""

from typing import Any

import numpy as np
import numpy.typing as npt

def encode_batch(
    cols: dict[str, Any],  # column buffers as knhk.exporters.jaeger._columns prepares them:
    # fixed-width columns as contiguous NumPy arrays (const uint8_t* / int8_t* / int32_t* /
    # int64_t* / uint32_t* / double*), strings as (int32 indices or None, int32 offsets,
    # uint8 data), attribute lists as dicts of those plus "list_off" (const int32_t*)
    max_packet: int,  # Py_ssize_t: no datagram is longer (>= 144)
    seq_no: int,  # int64_t: Batch.seqNo of the first datagram
) -> tuple[
    bytes,  # the datagrams back to back
    npt.NDArray[np.int64],  # offsets: datagram k is data[offsets[k]:offsets[k + 1]]
    npt.NDArray[np.int64],  # spans in each datagram
    dict[str, int],  # spans_truncated, values_truncated, spans_dropped_too_large,
    # processes_truncated
]: ...
