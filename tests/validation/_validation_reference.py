"""Plain references the validation tests hold knhk's validator equal to.

``per_span_findings`` is the straightforward validator: one span at a time, in
Python, reading the *resolved model* (``Registry``), not the compiled tables --
so it checks the compilation as well as the kernel. ``numpy_check_attributes``
is the NumPy twin of the compiled kernel ``knhk._core._validate``: the same
inputs and outputs, computed with whole-array operations.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from knhk import _attributes
from knhk.validation import compiled as C
from knhk.validation.model import Registry

REQUIREMENT_IDS = {
    "required": "required_attribute_not_present",
    "conditionally_required": "conditionally_required_attribute_not_present",
    "recommended": "recommended_attribute_not_present",
    "opt_in": "opt_in_attribute_not_present",
}


def _value_kind(value: Any) -> str | None:
    """The attribute type of a Python value as knhk stores it."""
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
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "kvlist"
    return "?"


def _fits(declared: str, value: Any) -> bool:
    kind = _value_kind(value)
    if kind is None or declared == "any":
        return True
    if declared == "enum":
        return kind in ("string", "int")
    if declared == "double":
        return kind in ("double", "int")
    if declared in ("string", "int", "boolean"):
        return kind == declared
    if kind != "array":
        return False
    elems = {_value_kind(v) for v in value if v is not None}
    allowed = {"string[]": {"string"}, "int[]": {"int"}, "double[]": {"int", "double"},
               "boolean[]": {"boolean"}}[declared]
    return elems <= allowed


def per_span_findings(registry: Registry, name: str | None, attributes: dict,
                      group_id: str | None = None, exclude: set[str] = frozenset()
                      ) -> Counter:
    """Counter of ``(finding id, attribute key or None)`` for one span."""
    out: Counter = Counter()
    group = registry.group(group_id) if group_id else (
        registry.span_group(name) if name is not None else None)
    present = set()
    for key, value in attributes.items():
        if key.startswith(C.OWN_PREFIX):
            continue
        attr = registry.attributes.get(key) or registry.find_template(key)
        if attr is None:
            out["missing_attribute", key] += 1
            continue
        present.add(attr.key)
        if attr.is_template:
            out["template_attribute", key] += 1
        if attr.deprecated is not None:
            out["deprecated", key] += 1
        if attr.stability != "stable":
            out["not_stable", key] += 1
        declared = attr.value_type if attr.is_template else attr.type
        if not _fits(declared, value):
            out["type_mismatch", key] += 1
        elif attr.is_enum and _value_kind(value) in ("string", "int"):
            members = [m.value for m in attr.members if type(m.value) is type(value)]
            if value not in members:
                out["undefined_enum_variant", key] += 1
    if group is not None:
        for a in group.attributes:
            if a.key in registry.attributes and a.key not in present:
                out[REQUIREMENT_IDS[a.requirement_level.level], a.key] += 1
        if group.deprecated is not None:
            out["deprecated", None] += 1
        if group.stability != "stable":
            out["not_stable", None] += 1
    for fid, key in list(out):
        if fid in exclude:
            del out[fid, key]
    return out


def report_findings(report: Any, row: int) -> Counter:
    """The same Counter, from a BatchValidationReport row."""
    return Counter((f.id, f.attribute_key) for f in report.findings(row))


def result_findings(result: Any) -> Counter:
    return Counter((f.id, f.attribute_key) for f in result.findings)


# -- the NumPy twin of the kernel --------------------------------------------------------------


def numpy_check_attributes(compiled: Any, enabled: int, offsets: np.ndarray,
                           key_idx: np.ndarray, key_map: np.ndarray, tags: np.ndarray,
                           str_idx: np.ndarray, str_vid: np.ndarray, ints: np.ndarray,
                           any_off: np.ndarray, any_data: np.ndarray,
                           row_group: np.ndarray, row_key: np.ndarray | None = None,
                           n_row_keys: int = 0) -> dict:
    """Entry bits, row bits / level / violations, counts and missing requirements,
    computed with NumPy from the compiled tables (arrays are decoded in Python)."""
    n = len(offsets) - 1
    m = len(key_idx)
    lo, hi = int(offsets[0]), int(offsets[-1])
    pos = np.arange(lo, hi)
    row_of = np.searchsorted(offsets, pos, side="right") - 1
    entry = np.zeros(m, dtype=np.int64)
    kd = key_idx[pos]
    bad_key = (kd < 0) | (kd >= len(key_map))
    kid = np.where(bad_key, -1, key_map[np.clip(kd, 0, max(len(key_map) - 1, 0))]
                   if len(key_map) else -1)
    ignored = ~bad_key & (kid == C.KEY_IGNORED)
    unknown = ~bad_key & (kid == C.KEY_UNKNOWN)
    known = ~bad_key & (kid >= 0)
    ks = np.where(known, kid, 0)
    flags = compiled.flags[ks] if compiled.num_keys else np.zeros(pos.size, np.uint8)
    decl = compiled.decl[ks] if compiled.num_keys else np.zeros(pos.size, np.int8)
    tag = tags[pos].astype(np.int64)
    bits = np.zeros(pos.size, dtype=np.int64)
    bits |= np.where(bad_key, 1 << C.C_INVALID_VALUE, 0)
    bits |= np.where(unknown, 1 << C.C_MISSING_ATTRIBUTE, 0)
    for flag, code in ((C.F_TEMPLATE, C.C_TEMPLATE_ATTRIBUTE), (C.F_DEPRECATED, C.C_DEPRECATED),
                       (C.F_NOT_STABLE, C.C_NOT_STABLE)):
        bits |= np.where(known & ((flags & flag) != 0), 1 << code, 0)
    # Type status: 0 ok, 1 mismatch, 2 invalid.
    status = np.zeros(pos.size, dtype=np.int64)
    bad_tag = (tag < 0) | (tag > 7)
    status[bad_tag] = 2
    scalar_ok = {
        C.T_STRING: {1}, C.T_INT: {3}, C.T_DOUBLE: {3, 4}, C.T_BOOLEAN: {2},
        C.T_ENUM: {1, 3},
    }
    for d, ok_tags in scalar_ok.items():
        sel = known & ~bad_tag & (decl == d) & (tag != 0)
        status[sel & ~np.isin(tag, list(ok_tags))] = 1
    arr_decl = known & ~bad_tag & (decl >= C.T_STRINGS) & (decl <= C.T_BOOLEANS) & (tag != 0)
    status[arr_decl & (tag != 5)] = 1
    allowed = {C.T_STRINGS: {1}, C.T_INTS: {3}, C.T_DOUBLES: {3, 4}, C.T_BOOLEANS: {2}}
    for i in np.flatnonzero(arr_decl & (tag == 5)).tolist():
        j = int(pos[i])
        blob = bytes(any_data[int(any_off[j]):int(any_off[j + 1])])
        elems = _array_elements(blob)
        if elems is None:
            status[i] = 2
        elif not elems <= allowed[int(decl[i])]:
            status[i] = 1
    bits |= np.where(known & (status == 1), 1 << C.C_TYPE_MISMATCH, 0)
    bits |= np.where(known & (status == 2), 1 << C.C_INVALID_VALUE, 0)
    enum_ok = known & (status == 0) & (decl == C.T_ENUM)
    es = enum_ok & (tag == 1)
    for i in np.flatnonzero(es).tolist():
        k = int(ks[i])
        if not compiled.flags[k] & C.F_ENUM_STR:
            bits[i] |= 1 << C.C_UNDEFINED_ENUM_VARIANT
            continue
        si = int(str_idx[int(pos[i])])
        if not 0 <= si < len(str_vid):
            bits[i] |= 1 << C.C_INVALID_VALUE
            continue
        members = compiled.es_vals[compiled.es_off[k]:compiled.es_off[k + 1]]
        vid = int(str_vid[si])
        if vid < 0 or vid not in members:
            bits[i] |= 1 << C.C_UNDEFINED_ENUM_VARIANT
    ei = enum_ok & (tag == 3)
    for i in np.flatnonzero(ei).tolist():
        k = int(ks[i])
        members = compiled.ei_vals[compiled.ei_off[k]:compiled.ei_off[k + 1]]
        if int(ints[int(pos[i])]) not in members:
            bits[i] |= 1 << C.C_UNDEFINED_ENUM_VARIANT
    bits[ignored] = 0
    bits &= enabled & 0xFF
    entry[pos] = bits
    code_level = np.array(C.CODE_LEVELS, dtype=np.int64)
    counts = np.zeros(C.N_CODES, dtype=np.int64)
    row_bits = np.zeros(n, dtype=np.int64)
    row_level = np.zeros(n, dtype=np.int64)
    row_viol = np.zeros(n, dtype=np.int64)
    for code in range(8):
        hit = (bits >> code) & 1
        counts[code] = hit.sum()
        np.bitwise_or.at(row_bits, row_of[hit == 1], 1 << code)
        np.maximum.at(row_level, row_of[hit == 1], code_level[code])
        if code_level[code] == 3:
            np.add.at(row_viol, row_of, hit)
    # Requirements: every (row, required key) pair whose key the row lacks; and a
    # matched signal's own deprecation / stability.
    present = set(zip(row_of[known].tolist(), ks[known].tolist(), strict=True))
    missing = []
    for r in range(n):
        g = int(row_group[r])
        if g < 0 or g >= compiled.num_groups:
            continue
        if compiled.group_type[g] != "attribute_group":
            for code, hit in ((C.C_SIGNAL_DEPRECATED, compiled.group_deprecated[g] is not None),
                              (C.C_SIGNAL_NOT_STABLE, compiled.group_stability[g] != "stable")):
                if hit and (enabled >> code) & 1:
                    counts[code] += 1
                    row_bits[r] |= 1 << code
                    row_level[r] = max(row_level[r], code_level[code])
                    row_viol[r] += code_level[code] == 3
        for q in range(int(compiled.rq_off[g]), int(compiled.rq_off[g + 1])):
            k, code = int(compiled.rq_kid[q]), int(compiled.rq_code[q])
            if not (enabled >> code) & 1 or (r, k) in present:
                continue
            missing.append((r, k, code))
            counts[code] += 1
            row_bits[r] |= 1 << code
            row_level[r] = max(row_level[r], code_level[code])
            row_viol[r] += code_level[code] == 3
    key_viol = np.zeros(n_row_keys, dtype=np.int64)
    if row_key is not None and row_key.size:
        ok = (row_key >= 0) & (row_key < n_row_keys)
        np.add.at(key_viol, row_key[ok], row_viol[ok])
    return {"entry_bits": entry, "row_bits": row_bits, "row_level": row_level,
            "row_viol": row_viol, "counts": counts, "missing": missing,
            "n_invalid": int(np.count_nonzero(row_viol)), "key_viol": key_viol}


def _array_elements(blob: bytes) -> set[int] | None:
    """Type tags (1 string, 2 bool, 3 int, 4 double, 9 other) of an AnyValue array;
    None if the bytes are not one. An element's type is its first field number
    (an empty element is a null and has none)."""
    try:
        fields = list(_attributes._fields(blob))
        arrays = [v for no, wt, v in fields if no == 5 and wt == 2]
        if not arrays:
            return None
        out: set[int] = set()
        for arr in arrays:
            for no, wt, elem in _attributes._fields(arr):
                if no != 1 or wt != 2 or not elem:
                    continue
                key, _ = _attributes._read_varint(elem, 0)
                first = key >> 3
                out.add(first if first in (1, 2, 3, 4) else 9)
    except ValueError:
        return None
    return out
