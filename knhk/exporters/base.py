"""The exporter interface, and the bounded queue and worker each exporter gets.

An exporter has a small lifecycle: ``export(batch) -> ExportResult``,
``force_flush(timeout) -> bool``, ``shutdown(timeout)``. Failures are results,
not exceptions; an exporter that raises anyway is logged and counted, and the
pipeline goes on. The pipeline runs each exporter on its own thread behind a
bounded queue, so a slow or hung exporter never stalls the others.

An exporter may also carry a ``persistent_queue`` (a
:class:`~knhk.exporters._persistent_queue.PersistentQueue`, or a directory
for one): its worker then writes each batch to disk before queueing it,
acknowledges it once the exporter is done with it (``export`` returned and
``force_flush`` completed), and after a crash exports again what was not
acknowledged (at least once). Batches still queued or unsettled when the
worker closes stay on disk for the next worker on the same directory; they
are counted in ``events_kept_on_disk``, not as dropped. (Set it with
``PipelineBuilder.with_exporter(exporter, persistent_queue=directory)``.)

Example
-------
>>> import time, knhk
>>> sink = knhk.InMemoryExporter()
>>> worker = ExporterWorker(sink)
>>> worker.submit(knhk.SpanBatch.from_spans([knhk.Span("op", trace_id=1, span_id=1)]))
True
>>> worker.close(time.monotonic() + 5), worker.stats.events_exported
(True, 1)
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ExportResult", "Exporter", "ExporterStats"]


class ExportResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1


class Exporter:
    """Base class of exporters. Subclasses implement :meth:`export`.

    ``queue_size`` is how many batches the pipeline may hold for this exporter
    before it drops (and counts) new ones. ``persistent_queue`` (None by
    default) is a directory or a ``PersistentQueue`` that keeps those batches
    on disk until exported (see the module docstring).

    Two optional hooks, looked up by name when the pipeline is built:

    * ``pipeline_stage() -> stage | None``: a stage the pipeline runs before
      sampling, so an exporter that derives data from spans (span metrics,
      service graphs) sees every span, not only the sampled ones;
    * ``bind_pipeline(pipeline)``: called once the pipeline runs, for an
      exporter that reports on the pipeline itself (its ``stats()``).
    """

    name: str = "exporter"
    queue_size: int = 64
    persistent_queue: Any = None

    def export(self, batch: Any) -> ExportResult:
        raise NotImplementedError

    def force_flush(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        return None


@dataclass
class ExporterStats:
    """What happened to the batches handed to one exporter."""

    batches_exported: int = 0
    events_exported: int = 0
    export_errors: int = 0
    events_failed: int = 0
    events_dropped_queue_full: int = 0
    events_dropped_shutdown: int = 0
    #: not exported by shutdown but kept in the persistent queue for the next run
    events_kept_on_disk: int = 0
    queued_batches: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ExporterWorker:
    """One exporter behind a bounded queue and its own daemon thread."""

    def __init__(self, exporter: Exporter, queue_size: int | None = None,
                 persistent_queue: Any = None) -> None:
        self.exporter = exporter
        self.name = getattr(exporter, "name", type(exporter).__name__)
        self.capacity = int(queue_size or getattr(exporter, "queue_size", 64) or 64)
        self.stats = ExporterStats()
        # items are (seq, batch); seq is the persistent record's, or 0 without one
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._disk = self._open_disk(persistent_queue if persistent_queue is not None
                                     else getattr(exporter, "persistent_queue", None))
        if self._disk is not None:
            replayed = self._disk.replay()
            # already on disk: queued even beyond capacity, so nothing is lost on restart
            self._queue.extend(replayed)
            self.stats.queued_batches = len(self._queue)
            self._disk_stats()
        self._thread = threading.Thread(target=self._run, name=f"knhk-export-{self.name}",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _open_disk(spec: Any) -> Any:
        if spec is None:
            return None
        from knhk.exporters._persistent_queue import PersistentQueue

        return spec if isinstance(spec, PersistentQueue) else PersistentQueue(spec)

    def _disk_stats(self) -> None:
        self.stats.extra["persistent_queue"] = self._disk.stats()

    def submit(self, batch: Any) -> bool:
        """Queue ``batch``; False (and counted) if the queue is full or closed."""
        with self._cond:
            if self._closing:
                self.stats.events_dropped_shutdown += batch.num_rows
                return False
            if len(self._queue) >= self.capacity:
                self.stats.events_dropped_queue_full += batch.num_rows
                return False
            seq = 0
            if self._disk is not None:
                seq = self._disk.append(batch)
                if seq is None:  # the disk budget is spent: a full queue by another name
                    self.stats.events_dropped_queue_full += batch.num_rows
                    return False
                self._disk_stats()
            self._queue.append((seq, batch))
            self.stats.queued_batches = len(self._queue)
            self._cond.notify()
        return True

    def _settle(self) -> bool:
        """Wait until the exporter is done with what it took; False if closing first."""
        flush = getattr(self.exporter, "force_flush", None)
        while True:
            try:
                done = flush is None or flush(0.5)
            except Exception:
                logger.exception("exporter %s raised in force_flush", self.name)
                done = True
            with self._cond:
                # closing first: a flush that returns because shutdown gave up on the
                # batch is no delivery; kept on disk, it is sent again (at least once)
                if self._closing:
                    return False
            if done:
                return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                seq, batch = self._queue.popleft()
                self.stats.queued_batches = len(self._queue)
                self._busy = True
            try:
                result = self.exporter.export(batch)
            except Exception as exc:  # an exporter never crashes the pipeline
                logger.exception("exporter %s raised on a batch of %d", self.name,
                                 batch.num_rows)
                result = ExportResult.FAILURE
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            # on disk, a batch is acknowledged only once its fate is settled (delivered
            # or failed and counted); an unsettled one is exported again after a restart
            settled = True
            if seq:
                settled = self._settle()
                if settled:
                    self._disk.ack(seq)
                    with self._cond:
                        self._disk_stats()
            with self._cond:
                if not settled:
                    self.stats.events_kept_on_disk += batch.num_rows
                elif result is ExportResult.SUCCESS:
                    self.stats.batches_exported += 1
                    self.stats.events_exported += batch.num_rows
                else:
                    self.stats.export_errors += 1
                    self.stats.events_failed += batch.num_rows
                self._busy = False
                self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, deadline: float) -> bool:
        """Export what is queued, then shut the exporter down, all by ``deadline``.

        A quarter of the time left (at most 0.25 s) is kept for the exporter's
        own shutdown, so it gets to count what it still holds.
        """
        reserve = min(0.25, max(0.0, deadline - time.monotonic()) / 4)
        drained = self.wait_idle(deadline - reserve)
        with self._cond:
            self._closing = True
            left = sum(b.num_rows for _, b in self._queue)
            self._queue.clear()
            if self._disk is not None:
                # on disk and not acknowledged: the next worker on the directory sends them
                self.stats.events_kept_on_disk += left
            else:
                self.stats.events_dropped_shutdown += left
            self.stats.queued_batches = 0
            self._cond.notify_all()
        remaining = max(0.0, deadline - time.monotonic())
        done = threading.Event()

        def _shutdown() -> None:
            try:
                self.exporter.shutdown(remaining)
            except Exception:
                logger.exception("exporter %s raised in shutdown", self.name)
            finally:
                done.set()

        threading.Thread(target=_shutdown, name=f"knhk-shutdown-{self.name}",
                         daemon=True).start()
        finished = done.wait(remaining + 0.05)  # a little slack for thread scheduling
        if finished:
            # the exporter is shut down, so a batch in flight settles at once: let the
            # worker count it (kept on disk, failed) before the caller reads the stats
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._disk is not None:
            self._disk.close()
        return finished and drained and left == 0
