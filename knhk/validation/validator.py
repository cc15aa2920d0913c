"""WeaverValidator: check spans and metric points against a semantic-convention registry.

The registry is compiled once into lookup tables (:mod:`.compiled`). A batch is
checked as column operations: the batch's attribute-key dictionary is mapped
to registry key ids once (dictionary size, not row count), then one compiled
pass (``knhk._core._validate``) over the flattened attribute lists classifies
every attribute and checks every row's matched group for the attributes its
requirement levels ask for. Findings carry Weaver live-check's ids and levels
(``missing_attribute``, ``type_mismatch``, ``deprecated``,
``required_attribute_not_present``, ``not_stable``, ``undefined_enum_variant``,
``template_attribute``, ``missing_metric``, ``unit_mismatch``,
``unexpected_instrument``, ...), so a knhk report compares one to one with
``weaver registry live-check``.

Spans are matched to a group by name (a span named like a span group's id, as
in ``validate_span("workflow.execute", ...)``), by an explicit
``span_groups={name or glob: group id}`` mapping, and -- whatever their name --
every attribute is checked against the registry on its own (live-check's
mode). Metric points are matched by metric name.

Example
-------
>>> import knhk
>>> from knhk.validation import WeaverValidator
>>> v = WeaverValidator("registry/")
>>> r = v.validate_span("workflow.execute", {"workflow.id": "w-1"})
>>> r.is_valid(), [f.id for f in r.violations]
(False, ['required_attribute_not_present'])
>>> batch = knhk.SpanBatch.from_spans([knhk.Span(
...     "workflow.execute", trace_id=1, span_id=1, attributes={"workflow.id": "w-1"})])
>>> report = v.validate_batch(batch)            # vectorized
>>> int(report.invalid.sum())                   # a per-row mask
1
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from knhk import _attributes
from knhk._build import load_core
from knhk.batch import MetricBatch, SpanBatch
from knhk.errors import RegistryError, SchemaError
from knhk.schema import ATTRIBUTES_TYPE, METRIC_SCHEMA, SPAN_SCHEMA
from knhk.validation import compiled as C
from knhk.validation.compiled import CompiledRegistry, load_compiled
from knhk.validation.loader import signature
from knhk.validation.model import Registry

#: span/metric names kept in stats() (most violated first)
_MAX_NAMES = 4096

logger = logging.getLogger(__name__)

__all__ = [
    "BatchValidationReport",
    "Finding",
    "FindingId",
    "FindingLevel",
    "ValidationAction",
    "ValidationPolicy",
    "ValidationResult",
    "ValidationStage",
    "ValidationStats",
    "WeaverValidator",
]

_kernel = load_core("_validate")


class FindingLevel(enum.IntEnum):
    """Weaver's finding levels, ordered: information < improvement < violation."""

    INFORMATION = 1
    IMPROVEMENT = 2
    VIOLATION = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, value: Any) -> FindingLevel:
        """A level from a :class:`FindingLevel`, its number or its name."""
        if isinstance(value, FindingLevel):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3:
            return cls(value)
        raise ValueError(
            f"A finding level is 'violation', 'improvement' or 'information', got {value!r}.")


class FindingId(enum.StrEnum):
    """The finding ids knhk reports: Weaver live-check's, plus ``invalid_attribute_value``
    (a value knhk cannot read: a malformed array, a bad type tag)."""

    MISSING_ATTRIBUTE = "missing_attribute"
    TYPE_MISMATCH = "type_mismatch"
    DEPRECATED = "deprecated"
    NOT_STABLE = "not_stable"
    UNDEFINED_ENUM_VARIANT = "undefined_enum_variant"
    TEMPLATE_ATTRIBUTE = "template_attribute"
    INVALID_ATTRIBUTE_VALUE = "invalid_attribute_value"
    REQUIRED_ATTRIBUTE_NOT_PRESENT = "required_attribute_not_present"
    CONDITIONALLY_REQUIRED_ATTRIBUTE_NOT_PRESENT = "conditionally_required_attribute_not_present"
    RECOMMENDED_ATTRIBUTE_NOT_PRESENT = "recommended_attribute_not_present"
    OPT_IN_ATTRIBUTE_NOT_PRESENT = "opt_in_attribute_not_present"
    MISSING_METRIC = "missing_metric"
    UNIT_MISMATCH = "unit_mismatch"
    UNEXPECTED_INSTRUMENT = "unexpected_instrument"
    MISSING_EVENT = "missing_event"


_CODE_LEVEL = np.array(C.CODE_LEVELS, dtype=np.int8)
_LEVEL_MASK = {lv: sum(1 << c for c, lvl in enumerate(C.CODE_LEVELS) if lvl == lv)
               for lv in (1, 2, 3)}
_VIOLATION_CODES = [c for c, lvl in enumerate(C.CODE_LEVELS) if lvl == 3]
_ALL_CODES = (1 << C.N_CODES) - 1


@dataclass(frozen=True)
class Finding:
    """One piece of advice, in the shape of Weaver's ``PolicyFinding``.

    ``row`` is the batch row (None for a per-event result); ``attribute_key``
    the attribute it is about, if any.
    """

    id: str
    level: FindingLevel
    message: str
    context: dict
    signal_type: str | None = None
    signal_name: str | None = None
    row: int | None = None
    attribute_key: str | None = None

    def to_dict(self) -> dict:
        """Weaver's JSON form: ``{id, level, message, context, signal_type, signal_name}``."""
        return {"id": self.id, "level": self.level.label, "message": self.message,
                "context": self.context, "signal_type": self.signal_type,
                "signal_name": self.signal_name}


class ValidationResult:
    """The findings for one span, metric point or set of attributes.

    ``violations`` are the findings at level violation; :meth:`is_valid` is
    true when there are none. ``group`` is the id of the registry group the
    event was matched to (None when it was checked attribute by attribute).
    """

    __slots__ = ("findings", "group", "signal_name", "signal_type")

    def __init__(self, findings: list[Finding], group: str | None = None,
                 signal_type: str | None = None, signal_name: str | None = None) -> None:
        self.findings = findings
        self.group = group
        self.signal_type = signal_type
        self.signal_name = signal_name

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.level is FindingLevel.VIOLATION]

    def is_valid(self) -> bool:
        return not any(f.level is FindingLevel.VIOLATION for f in self.findings)

    @property
    def highest_level(self) -> FindingLevel | None:
        return max((f.level for f in self.findings), default=None)

    def by_id(self) -> dict[str, int]:
        return dict(Counter(f.id for f in self.findings))

    def to_dict(self) -> dict:
        """Weaver's ``live_check_result``: ``{all_advice, highest_advice_level}``."""
        hl = self.highest_level
        return {"all_advice": [f.to_dict() for f in self.findings],
                "highest_advice_level": hl.label if hl is not None else None}

    def __repr__(self) -> str:
        return (f"ValidationResult({len(self.findings)} findings, "
                f"{len(self.violations)} violations, group={self.group!r})")


@dataclass
class ValidationStats:
    """``WeaverValidator.stats()``: what the validator has seen since it was built
    (or since ``reset_stats``)."""

    total_validations: int = 0
    total_violations: int = 0
    violations_by_type: dict[str, int] = field(default_factory=dict)
    most_violated_spans: list[tuple[str, int]] = field(default_factory=list)
    invalid_events: int = 0
    total_findings: int = 0
    findings_by_type: dict[str, int] = field(default_factory=dict)
    batches_validated: int = 0
    reloads: int = 0
    last_reload_error: str | None = None


# -- Arrow helpers ------------------------------------------------------------------------


def _raw(arr: pa.Array, dtype: Any) -> np.ndarray:
    """The values buffer of a fixed-width Arrow array as NumPy, ignoring validity."""
    buf = arr.buffers()[1]
    n = len(arr)
    if buf is None or n == 0:
        return np.zeros(n, dtype=dtype)
    return np.frombuffer(buf, dtype=dtype, count=arr.offset + n)[arr.offset:]


def _bitmap(arr: pa.Array) -> tuple[np.ndarray, int]:
    if arr.null_count == 0 or arr.buffers()[0] is None:
        return _EMPTY_U8, 0
    return np.frombuffer(arr.buffers()[0], dtype=np.uint8), arr.offset


_EMPTY_U8 = np.zeros(0, dtype=np.uint8)
_EMPTY_I32 = np.zeros(0, dtype=np.int32)


def _dict_parts(arr: pa.Array, name: str) -> tuple[pa.Array, pa.Array]:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not isinstance(arr, pa.DictionaryArray):
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_null(arr.type)):
            raise SchemaError(f"column {name!r}: expected strings, got {arr.type}")
        arr = arr.cast(pa.string()).dictionary_encode()
    return arr.dictionary, arr.indices


def _child(values: pa.StructArray, name: str) -> pa.Array:
    try:
        return values.field(name)
    except KeyError:
        raise SchemaError(f"attribute struct has no field {name!r}; expected "
                          f"{ATTRIBUTES_TYPE}") from None


# -- the registry state a validator swaps on reload -----------------------------------------


class _State:
    """A compiled registry plus the kernel tables for one set of enabled checks."""

    def __init__(self, compiled: CompiledRegistry, enabled: int) -> None:
        self.compiled = compiled
        self.enabled = enabled
        code = compiled.rq_code.astype(np.int64)
        keep = ((np.int64(1) << code) & enabled) != 0
        cum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)]).astype(np.int32)
        rq_off = cum[compiled.rq_off] if compiled.rq_off.size else np.zeros(1, np.int32)
        self.rq_count = np.diff(rq_off).astype(np.int64)
        # Findings a row gets for being matched to a group: the signal's own
        # deprecation and stability (attribute groups are not signals).
        g_sig = np.zeros(compiled.num_groups, dtype=np.uint32)
        for gi, (gtype, dep, stab) in enumerate(zip(
                compiled.group_type, compiled.group_deprecated, compiled.group_stability,
                strict=True)):
            if gtype == "attribute_group":
                continue
            if dep is not None:
                g_sig[gi] |= 1 << C.C_SIGNAL_DEPRECATED
            if stab != "stable":
                g_sig[gi] |= 1 << C.C_SIGNAL_NOT_STABLE
        self.tables = _kernel.RegistryTables(
            compiled.decl, compiled.flags, compiled.es_off, compiled.es_vals,
            compiled.ei_off, compiled.ei_vals, np.ascontiguousarray(rq_off, dtype=np.int32),
            np.ascontiguousarray(compiled.rq_kid[keep]),
            np.ascontiguousarray(compiled.rq_code[keep]), g_sig & np.uint32(enabled),
            _CODE_LEVEL, enabled)
        g = compiled.num_groups
        kind_code = {v: k for k, v in C.INSTRUMENT_OF_KIND.items()}
        self.g_instrument = np.array([kind_code.get(i, 0) for i in compiled.group_instrument],
                                     dtype=np.int8) if g else np.zeros(0, np.int8)


# -- one list column through the kernel -----------------------------------------------------


@dataclass
class _Lists:
    """The kernel's outputs for one attribute-list column, and what is needed to
    turn them into findings later."""

    source: str
    offsets: np.ndarray
    values: pa.StructArray | None
    key_dict: Any
    key_idx: np.ndarray
    key_map: np.ndarray
    entry_bits: np.ndarray
    row_bits: np.ndarray
    row_level: np.ndarray
    row_viol: np.ndarray
    counts: np.ndarray
    miss_row: np.ndarray
    miss_kid: np.ndarray
    miss_code: np.ndarray
    n_invalid: int = 0
    key_viol: np.ndarray | None = None
    py_values: list | None = None      # the per-event path keeps the Python values
    py_errors: dict | None = None      # entry -> why the value could not be read


def _check_lists(state: _State, lists: pa.Array, row_group: np.ndarray, source: str,
                 row_key: np.ndarray = None, n_keys: int = 0) -> _Lists:
    compiled = state.compiled
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    if not pa.types.is_list(lists.type) or not pa.types.is_struct(lists.type.value_type):
        raise SchemaError(f"column {source!r}: expected {ATTRIBUTES_TYPE}, got {lists.type}")
    offsets = np.ascontiguousarray(lists.offsets.to_numpy(), dtype=np.int32)
    values = lists.values
    m = len(values)
    key_dict, key_ind = _dict_parts(_child(values, "key"), f"{source}.key")
    key_idx = _raw(key_ind, np.int32)
    key_map = compiled.map_keys(key_dict)
    if key_ind.null_count:
        # A null key is not an attribute knhk can name: point it past the dictionary,
        # which the kernel reports as an invalid value.
        key_idx = np.where(np.asarray(key_ind.is_valid()), key_idx, len(key_map)).astype(
            np.int32)
    type_child = _child(values, "type")
    tags = _raw(type_child, np.int8)
    if type_child.null_count:
        tags = np.where(np.asarray(type_child.is_valid()), tags, -1).astype(np.int8)
    str_dict, str_ind = _dict_parts(_child(values, "str"), f"{source}.str")
    str_idx = _raw(str_ind, np.int32)
    str_valid, str_voff = _bitmap(str_ind)
    int_child = _child(values, "int")
    ints = _raw(int_child, np.int64)
    int_valid, int_voff = _bitmap(int_child)
    any_child = _child(values, "any")
    bufs = any_child.buffers()
    if bufs[1] is None:
        any_off = np.zeros(m + 1, dtype=np.int32)
    else:
        any_off = np.frombuffer(bufs[1], dtype=np.int32,
                                count=any_child.offset + m + 1)[any_child.offset:]
    any_data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else _EMPTY_U8

    # A small string dictionary is mapped to enum value ids up front (the kernel then
    # checks enum members inline); a large one only where the kernel saw an enum.
    str_vid = None
    if compiled.enum_vocab and len(str_dict) <= max(4096, m // 16):
        str_vid = compiled.map_enum_values(str_dict, None)
    res = _run_kernel(state, offsets, key_idx, key_map, tags, str_idx, str_valid, str_voff,
                      ints, int_valid, int_voff, any_off, any_data, row_group, m,
                      len(str_dict), lambda used: compiled.map_enum_values(str_dict, used),
                      row_key, n_keys, str_vid)
    return _Lists(source, offsets, values, key_dict, key_idx, key_map, *res)


def _run_kernel(state: _State, offsets, key_idx, key_map, tags, str_idx, str_valid, str_voff,
                ints, int_valid, int_voff, any_off, any_data, row_group, m: int, n_str: int,
                map_strings: Callable[[np.ndarray], np.ndarray], row_key: np.ndarray = None,
                n_keys: int = 0, str_vid: np.ndarray | None = None) -> tuple:
    n = len(offsets) - 1
    entry_bits = np.zeros(m, dtype=np.uint8)
    row_bits = np.empty(n, dtype=np.uint32)
    row_level = np.empty(n, dtype=np.int8)
    row_viol = np.empty(n, dtype=np.int32)
    counts = np.zeros(C.N_CODES, dtype=np.int64)
    # Capacities are upper bounds; np.empty does not touch the pages it is not written to.
    enum_pos = np.empty(max(m, 1), dtype=np.int32)
    enum_row = np.empty(max(m, 1), dtype=np.int32)
    str_used = np.zeros(n_str, dtype=np.uint8)
    cap = 0
    if state.rq_count.size and n:
        matched = row_group[row_group >= 0] if row_group.size < 4096 else None
        cap = (int(state.rq_count[matched].sum()) if matched is not None
               else n * int(state.rq_count.max()))
    miss_row = np.empty(max(cap, 1), dtype=np.int32)
    miss_kid = np.empty(max(cap, 1), dtype=np.int32)
    miss_code = np.empty(max(cap, 1), dtype=np.int8)
    stamp = np.full(state.compiled.num_keys + 1, -1, dtype=np.int32)   # + the spare slot
    if row_key is None:
        row_key = _EMPTY_I32
    key_viol = np.zeros(n_keys if row_key.size else 0, dtype=np.int64)
    if str_vid is None or str_vid.size != n_str or n_str == 0:
        str_vid = _EMPTY_I32
    n_enum, n_miss, n_invalid = _kernel.check_attributes(
        state.tables, offsets, key_idx, key_map, tags, str_idx, str_valid, str_voff, str_vid,
        ints, int_valid, int_voff, any_off, any_data, row_group, row_key, entry_bits, row_bits,
        row_level, row_viol, counts, key_viol, enum_pos, enum_row, str_used, miss_row,
        miss_kid, miss_code, stamp)
    if n_enum:
        str_vid = np.ascontiguousarray(map_strings(str_used), dtype=np.int32)
        _kernel.check_enum_strings(state.tables, n_enum, enum_pos, enum_row, key_idx, key_map,
                                   str_idx, str_vid, entry_bits, row_bits, row_level,
                                   row_viol, counts)
    # Shrink the missing-requirement arrays to what the kernel wrote: realloc keeps the
    # data in place (no copy of what can be millions of entries); nothing else holds
    # a reference to them.
    for arr in (miss_row, miss_kid, miss_code):
        arr.resize(max(n_miss, 0), refcheck=False)
    return (entry_bits, row_bits, row_level, row_viol, counts, miss_row, miss_kid, miss_code,
            n_invalid, key_viol)


# -- the per-event path: Python values into the same kernel --------------------------------


def _classify(value: Any, key: str) -> tuple[int, Any]:
    if isinstance(value, str):
        return 1, value
    if isinstance(value, bool):
        return 2, value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return 3, value
        raise ValueError(f"value {value} does not fit in int64")
    if isinstance(value, float):
        return 4, value
    return _attributes.encode_slow(value, "attributes", key)


def _check_items(state: _State, items: list, group: int, source: str) -> _Lists:
    compiled = state.compiled
    m = len(items)
    keys = []
    tags = np.zeros(m, dtype=np.int8)
    ints = np.zeros(m, dtype=np.int64)
    strs: list[str | None] = [None] * m
    any_parts: list[bytes] = []
    any_off = np.zeros(m + 1, dtype=np.int32)
    py_values = []
    errors: dict[int, str] = {}
    pos = 0
    for i, (key, value) in enumerate(items):
        if not isinstance(key, str):
            raise TypeError(f"attribute keys must be str, got {type(key).__name__} ({key!r})")
        keys.append(key)
        py_values.append(value)
        try:
            tag, payload = _classify(value, key)
        except (TypeError, ValueError) as exc:
            tags[i] = -1
            errors[i] = str(exc)
            any_off[i + 1] = pos
            continue
        tags[i] = tag
        if tag == 1:
            strs[i] = payload
        elif tag == 3:
            ints[i] = payload
        elif tag in (5, 6):
            any_parts.append(payload)
            pos += len(payload)
        any_off[i + 1] = pos
    key_map = np.fromiter((compiled.key_id(k) for k in keys), dtype=np.int32, count=m)
    key_idx = np.arange(m, dtype=np.int32)
    any_data = np.frombuffer(b"".join(any_parts), dtype=np.uint8) if any_parts else _EMPTY_U8
    row_group = np.array([group], dtype=np.int32)
    offsets = np.array([0, m], dtype=np.int32)
    vid_of = compiled.vid_of
    str_vid = np.array([vid_of.get(s, -1) if s is not None else -1 for s in strs],
                       dtype=np.int32)
    res = _run_kernel(
        state, offsets, key_idx, key_map, tags, key_idx, _EMPTY_U8, 0, ints, _EMPTY_U8, 0,
        any_off, any_data, row_group, m, m, lambda used: str_vid, None, 0, str_vid)
    return _Lists(source, offsets, None, keys, key_idx, key_map, *res,
                  py_values=py_values, py_errors=errors)


# -- findings and their messages ---------------------------------------------------------------


def _type_name(value: Any) -> str | None:
    """The type Weaver's live-check infers for a value (sample_attribute.rs infer_type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list):
        kinds = {_type_name(v) for v in value if v is not None}
        if kinds == {"int"}:
            return "int[]"
        if kinds and kinds <= {"int", "double"}:
            return "double[]"
        if len(kinds) == 1 and next(iter(kinds)) in ("string", "boolean"):
            return next(iter(kinds)) + "[]"
        return "any"
    return "any"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class _Messages:
    """Builds :class:`Finding` objects (ids, levels, messages, contexts) for codes."""

    def __init__(self, compiled: CompiledRegistry, signal_type: str | None) -> None:
        self.c = compiled
        self.signal_type = signal_type

    def attribute(self, code: int, key: str | None, kid: int, value: Any, *,
                  signal_name: str | None, row: int | None, error: str | None = None
                  ) -> Finding:
        c = self.c
        ctx: dict[str, Any] = {"attribute_key": key}
        if code == C.C_MISSING_ATTRIBUTE:
            msg = f"Attribute '{key}' does not exist in the registry."
        elif code == C.C_TYPE_MISMATCH:
            expected = c.types[kid]
            if expected.startswith("template["):
                expected = expected[len("template["):-1]
            actual = _type_name(value)
            ctx.update(attribute_type=actual, expected=expected)
            if expected == "enum":
                msg = (f"Enum attribute '{key}' has type '{actual}'. Enum value type should "
                       f"be 'string' or 'int'.")
            else:
                msg = f"Attribute '{key}' has type '{actual}'. Type should be '{expected}'."
        elif code == C.C_DEPRECATED:
            reason, renamed_to, note = c.deprecated[kid]
            ctx.update(deprecation_reason=reason, deprecation_note=note)
            msg = f"Attribute '{key}' is deprecated; reason = '{reason}', note = '{note}'."
            if renamed_to:
                ctx["renamed_to"] = renamed_to
                msg += f" Use '{renamed_to}' instead."
        elif code == C.C_NOT_STABLE:
            ctx["stability"] = c.stability[kid]
            msg = f"Attribute '{key}' is not stable; stability = {c.stability[kid]}."
        elif code == C.C_UNDEFINED_ENUM_VARIANT:
            ctx["attribute_value"] = _jsonable(value)
            msg = (f"Enum attribute '{key}' has value '{value}' which is not documented.")
        elif code == C.C_TEMPLATE_ATTRIBUTE:
            template = c.keys[kid]
            ctx["template_name"] = template
            msg = f"Attribute '{key}' is an instance of the template '{template}'."
        else:  # C_INVALID_VALUE
            why = error or "its value is malformed or its type tag is not a knhk.AttrType"
            ctx["error"] = why
            msg = f"Attribute '{key}' has a value that cannot be read: {why}."
        return Finding(C.CODE_IDS[code], FindingLevel(C.CODE_LEVELS[code]), msg, ctx,
                       self.signal_type, signal_name, row, key)

    def requirement(self, code: int, kid: int, *, signal_name: str | None,
                    row: int | None) -> Finding:
        key = self.c.keys[kid]
        word = {C.C_REQUIRED: "Required", C.C_CONDITIONALLY_REQUIRED: "Conditionally required",
                C.C_RECOMMENDED: "Recommended", C.C_OPT_IN: "Opt-in"}[code]
        return Finding(C.CODE_IDS[code], FindingLevel(C.CODE_LEVELS[code]),
                       f"{word} attribute '{key}' is not present.", {"attribute_key": key},
                       self.signal_type, signal_name, row, key)

    def signal(self, code: int, group: int, *, signal_name: str | None, row: int | None,
               unit: str | None = None, kind: int | None = None) -> Finding:
        c = self.c
        st = self.signal_type or "span"
        noun = {"span": "Span", "metric": "Metric", "event": "Event"}.get(st, "Signal")
        name_key = f"{st}_name" if st in ("metric", "event") else "signal_name"
        ctx: dict[str, Any] = {name_key: signal_name}
        if code == C.C_MISSING_METRIC:
            msg = f"Metric '{signal_name}' does not exist in the registry."
        elif code == C.C_MISSING_EVENT:
            msg = f"Event '{signal_name}' does not exist in the registry."
        elif code == C.C_UNIT_MISMATCH:
            expected = c.group_unit[group]
            ctx = {"unit": unit, "expected": expected}
            msg = f"Unit should be '{expected}', but found '{unit}'."
        elif code == C.C_UNEXPECTED_INSTRUMENT:
            expected = c.group_instrument[group]
            found = C.INSTRUMENT_OF_KIND.get(int(kind or 0), f"kind {kind}")
            ctx = {"instrument": found, "expected": expected}
            msg = f"Instrument should be '{expected}', but found '{found}'."
        elif code == C.C_SIGNAL_DEPRECATED:
            reason, _renamed, note = c.group_deprecated[group]
            ctx.update(deprecation_reason=reason, deprecation_note=note)
            msg = f"{noun} '{signal_name}' is deprecated; reason = '{reason}', note = '{note}'."
        else:  # C_SIGNAL_NOT_STABLE
            stab = c.group_stability[group]
            ctx["stability"] = stab
            msg = f"{noun} '{signal_name}' is not stable; stability = {stab}."
        return Finding(C.CODE_IDS[code], FindingLevel(C.CODE_LEVELS[code]), msg, ctx,
                       self.signal_type, signal_name, row, None)


_SIGNAL_CODES = (C.C_MISSING_METRIC, C.C_MISSING_EVENT, C.C_UNIT_MISMATCH,
                 C.C_UNEXPECTED_INSTRUMENT, C.C_SIGNAL_DEPRECATED, C.C_SIGNAL_NOT_STABLE)


def _value_at(values: pa.StructArray, j: int) -> Any:
    tag = values.field("type")[j].as_py()
    slot = {1: "str", 2: "bool", 3: "int", 4: "double", 7: "bytes", 5: "any", 6: "any"}.get(tag)
    if slot is None:
        return None
    v = values.field(slot)[j].as_py()
    if slot == "any" and v is not None:
        try:
            v = _attributes.decode_any(v)
        except ValueError:
            return None
    return v


# -- the batch report ---------------------------------------------------------------------------


class BatchValidationReport:
    """Per-row findings of one batch, as arrays; findings as objects on demand.

    Attributes
    ----------
    num_rows : rows checked.
    row_level : int8 array, the highest level on each row (0 none, 1 information,
        2 improvement, 3 violation).
    row_bits : uint32 array, one bit per finding code present on each row.
    row_violations : int32 array, violation findings per row.
    invalid : bool array, rows with at least one violation.
    counts : finding id -> number of findings.
    row_group : int32 array, the registry group each row was matched to (-1 none).
    """

    def __init__(self, state: _State, signal_type: str, n: int, lists: list[_Lists],
                 row_bits: np.ndarray, row_level: np.ndarray, row_viol: np.ndarray,
                 counts: np.ndarray, row_group: np.ndarray, names: Any, name_idx: Any,
                 extra: dict | None = None) -> None:
        self._state = state
        self.signal_type = signal_type
        self.num_rows = n
        self._lists = lists
        self.row_bits = row_bits
        self.row_level = row_level
        self.row_violations = row_viol
        self.code_counts = counts
        self.row_group = row_group
        self._names = names
        self._name_idx = name_idx
        self._extra = extra or {}

    @property
    def invalid(self) -> np.ndarray:
        return self.row_level >= FindingLevel.VIOLATION

    def valid_mask(self) -> np.ndarray:
        return self.row_level < FindingLevel.VIOLATION

    @property
    def num_invalid(self) -> int:
        return int(np.count_nonzero(self.invalid))

    @property
    def num_violations(self) -> int:
        return int(self.code_counts[_VIOLATION_CODES].sum())

    @property
    def num_findings(self) -> int:
        return int(self.code_counts.sum())

    def is_valid(self) -> bool:
        return self.num_violations == 0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for code, n in enumerate(self.code_counts.tolist()):
            if n:
                out[C.CODE_IDS[code]] = out.get(C.CODE_IDS[code], 0) + n
        return out

    def level_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for code, n in enumerate(self.code_counts.tolist()):
            if n:
                label = FindingLevel(C.CODE_LEVELS[code]).label
                out[label] = out.get(label, 0) + n
        return out

    def rows_with(self, level: FindingLevel | str) -> np.ndarray:
        """Bool mask of rows with at least one finding at exactly ``level``."""
        mask = _LEVEL_MASK[int(FindingLevel.parse(level))]
        return (self.row_bits & np.uint32(mask)) != 0

    def group_of(self, row: int) -> str | None:
        g = int(self.row_group[row])
        return self._state.compiled.group_ids[g] if g >= 0 else None

    def signal_name(self, row: int) -> str | None:
        if self._names is None:
            return None
        i = self._name_idx[row]
        return self._names[int(i)].as_py() if i >= 0 else None

    # -- findings as objects ----------------------------------------------------------

    def findings(self, row: int | None = None) -> list[Finding]:
        """Findings of ``row``, or of every row (can be many: prefer :meth:`table`)."""
        if row is not None:
            if not 0 <= row < self.num_rows:
                raise IndexError(f"row {row} is outside the batch (0..{self.num_rows - 1})")
            return self._row_findings(row)
        out: list[Finding] = []
        for r in np.flatnonzero(self.row_bits).tolist():
            out.extend(self._row_findings(r))
        return out

    def result(self, row: int) -> ValidationResult:
        return ValidationResult(self.findings(row), self.group_of(row), self.signal_type,
                                self.signal_name(row))

    def attribute_findings(self, row: int, source: str = "attributes"
                           ) -> list[tuple[str, Any, list[Finding]]]:
        """``(key, value, findings)`` for every attribute of ``row`` in ``source``."""
        msgs = _Messages(self._state.compiled, self.signal_type)
        sig = self.signal_name(row)
        out = []
        for lst in self._lists:
            if lst.source != source:
                continue
            for j in range(int(lst.offsets[row]), int(lst.offsets[row + 1])):
                key, kid, value, err = self._entry(lst, j)
                fs = [msgs.attribute(code, key, kid, value, signal_name=sig, row=row, error=err)
                      for code in C.ATTRIBUTE_CODES if lst.entry_bits[j] & (1 << code)]
                out.append((key, value, fs))
        return out

    def _entry(self, lst: _Lists, j: int) -> tuple[str | None, int, Any, str | None]:
        kd = int(lst.key_idx[j])
        if lst.py_values is not None:
            return lst.key_dict[kd], int(lst.key_map[kd]), lst.py_values[j], \
                (lst.py_errors or {}).get(j)
        key = lst.key_dict[kd].as_py() if 0 <= kd < len(lst.key_dict) else None
        kid = int(lst.key_map[kd]) if 0 <= kd < len(lst.key_map) else -1
        return key, kid, _value_at(lst.values, j), None

    def _row_findings(self, row: int) -> list[Finding]:
        msgs = _Messages(self._state.compiled, self.signal_type)
        sig = self.signal_name(row)
        bits = int(self.row_bits[row])
        out: list[Finding] = []
        g = int(self.row_group[row])
        for code in _SIGNAL_CODES:
            if bits & (1 << code):
                out.append(msgs.signal(code, g, signal_name=sig, row=row,
                                       unit=self._extra.get("unit", lambda r: None)(row),
                                       kind=self._extra.get("kind", lambda r: None)(row)))
        for lst in self._lists:
            for j in range(int(lst.offsets[row]), int(lst.offsets[row + 1])):
                e = int(lst.entry_bits[j])
                if not e:
                    continue
                key, kid, value, err = self._entry(lst, j)
                for code in C.ATTRIBUTE_CODES:
                    if e & (1 << code):
                        out.append(msgs.attribute(code, key, kid, value, signal_name=sig,
                                                  row=row, error=err))
            if lst.miss_row.size:
                lo = int(np.searchsorted(lst.miss_row, row, side="left"))
                hi = int(np.searchsorted(lst.miss_row, row, side="right"))
                for q in range(lo, hi):
                    out.append(msgs.requirement(int(lst.miss_code[q]), int(lst.miss_kid[q]),
                                                signal_name=sig, row=row))
        return out

    # -- findings as a table ------------------------------------------------------------

    def table(self) -> pa.Table:
        """Every finding as a row: ``row``, ``id``, ``level``, ``attribute_key``,
        ``source`` (``attributes``, ``resource_attributes`` or ``signal``), sorted by row."""
        rows, ids, keys, sources = [], [], [], []
        compiled = self._state.compiled
        for lst in self._lists:
            lo, hi = int(lst.offsets[0]), int(lst.offsets[-1])
            bits = lst.entry_bits[lo:hi]
            for code in C.ATTRIBUTE_CODES:
                pos = np.flatnonzero(bits & np.uint8(1 << code)) + lo
                if not pos.size:
                    continue
                rows.append(np.searchsorted(lst.offsets, pos, side="right") - 1)
                kd = lst.key_idx[pos]
                if lst.py_values is not None:
                    keys.append(pa.array([lst.key_dict[int(k)] for k in kd], pa.string()))
                else:
                    ok = (kd >= 0) & (kd < len(lst.key_dict))
                    keys.append(lst.key_dict.take(pa.array(np.where(ok, kd, 0),
                                                           mask=~ok)).cast(pa.string()))
                ids.append(np.full(pos.size, code, np.int8))
                sources.append(np.full(pos.size, lst.source))
            if lst.miss_row.size:
                rows.append(lst.miss_row.astype(np.int64))
                keys.append(pa.array([compiled.keys[k] for k in lst.miss_kid.tolist()],
                                     pa.string()))
                ids.append(lst.miss_code.astype(np.int8))
                sources.append(np.full(lst.miss_row.size, lst.source))
        for code in _SIGNAL_CODES:
            r = np.flatnonzero(self.row_bits & np.uint32(1 << code))
            if r.size:
                rows.append(r)
                keys.append(pa.nulls(r.size, pa.string()))
                ids.append(np.full(r.size, code, np.int8))
                sources.append(np.full(r.size, "signal"))
        if not rows:
            return pa.table({"row": pa.array([], pa.int64()), "id": pa.array([], pa.string()),
                             "level": pa.array([], pa.string()),
                             "attribute_key": pa.array([], pa.string()),
                             "source": pa.array([], pa.string())})
        row = np.concatenate(rows).astype(np.int64)
        code = np.concatenate(ids)
        order = np.argsort(row, kind="stable")
        id_names = np.array(C.CODE_IDS, dtype=object)
        level_names = np.array([FindingLevel(lv).label for lv in C.CODE_LEVELS], dtype=object)
        return pa.table({
            "row": row[order],
            "id": pa.array(id_names[code][order].tolist(), pa.string()),
            "level": pa.array(level_names[code][order].tolist(), pa.string()),
            "attribute_key": pa.concat_arrays(keys).take(pa.array(order)),
            "source": pa.array(np.concatenate(sources)[order].tolist(), pa.string()),
        })

    def __repr__(self) -> str:
        return (f"BatchValidationReport({self.num_rows} {self.signal_type} rows, "
                f"{self.num_invalid} invalid, {self.num_violations} violations)")


# -- the validator --------------------------------------------------------------------------------


class WeaverValidator:
    """Validates spans and metric points against a Weaver registry.

    Parameters
    ----------
    registry : a registry directory (loaded through the content-keyed cache), a
        :class:`~knhk.validation.model.Registry` or a
        :class:`~knhk.validation.compiled.CompiledRegistry`.
    span_groups : ``{span name or glob pattern: group id}`` -- spans to check
        against a group's requirement levels whatever their name.
    match_span_names : also match a span to the span group whose id is its name
        (or ``span.<name>``, a v2 span type). Default True.
    exclude : finding ids not to report (e.g. ``{"not_stable"}``).
    min_level : the lowest level to report (default information: everything).
    sources : attribute columns of span batches to check (``attributes``,
        ``resource_attributes``, ``scope_attributes``); requirement levels apply
        to ``attributes``.
    cache, cache_dir : the compiled-registry cache (see :func:`load_compiled`).
    watch : seconds between checks for changed registry files (reloaded on a
        background thread, atomically); False (default) to not watch.

    Examples
    --------
    >>> v = WeaverValidator("registry/", exclude={"not_stable"})
    >>> v.validate_span("workflow.execute", {"workflow.id": "1",
    ...                                      "workflow.pattern": "x"}).is_valid()
    True
    """

    def __init__(self, registry: str | os.PathLike | Registry | CompiledRegistry, *,
                 span_groups: Mapping[str, str] | None = None, match_span_names: bool = True,
                 exclude: Iterable[str] = (), min_level: FindingLevel | str = "information",
                 sources: Iterable[str] = ("attributes",), cache: bool = True,
                 cache_dir: str | os.PathLike | None = None,
                 watch: float | bool = False) -> None:
        self._cache = cache
        self._cache_dir = cache_dir
        self._span_groups = dict(span_groups or {})
        self._match_names = bool(match_span_names)
        self._sources = tuple(sources)
        for s in self._sources:
            if s not in ("attributes", "resource_attributes", "scope_attributes"):
                raise ValueError(
                    f"sources are 'attributes', 'resource_attributes' or 'scope_attributes'; "
                    f"got {s!r}.")
        known = {str(f) for f in FindingId}
        excluded = set(exclude)
        unknown = sorted(excluded - known)
        if unknown:
            raise ValueError(f"Unknown finding id(s) {unknown}; known ids: {sorted(known)}.")
        floor = FindingLevel.parse(min_level)
        self._enabled = 0
        for code in range(C.N_CODES):
            if C.CODE_IDS[code] not in excluded and C.CODE_LEVELS[code] >= floor:
                self._enabled |= 1 << code
        if isinstance(registry, CompiledRegistry):
            compiled = registry
        elif isinstance(registry, Registry):
            compiled = CompiledRegistry.from_registry(registry)
        elif isinstance(registry, str | os.PathLike):
            compiled = load_compiled(registry, cache=cache, cache_dir=cache_dir)
        else:
            raise TypeError(f"WeaverValidator takes a registry directory, a Registry or a "
                            f"CompiledRegistry, got {type(registry).__name__}")
        self.path = compiled.path
        for name, gid in self._span_groups.items():
            if gid not in compiled.group_index:
                raise ValueError(f"span_groups maps {name!r} to {gid!r}, which is not a group "
                                 f"of the registry {compiled.path}.")
        self._state = _State(compiled, self._enabled)
        self._stats_lock = threading.Lock()
        self._reset()
        self._reload_lock = threading.Lock()
        self._signature = signature(self.path) if os.path.isdir(self.path) else ()
        self._watcher: threading.Thread | None = None
        self._stop_watch = threading.Event()
        if watch:
            self.watch(1.0 if watch is True else float(watch))

    # -- registry ----------------------------------------------------------------------

    @property
    def compiled(self) -> CompiledRegistry:
        return self._state.compiled

    @property
    def registry(self) -> Registry:
        """The resolved model (resolved on first use if the tables came from the cache)."""
        return self._state.compiled.registry

    def reload(self, path: str | os.PathLike | None = None) -> bool:
        """Load the registry again (from ``path``, default the current one) and swap it
        in atomically: a batch being validated finishes with the tables it started
        with. Returns True if the content changed. A registry that does not load
        raises :class:`RegistryError` and leaves the current one in place."""
        with self._reload_lock:
            target = os.fspath(path) if path is not None else self.path
            sig = signature(target)
            try:
                compiled = load_compiled(target, cache=self._cache, cache_dir=self._cache_dir)
            except RegistryError as exc:
                with self._stats_lock:
                    self._last_reload_error = str(exc)
                raise
            changed = compiled.content_key != self._state.compiled.content_key
            self._state = _State(compiled, self._enabled)
            self.path = compiled.path
            self._signature = sig
            with self._stats_lock:
                self._reloads += 1
                self._last_reload_error = None
            if changed:
                logger.info("reloaded the registry %s (%d attributes, %d groups)",
                            self.path, compiled.num_keys, compiled.num_groups)
            return changed

    def check_for_changes(self) -> bool:
        """Reload if a registry file changed since the last load; True if reloaded.
        A registry that no longer loads is logged and the current one kept."""
        sig = signature(self.path)
        if sig == self._signature:
            return False
        try:
            return self.reload()
        except RegistryError as exc:
            self._signature = sig      # do not retry until the files change again
            logger.error("registry %s changed but does not load; keeping the previous "
                         "version: %s", self.path, exc)
            return False

    def watch(self, interval: float = 1.0) -> None:
        """Check the registry files every ``interval`` seconds on a daemon thread and
        reload when they change."""
        if interval <= 0:
            raise ValueError(f"The watch interval must be positive, got {interval!r}.")
        self.stop_watching()
        self._stop_watch.clear()

        def run() -> None:
            while not self._stop_watch.wait(interval):
                try:
                    self.check_for_changes()
                except Exception:  # the watcher must not die on a bad edit
                    logger.exception("registry watcher failed")

        self._watcher = threading.Thread(target=run, name="knhk-registry-watch", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._stop_watch.set()
            self._watcher.join(5.0)
            self._watcher = None

    # -- statistics -----------------------------------------------------------------------

    def _reset(self) -> None:
        self._total = 0
        self._invalid = 0
        self._batches = 0
        self._code_counts = np.zeros(C.N_CODES, dtype=np.int64)
        self._by_name: Counter = Counter()
        self._reloads = getattr(self, "_reloads", 0)
        self._last_reload_error = getattr(self, "_last_reload_error", None)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._reset()

    def stats(self, top: int = 10) -> ValidationStats:
        """Totals since construction: validations (events checked), violations by
        finding id, and the ``top`` span (or metric) names with most violations."""
        with self._stats_lock:
            counts = self._code_counts.copy()
            by_name = sorted(self._by_name.items(), key=lambda kv: (-kv[1], str(kv[0])))[:top]
            out = ValidationStats(
                total_validations=self._total, invalid_events=self._invalid,
                batches_validated=self._batches, reloads=self._reloads,
                last_reload_error=self._last_reload_error)
        viol: dict[str, int] = {}
        every: dict[str, int] = {}
        for code, n in enumerate(counts.tolist()):
            if n:
                cid = C.CODE_IDS[code]
                every[cid] = every.get(cid, 0) + n
                if C.CODE_LEVELS[code] == FindingLevel.VIOLATION:
                    viol[cid] = viol.get(cid, 0) + n
        out.total_violations = sum(viol.values())
        out.violations_by_type = viol
        out.total_findings = sum(every.values())
        out.findings_by_type = every
        out.most_violated_spans = [(str(k), int(v)) for k, v in by_name]
        return out

    def _account(self, n: int, counts: np.ndarray, invalid: int,
                 per_name: Mapping[str, int] | None, batch: bool) -> None:
        with self._stats_lock:
            self._total += n
            self._invalid += invalid
            self._batches += int(batch)
            self._code_counts += counts
            if per_name:
                self._by_name.update(per_name)
                if len(self._by_name) > _MAX_NAMES:
                    # names with ids in them must not grow this without bound
                    self._by_name = Counter(dict(self._by_name.most_common(_MAX_NAMES // 4)))

    # -- per event --------------------------------------------------------------------------

    def _group_id(self, state: _State, group: str | None) -> int:
        g = state.compiled.group_index.get(group, -1) if group is not None else -1
        if group is not None and g < 0:
            raise ValueError(f"The registry {state.compiled.path} has no group {group!r}.")
        return g

    def _event(self, state: _State, items: Any, g: int, signal_type: str | None,
               name: str | None, signal_codes: list[int], extra: dict | None = None
               ) -> ValidationResult:
        if items is None:
            items = []
        elif isinstance(items, Mapping):
            items = list(items.items())
        else:
            items = list(items)
        lst = _check_items(state, items, g, "attributes")
        counts = lst.counts.copy()
        row_bits, row_level, row_viol = lst.row_bits, lst.row_level, lst.row_viol
        for code in signal_codes:
            _set_rows(np.ones(1, dtype=bool), code, self._enabled, row_bits, row_level,
                      row_viol, counts)
        names = pa.array([name], pa.string())
        report = BatchValidationReport(state, signal_type, 1, [lst], row_bits, row_level,
                                       row_viol, counts, np.array([g], np.int32), names,
                                       np.zeros(1, np.int32), extra)
        findings = [dataclasses.replace(f, row=None) for f in report._row_findings(0)]
        n_viol = int(row_viol[0])
        self._account(1, counts, int(n_viol > 0),
                      {name if name is not None else "": n_viol} if n_viol and name is not None
                      else None, batch=False)
        gid = state.compiled.group_ids[g] if g >= 0 else None
        return ValidationResult(findings, gid, signal_type, name)

    def validate_span(self, name: str, attributes: Mapping[str, Any] | Iterable | None = None,
                      *, group: str | None = None) -> ValidationResult:
        """Check one span's attributes; the per-event twin of :meth:`validate_batch`.

        The span is matched to a group by ``group``, else by ``span_groups``, else
        by name (a span group whose id is ``name``); with a group, its required
        / recommended / opt-in attributes are checked too. Every attribute is
        checked against the registry either way. A value that cannot be an
        attribute (a set, an int beyond int64, ...) is reported as an
        ``invalid_attribute_value`` violation naming the key.

        Examples
        --------
        >>> v = WeaverValidator("registry/")
        >>> r = v.validate_span("workflow.execute", {"workflow.id": "w-1"})
        >>> [f.id for f in r.violations]
        ['required_attribute_not_present']
        """
        state = self._state
        if group is not None:
            g = self._group_id(state, group)
        else:
            g = state.compiled.span_group(name, self._span_groups, self._match_names)
        return self._event(state, attributes, g, "span", name, [])

    def validate_attributes(self, attributes: Mapping[str, Any] | Iterable | None,
                            ) -> ValidationResult:
        """Check attributes on their own (live-check's attribute samples)."""
        return self._event(self._state, attributes, -1, None, None, [])

    def validate_metric(self, name: str, attributes: Mapping[str, Any] | Iterable | None = None,
                        *, instrument: str | int | None = None, unit: str | None = None
                        ) -> ValidationResult:
        """Check one metric point: its name (``missing_metric``), instrument
        (a :class:`knhk.MetricKind` or Weaver's name), unit and attributes."""
        state = self._state
        g = state.compiled.metric_group_of.get(name, -1)
        kind = _kind_code(instrument) if instrument is not None else None
        checks = []
        if g < 0:
            checks.append(C.C_MISSING_METRIC)
        else:
            if kind is not None and state.g_instrument[g] and kind != state.g_instrument[g]:
                checks.append(C.C_UNEXPECTED_INSTRUMENT)
            expected = state.compiled.group_unit[g]
            if unit is not None and expected is not None and unit != expected:
                checks.append(C.C_UNIT_MISMATCH)
        extra = {"unit": lambda r: unit, "kind": lambda r: kind}
        return self._event(state, attributes, g, "metric", name, checks, extra)

    def validate_event(self, name: str, attributes: Mapping[str, Any] | Iterable | None = None
                       ) -> ValidationResult:
        """Check one event (a log record or span event) by its event name."""
        state = self._state
        g = state.compiled.event_group_of.get(name, -1)
        checks = [C.C_MISSING_EVENT] if g < 0 else []
        return self._event(state, attributes, g, "event", name, checks)

    # -- batches --------------------------------------------------------------------------------

    def validate_batch(self, batch: SpanBatch | MetricBatch | pa.RecordBatch | pa.Table
                       ) -> BatchValidationReport:
        """Check a whole batch with column operations; returns per-row findings.

        Span batches: every attribute of every row against the registry, and rows
        matched to a group (by name or ``span_groups``) against its requirement
        levels. Metric batches: also the metric name, instrument and unit. A bad
        value marks its row (``invalid_attribute_value``); the rest of the batch
        is checked as usual.
        """
        state = self._state
        rb, signal = _record_batch(batch)
        if signal == "metrics":
            return self._validate_metrics(state, rb)
        return self._validate_spans(state, rb)

    def _validate_spans(self, state: _State, rb: pa.RecordBatch) -> BatchValidationReport:
        n = rb.num_rows
        compiled = state.compiled
        names, name_ind = _dict_parts(rb.column("name"), "name")
        name_idx = _raw(name_ind, np.int32) if n else np.zeros(0, np.int32)
        name_map = compiled.map_span_names(names, self._span_groups, self._match_names)
        if n and (name_map >= 0).any():
            row_group = np.ascontiguousarray(name_map[name_idx])
            if name_ind.null_count:
                row_group[~np.asarray(name_ind.is_valid())] = -1
        else:
            row_group = np.full(n, -1, dtype=np.int32)
        # requirement levels of span groups apply to span attributes only
        no_group = np.full(n, -1, dtype=np.int32)
        lists = []
        for source in self._sources:
            rg = row_group if source == "attributes" else no_group
            lists.append(_check_lists(state, rb.column(source), rg, source, name_idx,
                                      len(names)))
        row_bits, row_level, row_viol, counts = _merge(lists, n)
        invalid = lists[0].n_invalid if len(lists) == 1 else int(np.count_nonzero(row_viol))
        key_viol = lists[0].key_viol if len(lists) == 1 else sum(lst.key_viol for lst in lists)
        self._account(n, counts, invalid, _per_name(names, key_viol), batch=True)
        return BatchValidationReport(state, "span", n, lists, row_bits, row_level, row_viol,
                                     counts, row_group, names, name_idx)

    def _validate_metrics(self, state: _State, rb: pa.RecordBatch) -> BatchValidationReport:
        n = rb.num_rows
        compiled = state.compiled
        names, name_ind = _dict_parts(rb.column("name"), "name")
        name_idx = _raw(name_ind, np.int32) if n else np.zeros(0, np.int32)
        metric_map = compiled.map_metric_names(names)
        row_group = np.ascontiguousarray(metric_map[name_idx]) if n else np.zeros(0, np.int32)
        lst = _check_lists(state, rb.column("attributes"), row_group, "attributes")
        row_bits, row_level, row_viol, counts = _merge([lst], n)
        has = row_group >= 0
        gi = np.where(has, row_group, 0)
        en = self._enabled
        _set_rows(~has, C.C_MISSING_METRIC, en, row_bits, row_level, row_viol, counts)
        kinds = rb.column("kind").to_numpy(zero_copy_only=False).astype(np.int8)
        if state.g_instrument.size:
            expected = state.g_instrument[gi]
            _set_rows(has & (expected > 0) & (kinds != expected), C.C_UNEXPECTED_INSTRUMENT,
                      en, row_bits, row_level, row_viol, counts)
        units, unit_ind = _dict_parts(rb.column("unit"), "unit")
        unit_idx = np.where(np.asarray(unit_ind.is_valid()), _raw(unit_ind, np.int32), -1) \
            if n else np.zeros(0, np.int32)
        unit_strs = units.to_pylist()
        if has.any():
            pair = gi.astype(np.int64) * (len(unit_strs) + 1) + (unit_idx + 1)
            uniq, inv = np.unique(pair[has], return_inverse=True)
            bad_u = np.zeros(uniq.size, dtype=bool)
            for i, p in enumerate(uniq.tolist()):
                g, u = divmod(p, len(unit_strs) + 1)
                expected_unit = compiled.group_unit[g]
                found = unit_strs[u - 1] if u > 0 else ""
                bad_u[i] = expected_unit is not None and (found or "") != expected_unit
            bad = np.zeros(n, dtype=bool)
            bad[has] = bad_u[inv]
            _set_rows(bad, C.C_UNIT_MISMATCH, en, row_bits, row_level, row_viol, counts)
        key_viol = np.bincount(name_idx, weights=row_viol, minlength=len(names)) if n \
            else np.zeros(0)
        self._account(n, counts, int(np.count_nonzero(row_viol)), _per_name(names, key_viol),
                      batch=True)
        extra = {
            "unit": lambda r: unit_strs[unit_idx[r]] if unit_idx[r] >= 0 else "",
            "kind": lambda r: int(kinds[r]),
        }
        return BatchValidationReport(state, "metric", n, [lst], row_bits, row_level, row_viol,
                                     counts, row_group, names, name_idx, extra)

    # -- the pipeline stage -------------------------------------------------------------------

    def stage(self, policy: ValidationPolicy | None = None, *,
              on_report: Callable[[SpanBatch, BatchValidationReport], None] | None = None,
              **policy_fields: Any) -> ValidationStage:
        """A pipeline stage that validates every batch and applies ``policy``
        (default: annotate rows with violations and pass everything on).

        ``v.stage(violation="drop")`` drops spans with violations;
        ``v.stage(violation="quarantine", quarantine=IpcExporter("q/"))`` sends them
        to an IPC file instead.
        """
        if policy is None:
            policy = ValidationPolicy(**policy_fields)
        elif policy_fields:
            raise TypeError("pass either a ValidationPolicy or its fields, not both")
        return ValidationStage(self, policy, on_report=on_report)

    def close(self) -> None:
        self.stop_watching()

    def __repr__(self) -> str:
        c = self._state.compiled
        return f"WeaverValidator({c.path!r}: {c.num_keys} attributes, {c.num_groups} groups)"


def _per_name(names: pa.Array, key_viol: np.ndarray | None) -> dict[str, int] | None:
    """Violations per span (or metric) name, from per-dictionary-entry sums."""
    if key_viol is None or not key_viol.size:
        return None
    hit = np.flatnonzero(key_viol)
    if not hit.size:
        return None
    out: dict[str, int] = {}
    for i, nm in zip(hit.tolist(), names.take(pa.array(hit)).to_pylist(), strict=True):
        key = nm if nm is not None else ""
        out[key] = out.get(key, 0) + int(key_viol[i])
    return out


def _kind_code(instrument: str | int) -> int:
    if isinstance(instrument, str):
        codes = {v: k for k, v in C.INSTRUMENT_OF_KIND.items()}
        if instrument not in codes:
            raise ValueError(f"An instrument is one of {sorted(codes)} (or a knhk.MetricKind), "
                             f"got {instrument!r}.")
        return codes[instrument]
    return int(instrument)


def _set_rows(mask: np.ndarray, code: int, enabled: int, row_bits: np.ndarray,
              row_level: np.ndarray, row_viol: np.ndarray, counts: np.ndarray) -> None:
    if not (enabled >> code) & 1 or not mask.any():
        return
    row_bits[mask] |= np.uint32(1 << code)
    lv = C.CODE_LEVELS[code]
    np.maximum(row_level, np.where(mask, lv, 0).astype(np.int8), out=row_level)
    if lv == 3:
        row_viol += mask
    counts[code] += int(np.count_nonzero(mask))


def _merge(lists: list[_Lists], n: int) -> tuple:
    if len(lists) == 1:
        lst = lists[0]
        return lst.row_bits, lst.row_level, lst.row_viol, lst.counts.copy()
    row_bits = np.zeros(n, dtype=np.uint32)
    row_level = np.zeros(n, dtype=np.int8)
    row_viol = np.zeros(n, dtype=np.int32)
    counts = np.zeros(C.N_CODES, dtype=np.int64)
    for lst in lists:
        row_bits |= lst.row_bits
        np.maximum(row_level, lst.row_level, out=row_level)
        row_viol += lst.row_viol
        counts += lst.counts
    return row_bits, row_level, row_viol, counts


def _record_batch(batch: Any) -> tuple[pa.RecordBatch, str]:
    if isinstance(batch, SpanBatch):
        return batch.record_batch, "spans"
    if isinstance(batch, MetricBatch):
        return batch.record_batch, "metrics"
    if isinstance(batch, pa.Table):
        table = batch.combine_chunks()
        batches = table.to_batches()
        rb = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
        batch = rb
    if isinstance(batch, pa.RecordBatch):
        if batch.schema.equals(SPAN_SCHEMA):
            return batch, "spans"
        if batch.schema.equals(METRIC_SCHEMA):
            return batch, "metrics"
        names = set(batch.schema.names)
        if {"trace_id", "span_id"} <= names:
            # other span columns: converted (with a SchemaError naming a bad column)
            return SpanBatch(batch).record_batch, "spans"
        if {"name", "kind", "unit", "attributes"} <= names:
            return MetricBatch(batch).record_batch, "metrics"
        raise SchemaError(
            f"validate_batch takes a span batch ({len(SPAN_SCHEMA)} columns of "
            f"knhk.SPAN_SCHEMA) or a metric batch ({len(METRIC_SCHEMA)} columns of "
            f"knhk.METRIC_SCHEMA); got columns {sorted(names)}")
    raise TypeError(f"validate_batch takes a SpanBatch, MetricBatch, pyarrow RecordBatch or "
                    f"Table, got {type(batch).__name__}")


# -- policy and stage ------------------------------------------------------------------------------


class ValidationAction(enum.Enum):
    """What the stage does with a row that has findings at a level."""

    PASS = "pass"             # annotate (if enabled) and pass on
    DROP = "drop"             # remove from the batch; counted
    QUARANTINE = "quarantine"  # remove and send to the quarantine exporter; counted

    @classmethod
    def parse(cls, value: Any) -> ValidationAction:
        if isinstance(value, ValidationAction):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"A validation action is 'pass', 'drop' or 'quarantine', "
                             f"got {value!r}.") from None


@dataclass
class ValidationPolicy:
    """What a validation stage does per finding level.

    A row is quarantined if any of its levels says quarantine, else dropped if
    any says drop, else passed on. ``annotate`` adds ``knhk.validation.level``
    (the row's highest level) and ``knhk.validation.violations`` (a count) to
    the attributes of rows at or above ``annotate_level``. ``quarantine`` is an
    exporter (``export(batch)``) or a directory for Arrow IPC files.
    """

    violation: ValidationAction | str = ValidationAction.PASS
    improvement: ValidationAction | str = ValidationAction.PASS
    information: ValidationAction | str = ValidationAction.PASS
    annotate: bool = True
    annotate_level: FindingLevel | str = FindingLevel.VIOLATION
    quarantine: Any = None

    def __post_init__(self) -> None:
        self.violation = ValidationAction.parse(self.violation)
        self.improvement = ValidationAction.parse(self.improvement)
        self.information = ValidationAction.parse(self.information)
        self.annotate_level = FindingLevel.parse(self.annotate_level)
        uses_q = ValidationAction.QUARANTINE in self.actions().values()
        if uses_q and self.quarantine is None:
            raise ValueError("A policy that quarantines needs quarantine= (an exporter or a "
                             "directory for Arrow IPC files).")
        if self.quarantine is not None and not isinstance(self.quarantine, str | os.PathLike) \
                and not callable(getattr(self.quarantine, "export", None)):
            raise ValueError(f"quarantine must be an exporter with export(batch) or a "
                             f"directory, got {type(self.quarantine).__name__}.")

    def actions(self) -> dict[FindingLevel, ValidationAction]:
        return {FindingLevel.VIOLATION: self.violation,
                FindingLevel.IMPROVEMENT: self.improvement,
                FindingLevel.INFORMATION: self.information}


def _quarantine_exporter(target: Any) -> Any:
    if not isinstance(target, str | os.PathLike):
        return target
    from knhk.exporters.ipc import IpcExporter

    return IpcExporter(os.fspath(target), prefix="quarantine")


class ValidationStage:
    """A pipeline stage: validates each batch, counts, and applies a policy.

    Returns a :class:`knhk.StageResult` whose counters are ``validation_errors``
    (rows with a violation), ``validation_violations`` (violation findings),
    ``validation_dropped`` and ``validation_quarantined``; its mask removes
    dropped and quarantined rows. ``on_report(batch, report)`` is called for
    every batch (side output). ``last_report`` is the most recent report.
    """

    def __init__(self, validator: WeaverValidator, policy: ValidationPolicy, *,
                 on_report: Callable[[Any, BatchValidationReport], None] | None = None
                 ) -> None:
        from knhk.exporters.base import ExporterWorker

        self.validator = validator
        self.policy = policy
        self.on_report = on_report
        self.last_report: BatchValidationReport | None = None
        self.quarantine_lost = 0
        self._worker = None
        if policy.quarantine is not None:
            self._worker = ExporterWorker(_quarantine_exporter(policy.quarantine))

    def process(self, batch: Any) -> Any:
        from knhk.pipeline import StageResult

        report = self.validator.validate_batch(batch)
        self.last_report = report
        if self.on_report is not None:
            try:
                self.on_report(batch, report)
            except Exception:
                logger.exception("on_report raised; validation goes on")
        if not isinstance(batch, SpanBatch):
            return None
        n = batch.num_rows
        drop = np.zeros(n, dtype=bool)
        quarantine = np.zeros(n, dtype=bool)
        if report.num_findings:
            for level, action in self.policy.actions().items():
                if action is ValidationAction.PASS:
                    continue
                present = report.rows_with(level)
                if action is ValidationAction.DROP:
                    drop |= present
                else:
                    quarantine |= present
        drop &= ~quarantine
        out = batch
        if self.policy.annotate and report.num_findings:
            rows = report.row_level >= int(self.policy.annotate_level)
            if rows.any():
                out = annotate_batch(batch, rows, report.row_level, report.row_violations)
        counters = {"validation_errors": report.num_invalid,
                    "validation_violations": report.num_violations}
        n_q = int(np.count_nonzero(quarantine))
        if n_q:
            counters["validation_quarantined"] = n_q
            if self._worker is None or not self._worker.submit(out.filter(quarantine)):
                self.quarantine_lost += n_q
                counters["validation_quarantine_lost"] = n_q
                logger.warning("quarantine queue full: %d invalid spans not quarantined", n_q)
        n_d = int(np.count_nonzero(drop))
        if n_d:
            counters["validation_dropped"] = n_d
        mask = ~(drop | quarantine) if (n_d or n_q) else None
        # the removed rows are counted above (dropped or quarantined), not as sampled out
        return StageResult(out, mask=mask, counters=counters, removed_as=None)

    def flush(self) -> None:
        return None

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._worker is not None:
            self._worker.close(time.monotonic() + timeout)
        self.validator.stop_watching()


# -- annotation -----------------------------------------------------------------------------------

_LEVEL_LABELS = pa.array(["", "information", "improvement", "violation"], pa.string())
_ANNOTATION_KEYS = pa.array([C.OWN_PREFIX + "level", C.OWN_PREFIX + "violations"], pa.string())


def annotate_batch(batch: SpanBatch, rows: np.ndarray, levels: np.ndarray,
                   violations: np.ndarray) -> SpanBatch:
    """``batch`` with two attributes appended to each row where ``rows`` is true:
    ``knhk.validation.level`` (string) and ``knhk.validation.violations`` (int)."""
    rb = batch.record_batch
    lists = rb.column("attributes")
    n = len(lists)
    off = lists.offsets.to_numpy().astype(np.int64)
    base = off[0]
    m = int(off[-1] - base)
    old_len = np.diff(off)
    add = rows.astype(np.int64) * 2
    new_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(old_len + add, out=new_off[1:])
    sel = np.flatnonzero(rows)
    a = sel.size
    # The appended entries: for annotated row i, [level (string), violations (int)].
    key_idx = np.tile(np.array([0, 1], dtype=np.int32), a)
    types = np.tile(np.array([1, 3], dtype=np.int8), a)
    str_idx = np.empty(2 * a, dtype=np.int32)
    str_idx[0::2] = levels[sel]
    str_mask = np.zeros(2 * a, dtype=bool)
    str_mask[1::2] = True
    ints = np.zeros(2 * a, dtype=np.int64)
    ints[1::2] = violations[sel]
    int_mask = ~str_mask
    dict_t = pa.dictionary(pa.int32(), pa.string())
    new_entries = pa.StructArray.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array(key_idx), _ANNOTATION_KEYS).cast(dict_t),
         pa.array(types),
         pa.DictionaryArray.from_arrays(pa.array(str_idx, mask=str_mask),
                                        _LEVEL_LABELS).cast(dict_t),
         pa.array(ints, mask=int_mask),
         pa.nulls(2 * a, pa.float64()), pa.nulls(2 * a, pa.bool_()),
         pa.nulls(2 * a, pa.binary()), pa.nulls(2 * a, pa.binary())],
        fields=list(ATTRIBUTES_TYPE.value_type))
    old_values = lists.values.slice(base, m)
    combined = pa.concat_arrays([old_values, new_entries])
    # Where each new slot takes its entry from: old entries keep their order, each
    # annotated row's two new entries follow its old ones.
    take = np.empty(m + 2 * a, dtype=np.int64)
    shift = np.concatenate([[0], np.cumsum(add)])[:-1]
    row_of_old = np.repeat(np.arange(n), old_len)
    take[np.arange(m) + shift[row_of_old]] = np.arange(m)
    ends = new_off[1:][sel]
    take[ends - 2] = m + 2 * np.arange(a)
    take[ends - 1] = m + 2 * np.arange(a) + 1
    new_values = combined.take(pa.array(take))
    new_lists = pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), new_values,
                                         type=ATTRIBUTES_TYPE)
    cols = [new_lists if name == "attributes" else rb.column(name) for name in rb.schema.names]
    return SpanBatch._wrap(pa.RecordBatch.from_arrays(cols, schema=rb.schema))
