"""Enumerations shared by the compiled core and the public schema module."""

from __future__ import annotations

import enum

__all__ = ["BackpressureStrategy", "DropReason", "SpanKind", "SpanStatus"]


class SpanKind(enum.IntEnum):
    """OpenTelemetry SpanKind, numbered as in OTLP."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class SpanStatus(enum.IntEnum):
    """Span status code, numbered as in OTLP (0 unset, 1 ok, 2 error)."""

    UNSET = 0
    OK = 1
    ERROR = 2


class BackpressureStrategy(enum.IntEnum):
    """What the ring buffer does when ``channel_capacity`` rows are in flight.

    ``DROP_OLDEST`` evicts the oldest sealed batch not yet processed;
    ``DROP_NEWEST`` refuses the incoming span; ``BLOCK`` waits (up to the
    pipeline's block timeout) for room; ``ADAPTIVE_SAMPLING`` sheds whole
    traces by trace id as occupancy grows past half, keeps error spans as
    long as there is room, and refuses when full. Every refused or evicted
    span is counted under its :class:`DropReason`.
    """

    DROP_OLDEST = 0
    DROP_NEWEST = 1
    BLOCK = 2
    ADAPTIVE_SAMPLING = 3


class DropReason(enum.IntEnum):
    """Why the ring buffer did not deliver a span (index into its counters)."""

    QUEUE_FULL = 0
    DROPPED_OLDEST = 1
    BLOCK_TIMEOUT = 2
    ADAPTIVE_SAMPLING = 3
    SHUTDOWN = 4
    INVALID = 5

    @property
    def label(self) -> str:
        return self.name.lower()
