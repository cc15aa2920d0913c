# cython: freethreading_compatible = False
"""Jaeger agent wire encoder: span batch columns -> Thrift compact ``Agent.emitBatch`` datagrams.

One call groups the rows by process (service + resource attributes) and by
trace (hash tables, groups numbered by first appearance, then counting sorts),
encodes every process and span once into scratch buffers (spans in row order,
so the columns are read sequentially), plans datagrams of at most
``max_packet`` bytes holding whole traces while they fit, and writes them
straight into one bytes object: each a complete oneway ``emitBatch`` message.
A span that cannot fit alone has its longest string and binary values cut (the
largest cut that fits, found by bisection); one that still cannot fit is
dropped and counted. Nothing here creates a
Python object per span; the loop runs without the GIL.

Wire format: Thrift compact protocol (THRIFT-110), structs as in jaeger-idl
``thrift/jaeger.thrift`` and ``thrift/agent.thrift``; the OpenTelemetry to
Jaeger mapping follows the OpenTelemetry specification
``trace/sdk_exporters/jaeger.md`` and ``common/mapping-to-non-otlp.md``.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

import numpy as np

cimport numpy as cnp

from knhk._core._buffer cimport Vec, vec_free, vec_reserve
from knhk._core._ids cimport be64, id_hash

cnp.import_array()

cdef enum:
    # Bytes a datagram needs beyond its process and spans, at most: message header
    # (2 + 5-byte seqid + 1 + "emitBatch"), two struct field headers, the spans
    # field header and a 6-byte list header, the seqNo field (1 + 10) and two stops.
    OVERHEAD = 40
    # Thrift compact type ids (THRIFT-110)
    CT_I32 = 5
    CT_I64 = 6
    CT_BINARY = 8
    CT_LIST = 9
    CT_STRUCT = 12
    # jaeger.thrift TagType
    TAG_STRING = 0
    TAG_DOUBLE = 1
    TAG_BOOL = 2
    TAG_LONG = 3
    TAG_BINARY = 4


# -- writes into a Vec the caller reserved room in -----------------------------------

cdef inline void wbyte(Vec* o, uint8_t b) noexcept nogil:
    # caller reserved room
    o.p[o.n] = <char>b
    o.n += 1


cdef inline void wvar(Vec* o, uint64_t v) noexcept nogil:
    # caller reserved room
    while v >= 0x80:
        o.p[o.n] = <char>((v & 0x7F) | 0x80)
        o.n += 1
        v >>= 7
    o.p[o.n] = <char>v
    o.n += 1


cdef inline uint64_t zz(int64_t v) noexcept nogil:
    # zigzag: compact protocol's signed integers
    return (<uint64_t>v << 1) ^ <uint64_t>(v >> 63)


cdef inline void wraw(Vec* o, const void* p, Py_ssize_t k) noexcept nogil:
    # caller reserved room
    if k:
        memcpy(o.p + o.n, p, k)
    o.n += k


cdef inline void wlist(Vec* o, Py_ssize_t count, uint8_t elem) noexcept nogil:
    # caller reserved 6 bytes
    if count < 15:
        wbyte(o, <uint8_t>((count << 4) | elem))
    else:
        wbyte(o, 0xF0 | elem)
        wvar(o, <uint64_t>count)


# -- column views ---------------------------------------------------------------------

cdef struct SCol:
    const int32_t* idx   # NULL, or per-row index into off (-1: null)
    const int32_t* off
    const uint8_t* data


cdef struct ACol:
    const int32_t* list_off
    SCol key
    const int8_t* type
    SCol str
    const int64_t* ival
    const double* dval
    const uint8_t* bval
    SCol bytes
    SCol json      # arrays and kvlists, already rendered as JSON text


cdef inline Py_ssize_t sget(const SCol* c, Py_ssize_t i, const uint8_t** p) noexcept nogil:
    cdef int32_t j = <int32_t>i
    if c.idx != NULL:
        j = c.idx[i]
        if j < 0:
            p[0] = c.data
            return 0
    p[0] = c.data + c.off[j]
    return c.off[j + 1] - c.off[j]


cdef inline bint s_eq(const SCol* c, Py_ssize_t i, const SCol* d, Py_ssize_t j) noexcept nogil:
    cdef const uint8_t* a
    cdef const uint8_t* b
    cdef Py_ssize_t na = sget(c, i, &a)
    cdef Py_ssize_t nb = sget(d, j, &b)
    return na == nb and (na == 0 or memcmp(a, b, na) == 0)


cdef struct Enc:
    Py_ssize_t n
    const uint8_t* trace_id
    const uint8_t* span_id
    const uint8_t* parent
    const uint8_t* parent_valid
    SCol name
    SCol service
    SCol status_message
    SCol trace_state
    SCol scope_name
    SCol scope_version
    const int8_t* kind
    const int8_t* status_code
    const int64_t* start
    const int64_t* end
    const uint32_t* dropped_attrs
    const uint32_t* dropped_events
    const uint32_t* dropped_links
    ACol attrs
    ACol res_attrs
    ACol sc_attrs
    const int32_t* event_off
    const int64_t* ev_time
    SCol ev_name
    ACol ev_attrs
    const uint32_t* ev_dropped
    const int32_t* link_off
    const uint8_t* ln_trace_id
    const uint8_t* ln_span_id


# -- tags ------------------------------------------------------------------------------

cdef inline Py_ssize_t capped(const uint8_t* p, Py_ssize_t k, Py_ssize_t cap, bint utf8,
                              Py_ssize_t* ntrunc) noexcept nogil:
    """Length of a value cut to ``cap`` bytes (on a UTF-8 character boundary for text)."""
    if cap < 0 or k <= cap:
        return k
    ntrunc[0] += 1
    k = cap
    if utf8:
        while k > 0 and (p[k] & 0xC0) == 0x80:
            k -= 1
    return k


cdef inline int tag_head(Vec* o, const uint8_t* k, Py_ssize_t kn, int vtype,
                         Py_ssize_t extra) noexcept nogil:
    """Tag fields 1 (key) and 2 (vType); ``extra`` more bytes are reserved for the value."""
    if vec_reserve(o, 1 + 10 + kn + 2 + extra + 1) < 0:
        return -1
    wbyte(o, 0x10 | CT_BINARY)
    wvar(o, <uint64_t>kn)
    wraw(o, k, kn)
    wbyte(o, 0x10 | CT_I32)
    wbyte(o, <uint8_t>zz(vtype))
    return 0


cdef inline int tag_str(Vec* o, const uint8_t* k, Py_ssize_t kn, const uint8_t* v,
                        Py_ssize_t vn, int vtype) noexcept nogil:
    # STRING: field 3 (delta 1); BINARY: field 7 (delta 5)
    if tag_head(o, k, kn, vtype, 11 + vn) < 0:
        return -1
    wbyte(o, (0x10 if vtype == TAG_STRING else 0x50) | CT_BINARY)
    wvar(o, <uint64_t>vn)
    wraw(o, v, vn)
    wbyte(o, 0)
    return 0


cdef inline int tag_long(Vec* o, const uint8_t* k, Py_ssize_t kn, int64_t v) noexcept nogil:
    # field 6, delta 4
    if tag_head(o, k, kn, TAG_LONG, 11) < 0:
        return -1
    wbyte(o, 0x40 | CT_I64)
    wvar(o, zz(v))
    wbyte(o, 0)
    return 0


cdef inline int tag_double(Vec* o, const uint8_t* k, Py_ssize_t kn, double v) noexcept nogil:
    # field 4, delta 2; compact protocol writes doubles little-endian
    if tag_head(o, k, kn, TAG_DOUBLE, 9) < 0:
        return -1
    wbyte(o, 0x27)
    wraw(o, &v, 8)
    wbyte(o, 0)
    return 0


cdef inline int tag_bool(Vec* o, const uint8_t* k, Py_ssize_t kn, bint v) noexcept nogil:
    # field 5, delta 3; a bool field's value is its header's type (1 true, 2 false)
    if tag_head(o, k, kn, TAG_BOOL, 1) < 0:
        return -1
    wbyte(o, 0x31 if v else 0x32)
    wbyte(o, 0)
    return 0


cdef inline int tag_lit(Vec* o, const char* k, const char* v) noexcept nogil:
    cdef Py_ssize_t kn = 0, vn = 0
    while k[kn]:
        kn += 1
    while v[vn]:
        vn += 1
    return tag_str(o, <const uint8_t*>k, kn, <const uint8_t*>v, vn, TAG_STRING)


cdef inline Py_ssize_t clen(const char* s) noexcept nogil:
    cdef Py_ssize_t k = 0
    while s[k]:
        k += 1
    return k


cdef int attr_tag(Vec* o, const ACol* a, Py_ssize_t j, Py_ssize_t cap,
                  Py_ssize_t* ntrunc) noexcept nogil:
    """Attribute ``j`` as a typed tag (arrays and kvlists as JSON strings, empty as "")."""
    cdef const uint8_t* kp
    cdef const uint8_t* vp
    cdef Py_ssize_t kn = sget(&a.key, j, &kp)
    cdef Py_ssize_t vn
    cdef int8_t t = a.type[j]
    if t == 2:
        return tag_bool(o, kp, kn, a.bval[j] != 0)
    if t == 3:
        return tag_long(o, kp, kn, a.ival[j])
    if t == 4:
        return tag_double(o, kp, kn, a.dval[j])
    if t == 7:
        vn = sget(&a.bytes, j, &vp)
        vn = capped(vp, vn, cap, False, ntrunc)
        return tag_str(o, kp, kn, vp, vn, TAG_BINARY)
    if t == 1:
        vn = sget(&a.str, j, &vp)
    elif t == 5 or t == 6:
        vn = sget(&a.json, j, &vp)
    else:
        vn = 0
        vp = kp
    vn = capped(vp, vn, cap, True, ntrunc)
    return tag_str(o, kp, kn, vp, vn, TAG_STRING)


cdef inline int attr_tags(Vec* o, const ACol* a, Py_ssize_t row, Py_ssize_t cap,
                          Py_ssize_t* ntrunc) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(a.list_off[row], a.list_off[row + 1]):
        if attr_tag(o, a, j, cap, ntrunc) < 0:
            return -1
    return 0


cdef inline bint key_is(const ACol* a, Py_ssize_t j, const char* lit,
                        Py_ssize_t litn) noexcept nogil:
    cdef const uint8_t* kp
    cdef Py_ssize_t kn = sget(&a.key, j, &kp)
    return kn == litn and memcmp(kp, lit, litn) == 0


cdef inline int str_tag(Vec* o, const char* key, const SCol* c, Py_ssize_t i,
                        Py_ssize_t cap, Py_ssize_t* ntrunc) noexcept nogil:
    cdef const uint8_t* vp
    cdef Py_ssize_t vn = sget(c, i, &vp)
    vn = capped(vp, vn, cap, True, ntrunc)
    return tag_str(o, <const uint8_t*>key, clen(key), vp, vn, TAG_STRING)


cdef inline int long_tag(Vec* o, const char* key, int64_t v) noexcept nogil:
    return tag_long(o, <const uint8_t*>key, clen(key), v)


# -- process and span ------------------------------------------------------------------

cdef int e_process(Vec* o, const Enc* e, Py_ssize_t row, Py_ssize_t cap, bint no_tags,
                   Py_ssize_t* ntrunc) noexcept nogil:
    """Process struct: serviceName, resource attributes as tags (``service.name`` aside)."""
    cdef const uint8_t* vp
    cdef Py_ssize_t vn = sget(&e.service, row, &vp)
    cdef Py_ssize_t j, ntags = 0
    cdef const ACol* a = &e.res_attrs
    vn = capped(vp, vn, cap, True, ntrunc)
    if vec_reserve(o, 1 + 10 + vn + 7) < 0:
        return -1
    wbyte(o, 0x10 | CT_BINARY)
    wvar(o, <uint64_t>vn)
    wraw(o, vp, vn)
    if not no_tags:
        for j in range(a.list_off[row], a.list_off[row + 1]):
            if not (a.type[j] == 1 and key_is(a, j, "service.name", 12)):
                ntags += 1
    if ntags:
        wbyte(o, 0x10 | CT_LIST)
        wlist(o, ntags, CT_STRUCT)
        for j in range(a.list_off[row], a.list_off[row + 1]):
            if not (a.type[j] == 1 and key_is(a, j, "service.name", 12)):
                if attr_tag(o, a, j, cap, ntrunc) < 0:
                    return -1
    if vec_reserve(o, 1) < 0:
        return -1
    wbyte(o, 0)
    return 0


cdef inline int64_t us(int64_t ns) noexcept nogil:
    # C division truncates toward zero, as the specification allows
    return ns // 1000 if ns >= 0 else -((-ns) // 1000)


cdef inline int e_ref(Vec* o, int reftype, const uint8_t* tid,
                      const uint8_t* sid) noexcept nogil:
    if vec_reserve(o, 2 + 3 * 11 + 1) < 0:
        return -1
    wbyte(o, 0x10 | CT_I32)
    wbyte(o, <uint8_t>zz(reftype))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(tid + 8)))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(tid)))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(sid)))
    wbyte(o, 0)
    return 0


cdef int e_log(Vec* o, const Enc* e, Py_ssize_t j, Py_ssize_t cap,
               Py_ssize_t* ntrunc) noexcept nogil:
    """Event ``j`` as a Log: ``event`` (its name, unless an attribute is named so),
    the attributes, then ``otel.event.dropped_attributes_count`` when non-zero."""
    cdef const ACol* a = &e.ev_attrs
    cdef Py_ssize_t k, nf
    cdef bint named = False
    for k in range(a.list_off[j], a.list_off[j + 1]):
        if key_is(a, k, "event", 5):
            named = True
            break
    nf = (a.list_off[j + 1] - a.list_off[j]) + (0 if named else 1) + (e.ev_dropped[j] != 0)
    if vec_reserve(o, 1 + 10 + 1 + 6) < 0:
        return -1
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(us(e.ev_time[j])))
    wbyte(o, 0x10 | CT_LIST)
    wlist(o, nf, CT_STRUCT)
    if not named and str_tag(o, "event", &e.ev_name, j, cap, ntrunc) < 0:
        return -1
    if attr_tags(o, a, j, cap, ntrunc) < 0:
        return -1
    if e.ev_dropped[j] and long_tag(o, "otel.event.dropped_attributes_count",
                                    e.ev_dropped[j]) < 0:
        return -1
    if vec_reserve(o, 1) < 0:
        return -1
    wbyte(o, 0)
    return 0


cdef const char* KIND_NAMES[6]
KIND_NAMES[0] = NULL
KIND_NAMES[1] = NULL
KIND_NAMES[2] = "server"
KIND_NAMES[3] = "client"
KIND_NAMES[4] = "producer"
KIND_NAMES[5] = "consumer"


cdef int e_span(Vec* o, const Enc* e, Py_ssize_t i, Py_ssize_t cap,
                Py_ssize_t* ntrunc) noexcept nogil:
    """Span ``i`` as a jaeger.thrift Span struct (its stop byte included)."""
    cdef const uint8_t* tid = e.trace_id + 16 * i
    cdef const uint8_t* vp
    cdef Py_ssize_t vn, nrefs, ntags, nev, j, last
    cdef int8_t kind = e.kind[i]
    cdef int8_t status = e.status_code[i]
    cdef const char* kind_name = KIND_NAMES[kind] if 0 <= kind <= 5 else NULL
    cdef bint has_msg, has_scope_name, has_scope_version, has_state
    cdef uint64_t dur
    if status != 1 and status != 2:
        status = 0
    vn = sget(&e.name, i, &vp)
    vn = capped(vp, vn, cap, True, ntrunc)
    if vec_reserve(o, 4 * 11 + 11 + vn + 7) < 0:
        return -1
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(tid + 8)))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(tid)))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(e.span_id + 8 * i)))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>be64(e.parent + 8 * i)) if e.parent_valid[i] else 0)
    wbyte(o, 0x10 | CT_BINARY)
    wvar(o, <uint64_t>vn)
    wraw(o, vp, vn)
    last = 5
    # references: the parent (CHILD_OF) first, then the links (FOLLOWS_FROM)
    nrefs = (e.parent_valid[i] != 0) + (e.link_off[i + 1] - e.link_off[i])
    if nrefs:
        wbyte(o, 0x10 | CT_LIST)
        wlist(o, nrefs, CT_STRUCT)
        if e.parent_valid[i] and e_ref(o, 0, tid, e.parent + 8 * i) < 0:
            return -1
        for j in range(e.link_off[i], e.link_off[i + 1]):
            if e_ref(o, 1, e.ln_trace_id + 16 * j, e.ln_span_id + 8 * j) < 0:
                return -1
        last = 6
    # flags: every exported span was sampled (Jaeger's bit 1). W3C's other
    # flag bits mean something else (bit 2 is "random", Jaeger's is "debug").
    if e.end[i] >= e.start[i]:
        dur = (<uint64_t>e.end[i] - <uint64_t>e.start[i]) // 1000
    else:
        dur = 0
    if vec_reserve(o, 2 + 2 * 11 + 7) < 0:
        return -1
    wbyte(o, <uint8_t>(((7 - last) << 4) | CT_I32))
    wbyte(o, <uint8_t>zz(1))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(us(e.start[i])))
    wbyte(o, 0x10 | CT_I64)
    wvar(o, zz(<int64_t>dur))
    last = 9
    has_scope_name = sget(&e.scope_name, i, &vp) > 0
    has_scope_version = sget(&e.scope_version, i, &vp) > 0
    has_msg = status != 0 and sget(&e.status_message, i, &vp) > 0
    has_state = sget(&e.trace_state, i, &vp) > 0
    ntags = ((e.attrs.list_off[i + 1] - e.attrs.list_off[i])
             + (e.sc_attrs.list_off[i + 1] - e.sc_attrs.list_off[i])
             + 2 * has_scope_name + 2 * has_scope_version + (kind_name != NULL)
             + (status != 0) + has_msg + (status == 2)
             + (e.dropped_attrs[i] != 0) + (e.dropped_events[i] != 0)
             + (e.dropped_links[i] != 0) + has_state)
    if ntags:
        wbyte(o, 0x10 | CT_LIST)
        wlist(o, ntags, CT_STRUCT)
        if attr_tags(o, &e.attrs, i, cap, ntrunc) < 0:
            return -1
        if has_scope_name and (
                str_tag(o, "otel.scope.name", &e.scope_name, i, cap, ntrunc) < 0
                or str_tag(o, "otel.library.name", &e.scope_name, i, cap, ntrunc) < 0):
            return -1
        if has_scope_version and (
                str_tag(o, "otel.scope.version", &e.scope_version, i, cap, ntrunc) < 0
                or str_tag(o, "otel.library.version", &e.scope_version, i, cap, ntrunc) < 0):
            return -1
        if attr_tags(o, &e.sc_attrs, i, cap, ntrunc) < 0:
            return -1
        if kind_name != NULL and tag_lit(o, "span.kind", kind_name) < 0:
            return -1
        if status == 1 and tag_lit(o, "otel.status_code", "OK") < 0:
            return -1
        if status == 2 and tag_lit(o, "otel.status_code", "ERROR") < 0:
            return -1
        if has_msg and str_tag(o, "otel.status_description", &e.status_message, i, cap,
                               ntrunc) < 0:
            return -1
        if status == 2 and tag_bool(o, <const uint8_t*>"error", 5, True) < 0:
            return -1
        if e.dropped_attrs[i] and long_tag(o, "otel.dropped_attributes_count",
                                           e.dropped_attrs[i]) < 0:
            return -1
        if e.dropped_events[i] and long_tag(o, "otel.dropped_events_count",
                                            e.dropped_events[i]) < 0:
            return -1
        if e.dropped_links[i] and long_tag(o, "otel.dropped_links_count",
                                           e.dropped_links[i]) < 0:
            return -1
        if has_state and str_tag(o, "w3c.tracestate", &e.trace_state, i, cap, ntrunc) < 0:
            return -1
        last = 10
    nev = e.event_off[i + 1] - e.event_off[i]
    if nev:
        if vec_reserve(o, 7) < 0:
            return -1
        wbyte(o, <uint8_t>(((11 - last) << 4) | CT_LIST))
        wlist(o, nev, CT_STRUCT)
        for j in range(e.event_off[i], e.event_off[i + 1]):
            if e_log(o, e, j, cap, ntrunc) < 0:
                return -1
    if vec_reserve(o, 1) < 0:
        return -1
    wbyte(o, 0)
    return 0


# -- grouping: process, then trace -------------------------------------------------------

cdef inline uint64_t fnv(uint64_t h, const uint8_t* p, Py_ssize_t k) noexcept nogil:
    # FNV-1a (Fowler, Noll, Vo); equality is checked exactly, the hash only spreads
    cdef Py_ssize_t j
    for j in range(k):
        h = (h ^ p[j]) * <uint64_t>0x100000001B3ULL
    return h


cdef uint64_t process_hash(const Enc* e, Py_ssize_t i) noexcept nogil:
    cdef const uint8_t* p
    cdef Py_ssize_t k, j
    cdef const ACol* a = &e.res_attrs
    cdef uint64_t h = <uint64_t>0xCBF29CE484222325ULL
    k = sget(&e.service, i, &p)
    h = fnv(h, p, k)
    for j in range(a.list_off[i], a.list_off[i + 1]):
        k = sget(&a.key, j, &p)
        h = fnv(h ^ <uint64_t>(a.type[j] + 1), p, k)
        if a.type[j] == 1:
            k = sget(&a.str, j, &p)
            h = fnv(h, p, k)
    return id_hash(h, <uint64_t>(a.list_off[i + 1] - a.list_off[i]))


cdef bint attr_eq(const ACol* a, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef int8_t t = a.type[i]
    if t != a.type[j] or not s_eq(&a.key, i, &a.key, j):
        return False
    if t == 1:
        return s_eq(&a.str, i, &a.str, j)
    if t == 2:
        return (a.bval[i] != 0) == (a.bval[j] != 0)
    if t == 3:
        return a.ival[i] == a.ival[j]
    if t == 4:
        return memcmp(&a.dval[i], &a.dval[j], 8) == 0
    if t == 7:
        return s_eq(&a.bytes, i, &a.bytes, j)
    if t == 5 or t == 6:
        return s_eq(&a.json, i, &a.json, j)
    return True


cdef bint same_process(const Enc* e, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef const ACol* a = &e.res_attrs
    cdef Py_ssize_t k, n = a.list_off[r0 + 1] - a.list_off[r0]
    if n != a.list_off[r1 + 1] - a.list_off[r1] or not s_eq(&e.service, r0, &e.service, r1):
        return False
    for k in range(n):
        if not attr_eq(a, a.list_off[r0] + k, a.list_off[r1] + k):
            return False
    return True


cdef struct Groups:
    # open addressing over group numbers; groups numbered by first appearance
    int32_t* slot      # -1 free
    Py_ssize_t mask
    uint64_t* hash     # per group
    int32_t* row       # per group: its first row
    int32_t* parent    # per group: the process group (trace groups only)
    Py_ssize_t n
    Py_ssize_t cap


cdef int groups_init(Groups* g) noexcept nogil:
    g.n = 0
    g.cap = 64
    g.mask = 127
    g.slot = <int32_t*>malloc(128 * sizeof(int32_t))
    g.hash = <uint64_t*>malloc(64 * sizeof(uint64_t))
    g.row = <int32_t*>malloc(64 * sizeof(int32_t))
    g.parent = <int32_t*>malloc(64 * sizeof(int32_t))
    if g.slot == NULL or g.hash == NULL or g.row == NULL or g.parent == NULL:
        return -1
    memset(g.slot, 0xFF, 128 * sizeof(int32_t))
    return 0


cdef void groups_free(Groups* g) noexcept nogil:
    free(g.slot)
    free(g.hash)
    free(g.row)
    free(g.parent)
    g.slot = NULL
    g.hash = NULL
    g.row = NULL
    g.parent = NULL


cdef int groups_add(Groups* g, uint64_t h, Py_ssize_t row, Py_ssize_t parent) noexcept nogil:
    """Append a new group; returns its number (or -1 out of memory)."""
    cdef Py_ssize_t k, s, cap
    cdef void* q
    if g.n == g.cap:
        cap = g.cap * 2
        q = realloc(g.hash, cap * sizeof(uint64_t))
        if q == NULL:
            return -1
        g.hash = <uint64_t*>q
        q = realloc(g.row, cap * sizeof(int32_t))
        if q == NULL:
            return -1
        g.row = <int32_t*>q
        q = realloc(g.parent, cap * sizeof(int32_t))
        if q == NULL:
            return -1
        g.parent = <int32_t*>q
        g.cap = cap
        free(g.slot)
        g.mask = 2 * cap - 1
        g.slot = <int32_t*>malloc(2 * cap * sizeof(int32_t))
        if g.slot == NULL:
            return -1
        memset(g.slot, 0xFF, 2 * cap * sizeof(int32_t))
        for k in range(g.n):
            s = g.hash[k] & g.mask
            while g.slot[s] >= 0:
                s = (s + 1) & g.mask
            g.slot[s] = <int32_t>k
    k = g.n
    g.hash[k] = h
    g.row[k] = <int32_t>row
    g.parent[k] = <int32_t>parent
    s = h & g.mask
    while g.slot[s] >= 0:
        s = (s + 1) & g.mask
    g.slot[s] = <int32_t>k
    g.n += 1
    return <int>k


cdef int group_rows(const Enc* e, int32_t* pg, int32_t* tg, Groups* procs,
                    Groups* traces) noexcept nogil:
    """Process group and trace group of every row, numbered by first appearance."""
    cdef Py_ssize_t i, s, n = e.n
    cdef int32_t k
    cdef uint64_t h
    cdef const uint8_t* tid
    for i in range(n):
        if i > 0 and same_process(e, i - 1, i):
            pg[i] = pg[i - 1]
        else:
            h = process_hash(e, i)
            s = h & procs.mask
            k = -1
            while procs.slot[s] >= 0:
                k = procs.slot[s]
                if procs.hash[k] == h and same_process(e, procs.row[k], i):
                    break
                k = -1
                s = (s + 1) & procs.mask
            if k < 0:
                k = groups_add(procs, h, i, -1)
                if k < 0:
                    return -1
            pg[i] = k
        tid = e.trace_id + 16 * i
        if i > 0 and pg[i] == pg[i - 1] and memcmp(tid - 16, tid, 16) == 0:
            tg[i] = tg[i - 1]
            continue
        h = id_hash(be64(tid), be64(tid + 8)) ^ (<uint64_t>pg[i] * <uint64_t>0x9E3779B97F4A7C15ULL)
        s = h & traces.mask
        k = -1
        while traces.slot[s] >= 0:
            k = traces.slot[s]
            if (traces.hash[k] == h and traces.parent[k] == pg[i]
                    and memcmp(e.trace_id + 16 * traces.row[k], tid, 16) == 0):
                break
            k = -1
            s = (s + 1) & traces.mask
        if k < 0:
            k = groups_add(traces, h, i, pg[i])
            if k < 0:
                return -1
        tg[i] = k
    return 0


# -- fitting one oversized span or process -----------------------------------------------

cdef Py_ssize_t fit_span(Vec* tmp, const Enc* e, Py_ssize_t i, Py_ssize_t budget,
                         Py_ssize_t full) noexcept nogil:
    """The largest value cap with which span ``i`` encodes in ``budget`` bytes, -1 if none,
    -2 out of memory. Encoded length only grows with the cap, so bisection finds it."""
    cdef Py_ssize_t lo = 0, hi = full, mid, nt = 0
    tmp.n = 0
    if e_span(tmp, e, i, 0, &nt) < 0:
        return -2
    if tmp.n > budget:
        return -1
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        tmp.n = 0
        if e_span(tmp, e, i, mid, &nt) < 0:
            return -2
        if tmp.n <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef Py_ssize_t fit_process(Vec* tmp, const Enc* e, Py_ssize_t row, Py_ssize_t budget,
                            Py_ssize_t full, bint no_tags) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = full, mid, nt = 0
    tmp.n = 0
    if e_process(tmp, e, row, 0, no_tags, &nt) < 0:
        return -2
    if tmp.n > budget:
        return -1
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        tmp.n = 0
        if e_process(tmp, e, row, mid, no_tags, &nt) < 0:
            return -2
        if tmp.n <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- the whole batch ----------------------------------------------------------------------

cdef struct Plan:
    # one datagram: process p, the spans at output positions k0:k1 (``count`` of
    # them, ``nbytes`` long; dropped ones left out)
    int64_t p
    int64_t k0
    int64_t k1
    int64_t nbytes
    int64_t count


cdef struct Out:
    Vec plan          # Plan per datagram
    Py_ssize_t total  # bytes of all datagrams
    Py_ssize_t spans_truncated
    Py_ssize_t values_truncated
    Py_ssize_t spans_dropped
    Py_ssize_t processes_truncated


cdef struct Work:
    Groups procs
    Groups traces
    Vec proc          # every process, encoded once
    Vec spans         # every span, encoded once, in row order
    Vec tmp           # scratch for fitting
    int32_t* pg       # per row: process group
    int32_t* tg       # per row: trace group
    int32_t* order    # output position -> row
    int32_t* rank     # trace group -> output rank
    int64_t* poff     # process p's bytes: proc[poff[p]:poff[p + 1]]
    int64_t* soff     # row i's span: spans[soff[i]:soff[i + 1]]
    int64_t* pstart   # process p's trace ranks: pstart[p]:pstart[p + 1]
    int64_t* gstart   # trace rank r's output positions: gstart[r]:gstart[r + 1]
    uint8_t* dropped  # per row: too large even with every value cut


cdef void work_free(Work* w) noexcept nogil:
    free(w.pg)
    free(w.tg)
    free(w.order)
    free(w.rank)
    free(w.poff)
    free(w.soff)
    free(w.pstart)
    free(w.gstart)
    free(w.dropped)
    groups_free(&w.procs)
    groups_free(&w.traces)
    vec_free(&w.proc)
    vec_free(&w.spans)
    vec_free(&w.tmp)


cdef int order_rows(const Enc* e, Work* w) noexcept nogil:
    """Output order: processes by first appearance, their traces likewise, then rows."""
    cdef Py_ssize_t n = e.n, i, g, p, r
    cdef Groups* procs = &w.procs
    cdef Groups* traces = &w.traces
    w.rank = <int32_t*>malloc(traces.n * sizeof(int32_t))
    w.pstart = <int64_t*>malloc((procs.n + 1) * sizeof(int64_t))
    w.gstart = <int64_t*>malloc((traces.n + 1) * sizeof(int64_t))
    if w.rank == NULL or w.pstart == NULL or w.gstart == NULL:
        return -1
    # counting sorts; pstart / gstart serve as cursors, then are shifted back
    memset(w.pstart, 0, (procs.n + 1) * sizeof(int64_t))
    for g in range(traces.n):
        w.pstart[traces.parent[g] + 1] += 1
    for p in range(procs.n):
        w.pstart[p + 1] += w.pstart[p]
    for g in range(traces.n):
        w.rank[g] = <int32_t>w.pstart[traces.parent[g]]
        w.pstart[traces.parent[g]] += 1
    for p in range(procs.n, 0, -1):
        w.pstart[p] = w.pstart[p - 1]
    w.pstart[0] = 0
    memset(w.gstart, 0, (traces.n + 1) * sizeof(int64_t))
    for i in range(n):
        w.gstart[w.rank[w.tg[i]] + 1] += 1
    for r in range(traces.n):
        w.gstart[r + 1] += w.gstart[r]
    for i in range(n):
        w.order[w.gstart[w.rank[w.tg[i]]]] = <int32_t>i
        w.gstart[w.rank[w.tg[i]]] += 1
    for r in range(traces.n, 0, -1):
        w.gstart[r] = w.gstart[r - 1]
    w.gstart[0] = 0
    return 0


cdef int encode_processes(const Enc* e, Py_ssize_t max_packet, Work* w,
                          Out* out) noexcept nogil:
    """Every process, each at most half a datagram (cutting values, then tags, to get there)."""
    cdef Py_ssize_t p, k, cap, full, nt
    cdef Py_ssize_t pbudget = max_packet // 2 - OVERHEAD
    cdef int32_t row
    w.poff = <int64_t*>malloc((w.procs.n + 1) * sizeof(int64_t))
    if w.poff == NULL:
        return -1
    w.poff[0] = 0
    for p in range(w.procs.n):
        row = w.procs.row[p]
        k = w.proc.n
        nt = 0
        if e_process(&w.proc, e, row, -1, False, &nt) < 0:
            return -1
        if w.proc.n - k > pbudget:
            full = w.proc.n - k
            w.proc.n = k
            cap = fit_process(&w.tmp, e, row, pbudget, full, False)
            if cap == -2:
                return -1
            if cap >= 0:
                if e_process(&w.proc, e, row, cap, False, &nt) < 0:
                    return -1
            else:
                cap = fit_process(&w.tmp, e, row, pbudget, full, True)
                if cap == -2:
                    return -1
                if e_process(&w.proc, e, row, cap if cap >= 0 else 0, True, &nt) < 0:
                    return -1
            out.processes_truncated += 1
        w.poff[p + 1] = w.proc.n
    return 0


cdef int encode_spans(const Enc* e, Py_ssize_t max_packet, Work* w, Out* out) noexcept nogil:
    """Every span, each fitted to its process's datagram budget.

    In row order: the columns are read sequentially, and only each span's
    finished bytes are gathered in output order later."""
    cdef Py_ssize_t i, start, cap, full, nt, sbudget
    cdef int32_t p
    w.soff[0] = 0
    for i in range(e.n):
        p = w.pg[i]
        sbudget = max_packet - OVERHEAD - (w.poff[p + 1] - w.poff[p])
        start = w.spans.n
        nt = 0
        w.dropped[i] = 0
        if e_span(&w.spans, e, i, -1, &nt) < 0:
            return -1
        if w.spans.n - start > sbudget:
            full = w.spans.n - start
            w.spans.n = start
            cap = fit_span(&w.tmp, e, i, sbudget, full)
            if cap == -2:
                return -1
            if cap < 0:
                w.dropped[i] = 1
                out.spans_dropped += 1
            else:
                nt = 0
                if e_span(&w.spans, e, i, cap, &nt) < 0:
                    return -1
                out.spans_truncated += 1
                out.values_truncated += nt
        w.soff[i + 1] = w.spans.n
    return 0


cdef inline Py_ssize_t span_len(const Work* w, Py_ssize_t k) noexcept nogil:
    cdef int32_t i = w.order[k]
    return w.soff[i + 1] - w.soff[i]


cdef inline Py_ssize_t vsize(uint64_t v) noexcept nogil:
    cdef Py_ssize_t k = 1
    while v >= 0x80:
        v >>= 7
        k += 1
    return k


cdef inline Py_ssize_t dgram_size(const Work* w, const Plan* d, int64_t seq) noexcept nogil:
    """Exact length of the datagram ``write_datagram`` writes for ``d``."""
    return (2 + vsize(<uint64_t>(seq & 0x7FFFFFFF)) + 10 + 2 + (w.poff[d.p + 1] - w.poff[d.p])
            + 1 + (1 if d.count < 15 else 1 + vsize(<uint64_t>d.count)) + d.nbytes
            + 1 + vsize(zz(seq)) + 2)


cdef int flush(Out* out, const Work* w, Py_ssize_t p, Py_ssize_t k0, Py_ssize_t k1,
               Py_ssize_t nbytes, Py_ssize_t count, int64_t seq) noexcept nogil:
    """Plan one datagram (written later by ``write_datagram``) and count its exact size."""
    cdef Plan d
    d.p = p
    d.k0 = k0
    d.k1 = k1
    d.nbytes = nbytes
    d.count = count
    if vec_reserve(&out.plan, sizeof(Plan)) < 0:
        return -1
    memcpy(out.plan.p + out.plan.n, &d, sizeof(Plan))
    out.plan.n += sizeof(Plan)
    out.total += dgram_size(w, &d, seq)
    return 0


cdef void write_datagram(Vec* o, const Work* w, const Plan* d, int64_t seq) noexcept nogil:
    """One emitBatch datagram into ``o``, whose room the plan's total reserved."""
    cdef Py_ssize_t k, p0 = w.poff[d.p], p1 = w.poff[d.p + 1]
    cdef int32_t i
    wbyte(o, 0x82)                   # compact protocol id
    wbyte(o, 0x81)                   # version 1, message type ONEWAY (4) << 5
    wvar(o, <uint64_t>(seq & 0x7FFFFFFF))
    wbyte(o, 9)
    wraw(o, "emitBatch", 9)
    wbyte(o, 0x10 | CT_STRUCT)       # emitBatch_args.batch
    wbyte(o, 0x10 | CT_STRUCT)       # Batch.process
    wraw(o, w.proc.p + p0, p1 - p0)
    wbyte(o, 0x10 | CT_LIST)         # Batch.spans
    wlist(o, d.count, CT_STRUCT)
    for k in range(d.k0, d.k1):
        i = w.order[k]
        if not w.dropped[i]:
            wraw(o, w.spans.p + w.soff[i], w.soff[i + 1] - w.soff[i])
    wbyte(o, 0x10 | CT_I64)          # Batch.seqNo
    wvar(o, zz(seq))
    wbyte(o, 0)
    wbyte(o, 0)


cdef int write_all(const Work* w, const Out* out, int64_t seq0, char* dst, int64_t* offsets,
                   int64_t* counts) noexcept nogil:
    cdef Vec o
    cdef Py_ssize_t k, nd = out.plan.n // sizeof(Plan)
    cdef const Plan* plan = <const Plan*>out.plan.p
    o.p = dst
    o.n = 0
    o.cap = out.total
    offsets[0] = 0
    for k in range(nd):
        if o.n + dgram_size(w, &plan[k], seq0 + k) > o.cap:
            return -1  # the plan and the writer disagree: never write past the buffer
        write_datagram(&o, w, &plan[k], seq0 + k)
        offsets[k + 1] = o.n
        counts[k] = plan[k].count
    return 0 if o.n == o.cap else -1


cdef int pack(Py_ssize_t max_packet, int64_t seq0, Work* w, Out* out) noexcept nogil:
    """Datagrams: whole traces while they fit, a trace's spans one by one when it cannot."""
    cdef Py_ssize_t p, r, k, t0, t1, tsize, tcount, used, count, first, sbudget, size
    cdef int64_t seq = seq0
    cdef const uint8_t* dropped = w.dropped
    for p in range(w.procs.n):
        sbudget = max_packet - OVERHEAD - (w.poff[p + 1] - w.poff[p])
        used = 0
        count = 0
        first = w.gstart[w.pstart[p]]
        for r in range(w.pstart[p], w.pstart[p + 1]):
            t0 = w.gstart[r]
            t1 = w.gstart[r + 1]
            tsize = 0
            tcount = 0
            for k in range(t0, t1):
                tsize += span_len(w, k)
                tcount += 1 - dropped[w.order[k]]
            if used + tsize <= sbudget:
                used += tsize
                count += tcount
                continue
            if tsize <= sbudget:
                if count:
                    if flush(out, w, p, first, t0, used, count, seq) < 0:
                        return -1
                    seq += 1
                first = t0
                used = tsize
                count = tcount
                continue
            for k in range(t0, t1):
                if dropped[w.order[k]]:
                    continue
                size = span_len(w, k)
                if used + size > sbudget and count:
                    if flush(out, w, p, first, k, used, count, seq) < 0:
                        return -1
                    seq += 1
                    used = 0
                    count = 0
                if count == 0:
                    first = k
                used += size
                count += 1
        if count:
            k = w.gstart[w.pstart[p + 1]]
            if flush(out, w, p, first, k, used, count, seq) < 0:
                return -1
            seq += 1
    return 0


cdef int encode_plan(const Enc* e, Py_ssize_t max_packet, int64_t seq0, Work* w,
                     Out* out) noexcept nogil:
    """Everything but the final bytes: groups, order, encoded processes and spans, and
    the datagram plan with its exact total size."""
    cdef Py_ssize_t n = e.n
    cdef Py_ssize_t i, k, guess
    if n == 0:
        return 0
    w.pg = <int32_t*>malloc(n * sizeof(int32_t))
    w.tg = <int32_t*>malloc(n * sizeof(int32_t))
    w.order = <int32_t*>malloc(n * sizeof(int32_t))
    w.soff = <int64_t*>malloc((n + 1) * sizeof(int64_t))
    w.dropped = <uint8_t*>malloc(n)
    if (w.pg == NULL or w.tg == NULL or w.order == NULL or w.soff == NULL
            or w.dropped == NULL or groups_init(&w.procs) < 0 or groups_init(&w.traces) < 0
            or group_rows(e, w.pg, w.tg, &w.procs, &w.traces) < 0
            or order_rows(e, w) < 0 or encode_processes(e, max_packet, w, out) < 0):
        return -1
    # size the span buffer once from a sample, sparing the copies of growing it
    k = 0
    for i in range(min(n, 32)):
        if e_span(&w.tmp, e, i, -1, &k) < 0:
            return -1
    guess = (w.tmp.n // min(n, 32) + 16) * n + (n // 8) * 64
    w.tmp.n = 0
    if vec_reserve(&w.spans, guess) < 0:
        return -1
    if encode_spans(e, max_packet, w, out) < 0 or pack(max_packet, seq0, w, out) < 0:
        return -1
    return 0


# -- Python entry -------------------------------------------------------------------------

cdef const void* _ptr(object arr, object dtype, Py_ssize_t at_least, str name) except NULL:
    cdef cnp.ndarray a = <cnp.ndarray?>arr
    if a.dtype != dtype or not a.flags.c_contiguous or a.ndim != 1 or a.shape[0] < at_least:
        raise ValueError(f"encode_batch: column buffer {name} must be a contiguous 1-d "
                         f"{dtype} array of at least {at_least} items")
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
    cdef Py_ssize_t m = a["type"].shape[0]
    c.list_off = <const int32_t*>_ptr(a["list_off"], np.dtype(np.int32), n + 1, name)
    c.key = _scol(a["key"], m, name + ".key")
    c.type = <const int8_t*>_ptr(a["type"], np.dtype(np.int8), m, name + ".type")
    c.str = _scol(a["str"], m, name + ".str")
    c.ival = <const int64_t*>_ptr(a["int"], np.dtype(np.int64), m, name + ".int")
    c.dval = <const double*>_ptr(a["double"], np.dtype(np.float64), m, name + ".double")
    c.bval = <const uint8_t*>_ptr(a["bool"], np.dtype(np.uint8), m, name + ".bool")
    c.bytes = _scol(a["bytes"], m, name + ".bytes")
    c.json = _scol(a["json"], m, name + ".json")
    return c


def encode_batch(dict cols, Py_ssize_t max_packet, int64_t seq_no):
    """Encode column buffers (as ``knhk.exporters.jaeger`` prepares them) into datagrams.

    Returns ``(data, offsets, spans, counters)``: the datagrams back to back in
    ``data``, datagram ``k`` is ``data[offsets[k]:offsets[k + 1]]`` and holds
    ``spans[k]`` spans; its ``Batch.seqNo`` is ``seq_no + k``.
    """
    cdef Enc e
    cdef Out out
    cdef int rc
    cdef Py_ssize_t n = cols["n"]
    cdef Py_ssize_t ne = cols["ev_time"].shape[0]
    cdef Py_ssize_t nl = cols["ln_trace_id"].shape[0] // 16
    if max_packet < 2 * OVERHEAD + 64:
        raise ValueError(f"encode_batch: max_packet must be at least {2 * OVERHEAD + 64}")
    u8, i8, u32, i32, i64 = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint32),
                             np.dtype(np.int32), np.dtype(np.int64))
    e.n = n
    e.trace_id = <const uint8_t*>_ptr(cols["trace_id"], u8, 16 * n, "trace_id")
    e.span_id = <const uint8_t*>_ptr(cols["span_id"], u8, 8 * n, "span_id")
    e.parent = <const uint8_t*>_ptr(cols["parent_span_id"], u8, 8 * n, "parent_span_id")
    e.parent_valid = <const uint8_t*>_ptr(cols["parent_valid"], u8, n, "parent_valid")
    e.name = _scol(cols["name"], n, "name")
    e.service = _scol(cols["service"], n, "service")
    e.status_message = _scol(cols["status_message"], n, "status_message")
    e.trace_state = _scol(cols["trace_state"], n, "trace_state")
    e.scope_name = _scol(cols["scope_name"], n, "scope_name")
    e.scope_version = _scol(cols["scope_version"], n, "scope_version")
    e.kind = <const int8_t*>_ptr(cols["kind"], i8, n, "kind")
    e.status_code = <const int8_t*>_ptr(cols["status_code"], i8, n, "status_code")
    e.start = <const int64_t*>_ptr(cols["start_time_ns"], i64, n, "start_time_ns")
    e.end = <const int64_t*>_ptr(cols["end_time_ns"], i64, n, "end_time_ns")
    e.dropped_attrs = <const uint32_t*>_ptr(cols["dropped_attributes_count"], u32, n,
                                            "dropped_attributes_count")
    e.dropped_events = <const uint32_t*>_ptr(cols["dropped_events_count"], u32, n,
                                             "dropped_events_count")
    e.dropped_links = <const uint32_t*>_ptr(cols["dropped_links_count"], u32, n,
                                            "dropped_links_count")
    e.attrs = _acol(cols["attributes"], n, "attributes")
    e.res_attrs = _acol(cols["resource_attributes"], n, "resource_attributes")
    e.sc_attrs = _acol(cols["scope_attributes"], n, "scope_attributes")
    e.event_off = <const int32_t*>_ptr(cols["event_off"], i32, n + 1, "events")
    e.ev_time = <const int64_t*>_ptr(cols["ev_time"], i64, ne, "events.time_unix_nano")
    e.ev_name = _scol(cols["ev_name"], ne, "events.name")
    e.ev_attrs = _acol(cols["ev_attrs"], ne, "events.attributes")
    e.ev_dropped = <const uint32_t*>_ptr(cols["ev_dropped"], u32, ne, "events.dropped")
    e.link_off = <const int32_t*>_ptr(cols["link_off"], i32, n + 1, "links")
    e.ln_trace_id = <const uint8_t*>_ptr(cols["ln_trace_id"], u8, 16 * nl, "links.trace_id")
    e.ln_span_id = <const uint8_t*>_ptr(cols["ln_span_id"], u8, 8 * nl, "links.span_id")
    cdef Work w
    cdef char* dst
    cdef cnp.ndarray offsets, counts
    cdef Py_ssize_t nd
    memset(&out, 0, sizeof(Out))
    memset(&w, 0, sizeof(Work))
    try:
        with nogil:
            rc = encode_plan(&e, max_packet, seq_no, &w, &out)
        if rc < 0:
            raise MemoryError("out of memory encoding a Jaeger batch")
        nd = out.plan.n // sizeof(Plan)
        data = PyBytes_FromStringAndSize(NULL, out.total)
        dst = PyBytes_AS_STRING(data)
        offsets = np.zeros(nd + 1, np.int64)
        counts = np.zeros(nd, np.int64)
        with nogil:
            rc = write_all(&w, &out, seq_no, dst, <int64_t*>cnp.PyArray_DATA(offsets),
                           <int64_t*>cnp.PyArray_DATA(counts))
        if rc < 0:
            raise RuntimeError("knhk._core._jaeger: datagram sizes planned and written differ")
        counters = {
            "spans_truncated": out.spans_truncated,
            "values_truncated": out.values_truncated,
            "spans_dropped_too_large": out.spans_dropped,
            "processes_truncated": out.processes_truncated,
        }
        return data, offsets, counts, counters
    finally:
        work_free(&w)
        vec_free(&out.plan)
