"""Consistent routing keys for :mod:`knhk.exporters.loadbalancing`: rendezvous hashing
over Arrow columns, vectorized in NumPy.

A row goes to the endpoint whose ``mix64(key ^ seed(endpoint))`` is largest;
``key`` is a 64-bit digest of the trace id (or of a service / metric name,
through BLAKE2b), ``seed`` a BLAKE2b digest of the endpoint string. Nothing is
salted, so every process routes a key alike.

Example
-------
>>> import numpy as np
>>> seeds = endpoint_seeds(["a:4317", "b:4317"])
>>> keys = np.arange(1000, dtype=np.uint64)
>>> first = rendezvous_assign(keys, seeds)
>>> bool(((first == 0) | (first == 1)).all()), bool((rendezvous_assign(keys, seeds) == first).all())
(True, True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from knhk.batch import MetricBatch, SpanBatch

__all__ = ["METRIC_ROUTING_KEYS", "SPAN_ROUTING_KEYS", "endpoint_seeds", "rendezvous_assign",
           "routing_keys", "string_keys", "trace_id_keys"]

SPAN_ROUTING_KEYS = ("traceID", "service")
METRIC_ROUTING_KEYS = ("service", "metric")

_U64 = np.uint64
_C1 = _U64(0xBF58476D1CE4E5B9)
_C2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014), over a uint64 array.

    A bijection of 64-bit words with full avalanche; arrays (not NumPy
    scalars) so the wrap-around multiplication raises no overflow warning.
    """
    x = x ^ (x >> _S30)
    x = x * _C1
    x = x ^ (x >> _S27)
    x = x * _C2
    return x ^ (x >> _S31)


def _digest64(data: bytes) -> int:
    # BLAKE2b, not hash(): Python salts str hashes per process
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def endpoint_seeds(endpoints: Sequence[str]) -> np.ndarray:
    """The rendezvous seed of each endpoint: BLAKE2b-64 of its UTF-8 bytes.

    Parameters
    ----------
    endpoints : sequence of str

    Returns
    -------
    numpy.ndarray
        ``uint64``, one per endpoint, the same in every process.

    Examples
    --------
    >>> endpoint_seeds(["a:4317"]) == endpoint_seeds(["a:4317"])
    array([ True])
    """
    return np.array([_digest64(e.encode("utf-8")) for e in endpoints], dtype=np.uint64)


def trace_id_keys(trace_ids: pa.Array) -> np.ndarray:
    """A 64-bit routing key per trace id: ``mix64(high ^ mix64(low))``.

    ``high`` and ``low`` are the trace id's two 8-byte halves read
    big-endian (as the id is written in hex), so every bit of the id counts.

    Parameters
    ----------
    trace_ids : pyarrow.FixedSizeBinaryArray
        ``fixed_size_binary(16)``, as ``SPAN_SCHEMA.trace_id``.

    Returns
    -------
    numpy.ndarray
        ``uint64``, one per row.

    Examples
    --------
    >>> import pyarrow as pa
    >>> ids = pa.array([bytes(15) + b"\\x01"] * 2, pa.binary(16))
    >>> keys = trace_id_keys(ids)
    >>> bool(keys[0] == keys[1]), keys.dtype
    (True, dtype('uint64'))
    """
    if isinstance(trace_ids, pa.ChunkedArray):
        trace_ids = trace_ids.combine_chunks()
    if not pa.types.is_fixed_size_binary(trace_ids.type) or trace_ids.type.byte_width != 16:
        raise TypeError(f"trace ids must be fixed_size_binary(16), got {trace_ids.type}")
    n = len(trace_ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = np.frombuffer(trace_ids.buffers()[1], dtype=np.uint8,
                        count=(trace_ids.offset + n) * 16)[trace_ids.offset * 16:]
    words = raw.reshape(n, 16).view(">u8").astype(np.uint64)
    return _mix64(words[:, 0] ^ _mix64(words[:, 1]))


def string_keys(values: pa.Array) -> np.ndarray:
    """A 64-bit routing key per string (service name, metric name): BLAKE2b-64 of it.

    Each distinct value is hashed once (a dictionary column's dictionary),
    then gathered to the rows; null hashes as the empty string.

    Parameters
    ----------
    values : pyarrow.Array
        ``dictionary<int32, utf8>`` or ``utf8``.

    Returns
    -------
    numpy.ndarray
        ``uint64``, one per row.

    Examples
    --------
    >>> import pyarrow as pa
    >>> a = string_keys(pa.array(["cart", "auth", "cart"]).dictionary_encode())
    >>> bool(a[0] == a[2]), bool(a[0] == a[1])
    (True, False)
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_dictionary(values.type):
        values = values.dictionary_encode()
    words = np.array([_digest64((v or "").encode("utf-8"))
                      for v in values.dictionary.to_pylist()], dtype=np.uint64)
    empty = _digest64(b"")
    if len(words) == 0:
        return np.full(len(values), empty, dtype=np.uint64)
    idx = values.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.intp)
    out = words[idx]
    if values.null_count:
        out[np.asarray(values.is_null())] = empty
    return out


def rendezvous_assign(keys: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The index of the winning endpoint for each key: argmax of ``mix64(key ^ seed)``.

    One vectorized pass per endpoint; ties (probability about 2^-64 per
    pair) go to the lower index.

    Parameters
    ----------
    keys : numpy.ndarray
        ``uint64`` routing keys (:func:`trace_id_keys`, :func:`string_keys`).
    seeds : numpy.ndarray
        ``uint64`` endpoint seeds (:func:`endpoint_seeds`), at least one.

    Returns
    -------
    numpy.ndarray
        ``intp`` indices into ``seeds``, one per key.

    Examples
    --------
    >>> keys = np.arange(6, dtype=np.uint64)
    >>> seeds = endpoint_seeds(["a:1", "b:1", "c:1"])
    >>> before = rendezvous_assign(keys, seeds)
    >>> after = rendezvous_assign(keys, seeds[[0, 2]])   # "b:1" leaves
    >>> bool(np.all(np.array([0, 2])[after][before != 1] == before[before != 1]))
    True
    """
    keys = np.asarray(keys, dtype=np.uint64)
    seeds = np.asarray(seeds, dtype=np.uint64)
    if seeds.ndim != 1 or len(seeds) == 0:
        raise ValueError("rendezvous_assign needs at least one endpoint seed.")
    best = _mix64(keys ^ seeds[0])
    winner = np.zeros(len(keys), dtype=np.intp)
    for j in range(1, len(seeds)):
        score = _mix64(keys ^ seeds[j])
        better = score > best
        best = np.where(better, score, best)
        winner[better] = j
    return winner


def routing_keys(batch: SpanBatch | MetricBatch, key: str) -> np.ndarray:
    """The ``uint64`` routing key of every row of ``batch`` under routing key ``key``.

    ``traceID`` (spans), ``service`` (spans and metric points: resource
    ``service.name``) or ``metric`` (metric points: the metric name).

    Examples
    --------
    >>> import knhk
    >>> b = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=7, span_id=1),
    ...                                knhk.Span("b", trace_id=7, span_id=2)])
    >>> k = routing_keys(b, "traceID")
    >>> bool(k[0] == k[1])
    True
    """
    rb = batch.record_batch
    if key == "traceID":
        return trace_id_keys(rb.column("trace_id"))
    if key == "service":
        return string_keys(rb.column("service"))
    if key == "metric":
        return string_keys(rb.column("name"))
    raise ValueError(f"unknown routing key {key!r}; expected traceID, service or metric")
