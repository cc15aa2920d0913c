"""Jaeger exporter: span batches as Thrift compact ``Agent.emitBatch`` UDP datagrams.

What a Jaeger agent (or the OpenTelemetry Collector's ``jaeger`` receiver with
``thrift_compact``, port 6831) receives: one oneway ``emitBatch`` message per
datagram, each a ``Batch`` of one ``Process`` (the service name, resource
attributes as tags) and spans with typed tags, span events as logs and
references from the parent (CHILD_OF) and the links (FOLLOWS_FROM), mapped as
the OpenTelemetry specification's Jaeger transformation says. Spans are
grouped by process and trace so a datagram carries whole traces where they
fit, and no datagram is larger than ``max_packet_size``.

The wire work is the compiled kernel ``knhk._core._jaeger``; this module turns
a batch into its column buffers and sends the datagrams on a non-blocking UDP
socket, counting what could not be sent. Jaeger v2 ingests OTLP natively, so
:class:`~knhk.exporters.otlp.OtlpExporter` serves Jaeger v2 as well.

Example
-------
>>> import knhk
>>> from knhk.exporters.jaeger import encode_batch
>>> batch = knhk.SpanBatch.from_spans([
...     knhk.Span("GET /", trace_id=1, span_id=2, start_time_ns=5_000, duration_ns=7_000,
...               service="frontend", attributes={"http.response.status_code": 200})])
>>> datagrams = encode_batch(batch)
>>> len(datagrams), datagrams[0][:2], b"emitBatch" in datagrams[0]
(1, b'\\x82\\x81', True)
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import math
import socket
import threading
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk import _attributes
from knhk._build import load_core
from knhk.batch import MetricBatch, SpanBatch
from knhk.exporters.base import Exporter, ExportResult
from knhk.schema import SPAN_SCHEMA, AttrType

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "JaegerExporter", "encode_batch"]

logger = logging.getLogger(__name__)

_kernel = load_core("_jaeger")

#: The Jaeger agent's and clients' default UDP packet limit (bytes).
DEFAULT_MAX_PACKET_SIZE = 65_000
#: The largest UDP payload over IPv4.
_MAX_UDP = 65_507
#: Below this a datagram cannot hold a process and a span worth sending.
_MIN_PACKET = 512

_EMPTY_U8 = np.zeros(0, np.uint8)
_NO_STR = (None, np.zeros(1, np.int32), _EMPTY_U8)


# -- column buffers -----------------------------------------------------------------------


class _Prep:
    """What preparing one batch's buffers found."""

    __slots__ = ("invalid_utf8",)

    def __init__(self) -> None:
        self.invalid_utf8 = 0  # text values with invalid UTF-8, sent with U+FFFD


def _valid_utf8(arr: pa.Array, prep: _Prep) -> pa.Array:
    """``arr`` (a string array), with invalid UTF-8 replaced by U+FFFD (counted in ``prep``)."""
    try:
        arr.validate(full=True)
        return arr
    except pa.ArrowInvalid:
        pass
    raw = pa.Array.from_buffers(pa.binary(), len(arr), arr.buffers(), arr.null_count,
                                arr.offset).to_pylist()
    fixed = []
    for b in raw:
        if b is None:
            fixed.append(None)
            continue
        try:
            fixed.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            fixed.append(b.decode("utf-8", "replace"))
            prep.invalid_utf8 += 1
    return pa.array(fixed, pa.string())


def _str_parts(arr: pa.Array, prep: _Prep, text: bool = True
               ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(int32 indices or None, int32 offsets, uint8 data) of a string/binary/dictionary array."""
    if isinstance(arr, pa.DictionaryArray):
        idx = pc.fill_null(arr.indices.cast(pa.int32()), -1).to_numpy()
        _, off, data = _str_parts(arr.dictionary, prep, text)
        return np.ascontiguousarray(idx, np.int32), off, data
    if text and pa.types.is_string(arr.type):
        arr = _valid_utf8(arr, prep)
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.string() if text else pa.binary())
    bufs = arr.buffers()
    if len(arr) == 0:
        return _NO_STR
    off = np.frombuffer(bufs[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else _EMPTY_U8
    idx = None
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        idx = np.where(valid, np.arange(len(arr), dtype=np.int32), -1).astype(np.int32)
    return idx, np.ascontiguousarray(off), data


def _fixed(arr: pa.Array, width: int) -> np.ndarray:
    buf = arr.buffers()[1]
    if buf is None or len(arr) == 0:
        return _EMPTY_U8
    raw = np.frombuffer(buf, np.uint8)
    return np.ascontiguousarray(raw[arr.offset * width:(arr.offset + len(arr)) * width])


def _num(arr: pa.Array, dtype: Any) -> np.ndarray:
    """The values of a fixed-width column (values under nulls are never read)."""
    n = len(arr)
    if arr.null_count == 0 or n == 0:
        return np.ascontiguousarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)
    fill = False if pa.types.is_boolean(arr.type) else 0
    return np.ascontiguousarray(pc.fill_null(arr, fill).to_numpy(zero_copy_only=False),
                                dtype=dtype)


def _used_values(lists: pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, the child rows they cover): a slice never drags its parent's rows."""
    off = lists.offsets.to_numpy()
    start = int(off[0]) if off.size else 0
    stop = int(off[-1]) if off.size else 0
    return np.ascontiguousarray(off - start, np.int32), lists.values.slice(start, stop - start)


def _json_ready(value: Any) -> Any:
    """A decoded AnyValue made JSON-serialisable: bytes as base64 and non-finite
    doubles as their names, as OTLP/JSON writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def any_to_json(raw: bytes | None) -> str:
    """OTLP ``AnyValue`` bytes (an array or kvlist attribute) as the JSON text Jaeger gets.

    >>> from knhk import _attributes
    >>> any_to_json(_attributes.encode_any([1, "a", 2.5, float("nan"), {"k": True}]))
    '[1,"a",2.5,"NaN",{"k":true}]'
    """
    if raw is None:
        return ""
    value = _attributes.decode_any(raw)
    return json.dumps(_json_ready(value), ensure_ascii=False, separators=(",", ":"))


def _json_parts(types: np.ndarray, anys: pa.Array, prep: _Prep) -> tuple:
    """Per-attribute JSON text of arrays and kvlists (rendered once per distinct value)."""
    nested = (types == AttrType.ARRAY) | (types == AttrType.KVLIST)
    if not nested.any():
        return np.full(types.size, -1, np.int32), _NO_STR[1], _NO_STR[2]
    pos = np.flatnonzero(nested)
    enc = anys.take(pa.array(pos)).dictionary_encode()
    texts = pa.array([any_to_json(v) for v in enc.dictionary.to_pylist()], pa.string())
    idx = np.full(types.size, -1, np.int32)
    idx[pos] = pc.fill_null(enc.indices, -1).to_numpy()
    _, off, data = _str_parts(texts, prep)
    return idx, off, data


def _attr_parts(lists: pa.ListArray, prep: _Prep) -> dict:
    list_off, vals = _used_values(lists)
    if len(vals) == 0:
        return {"list_off": list_off, "key": _NO_STR, "type": np.zeros(0, np.int8),
                "str": _NO_STR, "int": np.zeros(0, np.int64),
                "double": np.zeros(0, np.float64), "bool": np.zeros(0, np.uint8),
                "bytes": _NO_STR, "json": _NO_STR}
    types = _num(vals.field("type"), np.int8)
    return {
        "list_off": list_off,
        "key": _str_parts(vals.field("key"), prep),
        "type": types,
        "str": _str_parts(vals.field("str"), prep),
        "int": _num(vals.field("int"), np.int64),
        "double": _num(vals.field("double"), np.float64),
        "bool": _num(vals.field("bool"), np.uint8),
        "bytes": _str_parts(vals.field("bytes"), prep, text=False),
        "json": _json_parts(types, vals.field("any"), prep),
    }


def _columns(rb: pa.RecordBatch, prep: _Prep) -> dict:
    col = rb.column
    n = rb.num_rows
    event_off, ev = _used_values(col("events"))
    link_off, ln = _used_values(col("links"))
    parent = col("parent_span_id")
    return {
        "n": n,
        "trace_id": _fixed(col("trace_id"), 16),
        "span_id": _fixed(col("span_id"), 8),
        "parent_span_id": _fixed(parent, 8) if parent.null_count < n else
        np.zeros(8 * n, np.uint8),
        "parent_valid": parent.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8),
        "name": _str_parts(col("name"), prep),
        "service": _str_parts(col("service"), prep),
        "status_message": _str_parts(col("status_message"), prep),
        "trace_state": _str_parts(col("trace_state"), prep),
        "scope_name": _str_parts(col("scope_name"), prep),
        "scope_version": _str_parts(col("scope_version"), prep),
        "kind": _num(col("kind"), np.int8),
        "status_code": _num(col("status_code"), np.int8),
        "start_time_ns": _num(col("start_time_ns"), np.int64),
        "end_time_ns": _num(col("end_time_ns"), np.int64),
        "dropped_attributes_count": _num(col("dropped_attributes_count"), np.uint32),
        "dropped_events_count": _num(col("dropped_events_count"), np.uint32),
        "dropped_links_count": _num(col("dropped_links_count"), np.uint32),
        "attributes": _attr_parts(col("attributes"), prep),
        "resource_attributes": _attr_parts(col("resource_attributes"), prep),
        "scope_attributes": _attr_parts(col("scope_attributes"), prep),
        "event_off": event_off,
        "ev_time": _num(ev.field("time_unix_nano"), np.int64),
        "ev_name": _str_parts(ev.field("name"), prep),
        "ev_attrs": _attr_parts(ev.field("attributes"), prep),
        "ev_dropped": _num(ev.field("dropped_attributes_count"), np.uint32),
        "link_off": link_off,
        "ln_trace_id": _fixed(ln.field("trace_id"), 16),
        "ln_span_id": _fixed(ln.field("span_id"), 8),
    }


def _record_batch(batch: Any) -> pa.RecordBatch:
    rb = batch.record_batch if isinstance(batch, SpanBatch) else batch
    if not isinstance(rb, pa.RecordBatch) or not rb.schema.equals(SPAN_SCHEMA):
        rb = SpanBatch(batch).record_batch
    return rb


def _encode(batch: Any, max_packet_size: int, seq_no: int) -> tuple[bytes, np.ndarray,
                                                                      np.ndarray, dict]:
    rb = _record_batch(batch)
    prep = _Prep()
    cols = _columns(rb, prep)
    data, offsets, spans, counters = _kernel.encode_batch(cols, max_packet_size, seq_no)
    counters["invalid_utf8_replaced"] = prep.invalid_utf8
    return data, offsets, spans, counters


def _check_packet_size(max_packet_size: int) -> int:
    if isinstance(max_packet_size, bool) or not isinstance(max_packet_size, int | np.integer):
        raise TypeError(f"max_packet_size must be an int, got {type(max_packet_size).__name__}")
    if not _MIN_PACKET <= max_packet_size <= _MAX_UDP:
        raise ValueError(f"max_packet_size must be between {_MIN_PACKET} and {_MAX_UDP} bytes "
                         f"(a UDP datagram), got {max_packet_size}.")
    return int(max_packet_size)


def encode_batch(batch: SpanBatch | pa.RecordBatch, *,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 seq_no: int = 0) -> list[bytes]:
    """Encode a span batch as the UDP datagrams a Jaeger agent receives.

    Parameters
    ----------
    batch : SpanBatch or pyarrow.RecordBatch
        Spans in :data:`knhk.SPAN_SCHEMA`.
    max_packet_size : int
        No datagram is longer (512 to 65,507 bytes).
    seq_no : int
        ``Batch.seqNo`` of the first datagram; the next ones count up.

    Returns
    -------
    list of bytes
        Each a Thrift compact oneway ``Agent.emitBatch`` message. Spans are
        grouped by process (service name + resource attributes), then by trace;
        a datagram holds whole traces while they fit. A span too large for a
        datagram on its own has its longest string and binary values cut; one
        that cannot fit even so is left out (:class:`JaegerExporter` counts both).

    Examples
    --------
    >>> encode_batch(SpanBatch.empty())
    []
    """
    max_packet_size = _check_packet_size(max_packet_size)
    data, offsets, _, _ = _encode(batch, max_packet_size, int(seq_no))
    return [data[offsets[k]:offsets[k + 1]] for k in range(offsets.size - 1)]


# -- the exporter -------------------------------------------------------------------------


class JaegerExporter(Exporter):
    """Send span batches to a Jaeger agent over UDP (Thrift compact, ``Agent.emitBatch``).

    Parameters
    ----------
    host, port : str, int
        The agent's compact-Thrift UDP endpoint (Jaeger's default 6831).
    max_packet_size : int
        Largest datagram sent (the agent's default limit is 65,000 bytes).
    queue_size : int
        Batches the pipeline may hold for this exporter.

    Notes
    -----
    Every span gets Jaeger's ``flags = 1`` (sampled: it was exported); W3C
    trace-flag bits other than "sampled" mean something else in Jaeger.

    Sends never block: the socket is non-blocking, and a datagram the kernel
    will not take at once (``EAGAIN``) or refuses (``ECONNREFUSED`` when no
    agent listens, reported by ICMP on a later send) is counted in
    :meth:`stats` by its error name, not raised. ``export`` returns FAILURE
    when any datagram of the batch was not sent. Metric batches are not
    Jaeger's and are ignored (counted). Jaeger v2 ingests OTLP natively; for it
    :class:`~knhk.exporters.otlp.OtlpExporter` is the better choice.

    Examples
    --------
    >>> import knhk
    >>> exporter = JaegerExporter("127.0.0.1", 6831)
    >>> exporter.export(knhk.SpanBatch.empty())
    <ExportResult.SUCCESS: 0>
    >>> exporter.stats()["datagrams_sent"]
    0
    >>> exporter.shutdown()
    """

    name = "jaeger"

    def __init__(self, host: str = "localhost", port: int = 6831, *,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, queue_size: int = 64) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}.")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an int between 1 and 65535, got {port!r}.")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}.")
        self.host = host
        self.port = port
        self.max_packet_size = _check_packet_size(max_packet_size)
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        self._seq = 0
        self._failed_exports = 0
        self._counts: Counter[str] = Counter()
        self._send_errors: Counter[str] = Counter()

    # -- socket ------------------------------------------------------------------

    def _socket(self) -> socket.socket | None:
        """The connected, non-blocking socket; None (counted) if the host does not resolve."""
        if self._sock is not None:
            return self._sock
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            self._send_errors["resolve"] += 1
            logger.warning("Jaeger exporter: cannot resolve %s: %s", self.host, exc)
            return None
        # IPv4 first: agents commonly listen on 0.0.0.0, and "localhost" may resolve to ::1
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            # connected, so the kernel reports an agent that is not there (ECONNREFUSED)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            self._send_errors[errno.errorcode.get(exc.errno or 0, "OSError")] += 1
            logger.warning("Jaeger exporter: cannot reach %s:%d: %s", self.host, self.port, exc)
            return None
        self._sock = sock
        return sock

    # -- export ------------------------------------------------------------------

    def export(self, batch: Any) -> ExportResult:
        """Encode ``batch`` and send its datagrams; FAILURE (counted) if any was not sent."""
        if isinstance(batch, MetricBatch):
            with self._lock:
                self._counts["metric_batches_ignored"] += 1
            return ExportResult.SUCCESS
        if not isinstance(batch, SpanBatch | pa.RecordBatch):
            with self._lock:
                self._send_errors["unsupported_batch"] += 1
            logger.warning("Jaeger exporter: cannot export a %s; expected a SpanBatch",
                           type(batch).__name__)
            return ExportResult.FAILURE
        n = batch.num_rows
        if n == 0:
            return ExportResult.SUCCESS
        with self._lock:
            if self._closed:
                self._counts["spans_failed"] += n
                self._send_errors["shutdown"] += 1
                return ExportResult.FAILURE
            seq = self._seq
            data, offsets, spans, counters = _encode(batch, self.max_packet_size, seq)
            ndg = offsets.size - 1
            self._seq += ndg
            for key, value in counters.items():
                self._counts[key] += value
            sock = self._socket()
            view = memoryview(data)
            sent = failed = spans_failed = sent_bytes = 0
            for k in range(ndg):
                chunk = view[offsets[k]:offsets[k + 1]]
                if sock is None:
                    failed += 1
                    spans_failed += int(spans[k])
                    continue
                try:
                    sock.send(chunk)
                    sent += 1
                    sent_bytes += len(chunk)
                except OSError as exc:
                    # never raised: an agent that is down or slow costs counted datagrams
                    name = ("EAGAIN" if isinstance(exc, BlockingIOError)
                            else errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                    self._send_errors[name] += 1
                    failed += 1
                    spans_failed += int(spans[k])
            self._counts["batches"] += 1
            self._counts["datagrams_sent"] += sent
            self._counts["datagrams_failed"] += failed
            self._counts["bytes_sent"] += sent_bytes
            self._counts["spans_sent"] += int(spans.sum()) - spans_failed
            self._counts["spans_failed"] += spans_failed
        if counters["spans_truncated"] or counters["spans_dropped_too_large"]:
            logger.debug("Jaeger exporter: %d span(s) truncated, %d too large to send",
                         counters["spans_truncated"], counters["spans_dropped_too_large"])
        if failed:
            # an agent that is down fails every batch: warn at the 1st, 10th, 100th, ... time
            level = logging.WARNING if math.log10(self._failed_exports + 1).is_integer() \
                else logging.DEBUG
            self._failed_exports += 1
            logger.log(level, "Jaeger exporter: %d of %d datagram(s) to %s:%d not sent (%d "
                       "batch(es) so far); counts in stats()", failed, ndg, self.host,
                       self.port, self._failed_exports)
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def stats(self) -> dict[str, Any]:
        """Counters since construction.

        ``batches``, ``datagrams_sent`` / ``datagrams_failed``, ``bytes_sent``,
        ``spans_sent`` / ``spans_failed``; ``spans_truncated`` and
        ``values_truncated`` (spans sent with their longest values cut to fit a
        datagram), ``spans_dropped_too_large`` (could not fit even so),
        ``processes_truncated``, ``invalid_utf8_replaced`` (text values with
        invalid UTF-8, sent with U+FFFD), ``metric_batches_ignored``; and
        ``send_errors``: failed sends by error name (``ECONNREFUSED``,
        ``EAGAIN``, ...).
        """
        keys = ("batches", "datagrams_sent", "datagrams_failed", "bytes_sent", "spans_sent",
                "spans_failed", "spans_truncated", "values_truncated",
                "spans_dropped_too_large", "processes_truncated", "invalid_utf8_replaced",
                "metric_batches_ignored")
        with self._lock:
            out: dict[str, Any] = {k: int(self._counts[k]) for k in keys}
            out["send_errors"] = dict(self._send_errors)
        return out

    def shutdown(self, timeout: float | None = None) -> None:
        """Close the socket; later exports fail (counted). UDP has nothing to flush."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
