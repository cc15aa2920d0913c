# cython: freethreading_compatible = False
# (the unlocked append relies on the GIL: see SpanRing's locking notes)
"""Cython ring buffer: spans written row by row into preallocated column segments.

A segment holds ``batch_size`` rows of every span column. ``append`` copies one
:class:`Span` into the open segment under a mutex; when the segment is full (or
the flush interval passes) it is *sealed* into an Arrow RecordBatch whose
buffers point at the segment's memory. From then on nothing writes to that
memory: the segment goes back to the pool only when the last Arrow buffer that
points into it is freed (a lease object is the buffers' base).

Columns that are rarely used (flags, trace state, status message, scope,
resource, events, links, and the int/double/bool children of attributes) are
*lazily materialised*: a segment writes them only from the first row that needs
one, and a sealed batch whose column was never touched points at one shared,
read-only zero page instead. So an ordinary span costs memory only for what it
carries.
"""

import queue as _queue
import threading

import numpy as np
import pyarrow as pa

cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from knhk._core._span cimport Span
from knhk._core._types cimport (
    int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t,
    DROP_QUEUE_FULL, DROP_OLDEST, DROP_BLOCK_TIMEOUT, DROP_ADAPTIVE, DROP_SHUTDOWN,
    DROP_INVALID, N_DROP_REASONS,
    BP_DROP_OLDEST, BP_BLOCK, BP_ADAPTIVE,
    ATTR_STRING, ATTR_BOOL, ATTR_INT, ATTR_DOUBLE, ATTR_ARRAY, ATTR_KVLIST,
    ATTR_BYTES,
)

cnp.import_array()

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1


cdef inline int64_t _mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void* _data(object arr):
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


# One shared, read-only zero region that stands in for untouched columns.
cdef object _ZERO_ARRAY = np.zeros(1 << 16, dtype=np.uint8)
cdef object _ZERO_BUF = pa.py_buffer(_ZERO_ARRAY)


cdef object _zeros(Py_ssize_t nbytes):
    global _ZERO_ARRAY, _ZERO_BUF
    if nbytes > _ZERO_ARRAY.shape[0]:
        size = 1 << max(16, (nbytes - 1).bit_length())
        _ZERO_ARRAY = np.zeros(size, dtype=np.uint8)
        _ZERO_ARRAY.flags.writeable = False
        _ZERO_BUF = pa.py_buffer(_ZERO_ARRAY)
    return _ZERO_BUF


_ZERO_ARRAY.flags.writeable = False


def zeros(Py_ssize_t nbytes):
    """The shared read-only zero buffer, at least ``nbytes`` long (for default columns)."""
    return _zeros(nbytes)


# Filled in by ``_bind_python`` (knhk.schema imports this module's sibling).
cdef object _T = None              # the schema types namespace
cdef object _ENCODE_SLOW = None    # attribute value -> (type, payload) for rare types


def _bind_python(types, encode_slow):
    """Give the kernel the Arrow types and the slow-path attribute encoder."""
    global _T, _ENCODE_SLOW
    _T = types
    _ENCODE_SLOW = encode_slow


cdef enum:
    ID_CACHE = 64    # slots of an interner's identity cache (a power of two)


cdef class _Interner:
    """Strings to int32 indices of a per-batch dictionary.

    Spans mostly pass the very same string objects (literals, constants) again and
    again, so a small direct-mapped cache by object identity answers before the
    dict is hashed into. It caches only objects that ``values`` holds, so a cached
    address cannot be freed and reused by another object while the interner lives.
    """
    cdef dict index
    cdef list values
    cdef PyObject* c_obj[ID_CACHE]
    cdef int32_t c_idx[ID_CACHE]

    def __cinit__(self):
        self.index = {}
        self.values = []
        memset(self.c_obj, 0, sizeof(self.c_obj))

    cdef inline int32_t get(self, object s) except -1:
        cdef Py_ssize_t h = (<uintptr_t><PyObject*>s >> 4) & (ID_CACHE - 1)
        cdef PyObject* p
        cdef int32_t i
        if self.c_obj[h] == <PyObject*>s:
            return self.c_idx[h]
        # (PyDict_GetItem would save and restore the error state on every call)
        p = PyDict_GetItemWithError(self.index, s)
        if p is not NULL:
            i = <int32_t><object>p
        else:
            if type(s) is not str:
                # only exact str keys: a str subclass's Python-level __eq__ would run
                # inside the unlocked append's lookups (see SpanRing's locking notes)
                s = str.__str__(s)
            i = <int32_t>len(self.values)
            self.values.append(s)
            PyDict_SetItem(self.index, s, i)
        if PyList_GET_ITEM(self.values, i) == <PyObject*>s:
            self.c_obj[h] = <PyObject*>s
            self.c_idx[h] = i
        return i

    cdef object dictionary(self):
        return _string_array(self.values)


# Building an Arrow string array from a list costs microseconds, and a segment's
# dictionaries (span names, services, attribute keys and values) are usually the
# same as the previous segment's: small ones are kept, keyed by their values.
cdef dict _DICTIONARIES = {}
cdef Py_ssize_t _DICT_CACHE_VALUES = 64
cdef Py_ssize_t _DICT_CACHE_ENTRIES = 256


cdef Py_ssize_t _DICT_CACHE_VALUE_CHARS = 256  # longer values are not worth keeping


cdef object _string_array(list values):
    cdef object v
    if len(values) > _DICT_CACHE_VALUES:
        return pa.array(values, type=pa.string())
    key = tuple(values)
    arr = _DICTIONARIES.get(key)
    if arr is None:
        arr = pa.array(values, type=pa.string())
        for v in values:  # bounded in bytes too: long values (SQL text, ...) stay out
            if len(<str>v) > _DICT_CACHE_VALUE_CHARS:
                return arr
        if len(_DICTIONARIES) >= _DICT_CACHE_ENTRIES:
            _DICTIONARIES.clear()
        _DICTIONARIES[key] = arr
    return arr


cdef class _Lease:
    """Base of a sealed batch's buffers; returns the segment to the pool when freed."""
    cdef _Segment seg
    cdef list pool
    cdef Py_ssize_t max_pool

    def __dealloc__(self):
        if self.pool is not None and len(self.pool) < self.max_pool:
            self.pool.append(self.seg)


cdef inline object _fbuf(object arr, Py_ssize_t nbytes, object lease):
    return pa.foreign_buffer(<uintptr_t>_data(arr), nbytes, lease)


cdef object _bitmap(object mask):
    """Arrow validity bitmap from a bool array, or None when all set."""
    return pa.py_buffer(np.packbits(mask, bitorder="little"))


cdef class _AttrCol:
    """One list<attribute> column of a segment (span, resource or scope attributes)."""
    cdef Py_ssize_t n, cap, rows_cap
    cdef object a_off, a_key, a_typ, a_str, a_int, a_dbl, a_bool
    cdef int32_t* off
    cdef int32_t* key
    cdef int8_t* typ
    cdef int32_t* sidx
    cdef int64_t* ival
    cdef double* dval
    cdef uint8_t* bval
    cdef bint dirty_off, dirty_int, dirty_dbl, dirty_bool, has_nonstr
    cdef list sparse_bytes, sparse_any
    cdef _Interner keys, strs

    def __cinit__(self, Py_ssize_t rows_cap, Py_ssize_t cap):
        self.rows_cap = rows_cap
        self.cap = 0
        self._grow(max(cap, 16))
        self.reset()

    cdef void reset(self):
        self.n = 0
        self.dirty_off = self.dirty_int = self.dirty_dbl = self.dirty_bool = False
        self.has_nonstr = False
        self.sparse_bytes = None
        self.sparse_any = None
        self.keys = None
        self.strs = None

    # Memory that a column does not use is never allocated: the offsets and the
    # int/double/bool children come into being the first time a segment needs
    # them (and stay for the segment's next use from the pool).

    cdef int _ensure_offsets(self) except -1:
        if self.a_off is None:
            self.a_off = np.empty(self.rows_cap + 1, dtype=np.int32)
            self.off = <int32_t*>_data(self.a_off)
        return 0

    cdef int _ensure_int(self) except -1:
        if self.a_int is None or self.a_int.shape[0] < self.cap:
            a = np.empty(self.cap, np.int64)
            if self.a_int is not None:
                a[:self.n] = self.a_int[:self.n]
            self.a_int = a
            self.ival = <int64_t*>_data(a)
        return 0

    cdef int _ensure_dbl(self) except -1:
        if self.a_dbl is None or self.a_dbl.shape[0] < self.cap:
            a = np.empty(self.cap, np.float64)
            if self.a_dbl is not None:
                a[:self.n] = self.a_dbl[:self.n]
            self.a_dbl = a
            self.dval = <double*>_data(a)
        return 0

    cdef int _ensure_bool(self) except -1:
        if self.a_bool is None or self.a_bool.shape[0] < self.cap:
            a = np.empty(self.cap, np.uint8)
            if self.a_bool is not None:
                a[:self.n] = self.a_bool[:self.n]
            self.a_bool = a
            self.bval = <uint8_t*>_data(a)
        return 0

    cdef int _grow(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = max(need, 2 * self.cap)
        cdef Py_ssize_t n = self.n if self.cap else 0
        a_key = np.empty(cap, np.int32)
        a_typ = np.empty(cap, np.int8)
        a_str = np.empty(cap, np.int32)
        if n:
            a_key[:n] = self.a_key[:n]
            a_typ[:n] = self.a_typ[:n]
            a_str[:n] = self.a_str[:n]
        self.a_key, self.a_typ, self.a_str = a_key, a_typ, a_str
        self.key = <int32_t*>_data(a_key)
        self.typ = <int8_t*>_data(a_typ)
        self.sidx = <int32_t*>_data(a_str)
        self.cap = cap
        if self.a_int is not None:
            self._ensure_int()
        if self.a_dbl is not None:
            self._ensure_dbl()
        if self.a_bool is not None:
            self._ensure_bool()
        return 0

    cdef void rollback(self, Py_ssize_t n):
        """Forget attributes from position ``n`` on (a rejected row's)."""
        self.n = n
        # (no negative indexing: the module is compiled with wraparound off)
        while self.sparse_bytes and self.sparse_bytes[len(self.sparse_bytes) - 1][0] >= n:
            self.sparse_bytes.pop()
        while self.sparse_any and self.sparse_any[len(self.sparse_any) - 1][0] >= n:
            self.sparse_any.pop()

    cdef inline void end_row(self, Py_ssize_t row) noexcept:
        if self.dirty_off:
            self.off[row + 1] = <int32_t>self.n

    cdef int write(self, Py_ssize_t row, dict attrs, str field) except -1:
        """Append ``attrs`` as row ``row``'s list; the caller rolls back on error."""
        cdef Py_ssize_t i
        cdef object k, v
        cdef int overflow = 0
        cdef long long iv
        cdef int8_t t
        if not self.dirty_off:
            self._ensure_offsets()
            memset(self.off, 0, (row + 1) * sizeof(int32_t))
            self.dirty_off = True
        if self.keys is None:
            self.keys = _Interner()
            self.strs = _Interner()
            self.sparse_bytes = []
            self.sparse_any = []
        if self.n + len(attrs) > self.cap:
            self._grow(self.n + len(attrs))
        for k, v in attrs.items():
            if type(k) is not str:
                raise TypeError(f"{field} keys must be str, got {type(k).__name__} ({k!r})")
            i = self.n
            self.key[i] = self.keys.get(k)
            self.sidx[i] = 0
            if type(v) is str:
                t = ATTR_STRING
                self.sidx[i] = self.strs.get(v)
            elif type(v) is bool:
                t = ATTR_BOOL
                if not self.dirty_bool:
                    self._ensure_bool()
                    memset(self.bval, 0, i)
                    self.dirty_bool = True
                self.bval[i] = (v is True)
            elif type(v) is int:
                iv = PyLong_AsLongLongAndOverflow(v, &overflow)
                if overflow:
                    raise ValueError(f"{field}[{k!r}] = {v} does not fit in int64")
                t = ATTR_INT
                if not self.dirty_int:
                    self._ensure_int()
                    memset(self.ival, 0, i * sizeof(int64_t))
                    self.dirty_int = True
                self.ival[i] = iv
            elif type(v) is float:
                t = ATTR_DOUBLE
                if not self.dirty_dbl:
                    self._ensure_dbl()
                    memset(self.dval, 0, i * sizeof(double))
                    self.dirty_dbl = True
                self.dval[i] = <double>v
            else:
                t = self._write_slow(i, k, v, field)
            self.typ[i] = t
            if t != ATTR_STRING:
                self.has_nonstr = True
            if self.dirty_bool and t != ATTR_BOOL:
                self.bval[i] = 0
            if self.dirty_int and t != ATTR_INT:
                self.ival[i] = 0
            if self.dirty_dbl and t != ATTR_DOUBLE:
                self.dval[i] = 0.0
            self.n = i + 1
        self.off[row + 1] = <int32_t>self.n
        return 0

    cdef int write_unlocked(self, Py_ssize_t row, dict attrs) except -1:
        """Append ``attrs`` as row ``row``'s list if every key and value is an exact
        ``str`` and the column already has room and interners; else 0, with nothing
        committed (an interned string that no row uses is harmless)."""
        cdef Py_ssize_t i = self.n, pos = 0
        cdef PyObject* k
        cdef PyObject* v
        if not self.dirty_off or self.keys is None or i + len(attrs) > self.cap:
            return 0
        while PyDict_Next(attrs, &pos, &k, &v):
            if type(<object>k) is not str or type(<object>v) is not str:
                return 0
            self.key[i] = self.keys.get(<object>k)
            self.sidx[i] = self.strs.get(<object>v)
            self.typ[i] = ATTR_STRING
            if self.dirty_bool:
                self.bval[i] = 0
            if self.dirty_int:
                self.ival[i] = 0
            if self.dirty_dbl:
                self.dval[i] = 0.0
            i += 1
        self.n = i
        self.off[row + 1] = <int32_t>i
        return 1

    cdef int8_t _write_slow(self, Py_ssize_t i, object k, object v, str field) except -1:
        # Rare types (AttributeValue, subclasses, numpy scalars, bytes, arrays,
        # kvlists, None) go through the Python encoder, which names the key on error.
        cdef int8_t t
        t, payload = _ENCODE_SLOW(v, field, k)
        if t == ATTR_STRING:
            self.sidx[i] = self.strs.get(payload)
        elif t == ATTR_BOOL:
            if not self.dirty_bool:
                self._ensure_bool()
                memset(self.bval, 0, i)
                self.dirty_bool = True
            self.bval[i] = payload
        elif t == ATTR_INT:
            if not self.dirty_int:
                self._ensure_int()
                memset(self.ival, 0, i * sizeof(int64_t))
                self.dirty_int = True
            self.ival[i] = payload
        elif t == ATTR_DOUBLE:
            if not self.dirty_dbl:
                self._ensure_dbl()
                memset(self.dval, 0, i * sizeof(double))
                self.dirty_dbl = True
            self.dval[i] = payload
        elif t == ATTR_BYTES:
            self.sparse_bytes.append((i, payload))
        elif t == ATTR_ARRAY or t == ATTR_KVLIST:
            self.sparse_any.append((i, payload))
        return t

    cdef object to_arrow(self, Py_ssize_t rows, object lease):
        cdef Py_ssize_t m = self.n
        if not self.dirty_off:
            return _const("no_attrs", rows)
        typ = self.a_typ[:m]
        key = pa.DictionaryArray.from_buffers(
            _T.DICT_STR, m, [None, _fbuf(self.a_key, m * 4, lease)],
            self.keys.dictionary(), 0)
        if self.has_nonstr:
            smask = typ == ATTR_STRING
            snulls = m - int(np.count_nonzero(smask))
            svalid = _bitmap(smask) if snulls else None
        else:
            snulls, svalid = 0, None
        sval = pa.DictionaryArray.from_buffers(
            _T.DICT_STR, m, [svalid, _fbuf(self.a_str, m * 4, lease)],
            self.strs.dictionary(), snulls)
        children = [
            key,
            pa.Array.from_buffers(pa.int8(), m, [None, _fbuf(self.a_typ, m, lease)]),
            sval,
            _numeric_child(m, self.dirty_int, typ, ATTR_INT, self.a_int, lease),
            _numeric_child(m, self.dirty_dbl, typ, ATTR_DOUBLE, self.a_dbl, lease),
            _bool_child(m, self.dirty_bool, typ, self.a_bool),
            _sparse_binary(m, self.sparse_bytes),
            _sparse_binary(m, self.sparse_any),
        ]
        # (from_buffers: StructArray.from_arrays re-derives the struct type from the
        # fields each time, several times the cost; every child is exactly m long)
        struct = pa.Array.from_buffers(_T.ATTRIBUTE_STRUCT, m, [None], children=children)
        return pa.Array.from_buffers(
            _T.ATTRIBUTES_TYPE, rows, [None, _fbuf(self.a_off, (rows + 1) * 4, lease)],
            children=[struct])


cdef object _EMPTY_ATTRS = None


cdef object _empty_attrs():
    global _EMPTY_ATTRS
    if _EMPTY_ATTRS is None:
        _EMPTY_ATTRS = pa.array([], type=_T.ATTRIBUTE_STRUCT)
    return _EMPTY_ATTRS


cdef object _numeric_child(Py_ssize_t m, bint dirty, object typ, int8_t tag, object arr,
                           object lease):
    # (an untouched child is the shared all-null column: no mask is computed)
    if not dirty:
        return _const("null_i64" if tag == ATTR_INT else "null_f64", m)
    mask = typ == tag
    valid = int(np.count_nonzero(mask))
    return pa.Array.from_buffers(
        pa.int64() if tag == ATTR_INT else pa.float64(), m,
        [_bitmap(mask) if valid < m else None, _fbuf(arr, m * 8, lease)],
        null_count=m - valid)


cdef object _bool_child(Py_ssize_t m, bint dirty, object typ, object arr):
    if not dirty:
        return _const("null_bool", m)
    mask = typ == ATTR_BOOL
    valid = int(np.count_nonzero(mask))
    return pa.Array.from_buffers(
        pa.bool_(), m,
        [_bitmap(mask) if valid < m else None,
         pa.py_buffer(np.packbits(arr[:m].view(np.bool_), bitorder="little"))],
        null_count=m - valid)


cdef object _sparse_binary(Py_ssize_t m, list items):
    if not items:
        return _const("null_bin", m)
    values = [None] * m
    for i, payload in items:
        values[i] = payload
    return pa.array(values, type=pa.binary())


cdef class _Segment:
    """``cap`` rows of every span column, written in place until sealed."""
    cdef Py_ssize_t cap, n
    cdef int64_t opened_ns
    cdef object a_trace, a_span, a_parent, a_pvalid, a_name, a_service, a_kind
    cdef object a_start, a_end, a_status, a_flags, a_tstate, a_scope_name, a_scope_ver
    cdef uint8_t* trace
    cdef uint8_t* spanid
    cdef uint8_t* parent
    cdef uint8_t* pvalid
    cdef int32_t* name
    cdef int32_t* service
    cdef int8_t* kind
    cdef int64_t* start
    cdef int64_t* end
    cdef int8_t* status
    cdef uint32_t* flags
    cdef int32_t* tstate
    cdef int32_t* scope_name
    cdef int32_t* scope_ver
    cdef bint any_root, dirty_flags, dirty_tstate, dirty_scope
    cdef int32_t default_service_idx
    cdef list status_msgs, events, links
    cdef _Interner names, services, tstates, scope_names, scope_vers
    cdef _AttrCol attrs, res, scope_attrs

    def __cinit__(self, Py_ssize_t cap, Py_ssize_t attrs_per_row):
        self.cap = cap
        self.a_trace = np.empty(cap * 16, np.uint8)
        self.a_span = np.empty(cap * 8, np.uint8)
        self.a_parent = np.empty(cap * 8, np.uint8)
        self.a_pvalid = np.empty(cap, np.uint8)
        self.a_name = np.empty(cap, np.int32)
        self.a_service = np.empty(cap, np.int32)
        self.a_kind = np.empty(cap, np.int8)
        self.a_start = np.empty(cap, np.int64)
        self.a_end = np.empty(cap, np.int64)
        self.a_status = np.empty(cap, np.int8)
        self.trace = <uint8_t*>_data(self.a_trace)
        self.spanid = <uint8_t*>_data(self.a_span)
        self.parent = <uint8_t*>_data(self.a_parent)
        self.pvalid = <uint8_t*>_data(self.a_pvalid)
        self.name = <int32_t*>_data(self.a_name)
        self.service = <int32_t*>_data(self.a_service)
        self.kind = <int8_t*>_data(self.a_kind)
        self.start = <int64_t*>_data(self.a_start)
        self.end = <int64_t*>_data(self.a_end)
        self.status = <int8_t*>_data(self.a_status)
        self.attrs = _AttrCol(cap, cap * attrs_per_row)
        self.res = _AttrCol(cap, 16)
        self.scope_attrs = _AttrCol(cap, 16)
        self.reset()

    # Rarely used columns are allocated the first time a segment needs them.

    cdef int _ensure_sparse(self) except -1:
        if self.tstates is None:
            self.tstates = _Interner()
            self.scope_names = _Interner()
            self.scope_vers = _Interner()
        if self.a_flags is None:
            self.a_flags = np.empty(self.cap, np.uint32)
            self.a_tstate = np.empty(self.cap, np.int32)
            self.a_scope_name = np.empty(self.cap, np.int32)
            self.a_scope_ver = np.empty(self.cap, np.int32)
            self.flags = <uint32_t*>_data(self.a_flags)
            self.tstate = <int32_t*>_data(self.a_tstate)
            self.scope_name = <int32_t*>_data(self.a_scope_name)
            self.scope_ver = <int32_t*>_data(self.a_scope_ver)
        return 0

    cdef void reset(self):
        self.n = 0
        self.opened_ns = 0
        self.any_root = self.dirty_flags = self.dirty_tstate = self.dirty_scope = False
        self.default_service_idx = -1
        self.status_msgs = []
        self.events = []
        self.links = []
        self.names = _Interner()
        self.services = _Interner()
        self.tstates = self.scope_names = self.scope_vers = None
        self.attrs.reset()
        self.res.reset()
        self.scope_attrs.reset()

    cdef int write(self, Span span, str default_service) except -1:
        """Write ``span`` as the next row; on error the row is not committed."""
        cdef Py_ssize_t row = self.n
        cdef Py_ssize_t a_n = self.attrs.n, r_n = self.res.n, s_n = self.scope_attrs.n
        cdef Py_ssize_t n_msgs = len(self.status_msgs), n_ev = len(self.events)
        cdef Py_ssize_t n_ln = len(self.links)
        try:
            self._write(row, span, default_service)
        except BaseException:
            self.attrs.rollback(a_n)
            self.res.rollback(r_n)
            self.scope_attrs.rollback(s_n)
            del self.status_msgs[n_msgs:]
            del self.events[n_ev:]
            del self.links[n_ln:]
            raise
        if row == 0:
            self.opened_ns = _mono_ns()
        self.n = row + 1
        return 0

    cdef int write_unlocked(self, Span span, str default_service) except -1:
        """Write ``span`` as the next row if it is a plain one; 0 (nothing committed)
        if it is not. Plain: exact ``str`` name, service and attribute keys and
        values, and none of the rarely used columns. Nothing here can let the GIL go:
        no Python code runs (exact ``str`` keys in ``str``-keyed dicts), nothing is
        freed, no object the collector tracks is allocated, and the row becomes
        visible only in the last statement."""
        cdef Py_ssize_t row = self.n
        cdef object service = span.service
        if (span.flags != 0 or span.trace_state is not None or span.scope_name is not None
                or span.scope_version is not None or span.status_message is not None
                or span.events is not None or span.links is not None
                or self.dirty_flags or self.dirty_tstate or self.dirty_scope
                or type(span.name) is not str
                or (service is not None and type(service) is not str)
                or span.resource_attributes):
            return 0
        memcpy(self.trace + row * 16, PyBytes_AS_STRING(span.trace_id), 16)
        memcpy(self.spanid + row * 8, PyBytes_AS_STRING(span.span_id), 8)
        if span.parent_span_id is None:
            memset(self.parent + row * 8, 0, 8)
            self.pvalid[row] = 0
        else:
            memcpy(self.parent + row * 8, PyBytes_AS_STRING(<bytes>span.parent_span_id), 8)
            self.pvalid[row] = 1
        self.name[row] = self.names.get(span.name)
        if service is None:
            if self.default_service_idx < 0:
                if type(default_service) is not str:
                    return 0
                self.default_service_idx = self.services.get(default_service)
            self.service[row] = self.default_service_idx
        else:
            self.service[row] = self.services.get(service)
        self.kind[row] = span._kind
        self.start[row] = span.start_time_ns
        self.end[row] = span.end_time_ns
        self.status[row] = span._status
        if span.attributes:
            if not self.attrs.write_unlocked(row, span.attributes):
                return 0
        else:
            self.attrs.end_row(row)
        # (from here on nothing can fail: the row is committed)
        self.res.end_row(row)
        self.scope_attrs.end_row(row)
        if span.parent_span_id is None:
            self.any_root = True
        if row == 0:
            self.opened_ns = _mono_ns()
        self.n = row + 1
        return 1

    cdef int _write(self, Py_ssize_t row, Span span, str default_service) except -1:
        memcpy(self.trace + row * 16, PyBytes_AS_STRING(span.trace_id), 16)
        memcpy(self.spanid + row * 8, PyBytes_AS_STRING(span.span_id), 8)
        if span.parent_span_id is None:
            memset(self.parent + row * 8, 0, 8)
            self.pvalid[row] = 0
            self.any_root = True
        else:
            memcpy(self.parent + row * 8, PyBytes_AS_STRING(<bytes>span.parent_span_id), 8)
            self.pvalid[row] = 1
        self.name[row] = self.names.get(span.name)
        if span.service is None:
            if self.default_service_idx < 0:
                self.default_service_idx = self.services.get(default_service)
            self.service[row] = self.default_service_idx
        else:
            self.service[row] = self.services.get(span.service)
        self.kind[row] = span._kind
        self.start[row] = span.start_time_ns
        self.end[row] = span.end_time_ns
        self.status[row] = span._status
        if span.flags != 0 and not self.dirty_flags:
            self._ensure_sparse()
            memset(self.flags, 0, row * sizeof(uint32_t))
            self.dirty_flags = True
        if self.dirty_flags:
            self.flags[row] = span.flags
        if span.trace_state is not None and not self.dirty_tstate:
            self._ensure_sparse()
            memset(self.tstate, 0xFF, row * sizeof(int32_t))
            self.dirty_tstate = True
        if self.dirty_tstate:
            self.tstate[row] = (-1 if span.trace_state is None
                                else self.tstates.get(span.trace_state))
        if (span.scope_name is not None or span.scope_version is not None) \
                and not self.dirty_scope:
            self._ensure_sparse()
            memset(self.scope_name, 0xFF, row * sizeof(int32_t))
            memset(self.scope_ver, 0xFF, row * sizeof(int32_t))
            self.dirty_scope = True
        if self.dirty_scope:
            self.scope_name[row] = (-1 if span.scope_name is None
                                    else self.scope_names.get(span.scope_name))
            self.scope_ver[row] = (-1 if span.scope_version is None
                                   else self.scope_vers.get(span.scope_version))
        if span.attributes:
            self.attrs.write(row, span.attributes, "attributes")
        else:
            self.attrs.end_row(row)
        if span.resource_attributes:
            self.res.write(row, span.resource_attributes, "resource_attributes")
        else:
            self.res.end_row(row)
        self.scope_attrs.end_row(row)
        if span.status_message is not None:
            self.status_msgs.append((row, span.status_message))
        if span.events is not None:
            self.events.append((row, span.events))
        if span.links is not None:
            self.links.append((row, span.links))
        return 0

    cdef object seal(self, object lease):
        """The first ``n`` rows as an Arrow RecordBatch over this segment's memory."""
        cdef Py_ssize_t n = self.n
        T = _T
        if self.any_root:
            valid = np.frombuffer(self.a_pvalid, np.bool_, n)
            pnulls = n - int(np.count_nonzero(valid))
            # all roots: the shared zero page is an all-null bitmap
            pvalid = _zeros((n + 7) // 8) if pnulls == n else _bitmap(valid)
        else:
            pnulls, pvalid = 0, None
        cols = [
            pa.Array.from_buffers(T.ID16, n, [None, _fbuf(self.a_trace, n * 16, lease)]),
            pa.Array.from_buffers(T.ID8, n, [None, _fbuf(self.a_span, n * 8, lease)]),
            pa.Array.from_buffers(T.ID8, n, [pvalid, _fbuf(self.a_parent, n * 8, lease)],
                                  null_count=pnulls),
            self._dict_col(self.dirty_tstate, self.a_tstate, self.tstates, lease),
            (pa.Array.from_buffers(pa.uint32(), n, [None, _fbuf(self.a_flags, n * 4, lease)])
             if self.dirty_flags else _zero_u32(n)),
            pa.DictionaryArray.from_buffers(
                T.DICT_STR, n, [None, _fbuf(self.a_name, n * 4, lease)],
                self.names.dictionary(), 0),
            pa.Array.from_buffers(pa.int8(), n, [None, _fbuf(self.a_kind, n, lease)]),
            pa.Array.from_buffers(pa.int64(), n, [None, _fbuf(self.a_start, n * 8, lease)]),
            pa.Array.from_buffers(pa.int64(), n, [None, _fbuf(self.a_end, n * 8, lease)]),
            pa.Array.from_buffers(pa.int8(), n, [None, _fbuf(self.a_status, n, lease)]),
            _sparse_strings(n, self.status_msgs),
            pa.DictionaryArray.from_buffers(
                T.DICT_STR, n, [None, _fbuf(self.a_service, n * 4, lease)],
                self.services.dictionary(), 0),
            self.attrs.to_arrow(n, lease),
            _zero_u32(n),
            _nested_lists(n, self.events, "no_events", T.EVENTS_TYPE, T.event_rows),
            _zero_u32(n),
            _nested_lists(n, self.links, "no_links", T.LINKS_TYPE, T.link_rows),
            _zero_u32(n),
            self.res.to_arrow(n, lease),
            _zero_u32(n),
            _null_dict(n),
            self._dict_col(self.dirty_scope, self.a_scope_name, self.scope_names, lease),
            self._dict_col(self.dirty_scope, self.a_scope_ver, self.scope_vers, lease),
            self.scope_attrs.to_arrow(n, lease),
            _zero_u32(n),
            _null_dict(n),
        ]
        return pa.RecordBatch.from_arrays(cols, schema=T.SPAN_SCHEMA)

    cdef object _dict_col(self, bint dirty, object arr, _Interner interner, object lease):
        cdef Py_ssize_t n = self.n
        if not dirty:
            return _null_dict(n)
        idx = np.frombuffer(arr, np.int32, n)
        valid = idx >= 0
        nulls = n - int(np.count_nonzero(valid))
        if nulls:
            idx[~valid] = 0
        return pa.DictionaryArray.from_buffers(
            _T.DICT_STR, n, [_bitmap(valid) if nulls else None, _fbuf(arr, n * 4, lease)],
            interner.dictionary(), nulls)


# Columns that are entirely null or zero are the same immutable array for every
# batch of a given length: build each once and share it (an Arrow array costs
# hundreds of bytes to kilobytes even over shared buffers).
cdef dict _CONST = {}
cdef object _EMPTY_STR = None


cdef object _empty_strings():
    global _EMPTY_STR
    if _EMPTY_STR is None:
        _EMPTY_STR = pa.array([], type=pa.string())
    return _EMPTY_STR


cdef object _const(str kind, Py_ssize_t n):
    key = (kind, n)
    arr = _CONST.get(key)
    if arr is not None:
        return arr
    if kind == "null_dict":
        arr = pa.DictionaryArray.from_buffers(
            _T.DICT_STR, n, [_zeros((n + 7) // 8), _zeros(n * 4)], _empty_strings(), n)
    elif kind == "zero_u32":
        arr = pa.Array.from_buffers(pa.uint32(), n, [None, _zeros(n * 4)])
    elif kind == "null_str":
        arr = pa.Array.from_buffers(pa.string(), n,
                                    [_zeros((n + 7) // 8), _zeros((n + 1) * 4), _zeros(1)],
                                    null_count=n)
    elif kind in ("null_i64", "null_f64"):
        arr = pa.Array.from_buffers(pa.int64() if kind == "null_i64" else pa.float64(), n,
                                    [_zeros((n + 7) // 8), _zeros(n * 8)], null_count=n)
    elif kind == "null_bool":
        arr = pa.Array.from_buffers(pa.bool_(), n, [_zeros((n + 7) // 8), _zeros((n + 7) // 8)],
                                    null_count=n)
    elif kind == "null_bin":
        arr = pa.Array.from_buffers(pa.binary(), n,
                                    [_zeros((n + 7) // 8), _zeros((n + 1) * 4), _zeros(1)],
                                    null_count=n)
    elif kind == "no_attrs":
        arr = pa.Array.from_buffers(_T.ATTRIBUTES_TYPE, n, [None, _zeros((n + 1) * 4)],
                                    children=[_empty_attrs()])
    elif kind == "no_events":
        arr = pa.Array.from_buffers(_T.EVENTS_TYPE, n, [None, _zeros((n + 1) * 4)],
                                    children=[pa.array([], type=_T.EVENTS_TYPE.value_type)])
    elif kind == "no_links":
        arr = pa.Array.from_buffers(_T.LINKS_TYPE, n, [None, _zeros((n + 1) * 4)],
                                    children=[pa.array([], type=_T.LINKS_TYPE.value_type)])
    else:
        raise KeyError(kind)
    if len(_CONST) > 256:
        _CONST.clear()
    _CONST[key] = arr
    return arr


cdef object _null_dict(Py_ssize_t n):
    return _const("null_dict", n)


cdef object _zero_u32(Py_ssize_t n):
    return _const("zero_u32", n)


cdef object _sparse_strings(Py_ssize_t n, list items):
    if not items:
        return _const("null_str", n)
    values = [None] * n
    for row, s in items:
        values[row] = s
    return pa.array(values, type=pa.string())


cdef object _nested_lists(Py_ssize_t n, list items, str empty, object list_type,
                          object to_rows):
    if not items:
        return _const(empty, n)
    values = [[]] * n
    for row, objs in items:
        values[row] = to_rows(objs)
    return pa.array(values, type=list_type)


@cython.final
cdef class SpanRing:
    """Bounded, thread-safe ring of span segments feeding one consumer.

    Parameters
    ----------
    batch_size : int
        Rows per segment, hence per sealed batch.
    capacity : int
        Rows in flight at most (open segment + sealed, not yet popped).
    strategy : int
        A ``BackpressureStrategy`` value.
    block_timeout : float
        Seconds a ``BLOCK`` producer waits for room before the span is dropped.
    default_service : str
        ``service`` for spans that name none.
    attrs_per_row : int
        Initial attribute slots per row (segments grow as needed).
    """
    cdef readonly Py_ssize_t batch_size, capacity
    cdef readonly int strategy
    cdef double block_timeout
    cdef str default_service
    cdef Py_ssize_t attrs_per_row, max_pool
    cdef cython.pymutex lock
    cdef _Segment seg
    cdef list pool
    cdef object sealed            # queue.SimpleQueue of (RecordBatch, sealed monotonic ns)
    cdef Py_ssize_t queued_rows, inflight_rows
    cdef object space             # threading.Condition for BLOCK producers
    cdef int blocked
    cdef int64_t dropped[N_DROP_REASONS]
    cdef readonly int64_t received, accepted, batches_created, segments_allocated, refused
    cdef bint closed
    cdef double admit_floor
    cdef int held                 # > 0 while a thread is inside a locked section

    def __cinit__(self, Py_ssize_t batch_size, Py_ssize_t capacity, int strategy=0,
                  double block_timeout=1.0, str default_service="unknown_service",
                  Py_ssize_t attrs_per_row=2, double admit_floor=0.05):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if capacity < batch_size:
            raise ValueError(
                f"capacity ({capacity}) must be at least batch_size ({batch_size})")
        if strategy < 0 or strategy > 3:
            raise ValueError(f"unknown backpressure strategy {strategy}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.strategy = strategy
        self.block_timeout = block_timeout
        self.default_service = default_service
        self.attrs_per_row = attrs_per_row
        self.max_pool = max(2, (capacity + batch_size - 1) // batch_size + 1)
        self.admit_floor = admit_floor
        self.pool = []
        for _ in range(min(self.max_pool, 4)):
            self.pool.append(self._new_segment())
        self.seg = self._take_segment()
        self.sealed = _queue.SimpleQueue()
        self.space = threading.Condition(threading.Lock())
        memset(self.dropped, 0, sizeof(self.dropped))

    cdef _Segment _new_segment(self):
        self.segments_allocated += 1
        return _Segment(self.batch_size, self.attrs_per_row)

    cdef _Segment _take_segment(self):
        cdef _Segment seg
        try:
            seg = <_Segment>self.pool.pop()
        except IndexError:
            return self._new_segment()
        seg.reset()
        return seg

    # -- locking -----------------------------------------------------------------
    #
    # Every section that changes the ring takes ``lock`` through _enter/_exit, which
    # also count the section in ``held``. A locked section may let the GIL go (Arrow
    # calls, queues, a collection that runs finalizers), so another thread can run
    # while ``held`` is set -- but never while it is zero. The common append
    # (_append_unlocked) runs only when ``held`` is zero, holds the GIL throughout
    # and does nothing that could let it go, so no other thread can observe or
    # change the ring in the middle of it: the GIL is its lock. (The module is not
    # declared free-threading compatible, so the interpreter keeps the GIL on for it.)

    cdef inline void _enter(self) noexcept:
        self.lock.acquire()
        self.held += 1

    cdef inline void _exit(self) noexcept:
        self.held -= 1
        self.lock.release()

    # -- producers ---------------------------------------------------------------

    def append(self, span):
        """Record one :class:`Span`; return True if accepted, False if dropped."""
        if type(span) is not Span:
            if not isinstance(span, Span):
                raise TypeError(f"record_span expects a knhk.Span, got {type(span).__name__}")
        if self.held == 0 and self._append_unlocked(<Span>span):
            return True
        return self._append(<Span>span)

    cdef inline bint _append_unlocked(self, Span span) except -1:
        """Write ``span`` without the lock when nothing but a plain row write is due:
        room below capacity and no backpressure decision, a segment that this row
        does not fill (the row that fills it seals, under the lock), and a span whose
        columns need no Python call (see :meth:`_Segment.write_unlocked`). Returns
        False, having committed nothing, when the locked path must take the span."""
        cdef _Segment seg = self.seg
        cdef Py_ssize_t occ = self.queued_rows + seg.n
        if self.closed or seg.n + 1 >= self.batch_size or occ + 1 >= self.capacity:
            return False
        if self.strategy == BP_ADAPTIVE and 2 * occ > self.capacity:
            return False
        if not seg.write_unlocked(span, self.default_service):
            return False
        self.received += 1
        self.accepted += 1
        return True

    def append_many(self, spans):
        """Record an iterable of spans; return how many were accepted."""
        cdef Py_ssize_t ok = 0
        for span in spans:
            if not isinstance(span, Span):
                raise TypeError(f"record_spans expects knhk.Span items, got {type(span).__name__}")
            if self.held == 0 and self._append_unlocked(<Span>span):
                ok += 1
            else:
                ok += self._append(<Span>span)
        return ok

    cdef bint _append(self, Span span) except -1:
        cdef int status
        cdef int64_t deadline = 0
        while True:
            self._enter()
            try:
                status = self._try_append(span)
            finally:
                self._exit()
            if status != 2:
                return status
            # BLOCK: wait for room, then try again.
            if deadline == 0:
                deadline = _mono_ns() + <int64_t>(self.block_timeout * 1e9)
            if not self._wait_for_space(deadline, 1):
                self._enter()
                try:
                    self.received += 1
                    self.dropped[DROP_BLOCK_TIMEOUT] += 1
                finally:
                    self._exit()
                return False

    cdef int _try_append(self, Span span) except -1:
        """0 dropped, 1 written, 2 full and the caller should block. Lock held."""
        cdef Py_ssize_t occ
        if self.closed:
            self.received += 1
            self.dropped[DROP_SHUTDOWN] += 1
            return 0
        if self.seg.n >= self.batch_size:
            # A seal that failed earlier left a full segment: never write past it.
            self._seal_locked()
        occ = self.queued_rows + self.seg.n
        if occ >= self.capacity:
            if self.strategy == BP_BLOCK:
                return 2
            if self.strategy == BP_DROP_OLDEST:
                # Write first, so a span that is rejected evicts nothing; the open
                # segment always has room for this row.
                self.seg.write(span, self.default_service)
                self.received += 1
                self.accepted += 1
                if self.seg.n == self.batch_size:
                    self._seal_locked()
                self._evict_oldest(0)
                return 1
            self.received += 1
            self.dropped[DROP_QUEUE_FULL] += 1
            return 0
        elif self.strategy == BP_ADAPTIVE and 2 * occ > self.capacity \
                and span._status != 2 \
                and not _admit(PyBytes_AS_STRING(span.trace_id),
                               self._admit_rate(occ)):
            self.received += 1
            self.dropped[DROP_ADAPTIVE] += 1
            return 0
        self.seg.write(span, self.default_service)
        self.received += 1
        self.accepted += 1
        if self.seg.n == self.batch_size:
            self._seal_locked()
        return 1

    cdef double _admit_rate(self, Py_ssize_t occ) noexcept:
        # Linear from 1 at half full to admit_floor when full.
        cdef double x = (2.0 * occ - self.capacity) / self.capacity
        return 1.0 - x * (1.0 - self.admit_floor)

    cdef int _evict_oldest(self, Py_ssize_t need) except -1:
        """Drop sealed batches, oldest first, until ``need`` rows fit. Lock held."""
        while self.queued_rows + self.seg.n + need > self.capacity:
            if self.queued_rows == 0:
                # Only the open segment holds rows: seal it so it can be evicted.
                self._seal_locked()
                continue
            try:
                item = self.sealed.get_nowait()
            except _queue.Empty:
                return 0
            if item is None:
                # A wake-up for the consumer, not a batch: put it back and stop (the
                # consumer is taking the remaining rows right now).
                self.sealed.put(None)
                return 0
            self.queued_rows -= item[0].num_rows
            self.dropped[DROP_OLDEST] += item[0].num_rows
        return 0

    cdef bint _wait_for_space(self, int64_t deadline, Py_ssize_t need):
        cdef double remaining
        with self.space:
            self.blocked += 1
            try:
                while self.queued_rows + self.seg.n + need > self.capacity and not self.closed:
                    remaining = (deadline - _mono_ns()) / 1e9
                    if remaining <= 0:
                        return False
                    self.space.wait(min(remaining, 0.05))
            finally:
                self.blocked -= 1
        return True

    def offer(self, rb, trace_low64=None, errors=None):
        """Queue an already-built RecordBatch of at most ``capacity`` rows.

        Applies the backpressure strategy to its rows; returns the rows accepted.
        ``trace_low64`` (uint64 array) and ``errors`` (bool array) let
        ``ADAPTIVE_SAMPLING`` shed by trace id while keeping error spans.
        """
        cdef Py_ssize_t n = rb.num_rows, room, accepted
        cdef int64_t deadline = 0
        if n == 0:
            return 0
        if n > self.capacity:
            raise ValueError(f"a batch of {n} rows exceeds the ring capacity {self.capacity}")
        while True:
            self._enter()
            try:
                if self.closed:
                    self.received += n
                    self.dropped[DROP_SHUTDOWN] += n
                    return 0
                # Rows recorded earlier through append() go first.
                self._seal_locked()
                room = self.capacity - self.queued_rows - self.seg.n
                if self.strategy == BP_ADAPTIVE and trace_low64 is not None:
                    occ = self.capacity - room
                    if 2 * occ > self.capacity:
                        keep = trace_low64 < _bound(self._admit_rate(occ))
                        if errors is not None:
                            keep |= errors
                        kept = int(np.count_nonzero(keep))
                        if kept < n:
                            self.received += n - kept
                            self.dropped[DROP_ADAPTIVE] += n - kept
                            rb = rb.filter(pa.array(keep))
                            n = kept
                            if n == 0:
                                return 0
                            trace_low64 = None
                if room >= n or self.strategy == BP_DROP_OLDEST:
                    if room < n:
                        self._evict_oldest(n)
                    self._push_locked(rb, n)
                    self.received += n
                    self.accepted += n
                    return n
                if self.strategy != BP_BLOCK:
                    accepted = max(room, 0)
                    self.received += n
                    self.dropped[DROP_QUEUE_FULL] += n - accepted
                    if accepted:
                        self._push_locked(rb.slice(0, accepted), accepted)
                        self.accepted += accepted
                    return accepted
            finally:
                self._exit()
            if deadline == 0:
                deadline = _mono_ns() + <int64_t>(self.block_timeout * 1e9)
            if not self._wait_for_space(deadline, n):
                self._enter()
                try:
                    self.received += n
                    self.dropped[DROP_BLOCK_TIMEOUT] += n
                finally:
                    self._exit()
                return 0

    def offer_all(self, list chunks):
        """Queue every chunk, or none of them; return whether they were taken.

        For senders that retry (OTLP receivers): when the ring is closed or lacks
        room for all rows, nothing is taken, no strategy applies and the rows are
        counted as ``refused`` (not received, not dropped: the sender keeps them).
        """
        cdef Py_ssize_t total = 0
        for rb in chunks:
            total += rb.num_rows
        if total == 0:
            return True
        self._enter()
        try:
            if self.closed or self.capacity - self.queued_rows - self.seg.n < total:
                self.refused += total
                return False
            self._seal_locked()  # rows recorded earlier go first
            for rb in chunks:
                self._push_locked(rb, rb.num_rows)
            self.received += total
            self.accepted += total
        finally:
            self._exit()
        return True

    def count_invalid(self, Py_ssize_t n):
        """Count ``n`` rows rejected before they reached the ring."""
        self._enter()
        try:
            self.received += n
            self.dropped[DROP_INVALID] += n
        finally:
            self._exit()

    cdef void _push_locked(self, object rb, Py_ssize_t n):
        self.sealed.put((rb, _mono_ns()))
        self.queued_rows += n
        self.batches_created += 1

    cdef int _seal_locked(self) except -1:
        cdef _Segment seg = self.seg
        cdef Py_ssize_t n = seg.n
        cdef _Lease lease
        if n == 0:
            return 0
        lease = _Lease()
        lease.seg = seg
        lease.pool = self.pool
        lease.max_pool = self.max_pool
        rb = seg.seal(lease)
        self.seg = self._take_segment()
        self._push_locked(rb, n)
        return 0

    # -- the consumer -------------------------------------------------------------

    def seal(self):
        """Seal the open segment now (if it has rows); return True if one was sealed."""
        self._enter()
        try:
            if self.seg.n == 0:
                return False
            self._seal_locked()
            return True
        finally:
            self._exit()

    def seal_if_due(self, double interval):
        """Seal the open segment if it has been open ``interval`` seconds.

        Return the seconds until the open segment falls due (``interval`` if empty).
        """
        cdef int64_t age
        self._enter()
        try:
            if self.seg.n == 0:
                return interval
            age = _mono_ns() - self.seg.opened_ns
            if age >= <int64_t>(interval * 1e9):
                self._seal_locked()
                return interval
            return interval - age / 1e9
        finally:
            self._exit()

    def pop(self, timeout=None):
        """The oldest sealed batch as ``(RecordBatch, sealed_monotonic_ns)``, or None.

        None after ``timeout`` seconds, or early when :meth:`wake` was called.
        The popped rows count as *in flight* until the consumer calls
        :meth:`release`, so "nothing queued and nothing in flight" means done.
        """
        try:
            if timeout is None:
                item = self.sealed.get_nowait()
            else:
                item = self.sealed.get(timeout=timeout)
        except _queue.Empty:
            return None
        if item is None:
            return None
        self._enter()
        try:
            self.queued_rows -= item[0].num_rows
            self.inflight_rows += item[0].num_rows
        finally:
            self._exit()
        if self.blocked:
            with self.space:
                self.space.notify_all()
        return item

    def release(self, Py_ssize_t n):
        """The consumer is done with ``n`` popped rows."""
        self._enter()
        try:
            self.inflight_rows -= n
        finally:
            self._exit()

    def wake(self):
        """Make a waiting :meth:`pop` return (None) now."""
        self.sealed.put(None)

    def close(self):
        """Refuse further spans (counted as dropped for ``shutdown``), seal, wake the consumer."""
        self._enter()
        try:
            self.closed = True
            self._seal_locked()
        finally:
            self._exit()
        self.sealed.put(None)
        with self.space:
            self.space.notify_all()

    @property
    def open_rows(self):
        return self.seg.n

    @property
    def queued(self):
        return self.queued_rows

    @property
    def inflight(self):
        """Rows popped by the consumer and not yet released."""
        return self.inflight_rows

    @property
    def occupancy(self):
        """Fraction of ``capacity`` in flight (open + sealed, not yet popped)."""
        return (self.queued_rows + self.seg.n) / self.capacity

    def dropped_counts(self):
        """Drop counters indexed by ``DropReason``."""
        self._enter()
        try:
            return [self.dropped[i] for i in range(N_DROP_REASONS)]
        finally:
            self._exit()


cdef inline uint64_t _low64(const char* trace_id) noexcept nogil:
    # The low 64 bits of the trace id read big-endian, as OpenTelemetry's
    # TraceIdRatioBased sampler reads them.
    cdef uint64_t x = 0
    cdef int i
    for i in range(8, 16):
        x = (x << 8) | <uint8_t>trace_id[i]
    return x


cdef inline uint64_t _bound(double rate) noexcept nogil:
    if rate >= 1.0:
        return 0xFFFFFFFFFFFFFFFF
    if rate <= 0.0:
        return 0
    return <uint64_t>(rate * 18446744073709551616.0)


cdef inline bint _admit(const char* trace_id, double rate) noexcept nogil:
    return _low64(trace_id) < _bound(rate)
