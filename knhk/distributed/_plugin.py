"""The worker plugin of the clusters :func:`knhk.distributed.connect` starts.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
fixes glibc's mmap threshold at 128 KiB: every NumPy or Arrow buffer above
that is then mapped and unmapped anew, and the page faults made knhk's
per-file tasks about 60 % slower in a worker than in a plain process. The
plugin raises both thresholds in each worker (and in workers restarted after
a crash); memory a task frees is then returned to the system once 256 MiB of
it is free rather than 64 KiB.

Example
-------
>>> from knhk.distributed._plugin import tune_allocator
>>> isinstance(tune_allocator(), bool)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

from distributed import WorkerPlugin

logger = logging.getLogger(__name__)

__all__ = ["AllocatorPlugin", "tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(trim_bytes: int = 256 << 20, mmap_bytes: int = 64 << 20) -> bool:
    """Set glibc's trim and mmap thresholds in this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes)) and bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_bytes))


class AllocatorPlugin(WorkerPlugin):
    """Runs :func:`tune_allocator` in every worker of the cluster."""

    name = "knhk-allocator"

    def setup(self, worker: Any) -> None:
        if not tune_allocator():
            logger.info("knhk: glibc allocator thresholds not set (no glibc mallopt)")
