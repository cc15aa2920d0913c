# cython: freethreading_compatible = False
"""OTLP protobuf wire codec for traces: ExportTraceServiceRequest <-> column buffers.

The decoder walks the wire bytes once (recursive descent over the five message
levels) and appends every field to growable C buffers; the encoder writes
varints and length-delimited fields straight from column buffers. Neither
creates a Python object per span. The Python layer (``knhk.otlp``) turns the
buffers into Arrow arrays and back.

Field numbers follow opentelemetry-proto ``trace/v1/trace.proto``,
``common/v1/common.proto`` and ``resource/v1/resource.proto``.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

import numpy as np

cimport numpy as cnp

cnp.import_array()


# -- growable byte buffer -----------------------------------------------------------

cdef struct Vec:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef inline int vec_reserve(Vec* v, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t cap
    cdef char* q
    if v.n + extra <= v.cap:
        return 0
    cap = v.cap * 2 if v.cap else 256
    while cap < v.n + extra:
        cap *= 2
    q = <char*>realloc(v.p, cap)
    if q == NULL:
        return -1
    v.p = q
    v.cap = cap
    return 0


cdef inline int vec_put(Vec* v, const void* src, Py_ssize_t k) noexcept nogil:
    if vec_reserve(v, k) < 0:
        return -1
    if k:
        memcpy(v.p + v.n, src, k)
    v.n += k
    return 0


cdef inline int put_i32(Vec* v, int32_t x) noexcept nogil:
    return vec_put(v, &x, 4)


cdef inline int put_u32(Vec* v, uint32_t x) noexcept nogil:
    return vec_put(v, &x, 4)


cdef inline int put_i64(Vec* v, int64_t x) noexcept nogil:
    return vec_put(v, &x, 8)


cdef inline int put_f64(Vec* v, double x) noexcept nogil:
    return vec_put(v, &x, 8)


cdef inline int put_u8(Vec* v, uint8_t x) noexcept nogil:
    return vec_put(v, &x, 1)


cdef inline void vec_free(Vec* v) noexcept nogil:
    free(v.p)
    v.p = NULL
    v.n = 0
    v.cap = 0


cdef object vec_array(Vec* v, object dtype):
    """Copy a buffer out as a NumPy array of ``dtype``."""
    cdef bytes b = PyBytes_FromStringAndSize(v.p, v.n)
    return np.frombuffer(b, dtype=dtype)


# -- strings: int32 offsets + data, as Arrow lays them out ----------------------------

cdef struct StrVec:
    Vec off
    Vec data


cdef inline int str_init(StrVec* s) noexcept nogil:
    return put_i32(&s.off, 0)


cdef inline int str_put(StrVec* s, const uint8_t* p, Py_ssize_t k) noexcept nogil:
    if vec_put(&s.data, p, k) < 0:
        return -1
    if s.data.n > 0x7FFFFFFF:
        return -1
    return put_i32(&s.off, <int32_t>s.data.n)


cdef inline void str_free(StrVec* s) noexcept nogil:
    vec_free(&s.off)
    vec_free(&s.data)


cdef object str_arrays(StrVec* s):
    return vec_array(&s.off, np.int32), vec_array(&s.data, np.uint8)


# -- attribute tables ----------------------------------------------------------------

cdef struct AttrVec:
    StrVec key
    Vec type        # int8 AttrType
    StrVec str
    Vec ival        # int64
    Vec dval        # float64
    Vec bval        # uint8
    StrVec bytes
    StrVec any
    Py_ssize_t n


cdef int attr_init(AttrVec* a) noexcept nogil:
    if str_init(&a.key) or str_init(&a.str) or str_init(&a.bytes) or str_init(&a.any):
        return -1
    return 0


cdef void attr_free(AttrVec* a) noexcept nogil:
    str_free(&a.key)
    vec_free(&a.type)
    str_free(&a.str)
    vec_free(&a.ival)
    vec_free(&a.dval)
    vec_free(&a.bval)
    str_free(&a.bytes)
    str_free(&a.any)


cdef dict attr_arrays(AttrVec* a):
    return {
        "key": str_arrays(&a.key),
        "type": vec_array(&a.type, np.int8),
        "str": str_arrays(&a.str),
        "int": vec_array(&a.ival, np.int64),
        "double": vec_array(&a.dval, np.float64),
        "bool": vec_array(&a.bval, np.uint8),
        "bytes": str_arrays(&a.bytes),
        "any": str_arrays(&a.any),
    }


# -- decoder -------------------------------------------------------------------------

cdef struct Dec:
    # spans
    Vec trace_id
    Vec span_id
    Vec parent
    Vec parent_valid
    StrVec trace_state
    Vec flags
    StrVec name
    Vec kind
    Vec start
    Vec end
    Vec status_code
    StrVec status_message
    Vec attr_off
    Vec dropped_attrs
    Vec event_off
    Vec dropped_events
    Vec link_off
    Vec dropped_links
    Vec resource_ix
    Vec scope_ix
    AttrVec attrs
    # events
    Vec ev_time
    StrVec ev_name
    Vec ev_attr_off
    Vec ev_dropped
    AttrVec ev_attrs
    # links
    Vec ln_trace_id
    Vec ln_span_id
    StrVec ln_trace_state
    Vec ln_flags
    Vec ln_attr_off
    Vec ln_dropped
    AttrVec ln_attrs
    # resources
    Vec res_attr_off
    Vec res_dropped
    StrVec res_schema_url
    StrVec res_service
    AttrVec res_attrs
    # scopes
    StrVec sc_name
    StrVec sc_version
    Vec sc_attr_off
    Vec sc_dropped
    StrVec sc_schema_url
    AttrVec sc_attrs
    Py_ssize_t n_spans
    Py_ssize_t n_events
    Py_ssize_t n_links
    Py_ssize_t n_resources
    Py_ssize_t n_scopes
    int max_depth
    # error report
    const char* err
    const char* where
    Py_ssize_t err_pos
    const uint8_t* base


cdef enum:
    WT_VARINT = 0
    WT_I64 = 1
    WT_LEN = 2
    WT_I32 = 5


cdef inline int fail(Dec* d, const char* msg, const char* where, const uint8_t* at) noexcept nogil:
    if d.err == NULL:
        d.err = msg
        d.where = where
        d.err_pos = at - d.base
    return -1


cdef inline int rd_varint(Dec* d, const uint8_t** pp, const uint8_t* end, uint64_t* out,
                          const char* where) noexcept nogil:
    cdef const uint8_t* p = pp[0]
    cdef uint64_t r = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        if p >= end:
            return fail(d, "truncated varint", where, p)
        b = p[0]
        p += 1
        r |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            break
        shift += 7
        if shift >= 70:
            return fail(d, "varint longer than 10 bytes", where, p)
    pp[0] = p
    out[0] = r
    return 0


cdef inline int rd_tag(Dec* d, const uint8_t** pp, const uint8_t* end, uint32_t* field,
                       int* wt, const char* where) noexcept nogil:
    cdef uint64_t t
    cdef const uint8_t* at = pp[0]
    if rd_varint(d, pp, end, &t, where) < 0:
        return -1
    field[0] = <uint32_t>(t >> 3)
    wt[0] = <int>(t & 7)
    if field[0] == 0 or t >> 32:
        return fail(d, "invalid field number 0 or above 2**29", where, at)
    if wt[0] != WT_VARINT and wt[0] != WT_I64 and wt[0] != WT_LEN and wt[0] != WT_I32:
        return fail(d, "unsupported wire type (groups or 6/7)", where, at)
    return 0


cdef inline int rd_len(Dec* d, const uint8_t** pp, const uint8_t* end,
                       const uint8_t** sub, Py_ssize_t* n, const char* where) noexcept nogil:
    cdef uint64_t k
    cdef const uint8_t* at = pp[0]
    if rd_varint(d, pp, end, &k, where) < 0:
        return -1
    if k > <uint64_t>(end - pp[0]):
        return fail(d, "length-delimited field runs past the end of its message", where, at)
    sub[0] = pp[0]
    n[0] = <Py_ssize_t>k
    pp[0] += k
    return 0


cdef inline int rd_fixed64(Dec* d, const uint8_t** pp, const uint8_t* end, uint64_t* out,
                           const char* where) noexcept nogil:
    if end - pp[0] < 8:
        return fail(d, "truncated fixed64", where, pp[0])
    memcpy(out, pp[0], 8)
    pp[0] += 8
    return 0


cdef inline int rd_fixed32(Dec* d, const uint8_t** pp, const uint8_t* end, uint32_t* out,
                           const char* where) noexcept nogil:
    if end - pp[0] < 4:
        return fail(d, "truncated fixed32", where, pp[0])
    memcpy(out, pp[0], 4)
    pp[0] += 4
    return 0


cdef inline int skip(Dec* d, const uint8_t** pp, const uint8_t* end, int wt,
                     const char* where) noexcept nogil:
    cdef uint64_t v
    cdef const uint8_t* s
    cdef Py_ssize_t k
    if wt == WT_VARINT:
        return rd_varint(d, pp, end, &v, where)
    if wt == WT_I64:
        return rd_fixed64(d, pp, end, &v, where)
    if wt == WT_LEN:
        return rd_len(d, pp, end, &s, &k, where)
    return rd_fixed32(d, pp, end, <uint32_t*>&v, where)


cdef inline bint wt_ok(uint32_t f, int wt) noexcept nogil:
    # the wire type each AnyValue oneof case must have
    if f == 1 or f == 5 or f == 6 or f == 7:
        return wt == WT_LEN
    if f == 2 or f == 3:
        return wt == WT_VARINT
    if f == 4:
        return wt == WT_I64
    return False


cdef int check_list(Dec* d, const uint8_t* p, const uint8_t* end, int depth,
                    bint kv) noexcept nogil:
    """An ArrayValue (``kv`` false) or KeyValueList: validate every nested value."""
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef const uint8_t* s
    cdef const uint8_t* e
    cdef const uint8_t* v
    cdef Py_ssize_t k, k2
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ArrayValue") < 0:
            return -1
        if f != 1 or wt != WT_LEN:
            if skip(d, &p, end, wt, "ArrayValue") < 0:
                return -1
            continue
        if rd_len(d, &p, end, &s, &k, "ArrayValue") < 0:
            return -1
        e = s + k
        if not kv:
            if check_any(d, s, e, depth + 1) < 0:
                return -1
            continue
        while s < e:
            if rd_tag(d, &s, e, &f2, &wt2, "KeyValue") < 0:
                return -1
            if f2 == 2 and wt2 == WT_LEN:
                if rd_len(d, &s, e, &v, &k2, "KeyValue") < 0:
                    return -1
                if check_any(d, v, v + k2, depth + 1) < 0:
                    return -1
            elif skip(d, &s, e, wt2, "KeyValue") < 0:
                return -1
    return 0


cdef int check_any(Dec* d, const uint8_t* p, const uint8_t* end, int depth) noexcept nogil:
    """Validate a nested AnyValue, refusing nesting deeper than ``d.max_depth``."""
    cdef uint32_t f
    cdef int wt
    cdef const uint8_t* s
    cdef Py_ssize_t k
    if depth > d.max_depth:
        return fail(d, "AnyValue nested deeper than the limit", "AnyValue", p)
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "AnyValue") < 0:
            return -1
        if (f == 5 or f == 6) and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "AnyValue") < 0:
                return -1
            if check_list(d, s, s + k, depth, f == 6) < 0:
                return -1
        elif skip(d, &p, end, wt, "AnyValue") < 0:
            return -1
    return 0


cdef int parse_kv(Dec* d, AttrVec* a, const uint8_t* p, const uint8_t* end,
                  const char* where) noexcept nogil:
    """One KeyValue into the attribute table ``a``."""
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef const uint8_t* key = NULL
    cdef Py_ssize_t key_n = 0
    cdef const uint8_t* vp = NULL
    cdef Py_ssize_t vn = 0
    cdef const uint8_t* q
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef const uint8_t* sp = NULL
    cdef Py_ssize_t sn = 0
    cdef const uint8_t* bp = NULL
    cdef Py_ssize_t bn = 0
    cdef int typ = 0
    cdef uint64_t u = 0
    cdef int64_t ival = 0
    cdef double dval = 0.0
    cdef uint8_t bval = 0
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, where) < 0:
            return -1
        if f == 1 and wt == WT_LEN:
            if rd_len(d, &p, end, &key, &key_n, where) < 0:
                return -1
        elif f == 2 and wt == WT_LEN:
            if rd_len(d, &p, end, &vp, &vn, where) < 0:
                return -1
        elif skip(d, &p, end, wt, where) < 0:
            return -1
    if vp != NULL:
        q = vp
        while q < vp + vn:
            if rd_tag(d, &q, vp + vn, &f2, &wt2, "AnyValue") < 0:
                return -1
            if not wt_ok(f2, wt2):
                if skip(d, &q, vp + vn, wt2, "AnyValue") < 0:
                    return -1
                continue
            typ = f2
            if f2 == 1:
                if rd_len(d, &q, vp + vn, &sp, &sn, "AnyValue.string_value") < 0:
                    return -1
            elif f2 == 2:
                if rd_varint(d, &q, vp + vn, &u, "AnyValue.bool_value") < 0:
                    return -1
                bval = u != 0
            elif f2 == 3:
                if rd_varint(d, &q, vp + vn, &u, "AnyValue.int_value") < 0:
                    return -1
                ival = <int64_t>u
            elif f2 == 4:
                if rd_fixed64(d, &q, vp + vn, &u, "AnyValue.double_value") < 0:
                    return -1
                memcpy(&dval, &u, 8)
            elif f2 == 7:
                if rd_len(d, &q, vp + vn, &bp, &bn, "AnyValue.bytes_value") < 0:
                    return -1
            else:
                if rd_len(d, &q, vp + vn, &s, &k, "AnyValue") < 0:
                    return -1
                if check_list(d, s, s + k, 1, f2 == 6) < 0:
                    return -1
    if (str_put(&a.key, key, key_n) < 0 or put_u8(&a.type, <uint8_t>typ) < 0
            or str_put(&a.str, sp, sn if typ == 1 else 0) < 0
            or put_i64(&a.ival, ival if typ == 3 else 0) < 0
            or put_f64(&a.dval, dval if typ == 4 else 0.0) < 0
            or put_u8(&a.bval, bval if typ == 2 else 0) < 0
            or str_put(&a.bytes, bp, bn if typ == 7 else 0) < 0
            or str_put(&a.any, vp, vn if (typ == 5 or typ == 6) else 0) < 0):
        return fail(d, "out of memory", where, p)
    a.n += 1
    return 0


cdef inline int check_id(Dec* d, Py_ssize_t n, Py_ssize_t want, bint optional,
                         const char* msg, const char* where, const uint8_t* at) noexcept nogil:
    if n == want or (optional and n == 0):
        return 0
    return fail(d, msg, where, at)


cdef int parse_event(Dec* d, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u = 0
    cdef uint64_t t = 0
    cdef uint32_t dropped = 0
    cdef const uint8_t* name = NULL
    cdef Py_ssize_t name_n = 0
    cdef const uint8_t* s
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "Span.Event") < 0:
            return -1
        if f == 1 and wt == WT_I64:
            if rd_fixed64(d, &p, end, &t, "Span.Event.time_unix_nano") < 0:
                return -1
        elif f == 2 and wt == WT_LEN:
            if rd_len(d, &p, end, &name, &name_n, "Span.Event.name") < 0:
                return -1
        elif f == 3 and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "Span.Event.attributes") < 0:
                return -1
            if parse_kv(d, &d.ev_attrs, s, s + k, "Span.Event.attributes") < 0:
                return -1
        elif f == 4 and wt == WT_VARINT:
            if rd_varint(d, &p, end, &u, "Span.Event.dropped_attributes_count") < 0:
                return -1
            dropped = <uint32_t>u
        elif skip(d, &p, end, wt, "Span.Event") < 0:
            return -1
    if (put_i64(&d.ev_time, <int64_t>t) < 0 or str_put(&d.ev_name, name, name_n) < 0
            or put_i32(&d.ev_attr_off, <int32_t>d.ev_attrs.n) < 0
            or put_u32(&d.ev_dropped, dropped) < 0):
        return fail(d, "out of memory", "Span.Event", p)
    d.n_events += 1
    return 0


cdef int parse_link(Dec* d, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u = 0
    cdef uint32_t dropped = 0
    cdef uint32_t flags = 0
    cdef const uint8_t* tid = NULL
    cdef Py_ssize_t tid_n = 0
    cdef const uint8_t* sid = NULL
    cdef Py_ssize_t sid_n = 0
    cdef const uint8_t* ts = NULL
    cdef Py_ssize_t ts_n = 0
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef const uint8_t* start = p
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "Span.Link") < 0:
            return -1
        if f == 1 and wt == WT_LEN:
            if rd_len(d, &p, end, &tid, &tid_n, "Span.Link.trace_id") < 0:
                return -1
        elif f == 2 and wt == WT_LEN:
            if rd_len(d, &p, end, &sid, &sid_n, "Span.Link.span_id") < 0:
                return -1
        elif f == 3 and wt == WT_LEN:
            if rd_len(d, &p, end, &ts, &ts_n, "Span.Link.trace_state") < 0:
                return -1
        elif f == 4 and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "Span.Link.attributes") < 0:
                return -1
            if parse_kv(d, &d.ln_attrs, s, s + k, "Span.Link.attributes") < 0:
                return -1
        elif f == 5 and wt == WT_VARINT:
            if rd_varint(d, &p, end, &u, "Span.Link.dropped_attributes_count") < 0:
                return -1
            dropped = <uint32_t>u
        elif f == 6 and wt == WT_I32:
            if rd_fixed32(d, &p, end, &flags, "Span.Link.flags") < 0:
                return -1
        elif skip(d, &p, end, wt, "Span.Link") < 0:
            return -1
    if check_id(d, tid_n, 16, False, "trace_id must be 16 bytes", "Span.Link.trace_id",
                start) < 0:
        return -1
    if check_id(d, sid_n, 8, False, "span_id must be 8 bytes", "Span.Link.span_id",
                start) < 0:
        return -1
    if (vec_put(&d.ln_trace_id, tid, 16) < 0 or vec_put(&d.ln_span_id, sid, 8) < 0
            or str_put(&d.ln_trace_state, ts, ts_n) < 0 or put_u32(&d.ln_flags, flags) < 0
            or put_i32(&d.ln_attr_off, <int32_t>d.ln_attrs.n) < 0
            or put_u32(&d.ln_dropped, dropped) < 0):
        return fail(d, "out of memory", "Span.Link", p)
    d.n_links += 1
    return 0


cdef int parse_span(Dec* d, const uint8_t* p, const uint8_t* end, int32_t res_ix,
                    int32_t sc_ix) noexcept nogil:
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef uint64_t u = 0
    cdef uint64_t t0 = 0
    cdef uint64_t t1 = 0
    cdef uint64_t kind = 0
    cdef uint64_t code = 0
    cdef uint32_t flags = 0
    cdef uint32_t dropped_a = 0
    cdef uint32_t dropped_e = 0
    cdef uint32_t dropped_l = 0
    cdef const uint8_t* tid = NULL
    cdef Py_ssize_t tid_n = 0
    cdef const uint8_t* sid = NULL
    cdef Py_ssize_t sid_n = 0
    cdef const uint8_t* par = NULL
    cdef Py_ssize_t par_n = 0
    cdef const uint8_t* ts = NULL
    cdef Py_ssize_t ts_n = 0
    cdef const uint8_t* name = NULL
    cdef Py_ssize_t name_n = 0
    cdef const uint8_t* msg = NULL
    cdef Py_ssize_t msg_n = 0
    cdef const uint8_t* s
    cdef const uint8_t* q
    cdef Py_ssize_t k
    cdef const uint8_t* start = p
    cdef int64_t kind_s, code_s
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "Span") < 0:
            return -1
        if wt == WT_LEN and (f <= 5 or f == 9 or f == 11 or f == 13 or f == 15):
            if rd_len(d, &p, end, &s, &k, "Span") < 0:
                return -1
            if f == 1:
                tid, tid_n = s, k
            elif f == 2:
                sid, sid_n = s, k
            elif f == 3:
                ts, ts_n = s, k
            elif f == 4:
                par, par_n = s, k
            elif f == 5:
                name, name_n = s, k
            elif f == 9:
                if parse_kv(d, &d.attrs, s, s + k, "Span.attributes") < 0:
                    return -1
            elif f == 11:
                if parse_event(d, s, s + k) < 0:
                    return -1
            elif f == 13:
                if parse_link(d, s, s + k) < 0:
                    return -1
            else:
                q = s
                while q < s + k:
                    if rd_tag(d, &q, s + k, &f2, &wt2, "Status") < 0:
                        return -1
                    if f2 == 2 and wt2 == WT_LEN:
                        if rd_len(d, &q, s + k, &msg, &msg_n, "Status.message") < 0:
                            return -1
                    elif f2 == 3 and wt2 == WT_VARINT:
                        if rd_varint(d, &q, s + k, &code, "Status.code") < 0:
                            return -1
                    elif skip(d, &q, s + k, wt2, "Status") < 0:
                        return -1
        elif wt == WT_VARINT and (f == 6 or f == 10 or f == 12 or f == 14):
            if rd_varint(d, &p, end, &u, "Span") < 0:
                return -1
            if f == 6:
                kind = u
            elif f == 10:
                dropped_a = <uint32_t>u
            elif f == 12:
                dropped_e = <uint32_t>u
            else:
                dropped_l = <uint32_t>u
        elif wt == WT_I64 and f == 7:
            if rd_fixed64(d, &p, end, &t0, "Span.start_time_unix_nano") < 0:
                return -1
        elif wt == WT_I64 and f == 8:
            if rd_fixed64(d, &p, end, &t1, "Span.end_time_unix_nano") < 0:
                return -1
        elif wt == WT_I32 and f == 16:
            if rd_fixed32(d, &p, end, &flags, "Span.flags") < 0:
                return -1
        elif skip(d, &p, end, wt, "Span") < 0:
            return -1
    if check_id(d, tid_n, 16, False, "trace_id must be 16 bytes", "Span.trace_id",
                start) < 0:
        return -1
    if check_id(d, sid_n, 8, False, "span_id must be 8 bytes", "Span.span_id", start) < 0:
        return -1
    if check_id(d, par_n, 8, True, "parent_span_id must be empty or 8 bytes",
                "Span.parent_span_id", start) < 0:
        return -1
    # enums are int32 on the wire (negative ones sign-extended to 64 bits)
    kind_s = <int32_t>kind
    code_s = <int32_t>code
    if kind_s < -128 or kind_s > 127:
        return fail(d, "span kind out of the int8 range knhk stores", "Span.kind", start)
    if code_s < -128 or code_s > 127:
        return fail(d, "status code out of the int8 range knhk stores", "Status.code",
                    start)
    if (vec_put(&d.trace_id, tid, 16) < 0 or vec_put(&d.span_id, sid, 8) < 0
            or vec_put(&d.parent, par if par_n else <const uint8_t*>"\0\0\0\0\0\0\0\0", 8) < 0
            or put_u8(&d.parent_valid, par_n != 0) < 0
            or str_put(&d.trace_state, ts, ts_n) < 0 or put_u32(&d.flags, flags) < 0
            or str_put(&d.name, name, name_n) < 0 or put_u8(&d.kind, <uint8_t>kind_s) < 0
            or put_i64(&d.start, <int64_t>t0) < 0 or put_i64(&d.end, <int64_t>t1) < 0
            or put_u8(&d.status_code, <uint8_t>code_s) < 0
            or str_put(&d.status_message, msg, msg_n) < 0
            or put_i32(&d.attr_off, <int32_t>d.attrs.n) < 0
            or put_u32(&d.dropped_attrs, dropped_a) < 0
            or put_i32(&d.event_off, <int32_t>d.n_events) < 0
            or put_u32(&d.dropped_events, dropped_e) < 0
            or put_i32(&d.link_off, <int32_t>d.n_links) < 0
            or put_u32(&d.dropped_links, dropped_l) < 0
            or put_i32(&d.resource_ix, res_ix) < 0 or put_i32(&d.scope_ix, sc_ix) < 0):
        return fail(d, "out of memory", "Span", p)
    d.n_spans += 1
    return 0


cdef int parse_scope_spans(Dec* d, const uint8_t* p, const uint8_t* end,
                           int32_t res_ix) noexcept nogil:
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef uint64_t u = 0
    cdef uint32_t dropped = 0
    cdef const uint8_t* s
    cdef const uint8_t* q
    cdef const uint8_t* v
    cdef Py_ssize_t k, kv
    cdef const uint8_t* name = NULL
    cdef Py_ssize_t name_n = 0
    cdef const uint8_t* ver = NULL
    cdef Py_ssize_t ver_n = 0
    cdef const uint8_t* url = NULL
    cdef Py_ssize_t url_n = 0
    cdef int32_t sc_ix = <int32_t>d.n_scopes
    d.n_scopes += 1
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ScopeSpans") < 0:
            return -1
        if wt != WT_LEN or f > 3:
            if skip(d, &p, end, wt, "ScopeSpans") < 0:
                return -1
            continue
        if rd_len(d, &p, end, &s, &k, "ScopeSpans") < 0:
            return -1
        if f == 2:
            if parse_span(d, s, s + k, res_ix, sc_ix) < 0:
                return -1
        elif f == 3:
            url, url_n = s, k
        else:
            q = s
            while q < s + k:
                if rd_tag(d, &q, s + k, &f2, &wt2, "InstrumentationScope") < 0:
                    return -1
                if wt2 == WT_LEN and f2 <= 3:
                    if rd_len(d, &q, s + k, &v, &kv, "InstrumentationScope") < 0:
                        return -1
                    if f2 == 1:
                        name, name_n = v, kv
                    elif f2 == 2:
                        ver, ver_n = v, kv
                    elif parse_kv(d, &d.sc_attrs, v, v + kv,
                                  "InstrumentationScope.attributes") < 0:
                        return -1
                elif wt2 == WT_VARINT and f2 == 4:
                    if rd_varint(d, &q, s + k, &u, "InstrumentationScope") < 0:
                        return -1
                    dropped = <uint32_t>u
                elif skip(d, &q, s + k, wt2, "InstrumentationScope") < 0:
                    return -1
    if (str_put(&d.sc_name, name, name_n) < 0 or str_put(&d.sc_version, ver, ver_n) < 0
            or put_i32(&d.sc_attr_off, <int32_t>d.sc_attrs.n) < 0
            or put_u32(&d.sc_dropped, dropped) < 0
            or str_put(&d.sc_schema_url, url, url_n) < 0):
        return fail(d, "out of memory", "ScopeSpans", p)
    return 0


cdef int parse_resource_spans(Dec* d, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef uint32_t f, f2
    cdef int wt, wt2
    cdef uint64_t u = 0
    cdef uint32_t dropped = 0
    cdef const uint8_t* s
    cdef const uint8_t* q
    cdef const uint8_t* v
    cdef Py_ssize_t k, kv
    cdef const uint8_t* url = NULL
    cdef Py_ssize_t url_n = 0
    cdef int32_t res_ix = <int32_t>d.n_resources
    d.n_resources += 1
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ResourceSpans") < 0:
            return -1
        if wt != WT_LEN or f > 3:
            if skip(d, &p, end, wt, "ResourceSpans") < 0:
                return -1
            continue
        if rd_len(d, &p, end, &s, &k, "ResourceSpans") < 0:
            return -1
        if f == 2:
            if parse_scope_spans(d, s, s + k, res_ix) < 0:
                return -1
        elif f == 3:
            url, url_n = s, k
        else:
            q = s
            while q < s + k:
                if rd_tag(d, &q, s + k, &f2, &wt2, "Resource") < 0:
                    return -1
                if wt2 == WT_LEN and f2 == 1:
                    if rd_len(d, &q, s + k, &v, &kv, "Resource.attributes") < 0:
                        return -1
                    if parse_kv(d, &d.res_attrs, v, v + kv, "Resource.attributes") < 0:
                        return -1
                elif wt2 == WT_VARINT and f2 == 2:
                    if rd_varint(d, &q, s + k, &u, "Resource") < 0:
                        return -1
                    dropped = <uint32_t>u
                elif skip(d, &q, s + k, wt2, "Resource") < 0:
                    return -1
    # the resource's string service.name (last one wins), or empty
    cdef const int32_t* koff = <const int32_t*>d.res_attrs.key.off.p
    cdef const int32_t* soff = <const int32_t*>d.res_attrs.str.off.p
    cdef Py_ssize_t j
    cdef const uint8_t* svc = NULL
    cdef Py_ssize_t svc_n = 0
    for j in range((<const int32_t*>d.res_attr_off.p)[res_ix], d.res_attrs.n):
        if (koff[j + 1] - koff[j] == 12 and d.res_attrs.type.p[j] == 1
                and memcmp(d.res_attrs.key.data.p + koff[j], b"service.name", 12) == 0):
            svc = <const uint8_t*>d.res_attrs.str.data.p + soff[j]
            svc_n = soff[j + 1] - soff[j]
    if str_put(&d.res_service, svc, svc_n) < 0:
        return fail(d, "out of memory", "ResourceSpans", p)
    if (put_i32(&d.res_attr_off, <int32_t>d.res_attrs.n) < 0
            or put_u32(&d.res_dropped, dropped) < 0
            or str_put(&d.res_schema_url, url, url_n) < 0):
        return fail(d, "out of memory", "ResourceSpans", p)
    return 0


cdef int parse_request(Dec* d, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef uint32_t f
    cdef int wt
    cdef const uint8_t* s
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ExportTraceServiceRequest") < 0:
            return -1
        if f == 1 and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "ExportTraceServiceRequest.resource_spans") < 0:
                return -1
            if parse_resource_spans(d, s, s + k) < 0:
                return -1
        elif skip(d, &p, end, wt, "ExportTraceServiceRequest") < 0:
            return -1
    return 0


cdef int dec_init(Dec* d) noexcept nogil:
    if (str_init(&d.trace_state) or str_init(&d.name) or str_init(&d.status_message)
            or put_i32(&d.attr_off, 0) or put_i32(&d.event_off, 0) or put_i32(&d.link_off, 0)
            or attr_init(&d.attrs) or str_init(&d.ev_name) or put_i32(&d.ev_attr_off, 0)
            or attr_init(&d.ev_attrs) or str_init(&d.ln_trace_state)
            or put_i32(&d.ln_attr_off, 0) or attr_init(&d.ln_attrs)
            or put_i32(&d.res_attr_off, 0) or str_init(&d.res_schema_url)
            or str_init(&d.res_service)
            or attr_init(&d.res_attrs) or str_init(&d.sc_name) or str_init(&d.sc_version)
            or put_i32(&d.sc_attr_off, 0) or str_init(&d.sc_schema_url)
            or attr_init(&d.sc_attrs)):
        return -1
    return 0


cdef void dec_free(Dec* d) noexcept nogil:
    vec_free(&d.trace_id)
    vec_free(&d.span_id)
    vec_free(&d.parent)
    vec_free(&d.parent_valid)
    str_free(&d.trace_state)
    vec_free(&d.flags)
    str_free(&d.name)
    vec_free(&d.kind)
    vec_free(&d.start)
    vec_free(&d.end)
    vec_free(&d.status_code)
    str_free(&d.status_message)
    vec_free(&d.attr_off)
    vec_free(&d.dropped_attrs)
    vec_free(&d.event_off)
    vec_free(&d.dropped_events)
    vec_free(&d.link_off)
    vec_free(&d.dropped_links)
    vec_free(&d.resource_ix)
    vec_free(&d.scope_ix)
    attr_free(&d.attrs)
    vec_free(&d.ev_time)
    str_free(&d.ev_name)
    vec_free(&d.ev_attr_off)
    vec_free(&d.ev_dropped)
    attr_free(&d.ev_attrs)
    vec_free(&d.ln_trace_id)
    vec_free(&d.ln_span_id)
    str_free(&d.ln_trace_state)
    vec_free(&d.ln_flags)
    vec_free(&d.ln_attr_off)
    vec_free(&d.ln_dropped)
    attr_free(&d.ln_attrs)
    vec_free(&d.res_attr_off)
    vec_free(&d.res_dropped)
    str_free(&d.res_schema_url)
    str_free(&d.res_service)
    attr_free(&d.res_attrs)
    str_free(&d.sc_name)
    str_free(&d.sc_version)
    vec_free(&d.sc_attr_off)
    vec_free(&d.sc_dropped)
    str_free(&d.sc_schema_url)
    attr_free(&d.sc_attrs)


class DecodeError(ValueError):
    """Malformed OTLP protobuf; ``offset`` is the byte where it was found."""

    def __init__(self, message, offset):
        super().__init__(message)
        self.offset = offset


def decode_traces(const uint8_t[::1] buf, int max_depth=32):
    """Decode an ExportTraceServiceRequest into a dict of NumPy column buffers.

    Raises ``DecodeError`` (a ValueError) naming the message and byte offset
    of the first fault.
    """
    cdef Dec d
    cdef int rc
    cdef Py_ssize_t n = buf.shape[0]
    cdef const uint8_t* p = &buf[0] if n else <const uint8_t*>""
    memset_dec(&d)
    d.max_depth = max_depth
    d.base = p
    try:
        if dec_init(&d) < 0:
            raise MemoryError("out of memory decoding an OTLP request")
        with nogil:
            rc = parse_request(&d, p, p + n)
        if rc < 0:
            where = (<bytes>d.where).decode()
            raise DecodeError(
                f"malformed ExportTraceServiceRequest: {(<bytes>d.err).decode()} "
                f"(in {where}, at byte {d.err_pos})", d.err_pos)
        return {
            "n_spans": d.n_spans,
            "trace_id": vec_array(&d.trace_id, np.uint8),
            "span_id": vec_array(&d.span_id, np.uint8),
            "parent_span_id": vec_array(&d.parent, np.uint8),
            "parent_valid": vec_array(&d.parent_valid, np.bool_),
            "trace_state": str_arrays(&d.trace_state),
            "flags": vec_array(&d.flags, np.uint32),
            "name": str_arrays(&d.name),
            "kind": vec_array(&d.kind, np.int8),
            "start_time_ns": vec_array(&d.start, np.int64),
            "end_time_ns": vec_array(&d.end, np.int64),
            "status_code": vec_array(&d.status_code, np.int8),
            "status_message": str_arrays(&d.status_message),
            "attr_off": vec_array(&d.attr_off, np.int32),
            "dropped_attributes_count": vec_array(&d.dropped_attrs, np.uint32),
            "event_off": vec_array(&d.event_off, np.int32),
            "dropped_events_count": vec_array(&d.dropped_events, np.uint32),
            "link_off": vec_array(&d.link_off, np.int32),
            "dropped_links_count": vec_array(&d.dropped_links, np.uint32),
            "resource_ix": vec_array(&d.resource_ix, np.int32),
            "scope_ix": vec_array(&d.scope_ix, np.int32),
            "attrs": attr_arrays(&d.attrs),
            "ev_time": vec_array(&d.ev_time, np.int64),
            "ev_name": str_arrays(&d.ev_name),
            "ev_attr_off": vec_array(&d.ev_attr_off, np.int32),
            "ev_dropped": vec_array(&d.ev_dropped, np.uint32),
            "ev_attrs": attr_arrays(&d.ev_attrs),
            "ln_trace_id": vec_array(&d.ln_trace_id, np.uint8),
            "ln_span_id": vec_array(&d.ln_span_id, np.uint8),
            "ln_trace_state": str_arrays(&d.ln_trace_state),
            "ln_flags": vec_array(&d.ln_flags, np.uint32),
            "ln_attr_off": vec_array(&d.ln_attr_off, np.int32),
            "ln_dropped": vec_array(&d.ln_dropped, np.uint32),
            "ln_attrs": attr_arrays(&d.ln_attrs),
            "res_attr_off": vec_array(&d.res_attr_off, np.int32),
            "res_dropped": vec_array(&d.res_dropped, np.uint32),
            "res_schema_url": str_arrays(&d.res_schema_url),
            "res_service": str_arrays(&d.res_service),
            "res_attrs": attr_arrays(&d.res_attrs),
            "sc_name": str_arrays(&d.sc_name),
            "sc_version": str_arrays(&d.sc_version),
            "sc_attr_off": vec_array(&d.sc_attr_off, np.int32),
            "sc_dropped": vec_array(&d.sc_dropped, np.uint32),
            "sc_schema_url": str_arrays(&d.sc_schema_url),
            "sc_attrs": attr_arrays(&d.sc_attrs),
        }
    finally:
        dec_free(&d)


cdef void memset_dec(Dec* d) noexcept nogil:
    memset(d, 0, sizeof(Dec))


# -- encoder -------------------------------------------------------------------------

cdef struct SCol:
    # a string/binary column: optional int32 indices (-1 = null) into offsets + data
    const int32_t* idx
    const int32_t* off
    const uint8_t* data


cdef struct ACol:
    # an attribute list column: list offsets + the struct's children
    const int32_t* list_off
    SCol key
    const int8_t* type
    SCol str
    const int64_t* ival
    const double* dval
    const uint8_t* bval
    SCol bytes
    SCol any


cdef inline Py_ssize_t sget(const SCol* c, Py_ssize_t i, const uint8_t** p) noexcept nogil:
    cdef int32_t j = i
    if c.idx != NULL:
        j = c.idx[i]
        if j < 0:
            p[0] = NULL
            return 0
    p[0] = c.data + c.off[j]
    return c.off[j + 1] - c.off[j]


cdef inline int vsize(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline void wvar(Vec* o, uint64_t v) noexcept nogil:
    # caller reserved room
    while v >= 0x80:
        o.p[o.n] = <char>((v & 0x7F) | 0x80)
        o.n += 1
        v >>= 7
    o.p[o.n] = <char>v
    o.n += 1


cdef inline int e_varint(Vec* o, uint8_t tag, uint64_t v) noexcept nogil:
    if vec_reserve(o, 11) < 0:
        return -1
    o.p[o.n] = <char>tag
    o.n += 1
    wvar(o, v)
    return 0


cdef inline int e_bytes(Vec* o, uint8_t tag, const uint8_t* p, Py_ssize_t k) noexcept nogil:
    if vec_reserve(o, 11 + k) < 0:
        return -1
    o.p[o.n] = <char>tag
    o.n += 1
    wvar(o, <uint64_t>k)
    if k:
        memcpy(o.p + o.n, p, k)
    o.n += k
    return 0


cdef inline int e_fixed(Vec* o, uint8_t tag, const void* p, int k) noexcept nogil:
    if vec_reserve(o, 1 + k) < 0:
        return -1
    o.p[o.n] = <char>tag
    o.n += 1
    memcpy(o.p + o.n, p, k)
    o.n += k
    return 0


cdef inline Py_ssize_t e_begin(Vec* o, uint8_t tag, int reserve) noexcept nogil:
    """Open a length-delimited field; ``reserve`` bytes are kept for its length."""
    if vec_reserve(o, 1 + reserve) < 0:
        return -1
    o.p[o.n] = <char>tag
    o.n += 1 + reserve
    return o.n


cdef inline int e_end(Vec* o, Py_ssize_t body, int reserve) noexcept nogil:
    """Close a field opened by ``e_begin``: write its length, moving the body if needed."""
    cdef Py_ssize_t k = o.n - body
    cdef int need = vsize(<uint64_t>k)
    cdef Py_ssize_t at
    if need > reserve:
        if vec_reserve(o, need - reserve) < 0:
            return -1
    if need != reserve:
        memmove(o.p + body - reserve + need, o.p + body, k)
        o.n += need - reserve
    at = o.n
    o.n = body - reserve
    wvar(o, <uint64_t>k)
    o.n = at
    return 0


cdef inline Py_ssize_t any_size(const ACol* a, Py_ssize_t j, const uint8_t** p,
                                uint64_t* scalar) noexcept nogil:
    """Size of attribute ``j``'s AnyValue body; ``p``/``scalar`` get its payload."""
    cdef int8_t t = a.type[j]
    cdef Py_ssize_t k
    if t == 1:
        k = sget(&a.str, j, p)
        return 1 + vsize(k) + k
    if t == 2:
        scalar[0] = a.bval[j] != 0
        return 2
    if t == 3:
        scalar[0] = <uint64_t>a.ival[j]
        return 1 + vsize(scalar[0])
    if t == 4:
        return 9
    if t == 7:
        k = sget(&a.bytes, j, p)
        return 1 + vsize(k) + k
    if t == 5 or t == 6:
        return sget(&a.any, j, p)
    return 0


cdef int e_attrs(Vec* o, uint8_t tag, const ACol* a, Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t j, kn, vn, body, pn
    cdef const uint8_t* kp
    cdef const uint8_t* vp = NULL
    cdef uint64_t scalar = 0
    cdef int8_t t
    for j in range(a.list_off[row], a.list_off[row + 1]):
        kn = sget(&a.key, j, &kp)
        vn = any_size(a, j, &vp, &scalar)
        body = (1 + vsize(kn) + kn if kn else 0) + 1 + vsize(vn) + vn
        if vec_reserve(o, 1 + 10 + body) < 0:
            return -1
        o.p[o.n] = <char>tag
        o.n += 1
        wvar(o, <uint64_t>body)
        if kn:
            o.p[o.n] = 0x0A
            o.n += 1
            wvar(o, <uint64_t>kn)
            memcpy(o.p + o.n, kp, kn)
            o.n += kn
        o.p[o.n] = 0x12
        o.n += 1
        wvar(o, <uint64_t>vn)
        t = a.type[j]
        if t == 1 or t == 7:
            o.p[o.n] = 0x0A if t == 1 else 0x3A
            o.n += 1
            pn = sget(&a.str, j, &vp) if t == 1 else sget(&a.bytes, j, &vp)
            wvar(o, <uint64_t>pn)
            if pn:
                memcpy(o.p + o.n, vp, pn)
            o.n += pn
        elif t == 2 or t == 3:
            o.p[o.n] = 0x10 if t == 2 else 0x18
            o.n += 1
            wvar(o, scalar)
        elif t == 4:
            o.p[o.n] = 0x21
            memcpy(o.p + o.n + 1, &a.dval[j], 8)
            o.n += 9
        elif t == 5 or t == 6:
            if vn:
                memcpy(o.p + o.n, vp, vn)
            o.n += vn
    return 0


cdef struct Enc:
    Py_ssize_t n
    const uint8_t* trace_id
    const uint8_t* span_id
    const uint8_t* parent
    const uint8_t* parent_valid
    SCol trace_state
    const uint32_t* flags
    SCol name
    const int8_t* kind
    const int64_t* start
    const int64_t* end
    const int8_t* status_code
    SCol status_message
    ACol attrs
    const uint32_t* dropped_attrs
    const int32_t* event_off
    const uint32_t* dropped_events
    const int32_t* link_off
    const uint32_t* dropped_links
    const int64_t* ev_time
    SCol ev_name
    ACol ev_attrs
    const uint32_t* ev_dropped
    const uint8_t* ln_trace_id
    const uint8_t* ln_span_id
    SCol ln_trace_state
    const uint32_t* ln_flags
    ACol ln_attrs
    const uint32_t* ln_dropped
    ACol res_attrs
    const uint32_t* res_dropped
    SCol res_schema_url
    SCol sc_name
    SCol sc_version
    ACol sc_attrs
    const uint32_t* sc_dropped
    SCol sc_schema_url


cdef inline bint s_eq(const SCol* c, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef const uint8_t* a
    cdef const uint8_t* b
    cdef Py_ssize_t na = sget(c, i, &a)
    cdef Py_ssize_t nb = sget(c, j, &b)
    return na == nb and (na == 0 or memcmp(a, b, na) == 0)


cdef bint attrs_eq(const ACol* a, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t n = a.list_off[r0 + 1] - a.list_off[r0]
    cdef Py_ssize_t k, i, j
    cdef int8_t t
    if n != a.list_off[r1 + 1] - a.list_off[r1]:
        return False
    for k in range(n):
        i = a.list_off[r0] + k
        j = a.list_off[r1] + k
        t = a.type[i]
        if t != a.type[j] or not s_eq(&a.key, i, j):
            return False
        if t == 1 and not s_eq(&a.str, i, j):
            return False
        if t == 2 and (a.bval[i] != 0) != (a.bval[j] != 0):
            return False
        if t == 3 and a.ival[i] != a.ival[j]:
            return False
        if t == 4 and memcmp(&a.dval[i], &a.dval[j], 8) != 0:
            return False
        if t == 7 and not s_eq(&a.bytes, i, j):
            return False
        if (t == 5 or t == 6) and not s_eq(&a.any, i, j):
            return False
    return True


cdef inline bint same_resource(const Enc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.res_dropped[i] == e.res_dropped[j] and s_eq(&e.res_schema_url, i, j)
            and attrs_eq(&e.res_attrs, i, j))


cdef inline bint same_scope(const Enc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.sc_dropped[i] == e.sc_dropped[j] and s_eq(&e.sc_name, i, j)
            and s_eq(&e.sc_version, i, j) and s_eq(&e.sc_schema_url, i, j)
            and attrs_eq(&e.sc_attrs, i, j))


cdef inline int e_str(Vec* o, uint8_t tag, const SCol* c, Py_ssize_t i) noexcept nogil:
    cdef const uint8_t* p
    cdef Py_ssize_t k = sget(c, i, &p)
    if k == 0:
        return 0
    return e_bytes(o, tag, p, k)


cdef int e_span(Vec* o, const Enc* e, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t body, st, j
    cdef uint32_t fl
    cdef int64_t v
    body = e_begin(o, 0x12, 2)
    if body < 0:
        return -1
    if (e_bytes(o, 0x0A, e.trace_id + 16 * i, 16) < 0
            or e_bytes(o, 0x12, e.span_id + 8 * i, 8) < 0
            or e_str(o, 0x1A, &e.trace_state, i) < 0):
        return -1
    if e.parent_valid[i] and e_bytes(o, 0x22, e.parent + 8 * i, 8) < 0:
        return -1
    if e_str(o, 0x2A, &e.name, i) < 0:
        return -1
    if e.kind[i] and e_varint(o, 0x30, <uint64_t><int64_t>e.kind[i]) < 0:
        return -1
    v = e.start[i]
    if v and e_fixed(o, 0x39, &v, 8) < 0:
        return -1
    v = e.end[i]
    if v and e_fixed(o, 0x41, &v, 8) < 0:
        return -1
    if e_attrs(o, 0x4A, &e.attrs, i) < 0:
        return -1
    if e.dropped_attrs[i] and e_varint(o, 0x50, e.dropped_attrs[i]) < 0:
        return -1
    for j in range(e.event_off[i], e.event_off[i + 1]):
        st = e_begin(o, 0x5A, 2)
        if st < 0:
            return -1
        v = e.ev_time[j]
        if v and e_fixed(o, 0x09, &v, 8) < 0:
            return -1
        if e_str(o, 0x12, &e.ev_name, j) < 0 or e_attrs(o, 0x1A, &e.ev_attrs, j) < 0:
            return -1
        if e.ev_dropped[j] and e_varint(o, 0x20, e.ev_dropped[j]) < 0:
            return -1
        if e_end(o, st, 2) < 0:
            return -1
    if e.dropped_events[i] and e_varint(o, 0x60, e.dropped_events[i]) < 0:
        return -1
    for j in range(e.link_off[i], e.link_off[i + 1]):
        st = e_begin(o, 0x6A, 2)
        if st < 0:
            return -1
        if (e_bytes(o, 0x0A, e.ln_trace_id + 16 * j, 16) < 0
                or e_bytes(o, 0x12, e.ln_span_id + 8 * j, 8) < 0
                or e_str(o, 0x1A, &e.ln_trace_state, j) < 0
                or e_attrs(o, 0x22, &e.ln_attrs, j) < 0):
            return -1
        if e.ln_dropped[j] and e_varint(o, 0x28, e.ln_dropped[j]) < 0:
            return -1
        fl = e.ln_flags[j]
        if fl and e_fixed(o, 0x35, &fl, 4) < 0:
            return -1
        if e_end(o, st, 2) < 0:
            return -1
    if e.dropped_links[i] and e_varint(o, 0x70, e.dropped_links[i]) < 0:
        return -1
    st = e_begin(o, 0x7A, 1)
    if st < 0 or e_str(o, 0x12, &e.status_message, i) < 0:
        return -1
    if e.status_code[i] and e_varint(o, 0x18, <uint64_t><int64_t>e.status_code[i]) < 0:
        return -1
    if e_end(o, st, 1) < 0:
        return -1
    fl = e.flags[i]
    if fl:
        # field 16, wire type 5: a two-byte tag
        if vec_reserve(o, 6) < 0:
            return -1
        o.p[o.n] = <char>0x85
        o.p[o.n + 1] = 0x01
        memcpy(o.p + o.n + 2, &fl, 4)
        o.n += 6
    return e_end(o, body, 2)


cdef int e_request(Vec* o, const Enc* e) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t rs, ss, sc, r, first
    while i < e.n:
        rs = e_begin(o, 0x0A, 5)
        if rs < 0:
            return -1
        r = e_begin(o, 0x0A, 2)
        if r < 0 or e_attrs(o, 0x0A, &e.res_attrs, i) < 0:
            return -1
        if e.res_dropped[i] and e_varint(o, 0x10, e.res_dropped[i]) < 0:
            return -1
        if e_end(o, r, 2) < 0:
            return -1
        first = i
        while True:
            ss = e_begin(o, 0x12, 5)
            if ss < 0:
                return -1
            sc = e_begin(o, 0x0A, 2)
            if (sc < 0 or e_str(o, 0x0A, &e.sc_name, i) < 0
                    or e_str(o, 0x12, &e.sc_version, i) < 0
                    or e_attrs(o, 0x1A, &e.sc_attrs, i) < 0):
                return -1
            if e.sc_dropped[i] and e_varint(o, 0x20, e.sc_dropped[i]) < 0:
                return -1
            if e_end(o, sc, 2) < 0:
                return -1
            if e_span(o, e, i) < 0:
                return -1
            i += 1
            while i < e.n and same_resource(e, i - 1, i) and same_scope(e, i - 1, i):
                if e_span(o, e, i) < 0:
                    return -1
                i += 1
            if e_str(o, 0x1A, &e.sc_schema_url, i - 1) < 0 or e_end(o, ss, 5) < 0:
                return -1
            if i >= e.n or not same_resource(e, i - 1, i):
                break
        if e_str(o, 0x1A, &e.res_schema_url, first) < 0 or e_end(o, rs, 5) < 0:
            return -1
    return 0


cdef const void* _ptr(object arr, object dtype, Py_ssize_t at_least, str name) except NULL:
    cdef cnp.ndarray a = <cnp.ndarray?>arr
    if a.dtype != dtype or not a.flags.c_contiguous or a.shape[0] < at_least:
        raise ValueError(f"encode_traces: column buffer {name} must be a contiguous {dtype} "
                         f"array of at least {at_least} items")
    if a.shape[0] == 0:
        return <const void*>""
    return cnp.PyArray_DATA(a)


cdef SCol _scol(tuple parts, Py_ssize_t n, str name) except *:
    cdef SCol c
    idx, off, data = parts
    if idx is None:
        c.idx = NULL
        c.off = <const int32_t*>_ptr(off, np.dtype(np.int32), n + 1, name)
    else:
        c.idx = <const int32_t*>_ptr(idx, np.dtype(np.int32), n, name)
        c.off = <const int32_t*>_ptr(off, np.dtype(np.int32), 1, name)
    c.data = <const uint8_t*>_ptr(data, np.dtype(np.uint8), 0, name)
    return c


cdef ACol _acol(dict a, Py_ssize_t n, str name) except *:
    cdef ACol c
    cdef Py_ssize_t m
    c.list_off = <const int32_t*>_ptr(a["list_off"], np.dtype(np.int32), n + 1, name)
    m = a["type"].shape[0]
    c.key = _scol(a["key"], m, name + ".key")
    c.type = <const int8_t*>_ptr(a["type"], np.dtype(np.int8), 0, name)
    c.str = _scol(a["str"], m, name + ".str")
    c.ival = <const int64_t*>_ptr(a["int"], np.dtype(np.int64), m, name)
    c.dval = <const double*>_ptr(a["double"], np.dtype(np.float64), m, name)
    c.bval = <const uint8_t*>_ptr(a["bool"], np.dtype(np.uint8), m, name)
    c.bytes = _scol(a["bytes"], m, name + ".bytes")
    c.any = _scol(a["any"], m, name + ".any")
    return c


def encode_traces(dict cols):
    """Encode column buffers (as ``knhk.otlp`` prepares them) into request bytes."""
    cdef Enc e
    cdef Vec o
    cdef int rc
    cdef Py_ssize_t n = cols["n"]
    cdef Py_ssize_t ne = cols["ev_time"].shape[0]
    cdef Py_ssize_t nl = cols["ln_flags"].shape[0]
    u8, i8, u32, i32, i64 = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint32),
                             np.dtype(np.int32), np.dtype(np.int64))
    e.n = n
    e.trace_id = <const uint8_t*>_ptr(cols["trace_id"], u8, 16 * n, "trace_id")
    e.span_id = <const uint8_t*>_ptr(cols["span_id"], u8, 8 * n, "span_id")
    e.parent = <const uint8_t*>_ptr(cols["parent_span_id"], u8, 8 * n, "parent_span_id")
    e.parent_valid = <const uint8_t*>_ptr(cols["parent_valid"], u8, n, "parent_valid")
    e.trace_state = _scol(cols["trace_state"], n, "trace_state")
    e.flags = <const uint32_t*>_ptr(cols["flags"], u32, n, "flags")
    e.name = _scol(cols["name"], n, "name")
    e.kind = <const int8_t*>_ptr(cols["kind"], i8, n, "kind")
    e.start = <const int64_t*>_ptr(cols["start_time_ns"], i64, n, "start_time_ns")
    e.end = <const int64_t*>_ptr(cols["end_time_ns"], i64, n, "end_time_ns")
    e.status_code = <const int8_t*>_ptr(cols["status_code"], i8, n, "status_code")
    e.status_message = _scol(cols["status_message"], n, "status_message")
    e.attrs = _acol(cols["attributes"], n, "attributes")
    e.dropped_attrs = <const uint32_t*>_ptr(cols["dropped_attributes_count"], u32, n, "d")
    e.event_off = <const int32_t*>_ptr(cols["event_off"], i32, n + 1, "events")
    e.dropped_events = <const uint32_t*>_ptr(cols["dropped_events_count"], u32, n, "d")
    e.link_off = <const int32_t*>_ptr(cols["link_off"], i32, n + 1, "links")
    e.dropped_links = <const uint32_t*>_ptr(cols["dropped_links_count"], u32, n, "d")
    e.ev_time = <const int64_t*>_ptr(cols["ev_time"], i64, ne, "events.time_unix_nano")
    e.ev_name = _scol(cols["ev_name"], ne, "events.name")
    e.ev_attrs = _acol(cols["ev_attrs"], ne, "events.attributes")
    e.ev_dropped = <const uint32_t*>_ptr(cols["ev_dropped"], u32, ne, "events.dropped")
    e.ln_trace_id = <const uint8_t*>_ptr(cols["ln_trace_id"], u8, 16 * nl, "links.trace_id")
    e.ln_span_id = <const uint8_t*>_ptr(cols["ln_span_id"], u8, 8 * nl, "links.span_id")
    e.ln_trace_state = _scol(cols["ln_trace_state"], nl, "links.trace_state")
    e.ln_flags = <const uint32_t*>_ptr(cols["ln_flags"], u32, nl, "links.flags")
    e.ln_attrs = _acol(cols["ln_attrs"], nl, "links.attributes")
    e.ln_dropped = <const uint32_t*>_ptr(cols["ln_dropped"], u32, nl, "links.dropped")
    e.res_attrs = _acol(cols["resource_attributes"], n, "resource_attributes")
    e.res_dropped = <const uint32_t*>_ptr(cols["resource_dropped_attributes_count"], u32, n,
                                          "resource_dropped_attributes_count")
    e.res_schema_url = _scol(cols["resource_schema_url"], n, "resource_schema_url")
    e.sc_name = _scol(cols["scope_name"], n, "scope_name")
    e.sc_version = _scol(cols["scope_version"], n, "scope_version")
    e.sc_attrs = _acol(cols["scope_attributes"], n, "scope_attributes")
    e.sc_dropped = <const uint32_t*>_ptr(cols["scope_dropped_attributes_count"], u32, n,
                                         "scope_dropped_attributes_count")
    e.sc_schema_url = _scol(cols["scope_schema_url"], n, "scope_schema_url")
    memset(&o, 0, sizeof(Vec))
    try:
        with nogil:
            rc = e_request(&o, &e)
        if rc < 0:
            raise MemoryError("out of memory encoding an OTLP request")
        return PyBytes_FromStringAndSize(o.p, o.n)
    finally:
        vec_free(&o)
