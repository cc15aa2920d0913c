"""OTLP/JSON for traces, as the OTLP specification maps it.

The OTLP JSON encoding is protobuf's JSON mapping with three differences:
trace and span ids are hex strings (not base64), enums are integers, and keys
are lowerCamelCase (the original names are accepted too). 64-bit integers are
decimal strings on output and may be strings or numbers on input. This module
converts between that and protobuf bytes with opentelemetry-proto's classes
and protobuf's ``json_format`` (JSON is the slow path; the binary codec in
:mod:`knhk.otlp` carries the hot one), then uses the binary codec.

Example
-------
>>> from knhk.otlp.json import decode_traces_json, encode_traces_json
>>> body = ('{"resourceSpans": [{"scopeSpans": [{"spans": [{'
...         '"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",'
...         '"name": "GET", "kind": 2, "startTimeUnixNano": "1544712660000000000",'
...         '"endTimeUnixNano": "1544712661000000000"}]}]}]}')
>>> batch = decode_traces_json(body)
>>> batch.column("trace_id").to_pylist()[0].hex(), batch.column("kind").to_pylist()
('5b8efff798038103d269b633813fc60c', [2])
>>> '"traceId": "5b8efff798038103d269b633813fc60c"' in encode_traces_json(batch)
True
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from knhk.batch import SpanBatch
from knhk.otlp import DEFAULT_MAX_DEPTH, OtlpDecodeError, decode_traces, encode_traces

__all__ = ["decode_traces_json", "encode_traces_json"]

_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _ids(obj: Any, convert) -> None:
    """Apply ``convert`` to every span / link id in a parsed OTLP JSON tree."""
    for rs in obj.get("resourceSpans", obj.get("resource_spans", [])) or []:
        for ss in rs.get("scopeSpans", rs.get("scope_spans", [])) or []:
            for span in ss.get("spans", []) or []:
                for holder in [span, *(span.get("links") or [])]:
                    for key in _ID_KEYS:
                        if key in holder and isinstance(holder[key], str):
                            holder[key] = convert(holder[key], key)


def _depth(obj: Any, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit`` levels (before protobuf recurses into it)."""
    stack = [(obj, 0)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            raise OtlpDecodeError(f"malformed OTLP/JSON request: nested deeper than {limit}")
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)


def load_request(data: str | bytes, depth_limit: int) -> dict:
    """Parse an OTLP/JSON request body into a dict, bounded in nesting."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise OtlpDecodeError(f"malformed OTLP/JSON request: {exc}") from None
    if not isinstance(obj, dict):
        raise OtlpDecodeError("malformed OTLP/JSON request: the top level must be an object")
    _depth(obj, depth_limit)
    return obj


def hex_to_b64(value: str, key: str) -> str:
    """An id as OTLP/JSON writes it (hex) -> as protobuf's JSON parser reads it (base64)."""
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise OtlpDecodeError(
            f"malformed OTLP/JSON request: {key} must be hex, got {value[:40]!r}") from None


def _b64_to_hex(value: str, key: str) -> str:
    try:
        return base64.b64decode(value).hex()
    except binascii.Error:  # pragma: no cover - protobuf wrote it
        return value


def json_to_protobuf(data: str | bytes, message: Any, depth_limit: int,
                     fix_ids: Callable[[Any, Callable[[str, str], str]], None]) -> bytes:
    """An OTLP/JSON request as the protobuf bytes of ``message`` (a request class).

    ``fix_ids(obj, convert)`` rewrites the request's hex ids in place with
    ``convert`` (JSON's hex to protobuf's base64).
    """
    obj = load_request(data, depth_limit)
    try:
        fix_ids(obj, hex_to_b64)
        msg = json_format.ParseDict(obj, message(), ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError) as exc:
        raise OtlpDecodeError(f"malformed OTLP/JSON request: {exc}") from None
    return msg.SerializeToString()


def protobuf_to_json(wire: bytes, message: Any,
                     fix_ids: Callable[[Any, Callable[[str, str], str]], None]) -> str:
    """The inverse of :func:`json_to_protobuf`: hex ids, enums as integers."""
    obj = json_format.MessageToDict(message.FromString(wire), use_integers_for_enums=True)
    fix_ids(obj, _b64_to_hex)
    return json.dumps(obj, separators=(", ", ": "))


def decode_traces_json(data: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH,
                       default_service: str = "unknown_service") -> SpanBatch:
    """Decode an OTLP/JSON ``ExportTraceServiceRequest`` into a :class:`SpanBatch`.

    Raises
    ------
    OtlpDecodeError
        Not JSON, not the request's shape, or an id that is not hex.
    """
    # AnyValue nesting costs about 4 JSON levels per level
    wire = json_to_protobuf(data, ExportTraceServiceRequest, 4 * max_depth + 16, _ids)
    return decode_traces(wire, max_depth=max_depth, default_service=default_service)


def encode_traces_json(batch: SpanBatch) -> str:
    """Encode a span batch as an OTLP/JSON ``ExportTraceServiceRequest`` string."""
    return protobuf_to_json(encode_traces(batch), ExportTraceServiceRequest, _ids)
