"""OpenTelemetry -> Prometheus names, label values and sample values.

The rules are those of OpenTelemetry's Prometheus compatibility specification
(and the Collector's ``pkg/translator/prometheus`` normalization): characters
outside ``[a-zA-Z0-9_:]`` become ``_``, runs of ``_`` collapse, a UCUM unit
becomes a word suffix (``ms`` -> ``_milliseconds``, ``By/s`` ->
``_bytes_per_second``, ``{requests}`` is dropped, ``1`` -> ``_ratio`` for
gauges), monotonic sums end in ``_total``. Label names that collide after
sanitizing have their values joined with ``;`` in the order of the original keys.

Example
-------
>>> from knhk.exporters._prom_names import metric_name, label_name, escape_label_value
>>> metric_name("http.server.request.duration", "s", "histogram")
'http_server_request_duration_seconds'
>>> metric_name("system.network.dropped", "{packets}", "counter")
'system_network_dropped_total'
>>> label_name("0http.method"), label_name("__meta")
('key_0http_method', 'key__meta')
>>> escape_label_value('x"} 1\\nfake_metric 1')
'x\\\\"} 1\\\\nfake_metric 1'
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "escape_help",
    "escape_label_value",
    "format_value",
    "label_name",
    "label_pairs",
    "label_value",
    "labels_text",
    "metric_name",
]

_INVALID_METRIC = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_UNDERSCORES = re.compile(r"__+")
_SURROGATES = re.compile("[\ud800-\udfff]")

# UCUM units as Prometheus suffixes (the Collector's table, abridged to common units)
_UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes", "bit": "bits", "Kibit": "kibibits", "Mibit": "mebibits",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts",
    "g": "grams", "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week",
              "mo": "month", "y": "year"}


def _clean(text: str) -> str:
    """Invalid characters to ``_``, runs of ``_`` to one, no ``_`` at either end."""
    return _UNDERSCORES.sub("_", _INVALID_METRIC.sub("_", text)).strip("_")


def _unit_words(unit: str | None, prom_type: str) -> list[str]:
    if not unit:
        return []
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if not unit:
        return []
    if unit == "1":
        return ["ratio"] if prom_type == "gauge" else []
    main, _, per = unit.partition("/")
    words = []
    main_word = _UNITS.get(main, _clean(main)) if main else ""
    if main_word:
        words.append(main_word)
    if per:
        per_word = _PER_UNITS.get(per, _clean(per))
        if per_word:
            words += ["per", per_word]
    return [w for w in "_".join(words).split("_") if w]


def metric_name(name: str, unit: str | None, prom_type: str) -> str:
    """The Prometheus family name of an OpenTelemetry metric.

    Parameters
    ----------
    name : str
        The OpenTelemetry metric name.
    unit : str or None
        Its UCUM unit (``"ms"``, ``"By"``, ``"{requests}"``, ``"1"``).
    prom_type : {"counter", "gauge", "histogram"}
        The Prometheus type it is exposed as (a monotonic sum is a counter, and
        gets ``_total``; ``1`` becomes ``_ratio`` on gauges only).

    Returns
    -------
    str
        A name matching ``[a-zA-Z_:][a-zA-Z0-9_:]*``.

    Examples
    --------
    >>> metric_name("requests", "1", "counter"), metric_name("cpu.util", "1", "gauge")
    ('requests_total', 'cpu_util_ratio')
    >>> metric_name("io", "By/s", "gauge"), metric_name("9lives", "", "gauge")
    ('io_bytes_per_second', '_9lives')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a metric name must be a non-empty str, got {name!r}")
    parts = [p for p in _clean(name).split("_") if p]
    if prom_type == "counter" and parts and parts[-1] == "total":
        parts.pop()  # re-added last, after the unit
    for word in _unit_words(unit, prom_type):
        if word not in parts:
            parts.append(word)
    if prom_type == "counter":
        parts.append("total")
    out = "_".join(parts) or "_"
    if out[0].isdigit():
        out = "_" + out
    return out


def label_name(key: str) -> str:
    """A Prometheus label name for attribute ``key``.

    Invalid characters become ``_``; a name starting with a digit gets the
    prefix ``key_``, one starting with ``__`` (reserved) the prefix ``key``.

    Examples
    --------
    >>> label_name("http.response.status_code"), label_name("")
    ('http_response_status_code', 'key_')
    """
    out = _INVALID_LABEL.sub("_", key)
    if not out or out[0].isdigit():
        out = "key_" + out
    elif out.startswith("__"):
        out = "key" + out
    return out


def _format_float(v: float) -> str:
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def format_value(v: Any) -> str:
    """A sample value as the text formats write it (``NaN``, ``+Inf``, ``-Inf``).

    Examples
    --------
    >>> [format_value(x) for x in (3, 2.5, float("nan"), float("-inf"), 1e20)]
    ['3', '2.5', 'NaN', '-Inf', '1e+20']
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return _format_float(float(v))


def label_value(value: Any) -> str:
    """An attribute value as a label value string.

    Strings as they are (invalid UTF-8 such as lone surrogates replaced by
    U+FFFD), bools as ``true``/``false``, numbers in decimal, bytes as base64
    (as OTLP/JSON writes them), arrays and maps as JSON.

    Examples
    --------
    >>> label_value(True), label_value(7), label_value(b"\\xff\\xfe"), label_value([1, "a"])
    ('true', '7', '//4=', '[1,"a"]')
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape)
            value = _SURROGATES.sub("\ufffd", value)
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def escape_label_value(value: str) -> str:
    r"""Escape ``\``, ``"`` and newline as both text formats require."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str, openmetrics: bool = False) -> str:
    r"""Escape a HELP text: ``\`` and newline; ``"`` too in OpenMetrics (the text
    format 0.0.4 reads ``\"`` in HELP as two characters)."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if openmetrics else text


def label_pairs(attributes: Iterable[tuple[str, Any]]) -> tuple[tuple[str, str], ...]:
    """Attribute ``(key, value)`` pairs -> sorted ``(label, value)`` pairs.

    Keys that sanitize to the same label have their values joined with ``;``
    in the order of the original keys (as the specification says); a later
    duplicate of the very same key replaces the earlier one.

    Examples
    --------
    >>> label_pairs([("a.b", 1), ("a_b", "x"), ("c", True)])
    (('a_b', '1;x'), ('c', 'true'))
    """
    by_key: dict[str, str] = {}
    for key, value in attributes:
        by_key[str(key)] = label_value(value)
    merged: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(by_key):
        merged.setdefault(label_name(key), []).append((key, by_key[key]))
    return tuple(sorted((name, ";".join(v for _, v in items))
                        for name, items in merged.items()))


def labels_text(pairs: Iterable[tuple[str, str]]) -> str:
    """``name="value",...`` (escaped; no braces) for sorted label pairs.

    Examples
    --------
    >>> labels_text([("a", 'q"'), ("b", "x\\ny")])
    'a="q\\\\"",b="x\\\\ny"'
    """
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
