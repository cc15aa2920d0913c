"""Lazy, column-selective, time-pruned reading of knhk recordings (what a lazy Dataset holds).

A :class:`Scanner` stands for the span files of a recording without holding
their batches. :meth:`Scanner.index` reads every file once and keeps, per
record batch, its row count and start-time range (a few integers a batch);
:meth:`Scanner.read` then reads the batches a plan asks for, only the
columns asked for: Arrow IPC files give random access to record batches
through their footer, and ``IpcReadOptions(included_fields=...)`` makes
pyarrow decompress and decode only the buffers of those fields (the lz4 / zstd
frames of other columns are skipped, not decoded).

Integrity is :mod:`knhk.replay`'s: the first time a file is read (and again if
its size or modification time changes) it is read whole through the replay
reader, so every batch is validated and its CRC-32 checked, and damage raises
:class:`~knhk.errors.CorruptFileError` naming the file and byte offset. Later
passes over a verified file read only the columns they need; those columns are
still validated (``RecordBatch.validate(full=True)``) before use.

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters.ipc import IpcExporter
>>> from knhk.workload import generate, WorkloadConfig
>>> tmp = tempfile.TemporaryDirectory()
>>> recorder = IpcExporter(tmp.name)
>>> _ = recorder.export(generate(1_000, WorkloadConfig(seed=1)))
>>> recorder.shutdown()
>>> scanner = Scanner(recorder.files)
>>> sum(b.rows for b in scanner.index())
1000
>>> [rb.num_columns for _, _, rb in scanner.read(["trace_id", "service"], scanner.index())]
[2]
>>> tmp.cleanup()
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as ipc

from knhk._ipc_format import file_schema, has_dictionary, map_dictionaries
from knhk.batch import SpanBatch
from knhk.errors import CorruptFileError
from knhk.schema import METRIC_SCHEMA, SPAN_SCHEMA

__all__ = ["BatchInfo", "Scanner", "projected_schema"]

logger = logging.getLogger(__name__)

_INDEX_COLUMNS = ("start_time_ns",)


@dataclass(frozen=True)
class BatchInfo:
    """One record batch of a span file: where it is and what the index knows of it."""

    file: int
    batch: int
    rows: int
    min_start: int
    max_start: int


def projected_schema(columns: Sequence[str] | None) -> pa.Schema:
    """``SPAN_SCHEMA`` restricted to ``columns`` (in that order), its metadata kept."""
    if columns is None:
        return SPAN_SCHEMA
    return pa.schema([SPAN_SCHEMA.field(c) for c in columns], metadata=SPAN_SCHEMA.metadata)


def check_columns(columns: Iterable[str] | None, where: str) -> tuple[str, ...] | None:
    """``columns`` as a tuple of span column names; ValueError naming unknown ones."""
    if columns is None:
        return None
    if isinstance(columns, str):
        raise TypeError(f"{where}: columns must be a list of column names, not a string")
    out = tuple(columns)
    unknown = [c for c in out if c not in SPAN_SCHEMA.names]
    if unknown:
        raise ValueError(f"{where}: no span column named {', '.join(map(repr, unknown))}; "
                         f"the columns are {', '.join(SPAN_SCHEMA.names)}")
    if not out:
        raise ValueError(f"{where}: columns is empty; name at least one column")
    return tuple(dict.fromkeys(out))


def _peek_signal(path: str) -> str | None:
    """'spans' / 'metrics' from the file's schema alone; None if it cannot be read now.

    A file whose schema cannot be read is treated as a span file: reading it
    then raises the replay reader's worded error, with the offset.
    """
    try:
        schema = file_schema(path)
    except (pa.ArrowException, OSError, ValueError):
        return None
    if schema.equals(METRIC_SCHEMA):
        return "metrics"
    return "spans"


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _compact_batch(rb: pa.RecordBatch) -> pa.RecordBatch:
    """Shrink every dictionary to the values the batch uses, as the replay reader does."""
    from knhk.replay import _compact, _compact_empty

    cols = [map_dictionaries(rb.column(i), f.name, _compact, _compact_empty)
            if has_dictionary(f.type) else rb.column(i) for i, f in enumerate(rb.schema)]
    return pa.RecordBatch.from_arrays(cols, schema=rb.schema)


class Scanner:
    """The span files of a recording, read on demand, column by column.

    Parameters
    ----------
    paths : list of str
        Expanded file paths (``knhk.replay._expand``), in read order.
    verify : bool
        Check every batch's checksum the first time its file is read.
    """

    def __init__(self, paths: Sequence[str], *, verify: bool = True) -> None:
        self.paths = list(paths)
        self.verify = bool(verify)
        self.signals = [_peek_signal(p) for p in self.paths]
        self.span_files = [i for i, s in enumerate(self.signals) if s != "metrics"]
        self.nbytes = sum(os.path.getsize(p) for p in self.paths)
        self._index: list[BatchInfo] | None = None
        self._verified: dict[int, tuple[int, int]] = {}  # file -> stat when verified
        self._lock = threading.Lock()

    # -- the index ----------------------------------------------------------------------

    @property
    def indexed(self) -> bool:
        return self._index is not None

    def index(self) -> list[BatchInfo]:
        """Every span batch with its row count and start-time range (one pass, then cached)."""
        with self._lock:
            if self._index is None:
                out: list[BatchInfo] = []
                for f in self.span_files:
                    for b, rb in self._read_file(f, _INDEX_COLUMNS, None, compact=False):
                        start = rb.column(0).to_numpy()
                        lo, hi = (int(start.min()), int(start.max())) if len(start) else (0, -1)
                        out.append(BatchInfo(f, b, rb.num_rows, lo, hi))
                self._index = out
                logger.debug("indexed %d files: %d batches, %d spans", len(self.span_files),
                             len(out), sum(i.rows for i in out))
            return self._index

    # -- reading ------------------------------------------------------------------------

    def read(self, columns: Sequence[str] | None, batches: Iterable[BatchInfo], *,
             compact: bool = True) -> Iterator[tuple[int, int, pa.RecordBatch]]:
        """``(file, batch, record batch)`` for each of ``batches``, with only ``columns``.

        Batches come file by file, each file's in order. ``columns=None`` reads
        every column. ``compact=False`` leaves each dictionary column with its
        file's whole dictionary (cheaper; the values are the same).
        """
        by_file: dict[int, list[int]] = {}
        for info in batches:
            by_file.setdefault(info.file, []).append(info.batch)
        cols = None if columns is None else tuple(columns)
        for f, wanted in by_file.items():
            missing = set(wanted)
            for b, rb in self._read_file(f, cols, set(wanted), compact=compact):
                missing.discard(b)
                yield f, b, rb
            if missing:
                # the file was replaced or cut since the index: never skip batches silently
                path = self.paths[f]
                size = os.path.getsize(path)
                raise CorruptFileError(
                    f"{path}: record batch {min(missing)} is gone: the file changed since the "
                    "dataset first read it (open the recording again)",
                    path=path, offset=size, batches_read=min(missing))

    def _read_file(self, f: int, columns: tuple[str, ...] | None, wanted: set[int] | None,
                   *, compact: bool) -> Iterator[tuple[int, pa.RecordBatch]]:
        from knhk.replay import ReplayStats, _read_file

        path = self.paths[f]
        try:
            stat = _stat(path)
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc}") from exc
        if self.verify and self._verified.get(f) != stat:
            # the replay reader: every batch validated and checksummed, worded errors
            for b, batch in enumerate(_read_file(path, ReplayStats(), True)):
                if not isinstance(batch, SpanBatch):
                    break
                if wanted is None or b in wanted:
                    rb = batch.record_batch
                    yield b, rb if columns is None else rb.select(list(columns))
            self._verified[f] = stat
            return
        yield from self._read_projected(path, columns, wanted, compact)

    def _read_projected(self, path: str, columns: tuple[str, ...] | None,
                        wanted: set[int] | None, compact: bool
                        ) -> Iterator[tuple[int, pa.RecordBatch]]:
        from knhk.replay import _corrupt, _FileScan, _map_file, _short, _signal_schema, _verify

        names = SPAN_SCHEMA.names
        fields = sorted(names.index(c) for c in (columns or names))
        options = ipc.IpcReadOptions(included_fields=fields)
        with _map_file(path) as source:
            data = source.read_buffer()
            scan = _FileScan(path, data)
            if not scan.messages or scan.messages[0].kind != "schema":
                offset, what = scan.fault or (scan.start, "the file holds no schema")
                raise _corrupt(path, offset, what, 0)
            random_access = scan.fault is None and scan.footer_schema is not None
            try:
                if random_access:
                    reader = ipc.open_file(data, options=options)
                    count = reader.num_record_batches
                else:
                    reader = ipc.open_stream(
                        data.slice(scan.start, scan.valid_end - scan.start), options=options)
                    count = len(scan.regions)
                full = ipc.open_stream(data.slice(scan.start, scan.valid_end - scan.start)).schema
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise _corrupt(path, scan.start, f"damaged schema: {_short(exc)}", 0) from None
            if _signal_schema(path, full) is not SPAN_SCHEMA:
                return
            for b in range(count):
                if not random_access:
                    try:
                        rb = reader.read_next_batch()
                    except StopIteration:
                        break
                    except (pa.ArrowException, OSError) as exc:
                        raise _corrupt(path, scan.batch_region(b), _short(exc), b) from None
                    if wanted is not None and b not in wanted:
                        continue
                elif wanted is not None and b not in wanted:
                    continue
                else:
                    try:
                        rb = reader.get_batch(b)
                    except (pa.ArrowException, OSError) as exc:
                        raise _corrupt(path, scan.batch_region(b), _short(exc), b) from None
                problem = _verify(rb, None, False)
                if problem is not None:
                    raise _corrupt(path, scan.batch_region(b), problem, b)
                if compact:
                    rb = _compact_batch(rb)
                rb = rb.replace_schema_metadata(SPAN_SCHEMA.metadata)
                yield b, rb if columns is None else rb.select(list(columns))
            if scan.fault is not None:
                raise _corrupt(path, scan.fault[0], scan.fault[1], count)

