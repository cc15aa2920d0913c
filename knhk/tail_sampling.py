"""Tail sampling: hold spans per trace until it is complete, then decide for the whole trace.

A trace is complete when its root span has been seen and no span arrived for
``idle_timeout``, or when ``decision_wait`` has passed since its first span.
Policies then decide for the whole trace; they are named and configured as in
the OpenTelemetry Collector's ``tail_sampling`` processor (``latency``,
``status_code``, ``probabilistic``, ``rate_limiting``, ``string_attribute``,
``numeric_attribute``, ``boolean_attribute``, ``and``, ``composite``, ``drop``,
``always_sample``), and combine as there: a ``drop`` decision wins, then an
inverted not-sample, then any sample. Kept spans record the deciding policy
(attribute ``tailsampling.policy``, and ``tailsampling.composite_policy``) and
their sampling probability in ``trace_state`` where it is known (``ot=th:``
for the consistent rule, ``knhk=p:`` for the traceidratio rule, combined with
an upstream probability as :mod:`knhk.sampling` describes).

Memory is bounded: at most ``num_traces`` traces are pending; when full, the
oldest is decided early (or dropped, ``on_full="drop"``) and counted. Spans
that arrive after their trace was decided follow the decision, kept in a
bounded cache (``sampled_cache_size`` / ``non_sampled_cache_size``).

>>> import knhk
>>> from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig
>>> now = [0.0]
>>> sampler = TailSampler(TailSamplingConfig(
...     policies=[Policy.status_code("errors", status_codes=["ERROR"])],
...     decision_wait=10.0, idle_timeout=1.0), clock=lambda: now[0])
>>> spans = [knhk.Span("GET /", trace_id=1, span_id=1),
...          knhk.Span("db", trace_id=1, span_id=2, parent_span_id=1, status=2),
...          knhk.Span("GET /", trace_id=2, span_id=3)]
>>> sampler.process(knhk.SpanBatch.from_spans(spans)).batch.num_rows   # held
0
>>> now[0] = 2.0
>>> out = sampler.flush()
>>> out.num_rows, out.attribute("tailsampling.policy").to_pylist()
(2, ['errors', 'errors'])
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk._build import load_core
from knhk._regex import LinearPattern, compile_pattern
from knhk._sampling_common import (
    annotate,
    as_batch,
    check_rule,
    ratio_bound,
    trace_id_matrix,
)
from knhk.batch import SpanBatch
from knhk.pipeline import StageResult
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE, AttrType

logger = logging.getLogger(__name__)

_k = load_core("_sampling")

__all__ = ["Policy", "TailSampler", "TailSamplingConfig"]

# Policy decisions, as the Collector names them.
_UNSET, _NOT_SAMPLED, _SAMPLED, _INV_SAMPLED, _INV_NOT_SAMPLED, _DROPPED = -1, 0, 1, 2, 3, 4

_LEAF_TYPES = ("always_sample", "latency", "status_code", "probabilistic",
               "string_attribute", "numeric_attribute", "boolean_attribute")
_ATTR_TYPES = ("string_attribute", "numeric_attribute", "boolean_attribute")
POLICY_TYPES = tuple(sorted((*_LEAF_TYPES, "rate_limiting", "and", "composite", "drop")))

_PARAMS: dict[str, dict[str, bool]] = {  # name -> required?
    "always_sample": {},
    "latency": {"threshold_ms": True, "upper_threshold_ms": False},
    "status_code": {"status_codes": True},
    "probabilistic": {"sampling_percentage": True},
    "rate_limiting": {"spans_per_second": True, "burst_capacity": False},
    "string_attribute": {"key": True, "values": True, "enabled_regex_matching": False,
                         "cache_max_size": False, "invert_match": False},
    "numeric_attribute": {"key": True, "min_value": False, "max_value": False,
                          "invert_match": False},
    "boolean_attribute": {"key": True, "value": True, "invert_match": False},
    "and": {"and_sub_policy": True},
    "drop": {"drop_sub_policy": True},
    "composite": {"max_total_spans_per_second": True, "policy_order": False,
                  "composite_sub_policy": True, "rate_allocation": False},
}
_SUB_KEY = {"and": "and_sub_policy", "drop": "drop_sub_policy",
            "composite": "composite_sub_policy"}
_SUB_TYPES = {"and": _LEAF_TYPES, "drop": _LEAF_TYPES,
              "composite": (*_LEAF_TYPES, "and")}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}
_SEMCONV_TYPES = {"string": "string_attribute", "int": "numeric_attribute",
                  "double": "numeric_attribute", "boolean": "boolean_attribute",
                  "bool": "boolean_attribute"}
_MAX_ATTRIBUTE_POLICIES = 64


def _compile_values(values: Sequence[str], where: str) -> list[LinearPattern]:
    """A string_attribute policy's values as RE2 patterns (ValueError naming the bad one)."""
    return [compile_pattern(v, f"Tail sampling {where}: string_attribute.values[{i}] is "
                               "not a valid regular expression")
            for i, v in enumerate(values)]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: Any, what: str, *, allow_zero: bool = False) -> float:
    """Seconds from a number, a timedelta or a Go duration string ("10s", "1m30s")."""
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_RE.findall(text)
        if not parts or "".join(a + b for a, b in parts) != text:
            raise ValueError(f"{what} must be a duration such as '10s' or '500ms', "
                             f"got {value!r}.")
        s = sum(float(a) * _UNIT_S[b] for a, b in parts)
    elif _is_number(value):
        s = float(value)
    else:
        raise ValueError(f"{what} must be seconds, a timedelta or a duration string, "
                         f"got {value!r}.")
    if s < 0 or (s == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else 'positive'}, "
                         f"got {value!r}.")
    return s


# -- policies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """One tail-sampling policy, as in the Collector's ``policies`` list.

    Build one from the Collector's YAML shape with :meth:`from_dict` or with
    the constructor of its type; both check everything at once and raise
    ``ValueError`` naming the policy and the parameter.

    Examples
    --------
    >>> p = Policy.from_dict({"name": "slow", "type": "latency",
    ...                       "latency": {"threshold_ms": 500}})
    >>> p.params
    {'threshold_ms': 500, 'upper_threshold_ms': 0}
    >>> Policy.latency("slow", threshold_ms=500) == p
    True
    """

    name: str
    type: str
    params: dict = field(default_factory=dict, hash=False)
    sub_policies: tuple[Policy, ...] = ()

    def walk(self) -> Iterator[Policy]:
        """This policy, then every policy nested in it (``and``, ``composite``), depth first."""
        yield self
        for s in self.sub_policies:
            yield from s.walk()

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | Policy, where: str = "policy") -> Policy:
        """A policy from ``{"name": ..., "type": ..., <type>: {...params}}``."""
        if isinstance(spec, Policy):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"Tail sampling {where} must be a mapping with name and type, "
                             f"got {type(spec).__name__}.")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Tail sampling {where} needs a non-empty string 'name', "
                             f"got {name!r}.")
        where = f"{where} {name!r}"
        ptype = spec.get("type")
        if ptype not in _PARAMS:
            raise ValueError(
                f"Tail sampling {where} has unknown type {ptype!r}; known types are "
                f"{', '.join(POLICY_TYPES)}.")
        extra = sorted(set(spec) - {"name", "type", ptype})
        if extra:
            raise ValueError(f"Tail sampling {where} has unknown key(s) {', '.join(extra)}; "
                             f"its parameters go under {ptype!r}.")
        raw = spec.get(ptype) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"Tail sampling {where}: {ptype!r} must be a mapping of "
                             f"parameters, got {type(raw).__name__}.")
        allowed = _PARAMS[ptype]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            hint = (" (knhk decides from the trace id, as TraceIdRatio does)"
                    if "hash_salt" in unknown else "")
            raise ValueError(
                f"Tail sampling {where}: unknown {ptype} parameter(s) {', '.join(unknown)}"
                f"{hint}; known: {', '.join(allowed) or 'none'}.")
        missing = [p for p, req in allowed.items() if req and p not in raw]
        if missing:
            raise ValueError(f"Tail sampling {where}: {ptype} needs {', '.join(missing)}.")
        params, subs = _check_params(ptype, dict(raw), where)
        return cls(name, ptype, params, subs)

    @classmethod
    def _make(cls, name: str, ptype: str, **params: Any) -> Policy:
        spec: dict[str, Any] = {"name": name, "type": ptype}
        given = {k: v for k, v in params.items() if v is not None}
        if given or ptype != "always_sample":
            spec[ptype] = given
        return cls.from_dict(spec)

    @classmethod
    def always_sample(cls, name: str) -> Policy:
        """Samples every trace."""
        return cls._make(name, "always_sample")

    @classmethod
    def latency(cls, name: str, threshold_ms: float, upper_threshold_ms: float = 0) -> Policy:
        """Samples traces whose duration (earliest start to latest end) reaches ``threshold_ms``.

        With ``upper_threshold_ms`` the duration must lie in (threshold, upper].
        """
        return cls._make(name, "latency", threshold_ms=threshold_ms,
                         upper_threshold_ms=upper_threshold_ms)

    @classmethod
    def status_code(cls, name: str, status_codes: Sequence[str]) -> Policy:
        """Samples traces with a span whose status is one of ``status_codes`` (OK, ERROR, UNSET)."""
        return cls._make(name, "status_code", status_codes=list(status_codes))

    @classmethod
    def probabilistic(cls, name: str, sampling_percentage: float) -> Policy:
        """Samples ``sampling_percentage`` percent of traces, by trace id (as TraceIdRatio)."""
        return cls._make(name, "probabilistic", sampling_percentage=sampling_percentage)

    @classmethod
    def rate_limiting(cls, name: str, spans_per_second: float,
                      burst_capacity: float | None = None) -> Policy:
        """Samples traces while a token bucket of spans allows (refill ``spans_per_second``,
        capacity ``burst_capacity``, default twice that)."""
        return cls._make(name, "rate_limiting", spans_per_second=spans_per_second,
                         burst_capacity=burst_capacity)

    @classmethod
    def string_attribute(cls, name: str, key: str, values: Sequence[str], *,
                         enabled_regex_matching: bool = False,
                         invert_match: bool = False) -> Policy:
        """Samples traces with a span or resource whose string ``key`` is in ``values``.

        With ``enabled_regex_matching`` the values are regular expressions,
        searched as Go's ``MatchString`` does and with the same engine's rules
        (RE2, :mod:`knhk._regex`): linear time whatever the pattern or the span
        data, no backreferences or lookaround (refused here with a ``ValueError``
        naming the policy and the value). A value is searched in its first 4096
        characters.

        Examples
        --------
        >>> p = Policy.string_attribute("api", "http.route", ["^/api/(v1|v2)/"],
        ...                             enabled_regex_matching=True)
        >>> p.params["values"]
        ['^/api/(v1|v2)/']
        >>> Policy.string_attribute("dup", "k", [r"(a)\\1"], enabled_regex_matching=True)
        ...     # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Tail sampling policy 'dup': string_attribute.values[0] is not a valid \
regular expression: ... RE2 has no backreferences; ...
        """
        return cls._make(name, "string_attribute", key=key, values=list(values),
                         enabled_regex_matching=enabled_regex_matching,
                         invert_match=invert_match)

    @classmethod
    def numeric_attribute(cls, name: str, key: str, min_value: float | None = None,
                          max_value: float | None = None, *,
                          invert_match: bool = False) -> Policy:
        """Samples traces with a numeric ``key`` in [min_value, max_value] (either may be open)."""
        return cls._make(name, "numeric_attribute", key=key, min_value=min_value,
                         max_value=max_value, invert_match=invert_match)

    @classmethod
    def boolean_attribute(cls, name: str, key: str, value: bool, *,
                          invert_match: bool = False) -> Policy:
        """Samples traces with a boolean ``key`` equal to ``value``."""
        return cls._make(name, "boolean_attribute", key=key, value=value,
                         invert_match=invert_match)

    @classmethod
    def and_(cls, name: str, policies: Sequence[Policy | Mapping]) -> Policy:
        """Samples traces that every sub-policy samples (the Collector's ``and``)."""
        return cls._make(name, "and", and_sub_policy=list(policies))

    @classmethod
    def drop(cls, name: str, policies: Sequence[Policy | Mapping]) -> Policy:
        """Drops traces that every sub-policy samples, whatever the other policies say."""
        return cls._make(name, "drop", drop_sub_policy=list(policies))

    @classmethod
    def composite(cls, name: str, max_total_spans_per_second: int,
                  policies: Sequence[Policy | Mapping], *,
                  policy_order: Sequence[str] | None = None,
                  rate_allocation: Mapping[str, float] | Sequence[Mapping] | None = None
                  ) -> Policy:
        """Sub-policies in order, each with a share (percent) of the spans per second.

        The first sub-policy that samples a trace decides: sampled if its share
        (and the total) this second still has room for the trace's spans.
        Sub-policies without an allocation share what the allocations leave.
        """
        if isinstance(rate_allocation, Mapping):
            rate_allocation = [{"policy": k, "percent": v} for k, v in rate_allocation.items()]
        return cls._make(name, "composite",
                         max_total_spans_per_second=max_total_spans_per_second,
                         composite_sub_policy=list(policies),
                         policy_order=None if policy_order is None else list(policy_order),
                         rate_allocation=rate_allocation)

    def to_dict(self) -> dict[str, Any]:
        """The Collector-shaped mapping of this policy (round-trips through from_dict)."""
        params = dict(self.params)
        if self.type in _SUB_KEY:
            params[_SUB_KEY[self.type]] = [p.to_dict() for p in self.sub_policies]
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if params or self.type != "always_sample":
            out[self.type] = params
        return out


def _check_params(ptype: str, p: dict, where: str) -> tuple[dict, tuple[Policy, ...]]:
    def bad(msg: str) -> ValueError:
        return ValueError(f"Tail sampling {where}: {msg}")

    def flag(key: str) -> bool:
        v = p.get(key, False)
        if not isinstance(v, bool):
            raise bad(f"{ptype}.{key} must be true or false, got {v!r}.")
        return v

    def attr_key() -> str:
        k = p.get("key")
        if not isinstance(k, str) or not k:
            raise bad(f"{ptype}.key must be a non-empty string, got {k!r}.")
        return k

    subs: tuple[Policy, ...] = ()
    if ptype == "latency":
        t = p["threshold_ms"]
        u = p.get("upper_threshold_ms", 0)
        for k, v in (("threshold_ms", t), ("upper_threshold_ms", u)):
            if not _is_number(v) or v < 0:
                raise bad(f"latency.{k} must be a number of milliseconds >= 0, got {v!r}.")
        if u and u < t:
            raise bad(f"latency.upper_threshold_ms ({u}) must not be below threshold_ms ({t}).")
        return {"threshold_ms": t, "upper_threshold_ms": u}, subs
    if ptype == "status_code":
        codes = p["status_codes"]
        if isinstance(codes, str) or not isinstance(codes, Sequence) or not codes:
            raise bad(f"status_code.status_codes must be a non-empty list of OK, ERROR, "
                      f"UNSET, got {codes!r}.")
        out = []
        for c in codes:
            name = c.name if hasattr(c, "name") and not isinstance(c, str) else c
            if name not in _STATUS:
                raise bad(f"unknown status code {c!r}; use OK, ERROR or UNSET.")
            out.append(name)
        return {"status_codes": out}, subs
    if ptype == "probabilistic":
        v = p["sampling_percentage"]
        if not _is_number(v) or not 0 <= v <= 100:
            raise bad(f"probabilistic.sampling_percentage must be a percentage in [0, 100], "
                      f"got {v!r}.")
        return {"sampling_percentage": v}, subs
    if ptype == "rate_limiting":
        v = p["spans_per_second"]
        if not _is_number(v) or v <= 0:
            raise bad(f"rate_limiting.spans_per_second must be a positive number, got {v!r}.")
        burst = p.get("burst_capacity", 2 * v)
        if not _is_number(burst) or burst <= 0:
            raise bad(f"rate_limiting.burst_capacity must be a positive number, got {burst!r}.")
        return {"spans_per_second": v, "burst_capacity": burst}, subs
    if ptype == "string_attribute":
        key = attr_key()
        values = p["values"]
        if isinstance(values, str) or not isinstance(values, Sequence) or not values \
                or not all(isinstance(v, str) for v in values):
            raise bad(f"string_attribute.values must be a non-empty list of strings, "
                      f"got {values!r}.")
        regex = flag("enabled_regex_matching")
        if regex:
            _compile_values(values, where)
        size = p.get("cache_max_size", 128)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"string_attribute.cache_max_size must be an int >= 0, got {size!r}.")
        return {"key": key, "values": list(values), "enabled_regex_matching": regex,
                "cache_max_size": size, "invert_match": flag("invert_match")}, subs
    if ptype == "numeric_attribute":
        key = attr_key()
        lo, hi = p.get("min_value"), p.get("max_value")
        if lo is None and hi is None:
            raise bad("numeric_attribute needs min_value, max_value or both.")
        for k, v in (("min_value", lo), ("max_value", hi)):
            if v is not None and not _is_number(v):
                raise bad(f"numeric_attribute.{k} must be a number, got {v!r}.")
        if lo is not None and hi is not None and lo > hi:
            raise bad(f"numeric_attribute.min_value ({lo}) exceeds max_value ({hi}).")
        return {"key": key, "min_value": lo, "max_value": hi,
                "invert_match": flag("invert_match")}, subs
    if ptype == "boolean_attribute":
        key = attr_key()
        v = p["value"]
        if not isinstance(v, bool):
            raise bad(f"boolean_attribute.value must be true or false, got {v!r}.")
        return {"key": key, "value": v, "invert_match": flag("invert_match")}, subs
    if ptype in _SUB_KEY:
        raw = p[_SUB_KEY[ptype]]
        if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
            raise bad(f"{ptype}.{_SUB_KEY[ptype]} must be a non-empty list of policies.")
        subs = tuple(Policy.from_dict(s, f"{where} {_SUB_KEY[ptype]}[{i}]")
                     for i, s in enumerate(raw))
        names = [s.name for s in subs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise bad(f"sub-policy names must be unique; repeated: {', '.join(dup)}.")
        for s in subs:
            if s.type not in _SUB_TYPES[ptype]:
                raise bad(f"a {ptype} policy cannot hold a {s.type} sub-policy ({s.name!r}); "
                          f"allowed: {', '.join(_SUB_TYPES[ptype])}.")
        if ptype != "composite":
            return {}, subs
        total = p["max_total_spans_per_second"]
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise bad(f"composite.max_total_spans_per_second must be a positive int, "
                      f"got {total!r}.")
        order = p.get("policy_order") or names
        if sorted(order) != sorted(names):
            raise bad(f"composite.policy_order {list(order)!r} must list each sub-policy "
                      f"({', '.join(names)}) once.")
        alloc: dict[str, float] = {}
        for i, a in enumerate(p.get("rate_allocation") or ()):
            if not isinstance(a, Mapping) or set(a) != {"policy", "percent"}:
                raise bad(f"composite.rate_allocation[{i}] must be {{policy, percent}}, "
                          f"got {a!r}.")
            if a["policy"] not in names:
                raise bad(f"composite.rate_allocation[{i}] names unknown sub-policy "
                          f"{a['policy']!r}.")
            if not _is_number(a["percent"]) or not 0 < a["percent"] <= 100:
                raise bad(f"composite.rate_allocation[{i}].percent must be in (0, 100], "
                          f"got {a['percent']!r}.")
            alloc[a["policy"]] = a["percent"]
        if sum(alloc.values()) > 100:
            raise bad(f"composite.rate_allocation adds up to {sum(alloc.values())} percent, "
                      "more than 100.")
        by_name = {s.name: s for s in subs}
        subs = tuple(by_name[n] for n in order)
        return {"max_total_spans_per_second": total, "policy_order": list(order),
                "rate_allocation": [{"policy": k, "percent": v} for k, v in alloc.items()]}, \
            subs
    return {}, subs


# -- configuration ----------------------------------------------------------------------


@dataclass
class TailSamplingConfig:
    """Configuration of a :class:`TailSampler`, named as the Collector's processor.

    Parameters
    ----------
    policies : list of Policy or Collector-shaped mappings
    decision_wait : seconds, timedelta or "30s"
        Decide a trace this long after its first span at the latest.
    idle_timeout : seconds, timedelta or "2s"
        Decide a trace whose root span was seen once no span came for this long.
    num_traces : int
        Pending traces held at most; the oldest is decided early when full.
    sampled_cache_size, non_sampled_cache_size : int
        Decisions remembered for late spans (0 turns a cache off).
    on_full : {"decide", "drop"}
        What happens to the oldest pending trace when ``num_traces`` are pending.
    sample_on_first_match : bool
        Stop evaluating policies at the first that samples (as the Collector).
    drop_pending_traces_on_shutdown : bool
        ``flush`` drops pending traces instead of deciding on partial data.
    record_policy, record_probability : bool
        Write ``tailsampling.policy`` / the sampling probability onto kept
        spans (``ot=th:`` under the consistent rule, ``knhk=p:`` under the
        traceidratio rule; see :mod:`knhk.sampling`).
    rule : {"traceidratio", "consistent"}
        The trace-id rule of ``probabilistic`` policies (see :mod:`knhk.sampling`).
    tick_interval : seconds or None
        How often pending traces are checked (default a quarter of the smaller
        timeout, at most 1 s).
    attribute_types : mapping of key to type, optional
        Declared attribute types (``"string"``, ``"int"``, ``"double"``,
        ``"boolean"`` or :class:`~knhk.AttrType`), e.g. from a semantic-convention
        registry: a policy on an attribute of another type is refused.
    """

    policies: Sequence[Policy | Mapping[str, Any]]
    decision_wait: Any = 30.0
    idle_timeout: Any = 2.0
    num_traces: int = 50_000
    sampled_cache_size: int = 100_000
    non_sampled_cache_size: int = 100_000
    on_full: str = "decide"
    sample_on_first_match: bool = False
    drop_pending_traces_on_shutdown: bool = False
    record_policy: bool = True
    record_probability: bool = True
    rule: str = "traceidratio"
    tick_interval: Any = None
    attribute_types: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.policies, Mapping | str) or not isinstance(self.policies, Iterable):
            raise ValueError("TailSamplingConfig.policies must be a list of policies.")
        pols = tuple(Policy.from_dict(p, f"policies[{i}]") for i, p in enumerate(self.policies))
        if not pols:
            raise ValueError("TailSamplingConfig.policies must hold at least one policy.")
        names = [p.name for p in pols]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Tail sampling policy names must be unique; repeated: "
                             f"{', '.join(dup)}.")
        self.policies = pols
        self.decision_wait = _seconds(self.decision_wait, "TailSamplingConfig.decision_wait")
        self.idle_timeout = _seconds(self.idle_timeout, "TailSamplingConfig.idle_timeout")
        for name in ("num_traces", "sampled_cache_size", "non_sampled_cache_size"):
            v = getattr(self, name)
            low = 1 if name == "num_traces" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low or v >= 2**30:
                raise ValueError(f"TailSamplingConfig.{name} must be an int in "
                                 f"[{low}, 2**30), got {v!r}.")
        if self.on_full not in ("decide", "drop"):
            raise ValueError(f"TailSamplingConfig.on_full must be 'decide' or 'drop', "
                             f"got {self.on_full!r}.")
        for name in ("sample_on_first_match", "drop_pending_traces_on_shutdown",
                     "record_policy", "record_probability"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TailSamplingConfig.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}.")
        check_rule(self.rule, "TailSamplingConfig.rule")
        if self.tick_interval is None:
            self.tick_interval = min(1.0, min(self.decision_wait, self.idle_timeout) / 4)
        else:
            self.tick_interval = _seconds(self.tick_interval, "TailSamplingConfig.tick_interval",
                                          allow_zero=True)
        leaves = [leaf for p in pols for leaf in p.walk() if leaf.type in _ATTR_TYPES]
        if len(leaves) > _MAX_ATTRIBUTE_POLICIES:
            raise ValueError(f"At most {_MAX_ATTRIBUTE_POLICIES} attribute policies are "
                             f"supported, got {len(leaves)}.")
        if self.attribute_types is not None:
            declared = {}
            for key, t in dict(self.attribute_types).items():
                tname = AttrType(t).name.lower() if isinstance(t, int) else str(t).lower()
                tname = {"str": "string", "double": "double"}.get(tname, tname)
                declared[key] = tname
            for leaf in leaves:
                t = declared.get(leaf.params["key"])
                if t is None:
                    continue
                if _SEMCONV_TYPES.get(t) != leaf.type:
                    raise ValueError(
                        f"Tail sampling policy {leaf.name!r} is a {leaf.type} policy on "
                        f"{leaf.params['key']!r}, which is declared {t}.")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> TailSamplingConfig:
        """From the Collector's processor configuration (``decision_wait: 10s``, ...).

        >>> TailSamplingConfig.from_dict({"decision_wait": "10s", "num_traces": 100,
        ...     "decision_cache": {"sampled_cache_size": 1000},
        ...     "policies": [{"name": "all", "type": "always_sample"}]}).decision_wait
        10.0
        """
        if not isinstance(spec, Mapping):
            raise ValueError("A tail sampling configuration must be a mapping.")
        known = {"policies", "decision_wait", "idle_timeout", "num_traces", "decision_cache",
                 "expected_new_traces_per_sec", "sample_on_first_match",
                 "drop_pending_traces_on_shutdown", "on_full", "record_policy",
                 "record_probability", "rule", "tick_interval", "attribute_types"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"Unknown tail sampling setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}.")
        kw = {k: v for k, v in spec.items()
              if k not in ("decision_cache", "expected_new_traces_per_sec")}
        if "policies" not in kw:
            raise ValueError("A tail sampling configuration needs 'policies'.")
        cache = spec.get("decision_cache") or {}
        if not isinstance(cache, Mapping) or \
                set(cache) - {"sampled_cache_size", "non_sampled_cache_size"}:
            raise ValueError("decision_cache takes sampled_cache_size and "
                             f"non_sampled_cache_size, got {cache!r}.")
        kw.update(cache)
        return cls(**kw)


# -- policy evaluation ------------------------------------------------------------------


@dataclass
class _Traces:
    """Per-trace facts of the traces being decided (arrays aligned by trace)."""

    lo: np.ndarray
    span_count: np.ndarray
    min_start: np.ndarray
    max_end: np.ndarray
    status_bits: np.ndarray
    pred: np.ndarray

    @classmethod
    def from_slots(cls, s: np.ndarray) -> _Traces:
        return cls(s["lo"], s["span_count"], s["min_start"], s["max_end"],
                   s["status_bits"], s["pred"])


class _Node:
    """A compiled policy: evaluates a whole set of traces at once."""

    def __init__(self, p: Policy, engine: _Engine) -> None:
        self.name, self.type, self.params = p.name, p.type, p.params
        self.subs = [_Node(s, engine) for s in p.sub_policies]
        self.stateful = self.type in ("rate_limiting", "composite")
        self.bit = -1
        if self.type in _ATTR_TYPES:
            self.bit = engine.add_leaf(self)
        self.patterns: list[LinearPattern] | None = None
        if self.type == "string_attribute" and self.params["enabled_regex_matching"]:
            self.patterns = _compile_values(self.params["values"], f"policy {self.name!r}")
        if self.type == "probabilistic":
            b, keep_all, prob = ratio_bound(self.params["sampling_percentage"] / 100.0,
                                            engine.rule)
            self.bound, self.keep_all, self.consistent = b, keep_all, engine.rule == "consistent"
        # Probability with which a sampled trace was sampled (NaN unknown).
        if self.type == "probabilistic":
            self.prob = prob
        elif self.stateful:
            self.prob = math.nan
        elif self.type == "and":
            self.prob = min(s.prob for s in self.subs)
        else:
            self.prob = 1.0
        # A drop with a probabilistic part vetoes at random: kept traces then
        # have no known probability.
        self.uncertain_veto = self.type == "drop" and any(s.prob != 1.0 for s in self.subs)
        if self.type == "status_code":
            self.status_mask = 0
            for c in self.params["status_codes"]:
                self.status_mask |= 1 << _STATUS[c]
        if self.type == "rate_limiting":
            self.tokens = float(self.params["burst_capacity"])
            self.last: float | None = None
        if self.type == "composite":
            total = self.params["max_total_spans_per_second"]
            alloc = {a["policy"]: a["percent"] for a in self.params["rate_allocation"]}
            rest = max(0.0, total - sum(total * v / 100.0 for v in alloc.values()))
            self.allocated = np.array(
                [int(total * alloc[s.name] / 100.0) if s.name in alloc else int(rest)
                 for s in self.subs], dtype=np.int64)
            self.used = np.zeros(len(self.subs) + 1, dtype=np.int64)
            self.second: int | None = None
            self.chosen = np.empty(0, dtype=np.int16)

    def sampled(self, tr: _Traces, active: np.ndarray, now: float) -> np.ndarray:
        """Bool: whether this policy samples each trace (inverted decisions folded)."""
        d = self.evaluate(tr, active, now)
        return (d == _SAMPLED) | (d == _INV_SAMPLED)

    def evaluate(self, tr: _Traces, active: np.ndarray, now: float) -> np.ndarray:
        t = self.type
        n = tr.lo.size
        if t == "always_sample":
            m = np.ones(n, dtype=bool)
        elif t == "latency":
            # Whole milliseconds, truncated, as the Collector's Duration.Milliseconds().
            ms = (tr.max_end - tr.min_start) // 1_000_000
            lo, hi = self.params["threshold_ms"], self.params["upper_threshold_ms"]
            m = ms >= lo if not hi else (ms > lo) & (ms <= hi)
        elif t == "status_code":
            m = (tr.status_bits & self.status_mask) != 0
        elif t == "probabilistic":
            if self.keep_all:
                m = np.ones(n, dtype=bool)
            else:
                key = tr.lo
                if self.consistent:
                    key = ~key & np.uint64(0x00FFFFFFFFFFFFFF)
                m = key < np.uint64(self.bound)
        elif t in _ATTR_TYPES:
            m = ((tr.pred >> np.uint64(self.bit)) & np.uint64(1)).astype(bool)
            if self.params["invert_match"]:
                d = np.where(m, _INV_NOT_SAMPLED, _INV_SAMPLED).astype(np.int8)
                d[~active] = _UNSET
                return d
        elif t == "and":
            m = active.copy()
            for s in self.subs:
                m &= s.sampled(tr, m, now)
        elif t == "drop":
            m = active.copy()
            for s in self.subs:
                m &= s.sampled(tr, m, now)
            d = np.where(m, _DROPPED, _NOT_SAMPLED).astype(np.int8)
            d[~active] = _UNSET
            return d
        elif t == "rate_limiting":
            sps = self.params["spans_per_second"]
            if self.last is not None:
                self.tokens = min(self.params["burst_capacity"],
                                  self.tokens + max(0.0, now - self.last) * sps)
            self.last = now
            m, used = _k.greedy_admit(np.ascontiguousarray(tr.span_count),
                                      active.view(np.uint8), self.tokens)
            self.tokens -= used
        else:  # composite
            second = math.floor(now)
            if second != self.second:
                self.second = second
                self.used[:] = 0
            subs = np.zeros((n, len(self.subs)), dtype=np.uint8)
            for j, s in enumerate(self.subs):
                subs[:, j] = s.sampled(tr, active, now)
            m, self.chosen = _k.composite_admit(subs, np.ascontiguousarray(tr.span_count),
                                                active.view(np.uint8), self.allocated,
                                                self.used, self.params[
                                                    "max_total_spans_per_second"])
        d = np.where(m, _SAMPLED, _NOT_SAMPLED).astype(np.int8)
        d[~active] = _UNSET
        return d


@dataclass
class _Outcome:
    keep: np.ndarray      # bool per trace
    policy: np.ndarray    # int16: deciding top-level policy (or -1)
    sub: np.ndarray       # int16: composite sub-policy that sampled (or -1)
    prob: np.ndarray      # float64: probability of being kept (NaN unknown)


class _Engine:
    """The compiled policy list of a TailSampler."""

    def __init__(self, cfg: TailSamplingConfig) -> None:
        self.rule = cfg.rule
        self.first_match = cfg.sample_on_first_match
        self.leaves: list[_Node] = []
        self.nodes = [_Node(p, self) for p in cfg.policies]
        # Policies without a stateful part anywhere can be evaluated again
        # without side effects (no tokens spent), to learn a probability.
        self.pure = [not any(x.stateful for x in _walk_nodes(p)) for p in self.nodes]
        # Every probability a kept trace can have (besides unknown), sorted.
        found = {1.0} | {x.prob for p in self.nodes for x in _walk_nodes(p)
                         if not math.isnan(x.prob)}
        self.prob_values = np.array(sorted(found), dtype=np.float64)

    def add_leaf(self, node: _Node) -> int:
        self.leaves.append(node)
        return len(self.leaves) - 1

    # -- per-batch attribute predicates -------------------------------------------------

    def predicates(self, batch: SpanBatch) -> np.ndarray:
        """uint64 per row: bit j set when the row (or its resource) matches leaf j."""
        if not self.leaves:
            return np.empty(0, dtype=np.uint64)
        n = batch.num_rows
        out = np.zeros(n, dtype=np.uint64)
        cache: dict[tuple[str, str, int], pa.Array | None] = {}

        def fetch(key: str, source: str, t: AttrType) -> pa.Array | None:
            ck = (key, source, int(t))
            if ck not in cache:
                arr = batch.attribute(key, source=source, type=t)
                cache[ck] = None if pa.types.is_null(arr.type) or arr.null_count == n else arr
            return cache[ck]

        for leaf in self.leaves:
            m = np.zeros(n, dtype=bool)
            key = leaf.params["key"]
            for source in ("attributes", "resource_attributes"):
                if leaf.type == "string_attribute":
                    arr = fetch(key, source, AttrType.STRING)
                    if arr is not None:
                        m |= _string_hits(arr, leaf.params, leaf.patterns)
                elif leaf.type == "numeric_attribute":
                    for t in (AttrType.INT, AttrType.DOUBLE):
                        arr = fetch(key, source, t)
                        if arr is None:
                            continue
                        ok = pa.array(np.ones(n, dtype=bool))
                        if leaf.params["min_value"] is not None:
                            ok = pc.and_(ok, pc.greater_equal(arr, leaf.params["min_value"]))
                        if leaf.params["max_value"] is not None:
                            ok = pc.and_(ok, pc.less_equal(arr, leaf.params["max_value"]))
                        m |= pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
                else:
                    arr = fetch(key, source, AttrType.BOOL)
                    if arr is not None:
                        ok = pc.fill_null(pc.equal(arr, leaf.params["value"]), False)
                        m |= ok.to_numpy(zero_copy_only=False)
            out[m] |= np.uint64(1) << np.uint64(leaf.bit)
        return out

    # -- decisions -------------------------------------------------------------------

    def decide(self, tr: _Traces, now: float) -> _Outcome:
        n = tr.lo.size
        active = np.ones(n, dtype=bool)
        first = {c: np.full(n, -1, dtype=np.int16)
                 for c in (_NOT_SAMPLED, _SAMPLED, _INV_SAMPLED, _INV_NOT_SAMPLED, _DROPPED)}
        sub = np.full(n, -1, dtype=np.int16)
        certain = np.zeros(n, dtype=bool)       # sampled by a policy with probability 1
        certain_inv = np.zeros(n, dtype=bool)   # the same, by an inverted match
        pmax = np.zeros(n, dtype=np.float64)    # best probability of a random policy
        unknown = np.zeros(n, dtype=bool)       # a stateful or random veto was in play
        # A drop that vetoes at random makes even a certain keep uncertain: the
        # trace was kept only because the veto happened not to hit it.
        vetoed = np.zeros(n, dtype=bool)
        # With sample_on_first_match, traces a policy that is not certain
        # sampled stop there, but had it not sampled them they would have gone
        # on to the later policies: those that would keep them anyway make the
        # keep probability higher (1 for a certain one). `shadow` follows such
        # traces through the later policies for their probability only; the
        # decision is not changed.
        shadow = np.zeros(n, dtype=bool)
        for i, node in enumerate(self.nodes):
            if not active.any() and not shadow.any():
                break
            if shadow.any():
                if self.pure[i]:
                    ds = node.evaluate(tr, shadow, now)
                    if node.prob == 1.0:
                        certain |= ds == _SAMPLED
                    elif not math.isnan(node.prob):
                        hit_s = (ds == _SAMPLED) | (ds == _INV_SAMPLED)
                        pmax = np.where(hit_s, np.maximum(pmax, node.prob), pmax)
                    if node.uncertain_veto:
                        vetoed |= shadow
                    # Past a drop (or an inverted not-sample) those traces would
                    # not have been kept by a later policy.
                    shadow &= (ds != _DROPPED) & (ds != _INV_NOT_SAMPLED)
                else:
                    # A stateful policy would have decided them at random.
                    unknown |= shadow
            if not active.any():
                continue
            d = node.evaluate(tr, active, now)
            for code, arr in first.items():
                sel = (d == code) & (arr < 0)
                arr[sel] = i
            hit = (d == _SAMPLED) | (d == _INV_SAMPLED)
            if node.prob == 1.0:
                certain |= d == _SAMPLED
                certain_inv |= d == _INV_SAMPLED
            elif not math.isnan(node.prob):
                pmax = np.where(hit, np.maximum(pmax, node.prob), pmax)
            if node.stateful or node.uncertain_veto:
                unknown |= active
            if node.uncertain_veto:
                vetoed |= active
            if node.type == "composite":
                sub = np.where(hit & (sub < 0) & (first[_SAMPLED] == i), node.chosen, sub)
            active &= d != _DROPPED
            if self.first_match:
                if node.prob != 1.0:
                    shadow |= active & (d == _SAMPLED)
                active &= d != _SAMPLED
        dropped = first[_DROPPED] >= 0
        inv_not = ~dropped & (first[_INV_NOT_SAMPLED] >= 0)
        sampled = ~dropped & ~inv_not & (first[_SAMPLED] >= 0)
        inv = ~dropped & ~inv_not & ~sampled & (first[_INV_SAMPLED] >= 0) & \
            (first[_NOT_SAMPLED] < 0)
        keep = sampled | inv
        policy = np.where(sampled, first[_SAMPLED],
                          np.where(inv, first[_INV_SAMPLED],
                                   np.where(dropped, first[_DROPPED], -1))).astype(np.int16)
        sub = np.where(sampled, sub, -1).astype(np.int16)
        # An inverted match keeps a trace only while no policy says not sampled,
        # which a stateful policy decides at random.
        certain |= certain_inv & (first[_NOT_SAMPLED] < 0) & ~unknown
        prob = np.where(certain & ~vetoed, 1.0,
                        np.where(unknown | vetoed | (pmax == 0), np.nan, pmax))
        return _Outcome(keep, policy, sub, np.where(keep, prob, np.nan))


def _walk_nodes(node: _Node) -> Iterable[_Node]:
    yield node
    for s in node.subs:
        yield from _walk_nodes(s)


def _string_hits(arr: pa.Array, params: dict,
                 patterns: Sequence[LinearPattern] | None) -> np.ndarray:
    if patterns is not None:
        def match(s: str | None) -> bool:
            return bool(s) and any(p.search(s) for p in patterns)
    else:
        wanted = {v for v in params["values"] if v}

        def match(s: str | None) -> bool:
            return s in wanted
    if isinstance(arr, pa.DictionaryArray):
        hit = np.array([match(s) for s in arr.dictionary.to_pylist()] + [False], dtype=bool)
        idx = arr.indices.to_numpy(zero_copy_only=False)
        if arr.null_count:
            idx = np.where(arr.is_valid().to_numpy(zero_copy_only=False), idx, hit.size - 1)
        return hit[idx.astype(np.intp)]
    return np.array([match(s) for s in arr.to_pylist()], dtype=bool)


# -- the trace table --------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(2, (int(n) - 1).bit_length())


class _TraceTable:
    """Pending traces (slots + hash table), their tids' outcomes, and the decision cache."""

    def __init__(self, num_traces: int, sampled_cache: int, non_sampled_cache: int) -> None:
        cap = _pow2(2 * num_traces)
        self.ht_keys = np.zeros(2 * cap, dtype=np.uint64)
        self.ht_vals = np.full(cap, -1, dtype=np.int32)
        self.slots = np.zeros(num_traces, dtype=_k.TRACE_SLOT_DTYPE)
        self.free = np.arange(num_traces - 1, -1, -1, dtype=np.int32)
        # free_top, next_tid, new traces, cache hits
        self.counters = np.array([num_traces, 0, 0, 0], dtype=np.int64)
        positions = sampled_cache + non_sampled_cache
        dcap = _pow2(2 * positions) if positions else 0
        self.dc_keys = np.zeros(2 * dcap, dtype=np.uint64)
        self.dc_vals = np.full(dcap, -1, dtype=np.int32)
        self.dc_pos_keys = np.zeros(2 * positions, dtype=np.uint64)
        self.dc_info = np.full(positions, -1, dtype=np.int32)
        self.ring_base = np.array([0, sampled_cache], dtype=np.int64)
        self.ring_size = np.array([sampled_cache, non_sampled_cache], dtype=np.int64)
        self.ring_head = np.zeros(2, dtype=np.int64)
        self.tid_info = np.full(_pow2(4 * num_traces), -1, dtype=np.int32)
        self.min_live_tid = 0

    @property
    def pending(self) -> int:
        return len(self.slots) - int(self.counters[0])

    @property
    def next_tid(self) -> int:
        return int(self.counters[1])

    def make_room_for_tids(self, extra: int) -> None:
        need = self.next_tid + extra - self.min_live_tid
        size = len(self.tid_info)
        if need <= size:
            return
        new_size = size
        while new_size < need:
            new_size *= 2
        t = np.arange(self.min_live_tid, self.next_tid, dtype=np.int64)
        grown = np.full(new_size, -1, dtype=np.int32)
        grown[t & (new_size - 1)] = self.tid_info[t & (size - 1)]
        self.tid_info = grown

    def update_min_live(self) -> None:
        pend = self.slots["state"] == _k.SLOT_PENDING
        self.min_live_tid = int(self.slots["tid"][pend].min()) if pend.any() else self.next_tid

    def ingest(self, ids, is_root, start, end, status, pred, now, row0, tags) -> int:
        return _k.tail_ingest(ids, is_root, start, end, status, pred, now, row0,
                              self.ht_keys, self.ht_vals, self.slots, self.free,
                              self.counters, self.dc_keys, self.dc_vals, self.dc_info,
                              self.tid_info, tags)

    def retire(self, slot_ids: np.ndarray, infos: np.ndarray, keep: np.ndarray) -> None:
        _k.tail_retire(slot_ids.astype(np.int32), infos.astype(np.int32),
                       keep.astype(np.uint8), self.ht_keys, self.ht_vals, self.slots,
                       self.free, self.counters, self.dc_keys, self.dc_vals,
                       self.dc_pos_keys, self.dc_info, self.ring_base, self.ring_size,
                       self.ring_head, self.tid_info)

    def cached_info(self, ids: np.ndarray) -> np.ndarray:
        """The cached outcome info of each trace id (-1 if not cached)."""
        if self.dc_vals.size == 0:
            return np.full(len(ids), -1, dtype=np.int32)
        pos = _k.table_lookup(self.dc_keys, self.dc_vals, ids)
        return np.where(pos >= 0, self.dc_info[np.maximum(pos, 0)], -1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ht_keys, self.ht_vals, self.slots, self.free,
                                      self.dc_keys, self.dc_vals, self.dc_pos_keys,
                                      self.dc_info, self.tid_info))


# -- the sampler ------------------------------------------------------------------------


class _Segment:
    """Held rows of one input batch: the rows, their tids, which are still held."""

    __slots__ = ("live", "n_live", "rb", "tags")

    def __init__(self, rb: pa.RecordBatch, tags: np.ndarray) -> None:
        self.rb = rb
        self.tags = tags
        self.live: np.ndarray | None = None   # None: every row
        self.n_live = rb.num_rows



class TailSampler:
    """Tail sampling as a pipeline stage (``process`` / ``poll`` / ``flush``).

    ``process(batch)`` holds the batch's spans and returns, as a
    :class:`~knhk.StageResult`, the spans released by decisions made so far
    (rows of earlier batches included). ``flush()`` decides every pending
    trace and returns what it releases. ``clock`` (seconds, monotonic) times
    the timeouts; tests pass a fake one.

    ``sample_mask(batch)`` and ``should_sample(span)`` decide offline: each
    trace in the batch (or the one span) is taken as complete.

    Examples
    --------
    >>> import knhk
    >>> s = TailSampler(TailSamplingConfig([Policy.latency("slow", threshold_ms=1)]))
    >>> s.sample_mask(knhk.SpanBatch.from_spans([
    ...     knhk.Span("a", trace_id=1, span_id=1, duration_ns=5_000_000),
    ...     knhk.Span("b", trace_id=2, span_id=2, duration_ns=10)])).tolist()
    [True, False]
    """

    def __init__(self, config: TailSamplingConfig, *,
                 clock: Callable[[], float] | None = None) -> None:
        if not isinstance(config, TailSamplingConfig):
            raise ValueError(f"TailSampler takes a TailSamplingConfig, got "
                             f"{type(config).__name__}.")
        self.config = config
        self._clock = clock or time.monotonic
        self._engine = _Engine(config)
        self._table = _TraceTable(config.num_traces, config.sampled_cache_size,
                                  config.non_sampled_cache_size)
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._held_rows = 0          # rows held in segments, not yet released or dropped
        self._retired_rows = 0       # of those, rows of decided traces
        self._last_sweep: float | None = None
        self._early_chunk = max(1, config.num_traces // 64)
        # Outcome infos, interned: (keep, policy, sub, prob or None) -> id.
        self._info_ids: dict[tuple, int] = {}
        self._info_keep = np.zeros(0, dtype=bool)
        self._info_policy = np.zeros(0, dtype=np.int16)
        self._info_sub = np.zeros(0, dtype=np.int16)
        self._info_prob = np.zeros(0, dtype=np.float64)
        self._drop_early_info = self._intern(False, -1, -1, math.nan)
        self._names = [n.name for n in self._engine.nodes]
        self._sub_names = [s.name for node in self._engine.nodes for s in node.subs]
        self._sub_offset = np.cumsum([0] + [len(node.subs) for node in self._engine.nodes])
        self._stats = dict.fromkeys(
            ("spans_received", "traces_sampled", "traces_not_sampled", "spans_sampled",
             "spans_not_sampled", "traces_decided_early", "traces_dropped_early",
             "traces_dropped_on_shutdown", "late_spans_sampled", "late_spans_not_sampled"), 0)
        self._by_policy = dict.fromkeys(self._names, 0)
        self._pending_delta: dict[str, int] = {}

    # -- outcome infos -----------------------------------------------------------

    def _intern(self, keep: bool, policy: int, sub: int, prob: float) -> int:
        key = (bool(keep), int(policy), int(sub), None if math.isnan(prob) else float(prob))
        i = self._info_ids.get(key)
        if i is None:
            i = len(self._info_ids)
            self._info_ids[key] = i
            self._info_keep = np.append(self._info_keep, key[0])
            self._info_policy = np.append(self._info_policy, np.int16(policy))
            self._info_sub = np.append(self._info_sub, np.int16(sub))
            self._info_prob = np.append(self._info_prob, prob)
        return i

    def _infos_for(self, out: _Outcome) -> np.ndarray:
        n = out.keep.size
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        probs = self._engine.prob_values
        pidx = np.searchsorted(probs, out.prob)
        pidx[np.isnan(out.prob)] = probs.size
        npol = len(self._engine.nodes) + 1
        nsub = max((len(x.subs) for x in self._engine.nodes), default=0) + 1
        code = ((out.keep.astype(np.int64) * npol + (out.policy + 1)) * nsub
                + (out.sub + 1)) * (probs.size + 1) + pidx
        uniq, inverse = np.unique(code, return_inverse=True)
        ids = np.empty(uniq.size, dtype=np.int32)
        for j, c in enumerate(uniq.tolist()):
            rest, pi = divmod(c, probs.size + 1)
            rest, sb = divmod(rest, nsub)
            keep, pol = divmod(rest, npol)
            ids[j] = self._intern(bool(keep), pol - 1, sb - 1,
                                  math.nan if pi == probs.size else float(probs[pi]))
        return ids[inverse.reshape(n)]

    # -- the stage -----------------------------------------------------------------

    def process(self, batch: SpanBatch) -> StageResult:
        """Hold ``batch``'s spans; return the spans that decisions release now."""
        batch = as_batch(batch)
        with self._lock:
            released: list[tuple[pa.RecordBatch, np.ndarray]] = []
            now = self._clock()
            self._ingest(batch, now, released)
            self._sweep_if_due(now, released)
            out = self._emit(released)
            counters, self._pending_delta = self._pending_delta, {}
        return StageResult(out, counters=counters)

    def poll(self) -> SpanBatch:
        """Decide the traces whose time has come (without new input); return what is released."""
        with self._lock:
            released: list[tuple[pa.RecordBatch, np.ndarray]] = []
            self._sweep_if_due(self._clock(), released)
            return self._emit(released)

    def flush(self) -> SpanBatch:
        """Decide (or, with ``drop_pending_traces_on_shutdown``, drop) every pending trace."""
        with self._lock:
            released: list[tuple[pa.RecordBatch, np.ndarray]] = []
            now = self._clock()
            slots = self._pending_slots_by_age()
            if slots.size:
                if self.config.drop_pending_traces_on_shutdown:
                    self._stats["traces_dropped_on_shutdown"] += int(slots.size)
                    self._retire_dropped(slots)
                else:
                    self._decide(slots, now)
            self._scan(released)
            self._last_sweep = now
            return self._emit(released)

    def shutdown(self) -> None:
        """Nothing to release beyond :meth:`flush`; kept for the stage lifecycle."""

    def pop_counters(self) -> dict[str, int]:
        """Counters not yet reported in a StageResult (those of ``poll`` and ``flush``).

        ``process`` reports its own and any earlier ones; after ``flush`` a
        pipeline reads the rest here (``sampled_out``: spans dropped by
        decisions; ``tail_traces_decided_early`` / ``tail_traces_dropped_early``).
        """
        with self._lock:
            out, self._pending_delta = self._pending_delta, {}
            return out

    # -- offline decisions -----------------------------------------------------------

    def sample_mask(self, batch: SpanBatch) -> np.ndarray:
        """Decide every trace of ``batch`` now, taking each as complete; a mask per row.

        Pending state is untouched; stateful policies (``rate_limiting``,
        ``composite``) spend their budget as for held traces.
        """
        batch = as_batch(batch)
        n = batch.num_rows
        if n == 0:
            return np.zeros(0, dtype=bool)
        ids = trace_id_matrix(batch.column("trace_id"))
        n_traces = len(np.unique(ids.view(np.dtype((np.void, 16))).ravel()))
        table = _TraceTable(n_traces, 0, 0)
        tags = np.empty(n, dtype=np.int64)
        now = self._clock()
        cols = self._columns(batch)
        pred = self._engine.predicates(batch)
        with self._lock:
            table.ingest(ids, *cols, pred, now, 0, tags)
            slots = np.flatnonzero(table.slots["state"] == _k.SLOT_PENDING)
            out = self._engine.decide(_Traces.from_slots(table.slots[slots]), now)
        keep_by_tid = np.zeros(table.next_tid, dtype=bool)
        keep_by_tid[table.slots["tid"][slots]] = out.keep
        return keep_by_tid[tags]

    def should_sample(self, span: Any) -> Any:
        """The decision for one span taken as a whole trace (see :meth:`sample_mask`)."""
        from knhk.sampling import SamplingDecision

        return SamplingDecision(int(self.sample_mask(SpanBatch.from_spans([span]))[0]))

    def decision_for(self, trace_id: bytes | str | int) -> tuple[bool, str | None] | None:
        """``(kept, deciding policy name)`` for a decided trace still in the cache, else None."""
        from knhk.schema import Span

        tid = Span("x", trace_id=trace_id, span_id=1).trace_id
        ids = np.frombuffer(tid, dtype=np.uint8).reshape(1, 16)
        with self._lock:
            info = int(self._table.cached_info(ids)[0])
            if info < 0:
                return None
            p = int(self._info_policy[info])
            return bool(self._info_keep[info]), (self._names[p] if p >= 0 else None)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _columns(batch: SpanBatch) -> tuple:
        rb = batch.record_batch
        is_root = rb.column("parent_span_id").is_null().to_numpy(zero_copy_only=False)
        return (is_root.view(np.uint8), rb.column("start_time_ns").to_numpy(),
                rb.column("end_time_ns").to_numpy(), rb.column("status_code").to_numpy())

    def _ingest(self, batch: SpanBatch, now: float, released: list) -> None:
        n = batch.num_rows
        if n == 0:
            return
        table = self._table
        self._stats["spans_received"] += n
        if table.next_tid + n - table.min_live_tid > len(table.tid_info) and \
                self._retired_rows:
            self._scan(released)
        table.make_room_for_tids(n)
        rb = batch.record_batch
        ids = trace_id_matrix(rb.column("trace_id"))
        cols = self._columns(batch)
        pred = self._engine.predicates(batch)
        tags = np.empty(n, dtype=np.int64)
        row = 0
        while True:
            row = table.ingest(ids, *cols, pred, now, row, tags)
            if row >= n:
                break
            self._make_room(now, n - row)
        late = tags < 0
        if late.any():
            info = (-1 - tags[late]).astype(np.int32)
            keep = self._info_keep[info]
            if keep.any():
                idx = np.flatnonzero(late)[keep]
                released.append((rb.take(pa.array(idx)), info[keep]))
            self._stats["late_spans_sampled"] += int(keep.sum())
            dropped = int((~keep).sum())
            self._stats["late_spans_not_sampled"] += dropped
            self._count("sampled_out", dropped)
            rb = rb.filter(pa.array(~late))
            tags = tags[~late]
        if rb.num_rows:
            self._segments.append(_Segment(rb, tags))
            self._held_rows += rb.num_rows
        # Rows of traces decided early wait for a scan; keep them a bounded share.
        if self._retired_rows and 2 * self._retired_rows >= self._held_rows:
            self._scan(released)

    def _count(self, name: str, n: int) -> None:
        if n:
            self._pending_delta[name] = self._pending_delta.get(name, 0) + n

    def _pending_slots_by_age(self) -> np.ndarray:
        slots = self._table.slots
        idx = np.flatnonzero(slots["state"] == _k.SLOT_PENDING)
        return idx[np.argsort(slots["tid"][idx], kind="stable")]

    def _make_room(self, now: float, rows_left: int) -> None:
        """Free slots by deciding (or dropping) the oldest pending traces early."""
        slots = self._table.slots
        idx = np.flatnonzero(slots["state"] == _k.SLOT_PENDING)
        k = min(idx.size, max(1, min(rows_left, self._early_chunk)))
        tids = slots["tid"][idx]
        if k < idx.size:
            part = np.argpartition(tids, k - 1)[:k]
            idx = idx[part]
            tids = tids[part]
        idx = idx[np.argsort(tids, kind="stable")]
        if self.config.on_full == "drop":
            self._stats["traces_dropped_early"] += int(idx.size)
            self._count("tail_traces_dropped_early", int(idx.size))
            self._retire_dropped(idx)
        else:
            self._stats["traces_decided_early"] += int(idx.size)
            self._count("tail_traces_decided_early", int(idx.size))
            self._decide(idx, now)

    def _retire_dropped(self, idx: np.ndarray) -> None:
        slots = self._table.slots
        self._retired_rows += int(slots["span_count"][idx].sum())
        infos = np.full(idx.size, self._drop_early_info, dtype=np.int32)
        self._stats["traces_not_sampled"] += int(idx.size)
        self._table.retire(idx, infos, np.zeros(idx.size, dtype=bool))

    def _decide(self, idx: np.ndarray, now: float) -> None:
        if idx.size == 0:
            return
        slots = self._table.slots
        facts = slots[idx]
        out = self._engine.decide(_Traces.from_slots(facts), now)
        infos = self._infos_for(out)
        self._retired_rows += int(facts["span_count"].sum())
        kept = int(out.keep.sum())
        self._stats["traces_sampled"] += kept
        self._stats["traces_not_sampled"] += idx.size - kept
        for p, c in zip(*np.unique(out.policy[out.keep], return_counts=True), strict=True):
            self._by_policy[self._names[int(p)]] += int(c)
        self._table.retire(idx, infos, out.keep)

    def _sweep_if_due(self, now: float, released: list) -> None:
        if self._last_sweep is not None and now - self._last_sweep < self.config.tick_interval:
            return
        self._last_sweep = now
        s = self._table.slots
        pend = s["state"] == _k.SLOT_PENDING
        if pend.any():
            due = pend & (((s["root_seen"] != 0) & (now - s["last_seen"]
                                                    >= self.config.idle_timeout))
                          | (now - s["first_seen"] >= self.config.decision_wait))
            idx = np.flatnonzero(due)
            self._decide(idx[np.argsort(s["tid"][idx], kind="stable")], now)
        if self._retired_rows:
            self._scan(released)

    def _scan(self, released: list) -> None:
        """Move the rows of decided traces out of the held segments."""
        table = self._table
        mask = len(table.tid_info) - 1
        kept_segments: list[_Segment] = []
        held = 0
        for seg in self._segments:
            info = table.tid_info[seg.tags & mask]
            decided = info >= 0
            if seg.live is not None:
                decided &= seg.live
            n_decided = int(np.count_nonzero(decided))
            if n_decided:
                keep = decided & self._info_keep[np.maximum(info, 0)]
                n_keep = int(np.count_nonzero(keep))
                if n_keep:
                    released.append((seg.rb.filter(pa.array(keep)), info[keep]))
                self._stats["spans_not_sampled"] += n_decided - n_keep
                self._count("sampled_out", n_decided - n_keep)
                seg.live = ~decided if seg.live is None else seg.live & ~decided
                seg.n_live -= n_decided
            if seg.n_live == 0:
                continue
            # Rows are copied out of a segment only when most of it is gone, so a
            # row is copied a bounded number of times however often scans run.
            if seg.live is not None and 2 * seg.n_live <= seg.rb.num_rows:
                seg = _Segment(seg.rb.filter(pa.array(seg.live)), seg.tags[seg.live])
            kept_segments.append(seg)
            held += seg.n_live
        if len(kept_segments) > 64 and all(g.live is None for g in kept_segments):
            merged = pa.Table.from_batches([g.rb for g in kept_segments]).combine_chunks()
            kept_segments = [_Segment(merged.to_batches()[0],
                                      np.concatenate([g.tags for g in kept_segments]))]
        self._segments = kept_segments
        self._held_rows = held
        self._retired_rows = 0
        table.update_min_live()

    def _emit(self, released: list) -> SpanBatch:
        if not released:
            return SpanBatch.empty()
        rbs = [r for r, _ in released if r.num_rows]
        if not rbs:
            return SpanBatch.empty()
        info = np.concatenate([i for r, i in released if r.num_rows]).astype(np.intp)
        rb = SpanBatch.concat(rbs).record_batch
        self._stats["spans_sampled"] += rb.num_rows
        if self.config.record_probability:
            rb = annotate(rb, info, self._info_prob, self.config.rule)
        if self.config.record_policy:
            pol = self._info_policy[info]
            rb = _append_string_attribute(rb, "tailsampling.policy", pol, self._names)
            sub = self._info_sub[info]
            if (sub >= 0).any():
                codes = np.where(sub >= 0, self._sub_offset[np.maximum(pol, 0)] + sub, -1)
                rb = _append_string_attribute(rb, "tailsampling.composite_policy", codes,
                                              self._sub_names)
        return SpanBatch._wrap(rb)

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: spans and traces held, decided, sampled, decided early, late spans."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["traces_received"] = int(self._table.counters[2])
            out["traces_pending"] = self._table.pending
            out["spans_held"] = self._held_rows
            out["spans_pending"] = self._held_rows - self._retired_rows
            out["policy_sampled_traces"] = dict(self._by_policy)
            out["decision_cache_entries"] = int((self._table.dc_info >= 0).sum())
            seg = sum(g.rb.nbytes + g.tags.nbytes for g in self._segments)
            out["bytes_held_spans"] = seg
            out["bytes_state"] = self._table.nbytes
            return out


def _append_string_attribute(rb: pa.RecordBatch, key: str, codes: np.ndarray,
                             names: Sequence[str]) -> pa.RecordBatch:
    """``rb`` with string attribute ``key`` = ``names[codes[row]]`` added where codes >= 0."""
    add = np.asarray(codes) >= 0
    if not add.any():
        return rb
    i = rb.schema.get_field_index("attributes")
    col = rb.column(i)
    n = len(col)
    offsets = col.offsets.to_numpy().astype(np.int64)
    old_len = np.diff(offsets)
    new_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(old_len + add, out=new_off[1:])
    n_new = int(add.sum())
    total = int(new_off[-1])
    values = col.values
    items = pa.StructArray.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_new, np.int32)), pa.array([key])),
         pa.array(np.full(n_new, int(AttrType.STRING), np.int8)),
         pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes)[add].astype(np.int32)),
                                        pa.array(list(names), type=pa.string())),
         pa.nulls(n_new, pa.int64()), pa.nulls(n_new, pa.float64()),
         pa.nulls(n_new, pa.bool_()), pa.nulls(n_new, pa.binary()),
         pa.nulls(n_new, pa.binary())],
        fields=list(ATTRIBUTE_STRUCT))
    is_new = np.zeros(total, dtype=bool)
    is_new[(new_off[:-1] + old_len)[add]] = True
    take = np.empty(total, dtype=np.int64)
    take[~is_new] = offsets[0] + np.arange(offsets[-1] - offsets[0])
    take[is_new] = len(values) + np.arange(n_new)
    merged = pa.concat_arrays([values, items]).take(pa.array(take))
    lists = pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), merged,
                                     type=ATTRIBUTES_TYPE)
    cols = list(rb.columns)
    cols[i] = lists
    return pa.RecordBatch.from_arrays(cols, schema=rb.schema)

