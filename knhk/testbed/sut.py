"""The system under test as its own process: OTLP receivers -> pipeline -> OTLP exporters.

Run as ``python -m knhk.testbed.sut --grpc 127.0.0.1:0 --exporter grpc=127.0.0.1:4317``;
it prints one JSON line ``{"event": "ready", "grpc_port": ..., "http_port": ...}``
once listening, rewrites ``--stats-file`` with its counters every
``--stats-interval`` seconds, and on SIGTERM (or SIGINT) shuts down within
``--shutdown-timeout``, then prints and writes the final counters
(``{"event": "stopped", "shutdown_s": ..., ...}``). :class:`SutProcess`
starts, watches and stops one from a test.

The counters name every place a span can end: ``receivers`` (spans taken,
requests refused), ``pipeline`` (``PipelineStats``, drops by reason),
``exporters`` (per OTLP exporter: spans exported, rejected by the backend,
failed by reason), ``memory_limiter`` and ``rss_bytes``;
:func:`counted_drops` sums them as the accounting needs.

Example
-------
>>> args = build_parser().parse_args(["--exporter", "grpc=127.0.0.1:1"])
>>> args.exporter, args.batch_size
(['grpc=127.0.0.1:1'], 512)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from knhk.testbed._child import ChildProcess

logger = logging.getLogger(__name__)

__all__ = ["SutProcess", "build_parser", "counted_drops", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m knhk.testbed.sut",
                                description="knhk as a system under test.")
    p.add_argument("--grpc", default=None, help="OTLP/gRPC receiver endpoint (host:port)")
    p.add_argument("--http", default=None, help="OTLP/HTTP receiver endpoint (host:port)")
    p.add_argument("--exporter", action="append", default=[],
                   help="KIND=ENDPOINT, KIND grpc, http (protobuf) or json; repeatable")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--flush-interval", type=float, default=0.05)
    p.add_argument("--channel-capacity", type=int, default=100_000)
    p.add_argument("--backpressure", default="drop_oldest")
    p.add_argument("--queue-size", type=int, default=1000, help="OTLP sending queue, batches")
    p.add_argument("--worker-queue", type=int, default=64, help="pipeline->exporter, batches")
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per export attempt")
    p.add_argument("--retry-initial", type=float, default=0.05)
    p.add_argument("--retry-max-interval", type=float, default=0.5)
    p.add_argument("--retry-max-elapsed", type=float, default=120.0)
    p.add_argument("--no-retry", action="store_true")
    p.add_argument("--memory-soft-mib", default=None,
                   help="memory limiter soft limit; '+N' is N MiB above the RSS once started")
    p.add_argument("--memory-hard-mib", default=None, help="hard limit, also '+N'")
    p.add_argument("--persistent-dir", default=None,
                   help="on-disk queue directory (one subdirectory per exporter)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20)
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument("--stats-file", default=None)
    p.add_argument("--stats-interval", type=float, default=0.25)
    return p


def _exporters(args: argparse.Namespace) -> list[Any]:
    from knhk.exporters.otlp import OtlpConfig, OtlpExporter, RetryConfig

    retry = RetryConfig(enabled=not args.no_retry, initial_interval=args.retry_initial,
                        max_interval=args.retry_max_interval,
                        max_elapsed_time=args.retry_max_elapsed, randomization_factor=0.2)
    out = []
    for i, spec in enumerate(args.exporter):
        kind, sep, endpoint = spec.partition("=")
        protocol = {"grpc": "grpc", "http": "http/protobuf", "json": "http/json"}.get(kind)
        if not sep or protocol is None:
            raise SystemExit(f"--exporter must be grpc=, http= or json=ENDPOINT, got {spec!r}")
        exp = OtlpExporter(OtlpConfig(endpoint=endpoint, protocol=protocol, insecure=True,
                                      timeout=args.timeout, retry=retry,
                                      queue_size=args.queue_size, consumers=args.consumers,
                                      headers={}, compression="none"))
        exp.name = f"otlp{i}"
        exp.queue_size = args.worker_queue
        if args.persistent_dir:
            exp.persistent_queue = os.path.join(args.persistent_dir, exp.name)
        out.append(exp)
    return out


def collect_stats(pipeline: Any, receivers: list, exporters: list, limiter: Any) -> dict:
    """Every counter of the running system under test, as plain JSON-able data."""
    from knhk.memory_limiter import resident_bytes

    stats = pipeline.stats().as_dict()
    out: dict[str, Any] = {"pipeline": stats, "rss_bytes": resident_bytes(),
                           "receivers": {}, "exporters": {}}
    for r in receivers:
        out["receivers"][type(r).__name__] = {
            "requests": r.requests, "spans_received": r.spans_received,
            "requests_refused": r.requests_refused, "requests_invalid": r.requests_invalid}
    for e in exporters:
        with e._lock:
            out["exporters"][e.name] = {
                "spans_exported": e.spans_exported, "spans_rejected": e.spans_rejected,
                "spans_failed": e.spans_failed, "export_errors": e.export_errors,
                "errors_by_reason": dict(e.errors_by_reason)}
    if limiter is not None:
        out["memory_limiter"] = limiter.stats()
    return out


def counted_drops(stats: dict) -> dict[str, int]:
    """Spans the system under test took and counted as not delivered, by reason.

    Pipeline drops (ring buffer, exporter worker queues) plus, per exporter,
    spans it failed (by reason) and spans the backend rejected in a partial
    success. Metric drops are left out; an exporter's own ``queue_full`` /
    ``shutdown`` failures are the worker's ``events_failed``, counted once here.
    """
    out: dict[str, int] = {}
    p = stats["pipeline"]
    for reason, n in p["dropped_by_reason"].items():
        if not reason.startswith("metrics_") and n:
            out[f"pipeline:{reason}"] = n
    if p.get("events_sampled_out"):
        out["pipeline:sampled_out"] = p["events_sampled_out"]
    for name, e in stats["exporters"].items():
        failed = e["spans_failed"]
        if failed:
            # spans are counted per reason by batch; apportion the total to the reasons seen
            reasons = e["errors_by_reason"]
            label = ",".join(sorted(reasons)) or "unknown"
            out[f"{name}:failed[{label}]"] = failed
        if e["spans_rejected"]:
            out[f"{name}:rejected_partial_success"] = e["spans_rejected"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("KNHK_SUT_LOG", "WARNING"),
                        format="%(asctime)s sut %(levelname)s %(name)s: %(message)s")
    import knhk
    from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver, _common

    exporters = _exporters(args)
    builder = (knhk.TelemetryPipeline.builder().with_batch_size(args.batch_size)
               .with_flush_interval(args.flush_interval)
               .with_channel_capacity(args.channel_capacity)
               .with_backpressure_strategy(knhk.BackpressureStrategy[args.backpressure.upper()]))
    for e in exporters:
        builder = builder.with_exporter(e)
    pipeline = builder.build()
    limiter = None
    if args.memory_soft_mib is not None:
        from knhk.memory_limiter import MemoryLimiter, resident_bytes

        def mib(value: str) -> float:
            return (resident_bytes() / 2**20 + float(value[1:]) if value.startswith("+")
                    else float(value))

        soft = mib(args.memory_soft_mib)
        limiter = MemoryLimiter(soft, mib(args.memory_hard_mib) if args.memory_hard_mib
                                else soft * 1.25)
        _common.set_memory_limiter(pipeline, limiter)
    receivers: list[Any] = []
    ready: dict[str, Any] = {"event": "ready", "pid": os.getpid()}
    if args.grpc:
        r = OtlpGrpcReceiver(pipeline, endpoint=args.grpc,
                             max_request_bytes=args.max_request_bytes).start()
        receivers.append(r)
        ready["grpc_port"] = r.port
    if args.http:
        r = OtlpHttpReceiver(pipeline, endpoint=args.http,
                             max_request_bytes=args.max_request_bytes).start()
        receivers.append(r)
        ready["http_port"] = r.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def write(stats: dict) -> None:
        if args.stats_file:
            tmp = args.stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stats, f)
            os.replace(tmp, args.stats_file)

    print(json.dumps(ready), flush=True)
    while not stop.wait(args.stats_interval):
        write(collect_stats(pipeline, receivers, exporters, limiter))
    t0 = time.monotonic()
    for r in receivers:
        r.stop() if isinstance(r, OtlpHttpReceiver) else r.stop(0.5)
    ok = pipeline.shutdown(timeout=args.shutdown_timeout)
    # pipeline.shutdown returns at its deadline while an OTLP exporter may still be
    # finishing one send attempt, after which it counts those spans as failed: wait
    # for that (at most one attempt), so the final counters hold every span
    settle = time.monotonic() + args.timeout + 1.0
    for e in exporters:
        for t in getattr(e, "_threads", ()):
            t.join(max(0.0, settle - time.monotonic()))
    final = collect_stats(pipeline, receivers, exporters, limiter)
    final.update(event="stopped", shutdown_s=time.monotonic() - t0, shutdown_ok=ok)
    write(final)
    print(json.dumps(final), flush=True)
    return 0


class SutProcess(ChildProcess):
    """One system-under-test process started from a test.

    Parameters
    ----------
    args : list of str
        Arguments of ``python -m knhk.testbed.sut`` (``--stats-file`` is added).
    workdir : str
        Where its stats file and log go.
    """

    def __init__(self, args: list[str], workdir: str, *, ready_timeout: float = 30.0) -> None:
        self.stats_file = os.path.join(workdir, f"sut-stats-{id(self)}.json")
        super().__init__(
            [sys.executable, "-m", "knhk.testbed.sut", *args, "--stats-file", self.stats_file],
            os.path.join(workdir, f"sut-{id(self)}.log"))
        self.final: dict | None = None
        line = self._readline(ready_timeout)
        try:
            self.ready = json.loads(line)
        except ValueError:
            self.kill()
            raise RuntimeError(f"the system under test did not start: {line!r}; "
                               f"log: {self.log()}") from None
        self.pid = self.ready["pid"]

    def _readline(self, timeout: float) -> str:
        box: list[bytes] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return box[0].decode() if box else ""

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.ready['grpc_port']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ready['http_port']}/v1/traces"

    def stats(self) -> dict:
        """The latest counters (rewritten every ``--stats-interval``)."""
        for _ in range(50):
            try:
                with open(self.stats_file) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"no stats from the system under test; log: {self.log()}")

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> dict:
        """SIGTERM, wait for the final counters; they are also kept in :attr:`final`."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self._log.close()
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"the system under test printed no final stats; "
                               f"log: {self.log()}")
        self.final = json.loads(lines[-1])
        return self.final


if __name__ == "__main__":
    sys.exit(main())
