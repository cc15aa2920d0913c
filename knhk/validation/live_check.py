"""Live-check: samples in, a report in the shape of ``weaver registry live-check`` out.

Inputs (:func:`read_samples`):

- an Arrow IPC file (file or stream format) of knhk span or metric batches;
- Weaver's JSON sample format: an array of samples, each ``{"attribute": ...}``,
  ``{"span": ...}``, ``{"span_event": ...}``, ``{"span_link": ...}``,
  ``{"resource": ...}``, ``{"metric": ...}`` or ``{"event": ...}`` (a bare
  ``{"name": ..., "value": ...}`` is an attribute sample);
- Weaver's text format: one attribute per line, ``name`` or ``name=value``
  (the value is read as JSON when it parses, else as a string).

The report (:meth:`LiveCheck.report`) is Weaver's: every sample with a
``live_check_result`` (``all_advice`` and ``highest_advice_level``) at the
level the advice is about -- attribute findings on the attribute, missing
requirements and signal findings on the span or metric -- and a
``statistics`` object (counts by level and by id, registry coverage). The
shapes follow Weaver's live-check README (crates/weaver_live_check/README.md,
"PolicyFinding" and "Statistics") and its sample types (src/lib.rs ``Sample``,
src/sample_span.rs, src/sample_attribute.rs; data/span.json, data/metrics.json).

Example
-------
>>> from knhk.validation import WeaverValidator
>>> from knhk.validation.live_check import LiveCheck
>>> lc = LiveCheck(WeaverValidator("registry/"))
>>> _ = lc.check_sample({"attribute": {"name": "foo", "value": 1}})
>>> lc.report()["statistics"]["advice_type_counts"]
{'missing_attribute': 1}
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from knhk.errors import SchemaError
from knhk.validation.validator import (
    BatchValidationReport,
    Finding,
    FindingLevel,
    ValidationResult,
    WeaverValidator,
    _jsonable,
    _type_name,
)

__all__ = ["LiveCheck", "LiveCheckInputError", "read_samples"]

_REQUIREMENT_IDS = frozenset((
    "required_attribute_not_present", "conditionally_required_attribute_not_present",
    "recommended_attribute_not_present", "opt_in_attribute_not_present"))
_KINDS = {0: "internal", 1: "internal", 2: "server", 3: "client", 4: "producer",
          5: "consumer"}
_SAMPLE_TYPES = ("attribute", "span", "span_event", "span_link", "resource", "metric",
                 "event", "log")


class LiveCheckInputError(ValueError):
    """A live-check input that cannot be read; names the file and the place."""


# -- reading -----------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """``ipc``, ``json`` or ``text``: from the file's first bytes, then its extension."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"ARROW1") or head[:4] == b"\xff\xff\xff\xff":
        return "ipc"
    stripped = head.lstrip()
    if stripped[:1] in (b"[", b"{"):
        return "json"
    if path.endswith((".arrow", ".ipc", ".feather", ".arrows")):
        return "ipc"
    if path.endswith(".json"):
        return "json"
    return "text"


def read_samples(path: str, input_format: str = "auto") -> Iterator[tuple[str, Any]]:
    """Yield ``("sample", dict)`` for JSON/text samples and ``("batch", RecordBatch)``
    for Arrow IPC batches. Raises :class:`LiveCheckInputError` naming what is wrong."""
    if not os.path.isfile(path):
        raise LiveCheckInputError(f"{path}: no such file")
    fmt = detect_format(path) if input_format == "auto" else input_format
    if fmt == "ipc":
        yield from (("batch", rb) for rb in _read_ipc(path))
    elif fmt == "json":
        yield from (("sample", s) for s in _read_json(path))
    elif fmt == "text":
        yield from (("sample", s) for s in _read_text(path))
    else:
        raise LiveCheckInputError(f"unknown input format {input_format!r} "
                                  "(expected auto, ipc, json or text)")


def _read_ipc(path: str) -> Iterator[pa.RecordBatch]:
    # knhk's own reader: every batch fully validated (and CRC-checked) before use, so a
    # damaged file is a clear error naming the offset, never bad memory in a kernel.
    from knhk.errors import CorruptFileError, SchemaError
    from knhk.replay import read_batches

    try:
        for batch in read_batches(path):
            yield batch.record_batch
    except (CorruptFileError, SchemaError, pa.ArrowInvalid, OSError) as exc:
        where = "" if path in str(exc) else f"{path}: "
        raise LiveCheckInputError(f"{where}not a readable Arrow IPC file: {exc}") from None


def _read_json(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise LiveCheckInputError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: "
                                  f"{exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise LiveCheckInputError(f"{path}: not UTF-8 text: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise LiveCheckInputError(f"{path}: expected a JSON array of samples, got "
                                  f"{type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise LiveCheckInputError(f"{path}: sample {i} is {type(item).__name__}, "
                                      f"expected an object")
        if "name" in item and not any(k in item for k in _SAMPLE_TYPES):
            item = {"attribute": item}     # the attribute-only format
        kinds = [k for k in item if k in _SAMPLE_TYPES]
        if len(kinds) != 1 or len(item) != 1:
            raise LiveCheckInputError(
                f"{path}: sample {i} must have exactly one of {', '.join(_SAMPLE_TYPES)} "
                f"as its key, got {sorted(item)}")
        if not isinstance(item[kinds[0]], dict):
            raise LiveCheckInputError(f"{path}: sample {i} ({kinds[0]}) must be an object")
        out.append(item)
    return out


def _read_text(path: str) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if "=" in line:
                    name, raw = line.split("=", 1)
                    raw = raw.strip()
                    try:
                        value = json.loads(raw)
                    except json.JSONDecodeError:
                        value = raw
                    out.append({"attribute": {"name": name.strip(), "value": value}})
                else:
                    out.append({"attribute": {"name": line}})
    except UnicodeDecodeError as exc:
        raise LiveCheckInputError(f"{path}: not UTF-8 text: {exc}") from None
    return out


# -- checking ------------------------------------------------------------------------------


def _result(findings: list[Finding]) -> dict:
    hl = max((f.level for f in findings), default=None)
    return {"all_advice": [f.to_dict() for f in findings],
            "highest_advice_level": hl.label if hl is not None else None}


class LiveCheck:
    """Runs samples and batches through a :class:`WeaverValidator` and keeps
    Weaver's live-check statistics.

    Parameters
    ----------
    validator : the validator (its registry, matching and exclusions apply).
    keep_samples : keep every checked sample for :meth:`report` (default True);
        with False only the statistics are kept.
    """

    def __init__(self, validator: WeaverValidator, *, keep_samples: bool = True) -> None:
        self.validator = validator
        self.keep_samples = keep_samples
        self.samples: list[dict] = []
        c = validator.compiled
        self._seen_attrs: Counter = Counter({k: 0 for k in c.registry_attribute_names})
        self._seen_non_attrs: Counter = Counter()
        self._seen_metrics: Counter = Counter({k: 0 for k in c.registry_metric_names})
        self._seen_non_metrics: Counter = Counter()
        self._templates = {prefix for prefix, _ in c.templates}
        self._entities: Counter = Counter()
        self._levels: Counter = Counter()
        self._highest: Counter = Counter()
        self._ids: Counter = Counter()
        self._no_advice = 0
        self._total_advice = 0
        self.max_level: FindingLevel | None = None

    # -- statistics ------------------------------------------------------------------------

    def _entity(self, kind: str, findings: list[Finding]) -> dict:
        self._entities[kind] += 1
        if not findings:
            self._no_advice += 1
        else:
            hl = max(f.level for f in findings)
            self._highest[hl.label] += 1
            if self.max_level is None or hl > self.max_level:
                self.max_level = hl
        for f in findings:
            self._total_advice += 1
            self._levels[f.level.label] += 1
            self._ids[f.id] += 1
        return _result(findings)

    def _seen_attribute(self, name: str, findings: list[Finding]) -> None:
        seen = name
        for f in findings:
            if f.id == "template_attribute":
                seen = f.context.get("template_name", name)
        if seen in self._seen_attrs:
            self._seen_attrs[seen] += 1
        elif any(f.id == "missing_attribute" for f in findings):
            self._seen_non_attrs[seen] += 1
        elif seen not in self._templates:
            # A deprecated registry attribute: in the registry, but not in coverage.
            self._seen_non_attrs[seen] += 1

    def statistics(self) -> dict:
        """Weaver's ``statistics`` object for everything checked so far."""
        total_registry = len(self._seen_attrs)
        covered = sum(1 for v in self._seen_attrs.values() if v)
        return {
            "total_entities": sum(self._entities.values()),
            "total_entities_by_type": dict(sorted(self._entities.items())),
            "total_advisories": self._total_advice,
            "advice_level_counts": dict(sorted(self._levels.items())),
            "highest_advice_level_counts": dict(sorted(self._highest.items())),
            "no_advice_count": self._no_advice,
            "advice_type_counts": dict(sorted(self._ids.items())),
            "seen_registry_attributes": dict(sorted(self._seen_attrs.items())),
            "seen_non_registry_attributes": dict(sorted(self._seen_non_attrs.items())),
            "seen_registry_metrics": dict(sorted(self._seen_metrics.items())),
            "seen_non_registry_metrics": dict(sorted(self._seen_non_metrics.items())),
            "registry_coverage": covered / total_registry if total_registry else 0.0,
        }

    def report(self) -> dict:
        """``{"samples": [...], "statistics": {...}}``: Weaver's JSON report."""
        return {"samples": self.samples if self.keep_samples else [],
                "statistics": self.statistics()}

    def fails(self, fail_on: str | FindingLevel | None) -> bool:
        """Whether any finding reached ``fail_on`` (``None`` / ``"none"``: never)."""
        if fail_on is None or fail_on == "none":
            return False
        return self.max_level is not None and self.max_level >= FindingLevel.parse(fail_on)

    # -- samples ---------------------------------------------------------------------------

    def _attributes(self, raw: Any, where: str) -> list[tuple[str, Any, bool]]:
        """``(name, value, value_given)`` of a sample's attribute list."""
        if raw is None:
            return []
        if isinstance(raw, dict):      # also accept {"name": value}
            return [(str(k), v, True) for k, v in raw.items()]
        if not isinstance(raw, list):
            raise LiveCheckInputError(f"{where}: attributes must be a list, got "
                                      f"{type(raw).__name__}")
        out = []
        for i, a in enumerate(raw):
            if not isinstance(a, dict) or not isinstance(a.get("name"), str):
                raise LiveCheckInputError(f"{where}: attribute {i} needs a string 'name'")
            out.append((a["name"], a.get("value"), "value" in a and a["value"] is not None))
        return out

    def _attribute_samples(self, attrs: list[tuple[str, Any, bool]], result: ValidationResult,
                           types: list[str | None] | None = None) -> list[dict]:
        by_key: dict[str, list[Finding]] = {}
        for f in result.findings:
            if f.attribute_key is not None and f.id not in _REQUIREMENT_IDS:
                by_key.setdefault(f.attribute_key, []).append(f)
        out = []
        for i, (name, value, given) in enumerate(attrs):
            fs = by_key.get(name, [])
            if not given:     # no value: Weaver gives no type or enum advice
                fs = [f for f in fs if f.id not in ("type_mismatch", "undefined_enum_variant",
                                                    "invalid_attribute_value")]
            self._seen_attribute(name, fs)
            sample = {"name": name, "value": value if given else None}
            t = (types[i] if types else None) or (_weaver_type(value) if given else None)
            sample["type"] = t
            sample["live_check_result"] = self._entity("attribute", fs)
            out.append(sample)
        return out

    def _signal_findings(self, result: ValidationResult) -> list[Finding]:
        return [f for f in result.findings
                if f.attribute_key is None or f.id in _REQUIREMENT_IDS]

    def check_sample(self, sample: dict, where: str = "sample") -> dict:
        """Check one Weaver JSON sample; returns it with its live-check results."""
        (kind, body), = sample.items()
        v = self.validator
        if kind == "attribute":
            name = body.get("name")
            if not isinstance(name, str):
                raise LiveCheckInputError(f"{where}: an attribute sample needs a string 'name'")
            given = "value" in body and body["value"] is not None
            res = v.validate_attributes([(name, body.get("value"))] if given else [(name, None)])
            out = self._attribute_samples([(name, body.get("value"), given)], res,
                                          [body.get("type")])[0]
            out_sample = {"attribute": out}
        elif kind == "span":
            name = body.get("name")
            if not isinstance(name, str):
                raise LiveCheckInputError(f"{where}: a span sample needs a string 'name'")
            attrs = self._attributes(body.get("attributes"), where)
            res = v.validate_span(name, [(k, val) for k, val, _ in attrs])
            span = {k: val for k, val in body.items()
                    if k not in ("attributes", "span_events", "span_links")}
            span["attributes"] = self._attribute_samples(attrs, res)
            span["span_events"] = [self._span_event(e, f"{where}.span_events[{i}]")
                                   for i, e in enumerate(body.get("span_events") or [])]
            span["span_links"] = [self._span_link(e, f"{where}.span_links[{i}]")
                                  for i, e in enumerate(body.get("span_links") or [])]
            span["live_check_result"] = self._entity("span", self._signal_findings(res))
            out_sample = {"span": span}
        elif kind == "span_event":
            out_sample = {"span_event": self._span_event(body, where)}
        elif kind == "span_link":
            out_sample = {"span_link": self._span_link(body, where)}
        elif kind == "resource":
            attrs = self._attributes(body.get("attributes"), where)
            res = v.validate_attributes([(k, val) for k, val, _ in attrs])
            out = dict(body)
            out["attributes"] = self._attribute_samples(attrs, res)
            out["live_check_result"] = self._entity("resource", [])
            out_sample = {"resource": out}
        elif kind == "metric":
            out_sample = {"metric": self._metric(body, where)}
        else:      # event / log
            name = body.get("event_name", body.get("name"))
            if not isinstance(name, str):
                raise LiveCheckInputError(f"{where}: an event sample needs 'event_name'")
            attrs = self._attributes(body.get("attributes"), where)
            res = v.validate_event(name, [(k, val) for k, val, _ in attrs])
            out = dict(body)
            out["attributes"] = self._attribute_samples(attrs, res)
            out["live_check_result"] = self._entity(kind, self._signal_findings(res))
            out_sample = {kind: out}
        if self.keep_samples:
            self.samples.append(out_sample)
        return out_sample

    def _span_event(self, body: Any, where: str) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise LiveCheckInputError(f"{where}: a span event needs a string 'name'")
        attrs = self._attributes(body.get("attributes"), where)
        items = [(k, val) for k, val, _ in attrs]
        v = self.validator
        if v.compiled.event_group_of.get(body["name"], -1) >= 0:
            res = v.validate_event(body["name"], items)
        else:
            res = v.validate_attributes(items)
        out = dict(body)
        out["attributes"] = self._attribute_samples(attrs, res)
        out["live_check_result"] = self._entity("span_event", self._signal_findings(res))
        return out

    def _span_link(self, body: Any, where: str) -> dict:
        if not isinstance(body, dict):
            raise LiveCheckInputError(f"{where}: a span link must be an object")
        attrs = self._attributes(body.get("attributes"), where)
        res = self.validator.validate_attributes([(k, val) for k, val, _ in attrs])
        out = dict(body)
        out["attributes"] = self._attribute_samples(attrs, res)
        out["live_check_result"] = self._entity("span_link", [])
        return out

    def _metric(self, body: dict, where: str) -> dict:
        name = body.get("name")
        if not isinstance(name, str):
            raise LiveCheckInputError(f"{where}: a metric sample needs a string 'name'")
        v = self.validator
        instrument = body.get("instrument")
        unit = body.get("unit")
        unsupported = None
        if instrument is not None and instrument not in ("counter", "updowncounter", "gauge",
                                                         "histogram"):
            unsupported, instrument = str(instrument), None
        head = v.validate_metric(name, [], instrument=instrument, unit=unit)
        head_findings = [f for f in head.findings if f.attribute_key is None]
        if unsupported is not None and name in v.compiled.metric_group_of:
            # As Weaver's type advisor: an instrument it does not know is a violation.
            head_findings.append(Finding(
                "unexpected_instrument", FindingLevel.VIOLATION,
                f"Instrument '{unsupported}' is not supported", {"instrument": unsupported},
                "metric", name))
        if name in self._seen_metrics:
            self._seen_metrics[name] += 1
        else:
            self._seen_non_metrics[name] += 1
        out = {k: val for k, val in body.items() if k != "data_points"}
        points = []
        for i, dp in enumerate(body.get("data_points") or []):
            if not isinstance(dp, dict):
                raise LiveCheckInputError(f"{where}.data_points[{i}]: must be an object")
            attrs = self._attributes(dp.get("attributes"), f"{where}.data_points[{i}]")
            res = v.validate_metric(name, [(k, val) for k, val, _ in attrs])
            pdp = dict(dp)
            pdp["attributes"] = self._attribute_samples(attrs, res)
            kind = "histogram_data_point" if "bucket_counts" in dp else "number_data_point"
            pdp["live_check_result"] = self._entity(
                kind, [f for f in res.findings if f.id in _REQUIREMENT_IDS])
            points.append(pdp)
        out["data_points"] = points
        out["live_check_result"] = self._entity("metric", head_findings)
        return out

    # -- batches -------------------------------------------------------------------------------

    def check_batch(self, batch: Any, max_samples: int | None = None) -> BatchValidationReport:
        """Validate a knhk batch (vectorized) and record one sample per row (spans) or
        per data point (metrics), up to ``max_samples`` kept in the report; the
        statistics cover every row."""
        report = self.validator.validate_batch(batch)
        rb = batch.record_batch if hasattr(batch, "record_batch") else batch
        kinds = rb.column("kind").to_pylist()
        for row in range(report.num_rows):
            attrs = report.attribute_findings(row)
            sig = report.signal_name(row) or ""
            attr_samples = []
            for key, value, fs in attrs:
                key = key if key is not None else ""
                self._seen_attribute(key, fs)
                attr_samples.append({"name": key, "value": _jsonable(value),
                                     "type": _weaver_type(value),
                                     "live_check_result": self._entity("attribute", fs)})
            row_findings = [f for f in report.findings(row)
                            if f.attribute_key is None or f.id in _REQUIREMENT_IDS]
            if report.signal_type == "metric":
                if sig in self._seen_metrics:
                    self._seen_metrics[sig] += 1
                else:
                    self._seen_non_metrics[sig] += 1
                point = {"attributes": attr_samples,
                         "live_check_result": self._entity(
                             "number_data_point",
                             [f for f in row_findings if f.id in _REQUIREMENT_IDS])}
                sample = {"metric": {
                    "name": sig, "unit": rb.column("unit")[row].as_py() or "",
                    "instrument": _INSTRUMENTS.get(kinds[row], str(kinds[row])),
                    "data_points": [point],
                    "live_check_result": self._entity(
                        "metric", [f for f in row_findings if f.id not in _REQUIREMENT_IDS])}}
            else:
                sample = {"span": {
                    "name": sig, "kind": _KINDS.get(kinds[row], "internal"),
                    "attributes": attr_samples, "span_events": [], "span_links": [],
                    "live_check_result": self._entity("span", row_findings)}}
            if self.keep_samples and (max_samples is None or len(self.samples) < max_samples):
                self.samples.append(sample)
        return report


_INSTRUMENTS = {1: "gauge", 2: "counter", 3: "updowncounter", 4: "histogram"}


def _weaver_type(value: Any) -> str | None:
    """The type Weaver infers from a JSON value (None where it infers none).

    The inference of :func:`knhk.validation.validator._type_name`, except that
    JSON has no bytes, and objects and mixed arrays get no type at all.
    """
    if isinstance(value, dict | bytes):
        return None
    inferred = _type_name(value)
    return None if inferred == "any" else inferred


def run(validator: WeaverValidator, path: str, input_format: str = "auto",
        max_samples: int | None = None) -> LiveCheck:
    """Read ``path`` and check everything in it; returns the :class:`LiveCheck`."""
    lc = LiveCheck(validator)
    for i, (kind, item) in enumerate(read_samples(path, input_format)):
        if kind == "batch":
            try:
                lc.check_batch(item, max_samples=max_samples)
            except SchemaError as exc:
                raise LiveCheckInputError(f"{path}: batch {i}: {exc}") from None
        else:
            lc.check_sample(item, where=f"{path}: sample {i}")
    return lc
