"""Environment variables knhk reads, each with what it means.

Values are read when a pipeline is built. A bad value is logged and the
default used: knhk is strict with arguments, lenient with the environment.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
"""``service`` of spans and metric points that name none (default ``unknown_service``)."""

KNHK_BATCH_SIZE = "KNHK_BATCH_SIZE"
"""Default rows per sealed batch when the builder sets none (default 4096)."""

KNHK_CHANNEL_CAPACITY = "KNHK_CHANNEL_CAPACITY"
"""Default rows in flight in the ring buffer when the builder sets none (default 100000)."""

OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
"""The head sampler when the builder sets none (``always_on``, ``always_off``,
``traceidratio``, ``parentbased_always_on``, ``parentbased_always_off``,
``parentbased_traceidratio``), as the OpenTelemetry SDK reads it; unset: no sampling."""

OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
"""The ratio for the ``*traceidratio`` samplers (default 1.0)."""

XDG_CACHE_HOME = "XDG_CACHE_HOME"
"""Where the compiled-registry cache lives: ``$XDG_CACHE_HOME/knhk`` (an absolute
path), else ``~/.cache/knhk``."""

KNHK_CYTHON_DEBUG = "KNHK_CYTHON_DEBUG"
"""At build time, ``1`` compiles the kernels with bounds checks (see setup.py)."""


def service_name(default: str = "unknown_service") -> str:
    return os.environ.get(OTEL_SERVICE_NAME, "").strip() or default


def positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        logger.warning("ignoring %s=%r: not a positive integer; using %d", name, raw, default)
        return default
    return value
