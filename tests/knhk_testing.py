"""Helpers shared by knhk's tests (``from knhk_testing import same``).

A module of its own rather than conftest.py: conftest modules of different folders
share one import name, so importing from them is order-dependent.
"""

from __future__ import annotations

import math

import pyarrow as pa
from pyarrow import ipc


def same(a, b) -> bool:
    """Equal *and* of the same Python type, recursively (1, 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def ipc_messages(path) -> list[tuple[str, int, int, int]]:
    """(type, start, body start, stop) of every IPC message, by pyarrow's message reader."""
    out = []
    with pa.OSFile(str(path)) as f:
        f.seek(8)
        while True:
            start = f.tell()
            try:
                m = ipc.read_message(f)
            except EOFError:
                return out
            stop = f.tell()
            out.append((m.type, start, stop - (m.body.size if m.body else 0), stop))
