# The growable byte buffer the wire codecs append to (_otlp's decoder columns,
# _jaeger's scratch encodings). Every function returns -1 when realloc fails and
# leaves the buffer as it was, so a caller can free it and report the failure.
#
#     cdef Vec v                       # zeroed: no allocation until first use
#     memset(&v, 0, sizeof(Vec))
#     if put_i32(&v, 7) < 0: ...       # checked append
#     vec_free(&v)
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy


cdef struct Vec:
    char* p
    Py_ssize_t n      # bytes written
    Py_ssize_t cap    # bytes allocated


cdef inline int vec_grow(Vec* v, Py_ssize_t extra) noexcept nogil:
    # Doubling from 1 KiB: amortised O(1) appends, and small buffers (one per
    # column of a decoded request) stay a single allocation.
    cdef Py_ssize_t cap = v.cap * 2 if v.cap else 1024
    cdef char* q
    while cap < v.n + extra:
        cap *= 2
    q = <char*>realloc(v.p, cap)
    if q == NULL:
        return -1
    v.p = q
    v.cap = cap
    return 0


cdef inline int vec_reserve(Vec* v, Py_ssize_t extra) noexcept nogil:
    # The fast path is one compare, so callers can reserve per field.
    if v.n + extra <= v.cap:
        return 0
    return vec_grow(v, extra)


cdef inline int vec_put(Vec* v, const void* src, Py_ssize_t k) noexcept nogil:
    if vec_reserve(v, k) < 0:
        return -1
    if k:
        memcpy(v.p + v.n, src, k)
    v.n += k
    return 0


cdef inline int put_i32(Vec* v, int32_t x) noexcept nogil:
    if v.n + 4 > v.cap and vec_grow(v, 4) < 0:
        return -1
    (<int32_t*>(v.p + v.n))[0] = x
    v.n += 4
    return 0


cdef inline int put_u32(Vec* v, uint32_t x) noexcept nogil:
    if v.n + 4 > v.cap and vec_grow(v, 4) < 0:
        return -1
    (<uint32_t*>(v.p + v.n))[0] = x
    v.n += 4
    return 0


cdef inline int put_i64(Vec* v, int64_t x) noexcept nogil:
    if v.n + 8 > v.cap and vec_grow(v, 8) < 0:
        return -1
    memcpy(v.p + v.n, &x, 8)
    v.n += 8
    return 0


cdef inline int put_f64(Vec* v, double x) noexcept nogil:
    if v.n + 8 > v.cap and vec_grow(v, 8) < 0:
        return -1
    memcpy(v.p + v.n, &x, 8)
    v.n += 8
    return 0


cdef inline int put_u8(Vec* v, uint8_t x) noexcept nogil:
    if v.n + 1 > v.cap and vec_grow(v, 1) < 0:
        return -1
    v.p[v.n] = <char>x
    v.n += 1
    return 0


cdef inline void vec_free(Vec* v) noexcept nogil:
    free(v.p)
    v.p = NULL
    v.n = 0
    v.cap = 0
