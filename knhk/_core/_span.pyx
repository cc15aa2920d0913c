# cython: freethreading_compatible = False
"""The per-event span record: a compact extension type.

Construction normalises ids (bytes, hex strings or ints) and times once, so the
ring buffer can copy the fields into its columns without further checks.
"""

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport INT64_MAX, INT64_MIN
from libc.string cimport memcmp
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

cimport cython

import sys
from collections.abc import Mapping

from knhk._enums import SpanKind as _SpanKind, SpanStatus as _SpanStatus

cdef tuple _KINDS = tuple(_SpanKind)
cdef tuple _STATUSES = tuple(_SpanStatus)
cdef bytes _ZERO16 = bytes(16)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef bytes normalize_id(object value, Py_ssize_t size, str field):
    """Return ``value`` as ``size`` bytes; raise a worded error naming ``field``."""
    cdef bytes out
    if type(value) is bytes:
        out = <bytes>value
    elif isinstance(value, str):
        if len(<str>value) != 2 * size:
            raise ValueError(
                f"{field} must be {size} bytes ({2 * size} hex digits), "
                f"got {len(<str>value)} hex digits")
        try:
            out = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{field} is not a hex string: {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        if value <= 0 or value.bit_length() > 8 * size:
            raise ValueError(
                f"{field} as an int must be in 1 .. 2**{8 * size} - 1, got {value}")
        out = (<object>value).to_bytes(size, "big")
    elif isinstance(value, (bytearray, memoryview)):
        out = bytes(value)
    else:
        raise TypeError(
            f"{field} must be bytes, a hex string or an int, got {type(value).__name__}")
    if PyBytes_GET_SIZE(out) != size:
        raise ValueError(f"{field} must be {size} bytes, got {PyBytes_GET_SIZE(out)}")
    if memcmp(<char*>out, <char*>_ZERO16, size) == 0:
        raise ValueError(f"{field} must not be all zeros (an invalid id in OpenTelemetry)")
    return out


cdef inline int64_t _time_arg(object value, str field) except? -1:
    if type(value) is not int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(
                f"{field} must be an int of nanoseconds, got {type(value).__name__}")
        value = int(value)
    try:
        return <int64_t>value
    except OverflowError:
        raise ValueError(f"{field} = {value} does not fit in int64 nanoseconds") from None


cdef inline int64_t _plus(int64_t a, int64_t b, str field) except? -1:
    if (b > 0 and a > INT64_MAX - b) or (b < 0 and a < INT64_MIN - b):
        raise ValueError(f"{field} is out of the int64 nanosecond range")
    return a + b


cdef uint32_t _u32(object value, str field) except? 0xFFFFFFFF:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{field} must be an int, got {type(value).__name__}")
    if value < 0 or value > 0xFFFFFFFF:
        raise ValueError(f"{field} must be in 0 .. 2**32 - 1, got {value}")
    return <uint32_t>value


cdef long _enum_arg(object value, long hi, str field, str what) except? -1:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{field} must be a {what}, got {type(value).__name__}")
    if value < 0 or value > hi:
        raise ValueError(f"{field} must be a {what} (0..{hi}), got {value}")
    return <long>value


@cython.freelist(256)
cdef class Span:
    """One span, as the per-event API takes it.

    Parameters
    ----------
    name : str
        The operation name.
    trace_id, span_id : bytes, str or int
        16 and 8 bytes; a hex string of 32 / 16 digits or a positive int is
        converted. All-zero ids are invalid.
    parent_span_id : bytes, str, int or None
        ``None`` for a root span.
    attributes : dict, optional
        ``str`` keys; values ``str``, ``bool``, ``int`` (int64), ``float``,
        ``bytes``, lists and dicts of those, or :class:`AttributeValue`.
    start_time_ns, end_time_ns, duration_ns : int, optional
        Unix nanoseconds. Any two determine the third; with none the span
        starts now and has zero length.
    kind : SpanKind
    status : SpanStatus
    service : str, optional
        The resource's ``service.name``: if None, the ``service.name`` of
        ``resource_attributes``, else the pipeline's service name.

    Examples
    --------
    >>> s = Span("GET /", trace_id="0af7651916cd43dd8448eb211c80319c",
    ...          span_id=1, start_time_ns=10, duration_ns=5)
    >>> (s.trace_id.hex()[:8], s.span_id.hex(), s.end_time_ns)
    ('0af76519', '0000000000000001', 15)
    """

    def __init__(self, str name not None, trace_id, span_id, parent_span_id=None,
                 attributes=None, duration_ns=None, status=0, start_time_ns=None,
                 end_time_ns=None, kind=1, service=None, events=None, links=None,
                 status_message=None, trace_state=None, flags=0,
                 resource_attributes=None, scope_name=None, scope_version=None):
        self._setup(name, trace_id, span_id, parent_span_id, attributes, duration_ns,
                    status, start_time_ns, end_time_ns, kind, service, events, links,
                    status_message, trace_state, flags, resource_attributes, scope_name,
                    scope_version)

    cdef int _setup(self, str name, object trace_id, object span_id, object parent_span_id,
                    object attributes, object duration_ns, object status,
                    object start_time_ns, object end_time_ns, object kind, object service,
                    object events, object links, object status_message,
                    object trace_state, object flags, object resource_attributes,
                    object scope_name, object scope_version) except -1:
        """The body of ``__init__`` (also behind the fast constructor below)."""
        cdef int64_t start, end
        self.name = name
        self.trace_id = normalize_id(trace_id, 16, "trace_id")
        self.span_id = normalize_id(span_id, 8, "span_id")
        if parent_span_id is not None:
            self.parent_span_id = normalize_id(parent_span_id, 8, "parent_span_id")
        if attributes is not None:
            if type(attributes) is not dict:
                if not isinstance(attributes, Mapping):
                    raise TypeError(
                        f"attributes must be a mapping, got {type(attributes).__name__}")
                attributes = dict(attributes)
            self.attributes = <dict>attributes

        if start_time_ns is not None:
            start = _time_arg(start_time_ns, "start_time_ns")
            if end_time_ns is not None:
                end = _time_arg(end_time_ns, "end_time_ns")
                if duration_ns is not None and \
                        end - start != _time_arg(duration_ns, "duration_ns"):
                    raise ValueError(
                        "duration_ns disagrees with end_time_ns - start_time_ns")
            else:
                end = start if duration_ns is None else _plus(
                    start, _time_arg(duration_ns, "duration_ns"), "start_time_ns + duration_ns")
        elif end_time_ns is not None:
            end = _time_arg(end_time_ns, "end_time_ns")
            start = end if duration_ns is None else _plus(
                end, -_time_arg(duration_ns, "duration_ns"), "end_time_ns - duration_ns")
        else:
            start = _now_ns()
            end = start if duration_ns is None else _plus(
                start, _time_arg(duration_ns, "duration_ns"), "now + duration_ns")
        if end < start:
            raise ValueError(
                f"end_time_ns ({end}) is before start_time_ns ({start}) in span {name!r}")
        self.start_time_ns = start
        self.end_time_ns = end

        self._kind = <int8_t>(1 if kind is 1 else _enum_arg(kind, 5, "kind", "SpanKind"))
        self._status = <int8_t>(0 if status is 0 else
                                _enum_arg(status, 2, "status", "SpanStatus"))

        if status_message is not None and not isinstance(status_message, str):
            raise TypeError(
                f"status_message must be a str, got {type(status_message).__name__}")
        self.status_message = status_message
        if service is not None and not isinstance(service, str):
            raise TypeError(f"service must be a str, got {type(service).__name__}")
        self.service = service
        if trace_state is not None and not isinstance(trace_state, str):
            raise TypeError(f"trace_state must be a str, got {type(trace_state).__name__}")
        self.trace_state = trace_state or None
        if flags is not 0:
            self.flags = _u32(flags, "flags")
        if scope_name is not None and not isinstance(scope_name, str):
            raise TypeError(f"scope_name must be a str, got {type(scope_name).__name__}")
        self.scope_name = scope_name
        if scope_version is not None and not isinstance(scope_version, str):
            raise TypeError(
                f"scope_version must be a str, got {type(scope_version).__name__}")
        self.scope_version = scope_version
        if resource_attributes is not None:
            if not isinstance(resource_attributes, Mapping):
                raise TypeError(f"resource_attributes must be a mapping, "
                                f"got {type(resource_attributes).__name__}")
            self.resource_attributes = dict(resource_attributes)
            if service is None:
                # the resource names the service, as in OTLP
                named = self.resource_attributes.get("service.name")
                if isinstance(named, str):
                    self.service = named
        if events is not None:
            self.events = [_as_event(e, i) for i, e in enumerate(events)] or None
        if links is not None:
            self.links = [_as_link(l, i) for i, l in enumerate(links)] or None
        return 0

    @property
    def kind(self):
        return _KINDS[self._kind]

    @property
    def status(self):
        return _STATUSES[self._status]

    @property
    def duration_ns(self):
        return self.end_time_ns - self.start_time_ns

    def is_root(self):
        return self.parent_span_id is None

    def _key(self):
        return (self.name, self.trace_id, self.span_id, self.parent_span_id,
                self.attributes or {}, self.start_time_ns, self.end_time_ns,
                self._kind, self._status, self.status_message, self.service,
                self.events or [], self.links or [], self.trace_state, self.flags,
                self.resource_attributes or {}, self.scope_name, self.scope_version)

    def __eq__(self, other):
        if not isinstance(other, Span):
            return NotImplemented
        return self._key() == (<Span>other)._key()

    def __hash__(self):
        return hash((self.trace_id, self.span_id))

    def __repr__(self):
        parent = "None" if self.parent_span_id is None else self.parent_span_id.hex()
        return (f"Span(name={self.name!r}, trace_id={self.trace_id.hex()!r}, "
                f"span_id={self.span_id.hex()!r}, parent_span_id={parent}, "
                f"kind={self.kind.name}, status={self.status.name}, "
                f"duration_ns={self.duration_ns}, service={self.service!r}, "
                f"attributes={self.attributes!r})")


cdef SpanEvent _as_event(object e, Py_ssize_t i):
    if isinstance(e, SpanEvent):
        return <SpanEvent>e
    if isinstance(e, dict):
        return SpanEvent(**e)
    raise TypeError(f"events[{i}] must be a SpanEvent or a dict, got {type(e).__name__}")


cdef SpanLink _as_link(object l, Py_ssize_t i):
    if isinstance(l, SpanLink):
        return <SpanLink>l
    if isinstance(l, dict):
        return SpanLink(**l)
    raise TypeError(f"links[{i}] must be a SpanLink or a dict, got {type(l).__name__}")


cdef class SpanEvent:
    """A timestamped event inside a span (OTLP ``Span.Event``)."""

    def __init__(self, str name not None, time_ns=None, attributes=None,
                 dropped_attributes_count=0):
        self.name = name
        self.time_ns = _now_ns() if time_ns is None else _time_arg(time_ns, "time_ns")
        if attributes is not None and not isinstance(attributes, dict):
            raise TypeError(f"event attributes must be a dict, got {type(attributes).__name__}")
        self.attributes = dict(attributes) if attributes else None
        self.dropped_attributes_count = _u32(dropped_attributes_count,
                                             "event dropped_attributes_count")

    def _key(self):
        return (self.name, self.time_ns, self.attributes or {}, self.dropped_attributes_count)

    def __eq__(self, other):
        if not isinstance(other, SpanEvent):
            return NotImplemented
        return self._key() == (<SpanEvent>other)._key()

    def __hash__(self):
        return hash((self.name, self.time_ns))

    def __repr__(self):
        return f"SpanEvent({self.name!r}, time_ns={self.time_ns}, attributes={self.attributes!r})"


cdef class SpanLink:
    """A link from a span to another span context (OTLP ``Span.Link``)."""

    def __init__(self, trace_id, span_id, trace_state=None, flags=0, attributes=None,
                 dropped_attributes_count=0):
        self.trace_id = normalize_id(trace_id, 16, "link trace_id")
        self.span_id = normalize_id(span_id, 8, "link span_id")
        if trace_state is not None and not isinstance(trace_state, str):
            raise TypeError(f"link trace_state must be a str, got {type(trace_state).__name__}")
        self.trace_state = trace_state or None
        self.flags = _u32(flags, "link flags")
        if attributes is not None and not isinstance(attributes, dict):
            raise TypeError(f"link attributes must be a dict, got {type(attributes).__name__}")
        self.attributes = dict(attributes) if attributes else None
        self.dropped_attributes_count = _u32(dropped_attributes_count,
                                             "link dropped_attributes_count")

    def _key(self):
        return (self.trace_id, self.span_id, self.trace_state, self.flags,
                self.attributes or {}, self.dropped_attributes_count)

    def __eq__(self, other):
        if not isinstance(other, SpanLink):
            return NotImplemented
        return self._key() == (<SpanLink>other)._key()

    def __hash__(self):
        return hash((self.trace_id, self.span_id))

    def __repr__(self):
        return f"SpanLink(trace_id={self.trace_id.hex()!r}, span_id={self.span_id.hex()!r})"


# -- the fast constructor ------------------------------------------------------------------
#
# ``Span(...)`` is the per-event API's hot call. Cython's own constructor parses the
# 19 parameters into new references and releases them again; this one matches the
# keywords by identity against the interned parameter names, borrows the values and
# calls the same ``_setup`` (so checks and errors are those of ``__init__``). Anything
# it does not handle -- a keyword spelled by a string that is not the interned one,
# a parameter given twice, a missing or non-``str`` name, too many positional
# arguments, a subclass -- goes to Cython's constructor, which gives the usual
# errors. (CPython calls a type through ``tp_vectorcall`` when set; the slot is not
# inherited, so subclasses keep the generic path.)

cdef extern from "Python.h":
    ctypedef PyObject* (*vectorcallfunc)(PyObject*, PyObject* const*, size_t,
                                         PyObject*) except NULL
    Py_ssize_t PyVectorcall_NARGS(size_t nargsf)
    ctypedef struct PyTypeObject:
        vectorcallfunc tp_vectorcall

cdef enum:
    N_PARAMS = 19

cdef object _PARAM_NAMES = tuple(sys.intern(n) for n in (
    "name", "trace_id", "span_id", "parent_span_id", "attributes", "duration_ns",
    "status", "start_time_ns", "end_time_ns", "kind", "service", "events", "links",
    "status_message", "trace_state", "flags", "resource_attributes", "scope_name",
    "scope_version"))
cdef PyObject* _PARAMS[N_PARAMS]
cdef PyObject* _DEFAULTS[N_PARAMS]      # NULL for the required ones
cdef object _DEFAULT_VALUES = (None,) * 6 + (0, None, None, 1) + (None,) * 5 + (0,) + (None,) * 3
cdef vectorcallfunc _generic_new = NULL


cdef PyObject* _span_vectorcall(PyObject* cls, PyObject* const* args, size_t nargsf,
                                PyObject* kwnames) except NULL:
    cdef Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = 0, i, j
    cdef PyObject* v[N_PARAMS]
    cdef uint32_t given = 0
    cdef PyObject* key
    if cls != <PyObject*>Span or nargs > N_PARAMS:
        return _generic_new(cls, args, nargsf, kwnames)
    for i in range(N_PARAMS):
        v[i] = _DEFAULTS[i]
    for i in range(nargs):
        v[i] = args[i]
        given |= (<uint32_t>1) << i
    if kwnames is not NULL:
        nkw = PyTuple_GET_SIZE(<object>kwnames)
        for i in range(nkw):
            key = PyTuple_GET_ITEM(<object>kwnames, i)
            j = 0
            while j < N_PARAMS and _PARAMS[j] != key:
                j += 1
            if j == N_PARAMS or given & ((<uint32_t>1) << j):
                return _generic_new(cls, args, nargsf, kwnames)
            given |= (<uint32_t>1) << j
            v[j] = args[nargs + i]
    if (given & 7) != 7 or type(<object>v[0]) is not str:
        return _generic_new(cls, args, nargsf, kwnames)
    return _construct(v)


cdef PyObject* _construct(PyObject** v) except NULL:
    # (the values are borrowed: the caller's arguments and the defaults outlive the call)
    cdef Span span = Span.__new__(Span)
    span._setup(<str>v[0], <object>v[1], <object>v[2], <object>v[3], <object>v[4],
                <object>v[5], <object>v[6], <object>v[7], <object>v[8], <object>v[9],
                <object>v[10], <object>v[11], <object>v[12], <object>v[13], <object>v[14],
                <object>v[15], <object>v[16], <object>v[17], <object>v[18])
    Py_INCREF(span)
    return <PyObject*>span


cdef void _install_fast_constructor():
    global _generic_new
    cdef Py_ssize_t i
    for i in range(N_PARAMS):
        _PARAMS[i] = <PyObject*>_PARAM_NAMES[i]
        _DEFAULTS[i] = NULL if i < 3 else <PyObject*>_DEFAULT_VALUES[i]
    _generic_new = (<PyTypeObject*>Span).tp_vectorcall
    if _generic_new is not NULL:
        (<PyTypeObject*>Span).tp_vectorcall = _span_vectorcall


_install_fast_constructor()
