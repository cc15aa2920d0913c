# Shared C types of knhk's kernels.
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t

ctypedef int64_t time_ns_t
ctypedef int32_t dict_index_t

# Drop reasons: indices into the ring buffer's counters (mirrors knhk._enums.DropReason).
cdef enum:
    DROP_QUEUE_FULL = 0
    DROP_OLDEST = 1
    DROP_BLOCK_TIMEOUT = 2
    DROP_ADAPTIVE = 3
    DROP_SHUTDOWN = 4
    DROP_INVALID = 5
    N_DROP_REASONS = 6

# Backpressure strategies (mirrors knhk._enums.BackpressureStrategy).
cdef enum:
    BP_DROP_OLDEST = 0
    BP_DROP_NEWEST = 1
    BP_BLOCK = 2
    BP_ADAPTIVE = 3

# Attribute type tags (mirrors knhk.schema.AttrType; OTLP AnyValue field numbers).
cdef enum:
    ATTR_EMPTY = 0
    ATTR_STRING = 1
    ATTR_BOOL = 2
    ATTR_INT = 3
    ATTR_DOUBLE = 4
    ATTR_ARRAY = 5
    ATTR_KVLIST = 6
    ATTR_BYTES = 7
