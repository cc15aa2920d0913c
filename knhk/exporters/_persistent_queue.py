"""An on-disk queue for one exporter: batches survive a crash and are sent again (at least once).

Each batch is appended to a segment file as one record: a header (magic,
kind, sequence number, length, CRC-32) and the batch as an Arrow IPC stream.
The exporter's worker acknowledges a record once the exporter has finished
with it (delivered, or failed and counted); the highest acknowledged
sequence number is kept in a small ``ack`` file, and a segment whose records
are all acknowledged is deleted. When the queue is opened again after a
crash or restart, every record after the acknowledged one is read back and
exported again. A record whose CRC or Arrow payload does not check out is
skipped and counted (``records_corrupted``), and reading resumes at the next
record header. A queue holds an exclusive lock on its directory (``flock`` on
a ``lock`` file) until :meth:`PersistentQueue.close`, so two processes — or
two exporters — never share one; the lock goes with the process if it dies.

Example
-------
>>> import tempfile, knhk
>>> tmp = tempfile.TemporaryDirectory()
>>> q = PersistentQueue(tmp.name)
>>> batch = knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=1,
...                                               start_time_ns=0, duration_ns=5)])
>>> seq = q.append(batch)
>>> q.close()
>>> q2 = PersistentQueue(tmp.name)
>>> [(s, b.num_rows) for s, b in q2.replay()]
[(1, 1)]
>>> q2.ack(1); q2.close()
>>> q3 = PersistentQueue(tmp.name)
>>> q3.replay()
[]
>>> q3.close(); tmp.cleanup()
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)

__all__ = ["PersistentQueue"]

_MAGIC = b"KNQ1"
_HEADER = struct.Struct("<4sBQII")  # magic, kind, seq, payload length, crc32(seq + payload)
_ACK = struct.Struct("<QI")  # acknowledged seq, crc32 of it
_SPANS, _METRICS = 1, 2
_MAX_RECORD = 1 << 31


def _encode(batch: Any) -> tuple[int, bytes]:
    from knhk.batch import MetricBatch

    kind = _METRICS if isinstance(batch, MetricBatch) else _SPANS
    rb = batch.record_batch if hasattr(batch, "record_batch") else batch
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        writer.write_batch(rb)
    return kind, sink.getvalue().to_pybytes()


def _decode(kind: int, payload: bytes) -> Any:
    from knhk.batch import MetricBatch, SpanBatch

    reader = pa.ipc.open_stream(pa.py_buffer(payload))
    batches = list(reader)
    if len(batches) != 1:
        raise ValueError(f"expected one record batch, found {len(batches)}")
    if kind == _METRICS:
        return MetricBatch(batches[0])
    if kind == _SPANS:
        return SpanBatch._wrap(batches[0])
    raise ValueError(f"unknown record kind {kind}")


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", seq)))


class PersistentQueue:
    """Length- and CRC-framed Arrow IPC records in segment files under ``directory``.

    Parameters
    ----------
    directory : str or path
        Created if missing; one queue per directory.
    segment_bytes : int
        A new segment file is started once the current one is this large.
    max_bytes : int
        :meth:`append` refuses (returns None) while the unacknowledged data
        on disk is this large.
    fsync : bool
        fsync every append and ack: survives power loss, not only a crash, at a cost.
    """

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 8 << 20,
                 max_bytes: int = 1 << 30, fsync: bool = False) -> None:
        for name, value in (("segment_bytes", segment_bytes), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PersistentQueue {name} must be a positive int, got {value!r}.")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd: int | None = None
        self._take_lock()
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._ack_path = os.path.join(self.directory, "ack")
        self._acked = self._read_ack()
        self._segments: list[tuple[str, int]] = []  # (path, last seq in it)
        self._pending: list[tuple[int, Any]] = []
        self.records_appended = 0
        self.records_acked = 0
        self.records_replayed = 0
        self.records_corrupted = 0
        self.bytes_corrupted = 0
        self._bytes = 0
        last = self._scan()
        self._next_seq = max(last, self._acked) + 1
        self._file: Any = None
        self._file_path = ""
        self._file_size = 0

    # -- opening -----------------------------------------------------------------

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one queue per directory is on trust
            return
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OSError(errno.EBUSY, f"the persistent queue directory {self.directory!r} "
                          "is in use by another queue (another process, or another "
                          "exporter); give each queue its own directory") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def __del__(self) -> None:
        self._release_lock()

    def _read_ack(self) -> int:
        try:
            with open(self._ack_path, "rb") as f:
                raw = f.read(_ACK.size)
        except FileNotFoundError:
            return 0
        if len(raw) == _ACK.size:
            seq, crc = _ACK.unpack(raw)
            if zlib.crc32(struct.pack("<Q", seq)) == crc:
                return seq
        # an unreadable cursor: replay everything (at least once beats lost)
        logger.warning("persistent queue %s: the ack file is corrupt; replaying every record",
                       self.directory)
        return 0

    def _scan(self) -> int:
        """Read every segment; keep unacknowledged records; return the highest seq seen."""
        names = sorted(n for n in os.listdir(self.directory)
                       if n.startswith("segment-") and n.endswith(".knq"))
        highest = 0
        for name in names:
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                data = f.read()
            last = 0
            for seq, kind, payload in self._records(data, path):
                last = max(last, seq)
                if seq <= self._acked:
                    continue
                try:
                    batch = _decode(kind, payload)
                except (pa.ArrowException, ValueError) as exc:
                    self._corrupt(path, f"record {seq} holds no readable batch ({exc})",
                                  len(payload))
                    continue
                self._pending.append((seq, batch))
            highest = max(highest, last)
            if last and last <= self._acked:
                os.unlink(path)
            else:
                self._segments.append((path, last))
                self._bytes += len(data)
        self._pending.sort(key=lambda item: item[0])
        self.records_replayed = len(self._pending)
        if self._pending:
            logger.info("persistent queue %s: %d unacknowledged batches to export again",
                        self.directory, len(self._pending))
        return highest

    def _corrupt(self, path: str, why: str, nbytes: int) -> None:
        self.records_corrupted += 1
        self.bytes_corrupted += nbytes
        logger.warning("persistent queue %s: skipping a corrupt record: %s",
                       os.path.basename(path), why)

    def _records(self, data: bytes, path: str):
        """(seq, kind, payload) of each sound record; corrupt ones counted and skipped."""
        pos, n = 0, len(data)
        while pos < n:
            if n - pos < _HEADER.size:
                self._corrupt(path, f"{n - pos} trailing bytes at offset {pos} (torn write)",
                              n - pos)
                return
            magic, kind, seq, length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if magic != _MAGIC or length > _MAX_RECORD or end > n:
                nxt = data.find(_MAGIC, pos + 1)
                nxt = n if nxt < 0 else nxt
                self._corrupt(path, f"no valid record header at offset {pos}", nxt - pos)
                pos = nxt
                continue
            payload = data[pos + _HEADER.size:end]
            if _crc(seq, payload) != crc:
                self._corrupt(path, f"CRC mismatch in record {seq} at offset {pos}",
                              end - pos)
            else:
                yield seq, kind, payload
            pos = end

    # -- use ---------------------------------------------------------------------

    def replay(self) -> list[tuple[int, Any]]:
        """The unacknowledged ``(seq, batch)`` found on opening, oldest first (taken once)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def append(self, batch: Any) -> int | None:
        """Write ``batch`` as the next record; its seq, or None when ``max_bytes`` is reached."""
        kind, payload = _encode(batch)
        with self._lock:
            if self._bytes + len(payload) + _HEADER.size > self.max_bytes:
                return None
            seq = self._next_seq
            self._next_seq += 1
            if self._file is None or self._file_size >= self.segment_bytes:
                self._roll(seq)
            record = _HEADER.pack(_MAGIC, kind, seq, len(payload), _crc(seq, payload)) + payload
            self._file.write(record)
            self._file.flush()  # into the OS: survives the process being killed
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file_size += len(record)
            self._bytes += len(record)
            self._segments[-1] = (self._file_path, seq)
            self.records_appended += 1
            return seq

    def _roll(self, first_seq: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file_path = os.path.join(self.directory, f"segment-{first_seq:020d}.knq")
        self._file = open(self._file_path, "ab")  # noqa: SIM115 (kept open across appends)
        self._file_size = 0
        self._segments.append((self._file_path, first_seq))

    def ack(self, seq: int, nbytes: int = 0) -> None:
        """Record that every seq up to ``seq`` is done with; delete fully acknowledged segments."""
        with self._lock:
            if seq <= self._acked:
                return
            self._acked = seq
            self.records_acked += 1
            tmp = self._ack_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(_ACK.pack(seq, zlib.crc32(struct.pack("<Q", seq))))
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, self._ack_path)
            keep = []
            for path, last in self._segments:
                if last <= seq and path != self._file_path:
                    try:
                        self._bytes -= os.path.getsize(path)
                        os.unlink(path)
                    except OSError:
                        logger.warning("cannot delete acknowledged segment %s", path)
                else:
                    keep.append((path, last))
            self._segments = keep
            if self._file is not None and seq >= self._next_seq - 1:
                # everything written is done with: drop the live segment too, so the
                # space counts as free again (the next append starts a new one)
                self._file.close()
                self._file = None
                self._bytes -= self._file_size
                os.unlink(self._file_path)
                self._segments = [s for s in self._segments if s[0] != self._file_path]
                self._file_path = ""

    def stats(self) -> dict[str, int]:
        """Records appended, acknowledged, replayed after a restart, corrupt; bytes on disk."""
        with self._lock:
            return {"records_appended": self.records_appended,
                    "records_acked": self.records_acked,
                    "records_replayed": self.records_replayed,
                    "records_corrupted": self.records_corrupted,
                    "bytes_corrupted": self.bytes_corrupted,
                    "bytes_on_disk": max(0, self._bytes)}

    def close(self) -> None:
        """Close the current segment and unlock the directory; unacknowledged records
        stay for the next open."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._release_lock()
