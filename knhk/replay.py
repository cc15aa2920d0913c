"""Read recorded Arrow IPC files back, as batches or through a pipeline.

:func:`read_batches` turns one file, a list of files, a glob or a directory
into :class:`~knhk.SpanBatch` / :class:`~knhk.MetricBatch` objects;
:func:`replay` feeds the span batches into a :class:`~knhk.TelemetryPipeline`,
as fast as possible or paced by the recorded timestamps.

Files are those :class:`~knhk.exporters.ipc.IpcExporter` writes (IPC *file*
format, ``.arrow``) or IPC *stream* files (``.arrows``) in knhk's schemas.
Recovery and errors:

* A file without a footer (its writer crashed, or is still writing) is read as
  the stream it contains; its complete batches are delivered.
* A file cut in the middle of a message, or with a damaged message, checksum
  or footer, raises :class:`~knhk.errors.CorruptFileError` after every batch
  before the damage has been delivered. It names the file and the byte offset
  where reading failed: the start of the batch's messages (its dictionary
  deltas, then the batch) or of the message that could not be parsed. Damage
  to a length or to the schema can show only at a later message, so the
  damaged byte is at or before the end of the message named, not always
  after the offset.
* Every batch is validated (``RecordBatch.validate(full=True)``) before it is
  touched: pyarrow's IPC reader does not, and damaged offsets can otherwise
  crash the process. Batches written by knhk also carry a CRC-32 that is
  checked, because a flipped bit in a data buffer is otherwise invisible.

Each batch comes back with its dictionaries shrunk to the values it uses, in
order of first use (how knhk's ring buffer builds them), so a ring-built batch
reads back equal to what was recorded, ``RecordBatch.equals`` included.

Example
-------
>>> import tempfile, knhk
>>> from knhk.exporters.ipc import IpcExporter
>>> tmp = tempfile.TemporaryDirectory()
>>> recorder = IpcExporter(tmp.name)
>>> _ = recorder.export(knhk.SpanBatch.from_spans(
...     [knhk.Span("GET /", trace_id=1, span_id=s, start_time_ns=s * 1000) for s in (1, 2)]))
>>> recorder.shutdown()
>>> sink = knhk.InMemoryExporter()
>>> with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as pipeline:
...     stats = replay(recorder.files, pipeline)
>>> stats.spans, stats.rows_accepted, sink.spans().num_rows
(2, 2, 2)
>>> tmp.cleanup()
"""

from __future__ import annotations

import glob
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from knhk._ipc_format import (
    CRC_KEY,
    DICT_KEY,
    batch_crc,
    has_dictionary,
    map_dictionaries,
    parse_deltas,
)
from knhk.batch import MetricBatch, SpanBatch
from knhk.errors import CorruptFileError, SchemaError
from knhk.schema import METRIC_SCHEMA, SPAN_SCHEMA

logger = logging.getLogger(__name__)

__all__ = ["ReplayStats", "read_batches", "replay"]

_FILE_MAGIC = b"ARROW1"
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_GLOB_CHARS = frozenset("*?[")
_EXTENSIONS = (".arrow", ".arrows")
Source = str | os.PathLike


@dataclass
class ReplayStats:
    """What :func:`replay` (or a :func:`read_batches` run) read and fed.

    ``rows_accepted`` counts spans the pipeline took, ``metric_points_accepted``
    metric points (fed through ``record_metric_batch``).
    """

    files: int = 0
    batches: int = 0
    spans: int = 0
    metric_points: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    rows_accepted: int = 0
    metric_points_accepted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- sources ------------------------------------------------------------------------


def _expand(sources: Source | Iterable[Source]) -> list[str]:
    if isinstance(sources, str | os.PathLike):
        items = [sources]
    else:
        try:
            items = list(sources)
        except TypeError:
            raise TypeError(
                "sources must be a path, a glob string, a directory or a list of those; "
                f"got {type(sources).__name__}") from None
        if not items:
            raise ValueError("no sources given: pass a path, a glob or a list of paths")
    paths: list[str] = []
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise TypeError(f"a source must be a path or glob string, got {item!r}")
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(glob.escape(item), "*"))
                           if p.endswith(_EXTENSIONS) and os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"no .arrow or .arrows files in directory {item!r}")
            paths.extend(found)
        elif _GLOB_CHARS & set(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"no files match {item!r}")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file: {item!r}")
    return paths


# -- one file -----------------------------------------------------------------------------


@dataclass
class _Message:
    kind: str
    start: int
    stop: int


class _FileScan:
    """Where the messages of one IPC file (or stream) are, and where it breaks."""

    def __init__(self, path: str, data: pa.Buffer) -> None:
        self.path = path
        self.size = data.size
        head = data.slice(0, min(8, data.size)).to_pybytes()
        self.file_format = head.startswith(_FILE_MAGIC)
        self.start = 8 if self.file_format else 0
        self.messages: list[_Message] = []
        self.end_of_stream = False  # an end-of-stream marker was read
        self.fault: tuple[int, str] | None = None  # (offset, what)
        self.regions: list[int] = []  # per record batch: where its messages begin
        self.footer_schema: pa.Schema | None = None
        if not self.file_format and not head.startswith(b"\xff\xff\xff\xff"):
            self.fault = (0, "not an Arrow IPC file or stream (no ARROW1 magic, "
                             "no stream message)")
            return
        pos = self._walk(data)
        region = self.start
        for m in self.messages:
            if m.kind == "record batch":
                self.regions.append(region)
                region = m.stop
            elif m.kind == "schema":
                region = m.stop
        if self.fault is None and self.end_of_stream:
            if self.file_format:
                self._check_footer(data, pos)
            elif pos != self.size:
                self.fault = (pos, f"{self.size - pos} bytes follow the end-of-stream marker")

    def _walk(self, data: pa.Buffer) -> int:
        reader = pa.BufferReader(data)
        reader.seek(self.start)
        pos = self.start
        while pos < self.size:
            try:
                message = ipc.read_message(reader)
            except EOFError:
                marker = data.slice(pos, 8).to_pybytes()
                if marker != _EOS:
                    self.fault = (pos, "a message is cut short")
                else:
                    self.end_of_stream = True
                    pos += len(_EOS)
                return pos
            except (pa.ArrowException, OSError) as exc:
                self.fault = (pos, _short(exc))
                return pos
            stop = reader.tell()
            self.messages.append(_Message(message.type, pos, stop))
            pos = stop
        return pos

    def _check_footer(self, data: pa.Buffer, footer_start: int) -> None:
        tail = data.slice(max(0, self.size - 10)).to_pybytes()
        if len(tail) < 10 or not tail.endswith(_FILE_MAGIC):
            self.fault = (footer_start, "the footer is missing or cut "
                                        f"({self.size - footer_start} bytes after the stream)")
            return
        (length,) = struct.unpack("<i", tail[:4])
        if length <= 0 or footer_start + length + 10 != self.size:
            self.fault = (footer_start, f"the footer length ({length}) does not fit the file")
            return
        try:
            footer = ipc.open_file(data)
            n = footer.num_record_batches
            self.footer_schema = footer.schema
        except (pa.ArrowException, OSError) as exc:
            self.fault = (footer_start, f"the footer is damaged: {_short(exc)}")
            return
        recorded = sum(1 for m in self.messages if m.kind == "record batch")
        if n != recorded:
            self.fault = (footer_start, f"the footer lists {n} record batches, the file "
                                        f"holds {recorded}")

    @property
    def valid_end(self) -> int:
        """Offset just past the last complete message."""
        return self.messages[-1].stop if self.messages else self.start

    def batch_region(self, i: int) -> int:
        """Offset where record batch ``i`` begins, its dictionary messages included."""
        return self.regions[i] if i < len(self.regions) else self.valid_end


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _corrupt(path: str, offset: int, what: str, batches: int) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: corrupt or truncated Arrow IPC data at byte offset {offset}: {what} "
        f"({batches} batches before it were read)",
        path=path, offset=offset, batches_read=batches)


def _signal_schema(path: str, schema: pa.Schema) -> pa.Schema:
    meta = schema.metadata or {}
    for expected in (SPAN_SCHEMA, METRIC_SCHEMA):
        if schema.equals(expected):
            version = meta.get(b"knhk.schema")
            want = expected.metadata[b"knhk.schema"]
            if version is not None and version != want:
                raise SchemaError(
                    f"{path}: the file holds knhk schema {version.decode(errors='replace')!r}; "
                    f"this knhk reads {want.decode()!r}")
            return expected
    raise SchemaError(f"{path}: the file's schema is neither knhk's span nor metric schema "
                      f"(columns: {', '.join(schema.names)})")


def _compact(path: str, arr: pa.DictionaryArray) -> pa.DictionaryArray:
    """Shrink ``arr``'s dictionary to the values it uses, in order of first use."""
    indices = arr.indices
    n_dict = len(arr.dictionary)
    if indices.null_count:
        valid = np.asarray(indices.is_valid().to_numpy(zero_copy_only=False))
        codes = indices.fill_null(0).to_numpy()[valid]
    else:
        valid = None
        codes = indices.to_numpy()
    if codes.size == 0:
        if n_dict == 0:
            return arr
        return pa.DictionaryArray.from_arrays(indices, arr.dictionary.slice(0, 0), safe=False)
    if n_dict <= 4 * codes.size + 1024:
        # O(rows + dictionary): each dictionary position's first row.
        first = np.full(n_dict, codes.size, dtype=np.int64)
        np.minimum.at(first, codes, np.arange(codes.size))
        present = np.flatnonzero(first < codes.size)
        used = present[np.argsort(first[present], kind="stable")]
        if used.size == n_dict and bool(np.all(used == np.arange(n_dict))):
            return arr
        lut = np.zeros(n_dict, dtype=np.int32)
        lut[used] = np.arange(used.size, dtype=np.int32)
        new_codes = lut[codes]
    else:  # a dictionary much larger than the batch: sort the batch's codes instead
        uniq, first_pos, inverse = np.unique(codes, return_index=True, return_inverse=True)
        order = np.argsort(first_pos, kind="stable")
        used = uniq[order]
        rank = np.empty(order.size, dtype=np.int32)
        rank[order] = np.arange(order.size, dtype=np.int32)
        new_codes = rank[inverse.ravel()]
    if valid is not None:
        full = np.zeros(len(indices), dtype=np.int32)
        full[valid] = new_codes
        new_indices = pa.array(full, mask=~valid)
    else:
        new_indices = pa.array(new_codes)
    dictionary = arr.dictionary.take(pa.array(used.astype(np.int32)))
    return pa.DictionaryArray.from_arrays(new_indices, dictionary, safe=False)


_EMPTY: dict[pa.DataType, pa.Array] = {}


def _compact_empty(path: str, arr: pa.Array) -> pa.Array:
    """An empty array needs no values in its dictionaries."""
    out = _EMPTY.get(arr.type)
    if out is None:
        out = _EMPTY[arr.type] = pa.array([], type=arr.type)
    return out


def _finish(rb: pa.RecordBatch, schema: pa.Schema) -> SpanBatch | MetricBatch:
    columns = [map_dictionaries(rb.column(i), f.name, _compact, _compact_empty)
               if has_dictionary(f.type) else rb.column(i)
               for i, f in enumerate(rb.schema)]
    out = pa.RecordBatch.from_arrays(columns, schema=schema)
    return SpanBatch._wrap(out) if schema is SPAN_SCHEMA else MetricBatch(out)


def _verify(rb: pa.RecordBatch, meta: Any, checksum: bool) -> str | None:
    """None if ``rb`` is intact, else what is wrong with it."""
    # Full validation first, always: pyarrow's IPC reader does not validate, and
    # serializing or slicing a batch with damaged offsets aborts the process.
    try:
        rb.validate(full=True)
    except pa.ArrowException as exc:
        return f"invalid batch: {_short(exc)}"
    raw = dict(meta) if meta is not None else {}
    expected = raw.get(CRC_KEY)
    if not checksum or expected is None:
        return None
    try:
        deltas = parse_deltas(raw.get(DICT_KEY, b""))
        actual = batch_crc(rb, deltas)
        if actual != int(expected, 16):
            return f"checksum mismatch (recorded {expected.decode()}, computed {actual:08x})"
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, pa.ArrowException) as exc:
        return f"damaged batch metadata: {_short(exc)}"
    return None


def _map_file(path: str) -> pa.MemoryMappedFile:
    """``path`` memory-mapped; an OSError naming it when it cannot be."""
    try:
        return pa.memory_map(path)
    except (OSError, pa.ArrowException) as exc:
        raise OSError(f"cannot open {path}: {exc}") from exc


def _read_file(path: str, stats: ReplayStats, verify: bool
               ) -> Iterator[SpanBatch | MetricBatch]:
    with _map_file(path) as source:
        data = source.read_buffer()
        stats.files += 1
        scan = _FileScan(path, data)
        consumed = scan.valid_end
        try:
            yield from _decode(path, scan, data, verify)
            consumed = scan.size
        finally:
            stats.bytes_read += consumed
        if scan.file_format and not scan.end_of_stream and scan.fault is None:
            logger.warning("%s has no footer (its writer crashed or is still writing); "
                           "read the %d complete batches it holds", path, len(scan.regions))


def _decode(path: str, scan: _FileScan, data: pa.Buffer, verify: bool
            ) -> Iterator[SpanBatch | MetricBatch]:
    if not scan.messages:
        offset, what = scan.fault or (scan.start, "the file holds no schema")
        raise _corrupt(path, offset, what, 0)
    if scan.messages[0].kind != "schema":
        raise _corrupt(path, scan.start, "the first message is not a schema", 0)
    try:
        reader = ipc.open_stream(data.slice(scan.start, scan.valid_end - scan.start))
        found = reader.schema
        if scan.footer_schema is not None and not found.equals(
                scan.footer_schema, check_metadata=True):
            raise ValueError("the schema differs from the footer's copy of it")
        found.names  # noqa: B018 -- decoding fails on damaged names
    except (pa.ArrowException, OSError, ValueError) as exc:  # UnicodeDecodeError too
        raise _corrupt(path, scan.start, f"damaged schema: {_short(exc)}", 0) from None
    schema = _signal_schema(path, found)
    batches = 0
    while True:
        region = scan.batch_region(batches)
        try:
            rb, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowException, OSError) as exc:
            raise _corrupt(path, region, _short(exc), batches) from None
        problem = _verify(rb, meta, verify)
        if problem is not None:
            raise _corrupt(path, region, problem, batches)
        try:
            batch = _finish(rb, schema)
        except (pa.ArrowException, ValueError, TypeError, IndexError) as exc:
            raise _corrupt(path, region, _short(exc), batches) from None
        batches += 1
        yield batch
    if scan.fault is not None:
        raise _corrupt(path, scan.fault[0], scan.fault[1], batches)


def read_batches(sources: Source | Iterable[Source], *, verify: bool = True,
                 stats: ReplayStats | None = None) -> Iterator[SpanBatch | MetricBatch]:
    """Yield the batches recorded in ``sources``, file after file.

    Parameters
    ----------
    sources : path, glob string, directory, or a list of those
        A glob or directory expands to its ``.arrow`` / ``.arrows`` files in
        sorted order (which for :class:`~knhk.exporters.ipc.IpcExporter`
        files is time order); a list is read in the order given.
    verify : bool
        Check each batch's checksum (batches written by knhk carry one).
        Every batch is validated structurally either way.
    stats : ReplayStats, optional
        Updated as files and batches are read.

    Returns
    -------
    iterator of SpanBatch or MetricBatch

    Raises
    ------
    FileNotFoundError
        At once, if a source names no file.
    CorruptFileError
        When a file is truncated or damaged, after the batches before the
        damage were yielded; ``path``, ``offset`` and ``batches_read`` say where.
    SchemaError
        When a file holds something other than knhk's span or metric schema.

    Examples
    --------
    >>> import tempfile, knhk
    >>> from knhk.exporters.ipc import IpcExporter
    >>> tmp = tempfile.TemporaryDirectory()
    >>> recorder = IpcExporter(tmp.name)
    >>> _ = recorder.export(knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=1)]))
    >>> recorder.shutdown()
    >>> [b.to_pylist()[0]["name"] for b in read_batches(recorder.directory)]
    ['op']
    >>> tmp.cleanup()
    """
    paths = _expand(sources)
    run_stats = stats if stats is not None else ReplayStats()

    def generate() -> Iterator[SpanBatch | MetricBatch]:
        for path in paths:
            for batch in _read_file(path, run_stats, verify):
                run_stats.batches += 1
                if isinstance(batch, SpanBatch):
                    run_stats.spans += batch.num_rows
                else:
                    run_stats.metric_points += batch.num_rows
                yield batch

    return generate()


def replay(sources: Source | Iterable[Source], pipeline: Any, *, speed: float | None = None,
           verify: bool = True, progress: Callable[[int], None] | None = None,
           stats: ReplayStats | None = None) -> ReplayStats:
    """Feed the spans recorded in ``sources`` into ``pipeline``.

    Span batches go through ``pipeline.record_batch``, metric batches through
    ``pipeline.record_metric_batch`` (where the pipeline has one). The pipeline
    is neither flushed nor shut down.

    Parameters
    ----------
    sources : path, glob string, directory, or a list of those
        As for :func:`read_batches`.
    pipeline : TelemetryPipeline
        Anything with ``record_batch``.
    speed : float, optional
        None replays as fast as possible. Otherwise batches are paced by the
        recorded timestamps: a batch whose first span started ``t`` seconds
        after the first batch's first span is fed ``t / speed`` seconds after
        it (``speed=2.0`` replays twice as fast as recorded). The clock runs
        across file boundaries: a gap between two files is replayed as a gap.
    verify : bool
        As for :func:`read_batches`.
    progress : callable, optional
        Called with the number of spans read so far after each batch.
    stats : ReplayStats, optional
        Updated as the replay goes (``stats.files`` counts files opened), so a
        progress callback can read it; returned.

    Returns
    -------
    ReplayStats

    Raises
    ------
    CorruptFileError
        As :func:`read_batches`, after feeding every batch before the damage;
        the exception's ``replay_stats`` attribute holds the stats so far.

    Examples
    --------
    See the module docstring.
    """
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float)
                              or not math.isfinite(speed) or speed <= 0):
        raise ValueError(f"speed must be a positive finite number or None, got {speed!r}")
    if not callable(getattr(pipeline, "record_batch", None)):
        raise TypeError(f"replay needs a pipeline with record_batch(); got "
                        f"{type(pipeline).__name__}")
    stats = ReplayStats() if stats is None else stats
    batches = read_batches(sources, verify=verify, stats=stats)
    started = time.monotonic()
    first_ns: int | None = None
    paced_from = started
    try:
        for batch in batches:
            if isinstance(batch, MetricBatch) and batch.num_rows and \
                    callable(getattr(pipeline, "record_metric_batch", None)):
                stats.metric_points_accepted += int(pipeline.record_metric_batch(batch))
            elif isinstance(batch, SpanBatch) and batch.num_rows:
                if speed is not None:
                    ts = batch.record_batch.column("start_time_ns")[0].as_py()
                    if first_ns is None:
                        first_ns, paced_from = ts, time.monotonic()
                    else:
                        delay = paced_from + (ts - first_ns) / 1e9 / speed - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                stats.rows_accepted += int(pipeline.record_batch(batch.record_batch))
            if progress is not None:
                progress(stats.spans)
    except CorruptFileError as exc:
        stats.elapsed_s = time.monotonic() - started
        exc.replay_stats = stats  # type: ignore[attr-defined]
        raise
    stats.elapsed_s = time.monotonic() - started
    if stats.metric_points > stats.metric_points_accepted:
        logger.info("replay: the pipeline took %d of %d metric points",
                    stats.metric_points_accepted, stats.metric_points)
    return stats
