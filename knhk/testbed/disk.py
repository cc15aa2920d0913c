"""Damage done on purpose to a persistent exporter queue, for the crash scenarios.

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters._persistent_queue import PersistentQueue
>>> tmp = tempfile.TemporaryDirectory()
>>> q = PersistentQueue(tmp.name)
>>> for i in (1, 2):
...     _ = q.append(knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=i,
...                                              start_time_ns=0, duration_ns=5)]))
>>> q.close()
>>> len(corrupt_record(tmp.name, 0))
1
>>> q2 = PersistentQueue(tmp.name)
>>> len(q2.replay()), q2.stats()["records_corrupted"]
(1, 1)
>>> q2.close(); tmp.cleanup()
"""

from __future__ import annotations

import os

from knhk.exporters._persistent_queue import _HEADER, _MAGIC, _decode

__all__ = ["corrupt_record", "records_on_disk"]


def records_on_disk(directory: str) -> list[tuple[str, int, int, set]]:
    """``(segment path, offset, seq, span ids)`` of every sound record, oldest first."""
    out = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("segment-") and name.endswith(".knq")):
            continue
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + _HEADER.size <= len(data):
            magic, kind, seq, length, _crc = _HEADER.unpack_from(data, pos)
            if magic != _MAGIC:
                break
            payload = data[pos + _HEADER.size:pos + _HEADER.size + length]
            ids = set(_decode(kind, payload).column("span_id").to_pylist())
            out.append((path, pos, seq, ids))
            pos += _HEADER.size + length
    return out


def corrupt_record(directory: str, index: int) -> set:
    """Flip one payload byte of the ``index``-th record on disk; return its span ids."""
    records = records_on_disk(directory)
    if not records:
        raise ValueError(f"no records in {directory!r} to corrupt")
    path, offset, _seq, ids = records[index]
    with open(path, "r+b") as f:
        f.seek(offset + _HEADER.size + 40)
        byte = f.read(1)
        f.seek(offset + _HEADER.size + 40)
        f.write(bytes([byte[0] ^ 0xFF]))
    return ids
