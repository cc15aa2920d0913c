from knhk._core._types cimport int8_t, int64_t, uint32_t


cdef class Span:
    cdef readonly str name
    cdef readonly bytes trace_id
    cdef readonly bytes span_id
    cdef readonly object parent_span_id
    cdef readonly dict attributes
    cdef readonly int64_t start_time_ns
    cdef readonly int64_t end_time_ns
    cdef int8_t _kind
    cdef int8_t _status
    cdef readonly object status_message
    cdef readonly object service
    cdef readonly list events
    cdef readonly list links
    cdef readonly object trace_state
    cdef readonly uint32_t flags
    cdef readonly dict resource_attributes
    cdef readonly object scope_name
    cdef readonly object scope_version

    cdef int _setup(self, str name, object trace_id, object span_id, object parent_span_id,
                    object attributes, object duration_ns, object status,
                    object start_time_ns, object end_time_ns, object kind, object service,
                    object events, object links, object status_message,
                    object trace_state, object flags, object resource_attributes,
                    object scope_name, object scope_version) except -1


cdef class SpanEvent:
    cdef readonly str name
    cdef readonly int64_t time_ns
    cdef readonly dict attributes
    cdef readonly uint32_t dropped_attributes_count


cdef class SpanLink:
    cdef readonly bytes trace_id
    cdef readonly bytes span_id
    cdef readonly object trace_state
    cdef readonly uint32_t flags
    cdef readonly dict attributes
    cdef readonly uint32_t dropped_attributes_count


cdef bytes normalize_id(object value, Py_ssize_t size, str field)
