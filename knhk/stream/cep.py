"""Complex event processing: rules over the span stream that raise alerts.

A :class:`CepRule` joins a :class:`CepPattern` and a :class:`CepAction`.
Patterns are evaluated on whole batches (NumPy; no Python loop per span) and
keep state across batch boundaries, bounded by ``max_state`` entries with
evictions counted (``cep_state_evictions`` in the processor's counters); the
group-by values a rule has seen are forgotten once no state refers to them
(``cep_keys_forgotten``), so memory follows the live keys:

- ``CepPattern.count_threshold(matcher, threshold, within, by=None)``: at least
  ``threshold`` matching spans within ``within`` seconds (per key);
- ``CepPattern.sequence([m1, m2, ...], within, by="trace_id")``: spans matching
  ``m1``, then ``m2``, ... in event-time order, all within ``within`` seconds on
  the same key (trace, service or attribute);
- ``CepPattern.absence(a, b, within)``: ``a`` not followed by ``b`` in time;
- ``CepPattern.correlation(a, b, within)``: ``a`` and ``b`` close in time, on any keys;
- ``CepPattern.regex("AB*C", {"A": m1, "B": m2, "C": m3}, within)``: a regular
  expression over each key's symbols, compiled to a state machine and stepped
  for all keys of a batch at once.

A :class:`Matcher` tests name, service, kind, status, duration bounds and
attributes (equality, ranges, regular expressions), once per distinct value.

Example
-------
>>> import knhk
>>> from knhk.stream import StreamProcessor
>>> from knhk.stream.cep import CepAction, CepPattern, CepRule, Matcher
>>> rule = CepRule("error-burst", CepPattern.count_threshold(Matcher(status="error"), 3, within=10),
...                CepAction.alert("critical", "{count} errors on {key}"), )
>>> processor = StreamProcessor()
>>> processor.add_cep_rule(rule)
>>> spans = [knhk.Span("pay", trace_id=1, span_id=i, start_time_ns=i * 10**9, status=2)
...          for i in range(1, 4)]
>>> processor.process_batch(knhk.SpanBatch.from_spans(spans))
>>> [a.message for a in processor.alerts]
['3 errors on ()']
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from knhk._regex import DEFAULT_MAX_INPUT, LinearPattern, compile_pattern
from knhk.batch import SpanBatch, trace_id_low64
from knhk.schema import Span
from knhk.stream.alerts import Alert, check_severity
from knhk.stream.keys import KeyEncoder
from knhk.stream.regex_nfa import RegexNfa

__all__ = ["CepAction", "CepPattern", "CepRule", "Matcher"]

logger = logging.getLogger(__name__)

_S = 1_000_000_000
_STATUS = {"unset": 0, "ok": 1, "error": 2}
_KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
_MAX_REGEX_INPUT = DEFAULT_MAX_INPUT


def _seconds_ns(value: float, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return round(float(value) * _S)


class Matcher:
    """A predicate over spans, evaluated on a whole batch at once.

    Parameters
    ----------
    name, service : str, optional
        Exact span name / service.
    name_regex : str or re.Pattern, optional
        Regular expression searched in the span name (RE2 syntax, see below).
    kind : int or str, optional
        OTel SpanKind (``"server"``, 2, ...).
    status : int or str, optional
        ``"unset"``, ``"ok"``, ``"error"`` or 0, 1, 2.
    min_duration_ms, max_duration_ms : float, optional
        Inclusive duration bounds.
    attributes : mapping, optional
        ``{key: value}`` for equality, ``{key: (lo, hi)}`` for an inclusive
        numeric range, ``{key: re.compile(...)}`` for a regex searched in the string value.

    Regular expressions come from users and run over span data that senders
    control, so they run with RE2 (:mod:`knhk._regex`): time linear in the
    input, whatever the pattern, and RE2's syntax (as Go's ``regexp``: no
    backreferences or lookaround; ``$`` is the very end of the text; ``\\d``,
    ``\\w``, ``\\s``, ``\\b`` are ASCII). A compiled ``re.Pattern`` is converted,
    its IGNORECASE / MULTILINE / DOTALL flags kept. A pattern RE2 cannot run
    raises ``ValueError`` here, naming it. Each runs once per distinct value of a
    batch, on at most the first 4096 characters.
    Matchers combine with ``&``, ``|`` and ``~``.

    Examples
    --------
    >>> import re
    >>> b = SpanBatch.from_spans([Span("a" * 4000 + "!", trace_id=1, span_id=1),
    ...                           Span("GET /", trace_id=1, span_id=2, attributes={"u": "Bob"})])
    >>> Matcher(name_regex=r"(a+)+$").mask(b).tolist()      # no catastrophic backtracking
    [False, False]
    >>> Matcher(attributes={"u": re.compile("^bob$", re.IGNORECASE)}).mask(b).tolist()
    [False, True]
    """

    def __init__(self, *, name: str | None = None, service: str | None = None,
                 name_regex: str | None = None, kind: int | str | None = None,
                 status: int | str | None = None, min_duration_ms: float | None = None,
                 max_duration_ms: float | None = None,
                 attributes: Mapping[str, Any] | None = None) -> None:
        self._tests: list[Callable[[SpanBatch], np.ndarray]] = []
        if name is not None:
            self._tests.append(_dict_test("name", lambda v, x=name: v == x))
        if service is not None:
            self._tests.append(_dict_test("service", lambda v, x=service: v == x))
        if name_regex is not None:
            rx = _compile(name_regex, "Matcher name_regex")
            self._tests.append(_dict_test("name", rx.search))
        if kind is not None:
            k = _enum(kind, _KINDS, "kind")
            self._tests.append(lambda b: b.column("kind").to_numpy() == k)
        if status is not None:
            s = _enum(status, _STATUS, "status")
            self._tests.append(lambda b: b.column("status_code").to_numpy() == s)
        if min_duration_ms is not None:
            lo = round(float(min_duration_ms) * 1e6)
            self._tests.append(lambda b: b.duration_ns() >= lo)
        if max_duration_ms is not None:
            hi = round(float(max_duration_ms) * 1e6)
            self._tests.append(lambda b: b.duration_ns() <= hi)
        for key, want in (attributes or {}).items():
            self._tests.append(_attr_test(key, want))

    @classmethod
    def _of(cls, fn: Callable[[SpanBatch], np.ndarray]) -> Matcher:
        m = cls()
        m._tests = [fn]
        return m

    def mask(self, batch: SpanBatch) -> np.ndarray:
        """Bool array: which rows of ``batch`` match."""
        out = np.ones(batch.num_rows, bool)
        for test in self._tests:
            out &= test(batch)
        return out

    def __and__(self, other: Matcher) -> Matcher:
        return Matcher._of(lambda b: self.mask(b) & other.mask(b))

    def __or__(self, other: Matcher) -> Matcher:
        return Matcher._of(lambda b: self.mask(b) | other.mask(b))

    def __invert__(self) -> Matcher:
        return Matcher._of(lambda b: ~self.mask(b))


def _compile(pattern: str | re.Pattern | LinearPattern, what: str) -> LinearPattern:
    return compile_pattern(pattern, what, max_input=_MAX_REGEX_INPUT)


def _enum(value: int | str, names: dict[str, int], what: str) -> int:
    if isinstance(value, str):
        if value.lower() not in names:
            raise ValueError(f"{what} must be one of {list(names)}, got {value!r}")
        return names[value.lower()]
    if int(value) not in names.values():
        raise ValueError(f"{what} must be one of {sorted(names.values())}, got {value!r}")
    return int(value)


def _dict_test(column: str, pred: Callable[[Any], bool]) -> Callable[[SpanBatch], np.ndarray]:
    def test(batch: SpanBatch) -> np.ndarray:
        col = batch.column(column)
        ok = np.array([bool(pred(v)) for v in col.dictionary.to_pylist()] + [False], bool)
        idx = col.indices
        if idx.null_count:
            idx = idx.fill_null(len(col.dictionary))
        return ok[idx.to_numpy()]
    return test


def _attr_test(key: str, want: Any) -> Callable[[SpanBatch], np.ndarray]:
    if isinstance(want, re.Pattern | LinearPattern):
        pred = _compile(want, f"Matcher attributes[{key!r}]").search
    elif isinstance(want, tuple):
        if len(want) != 2:
            raise ValueError(f"attribute {key!r}: a range is (lo, hi), got {want!r}")
        lo, hi = want

        def pred(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
    else:
        def pred(v: Any) -> bool:
            return v == want and type(v) is type(want)

    def test(batch: SpanBatch) -> np.ndarray:
        arr = batch.attribute(key)
        if not pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_encode()
        ok = np.array([pred(v) for v in arr.dictionary.to_pylist()] + [False], bool)
        idx = arr.indices
        if idx.null_count:
            idx = idx.fill_null(len(arr.dictionary))
        return ok[idx.to_numpy()]
    return test


@dataclass(frozen=True)
class CepPattern:
    """What a rule looks for; build with :meth:`count_threshold` or :meth:`sequence`."""

    kind: str
    matchers: tuple[Matcher, ...]
    within_ns: int
    threshold: int = 1
    by: str | None = None

    @classmethod
    def count_threshold(cls, matcher: Matcher, threshold: int, within: float, *,
                        by: str | None = None) -> CepPattern:
        """At least ``threshold`` spans matching ``matcher`` within ``within`` seconds.

        ``by`` (a group-by key such as ``"service"``) counts per key.
        """
        _check_matcher(matcher)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
        _check_by(by)
        return cls("count_threshold", (matcher,), _seconds_ns(within, "within"), threshold, by)

    @classmethod
    def sequence(cls, matchers: Sequence[Matcher], within: float, *,
                 by: str | None = "trace_id") -> CepPattern:
        """Spans matching ``matchers[0]``, ``matchers[1]``, ... in order within ``within`` s.

        ``by`` is ``"trace_id"`` (default), a group-by key, or None (the whole stream).
        """
        matchers = tuple(matchers)
        if len(matchers) < 2:
            raise ValueError(f"a sequence needs at least 2 matchers, got {len(matchers)}")
        for m in matchers:
            _check_matcher(m)
        _check_by(by)
        return cls("sequence", matchers, _seconds_ns(within, "within"), len(matchers), by)


    @classmethod
    def absence(cls, a: Matcher, b: Matcher, within: float, *,
                by: str | None = "trace_id") -> CepPattern:
        """A span matching ``a`` not followed by one matching ``b`` within ``within`` s.

        Fires once the rule's event time (the largest start time it has seen)
        passes ``t_a + within`` with no ``b`` on the same key in ``[t_a, t_a + within]``.
        """
        _check_matcher(a)
        _check_matcher(b)
        _check_by(by)
        return cls("absence", (a, b), _seconds_ns(within, "within"), 2, by)


    @classmethod
    def correlation(cls, a: Matcher, b: Matcher, within: float, *,
                    by: str | None = "service") -> CepPattern:
        """Spans matching ``a`` and ``b`` (in either order) within ``within`` s of each other.

        Keys may differ: the alert's key is ``(key of the a span, key of the b span)``,
        e.g. errors in ``checkout`` and timeouts in ``payments`` at the same time.
        """
        _check_matcher(a)
        _check_matcher(b)
        _check_by(by)
        return cls("correlation", (a, b), _seconds_ns(within, "within"), 2, by)

    @classmethod
    def regex(cls, pattern: str, symbols: Mapping[str, Matcher], within: float, *,
              by: str | None = "trace_id", max_history: int = 64) -> CepPattern:
        """A regular expression over each key's sequence of symbols.

        Every span gets the first symbol (a single character) whose matcher it
        matches, or none; the rule fires when ``pattern`` matches a run of the
        key's symbols ending at the newest one, all within ``within`` s and at
        most ``max_history`` symbols long. The pattern (symbols, ``.``, ``[...]``,
        groups, ``|``, ``*``, ``+``, ``?``, ``{m,n}``) is compiled to a state
        machine (:mod:`knhk.stream.regex_nfa`); each key keeps only its NFA state.
        """
        if not symbols:
            raise ValueError("regex pattern needs at least one symbol")
        for sym, m in symbols.items():
            if not isinstance(sym, str) or len(sym) != 1 or sym in "\\.^$*+?{}[]|()":
                raise ValueError(f"a regex symbol must be one plain character, got {sym!r}")
            _check_matcher(m)
        if not isinstance(pattern, str):
            raise ValueError(f"a regex pattern must be a str, got {type(pattern).__name__}")
        compiled = RegexNfa(pattern, "".join(symbols))
        if not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")
        _check_by(by)
        pat = cls("regex", tuple(symbols.values()), _seconds_ns(within, "within"),
                  max_history, by)
        object.__setattr__(pat, "_regex", compiled)
        return pat


def _check_matcher(m: Any) -> None:
    if not isinstance(m, Matcher):
        raise ValueError(f"expected a Matcher, got {type(m).__name__}")


def _check_by(by: str | None) -> None:
    if by is not None and by != "trace_id":
        KeyEncoder((by,))  # raises ValueError naming an unknown key


@dataclass(frozen=True)
class CepAction:
    """What a match does: :meth:`alert` (templated message), :meth:`call` or :meth:`emit`.

    Every match raises an alert; ``call`` also calls a function, ``emit`` also
    puts a derived span into the pipeline.
    """

    severity: str = "warning"
    message: str = "{rule} matched on {key}"
    callback: Callable[[dict[str, Any]], Any] | None = None
    emit_name: str | None = None
    emit_service: str = "knhk.cep"

    @classmethod
    def alert(cls, severity: str, message: str) -> CepAction:
        """Raise an alert; ``message`` may use ``{rule}``, ``{key}``, ``{count}``, ``{time_ns}``.

        Examples
        --------
        >>> CepAction.alert("loud", "x")
        Traceback (most recent call last):
        ...
        ValueError: severity must be one of ['info', 'warning', 'error', 'critical'], got 'loud'
        """
        check_severity(severity)
        try:
            message.format(rule="r", key=("k",) * 8, count=0, time_ns=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"alert message template {message!r} is invalid: {exc!r}; "
                             "fields are rule, key, count, time_ns") from None
        return cls(severity, message)

    @classmethod
    def call(cls, fn: Callable[[dict[str, Any]], Any], *,
                  severity: str = "info") -> CepAction:
        """Call ``fn(match)`` for every match (a dict: rule, key, count, time_ns); also alerts."""
        if not callable(fn):
            raise ValueError("callback must be callable")
        return cls(check_severity(severity), "{rule} matched on {key}", fn)

    @classmethod
    def emit(cls, name: str, *, service: str = "knhk.cep", severity: str = "info") -> CepAction:
        """Put a derived span named ``name`` into the pipeline for every match.

        The span starts and ends at the match time, in a new trace, with the
        attributes ``knhk.cep.rule``, ``knhk.cep.key`` and ``knhk.cep.count``; as a
        pipeline stage the processor appends it to the batch, so it reaches the
        later stages and the exporters.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("emit needs a non-empty span name")
        return cls(check_severity(severity), "{rule} matched on {key}", None, name, service)


@dataclass
class CepRule:
    """A named pattern and the action it triggers.

    Parameters
    ----------
    name : str
    pattern : CepPattern
    action : CepAction
    max_state : int
        Most partial matches kept across batches; the oldest beyond are evicted
        and counted (``rule_state.evictions``).
    """

    name: str
    pattern: CepPattern
    action: CepAction = field(default_factory=CepAction)
    max_state: int = 1_000_000

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a CepRule needs a non-empty name")
        if not isinstance(self.pattern, CepPattern):
            raise ValueError(f"pattern must be a CepPattern, got {type(self.pattern).__name__}")
        if not isinstance(self.action, CepAction):
            raise ValueError(f"action must be a CepAction, got {type(self.action).__name__}")
        if self.max_state < 1:
            raise ValueError(f"max_state must be >= 1, got {self.max_state}")


#: Distinct group-by values a rule's key encoder holds before it forgets dead ones.
_COMPACT_AT = 4096


class _RuleState:
    """One rule's state across batches: carried events, a key encoder, counters."""

    def __init__(self, rule: CepRule) -> None:
        self.rule = rule
        p = rule.pattern
        self._keys = KeyEncoder((p.by,)) if p.by not in (None, "trace_id") else None
        # carried (key, time, chain start) per step, for the next batch
        steps = p.threshold - 1 if p.kind == "count_threshold" else len(p.matchers) - 1
        self._carry = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))
                       for _ in range(max(steps, 1))]
        self.evictions = 0
        self.keys_forgotten = 0
        self._compact_at = _COMPACT_AT  # doubles with the live keys: amortized O(1) a key
        self.matches = 0
        self.derived: list[Span] = []
        self._nfa_state = _NfaStore()

    def _key(self, batch: SpanBatch) -> np.ndarray:
        by = self.rule.pattern.by
        if by is None:
            return np.zeros(batch.num_rows, np.int64)
        if by == "trace_id":
            # the low 64 bits: random per W3C trace context, so collisions are negligible
            return trace_id_low64(batch.column("trace_id")).view(np.int64)
        return self._keys.encode(batch)

    def _key_label(self, key: Any) -> tuple:
        if isinstance(key, tuple):
            return tuple(self._key_label(k) for k in key)
        by = self.rule.pattern.by
        if by is None:
            return ()
        if by == "trace_id":
            return (f"{key & 0xFFFFFFFFFFFFFFFF:016x}",)
        return self._keys.key_values(int(key))

    def process(self, batch: SpanBatch, valid: np.ndarray, t: np.ndarray) -> list[Alert]:
        alerts = self._process(batch, valid, t)
        if self._keys is not None and self._keys.n_groups > self._compact_at:
            self._compact_keys()
            self._compact_at = max(_COMPACT_AT, 2 * self._keys.n_groups)
        return alerts

    def _live_key_arrays(self) -> list[np.ndarray]:
        out = [k for k, _, _ in self._carry] + [self._nfa_state.keys]
        seen = getattr(self, "_b_seen", None)
        if seen is not None:
            out.append(seen[0])
        corr = getattr(self, "_corr", None)
        if corr is not None:
            out += [corr[0][0], corr[1][0]]
        return out

    def _compact_keys(self) -> None:
        """Forget the group-by values no carried state refers to any more, once they
        outnumber the live ones: the encoder's vocabulary follows the live keys (at
        most ``max_state`` per kind of state), not every value ever seen."""
        live = np.unique(np.concatenate(self._live_key_arrays()))
        before = self._keys.n_groups
        remap = self._keys.compact(live)  # keeps the order: sorted state stays sorted
        self._carry = [(remap[k], tt, st) for k, tt, st in self._carry]
        self._nfa_state.keys = remap[self._nfa_state.keys]
        seen = getattr(self, "_b_seen", None)
        if seen is not None:
            self._b_seen = (remap[seen[0]], seen[1])
        corr = getattr(self, "_corr", None)
        if corr is not None:
            self._corr = ((remap[corr[0][0]], corr[0][1]), (remap[corr[1][0]], corr[1][1]))
        self.keys_forgotten += before - live.size

    def _process(self, batch: SpanBatch, valid: np.ndarray, t: np.ndarray) -> list[Alert]:
        p = self.rule.pattern
        keys = self._key(batch)
        masks = [m.mask(batch) & valid for m in p.matchers]
        if p.kind == "count_threshold":
            fired = self._count(keys[masks[0]], t[masks[0]])
        elif p.kind == "correlation":
            return self._act(self._correlate(keys[masks[0]], t[masks[0]],
                                             keys[masks[1]], t[masks[1]]))
        elif p.kind == "regex":
            return self._act(self._regex(keys, t, masks))
        elif p.kind == "absence":
            fired = self._absence(keys[masks[0]], t[masks[0]], keys[masks[1]], t[masks[1]],
                                  int(t.max()) if t.size else None)
        else:
            fired = self._sequence([(keys[m], t[m]) for m in masks])
        return self._act(fired)

    def _bound(self, step: int, k: np.ndarray, tt: np.ndarray, s: np.ndarray) -> None:
        n = self.rule.max_state
        if k.size > n:
            order = np.argsort(tt, kind="stable")[-n:]
            self.evictions += k.size - n
            k, tt, s = k[order], tt[order], s[order]
        self._carry[step] = (k, tt, s)

    def _count(self, k: np.ndarray, tt: np.ndarray) -> list[tuple[int, int, int]]:
        p = self.rule.pattern
        th = p.threshold
        ck, ct, _ = self._carry[0]
        k = np.concatenate([ck, k])
        tt = np.concatenate([ct, tt])
        if k.size == 0:
            return []
        order = np.lexsort((tt, k))
        k, tt = k[order], tt[order]
        new_key = np.ones(k.size, bool)
        new_key[1:] = k[1:] != k[:-1]
        first = np.flatnonzero(new_key)
        rank = np.arange(k.size) - np.repeat(first, np.diff(np.append(first, k.size)))
        is_new = order >= ck.size
        if th == 1:
            hit = is_new
        else:
            hit = np.zeros(k.size, bool)
            i = np.flatnonzero(rank >= th - 1)
            # fire where th events fit in the window and at least one of them is new:
            # an out-of-order span can complete a window that ends at a carried event
            cs = np.concatenate([[0], np.cumsum(is_new)])
            hit[i] = (tt[i] - tt[i - (th - 1)] < p.within_ns) & (cs[i + 1] - cs[i + 1 - th] > 0)
        fired = [(int(k[j]), int(tt[j]), th) for j in np.flatnonzero(hit)]
        # keep the last th - 1 events per key whose window can still matter
        last = np.append(first[1:], k.size)
        sizes = last - first
        keep = rank >= np.repeat(sizes, sizes) - (th - 1)
        keep &= tt > np.repeat(tt[last - 1], sizes) - p.within_ns
        if th > 1:
            self._bound(0, k[keep], tt[keep], tt[keep])
        return _first_per_key(fired)

    def _sequence(self, steps: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, int, int]]:
        p = self.rule.pattern
        w = p.within_ns
        k0, t0 = steps[0]
        ck, ct, cs = self._carry[0]
        prev = (np.concatenate([ck, k0]), np.concatenate([ct, t0]), np.concatenate([cs, t0]))
        new_carry = [prev]
        fired: list[tuple[int, int, int]] = []
        for j in range(1, len(steps)):
            kj, tj = steps[j]
            start = _chain_start(prev, kj, tj)
            ok = (start > np.iinfo(np.int64).min) & (tj - start <= w)
            if j == len(steps) - 1:
                fired = [(int(a), int(b), len(steps)) for a, b in zip(kj[ok], tj[ok], strict=True)]
            else:
                ck, ct, cs = self._carry[j]
                prev = (np.concatenate([ck, kj[ok]]), np.concatenate([ct, tj[ok]]),
                        np.concatenate([cs, start[ok]]))
                new_carry.append(prev)
        horizon = max([int(s[1].max()) for s in steps if s[1].size] + [np.iinfo(np.int64).min])
        for j, (k, tt, s) in enumerate(new_carry):
            keep = s >= horizon - w if horizon > np.iinfo(np.int64).min else np.ones(k.size, bool)
            self._bound(j, k[keep], tt[keep], s[keep])
        return _first_per_key(fired)

    def _absence(self, ka: np.ndarray, ta: np.ndarray, kb: np.ndarray, tb: np.ndarray,
                 now: int | None) -> list[tuple[int, int, int]]:
        w = self.rule.pattern.within_ns
        if now is not None:
            self._now = max(getattr(self, "_now", now), now)
        pk, pt, _ = self._carry[0]
        hk, ht = getattr(self, "_b_seen", (np.empty(0, np.int64), np.empty(0, np.int64)))
        pk, pt = np.concatenate([pk, ka]), np.concatenate([pt, ta])
        hk, ht = np.concatenate([hk, kb]), np.concatenate([ht, tb])
        answered = _first_at_or_after(hk, ht, pk, pt) <= pt + w
        now_ = getattr(self, "_now", None)
        expired = ~answered & (pt + w < now_) if now_ is not None else np.zeros(pk.size, bool)
        fired = [(int(k), int(t), 1) for k, t in zip(pk[expired], pt[expired], strict=True)]
        pending = ~answered & ~expired
        self._bound(0, pk[pending], pt[pending], pt[pending])
        # a b can only answer a pending a at or before it
        lo = int(pt[pending].min()) if pending.any() else (now_ or 0) - w
        keep = ht >= lo
        hk, ht = hk[keep], ht[keep]
        if hk.size > self.rule.max_state:
            order = np.argsort(ht, kind="stable")[-self.rule.max_state:]
            self.evictions += hk.size - order.size
            hk, ht = hk[order], ht[order]
        self._b_seen = (hk, ht)
        return _first_per_key(fired)

    def _correlate(self, ka: np.ndarray, ta: np.ndarray, kb: np.ndarray,
                   tb: np.ndarray) -> list[tuple[Any, int, int]]:
        w = self.rule.pattern.within_ns
        old_a = getattr(self, "_corr", None)
        (oka, ota), (okb, otb) = old_a or ((np.empty(0, np.int64),) * 2,
                                           (np.empty(0, np.int64),) * 2)
        fired: list[tuple[Any, int, int]] = []
        # new a against every b, then new b against old a: each pair is judged once
        for qk, qt, hk, ht, a_first in ((ka, ta, np.concatenate([okb, kb]),
                                         np.concatenate([otb, tb]), True),
                                        (kb, tb, oka, ota, False)):
            if qk.size == 0 or hk.size == 0:
                continue
            order = np.argsort(ht, kind="stable")
            hs = ht[order]
            pos = np.searchsorted(hs, qt)
            left = np.clip(pos - 1, 0, hs.size - 1)
            right = np.clip(pos, 0, hs.size - 1)
            dl, dr = np.abs(qt - hs[left]), np.abs(hs[right] - qt)
            near = np.where(dl <= dr, left, right)
            ok = np.minimum(dl, dr) <= w
            for i in np.flatnonzero(ok).tolist():
                other = int(hk[order[near[i]]])
                pair = (int(qk[i]), other) if a_first else (other, int(qk[i]))
                fired.append((pair, int(max(qt[i], hs[near[i]])), 2))
        ak, at = np.concatenate([oka, ka]), np.concatenate([ota, ta])
        bk, bt = np.concatenate([okb, kb]), np.concatenate([otb, tb])
        horizon = max([int(x.max()) for x in (at, bt) if x.size] or [0]) - w
        keep_a, keep_b = at >= horizon, bt >= horizon
        n = self.rule.max_state
        if keep_a.sum() > n or keep_b.sum() > n:
            self.evictions += int(max(keep_a.sum() - n, 0) + max(keep_b.sum() - n, 0))
        self._corr = ((ak[keep_a][-n:], at[keep_a][-n:]), (bk[keep_b][-n:], bt[keep_b][-n:]))
        best: dict[Any, tuple[Any, int, int]] = {}
        for f in fired:
            if f[0] not in best or f[1] < best[f[0]][1]:
                best[f[0]] = f
        return sorted(best.values(), key=lambda f: f[1])

    def _regex(self, keys: np.ndarray, t: np.ndarray,
               masks: list[np.ndarray]) -> list[tuple[int, int, int]]:
        p = self.rule.pattern
        nfa: RegexNfa = p._regex
        sym = np.full(keys.size, -1, np.int64)
        for i in range(len(masks) - 1, -1, -1):  # the first matching symbol wins
            sym[masks[i]] = i
        rows = np.flatnonzero(sym >= 0)
        if rows.size == 0:
            return []
        rows = rows[np.lexsort((t[rows], keys[rows]))]
        ks, ts, ss = keys[rows], t[rows], sym[rows]
        uniq, first, counts = np.unique(ks, return_index=True, return_counts=True)
        # per-key state machine: the latest run start reaching each NFA state
        store: _NfaStore = self._nfa_state
        st_t, st_seq, base = store.load(uniq, nfa.num_states)
        fired = []
        # the r-th symbol of every key in one vectorized step
        for r in range(int(counts.max())):
            sel = np.flatnonzero(counts > r)
            at = first[sel] + r
            seq = base[sel] + r
            sub_t, sub_seq = st_t[sel], st_seq[sel]
            hit = nfa.advance(sub_t, sub_seq, ss[at], ts[at], seq, p.within_ns, p.threshold)
            st_t[sel], st_seq[sel] = sub_t, sub_seq
            for j in np.flatnonzero(hit).tolist():
                fired.append((int(uniq[sel[j]]), int(ts[at[j]]),
                              int(seq[j] - sub_seq[j, nfa.accept] + 1)))
        self.evictions += store.save(uniq, st_t, st_seq, base + counts,
                                     ts[first + counts - 1], self.rule.max_state)
        return _first_per_key(fired)

    def _act(self, fired: list[tuple[int, int, int]]) -> list[Alert]:
        a = self.rule.action
        out = []
        for key, when, count in fired:
            self.matches += 1
            label = self._key_label(key)
            match = {"rule": self.rule.name, "key": label, "count": count, "time_ns": when}
            if a.callback is not None:
                try:
                    a.callback(match)
                except Exception:
                    logger.exception("CEP callback of rule %r raised", self.rule.name)
            try:
                text = a.message.format(**match)
            except (KeyError, IndexError, ValueError):
                text = f"{a.message} ({match})"
            out.append(Alert(self.rule.name, a.severity, text, when, label, match))
            if a.emit_name is not None:
                self.derived.append(Span(
                    a.emit_name, trace_id=os.urandom(16), span_id=os.urandom(8),
                    start_time_ns=when, duration_ns=0, service=a.emit_service,
                    attributes={"knhk.cep.rule": self.rule.name, "knhk.cep.key": str(label),
                                "knhk.cep.count": int(count)}))
        return out


class _NfaStore:
    """Regex runs in progress, per key, as sorted arrays (no Python object per key).

    Keys with no run in progress are not kept; their symbol numbering restarts.
    """

    _NEVER = np.iinfo(np.int64).min

    def __init__(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.st_t = np.empty((0, 0), np.int64)
        self.st_seq = np.empty((0, 0), np.int64)
        self.base = np.empty(0, np.int64)
        self.last = np.empty(0, np.int64)

    def __len__(self) -> int:
        return self.keys.size

    def load(self, uniq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        st_t = np.full((uniq.size, n), self._NEVER, np.int64)
        st_seq = np.zeros((uniq.size, n), np.int64)
        base = np.zeros(uniq.size, np.int64)
        if self.keys.size:
            idx = np.minimum(np.searchsorted(self.keys, uniq), self.keys.size - 1)
            found = self.keys[idx] == uniq
            st_t[found] = self.st_t[idx[found]]
            st_seq[found] = self.st_seq[idx[found]]
            base[found] = self.base[idx[found]]
        return st_t, st_seq, base

    def save(self, uniq: np.ndarray, st_t: np.ndarray, st_seq: np.ndarray,
             base: np.ndarray, last: np.ndarray, max_keys: int) -> int:
        """Store the keys of this batch (sorted ``uniq``); return how many were evicted."""
        old = ~np.isin(self.keys, uniq, assume_unique=True)
        live = (st_t != self._NEVER).any(axis=1)
        keys = np.concatenate([self.keys[old], uniq[live]])
        order = np.argsort(keys, kind="stable")
        st_t_all = np.concatenate([self.st_t[old].reshape(-1, st_t.shape[1]), st_t[live]])
        st_seq_all = np.concatenate([self.st_seq[old].reshape(-1, st_t.shape[1]),
                                     st_seq[live]])
        last_all = np.concatenate([self.last[old], last[live]])
        base_all = np.concatenate([self.base[old], base[live]])
        evicted = 0
        if keys.size > max_keys:  # the keys idle longest go first
            evicted = keys.size - max_keys
            keep = np.sort(np.argsort(last_all, kind="stable")[evicted:])
            order = keep[np.argsort(keys[keep], kind="stable")]
        self.keys, self.st_t, self.st_seq = keys[order], st_t_all[order], st_seq_all[order]
        self.base, self.last = base_all[order], last_all[order]
        return evicted


def _first_per_key(fired: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """One match per key and batch: the earliest."""
    best: dict[int, tuple[int, int, int]] = {}
    for f in fired:
        if f[0] not in best or f[1] < best[f[0]][1]:
            best[f[0]] = f
    return sorted(best.values(), key=lambda f: (f[1], f[0]))


def _first_at_or_after(hk: np.ndarray, ht: np.ndarray, k: np.ndarray,
                       t: np.ndarray) -> np.ndarray:
    """For each (k, t): the earliest time in ``ht`` of key k at or after t (int64 max if none)."""
    big = np.iinfo(np.int64).max
    if k.size == 0 or hk.size == 0:
        return np.full(k.size, big, np.int64)
    allk = np.concatenate([hk, k])
    allt = np.concatenate([ht, t])
    is_query = np.concatenate([np.zeros(hk.size, bool), np.ones(k.size, bool)])
    # queries sort before history at equal time: a b at the same instant answers
    order = np.lexsort((~is_query, allt, allk))[::-1]
    ks = allk[order]
    _, gidx = np.unique(ks, return_inverse=True)
    gidx = gidx.max() - gidx  # increasing along the (descending) walk
    uniq, rank = np.unique(ht, return_inverse=True)
    ranks = np.concatenate([rank + 1, np.zeros(k.size, np.int64)])[order]
    rel = np.where(is_query[order], 0, ranks)
    span = uniq.size + 2
    inv = np.where(rel > 0, span - rel, 0)  # walk backwards: a running max of span - rank
    v = gidx.astype(np.int64) * span + inv
    best = np.maximum.accumulate(v) - gidx.astype(np.int64) * span
    found = np.where(best > 0, uniq[np.clip(span - best, 1, uniq.size) - 1], big)
    out = np.empty(allk.size, np.int64)
    out[order] = found
    return out[hk.size:]


def _chain_start(prev: tuple[np.ndarray, np.ndarray, np.ndarray], k: np.ndarray,
                 t: np.ndarray) -> np.ndarray:
    """For each (k, t): the latest chain start among ``prev`` events of key k at time <= t."""
    pk, pt, ps = prev
    none = np.iinfo(np.int64).min
    if k.size == 0 or pk.size == 0:
        return np.full(k.size, none, np.int64)
    allk = np.concatenate([pk, k])
    allt = np.concatenate([pt, t])
    is_cur = np.concatenate([np.zeros(pk.size, bool), np.ones(k.size, bool)])
    # previous-step events sort before current ones at equal time: "A then B" allows ties
    order = np.lexsort((is_cur, allt, allk))
    keys_sorted = allk[order]
    _, gidx = np.unique(keys_sorted, return_inverse=True)
    # chain starts as ranks (1-based; 0 = none) keep the packed key small whatever the times
    uniq, rank = np.unique(ps, return_inverse=True)
    s = np.concatenate([rank + 1, np.zeros(k.size, np.int64)])[order]
    rel = np.where(is_cur[order], 0, s)
    span = uniq.size + 1
    v = gidx.astype(np.int64) * span + rel
    best = np.maximum.accumulate(v) - gidx.astype(np.int64) * span
    out_sorted = np.where(best > 0, uniq[np.maximum(best, 1) - 1], none)
    out = np.empty(allk.size, np.int64)
    out[order] = out_sorted
    return out[pk.size:]
