"""What head and tail sampling share: ratio bounds and sampling probabilities in trace_state.

:mod:`knhk.sampling` (head samplers) and :mod:`knhk.tail_sampling` both keep
traces by a bound on their trace id and record the probability a kept span
was kept with in its ``trace_state`` (``ot=th:`` for the consistent rule,
``knhk=p:`` for the traceidratio rule; :mod:`knhk.sampling` explains why).
The pieces both need live here, so that neither reaches into the other's
private helpers. The public ones (:func:`probability_to_threshold`,
:func:`threshold_to_probability`, :func:`encode_threshold`,
:func:`parse_threshold`) are re-exported by :mod:`knhk.sampling`.

>>> ratio_bound(0.5, "traceidratio")
(9223372036854775808, False, 0.5)
>>> with_probability("vendor=x", 0.25, "consistent")
'ot=th:c,vendor=x'
>>> probability_in("ot=th:c")
0.25
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from knhk.batch import SpanBatch

__all__ = [
    "RULES",
    "TWO56",
    "TWO64",
    "annotate",
    "as_batch",
    "bound",
    "check_rule",
    "encode_threshold",
    "parse_knhk_probability",
    "parse_threshold",
    "probability_in",
    "probability_to_threshold",
    "ratio_bound",
    "split_trace_state",
    "threshold_to_probability",
    "trace_id_matrix",
    "with_probability",
]

TWO64 = 1 << 64
TWO56 = 1 << 56
RULES = {"traceidratio": 0, "consistent": 1}
_TH_RE = re.compile(r"[0-9a-f]{1,14}")  # the spec's th: 1-14 lowercase hex digits
_P_RE = re.compile(r"[0-9][0-9.e-]{0,31}")  # knhk=p: a decimal as Python's repr writes it


def check_rule(rule: Any, what: str) -> str:
    """``rule`` if it is ``"traceidratio"`` or ``"consistent"``; else ValueError naming ``what``."""
    if rule not in RULES:
        raise ValueError(
            f"{what} must be 'traceidratio' or 'consistent', got {rule!r}.")
    return rule


def bound(rate: float) -> int:
    """The traceidratio bound of ``rate``: keep a trace when its low 64 bits are below it."""
    # OpenTelemetry's TraceIdRatioBased: round(rate * 2**64), compared with `<`.
    return round(rate * TWO64)


def ratio_bound(rate: float, rule: str) -> tuple[int, bool, float]:
    """``(bound, keep_all, exact probability)`` of ``key < bound`` for ``rate``."""
    if rule == "consistent":
        # Keep R >= th with th = 2**56 - round(rate * 2**56): key = 2**56-1-R < bound.
        b = round(rate * TWO56)
        return b, False, b / TWO56
    b = bound(rate)
    if b >= TWO64:
        return TWO64 - 1, True, 1.0
    return b, False, b / TWO64


def probability_to_threshold(probability: float) -> int:
    """The 56-bit rejection threshold of the OpenTelemetry probability-sampling spec.

    ``th = round((1 - p) * 2**56)``, clamped so that a kept span (p > 0) keeps a
    probability of at least 2**-56.

    >>> hex(probability_to_threshold(0.01))
    '0xfd70a3d70a3d71'
    >>> probability_to_threshold(1.0)
    0
    """
    p = float(probability)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"A sampling probability must be in (0, 1], got {probability!r}.")
    return min(TWO56 - round(p * TWO56), TWO56 - 1)


def threshold_to_probability(threshold: int) -> float:
    """``(2**56 - th) / 2**56``: the probability a threshold stands for."""
    return (TWO56 - threshold) / TWO56


def encode_threshold(threshold: int) -> str:
    """The ``th`` value: 14 hex digits with trailing zeros removed (``"0"`` for 0).

    >>> encode_threshold(0xfd70a400000000), encode_threshold(0)
    ('fd70a4', '0')
    """
    if not 0 <= threshold < TWO56:
        raise ValueError(f"A threshold must be in [0, 2**56), got {threshold!r}.")
    return format(threshold, "014x").rstrip("0") or "0"


def parse_threshold(value: str) -> int | None:
    """The threshold of a ``th`` value, or None if it is not 1-14 lowercase hex digits."""
    if not _TH_RE.fullmatch(value):
        return None
    return int(value.ljust(14, "0"), 16)


def split_trace_state(ts: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]],
                                                 list[str]]:
    """The ``ot`` and ``knhk`` members' sub-keys and the other members of a tracestate."""
    subs: dict[str, list[tuple[str, str]]] = {"ot": [], "knhk": []}
    seen: set[str] = set()
    others: list[str] = []
    for member in (ts or "").split(","):
        member = member.strip()
        if not member:
            continue
        key, _, value = member.partition("=")
        key = key.strip()
        if key in subs and key not in seen:
            seen.add(key)
            for sub in value.split(";"):
                k, sep, v = sub.partition(":")
                if sep and k:
                    subs[key].append((k.strip(), v.strip()))
        else:
            others.append(member)
    return subs["ot"], subs["knhk"], others


def parse_knhk_probability(value: str) -> float | None:
    """The probability of a ``knhk=p:`` value, or None if it is not a number in (0, 1]."""
    if not _P_RE.fullmatch(value):
        return None
    try:
        p = float(value)
    except ValueError:
        return None
    return p if 0.0 < p <= 1.0 else None


def probability_in(ts: str | None) -> float | None:
    """The keep probability a tracestate records (None: unknown)."""
    if not ts or ("ot=" not in ts and "knhk=" not in ts):
        return None
    ot, kn, _ = split_trace_state(ts)
    th = next((parse_threshold(v) for k, v in ot if k == "th"), None)
    p = next((parse_knhk_probability(v) for k, v in kn if k == "p"), None)
    if th is not None and p is not None:
        return None  # both kinds at once: knhk never writes that, so it is ambiguous
    if th is not None:
        return threshold_to_probability(th)
    return p


def with_probability(ts: str | None, p: float, rule: str) -> str | None:
    """``ts`` after a stage that kept the span with probability ``p`` (NaN: unknown).

    Only a decision on the spec's randomness ``R`` (the consistent rule) writes
    ``ot=th``; a traceidratio decision (low 64 bits below a bound) writes
    ``knhk=p:<probability>`` instead. p >= 1 leaves the state alone (an
    upstream probability still holds). Unknown p erases both, as the spec
    requires for unknown probabilities. Otherwise the stage combines exactly
    with an upstream probability of its own kind: consistent takes the larger
    threshold (the spec's equalizing stage); traceidratio takes the smaller
    probability, since both stages keep ``low64 < bound`` and the stricter
    one's kept set is a subset of the other's. An upstream probability of the
    other kind is not one value of either kind when combined, so both are
    erased (probability unknown).
    """
    if p >= 1.0:
        return ts
    ot, kn, others = split_trace_state(ts)
    th_in = next((parse_threshold(v) for k, v in ot if k == "th"), None)
    p_in = next((parse_knhk_probability(v) for k, v in kn if k == "p"), None)
    ot = [(k, v) for k, v in ot if k != "th"]
    kn = [(k, v) for k, v in kn if k != "p"]
    if p > 0.0:  # NaN fails this test: unknown probability, nothing written
        if rule == "consistent" and p_in is None:
            ours = probability_to_threshold(p)
            th = ours if th_in is None else max(th_in, ours)
            ot.insert(0, ("th", encode_threshold(th)))
        elif rule != "consistent" and th_in is None:
            q = p if p_in is None else min(p_in, p)
            kn.insert(0, ("p", repr(float(q))))
    members = [f"{name}={';'.join(f'{k}:{v}' for k, v in subs)}"
               for name, subs in (("ot", ot), ("knhk", kn)) if subs]
    return ",".join(members + others) or None


def annotate(rb: pa.RecordBatch, codes: np.ndarray | None, probs: Sequence[float],
              rule: str) -> pa.RecordBatch:
    """``rb`` with ``trace_state`` updated for rows kept with ``probs[codes[row]]``."""
    probs = np.asarray(probs, dtype=np.float64)
    if rb.num_rows == 0 or not (~(probs >= 1.0)).any():
        return rb
    n = rb.num_rows
    if codes is None:
        codes = np.zeros(n, dtype=np.intp)
    i = rb.schema.get_field_index("trace_state")
    col = rb.column(i)
    values = col.dictionary.to_pylist()
    nd = len(values) + 1
    idx = col.indices.to_numpy(zero_copy_only=False)
    if col.null_count:
        idx = np.where(col.is_valid().to_numpy(zero_copy_only=False), idx, nd - 1)
    key = idx.astype(np.int64) * len(probs) + codes
    k_total = nd * len(probs)
    if k_total <= max(4 * n, 1 << 12):
        used = np.flatnonzero(np.bincount(key, minlength=k_total))
        inverse = None
    else:
        used, inverse = np.unique(key, return_inverse=True)
    new_dict: dict[str, int] = {}
    mapped = np.empty(used.size, dtype=np.int32)
    for j, u in enumerate(used.tolist()):
        t, c = divmod(u, len(probs))
        out = with_probability(values[t] if t < nd - 1 else None, float(probs[c]), rule)
        mapped[j] = -1 if out is None else new_dict.setdefault(out, len(new_dict))
    if inverse is None:
        table = np.full(k_total, -1, dtype=np.int32)
        table[used] = mapped
        new_idx = table[key]
    else:
        new_idx = mapped[inverse.reshape(-1)]
    arr = pa.DictionaryArray.from_arrays(
        pa.array(new_idx, type=pa.int32(), mask=new_idx < 0),
        pa.array(list(new_dict), type=pa.string()))
    cols = list(rb.columns)
    cols[i] = arr
    return pa.RecordBatch.from_arrays(cols, schema=rb.schema)


def trace_id_matrix(col: pa.Array) -> np.ndarray:
    """The (n, 16) uint8 view of a fixed_size_binary(16) column, without copying."""
    n = len(col)
    if n == 0:
        return np.zeros((0, 16), dtype=np.uint8)
    raw = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=(col.offset + n) * 16)
    return raw[col.offset * 16:].reshape(n, 16)


def as_batch(batch: Any) -> SpanBatch:
    """``batch`` as a SpanBatch (an Arrow record batch or table is checked and wrapped)."""
    if isinstance(batch, SpanBatch):
        return batch
    return SpanBatch(batch)
