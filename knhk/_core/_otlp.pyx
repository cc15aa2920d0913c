# cython: freethreading_compatible = False
"""OTLP protobuf wire codec: ExportTraceServiceRequest and ExportMetricsServiceRequest
<-> Arrow record batches (knhk's SPAN_SCHEMA and METRIC_SCHEMA).

The decoder walks the wire bytes once (recursive descent over the five message
levels) and appends every field to growable C buffers laid out as Arrow lays
its arrays out: int32 offsets + data for strings, dictionary indices for the
dictionary columns (interned through a C hash table of the bytes, so each
distinct string is copied and UTF-8-checked once), validity bitmaps. The
buffers are then handed to Arrow through the Arrow C data interface
(``ArrowArray``, https://arrow.apache.org/docs/format/CDataInterface.html):
one import makes the whole record batch, without a copy and without a Python
object per span or per column.

The encoder takes a record batch exported through the same interface, sizes
every message in a first pass and writes the request into one preallocated
``bytes`` object in a second.

Field numbers follow opentelemetry-proto ``trace/v1/trace.proto``,
``metrics/v1/metrics.proto``, ``common/v1/common.proto`` and
``resource/v1/resource.proto``.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from knhk._core._buffer cimport (
    Vec, put_f64, put_i32, put_i64, put_u8, put_u32, vec_free, vec_put, vec_reserve,
)


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


# -- UTF-8 and hashing ------------------------------------------------------------------

cdef bint utf8_ok(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 as the Unicode standard's table 3-7 defines it (no overlongs,
    no surrogates, nothing above U+10FFFF): what Arrow's validation accepts."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    cdef uint8_t c, c1
    while i < n:
        if i + 8 <= n:
            memcpy(&w, p + i, 8)
            if (w & <uint64_t>0x8080808080808080ULL) == 0:
                i += 8
                continue
        c = p[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = p[i + 1]
            if c == 0xE0:
                if c1 < 0xA0 or c1 > 0xBF:
                    return False
            elif c == 0xED:
                if c1 < 0x80 or c1 > 0x9F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (p[i + 2] & 0xC0) != 0x80:
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = p[i + 1]
            if c == 0xF0:
                if c1 < 0x90 or c1 > 0xBF:
                    return False
            elif c == 0xF4:
                if c1 < 0x80 or c1 > 0x8F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (p[i + 2] & 0xC0) != 0x80 or (p[i + 3] & 0xC0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef inline uint32_t load32(const uint8_t* p) noexcept nogil:
    cdef uint32_t w
    memcpy(&w, p, 4)
    return w


cdef inline bint bytes_eq(const uint8_t* a, const uint8_t* b, Py_ssize_t k) noexcept nogil:
    # short strings (the usual keys) without a call into libc
    cdef uint64_t x, y
    if k > 16:
        return memcmp(a, b, k) == 0
    if k >= 8:
        memcpy(&x, a, 8)
        memcpy(&y, b, 8)
        if x != y:
            return False
        memcpy(&x, a + k - 8, 8)
        memcpy(&y, b + k - 8, 8)
        return x == y
    if k >= 4:
        return load32(a) == load32(b) and load32(a + k - 4) == load32(b + k - 4)
    while k > 0:
        k -= 1
        if a[k] != b[k]:
            return False
    return True


cdef inline uint32_t hash_bytes(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # Eight bytes per multiply-xorshift round (the splitmix64 constants); short
    # keys (span names, attribute keys) take one or two rounds.
    cdef uint64_t h = <uint64_t>0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * <uint64_t>0xBF58476D1CE4E5B9ULL
        h ^= h >> 29
        p += 8
        n -= 8
    if n >= 4:
        # two overlapping 4-byte loads cover a 4..7-byte tail
        w = load32(p) | (<uint64_t>load32(p + n - 4) << 32)
        h = (h ^ w) * <uint64_t>0xBF58476D1CE4E5B9ULL
    elif n:
        w = (<uint64_t>p[0] << 16) | (<uint64_t>p[n >> 1] << 8) | p[n - 1]
        h = (h ^ w) * <uint64_t>0xBF58476D1CE4E5B9ULL
    h ^= h >> 32
    h *= <uint64_t>0x94D049BB133111EBULL
    h ^= h >> 29
    return <uint32_t>h


# -- dictionaries: interned strings, Arrow dictionary values ---------------------------

cdef struct Dict:
    StrVec s            # the dictionary values, in first-seen order
    Vec hv              # uint32 hash of each value (to rehash without rereading the bytes)
    uint64_t* slots     # open addressing, linear probing: hash << 32 | index + 1; 0 = empty
    uint32_t mask
    int32_t n


cdef int dict_init(Dict* d) noexcept nogil:
    d.mask = 31
    d.slots = <uint64_t*>calloc(32, sizeof(uint64_t))
    if d.slots == NULL:
        return -1
    return str_init(&d.s)


cdef void dict_free(Dict* d) noexcept nogil:
    str_free(&d.s)
    vec_free(&d.hv)
    free(d.slots)
    d.slots = NULL


cdef int dict_grow(Dict* d) noexcept nogil:
    cdef uint32_t mask = d.mask * 2 + 1
    cdef uint64_t* slots = <uint64_t*>calloc(<size_t>mask + 1, sizeof(uint64_t))
    cdef const uint32_t* hv = <const uint32_t*>d.hv.p
    cdef int32_t j
    cdef uint32_t s
    if slots == NULL:
        return -1
    for j in range(d.n):
        s = hv[j] & mask
        while slots[s]:
            s = (s + 1) & mask
        slots[s] = (<uint64_t>hv[j] << 32) | <uint32_t>(j + 1)
    free(d.slots)
    d.slots = slots
    d.mask = mask
    return 0


cdef enum:
    INTERN_OOM = -1
    INTERN_UTF8 = -2


cdef inline int32_t intern(Dict* d, const uint8_t* p, Py_ssize_t k) noexcept nogil:
    """Index of ``p[:k]`` in ``d``, added (after a UTF-8 check) when new; < 0 on failure."""
    cdef uint32_t h = hash_bytes(p, k)
    cdef uint32_t s = h & d.mask
    cdef uint64_t slot
    cdef int32_t j
    cdef const int32_t* off = <const int32_t*>d.s.off.p
    while True:
        slot = d.slots[s]
        if slot == 0:
            break
        if <uint32_t>(slot >> 32) == h:
            j = <int32_t>(<uint32_t>slot) - 1
            if off[j + 1] - off[j] == k and bytes_eq(<const uint8_t*>d.s.data.p + off[j], p, k):
                return j
        s = (s + 1) & d.mask
    if not utf8_ok(p, k):
        return INTERN_UTF8
    if str_put(&d.s, p, k) < 0 or put_u32(&d.hv, h) < 0:
        return INTERN_OOM
    j = d.n
    d.slots[s] = (<uint64_t>h << 32) | <uint32_t>(j + 1)
    d.n += 1
    if <uint32_t>d.n * 2 > d.mask and dict_grow(d) < 0:
        return INTERN_OOM
    return j


# -- attribute tables ----------------------------------------------------------------

cdef struct AttrTab:
    # one row per KeyValue, the children of Arrow's ATTRIBUTE_STRUCT
    Dict keys
    Vec key         # int32 index into keys
    Vec type        # int8 AttrType
    Dict strs
    Vec str         # int32 index into strs (0 unless type is STRING)
    Vec ival        # int64
    Vec dval        # float64
    Vec bval        # uint8
    StrVec bytes
    StrVec any      # the AnyValue bytes of arrays and kvlists
    Py_ssize_t n


cdef int attr_init(AttrTab* a) noexcept nogil:
    if (dict_init(&a.keys) or dict_init(&a.strs) or str_init(&a.bytes)
            or str_init(&a.any)):
        return -1
    return 0


cdef void attr_free(AttrTab* a) noexcept nogil:
    dict_free(&a.keys)
    vec_free(&a.key)
    vec_free(&a.type)
    dict_free(&a.strs)
    vec_free(&a.str)
    vec_free(&a.ival)
    vec_free(&a.dval)
    vec_free(&a.bval)
    str_free(&a.bytes)
    str_free(&a.any)


# -- decoder state ---------------------------------------------------------------------

cdef struct Dec:
    # spans
    Vec trace_id
    Vec span_id
    Vec parent
    Vec parent_valid    # uint8
    Dict trace_states
    Vec trace_state     # int32 index, -1 = null (empty on the wire)
    Vec flags
    Dict names
    Vec name            # int32 index
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
    AttrTab attrs
    # events
    Vec ev_time
    StrVec ev_name
    Vec ev_attr_off
    Vec ev_dropped
    AttrTab ev_attrs
    # links
    Vec ln_trace_id
    Vec ln_span_id
    StrVec ln_trace_state
    Vec ln_flags
    Vec ln_attr_off
    Vec ln_dropped
    AttrTab ln_attrs
    # resources (one entry per ResourceSpans)
    Vec res_attr_off
    Vec res_dropped
    Dict res_urls
    Vec res_url
    Dict services
    Vec res_service
    AttrTab res_attrs
    # scopes (one entry per ScopeSpans)
    Dict sc_names
    Vec sc_name
    Dict sc_versions
    Vec sc_version
    Dict sc_urls
    Vec sc_url
    Vec sc_attr_off
    Vec sc_dropped
    AttrTab sc_attrs
    # resource and scope spread over the span rows (after parsing)
    Vec row_service
    Vec row_res_url
    Vec row_res_dropped
    Vec row_res_attr_off
    AttrTab row_res_attrs
    Vec row_sc_name
    Vec row_sc_version
    Vec row_sc_url
    Vec row_sc_dropped
    Vec row_sc_attr_off
    AttrTab row_sc_attrs
    Py_ssize_t n_spans
    Py_ssize_t n_events
    Py_ssize_t n_links
    Py_ssize_t n_resources
    Py_ssize_t n_scopes
    int max_depth
    bint too_deep
    const uint8_t* key      # of the attribute being checked for depth
    Py_ssize_t key_n
    const uint8_t* default_service
    Py_ssize_t default_service_n
    # error report
    const char* err
    const char* where
    Py_ssize_t err_pos
    const uint8_t* base


cdef int dec_init(Dec* d) noexcept nogil:
    if (str_init(&d.status_message) or dict_init(&d.trace_states) or dict_init(&d.names)
            or put_i32(&d.attr_off, 0) or put_i32(&d.event_off, 0) or put_i32(&d.link_off, 0)
            or attr_init(&d.attrs) or str_init(&d.ev_name) or put_i32(&d.ev_attr_off, 0)
            or attr_init(&d.ev_attrs) or str_init(&d.ln_trace_state)
            or put_i32(&d.ln_attr_off, 0) or attr_init(&d.ln_attrs)
            or put_i32(&d.res_attr_off, 0) or dict_init(&d.res_urls)
            or dict_init(&d.services) or attr_init(&d.res_attrs)
            or dict_init(&d.sc_names) or dict_init(&d.sc_versions) or dict_init(&d.sc_urls)
            or put_i32(&d.sc_attr_off, 0) or attr_init(&d.sc_attrs)
            or put_i32(&d.row_res_attr_off, 0) or put_i32(&d.row_sc_attr_off, 0)
            or str_init(&d.row_res_attrs.bytes) or str_init(&d.row_res_attrs.any)
            or str_init(&d.row_sc_attrs.bytes) or str_init(&d.row_sc_attrs.any)):
        return -1
    return 0


cdef int dec_presize(Dec* d, Py_ssize_t nbytes) noexcept nogil:
    """Reserve the span columns for the spans ``nbytes`` of request likely hold.

    Growing ~60 buffers by doubling costs reallocations and copies; an OTLP
    span is rarely under 100 bytes, so this guess is seldom exceeded, and
    ``take`` gives back what was reserved but not used.
    """
    # capped: a huge request grows its buffers as it goes instead
    cdef Py_ssize_t n = min(nbytes // 100, 1 << 16) + 8
    cdef Py_ssize_t na = 4 * n
    if (vec_reserve(&d.trace_id, 16 * n) or vec_reserve(&d.span_id, 8 * n)
            or vec_reserve(&d.parent, 8 * n) or vec_reserve(&d.parent_valid, n)
            or vec_reserve(&d.trace_state, 4 * n) or vec_reserve(&d.flags, 4 * n)
            or vec_reserve(&d.name, 4 * n) or vec_reserve(&d.kind, n)
            or vec_reserve(&d.start, 8 * n) or vec_reserve(&d.end, 8 * n)
            or vec_reserve(&d.status_code, n) or vec_reserve(&d.status_message.off, 4 * n)
            or vec_reserve(&d.attr_off, 4 * n) or vec_reserve(&d.dropped_attrs, 4 * n)
            or vec_reserve(&d.event_off, 4 * n) or vec_reserve(&d.dropped_events, 4 * n)
            or vec_reserve(&d.link_off, 4 * n) or vec_reserve(&d.dropped_links, 4 * n)
            or vec_reserve(&d.resource_ix, 4 * n) or vec_reserve(&d.scope_ix, 4 * n)
            or vec_reserve(&d.attrs.key, 4 * na) or vec_reserve(&d.attrs.type, na)
            or vec_reserve(&d.attrs.str, 4 * na) or vec_reserve(&d.attrs.ival, 8 * na)
            or vec_reserve(&d.attrs.dval, 8 * na) or vec_reserve(&d.attrs.bval, na)
            or vec_reserve(&d.attrs.bytes.off, 4 * na) or vec_reserve(&d.attrs.any.off, 4 * na)):
        return -1
    return 0


cdef void dec_free(Dec* d) noexcept nogil:
    # every buffer handed to Arrow was set to NULL, so this frees only the rest
    vec_free(&d.trace_id)
    vec_free(&d.span_id)
    vec_free(&d.parent)
    vec_free(&d.parent_valid)
    dict_free(&d.trace_states)
    vec_free(&d.trace_state)
    vec_free(&d.flags)
    dict_free(&d.names)
    vec_free(&d.name)
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
    dict_free(&d.res_urls)
    vec_free(&d.res_url)
    dict_free(&d.services)
    vec_free(&d.res_service)
    attr_free(&d.res_attrs)
    dict_free(&d.sc_names)
    vec_free(&d.sc_name)
    dict_free(&d.sc_versions)
    vec_free(&d.sc_version)
    dict_free(&d.sc_urls)
    vec_free(&d.sc_url)
    vec_free(&d.sc_attr_off)
    vec_free(&d.sc_dropped)
    attr_free(&d.sc_attrs)
    vec_free(&d.row_service)
    vec_free(&d.row_res_url)
    vec_free(&d.row_res_dropped)
    vec_free(&d.row_res_attr_off)
    attr_free(&d.row_res_attrs)
    vec_free(&d.row_sc_name)
    vec_free(&d.row_sc_version)
    vec_free(&d.row_sc_url)
    vec_free(&d.row_sc_dropped)
    vec_free(&d.row_sc_attr_off)
    attr_free(&d.row_sc_attrs)


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
    if p < end and p[0] < 0x80:
        # most varints on the OTLP wire (tags, small lengths) are one byte
        out[0] = p[0]
        pp[0] = p + 1
        return 0
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
    if depth > d.max_depth:
        d.too_deep = True
        return fail(d, "AnyValue nested deeper than the limit", "AnyValue", p)
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
            if check_any(d, s, e, depth) < 0:
                return -1
            continue
        while s < e:
            if rd_tag(d, &s, e, &f2, &wt2, "KeyValue") < 0:
                return -1
            if f2 == 2 and wt2 == WT_LEN:
                if rd_len(d, &s, e, &v, &k2, "KeyValue") < 0:
                    return -1
                if check_any(d, v, v + k2, depth) < 0:
                    return -1
            elif skip(d, &s, e, wt2, "KeyValue") < 0:
                return -1
    return 0


cdef int check_any(Dec* d, const uint8_t* p, const uint8_t* end, int depth) noexcept nogil:
    """Validate an AnyValue inside a container at level ``depth``."""
    cdef uint32_t f
    cdef int wt
    cdef const uint8_t* s
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "AnyValue") < 0:
            return -1
        if (f == 5 or f == 6) and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "AnyValue") < 0:
                return -1
            if check_list(d, s, s + k, depth + 1, f == 6) < 0:
                return -1
        elif skip(d, &p, end, wt, "AnyValue") < 0:
            return -1
    return 0


cdef inline int put_interned(Dec* d, Dict* t, Vec* out, const uint8_t* p, Py_ssize_t k,
                             bint empty_is_null, const char* where) noexcept nogil:
    """Append the dictionary index of ``p[:k]`` (``-1`` for an empty string if asked)."""
    cdef int32_t j = -1
    if k or not empty_is_null:
        j = intern(t, p, k)
        if j == INTERN_UTF8:
            return fail(d, "string is not valid UTF-8", where, p)
        if j < 0:
            return fail(d, "out of memory", where, d.base)
    if put_i32(out, j) < 0:
        return fail(d, "out of memory", where, d.base)
    return 0


cdef inline int put_text(Dec* d, StrVec* s, const uint8_t* p, Py_ssize_t k,
                         const char* where) noexcept nogil:
    if k and not utf8_ok(p, k):
        return fail(d, "string is not valid UTF-8", where, p)
    if str_put(s, p, k) < 0:
        return fail(d, "out of memory", where, d.base)
    return 0


cdef int parse_kv(Dec* d, AttrTab* a, const uint8_t* p, const uint8_t* end,
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
    cdef int32_t j
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
                d.key = key
                d.key_n = key_n
                if check_list(d, s, s + k, 1, f2 == 6) < 0:
                    return -1
    j = intern(&a.keys, key, key_n)
    if j < 0:
        return fail(d, "attribute key is not valid UTF-8" if j == INTERN_UTF8
                    else "out of memory", where, key if key != NULL else p)
    if put_i32(&a.key, j) < 0:
        return fail(d, "out of memory", where, p)
    j = 0
    if typ == 1:
        j = intern(&a.strs, sp, sn)
        if j < 0:
            return fail(d, "string value is not valid UTF-8" if j == INTERN_UTF8
                        else "out of memory", where, sp if sp != NULL else p)
    if (put_i32(&a.str, j) < 0 or put_u8(&a.type, <uint8_t>typ) < 0
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
    if put_text(d, &d.ev_name, name, name_n, "Span.Event.name") < 0:
        return -1
    if (put_i64(&d.ev_time, <int64_t>t) < 0
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
    if put_text(d, &d.ln_trace_state, ts, ts_n, "Span.Link.trace_state") < 0:
        return -1
    if (vec_put(&d.ln_trace_id, tid, 16) < 0 or vec_put(&d.ln_span_id, sid, 8) < 0
            or put_u32(&d.ln_flags, flags) < 0
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
    if (put_interned(d, &d.trace_states, &d.trace_state, ts, ts_n, True,
                     "Span.trace_state") < 0
            or put_interned(d, &d.names, &d.name, name, name_n, False, "Span.name") < 0
            or put_text(d, &d.status_message, msg, msg_n, "Status.message") < 0):
        return -1
    if (vec_put(&d.trace_id, tid, 16) < 0 or vec_put(&d.span_id, sid, 8) < 0
            or vec_put(&d.parent, par if par_n else <const uint8_t*>"\0\0\0\0\0\0\0\0", 8) < 0
            or put_u8(&d.parent_valid, par_n != 0) < 0
            or put_u32(&d.flags, flags) < 0
            or put_u8(&d.kind, <uint8_t>kind_s) < 0
            or put_i64(&d.start, <int64_t>t0) < 0 or put_i64(&d.end, <int64_t>t1) < 0
            or put_u8(&d.status_code, <uint8_t>code_s) < 0
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


# -- Resource and InstrumentationScope: shared by the trace and metrics decoders ------------

cdef int parse_resource(Dec* d, AttrTab* attrs, const uint8_t* p, const uint8_t* end,
                        uint32_t* dropped) noexcept nogil:
    """A Resource: its attributes appended to ``attrs``, its dropped count in ``dropped``."""
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u
    cdef const uint8_t* v
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "Resource") < 0:
            return -1
        if wt == WT_LEN and f == 1:
            if rd_len(d, &p, end, &v, &k, "Resource.attributes") < 0:
                return -1
            if parse_kv(d, attrs, v, v + k, "Resource.attributes") < 0:
                return -1
        elif wt == WT_VARINT and f == 2:
            if rd_varint(d, &p, end, &u, "Resource") < 0:
                return -1
            dropped[0] = <uint32_t>u
        elif skip(d, &p, end, wt, "Resource") < 0:
            return -1
    return 0


cdef int parse_scope(Dec* d, AttrTab* attrs, const uint8_t* p, const uint8_t* end,
                     const uint8_t** name, Py_ssize_t* name_n, const uint8_t** ver,
                     Py_ssize_t* ver_n, uint32_t* dropped) noexcept nogil:
    """An InstrumentationScope. Its attributes go to ``attrs`` (skipped if NULL).

    Fields absent from the message leave their outputs as they were: a scope
    sent twice merges as protobuf merges it.
    """
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u
    cdef const uint8_t* v
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "InstrumentationScope") < 0:
            return -1
        if wt == WT_LEN and (f == 1 or f == 2 or (f == 3 and attrs != NULL)):
            if rd_len(d, &p, end, &v, &k, "InstrumentationScope") < 0:
                return -1
            if f == 1:
                name[0], name_n[0] = v, k
            elif f == 2:
                ver[0], ver_n[0] = v, k
            elif parse_kv(d, attrs, v, v + k, "InstrumentationScope.attributes") < 0:
                return -1
        elif wt == WT_VARINT and f == 4:
            if rd_varint(d, &p, end, &u, "InstrumentationScope") < 0:
                return -1
            dropped[0] = <uint32_t>u
        elif skip(d, &p, end, wt, "InstrumentationScope") < 0:
            return -1
    return 0


cdef inline bint service_name_at(const AttrTab* a, Py_ssize_t j, const uint8_t** v,
                                 Py_ssize_t* n) noexcept nogil:
    """Whether attribute ``j`` of ``a`` is a string ``service.name``; its value in ``v``, ``n``."""
    cdef int32_t kj = (<const int32_t*>a.key.p)[j]
    cdef int32_t sj
    cdef const int32_t* koff = <const int32_t*>a.keys.s.off.p
    cdef const int32_t* soff
    if (koff[kj + 1] - koff[kj] != 12 or a.type.p[j] != 1
            or memcmp(a.keys.s.data.p + koff[kj], b"service.name", 12) != 0):
        return False
    sj = (<const int32_t*>a.str.p)[j]
    soff = <const int32_t*>a.strs.s.off.p
    v[0] = <const uint8_t*>a.strs.s.data.p + soff[sj]
    n[0] = soff[sj + 1] - soff[sj]
    return True


cdef inline void resource_service(const AttrTab* a, Py_ssize_t first, const uint8_t** v,
                                  Py_ssize_t* n) noexcept nogil:
    """The service of a resource whose attributes are ``first`` to the end of ``a``:
    its string ``service.name``, the last one if it has several (as a map built from
    the list keeps the last value); left as it is (the caller's default) when
    there is none or the last one is empty. Spans and metric points alike."""
    cdef const uint8_t* sv = NULL
    cdef Py_ssize_t sn = 0
    cdef Py_ssize_t j
    for j in range(first, a.n):
        service_name_at(a, j, &sv, &sn)
    if sn:
        v[0], n[0] = sv, sn


cdef int parse_scope_spans(Dec* d, const uint8_t* p, const uint8_t* end,
                           int32_t res_ix) noexcept nogil:
    cdef uint32_t f
    cdef int wt
    cdef uint32_t dropped = 0
    cdef const uint8_t* s
    cdef Py_ssize_t k
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
        elif parse_scope(d, &d.sc_attrs, s, s + k, &name, &name_n, &ver, &ver_n,
                         &dropped) < 0:
            return -1
    if (put_interned(d, &d.sc_names, &d.sc_name, name, name_n, True,
                     "InstrumentationScope.name") < 0
            or put_interned(d, &d.sc_versions, &d.sc_version, ver, ver_n, True,
                            "InstrumentationScope.version") < 0
            or put_interned(d, &d.sc_urls, &d.sc_url, url, url_n, True,
                            "ScopeSpans.schema_url") < 0):
        return -1
    if (put_i32(&d.sc_attr_off, <int32_t>d.sc_attrs.n) < 0
            or put_u32(&d.sc_dropped, dropped) < 0):
        return fail(d, "out of memory", "ScopeSpans", p)
    return 0


cdef int parse_resource_spans(Dec* d, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef uint32_t f
    cdef int wt
    cdef uint32_t dropped = 0
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef const uint8_t* url = NULL
    cdef Py_ssize_t url_n = 0
    cdef const uint8_t* svc = NULL
    cdef Py_ssize_t svc_n = 0
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
        elif parse_resource(d, &d.res_attrs, s, s + k, &dropped) < 0:
            return -1
    svc, svc_n = d.default_service, d.default_service_n
    resource_service(&d.res_attrs, (<const int32_t*>d.res_attr_off.p)[res_ix], &svc, &svc_n)
    if (put_interned(d, &d.services, &d.res_service, svc, svc_n, False, "service.name") < 0
            or put_interned(d, &d.res_urls, &d.res_url, url, url_n, True,
                            "ResourceSpans.schema_url") < 0):
        return -1
    if (put_i32(&d.res_attr_off, <int32_t>d.res_attrs.n) < 0
            or put_u32(&d.res_dropped, dropped) < 0):
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


# -- resource and scope spread over the span rows ---------------------------------------

cdef inline void* vec_fill(Vec* v, Py_ssize_t nbytes) noexcept nogil:
    """Make ``v`` exactly ``nbytes`` long (contents to be written by the caller)."""
    v.n = 0
    if vec_reserve(v, nbytes if nbytes else 8) < 0:
        return NULL
    v.n = nbytes
    return v.p


cdef int gather32(Vec* out, const Vec* src, const int32_t* ix, Py_ssize_t n) noexcept nogil:
    cdef int32_t* o = <int32_t*>vec_fill(out, 4 * n)
    cdef const int32_t* s = <const int32_t*>src.p
    cdef Py_ssize_t i
    if o == NULL:
        return -1
    for i in range(n):
        o[i] = s[ix[i]]
    return 0


cdef int str_range(StrVec* out, const StrVec* src, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Append strings ``lo:hi`` of ``src`` to ``out``: one copy of their bytes."""
    cdef const int32_t* so = <const int32_t*>src.off.p
    cdef Py_ssize_t base = out.data.n
    cdef Py_ssize_t j
    cdef int32_t* oo
    if vec_put(&out.data, src.data.p + so[lo], so[hi] - so[lo]) < 0 or out.data.n > 0x7FFFFFFF:
        return -1
    if vec_reserve(&out.off, 4 * (hi - lo)) < 0:
        return -1
    oo = <int32_t*>(out.off.p + out.off.n)
    for j in range(lo, hi):
        oo[j - lo] = <int32_t>(base + so[j + 1] - so[lo])
    out.off.n += 4 * (hi - lo)
    return 0


cdef int gather_attrs(AttrTab* out, Vec* out_off, AttrTab* src, const int32_t* src_off,
                      const int32_t* ix, Py_ssize_t n) noexcept nogil:
    """Row ``i`` of ``out`` gets the attributes of group ``ix[i]`` of ``src``.

    Arrow lists cannot share child ranges, so a resource's attributes are
    copied once per span; the dictionaries move over whole.
    """
    cdef Py_ssize_t i, lo, hi, m, total = 0
    cdef int32_t* off
    for i in range(n):
        total += src_off[ix[i] + 1] - src_off[ix[i]]
    if total > 0x7FFFFFFF:
        return -1
    off = <int32_t*>vec_fill(out_off, 4 * (n + 1))
    if (off == NULL or vec_fill(&out.key, 4 * total) == NULL
            or vec_fill(&out.type, total) == NULL or vec_fill(&out.str, 4 * total) == NULL
            or vec_fill(&out.ival, 8 * total) == NULL or vec_fill(&out.dval, 8 * total) == NULL
            or vec_fill(&out.bval, total) == NULL):
        return -1
    off[0] = 0
    m = 0
    for i in range(n):
        lo = src_off[ix[i]]
        hi = src_off[ix[i] + 1]
        if hi > lo:
            memcpy(out.key.p + 4 * m, src.key.p + 4 * lo, 4 * (hi - lo))
            memcpy(out.type.p + m, src.type.p + lo, hi - lo)
            memcpy(out.str.p + 4 * m, src.str.p + 4 * lo, 4 * (hi - lo))
            memcpy(out.ival.p + 8 * m, src.ival.p + 8 * lo, 8 * (hi - lo))
            memcpy(out.dval.p + 8 * m, src.dval.p + 8 * lo, 8 * (hi - lo))
            memcpy(out.bval.p + m, src.bval.p + lo, hi - lo)
            if str_range(&out.bytes, &src.bytes, lo, hi) < 0:
                return -1
            if str_range(&out.any, &src.any, lo, hi) < 0:
                return -1
            m += hi - lo
        off[i + 1] = <int32_t>m
    out.n = total
    out.keys = src.keys
    out.strs = src.strs
    memset(&src.keys, 0, sizeof(Dict))
    memset(&src.strs, 0, sizeof(Dict))
    return 0


cdef int spread(Dec* d) noexcept nogil:
    cdef Py_ssize_t n = d.n_spans
    cdef const int32_t* rix = <const int32_t*>d.resource_ix.p
    cdef const int32_t* six = <const int32_t*>d.scope_ix.p
    if n == 0:
        return 0
    if (gather32(&d.row_service, &d.res_service, rix, n) < 0
            or gather32(&d.row_res_url, &d.res_url, rix, n) < 0
            or gather32(&d.row_res_dropped, &d.res_dropped, rix, n) < 0
            or gather32(&d.row_sc_name, &d.sc_name, six, n) < 0
            or gather32(&d.row_sc_version, &d.sc_version, six, n) < 0
            or gather32(&d.row_sc_url, &d.sc_url, six, n) < 0
            or gather32(&d.row_sc_dropped, &d.sc_dropped, six, n) < 0
            or gather_attrs(&d.row_res_attrs, &d.row_res_attr_off, &d.res_attrs,
                            <const int32_t*>d.res_attr_off.p, rix, n) < 0
            or gather_attrs(&d.row_sc_attrs, &d.row_sc_attr_off, &d.sc_attrs,
                            <const int32_t*>d.sc_attr_off.p, six, n) < 0):
        return -1
    return 0


# -- Arrow C data interface ---------------------------------------------------------------

cdef struct ArrowArray


ctypedef void (*release_fn)(ArrowArray*) noexcept nogil


cdef struct ArrowArray:
    # https://arrow.apache.org/docs/format/CDataInterface.html#the-arrowarray-structure
    int64_t length
    int64_t null_count
    int64_t offset
    int64_t n_buffers
    int64_t n_children
    const void** buffers
    ArrowArray** children
    ArrowArray* dictionary
    release_fn release
    void* private_data


cdef struct Arena:
    # every block of one exported batch; the root's release frees them all
    void** blocks
    Py_ssize_t n
    Py_ssize_t cap
    bint failed
    # small allocations (array structs, bitmaps) come out of shared chunks
    char* chunk
    size_t used
    size_t size


cdef void arena_free(Arena* a) noexcept nogil:
    cdef Py_ssize_t i
    if a == NULL:
        return
    for i in range(a.n):
        free(a.blocks[i])
    free(a.blocks)
    free(a)


cdef void release_child(ArrowArray* x) noexcept nogil:
    # children live in their root's arena
    x.release = NULL


cdef void release_root(ArrowArray* x) noexcept nogil:
    arena_free(<Arena*>x.private_data)
    x.private_data = NULL
    x.release = NULL


cdef void* own(Arena* a, void* p) noexcept nogil:
    cdef void** b
    cdef Py_ssize_t cap
    if p == NULL:
        a.failed = True
        return NULL
    if a.n == a.cap:
        cap = a.cap * 2 if a.cap else 128
        b = <void**>realloc(a.blocks, cap * sizeof(void*))
        if b == NULL:
            free(p)
            a.failed = True
            return NULL
        a.blocks = b
        a.cap = cap
    a.blocks[a.n] = p
    a.n += 1
    return p


cdef void* bump(Arena* a, size_t size) noexcept nogil:
    """``size`` zeroed bytes, 16-byte aligned, owned by the arena."""
    cdef size_t chunk
    size = (size + 15) & ~(<size_t>15)
    if a.chunk == NULL or a.used + size > a.size:
        chunk = size if size > 16384 else 16384
        a.chunk = <char*>own(a, calloc(1, chunk))
        if a.chunk == NULL:
            return NULL
        a.size = chunk
        a.used = 0
    a.used += size
    return a.chunk + a.used - size


cdef void* take(Arena* a, Vec* v) noexcept nogil:
    """Hand ``v``'s memory to the arena (Arrow buffers must not be NULL, even when empty)."""
    cdef void* p = v.p
    cdef void* q
    if p != NULL and v.cap - v.n > 4096:
        # give back a reservation that was not used (shrinking in place is cheap)
        q = realloc(p, v.n if v.n else 8)
        if q != NULL:
            p = q
    v.p = NULL
    v.n = 0
    v.cap = 0
    if p == NULL:
        p = calloc(1, 8)
    return own(a, p)


cdef ArrowArray* node(Arena* a, int64_t length, int64_t nulls, int nbuf,
                      int nchild) noexcept nogil:
    cdef size_t size = sizeof(ArrowArray) + (nbuf + nchild) * sizeof(void*)
    cdef char* blk = <char*>bump(a, size)
    cdef ArrowArray* x = <ArrowArray*>blk
    if blk == NULL:
        return NULL
    x.length = length
    x.null_count = nulls
    x.n_buffers = nbuf
    x.n_children = nchild
    x.buffers = <const void**>(blk + sizeof(ArrowArray))
    x.children = <ArrowArray**>(blk + sizeof(ArrowArray) + nbuf * sizeof(void*))
    x.release = release_child
    return x


cdef enum:
    # which rows a bitmap marks valid
    VALID_IX = 0    # int32 index >= 0 (the -1 under a null becomes 0)
    VALID_U8 = 1    # uint8 != 0
    VALID_LEN = 2   # string of non-zero length (int32 offsets)


cdef const void* bitmap(Arena* a, void* col, Py_ssize_t n, int how,
                        int64_t* nulls) noexcept nogil:
    """A validity bitmap (NULL when every row is valid), counting the nulls."""
    cdef uint8_t* bm = <uint8_t*>bump(a, (n >> 3) + 1)
    cdef int32_t* ix = <int32_t*>col
    cdef const uint8_t* u8 = <const uint8_t*>col
    cdef Py_ssize_t i
    cdef int64_t k = 0
    cdef bint ok
    if bm == NULL:
        return NULL
    for i in range(n):
        if how == VALID_IX:
            ok = ix[i] >= 0
            if not ok:
                ix[i] = 0
        elif how == VALID_U8:
            ok = u8[i] != 0
        else:
            ok = ix[i + 1] > ix[i]
        if ok:
            bm[i >> 3] |= <uint8_t>(1 << (i & 7))
        else:
            k += 1
    nulls[0] = k
    return bm if k else NULL


cdef enum:
    # the attribute struct's nullable children, by the type that makes them valid
    B_STR = 0
    B_BOOL = 1
    B_INT = 2
    B_DOUBLE = 3
    B_ANY = 4
    B_BYTES = 5
    N_TYPED = 6


cdef int type_bitmaps(Arena* a, const int8_t* t, Py_ssize_t n, const void** bms,
                      int64_t* nulls) noexcept nogil:
    """Validity of the attribute struct's typed children, in one pass over ``type``."""
    cdef uint8_t* bm[N_TYPED]
    cdef Py_ssize_t count[N_TYPED]
    cdef Py_ssize_t i
    cdef int k
    cdef int8_t ti
    for k in range(N_TYPED):
        bm[k] = <uint8_t*>bump(a, (n >> 3) + 1)
        if bm[k] == NULL:
            return -1
        count[k] = 0
    for i in range(n):
        ti = t[i]
        # AttrType numbering: STRING 1, BOOL 2, INT 3, DOUBLE 4, ARRAY 5, KVLIST 6, BYTES 7
        if ti < 1 or ti > 7:
            continue
        k = ti - 1 if ti < 6 else (B_ANY if ti == 6 else B_BYTES)
        bm[k][i >> 3] |= <uint8_t>(1 << (i & 7))
        count[k] += 1
    for k in range(N_TYPED):
        nulls[k] = n - count[k]
        bms[k] = bm[k] if count[k] != n else NULL
    return 0


cdef ArrowArray* a_prim(Arena* a, Vec* v, Py_ssize_t n, const void* bm,
                        int64_t nulls) noexcept nogil:
    cdef ArrowArray* x = node(a, n, nulls, 2, 0)
    if x != NULL:
        x.buffers[0] = bm
        x.buffers[1] = take(a, v)
    return x


cdef ArrowArray* a_str(Arena* a, StrVec* s, Py_ssize_t n, const void* bm,
                       int64_t nulls) noexcept nogil:
    cdef ArrowArray* x = node(a, n, nulls, 3, 0)
    if x != NULL:
        x.buffers[0] = bm
        x.buffers[1] = take(a, &s.off)
        x.buffers[2] = take(a, &s.data)
    return x


cdef ArrowArray* a_text(Arena* a, StrVec* s, Py_ssize_t n, bint empty_is_null) noexcept nogil:
    cdef int64_t nulls = 0
    cdef const void* bm = NULL
    if empty_is_null:
        bm = bitmap(a, s.off.p, n, VALID_LEN, &nulls)
    return a_str(a, s, n, bm, nulls)


cdef ArrowArray* a_dict(Arena* a, Vec* ix, Py_ssize_t n, Dict* values) noexcept nogil:
    """A dictionary<int32, utf8> column; indices of -1 are nulls."""
    cdef int64_t nulls = 0
    cdef const void* bm = bitmap(a, ix.p, n, VALID_IX, &nulls)
    cdef ArrowArray* x = a_prim(a, ix, n, bm, nulls)
    if x != NULL:
        x.dictionary = a_str(a, &values.s, values.n, NULL, 0)
    return x


cdef ArrowArray* a_bool(Arena* a, Vec* v, Py_ssize_t n, const void* bm,
                        int64_t nulls) noexcept nogil:
    cdef uint8_t* bits = <uint8_t*>bump(a, (n >> 3) + 1)
    cdef ArrowArray* x = node(a, n, nulls, 2, 0)
    cdef Py_ssize_t i
    if x == NULL or bits == NULL:
        return NULL
    for i in range(n):
        if v.p[i]:
            bits[i >> 3] |= <uint8_t>(1 << (i & 7))
    x.buffers[0] = bm
    x.buffers[1] = bits
    return x


cdef ArrowArray* a_list(Arena* a, Vec* off, Py_ssize_t n, ArrowArray* child) noexcept nogil:
    cdef ArrowArray* x = node(a, n, 0, 2, 1)
    if x != NULL:
        x.buffers[1] = take(a, off)
        x.children[0] = child
    return x


cdef ArrowArray* a_attrs(Arena* a, Vec* off, Py_ssize_t n, AttrTab* t) noexcept nogil:
    """list<ATTRIBUTE_STRUCT>: the struct's children are the table's columns."""
    cdef Py_ssize_t m = t.n
    cdef const int8_t* ty = <const int8_t*>t.type.p
    cdef ArrowArray* s = node(a, m, 0, 1, 8)
    cdef int64_t nulls[N_TYPED]
    cdef const void* bm[N_TYPED]
    if s == NULL or type_bitmaps(a, ty, m, bm, nulls) < 0:
        return NULL
    s.children[0] = a_dict(a, &t.key, m, &t.keys)
    s.children[2] = a_prim(a, &t.str, m, bm[B_STR], nulls[B_STR])
    if s.children[2] != NULL:
        s.children[2].dictionary = a_str(a, &t.strs.s, t.strs.n, NULL, 0)
    s.children[3] = a_prim(a, &t.ival, m, bm[B_INT], nulls[B_INT])
    s.children[4] = a_prim(a, &t.dval, m, bm[B_DOUBLE], nulls[B_DOUBLE])
    s.children[5] = a_bool(a, &t.bval, m, bm[B_BOOL], nulls[B_BOOL])
    s.children[6] = a_str(a, &t.bytes, m, bm[B_BYTES], nulls[B_BYTES])
    s.children[7] = a_str(a, &t.any, m, bm[B_ANY], nulls[B_ANY])
    # the type column last: the bitmaps above read it before it moves to the arena
    s.children[1] = a_prim(a, &t.type, m, NULL, 0)
    return a_list(a, off, off.n // 4 - 1 if off.n else 0, s)


cdef ArrowArray* a_events(Arena* a, Dec* d) noexcept nogil:
    cdef Py_ssize_t m = d.n_events
    cdef ArrowArray* s = node(a, m, 0, 1, 4)
    if s == NULL:
        return NULL
    s.children[0] = a_prim(a, &d.ev_time, m, NULL, 0)
    s.children[1] = a_text(a, &d.ev_name, m, False)
    s.children[2] = a_attrs(a, &d.ev_attr_off, m, &d.ev_attrs)
    s.children[3] = a_prim(a, &d.ev_dropped, m, NULL, 0)
    return a_list(a, &d.event_off, d.n_spans, s)


cdef ArrowArray* a_links(Arena* a, Dec* d) noexcept nogil:
    cdef Py_ssize_t m = d.n_links
    cdef ArrowArray* s = node(a, m, 0, 1, 6)
    if s == NULL:
        return NULL
    s.children[0] = a_prim(a, &d.ln_trace_id, m, NULL, 0)
    s.children[1] = a_prim(a, &d.ln_span_id, m, NULL, 0)
    s.children[2] = a_text(a, &d.ln_trace_state, m, True)
    s.children[3] = a_prim(a, &d.ln_flags, m, NULL, 0)
    s.children[4] = a_attrs(a, &d.ln_attr_off, m, &d.ln_attrs)
    s.children[5] = a_prim(a, &d.ln_dropped, m, NULL, 0)
    return a_list(a, &d.link_off, d.n_spans, s)


cdef enum:
    N_SPAN_COLUMNS = 26


cdef int export_spans(Dec* d, ArrowArray* root) noexcept nogil:
    """Fill ``root`` (a struct array of SPAN_SCHEMA's columns) with the decoded buffers."""
    cdef Arena* a = <Arena*>calloc(1, sizeof(Arena))
    cdef Py_ssize_t n = d.n_spans
    cdef ArrowArray* top
    cdef ArrowArray** c
    cdef int64_t nulls = 0
    cdef const void* bm
    cdef int i
    if a == NULL:
        return -1
    top = node(a, n, 0, 1, N_SPAN_COLUMNS)
    if top == NULL:
        arena_free(a)
        return -1
    c = top.children
    c[0] = a_prim(a, &d.trace_id, n, NULL, 0)
    c[1] = a_prim(a, &d.span_id, n, NULL, 0)
    bm = bitmap(a, d.parent_valid.p, n, VALID_U8, &nulls)
    c[2] = a_prim(a, &d.parent, n, bm, nulls)
    c[3] = a_dict(a, &d.trace_state, n, &d.trace_states)
    c[4] = a_prim(a, &d.flags, n, NULL, 0)
    c[5] = a_dict(a, &d.name, n, &d.names)
    c[6] = a_prim(a, &d.kind, n, NULL, 0)
    c[7] = a_prim(a, &d.start, n, NULL, 0)
    c[8] = a_prim(a, &d.end, n, NULL, 0)
    c[9] = a_prim(a, &d.status_code, n, NULL, 0)
    c[10] = a_text(a, &d.status_message, n, True)
    c[11] = a_dict(a, &d.row_service, n, &d.services)
    c[12] = a_attrs(a, &d.attr_off, n, &d.attrs)
    c[13] = a_prim(a, &d.dropped_attrs, n, NULL, 0)
    c[14] = a_events(a, d)
    c[15] = a_prim(a, &d.dropped_events, n, NULL, 0)
    c[16] = a_links(a, d)
    c[17] = a_prim(a, &d.dropped_links, n, NULL, 0)
    c[18] = a_attrs(a, &d.row_res_attr_off, n, &d.row_res_attrs)
    c[19] = a_prim(a, &d.row_res_dropped, n, NULL, 0)
    c[20] = a_dict(a, &d.row_res_url, n, &d.res_urls)
    c[21] = a_dict(a, &d.row_sc_name, n, &d.sc_names)
    c[22] = a_dict(a, &d.row_sc_version, n, &d.sc_versions)
    c[23] = a_attrs(a, &d.row_sc_attr_off, n, &d.row_sc_attrs)
    c[24] = a_prim(a, &d.row_sc_dropped, n, NULL, 0)
    c[25] = a_dict(a, &d.row_sc_url, n, &d.sc_urls)
    for i in range(N_SPAN_COLUMNS):
        if c[i] == NULL:
            a.failed = True
    if a.failed:
        arena_free(a)
        return -1
    memcpy(root, top, sizeof(ArrowArray))
    root.release = release_root
    root.private_data = a
    return 0


cdef object _decode_error(Dec* d, str message):
    cdef str what = (<bytes>d.err).decode()
    if d.too_deep:
        key = (<bytes>d.key[:d.key_n]).decode("utf-8", "replace") if d.key != NULL else ""
        what = f"attribute {key!r} nests arrays / kvlists deeper than {d.max_depth}"
    return DecodeError(f"malformed {message}: {what} (in {(<bytes>d.where).decode()}, "
                       f"at byte {d.err_pos})", d.err_pos)


class DecodeError(ValueError):
    """Malformed OTLP protobuf; ``offset`` is the byte where it was found."""

    def __init__(self, message, offset):
        super().__init__(message)
        self.offset = offset


def decode_traces(const uint8_t[::1] buf, int max_depth, bytes default_service, schema):
    """Decode an ExportTraceServiceRequest into a pyarrow RecordBatch in ``schema``.

    ``schema`` must be knhk's SPAN_SCHEMA (the column layout is fixed here).
    Raises ``DecodeError`` (a ValueError) naming the message and byte offset
    of the first fault.
    """
    cdef Dec d
    cdef ArrowArray root
    cdef int rc
    cdef Py_ssize_t n = buf.shape[0]
    cdef const uint8_t* p = &buf[0] if n else <const uint8_t*>""
    memset(&d, 0, sizeof(Dec))
    memset(&root, 0, sizeof(ArrowArray))
    d.max_depth = max_depth
    d.base = p
    d.default_service = <const uint8_t*>PyBytes_AS_STRING(default_service)
    d.default_service_n = len(default_service)
    try:
        if dec_init(&d) < 0 or dec_presize(&d, n) < 0:
            raise MemoryError("out of memory decoding an OTLP request")
        with nogil:
            rc = parse_request(&d, p, p + n)
            if rc == 0:
                rc = spread(&d)
                if rc < 0:
                    rc = -2
            if rc == 0:
                rc = export_spans(&d, &root)
                if rc < 0:
                    rc = -2
        if rc == -2:
            raise MemoryError("out of memory decoding an OTLP request")
        if rc < 0:
            raise _decode_error(&d, "ExportTraceServiceRequest")
        try:
            return _import_batch(<uintptr_t>&root, schema)
        finally:
            if root.release != NULL:
                root.release(&root)
    finally:
        dec_free(&d)


from pyarrow import RecordBatch as _RecordBatch  # noqa: E402

_import_batch = _RecordBatch._import_from_c


# -- encoder: views over an exported record batch ------------------------------------------

cdef struct SV:
    # a string / binary / dictionary<int32, utf8> column of an exported batch
    const uint8_t* valid    # validity bitmap, or NULL
    int64_t off             # the array's offset (into valid and idx / soff)
    const int32_t* idx      # dictionary indices, or NULL for plain strings
    const int32_t* soff     # string offsets (the dictionary's, already at its offset)
    const uint8_t* data


cdef struct AV:
    # a list<ATTRIBUTE_STRUCT> column: list offsets + the struct's children
    const int32_t* list_off
    SV key
    const int8_t* type
    SV str
    const int64_t* ival
    const double* dval
    const uint8_t* bbits
    int64_t boff
    SV bytes
    SV any


cdef const char* _EMPTY = b"\0\0\0\0\0\0\0\0"


cdef inline bint bit(const uint8_t* bm, int64_t i) noexcept nogil:
    return (bm[i >> 3] >> (i & 7)) & 1


cdef inline Py_ssize_t sget(const SV* c, Py_ssize_t i, const uint8_t** p) noexcept nogil:
    cdef int64_t j = i + c.off
    if c.valid != NULL and not bit(c.valid, j):
        p[0] = NULL
        return 0
    if c.idx != NULL:
        j = c.idx[j]
    p[0] = c.data + c.soff[j]
    return c.soff[j + 1] - c.soff[j]


cdef void sv_init(SV* v, const ArrowArray* x, int64_t extra) noexcept nogil:
    cdef const ArrowArray* s = x
    v.valid = <const uint8_t*>x.buffers[0] if x.null_count != 0 else NULL
    v.off = x.offset + extra
    v.idx = NULL
    if x.dictionary != NULL:
        v.idx = <const int32_t*>x.buffers[1]
        s = x.dictionary
        v.soff = <const int32_t*>s.buffers[1] + s.offset
    else:
        v.soff = <const int32_t*>s.buffers[1]
    v.data = <const uint8_t*>s.buffers[2] if s.buffers[2] != NULL else <const uint8_t*>_EMPTY
    if v.soff == NULL:
        v.soff = <const int32_t*>_EMPTY


cdef inline const void* fx(const ArrowArray* x, int64_t extra, int width) noexcept nogil:
    """The values of a fixed-width column, at its offset."""
    if x.buffers[1] == NULL:
        return _EMPTY
    return <const char*>x.buffers[1] + (x.offset + extra) * width


cdef void av_init(AV* a, const ArrowArray* lst, int64_t extra) noexcept nogil:
    cdef const ArrowArray* s = lst.children[0]
    cdef int64_t so = s.offset
    cdef const ArrowArray* b = s.children[5]
    a.list_off = <const int32_t*>fx(lst, extra, 4)
    sv_init(&a.key, s.children[0], so)
    a.type = <const int8_t*>fx(s.children[1], so, 1)
    sv_init(&a.str, s.children[2], so)
    a.ival = <const int64_t*>fx(s.children[3], so, 8)
    a.dval = <const double*>fx(s.children[4], so, 8)
    a.bbits = <const uint8_t*>b.buffers[1] if b.buffers[1] != NULL else <const uint8_t*>_EMPTY
    a.boff = b.offset + so
    sv_init(&a.bytes, s.children[6], so)
    sv_init(&a.any, s.children[7], so)


cdef struct Enc:
    Py_ssize_t n
    const uint8_t* trace_id
    const uint8_t* span_id
    const uint8_t* parent
    const uint8_t* parent_valid
    int64_t parent_off
    SV trace_state
    const uint32_t* flags
    SV name
    const int8_t* kind
    const int64_t* start
    const int64_t* end
    const int8_t* status_code
    SV status_message
    SV service
    AV attrs
    const uint32_t* dropped_attrs
    const int32_t* event_off
    const uint32_t* dropped_events
    const int32_t* link_off
    const uint32_t* dropped_links
    const int64_t* ev_time
    SV ev_name
    AV ev_attrs
    const uint32_t* ev_dropped
    const uint8_t* ln_trace_id
    const uint8_t* ln_span_id
    SV ln_trace_state
    const uint32_t* ln_flags
    AV ln_attrs
    const uint32_t* ln_dropped
    AV res_attrs
    const uint32_t* res_dropped
    SV res_schema_url
    SV sc_name
    SV sc_version
    AV sc_attrs
    const uint32_t* sc_dropped
    SV sc_schema_url
    # filled by the sizing pass
    uint8_t* add_service    # the row's resource lacks service.name: add its service
    uint8_t* new_res        # the row opens a ResourceSpans
    uint8_t* new_scope      # the row opens a ScopeSpans
    Py_ssize_t* span_size
    Py_ssize_t* ev_size     # by event position - event_off[0]
    Py_ssize_t* ln_size
    Py_ssize_t* res_size    # per ResourceSpans
    Py_ssize_t* sc_size     # per ScopeSpans


cdef void enc_init(Enc* e, const ArrowArray* rb) noexcept nogil:
    cdef int64_t o = rb.offset
    cdef const ArrowArray** c = <const ArrowArray**>rb.children
    cdef const ArrowArray* ev = c[14].children[0]
    cdef const ArrowArray* ln = c[16].children[0]
    e.n = rb.length
    e.trace_id = <const uint8_t*>fx(c[0], o, 16)
    e.span_id = <const uint8_t*>fx(c[1], o, 8)
    e.parent = <const uint8_t*>fx(c[2], o, 8)
    e.parent_valid = <const uint8_t*>c[2].buffers[0] if c[2].null_count != 0 else NULL
    e.parent_off = c[2].offset + o
    sv_init(&e.trace_state, c[3], o)
    e.flags = <const uint32_t*>fx(c[4], o, 4)
    sv_init(&e.name, c[5], o)
    e.kind = <const int8_t*>fx(c[6], o, 1)
    e.start = <const int64_t*>fx(c[7], o, 8)
    e.end = <const int64_t*>fx(c[8], o, 8)
    e.status_code = <const int8_t*>fx(c[9], o, 1)
    sv_init(&e.status_message, c[10], o)
    sv_init(&e.service, c[11], o)
    av_init(&e.attrs, c[12], o)
    e.dropped_attrs = <const uint32_t*>fx(c[13], o, 4)
    e.event_off = <const int32_t*>fx(c[14], o, 4)
    e.dropped_events = <const uint32_t*>fx(c[15], o, 4)
    e.link_off = <const int32_t*>fx(c[16], o, 4)
    e.dropped_links = <const uint32_t*>fx(c[17], o, 4)
    e.ev_time = <const int64_t*>fx(ev.children[0], ev.offset, 8)
    sv_init(&e.ev_name, ev.children[1], ev.offset)
    av_init(&e.ev_attrs, ev.children[2], ev.offset)
    e.ev_dropped = <const uint32_t*>fx(ev.children[3], ev.offset, 4)
    e.ln_trace_id = <const uint8_t*>fx(ln.children[0], ln.offset, 16)
    e.ln_span_id = <const uint8_t*>fx(ln.children[1], ln.offset, 8)
    sv_init(&e.ln_trace_state, ln.children[2], ln.offset)
    e.ln_flags = <const uint32_t*>fx(ln.children[3], ln.offset, 4)
    av_init(&e.ln_attrs, ln.children[4], ln.offset)
    e.ln_dropped = <const uint32_t*>fx(ln.children[5], ln.offset, 4)
    av_init(&e.res_attrs, c[18], o)
    e.res_dropped = <const uint32_t*>fx(c[19], o, 4)
    sv_init(&e.res_schema_url, c[20], o)
    sv_init(&e.sc_name, c[21], o)
    sv_init(&e.sc_version, c[22], o)
    av_init(&e.sc_attrs, c[23], o)
    e.sc_dropped = <const uint32_t*>fx(c[24], o, 4)
    sv_init(&e.sc_schema_url, c[25], o)


cdef inline bint s_eq(const SV* c, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef const uint8_t* a
    cdef const uint8_t* b
    cdef Py_ssize_t na, nb
    # one dictionary entry on both rows (the common case: neighbouring rows share their
    # resource and scope) is equal without reading the bytes
    if (c.idx != NULL and c.idx[i + c.off] == c.idx[j + c.off]
            and (c.valid == NULL or bit(c.valid, i + c.off) == bit(c.valid, j + c.off))):
        return True
    na = sget(c, i, &a)
    nb = sget(c, j, &b)
    return na == nb and (na == 0 or memcmp(a, b, na) == 0)


cdef bint attrs_eq(const AV* a, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef Py_ssize_t n = a.list_off[r0 + 1] - a.list_off[r0]
    cdef Py_ssize_t k, i, j
    cdef int8_t t
    cdef const SV* text
    if n != a.list_off[r1 + 1] - a.list_off[r1]:
        return False
    for k in range(n):
        i = a.list_off[r0] + k
        j = a.list_off[r1] + k
        t = a.type[i]
        if t != a.type[j] or not s_eq(&a.key, i, j):
            return False
        if t == 2 and bit(a.bbits, a.boff + i) != bit(a.bbits, a.boff + j):
            return False
        if t == 3 and a.ival[i] != a.ival[j]:
            return False
        if t == 4 and memcmp(&a.dval[i], &a.dval[j], 8) != 0:
            return False
        # the value's bytes, for the types that keep them in a string column
        text = (&a.str if t == 1 else &a.bytes if t == 7
                else &a.any if t == 5 or t == 6 else NULL)
        if text != NULL and not s_eq(text, i, j):
            return False
    return True


cdef inline int vsize(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline Py_ssize_t ld(Py_ssize_t k) noexcept nogil:
    """Bytes of a length-delimited field with a one-byte tag and a ``k``-byte body."""
    return 1 + vsize(<uint64_t>k) + k


cdef inline Py_ssize_t opt_str(const SV* c, Py_ssize_t i) noexcept nogil:
    cdef const uint8_t* p
    cdef Py_ssize_t k = sget(c, i, &p)
    return ld(k) if k else 0


cdef inline Py_ssize_t any_size(const AV* a, Py_ssize_t j) noexcept nogil:
    """Size of attribute ``j``'s AnyValue body."""
    cdef int8_t t = a.type[j]
    cdef const uint8_t* p
    if t == 1:
        return ld(sget(&a.str, j, &p))
    if t == 2:
        return 2
    if t == 3:
        return 1 + vsize(<uint64_t>a.ival[j])
    if t == 4:
        return 9
    if t == 7:
        return ld(sget(&a.bytes, j, &p))
    if t == 5 or t == 6:
        return sget(&a.any, j, &p)
    return 0


cdef inline Py_ssize_t kv_size(const AV* a, Py_ssize_t j) noexcept nogil:
    cdef const uint8_t* p
    cdef Py_ssize_t kn = sget(&a.key, j, &p)
    return (ld(kn) if kn else 0) + ld(any_size(a, j))


cdef Py_ssize_t attrs_size(const AV* a, Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t j, total = 0
    for j in range(a.list_off[row], a.list_off[row + 1]):
        total += ld(kv_size(a, j))
    return total


cdef bint has_service_name(const AV* a, Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t j
    cdef const uint8_t* p
    for j in range(a.list_off[row], a.list_off[row + 1]):
        if (a.type[j] == 1 and sget(&a.key, j, &p) == 12
                and memcmp(p, b"service.name", 12) == 0):
            return True
    return False


cdef bint adds_service(const SV* service, const AV* res_attrs, Py_ssize_t i) noexcept nogil:
    """Whether row ``i`` gets ``service.name`` added to its resource on the wire.

    When its resource has no string ``service.name`` and its ``service`` is set
    and not the SDK default ``unknown_service`` (shared by both encoders).
    """
    cdef const uint8_t* p
    cdef Py_ssize_t k = sget(service, i, &p)
    return (not has_service_name(res_attrs, i) and k > 0
            and not (k == 15 and memcmp(p, b"unknown_service", 15) == 0))


cdef inline Py_ssize_t service_kv_size(const SV* service, Py_ssize_t i) noexcept nogil:
    """Size of the added ``service.name`` KeyValue, field tag and length included."""
    cdef const uint8_t* p
    return ld(ld(12) + ld(ld(sget(service, i, &p))))


cdef inline Py_ssize_t vnz(uint64_t v) noexcept nogil:
    """A varint field with a one-byte tag, absent when zero."""
    return 1 + vsize(v) if v else 0


cdef Py_ssize_t event_size(const Enc* e, Py_ssize_t j) noexcept nogil:
    return ((9 if e.ev_time[j] else 0) + opt_str(&e.ev_name, j)
            + attrs_size(&e.ev_attrs, j) + vnz(e.ev_dropped[j]))


cdef Py_ssize_t link_size(const Enc* e, Py_ssize_t j) noexcept nogil:
    return (18 + 10 + opt_str(&e.ln_trace_state, j) + attrs_size(&e.ln_attrs, j)
            + vnz(e.ln_dropped[j]) + (5 if e.ln_flags[j] else 0))


cdef inline Py_ssize_t status_size(const Enc* e, Py_ssize_t i) noexcept nogil:
    return (opt_str(&e.status_message, i)
            + vnz(<uint64_t><int64_t>e.status_code[i]))


cdef Py_ssize_t span_size(const Enc* e, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j, k
    cdef Py_ssize_t total = 18 + 10 + opt_str(&e.trace_state, i) + opt_str(&e.name, i)
    if e.parent_valid == NULL or bit(e.parent_valid, e.parent_off + i):
        total += 10
    total += vnz(<uint64_t><int64_t>e.kind[i])
    total += (9 if e.start[i] else 0) + (9 if e.end[i] else 0)
    total += attrs_size(&e.attrs, i) + vnz(e.dropped_attrs[i])
    for j in range(e.event_off[i], e.event_off[i + 1]):
        k = event_size(e, j)
        e.ev_size[j - e.event_off[0]] = k
        total += ld(k)
    total += vnz(e.dropped_events[i])
    for j in range(e.link_off[i], e.link_off[i + 1]):
        k = link_size(e, j)
        e.ln_size[j - e.link_off[0]] = k
        total += ld(k)
    total += vnz(e.dropped_links[i]) + ld(status_size(e, i))
    if e.flags[i]:
        total += 6
    return total


cdef inline Py_ssize_t resource_size(const Enc* e, Py_ssize_t i) noexcept nogil:
    return (attrs_size(&e.res_attrs, i) + vnz(e.res_dropped[i])
            + (service_kv_size(&e.service, i) if e.add_service[i] else 0))


cdef inline Py_ssize_t scope_size(const Enc* e, Py_ssize_t i) noexcept nogil:
    return (opt_str(&e.sc_name, i) + opt_str(&e.sc_version, i) + attrs_size(&e.sc_attrs, i)
            + vnz(e.sc_dropped[i]))


cdef bint same_resource(const Enc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.res_dropped[i] == e.res_dropped[j] and s_eq(&e.res_schema_url, i, j)
            and e.add_service[i] == e.add_service[j]
            and (not e.add_service[i] or s_eq(&e.service, i, j))
            and attrs_eq(&e.res_attrs, i, j))


cdef bint same_scope(const Enc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.sc_dropped[i] == e.sc_dropped[j] and s_eq(&e.sc_name, i, j)
            and s_eq(&e.sc_version, i, j) and s_eq(&e.sc_schema_url, i, j)
            and attrs_eq(&e.sc_attrs, i, j))


cdef Py_ssize_t size_request(Enc* e) noexcept nogil:
    """First pass: group the rows, size every message; the request's size."""
    cdef Py_ssize_t i, r = -1, g = -1, total = 0
    for i in range(e.n):
        e.add_service[i] = adds_service(&e.service, &e.res_attrs, i)
    for i in range(e.n):
        e.new_res[i] = i == 0 or not same_resource(e, i - 1, i)
        e.new_scope[i] = e.new_res[i] or not same_scope(e, i - 1, i)
        if e.new_scope[i] and g >= 0:
            e.sc_size[g] += opt_str(&e.sc_schema_url, i - 1)
            e.res_size[r] += ld(e.sc_size[g])
        if e.new_res[i]:
            if r >= 0:
                e.res_size[r] += opt_str(&e.res_schema_url, i - 1)
                total += ld(e.res_size[r])
            r += 1
            e.res_size[r] = ld(resource_size(e, i))
        if e.new_scope[i]:
            g += 1
            e.sc_size[g] = ld(scope_size(e, i))
        e.span_size[i] = span_size(e, i)
        e.sc_size[g] += ld(e.span_size[i])
    if e.n:
        e.sc_size[g] += opt_str(&e.sc_schema_url, e.n - 1)
        e.res_size[r] += ld(e.sc_size[g]) + opt_str(&e.res_schema_url, e.n - 1)
        total += ld(e.res_size[r])
    return total


# -- encoder: the writing pass (every size is known, so no bounds checks) ------------------

cdef inline uint8_t* w_var(uint8_t* o, uint64_t v) noexcept nogil:
    while v >= 0x80:
        o[0] = <uint8_t>((v & 0x7F) | 0x80)
        o += 1
        v >>= 7
    o[0] = <uint8_t>v
    return o + 1


cdef inline uint8_t* w_len(uint8_t* o, uint8_t tag, Py_ssize_t k) noexcept nogil:
    o[0] = tag
    return w_var(o + 1, <uint64_t>k)


cdef inline uint8_t* w_bytes(uint8_t* o, uint8_t tag, const uint8_t* p,
                             Py_ssize_t k) noexcept nogil:
    o = w_len(o, tag, k)
    if k:
        memcpy(o, p, k)
    return o + k


cdef inline uint8_t* w_str(uint8_t* o, uint8_t tag, const SV* c, Py_ssize_t i) noexcept nogil:
    cdef const uint8_t* p
    cdef Py_ssize_t k = sget(c, i, &p)
    if k == 0:
        return o
    return w_bytes(o, tag, p, k)


cdef inline uint8_t* w_vnz(uint8_t* o, uint8_t tag, uint64_t v) noexcept nogil:
    if v == 0:
        return o
    o[0] = tag
    return w_var(o + 1, v)


cdef inline uint8_t* w_f64(uint8_t* o, uint8_t tag, const void* p) noexcept nogil:
    o[0] = tag
    memcpy(o + 1, p, 8)
    return o + 9


cdef uint8_t* w_attrs(uint8_t* o, uint8_t tag, const AV* a, Py_ssize_t row) noexcept nogil:
    cdef Py_ssize_t j, kn, pn
    cdef const uint8_t* kp
    cdef const uint8_t* vp
    cdef int8_t t
    cdef uint8_t b
    for j in range(a.list_off[row], a.list_off[row + 1]):
        o = w_len(o, tag, kv_size(a, j))
        kn = sget(&a.key, j, &kp)
        if kn:
            o = w_bytes(o, 0x0A, kp, kn)
        o = w_len(o, 0x12, any_size(a, j))
        t = a.type[j]
        if t == 1:
            pn = sget(&a.str, j, &vp)
            o = w_bytes(o, 0x0A, vp, pn)
        elif t == 7:
            pn = sget(&a.bytes, j, &vp)
            o = w_bytes(o, 0x3A, vp, pn)
        elif t == 2:
            b = bit(a.bbits, a.boff + j)
            o[0] = 0x10
            o[1] = b
            o += 2
        elif t == 3:
            o[0] = 0x18
            o = w_var(o + 1, <uint64_t>a.ival[j])
        elif t == 4:
            o = w_f64(o, 0x21, &a.dval[j])
        elif t == 5 or t == 6:
            pn = sget(&a.any, j, &vp)
            if pn:
                memcpy(o, vp, pn)
            o += pn
    return o


cdef uint8_t* w_service_kv(uint8_t* o, const SV* service, Py_ssize_t i) noexcept nogil:
    """The ``service.name`` KeyValue a row's resource gets (see :func:`adds_service`)."""
    cdef const uint8_t* p
    cdef Py_ssize_t k = sget(service, i, &p)
    o = w_len(o, 0x0A, ld(12) + ld(ld(k)))
    o = w_bytes(o, 0x0A, <const uint8_t*>b"service.name", 12)
    o = w_len(o, 0x12, ld(k))
    return w_bytes(o, 0x0A, p, k)


cdef uint8_t* w_span(uint8_t* o, const Enc* e, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t j
    cdef uint32_t fl
    o = w_len(o, 0x12, e.span_size[i])
    o = w_bytes(o, 0x0A, e.trace_id + 16 * i, 16)
    o = w_bytes(o, 0x12, e.span_id + 8 * i, 8)
    o = w_str(o, 0x1A, &e.trace_state, i)
    if e.parent_valid == NULL or bit(e.parent_valid, e.parent_off + i):
        o = w_bytes(o, 0x22, e.parent + 8 * i, 8)
    o = w_str(o, 0x2A, &e.name, i)
    o = w_vnz(o, 0x30, <uint64_t><int64_t>e.kind[i])
    if e.start[i]:
        o = w_f64(o, 0x39, &e.start[i])
    if e.end[i]:
        o = w_f64(o, 0x41, &e.end[i])
    o = w_attrs(o, 0x4A, &e.attrs, i)
    o = w_vnz(o, 0x50, e.dropped_attrs[i])
    for j in range(e.event_off[i], e.event_off[i + 1]):
        o = w_len(o, 0x5A, e.ev_size[j - e.event_off[0]])
        if e.ev_time[j]:
            o = w_f64(o, 0x09, &e.ev_time[j])
        o = w_str(o, 0x12, &e.ev_name, j)
        o = w_attrs(o, 0x1A, &e.ev_attrs, j)
        o = w_vnz(o, 0x20, e.ev_dropped[j])
    o = w_vnz(o, 0x60, e.dropped_events[i])
    for j in range(e.link_off[i], e.link_off[i + 1]):
        o = w_len(o, 0x6A, e.ln_size[j - e.link_off[0]])
        o = w_bytes(o, 0x0A, e.ln_trace_id + 16 * j, 16)
        o = w_bytes(o, 0x12, e.ln_span_id + 8 * j, 8)
        o = w_str(o, 0x1A, &e.ln_trace_state, j)
        o = w_attrs(o, 0x22, &e.ln_attrs, j)
        o = w_vnz(o, 0x28, e.ln_dropped[j])
        fl = e.ln_flags[j]
        if fl:
            o[0] = 0x35
            memcpy(o + 1, &fl, 4)
            o += 5
    o = w_vnz(o, 0x70, e.dropped_links[i])
    o = w_len(o, 0x7A, status_size(e, i))
    o = w_str(o, 0x12, &e.status_message, i)
    o = w_vnz(o, 0x18, <uint64_t><int64_t>e.status_code[i])
    fl = e.flags[i]
    if fl:
        # field 16, wire type 5: a two-byte tag
        o[0] = 0x85
        o[1] = 0x01
        memcpy(o + 2, &fl, 4)
        o += 6
    return o


cdef uint8_t* w_request(uint8_t* o, const Enc* e) noexcept nogil:
    cdef Py_ssize_t i, r = -1, g = -1
    for i in range(e.n):
        if e.new_res[i]:
            if i:
                o = w_str(o, 0x1A, &e.sc_schema_url, i - 1)
                o = w_str(o, 0x1A, &e.res_schema_url, i - 1)
            r += 1
            o = w_len(o, 0x0A, e.res_size[r])
            o = w_len(o, 0x0A, resource_size(e, i))
            o = w_attrs(o, 0x0A, &e.res_attrs, i)
            if e.add_service[i]:
                o = w_service_kv(o, &e.service, i)
            o = w_vnz(o, 0x10, e.res_dropped[i])
        elif e.new_scope[i]:
            o = w_str(o, 0x1A, &e.sc_schema_url, i - 1)
        if e.new_scope[i]:
            g += 1
            o = w_len(o, 0x12, e.sc_size[g])
            o = w_len(o, 0x0A, scope_size(e, i))
            o = w_str(o, 0x0A, &e.sc_name, i)
            o = w_str(o, 0x12, &e.sc_version, i)
            o = w_attrs(o, 0x1A, &e.sc_attrs, i)
            o = w_vnz(o, 0x20, e.sc_dropped[i])
        o = w_span(o, e, i)
    if e.n:
        o = w_str(o, 0x1A, &e.sc_schema_url, e.n - 1)
        o = w_str(o, 0x1A, &e.res_schema_url, e.n - 1)
    return o


def encode_traces(batch):
    """Encode a pyarrow RecordBatch in knhk's SPAN_SCHEMA into request bytes.

    The caller checks the schema; the batch is read through the Arrow C data
    interface, sized in one pass and written into one ``bytes`` in a second.
    """
    cdef ArrowArray rb
    cdef Enc e
    cdef Py_ssize_t n, ne, nl, total = 0
    cdef uint8_t* out
    cdef uint8_t* end
    cdef char* scratch = NULL
    cdef bytes result
    memset(&rb, 0, sizeof(ArrowArray))
    memset(&e, 0, sizeof(Enc))
    batch._export_to_c(<uintptr_t>&rb)
    try:
        enc_init(&e, &rb)
        n = e.n
        ne = e.event_off[n] - e.event_off[0] if n else 0
        nl = e.link_off[n] - e.link_off[0] if n else 0
        # one block for the sizing pass: 3 flags + 3 sizes per row, a size per event/link
        scratch = <char*>malloc(3 * n + sizeof(Py_ssize_t) * (3 * n + ne + nl) + 8)
        if scratch == NULL:
            raise MemoryError("out of memory encoding an OTLP request")
        e.span_size = <Py_ssize_t*>scratch
        e.res_size = e.span_size + n
        e.sc_size = e.res_size + n
        e.ev_size = e.sc_size + n
        e.ln_size = e.ev_size + ne
        e.add_service = <uint8_t*>(e.ln_size + nl)
        e.new_res = e.add_service + n
        e.new_scope = e.new_res + n
        with nogil:
            total = size_request(&e)
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <uint8_t*>PyBytes_AS_STRING(result)
        with nogil:
            end = w_request(out, &e)
        if end - out != total:
            raise RuntimeError(f"encode_traces wrote {end - out} bytes, sized {total}")
        return result
    finally:
        free(scratch)
        if rb.release != NULL:
            rb.release(&rb)


# == metrics: ExportMetricsServiceRequest <-> METRIC_SCHEMA ===============================
#
# Field numbers follow opentelemetry-proto ``metrics/v1/metrics.proto``. Gauge, Sum and
# Histogram points become rows; Summary and ExponentialHistogram points are counted
# (METRIC_SCHEMA has no columns for them) and so are dropped visibly, not silently.

cdef enum:
    # bits of MDec.vbits: which nullable columns a row has
    V_VALUE = 1
    V_INT = 2
    V_HIST = 4      # count, bounds, bucket_counts
    V_SUM = 8
    V_MIN = 16
    V_MAX = 32
    # MetricKind
    MK_GAUGE = 1
    MK_COUNTER = 2
    MK_UP_DOWN = 3
    MK_HISTOGRAM = 4


cdef struct MDec:
    Dec d               # error state, limits, default service (its buffers stay unused)
    # rows: one per data point
    Vec metric_ix
    Vec scope_ix
    Vec resource_ix
    Vec start
    Vec time
    Vec value
    Vec int_value
    Vec count
    Vec sum
    Vec min
    Vec max
    Vec vbits
    Vec bounds_off
    Vec bounds
    Vec counts_off
    Vec counts
    Vec flags
    Vec attr_off
    AttrTab attrs
    # metrics
    Dict names
    Vec m_name
    Dict descs
    Vec m_desc
    Dict units
    Vec m_unit
    Vec m_kind
    Vec m_temp
    Vec m_mono
    # scopes and resources
    Dict sc_names
    Vec sc_name
    Dict sc_versions
    Vec sc_version
    Dict services
    Vec res_service
    Vec res_attr_off
    AttrTab res_attrs
    # spread over the rows
    Vec row_name
    Vec row_desc
    Vec row_unit
    Vec row_kind
    Vec row_temp
    Vec row_mono
    Vec row_sc_name
    Vec row_sc_version
    Vec row_service
    Vec row_res_attr_off
    AttrTab row_res_attrs
    Py_ssize_t n
    Py_ssize_t n_metrics
    Py_ssize_t n_scopes
    Py_ssize_t n_resources
    Py_ssize_t skipped


cdef int mdec_init(MDec* m) noexcept nogil:
    if (put_i32(&m.bounds_off, 0) or put_i32(&m.counts_off, 0) or put_i32(&m.attr_off, 0)
            or attr_init(&m.attrs) or dict_init(&m.names) or dict_init(&m.descs)
            or dict_init(&m.units) or dict_init(&m.sc_names) or dict_init(&m.sc_versions)
            or dict_init(&m.services) or put_i32(&m.res_attr_off, 0)
            or attr_init(&m.res_attrs) or put_i32(&m.row_res_attr_off, 0)
            or str_init(&m.row_res_attrs.bytes) or str_init(&m.row_res_attrs.any)):
        return -1
    return 0


cdef void mdec_free(MDec* m) noexcept nogil:
    vec_free(&m.metric_ix)
    vec_free(&m.scope_ix)
    vec_free(&m.resource_ix)
    vec_free(&m.start)
    vec_free(&m.time)
    vec_free(&m.value)
    vec_free(&m.int_value)
    vec_free(&m.count)
    vec_free(&m.sum)
    vec_free(&m.min)
    vec_free(&m.max)
    vec_free(&m.vbits)
    vec_free(&m.bounds_off)
    vec_free(&m.bounds)
    vec_free(&m.counts_off)
    vec_free(&m.counts)
    vec_free(&m.flags)
    vec_free(&m.attr_off)
    vec_free(&m.m_name)
    vec_free(&m.m_desc)
    vec_free(&m.m_unit)
    vec_free(&m.m_kind)
    vec_free(&m.m_temp)
    vec_free(&m.m_mono)
    vec_free(&m.sc_name)
    vec_free(&m.sc_version)
    vec_free(&m.res_service)
    vec_free(&m.res_attr_off)
    vec_free(&m.row_name)
    vec_free(&m.row_desc)
    vec_free(&m.row_unit)
    vec_free(&m.row_kind)
    vec_free(&m.row_temp)
    vec_free(&m.row_mono)
    vec_free(&m.row_sc_name)
    vec_free(&m.row_sc_version)
    vec_free(&m.row_service)
    vec_free(&m.row_res_attr_off)
    attr_free(&m.attrs)
    attr_free(&m.res_attrs)
    attr_free(&m.row_res_attrs)
    dict_free(&m.names)
    dict_free(&m.descs)
    dict_free(&m.units)
    dict_free(&m.sc_names)
    dict_free(&m.sc_versions)
    dict_free(&m.services)
    dec_free(&m.d)


cdef int rd_packed64(Dec* d, Vec* out, const uint8_t* p, Py_ssize_t k, int wt,
                     const uint8_t** pp, const uint8_t* end, const char* where) noexcept nogil:
    """A repeated fixed64 / double field, packed (``p[:k]``) or one element at ``pp``."""
    cdef uint64_t u
    if wt == WT_LEN:
        if k % 8:
            return fail(d, "packed fixed64 field length is not a multiple of 8", where, p)
        if vec_put(out, p, k) < 0:
            return fail(d, "out of memory", where, p)
        return 0
    if rd_fixed64(d, pp, end, &u, where) < 0:
        return -1
    if vec_put(out, &u, 8) < 0:
        return fail(d, "out of memory", where, pp[0])
    return 0


cdef int parse_point(MDec* m, const uint8_t* p, const uint8_t* end, bint hist,
                     int32_t metric, int32_t scope, int32_t res) noexcept nogil:
    """A NumberDataPoint (``hist`` false) or HistogramDataPoint into one row."""
    cdef Dec* d = &m.d
    cdef const char* where = "HistogramDataPoint" if hist else "NumberDataPoint"
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u = 0
    cdef uint64_t t0 = 0
    cdef uint64_t t1 = 0
    cdef uint64_t count = 0
    cdef uint32_t flags = 0
    cdef double dv = 0.0
    cdef double sumv = 0.0
    cdef double minv = 0.0
    cdef double maxv = 0.0
    cdef int64_t iv = 0
    cdef uint8_t bits = V_HIST if hist else 0
    cdef const uint8_t* s
    cdef const uint8_t* at = p
    cdef Py_ssize_t k = 0
    cdef Py_ssize_t nb0 = m.bounds.n
    cdef Py_ssize_t nc0 = m.counts.n
    cdef Py_ssize_t i, nb, nc
    cdef uint64_t total, c
    cdef const uint64_t* cp
    cdef bint overflow
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, where) < 0:
            return -1
        if wt == WT_LEN and f == (9 if hist else 7):
            if rd_len(d, &p, end, &s, &k, where) < 0:
                return -1
            if parse_kv(d, &m.attrs, s, s + k, where) < 0:
                return -1
        elif wt == WT_I64 and (f == 2 or f == 3):
            if rd_fixed64(d, &p, end, &u, where) < 0:
                return -1
            if u >> 63:
                return fail(d, "timestamp beyond int64", where, p - 8)
            if f == 2:
                t0 = u
            else:
                t1 = u
        elif wt == WT_VARINT and f == (10 if hist else 8):
            if rd_varint(d, &p, end, &u, where) < 0:
                return -1
            flags = <uint32_t>u
        elif not hist and wt == WT_I64 and (f == 4 or f == 6):
            if rd_fixed64(d, &p, end, &u, where) < 0:
                return -1
            if f == 4:
                memcpy(&dv, &u, 8)
                bits = V_VALUE
            else:
                iv = <int64_t>u
                dv = <double>iv
                bits = V_VALUE | V_INT
        elif hist and wt == WT_I64 and (f == 4 or f == 5 or f == 11 or f == 12):
            if rd_fixed64(d, &p, end, &u, where) < 0:
                return -1
            if f == 4:
                count = u
            elif f == 5:
                memcpy(&sumv, &u, 8)
                bits |= V_SUM
            elif f == 11:
                memcpy(&minv, &u, 8)
                bits |= V_MIN
            else:
                memcpy(&maxv, &u, 8)
                bits |= V_MAX
        elif hist and (f == 6 or f == 7) and (wt == WT_LEN or wt == WT_I64):
            s = p
            if wt == WT_LEN and rd_len(d, &p, end, &s, &k, where) < 0:
                return -1
            if rd_packed64(d, &m.counts if f == 6 else &m.bounds, s, k, wt, &p, end,
                           where) < 0:
                return -1
        elif skip(d, &p, end, wt, where) < 0:
            return -1
    nb = (m.bounds.n - nb0) // 8
    nc = (m.counts.n - nc0) // 8
    if hist and nc:
        # bucket_counts is optional; when present the specification fixes its shape
        cp = <const uint64_t*>(m.counts.p + nc0)
        total = 0
        overflow = False
        for i in range(nc):
            c = total + cp[i]
            overflow = overflow or c < total
            total = c
        if nc != nb + 1 or total != count or overflow:
            return fail(d, "bucket counts do not fit the bounds (expected one more than "
                        "the bounds, summing to count)", where, at)
    if (put_i32(&m.metric_ix, metric) < 0 or put_i32(&m.scope_ix, scope) < 0
            or put_i32(&m.resource_ix, res) < 0 or put_i64(&m.start, <int64_t>t0) < 0
            or put_i64(&m.time, <int64_t>t1) < 0 or put_f64(&m.value, dv) < 0
            or put_i64(&m.int_value, iv) < 0 or put_i64(&m.count, <int64_t>count) < 0
            or put_f64(&m.sum, sumv) < 0 or put_f64(&m.min, minv) < 0
            or put_f64(&m.max, maxv) < 0 or put_u8(&m.vbits, bits) < 0
            or put_i32(&m.bounds_off, <int32_t>(m.bounds.n // 8)) < 0
            or put_i32(&m.counts_off, <int32_t>(m.counts.n // 8)) < 0
            or put_u32(&m.flags, flags) < 0
            or put_i32(&m.attr_off, <int32_t>m.attrs.n) < 0):
        return fail(d, "out of memory", where, p)
    m.n += 1
    return 0


cdef int parse_data(MDec* m, const uint8_t* p, const uint8_t* end, uint32_t which,
                    int32_t scope, int32_t res) noexcept nogil:
    """The data of one Metric: Gauge (5), Sum (7), Histogram (9); others are counted."""
    cdef Dec* d = &m.d
    cdef uint32_t f
    cdef int wt
    cdef uint64_t u = 0
    cdef int64_t temp = 0
    cdef bint mono = False
    cdef const uint8_t* s
    cdef const uint8_t* at = p
    cdef Py_ssize_t k
    cdef int32_t metric = <int32_t>m.n_metrics
    cdef const char* where = ("Gauge" if which == 5 else "Sum" if which == 7
                              else "Histogram" if which == 9 else "Metric")
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, where) < 0:
            return -1
        if f == 1 and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, where) < 0:
                return -1
            if which == 10 or which == 11:
                m.skipped += 1
            elif parse_point(m, s, s + k, which == 9, metric, scope, res) < 0:
                return -1
        elif f == 2 and wt == WT_VARINT and (which == 7 or which == 9):
            if rd_varint(d, &p, end, &u, where) < 0:
                return -1
            temp = <int32_t>u
        elif f == 3 and wt == WT_VARINT and which == 7:
            if rd_varint(d, &p, end, &u, where) < 0:
                return -1
            mono = u != 0
        elif skip(d, &p, end, wt, where) < 0:
            return -1
    if temp < 0 or temp > 2:
        return fail(d, "aggregation temporality is not 0, 1 or 2", where, at)
    if (put_u8(&m.m_kind, MK_GAUGE if which == 5 else MK_HISTOGRAM if which == 9
               else MK_COUNTER if mono else MK_UP_DOWN) < 0
            or put_u8(&m.m_temp, <uint8_t>temp) < 0 or put_u8(&m.m_mono, mono) < 0):
        return fail(d, "out of memory", where, p)
    return 0


cdef int parse_metric(MDec* m, const uint8_t* p, const uint8_t* end, int32_t scope,
                      int32_t res) noexcept nogil:
    cdef Dec* d = &m.d
    cdef uint32_t f
    cdef int wt
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef const uint8_t* name = NULL
    cdef Py_ssize_t name_n = 0
    cdef const uint8_t* desc = NULL
    cdef Py_ssize_t desc_n = 0
    cdef const uint8_t* unit = NULL
    cdef Py_ssize_t unit_n = 0
    cdef const uint8_t* data = NULL
    cdef Py_ssize_t data_n = 0
    cdef uint32_t which = 0
    # the data oneof: the last one on the wire wins, so find it before reading points
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "Metric") < 0:
            return -1
        if wt == WT_LEN and f <= 11 and f != 4 and f != 6 and f != 8:
            if rd_len(d, &p, end, &s, &k, "Metric") < 0:
                return -1
            if f == 1:
                name, name_n = s, k
            elif f == 2:
                desc, desc_n = s, k
            elif f == 3:
                unit, unit_n = s, k
            else:
                data, data_n, which = s, k, f
        elif skip(d, &p, end, wt, "Metric") < 0:
            return -1
    if which == 0:
        return 0
    if (put_interned(d, &m.names, &m.m_name, name, name_n, False, "Metric.name") < 0
            or put_interned(d, &m.descs, &m.m_desc, desc, desc_n, True,
                            "Metric.description") < 0
            or put_interned(d, &m.units, &m.m_unit, unit, unit_n, True, "Metric.unit") < 0):
        return -1
    if parse_data(m, data, data + data_n, which, scope, res) < 0:
        return -1
    m.n_metrics += 1
    return 0


cdef int parse_scope_metrics(MDec* m, const uint8_t* p, const uint8_t* end,
                             int32_t res) noexcept nogil:
    cdef Dec* d = &m.d
    cdef uint32_t f
    cdef int wt
    cdef uint32_t dropped = 0   # not kept: METRIC_SCHEMA has no column for it
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef const uint8_t* name = NULL
    cdef Py_ssize_t name_n = 0
    cdef const uint8_t* ver = NULL
    cdef Py_ssize_t ver_n = 0
    cdef int32_t scope = <int32_t>m.n_scopes
    m.n_scopes += 1
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ScopeMetrics") < 0:
            return -1
        if wt != WT_LEN or f > 2:
            if skip(d, &p, end, wt, "ScopeMetrics") < 0:
                return -1
            continue
        if rd_len(d, &p, end, &s, &k, "ScopeMetrics") < 0:
            return -1
        if f == 2:
            if parse_metric(m, s, s + k, scope, res) < 0:
                return -1
        elif parse_scope(d, NULL, s, s + k, &name, &name_n, &ver, &ver_n, &dropped) < 0:
            return -1
    if (put_interned(d, &m.sc_names, &m.sc_name, name, name_n, True,
                     "InstrumentationScope.name") < 0
            or put_interned(d, &m.sc_versions, &m.sc_version, ver, ver_n, True,
                            "InstrumentationScope.version") < 0):
        return -1
    return 0


cdef int parse_resource_metrics(MDec* m, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef Dec* d = &m.d
    cdef uint32_t f
    cdef int wt
    cdef uint32_t dropped = 0   # not kept: METRIC_SCHEMA has no column for it
    cdef const uint8_t* s
    cdef Py_ssize_t k
    cdef int32_t res = <int32_t>m.n_resources
    cdef const uint8_t* svc = NULL
    cdef Py_ssize_t svc_n = 0
    m.n_resources += 1
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ResourceMetrics") < 0:
            return -1
        if wt != WT_LEN or f > 2:
            if skip(d, &p, end, wt, "ResourceMetrics") < 0:
                return -1
            continue
        if rd_len(d, &p, end, &s, &k, "ResourceMetrics") < 0:
            return -1
        if f == 2:
            if parse_scope_metrics(m, s, s + k, res) < 0:
                return -1
        elif parse_resource(d, &m.res_attrs, s, s + k, &dropped) < 0:
            return -1
    svc, svc_n = d.default_service, d.default_service_n
    resource_service(&m.res_attrs, (<const int32_t*>m.res_attr_off.p)[res], &svc, &svc_n)
    if put_interned(d, &m.services, &m.res_service, svc, svc_n, False, "service.name") < 0:
        return -1
    if put_i32(&m.res_attr_off, <int32_t>m.res_attrs.n) < 0:
        return fail(d, "out of memory", "ResourceMetrics", p)
    return 0


cdef int parse_metrics_request(MDec* m, const uint8_t* p, const uint8_t* end) noexcept nogil:
    cdef Dec* d = &m.d
    cdef uint32_t f
    cdef int wt
    cdef const uint8_t* s
    cdef Py_ssize_t k
    while p < end:
        if rd_tag(d, &p, end, &f, &wt, "ExportMetricsServiceRequest") < 0:
            return -1
        if f == 1 and wt == WT_LEN:
            if rd_len(d, &p, end, &s, &k, "ExportMetricsServiceRequest.resource_metrics") < 0:
                return -1
            if parse_resource_metrics(m, s, s + k) < 0:
                return -1
        elif skip(d, &p, end, wt, "ExportMetricsServiceRequest") < 0:
            return -1
    return 0


cdef int gather8(Vec* out, const Vec* src, const int32_t* ix, Py_ssize_t n) noexcept nogil:
    cdef uint8_t* o = <uint8_t*>vec_fill(out, n)
    cdef const uint8_t* s = <const uint8_t*>src.p
    cdef Py_ssize_t i
    if o == NULL:
        return -1
    for i in range(n):
        o[i] = s[ix[i]]
    return 0


cdef int mspread(MDec* m) noexcept nogil:
    cdef Py_ssize_t n = m.n
    cdef const int32_t* mix = <const int32_t*>m.metric_ix.p
    cdef const int32_t* six = <const int32_t*>m.scope_ix.p
    cdef const int32_t* rix = <const int32_t*>m.resource_ix.p
    if n == 0:
        return 0
    if (gather32(&m.row_name, &m.m_name, mix, n) < 0
            or gather32(&m.row_desc, &m.m_desc, mix, n) < 0
            or gather32(&m.row_unit, &m.m_unit, mix, n) < 0
            or gather8(&m.row_kind, &m.m_kind, mix, n) < 0
            or gather8(&m.row_temp, &m.m_temp, mix, n) < 0
            or gather8(&m.row_mono, &m.m_mono, mix, n) < 0
            or gather32(&m.row_sc_name, &m.sc_name, six, n) < 0
            or gather32(&m.row_sc_version, &m.sc_version, six, n) < 0
            or gather32(&m.row_service, &m.res_service, rix, n) < 0
            or gather_attrs(&m.row_res_attrs, &m.row_res_attr_off, &m.res_attrs,
                            <const int32_t*>m.res_attr_off.p, rix, n) < 0):
        return -1
    return 0


cdef const void* bits_bitmap(Arena* a, const uint8_t* vb, Py_ssize_t n, uint8_t mask,
                             int64_t* nulls) noexcept nogil:
    cdef uint8_t* bm = <uint8_t*>bump(a, (n >> 3) + 1)
    cdef Py_ssize_t i
    cdef int64_t k = 0
    if bm == NULL:
        return NULL
    for i in range(n):
        if vb[i] & mask:
            bm[i >> 3] |= <uint8_t>(1 << (i & 7))
        else:
            k += 1
    nulls[0] = k
    return bm if k else NULL


cdef ArrowArray* a_opt(Arena* a, Vec* v, Py_ssize_t n, const uint8_t* vb,
                       uint8_t mask) noexcept nogil:
    cdef int64_t nulls = 0
    cdef const void* bm = bits_bitmap(a, vb, n, mask, &nulls)
    return a_prim(a, v, n, bm, nulls)


cdef ArrowArray* a_numlist(Arena* a, Vec* off, Vec* values, Py_ssize_t n,
                           const uint8_t* vb) noexcept nogil:
    """list<float64 | uint64>, null on rows that are not histograms."""
    cdef int64_t nulls = 0
    cdef const void* bm = bits_bitmap(a, vb, n, V_HIST, &nulls)
    cdef ArrowArray* x = a_list(a, off, n, a_prim(a, values, values.n // 8, NULL, 0))
    if x != NULL:
        x.buffers[0] = bm
        x.null_count = nulls
    return x


cdef enum:
    N_METRIC_COLUMNS = 22


cdef int export_metrics(MDec* m, ArrowArray* root) noexcept nogil:
    cdef Arena* a = <Arena*>calloc(1, sizeof(Arena))
    cdef Py_ssize_t n = m.n
    cdef ArrowArray* top
    cdef ArrowArray** c
    cdef const uint8_t* vb = <const uint8_t*>m.vbits.p
    cdef int i
    if a == NULL:
        return -1
    top = node(a, n, 0, 1, N_METRIC_COLUMNS)
    if top == NULL:
        arena_free(a)
        return -1
    c = top.children
    c[0] = a_dict(a, &m.row_name, n, &m.names)
    c[1] = a_dict(a, &m.row_desc, n, &m.descs)
    c[2] = a_dict(a, &m.row_unit, n, &m.units)
    c[3] = a_prim(a, &m.row_kind, n, NULL, 0)
    c[4] = a_prim(a, &m.row_temp, n, NULL, 0)
    c[5] = a_bool(a, &m.row_mono, n, NULL, 0)
    c[6] = a_prim(a, &m.start, n, NULL, 0)
    c[7] = a_prim(a, &m.time, n, NULL, 0)
    c[8] = a_opt(a, &m.value, n, vb, V_VALUE)
    c[9] = a_opt(a, &m.int_value, n, vb, V_INT)
    c[10] = a_opt(a, &m.count, n, vb, V_HIST)
    c[11] = a_opt(a, &m.sum, n, vb, V_SUM)
    c[12] = a_opt(a, &m.min, n, vb, V_MIN)
    c[13] = a_opt(a, &m.max, n, vb, V_MAX)
    c[14] = a_numlist(a, &m.bounds_off, &m.bounds, n, vb)
    c[15] = a_numlist(a, &m.counts_off, &m.counts, n, vb)
    c[16] = a_prim(a, &m.flags, n, NULL, 0)
    c[17] = a_dict(a, &m.row_service, n, &m.services)
    c[18] = a_attrs(a, &m.attr_off, n, &m.attrs)
    c[19] = a_attrs(a, &m.row_res_attr_off, n, &m.row_res_attrs)
    c[20] = a_dict(a, &m.row_sc_name, n, &m.sc_names)
    c[21] = a_dict(a, &m.row_sc_version, n, &m.sc_versions)
    for i in range(N_METRIC_COLUMNS):
        if c[i] == NULL:
            a.failed = True
    if a.failed:
        arena_free(a)
        return -1
    memcpy(root, top, sizeof(ArrowArray))
    root.release = release_root
    root.private_data = a
    return 0


def decode_metrics(const uint8_t[::1] buf, int max_depth, bytes default_service, schema):
    """Decode an ExportMetricsServiceRequest: (RecordBatch in ``schema``, points skipped).

    ``schema`` must be knhk's METRIC_SCHEMA. Summary and ExponentialHistogram
    points are not rows; their number is returned beside the batch.
    """
    cdef MDec m
    cdef ArrowArray root
    cdef int rc
    cdef Py_ssize_t n = buf.shape[0]
    cdef const uint8_t* p = &buf[0] if n else <const uint8_t*>""
    memset(&m, 0, sizeof(MDec))
    memset(&root, 0, sizeof(ArrowArray))
    m.d.max_depth = max_depth
    m.d.base = p
    m.d.default_service = <const uint8_t*>PyBytes_AS_STRING(default_service)
    m.d.default_service_n = len(default_service)
    try:
        if mdec_init(&m) < 0:
            raise MemoryError("out of memory decoding an OTLP request")
        with nogil:
            rc = parse_metrics_request(&m, p, p + n)
            if rc == 0:
                rc = -2 if mspread(&m) < 0 else 0
            if rc == 0:
                rc = -2 if export_metrics(&m, &root) < 0 else 0
        if rc == -2:
            raise MemoryError("out of memory decoding an OTLP request")
        if rc < 0:
            raise _decode_error(&m.d, "ExportMetricsServiceRequest")
        try:
            return _import_batch(<uintptr_t>&root, schema), m.skipped
        finally:
            if root.release != NULL:
                root.release(&root)
    finally:
        mdec_free(&m)


# -- metrics encoder ------------------------------------------------------------------------

cdef struct NV:
    # validity of a nullable fixed-width column
    const uint8_t* valid
    int64_t off


cdef inline bint nv_ok(const NV* v, Py_ssize_t i) noexcept nogil:
    return v.valid == NULL or bit(v.valid, v.off + i)


cdef inline void nv_init(NV* v, const ArrowArray* x, int64_t extra) noexcept nogil:
    v.valid = <const uint8_t*>x.buffers[0] if x.null_count != 0 else NULL
    v.off = x.offset + extra


cdef struct MEnc:
    Py_ssize_t n
    SV name
    SV desc
    SV unit
    const int8_t* kind
    const int8_t* temp
    const uint8_t* mono
    int64_t mono_off
    const int64_t* start
    const int64_t* time
    const double* value
    NV value_ok
    const int64_t* ival
    NV ival_ok
    const uint64_t* count
    NV count_ok
    const double* sum
    NV sum_ok
    const double* min
    NV min_ok
    const double* max
    NV max_ok
    const int32_t* bounds_off
    NV bounds_ok
    const double* bounds
    const int32_t* counts_off
    NV counts_ok
    const uint64_t* counts
    const uint32_t* flags
    SV service
    AV attrs
    AV res_attrs
    SV sc_name
    SV sc_version
    # the sizing pass
    uint8_t* add_service
    uint8_t* new_res
    uint8_t* new_scope
    uint8_t* new_metric
    Py_ssize_t* point_size
    Py_ssize_t* data_size      # per metric: the Gauge / Sum / Histogram body
    Py_ssize_t* metric_size    # per metric: the Metric body
    Py_ssize_t* sc_size
    Py_ssize_t* res_size
    Py_ssize_t bad_row


cdef void menc_init(MEnc* e, const ArrowArray* rb) noexcept nogil:
    cdef int64_t o = rb.offset
    cdef const ArrowArray** c = <const ArrowArray**>rb.children
    e.n = rb.length
    sv_init(&e.name, c[0], o)
    sv_init(&e.desc, c[1], o)
    sv_init(&e.unit, c[2], o)
    e.kind = <const int8_t*>fx(c[3], o, 1)
    e.temp = <const int8_t*>fx(c[4], o, 1)
    e.mono = <const uint8_t*>c[5].buffers[1] if c[5].buffers[1] != NULL else <const uint8_t*>_EMPTY
    e.mono_off = c[5].offset + o
    e.start = <const int64_t*>fx(c[6], o, 8)
    e.time = <const int64_t*>fx(c[7], o, 8)
    e.value = <const double*>fx(c[8], o, 8)
    nv_init(&e.value_ok, c[8], o)
    e.ival = <const int64_t*>fx(c[9], o, 8)
    nv_init(&e.ival_ok, c[9], o)
    e.count = <const uint64_t*>fx(c[10], o, 8)
    nv_init(&e.count_ok, c[10], o)
    e.sum = <const double*>fx(c[11], o, 8)
    nv_init(&e.sum_ok, c[11], o)
    e.min = <const double*>fx(c[12], o, 8)
    nv_init(&e.min_ok, c[12], o)
    e.max = <const double*>fx(c[13], o, 8)
    nv_init(&e.max_ok, c[13], o)
    e.bounds_off = <const int32_t*>fx(c[14], o, 4)
    nv_init(&e.bounds_ok, c[14], o)
    e.bounds = <const double*>fx(c[14].children[0], 0, 8)
    e.counts_off = <const int32_t*>fx(c[15], o, 4)
    nv_init(&e.counts_ok, c[15], o)
    e.counts = <const uint64_t*>fx(c[15].children[0], 0, 8)
    e.flags = <const uint32_t*>fx(c[16], o, 4)
    sv_init(&e.service, c[17], o)
    av_init(&e.attrs, c[18], o)
    av_init(&e.res_attrs, c[19], o)
    sv_init(&e.sc_name, c[20], o)
    sv_init(&e.sc_version, c[21], o)


cdef inline Py_ssize_t n_bounds(const MEnc* e, Py_ssize_t i) noexcept nogil:
    return e.bounds_off[i + 1] - e.bounds_off[i] if nv_ok(&e.bounds_ok, i) else 0


cdef inline Py_ssize_t n_counts(const MEnc* e, Py_ssize_t i) noexcept nogil:
    return e.counts_off[i + 1] - e.counts_off[i] if nv_ok(&e.counts_ok, i) else 0


cdef inline uint64_t hist_count(const MEnc* e, Py_ssize_t i) noexcept nogil:
    """``count``, or the sum of the bucket counts when it is null."""
    cdef uint64_t total = 0
    cdef Py_ssize_t j
    if nv_ok(&e.count_ok, i):
        return e.count[i]
    if nv_ok(&e.counts_ok, i):
        for j in range(e.counts_off[i], e.counts_off[i + 1]):
            total += e.counts[j]
    return total


cdef Py_ssize_t point_size(const MEnc* e, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t total = (9 if e.start[i] else 0) + (9 if e.time[i] else 0)
    cdef Py_ssize_t k
    total += attrs_size(&e.attrs, i) + vnz(e.flags[i])
    if e.kind[i] != MK_HISTOGRAM:
        if nv_ok(&e.ival_ok, i) or nv_ok(&e.value_ok, i):
            total += 9
        return total
    total += 9 if hist_count(e, i) else 0
    total += (9 if nv_ok(&e.sum_ok, i) else 0) + (9 if nv_ok(&e.min_ok, i) else 0)
    total += 9 if nv_ok(&e.max_ok, i) else 0
    k = n_counts(e, i)
    if k:
        total += ld(8 * k)
    k = n_bounds(e, i)
    if k:
        total += ld(8 * k)
    return total


cdef inline Py_ssize_t trailer_size(const MEnc* e, Py_ssize_t i) noexcept nogil:
    """The data message's fields after its points: temporality, is_monotonic."""
    cdef int8_t k = e.kind[i]
    if k == MK_GAUGE:
        return 0
    return vnz(<uint64_t><int64_t>e.temp[i]) + (2 if k == MK_COUNTER else 0)


cdef inline Py_ssize_t mresource_size(const MEnc* e, Py_ssize_t i) noexcept nogil:
    return attrs_size(&e.res_attrs, i) + (service_kv_size(&e.service, i) if e.add_service[i]
                                          else 0)


cdef inline Py_ssize_t mscope_size(const MEnc* e, Py_ssize_t i) noexcept nogil:
    return opt_str(&e.sc_name, i) + opt_str(&e.sc_version, i)


cdef bint same_mresource(const MEnc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.add_service[i] == e.add_service[j]
            and (not e.add_service[i] or s_eq(&e.service, i, j))
            and attrs_eq(&e.res_attrs, i, j))


cdef bint same_metric(const MEnc* e, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (e.kind[i] == e.kind[j] and e.temp[i] == e.temp[j]
            and bit(e.mono, e.mono_off + i) == bit(e.mono, e.mono_off + j)
            and s_eq(&e.name, i, j) and s_eq(&e.desc, i, j) and s_eq(&e.unit, i, j))


cdef inline void close_metric(MEnc* e, Py_ssize_t g, Py_ssize_t s, Py_ssize_t last) noexcept nogil:
    e.data_size[g] += trailer_size(e, last)
    e.metric_size[g] = (opt_str(&e.name, last) + opt_str(&e.desc, last)
                        + opt_str(&e.unit, last) + ld(e.data_size[g]))
    e.sc_size[s] += ld(e.metric_size[g])


cdef Py_ssize_t size_metrics(MEnc* e) noexcept nogil:
    """First pass: group the rows, size every message; the request's size (-1: bad kind)."""
    cdef Py_ssize_t i, k, r = -1, s = -1, g = -1, total = 0
    cdef int8_t kind
    for i in range(e.n):
        kind = e.kind[i]
        if kind < MK_GAUGE or kind > MK_HISTOGRAM:
            e.bad_row = i
            return -1
        e.add_service[i] = adds_service(&e.service, &e.res_attrs, i)
    for i in range(e.n):
        e.new_res[i] = i == 0 or not same_mresource(e, i - 1, i)
        e.new_scope[i] = (e.new_res[i] or not s_eq(&e.sc_name, i - 1, i)
                          or not s_eq(&e.sc_version, i - 1, i))
        e.new_metric[i] = e.new_scope[i] or not same_metric(e, i - 1, i)
        if e.new_metric[i] and g >= 0:
            close_metric(e, g, s, i - 1)
        if e.new_scope[i] and s >= 0:
            e.res_size[r] += ld(e.sc_size[s])
        if e.new_res[i] and r >= 0:
            total += ld(e.res_size[r])
        if e.new_res[i]:
            r += 1
            k = mresource_size(e, i)
            e.res_size[r] = ld(k) if k else 0
        if e.new_scope[i]:
            s += 1
            k = mscope_size(e, i)
            e.sc_size[s] = ld(k) if k else 0
        if e.new_metric[i]:
            g += 1
            e.data_size[g] = 0
        e.point_size[i] = point_size(e, i)
        e.data_size[g] += ld(e.point_size[i])
    if e.n:
        close_metric(e, g, s, e.n - 1)
        e.res_size[r] += ld(e.sc_size[s])
        total += ld(e.res_size[r])
    return total


cdef inline uint8_t* w_u64(uint8_t* o, uint8_t tag, uint64_t v) noexcept nogil:
    o[0] = tag
    memcpy(o + 1, &v, 8)
    return o + 9


cdef uint8_t* w_point(uint8_t* o, const MEnc* e, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t k
    cdef uint64_t c
    o = w_len(o, 0x0A, e.point_size[i])
    if e.start[i]:
        o = w_f64(o, 0x11, &e.start[i])
    if e.time[i]:
        o = w_f64(o, 0x19, &e.time[i])
    if e.kind[i] != MK_HISTOGRAM:
        if nv_ok(&e.ival_ok, i):
            o = w_f64(o, 0x31, &e.ival[i])
        elif nv_ok(&e.value_ok, i):
            o = w_f64(o, 0x21, &e.value[i])
        o = w_attrs(o, 0x3A, &e.attrs, i)
        return w_vnz(o, 0x40, e.flags[i])
    c = hist_count(e, i)
    if c:
        o = w_u64(o, 0x21, c)
    if nv_ok(&e.sum_ok, i):
        o = w_f64(o, 0x29, &e.sum[i])
    k = n_counts(e, i)
    if k:
        o = w_bytes(o, 0x32, <const uint8_t*>(e.counts + e.counts_off[i]), 8 * k)
    k = n_bounds(e, i)
    if k:
        o = w_bytes(o, 0x3A, <const uint8_t*>(e.bounds + e.bounds_off[i]), 8 * k)
    o = w_attrs(o, 0x4A, &e.attrs, i)
    o = w_vnz(o, 0x50, e.flags[i])
    if nv_ok(&e.min_ok, i):
        o = w_f64(o, 0x59, &e.min[i])
    if nv_ok(&e.max_ok, i):
        o = w_f64(o, 0x61, &e.max[i])
    return o


cdef inline uint8_t* w_trailer(uint8_t* o, const MEnc* e, Py_ssize_t i) noexcept nogil:
    cdef int8_t k = e.kind[i]
    if k == MK_GAUGE:
        return o
    o = w_vnz(o, 0x10, <uint64_t><int64_t>e.temp[i])
    if k == MK_COUNTER:
        o[0] = 0x18
        o[1] = 1
        o += 2
    return o


cdef uint8_t* w_metrics(uint8_t* o, const MEnc* e) noexcept nogil:
    cdef Py_ssize_t i, k, r = -1, s = -1, g = -1
    cdef int8_t kind
    for i in range(e.n):
        if e.new_metric[i] and i:
            o = w_trailer(o, e, i - 1)
        if e.new_res[i]:
            r += 1
            o = w_len(o, 0x0A, e.res_size[r])
            k = mresource_size(e, i)
            if k:
                o = w_len(o, 0x0A, k)
                o = w_attrs(o, 0x0A, &e.res_attrs, i)
                if e.add_service[i]:
                    o = w_service_kv(o, &e.service, i)
        if e.new_scope[i]:
            s += 1
            o = w_len(o, 0x12, e.sc_size[s])
            k = mscope_size(e, i)
            if k:
                o = w_len(o, 0x0A, k)
                o = w_str(o, 0x0A, &e.sc_name, i)
                o = w_str(o, 0x12, &e.sc_version, i)
        if e.new_metric[i]:
            g += 1
            o = w_len(o, 0x12, e.metric_size[g])
            o = w_str(o, 0x0A, &e.name, i)
            o = w_str(o, 0x12, &e.desc, i)
            o = w_str(o, 0x1A, &e.unit, i)
            kind = e.kind[i]
            o = w_len(o, 0x2A if kind == MK_GAUGE else 0x4A if kind == MK_HISTOGRAM else 0x3A,
                      e.data_size[g])
        o = w_point(o, e, i)
    if e.n:
        o = w_trailer(o, e, e.n - 1)
    return o


def encode_metrics(batch):
    """Encode a pyarrow RecordBatch in knhk's METRIC_SCHEMA into request bytes.

    Raises ``ValueError`` for a row whose ``kind`` is not a MetricKind.
    """
    cdef ArrowArray rb
    cdef MEnc e
    cdef Py_ssize_t n, total = 0
    cdef uint8_t* out
    cdef uint8_t* end
    cdef char* scratch = NULL
    cdef bytes result
    memset(&rb, 0, sizeof(ArrowArray))
    memset(&e, 0, sizeof(MEnc))
    batch._export_to_c(<uintptr_t>&rb)
    try:
        menc_init(&e, &rb)
        n = e.n
        scratch = <char*>malloc(4 * n + sizeof(Py_ssize_t) * 5 * n + 8)
        if scratch == NULL:
            raise MemoryError("out of memory encoding an OTLP request")
        e.point_size = <Py_ssize_t*>scratch
        e.data_size = e.point_size + n
        e.metric_size = e.data_size + n
        e.sc_size = e.metric_size + n
        e.res_size = e.sc_size + n
        e.add_service = <uint8_t*>(e.res_size + n)
        e.new_res = e.add_service + n
        e.new_scope = e.new_res + n
        e.new_metric = e.new_scope + n
        with nogil:
            total = size_metrics(&e)
        if total < 0:
            raise ValueError(f"encode_metrics: row {e.bad_row} has kind {e.kind[e.bad_row]}, "
                             "not a MetricKind (1 to 4)")
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <uint8_t*>PyBytes_AS_STRING(result)
        with nogil:
            end = w_metrics(out, &e)
        if end - out != total:
            raise RuntimeError(f"encode_metrics wrote {end - out} bytes, sized {total}")
        return result
    finally:
        free(scratch)
        if rb.release != NULL:
            rb.release(&rb)
