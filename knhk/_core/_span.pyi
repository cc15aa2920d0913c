# Stubs for knhk._core._span (C types in comments).
from typing import Any

from knhk._enums import SpanKind, SpanStatus

class Span:
    name: str
    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    parent_span_id: bytes | None  # 8 bytes
    attributes: dict[str, Any] | None
    start_time_ns: int  # int64_t
    end_time_ns: int  # int64_t
    status_message: str | None
    service: str | None
    events: list[SpanEvent] | None
    links: list[SpanLink] | None
    trace_state: str | None
    flags: int  # uint32_t
    resource_attributes: dict[str, Any] | None
    scope_name: str | None
    scope_version: str | None
    def __init__(
        self,
        name: str,
        trace_id: bytes | str | int,
        span_id: bytes | str | int,
        parent_span_id: bytes | str | int | None = ...,
        attributes: dict[str, Any] | None = ...,
        duration_ns: int | None = ...,
        status: SpanStatus | int = ...,
        start_time_ns: int | None = ...,
        end_time_ns: int | None = ...,
        kind: SpanKind | int = ...,
        service: str | None = ...,
        events: list[SpanEvent | dict[str, Any]] | None = ...,
        links: list[SpanLink | dict[str, Any]] | None = ...,
        status_message: str | None = ...,
        trace_state: str | None = ...,
        flags: int = ...,
        resource_attributes: dict[str, Any] | None = ...,
        scope_name: str | None = ...,
        scope_version: str | None = ...,
    ) -> None: ...
    @property
    def kind(self) -> SpanKind: ...  # int8_t
    @property
    def status(self) -> SpanStatus: ...  # int8_t
    @property
    def duration_ns(self) -> int: ...
    def is_root(self) -> bool: ...

class SpanEvent:
    name: str
    time_ns: int  # int64_t
    attributes: dict[str, Any] | None
    dropped_attributes_count: int  # uint32_t
    def __init__(self, name: str, time_ns: int | None = ...,
                 attributes: dict[str, Any] | None = ...,
                 dropped_attributes_count: int = ...) -> None: ...

class SpanLink:
    trace_id: bytes
    span_id: bytes
    trace_state: str | None
    flags: int  # uint32_t
    attributes: dict[str, Any] | None
    dropped_attributes_count: int  # uint32_t
    def __init__(self, trace_id: bytes | str | int, span_id: bytes | str | int,
                 trace_state: str | None = ..., flags: int = ...,
                 attributes: dict[str, Any] | None = ...,
                 dropped_attributes_count: int = ...) -> None: ...
