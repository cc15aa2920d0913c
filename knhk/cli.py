"""The ``knhk`` command: serve, validate-config, generate, replay, stats, demo, info, registry.

Only this module prints. Each subcommand is a function taking parsed
arguments and returning an exit code, so tests call ``main([...])`` directly.
A user mistake (a bad config, a port in use, a glob matching nothing) is a
one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["main"]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("numpy", "pyarrow", "PyYAML", "grpcio", "protobuf", "opentelemetry-proto",
                 "prometheus-client", "lz4", "google-re2", "Cython"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import knhk
    from knhk._build import CORE_MODULES

    print(f"knhk {knhk.__version__} (Python {platform.python_version()}, "
          f"{platform.machine()}, {platform.system()})")
    print("compiled kernels:")
    ok = True
    for name in CORE_MODULES:
        try:
            mod = importlib.import_module(f"knhk._core.{name}")
            print(f"  {name:<14} {os.path.basename(mod.__file__ or '?')}")
        except ImportError as exc:
            ok = False
            print(f"  {name:<14} MISSING ({exc})")
    print("libraries:")
    for dist, version in _versions().items():
        print(f"  {dist:<20} {version}")
    return 0 if ok else 1


def _progress(done: int, total: int | None, started: float, unit: str = "spans") -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.perf_counter() - started, 1e-9)
    if total:
        frac = min(1.0, done / total)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {frac:6.1%} {done:,} {unit} {rate:,.0f}/s")
    else:
        sys.stderr.write(f"\r{done:,} {unit} {rate:,.0f}/s")
    sys.stderr.flush()


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = []
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:,.2f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"  {key:<{width}}  {value}")
    return "\n".join(lines)


def _stats_rows(stats: Any) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("events received", stats.events_received),
        ("events processed", stats.events_processed),
        ("events dropped", stats.events_dropped),
    ]
    rows += [(f"  dropped: {k}", v) for k, v in sorted(stats.dropped_by_reason.items())]
    rows += [
        ("events sampled out", stats.events_sampled_out),
        ("batches created", stats.batches_created),
        ("avg batch size", stats.avg_batch_size),
        ("validation errors", stats.validation_errors),
        ("export errors", stats.export_errors),
        ("avg processing latency (us)", stats.avg_processing_latency_us),
        ("p99 processing latency (us)", stats.p99_processing_latency_us),
        ("p99 seal-to-export latency (us)", stats.p99_pipeline_latency_us),
    ]
    for name, ex in stats.exporters.items():
        rows.append((f"exported by {name}", ex["events_exported"]))
    return rows


def cmd_generate(args: argparse.Namespace) -> int:
    from knhk import workload

    if args.out is None and args.otlp is None:
        print("knhk generate: error: give --out FILE, --otlp HOST:PORT, or both",
              file=sys.stderr)
        return 2
    if args.batch_size is None:
        # an OTLP request must stay under the receivers' 4 MiB limit
        args.batch_size = 512 if args.otlp else 10_000
    if args.batch_size < 1:
        print("knhk generate: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    config = workload.WorkloadConfig(seed=args.seed, services=args.services,
                                     error_rate=args.error_rate, slow_rate=args.slow_rate)
    sinks: list[Any] = []
    if args.out is not None:
        sinks.append(_FileSink(args.out, args.compression))
    if args.otlp is not None:
        sinks.append(_OtlpSink(args.otlp, args.otlp_protocol, args.otlp_retry_for))
    started = time.perf_counter()
    done = 0
    try:
        for batch in workload.generate_batches(args.spans, config=config,
                                               batch_size=args.batch_size):
            for sink in sinks:
                sink.write(batch)
            done += batch.num_rows
            _progress(done, args.spans, started)
    finally:
        status = 0
        for sink in sinks:
            status = max(status, sink.close())
    elapsed = time.perf_counter() - started
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    for sink in sinks:
        print(sink.report(done, elapsed))
    return status


class _FileSink:
    def __init__(self, out: str, compression: str) -> None:
        from knhk.exporters.ipc import IpcFileWriter
        from knhk.schema import SPAN_SCHEMA

        self.out = out
        self.compression = compression
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if os.path.exists(out):
            os.remove(out)  # the writer never truncates a file; generate replaces it on purpose
        self.writer = IpcFileWriter(out, SPAN_SCHEMA,
                                    compression=None if compression == "none" else compression)

    def write(self, batch: Any) -> None:
        self.writer.write(batch)

    def close(self) -> int:
        self.writer.close()
        return 0

    def report(self, done: int, elapsed: float) -> str:
        size = os.path.getsize(self.out)
        return (f"wrote {done:,} spans to {self.out} ({size:,} bytes, "
                f"{size / max(done, 1):.1f} bytes/span, {self.compression}) in {elapsed:.2f} s")


class _OtlpSink:
    """Sends the generated batches with knhk's OtlpExporter (retrying as OTLP says)."""

    def __init__(self, endpoint: str, protocol: str, retry_for: float) -> None:
        from knhk.exporters._retry import RetryConfig
        from knhk.exporters.otlp import OtlpConfig, OtlpExporter

        if protocol == "grpc":
            target = endpoint
        else:
            base = endpoint if "://" in endpoint else "http://" + endpoint
            target = base.rstrip("/") + ("" if base.rstrip("/").endswith("/v1/traces")
                                         else "/v1/traces")
        self.label = f"{endpoint} (OTLP {protocol})"
        self.exporter = OtlpExporter(OtlpConfig(
            endpoint=target, protocol=protocol, insecure=True, queue_size=64, consumers=2,
            # 0 s: send once (a RetryConfig's max_elapsed_time of 0 means retry forever)
            retry=RetryConfig(initial_interval=min(0.2, retry_for / 4), max_interval=2.0,
                              max_elapsed_time=retry_for) if retry_for > 0
            else RetryConfig(enabled=False)))
        self.submitted = 0

    def write(self, batch: Any) -> None:
        e = self.exporter
        # keep the sending queue from filling (a full queue fails the batch, counted)
        while self.submitted - e.batches_exported - e.export_errors >= 32:
            time.sleep(0.002)
        e.export(batch)
        self.submitted += 1

    def close(self) -> int:
        self.exporter.force_flush(60.0)
        self.exporter.shutdown(5.0)
        e = self.exporter
        return 0 if not (e.spans_failed or e.spans_rejected) else 1

    def report(self, done: int, elapsed: float) -> str:
        e = self.exporter
        line = (f"sent {e.spans_exported:,} of {done:,} spans to {self.label} "
                f"in {elapsed:.2f} s")
        lost = e.spans_failed + e.spans_rejected
        if lost:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(e.errors_by_reason.items()))
            line += f"; {lost:,} not delivered ({reasons or 'rejected by the server'})"
        return line


def _build_pipeline(args: argparse.Namespace, exporters: list[Any],
                    stages: Sequence[Any] = ()) -> Any:
    import knhk

    builder = (knhk.TelemetryPipeline.builder()
               .with_batch_size(args.batch_size)
               .with_channel_capacity(max(args.batch_size, args.capacity))
               .with_backpressure_strategy(knhk.BackpressureStrategy.BLOCK,
                                           block_timeout=60.0))
    registry = getattr(args, "registry", None)
    if registry:
        builder.with_weaver_registry(registry)
    if getattr(args, "sample", True):
        builder.with_adaptive_sampling(knhk.SamplingConfig())
    for stage in stages:
        builder.with_stage(stage)
    for e in exporters:
        builder.with_exporter(e)
    return builder.build()


def _replay_progress(paths: list[str], started: float) -> Any:
    """A progress callback drawing a bar over the files (with a live span count)."""
    sizes = [os.path.getsize(p) for p in paths]
    total = max(sum(sizes), 1)

    def draw(spans: int, files_done: int) -> None:
        if not sys.stderr.isatty():
            return
        frac = min(1.0, sum(sizes[:files_done]) / total)
        rate = spans / max(time.perf_counter() - started, 1e-9)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {files_done}/{len(paths)} files {spans:,} spans "
                         f"{rate:,.0f}/s")
        sys.stderr.flush()
    return draw


class _FanOut:
    """Feeds replayed spans to every traces pipeline of a config, metric points to
    its metrics pipelines (or, without one, its traces pipelines)."""

    def __init__(self, pipelines: dict[str, Any]) -> None:
        from knhk.serve.config import component_type

        self.traces = [p for pid, p in pipelines.items() if component_type(pid) == "traces"]
        metrics = [p for pid, p in pipelines.items() if component_type(pid) == "metrics"]
        self.metrics = metrics or self.traces

    def record_batch(self, batch: Any) -> int:
        taken = [p.record_batch(batch) for p in self.traces]
        return min(taken) if taken else 0

    def record_metric_batch(self, batch: Any) -> int:
        taken = [p.record_metric_batch(batch) for p in self.metrics]
        return min(taken) if taken else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from knhk import replay

    paths = replay._expand(args.files)  # a glob matching nothing fails here, before any work
    if args.dask is not None:
        return _replay_on_dask(args, paths)
    if not args.config:
        return _replay(args, paths, None)
    from knhk.serve import load_config

    config = load_config(args.config)
    with _logging_from(config, quiet=True):
        return _replay(args, paths, config)


def _replay_on_dask(args: argparse.Namespace, paths: list[str]) -> int:
    """``replay --dask``: the analyses of :mod:`knhk.distributed` over the files."""
    if args.speed is not None or args.config:
        print("knhk replay: error: --dask analyses the files as fast as the cluster goes; "
              "it takes neither --speed nor --config", file=sys.stderr)
        return 2
    from knhk.distributed import analyze
    from knhk.stream import WindowConfig

    what = tuple(a.strip() for a in args.analyses.split(",") if a.strip())
    registry = args.registry
    if "validation" in what and registry is None:
        registry = _default_registry()
    result = analyze(paths, args.dask, what=what,
                     window=WindowConfig.tumbling(seconds=args.window),
                     exact_quantiles=args.exact_quantiles, registry=registry,
                     timeout=args.dask_timeout)
    print(result.summary())
    return 0


def _replay(args: argparse.Namespace, paths: list[str], config: dict[str, Any] | None) -> int:
    from knhk import replay
    from knhk.errors import CorruptFileError

    built = None
    counter = _CountingExporter()
    if config is not None:
        from knhk.serve import components

        # the pipelines only: replay brings the spans, so no receiver listens
        built = components.build(config)
        pipelines = built.pipelines
        target: Any = _FanOut(pipelines)
    else:
        pipeline = _build_pipeline(args, [counter])
        pipelines = {"replay": pipeline}
        target = pipeline
    started = time.perf_counter()
    draw = _replay_progress(paths, started)
    stats_so_far = replay.ReplayStats()

    def progress(n: int) -> None:
        draw(n, max(0, stats_so_far.files - 1))  # the file being read is not done

    status = 0
    result = None
    try:
        # one replay over every file: --speed paces across file boundaries too
        replay.replay(paths, target, speed=None if args.max else args.speed,
                      progress=progress, stats=stats_so_far)
        draw(stats_so_far.spans, len(paths))
        result = stats_so_far
    except CorruptFileError as exc:
        print(f"knhk replay: error: {exc}", file=sys.stderr)
        status = 2
        result = stats_so_far
    except (OSError, ValueError) as exc:
        print(f"knhk replay: error: {exc}", file=sys.stderr)
        for p in pipelines.values():
            p.shutdown()
        return 2
    elapsed = time.perf_counter() - started
    ok = all(p.shutdown(60.0) for p in pipelines.values())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    rows: list[tuple[str, Any]] = []
    if result is not None:
        rows += [("files", result.files), ("batches read", result.batches),
                 ("spans read", result.spans)]
        if result.metric_points:
            rows.append(("metric points read", result.metric_points))
        rows += [("elapsed (s)", elapsed), ("spans/s", result.spans / max(elapsed, 1e-9))]
    for pid, p in pipelines.items():
        if len(pipelines) > 1:
            rows.append((f"pipeline {pid}", ""))
        rows += _stats_rows(p.stats())
    print(_table(rows))
    if built is not None:
        _print_analyses(built)
    if status == 0 and not ok:
        print("knhk replay: error: the pipeline did not finish within 60 s", file=sys.stderr)
        status = 1
    return status


def _print_analyses(built: Any) -> None:
    """The slowest operations of each RED window processor; the busiest service-graph edges."""
    import pyarrow.compute as pc

    for label, proc in built.stream_processors.items():
        results = proc.get_results(as_table=True)
        if not results.num_rows or "p99_duration_ms" not in results.column_names:
            continue
        top = results.sort_by([("p99_duration_ms", "descending")]).slice(0, 5)
        print(f"slowest operations ({label}, per window, before sampling):")
        print(_table([(f"{r.get('service', '')} {r.get('name', '')}".strip(),
                       f"p99 {r['p99_duration_ms']:8.1f} ms  errors {r['error_rate']:6.1%}  "
                       f"n={r['count']}") for r in top.to_pylist()]))
    for label, graph in built.service_graphs.items():
        edges = graph.edges()
        if not edges.num_rows:
            continue
        top = edges.take(pc.sort_indices(edges, [("calls", "descending")])).slice(0, 5)
        print(f"busiest service-graph edges ({label}, {graph.traces:,} traces):")
        print(_table([(f"{r['client']} -> {r['server']}",
                       f"calls {r['calls']:,}  errors {r['errors']:,}  "
                       f"avg {r['latency_avg_ms']:.1f} ms") for r in top.to_pylist()]))


class _CountingExporter:
    """Counts what it is given; the CLI's stand-in when no exporter is configured."""

    name = "count"
    queue_size = 1024

    def __init__(self) -> None:
        self.spans = 0
        self.batches = 0

    def export(self, batch: Any) -> Any:
        from knhk.exporters.base import ExportResult

        self.spans += batch.num_rows
        self.batches += 1
        return ExportResult.SUCCESS

    def force_flush(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    import knhk
    from knhk import workload
    from knhk.exporters.ipc import IpcExporter

    out_dir = os.path.abspath(args.out_dir)
    registry = args.registry or _default_registry()
    print(f"knhk demo: {args.spans:,} spans from a synthetic {args.services}-service topology")
    print(f"  registry  {registry or '(none found; validation off)'}")
    print(f"  recording {out_dir} (Arrow IPC, lz4)")
    ipc = IpcExporter(out_dir, prefix="demo", compression="lz4")
    counter = _CountingExporter()
    args.registry = registry
    # RED aggregates per minute, service and operation, before sampling
    windows = knhk.StreamProcessor(knhk.WindowConfig.tumbling(seconds=60, allowed_lateness=30))
    pipeline = _build_pipeline(args, [ipc, counter], stages=[windows])
    config = workload.WorkloadConfig(seed=args.seed, services=args.services)
    started = time.perf_counter()
    done = 0
    for batch in workload.generate_batches(args.spans, config=config,
                                           batch_size=args.batch_size):
        done += pipeline.record_batch(batch)
        _progress(done, args.spans, started)
    # and the per-event API: the original design's workflow spans, one in ten
    # missing its required pattern so that validation has something to say
    patterns = ("sequence", "parallel_split", "synchronization", "exclusive_choice")
    for i in range(1, 1001):
        attrs = {"workflow.id": f"wf-{i:05d}"}
        if i % 10:
            attrs["workflow.pattern"] = patterns[i % len(patterns)]
        pipeline.record_span(knhk.Span("workflow.execute", trace_id=i, span_id=i,
                                       duration_ns=250_000 * (1 + i % 7), attributes=attrs))
    ok = pipeline.shutdown(timeout=60)
    elapsed = time.perf_counter() - started
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    stats = pipeline.stats()
    rows = [("elapsed (s)", elapsed),
            ("spans/s end to end", stats.events_processed / max(elapsed, 1e-9))]
    rows += _stats_rows(stats)
    rows.append(("files written", len(ipc.files)))
    print(_table(rows))
    results = windows.get_results(as_table=True)
    if results.num_rows:
        top = results.filter(pc.greater_equal(results.column("count"), 20)).sort_by(
            [("p99_duration_ms", "descending")]).slice(0, 5)
        print("slowest operations (one-minute windows, before sampling):")
        print(_table([(f"{r['service']} {r['name']}",
                       f"p99 {r['p99_duration_ms']:8.1f} ms  p50 {r['p50_duration_ms']:7.1f} ms"
                       f"  errors {r['error_rate']:6.1%}  n={r['count']}")
                      for r in top.to_pylist()]))
    return 0 if ok and stats.events_processed == stats.events_received else 1


def _default_registry() -> str | None:
    """``./registry``, else the registry bundled with the package (or beside a source tree)."""
    from knhk.serve.components import default_registry

    return default_registry()


# -- serve, validate-config, stats ------------------------------------------------------


@contextlib.contextmanager
def _logging_from(config: dict[str, Any], quiet: bool = False) -> Iterator[None]:
    """Log as ``service.telemetry.logs`` says while the command runs, then restore
    the root logger (tests call commands in-process)."""
    import logging

    from knhk.serve import configure_logging

    logs = ((config.get("service") or {}).get("telemetry") or {}).get("logs") or {}
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(logs.get("level", "warning" if quiet else "info"),
                                logs.get("encoding", "console"))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _load(path: str | None) -> dict[str, Any]:
    from knhk.serve import default_config, load_config, validate_config

    if path is None:
        config = default_config()
        validate_config(config)
        return config
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    import yaml

    config = _load(args.config)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    with _logging_from(config):
        return _serve(args, config)


def _serve(args: argparse.Namespace, config: dict[str, Any]) -> int:
    import signal
    import threading

    from knhk.serve import Server

    server = Server(config)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"knhk serve: {args.config or 'embedded default config'}")
        for rid, protocol, address in server.built.listening:
            print(f"  listening  {protocol:<11} {address:<24} ({rid})")
        if server.health is not None:
            print(f"  health     {'HTTP':<11} {server.health.url:<24} (health_check)")
        for label, what in server.built.writing:
            print(f"  pipeline   {label}: {what}")
        print("ready; SIGTERM or Ctrl-C to stop", flush=True)
        while not stop.wait(0.2):
            pass
        print(f"knhk serve: {signal.Signals(received[0]).name} received, shutting down "
              f"(at most {server.shutdown_timeout:g} s)", flush=True)
        # a second signal during shutdown must not kill the flush half way
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ok = server.shutdown()
    finally:
        if server.state == "serving":  # an exception after start: still flush what came in
            server.shutdown(5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rows: list[tuple[str, Any]] = []
    for pid, s in server.summary().items():
        rows += [(f"{pid}: spans received", s["events_received"]),
                 (f"{pid}: spans processed", s["events_processed"]),
                 (f"{pid}: spans dropped", s["events_dropped"]),
                 (f"{pid}: spans sampled out", s["events_sampled_out"]),
                 (f"{pid}: validation errors", s["validation_errors"]),
                 (f"{pid}: export errors", s["export_errors"])]
        rows += [(f"{pid}: exported by {k}", v) for k, v in s["exported"].items()]
    if rows:
        print(_table(rows))
    if server.built is not None:
        _print_analyses(server.built)
    if not ok:
        print("knhk serve: error: shutdown timed out; some spans were not exported",
              file=sys.stderr)
        return 1
    return 0


def cmd_validate_config(args: argparse.Namespace) -> int:
    from knhk.serve.config import load_config

    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ValueError as exc:
            print(f"knhk validate-config: error: {exc}", file=sys.stderr)
            status = 2
            continue
        pipelines = (config.get("service") or {}).get("pipelines") or {}
        parts = ", ".join(
            f"{pid} ({len((b or {}).get('receivers') or [])} receivers, "
            f"{len((b or {}).get('processors') or [])} processors, "
            f"{len((b or {}).get('exporters') or [])} exporters)"
            for pid, b in pipelines.items())
        print(f"{path}: OK: {parts}")
    return status


def _recording_summary(paths: list[str]) -> dict[str, Any]:
    """Spans, traces, services, time range, error rate and top operations of a recording.

    knhk's own reading (``knhk.replay.read_batches``), used while
    ``knhk.analysis.open_dataset`` is not available.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from knhk.batch import SpanBatch
    from knhk.replay import read_batches

    spans = errors = metric_points = 0
    trace_ids: set[bytes] = set()
    services: set[str] = set()
    start = end = None
    parts = []
    for batch in read_batches(paths):
        if not isinstance(batch, SpanBatch):
            metric_points += batch.num_rows
            continue
        rb = batch.record_batch
        if not rb.num_rows:
            continue
        spans += rb.num_rows
        trace_ids.update(pc.unique(rb.column("trace_id")).to_pylist())
        svc = rb.column("service")
        svc = svc.dictionary_decode() if pa.types.is_dictionary(svc.type) else svc
        name = rb.column("name")
        name = name.dictionary_decode() if pa.types.is_dictionary(name.type) else name
        services.update(s for s in pc.unique(svc).to_pylist() if s is not None)
        st = rb.column("start_time_ns").cast(pa.int64())
        en = rb.column("end_time_ns").cast(pa.int64())
        lo, hi = pc.min(st).as_py(), pc.max(en).as_py()
        start = lo if start is None else min(start, lo)
        end = hi if end is None else max(end, hi)
        errors += int(pc.sum(pc.equal(rb.column("status_code"), 2)).as_py() or 0)
        dur = pc.divide(pc.subtract(en, st).cast(pa.float64()), 1e6)
        parts.append(pa.table({"service": svc.cast(pa.string()), "name": name.cast(pa.string()),
                               "duration_ms": dur}))
    top = pa.table({"service": pa.array([], pa.string()), "name": pa.array([], pa.string()),
                    "count": pa.array([], pa.int64()), "p99_ms": pa.array([], pa.float64())})
    if parts:
        t = pa.concat_tables(parts).sort_by([("service", "ascending"), ("name", "ascending")])
        svc = t.column("service").to_numpy(zero_copy_only=False)
        nm = t.column("name").to_numpy(zero_copy_only=False)
        dur = t.column("duration_ms").to_numpy()
        change = np.r_[True, (svc[1:] != svc[:-1]) | (nm[1:] != nm[:-1])]
        first = np.flatnonzero(change)
        bounds = np.r_[first, len(t)]
        p99 = [float(np.percentile(dur[a:b], 99)) for a, b in itertools.pairwise(bounds)]
        top = pa.table({"service": pa.array(svc[first], pa.string()),
                        "name": pa.array(nm[first], pa.string()),
                        "count": pa.array(np.diff(bounds), pa.int64()),
                        "p99_ms": pa.array(p99, pa.float64())}
                       ).sort_by([("p99_ms", "descending")])
    return {"spans": spans, "traces": len(trace_ids), "services": len(services),
            "start_ns": start, "end_ns": end, "error_rate": errors / spans if spans else 0.0,
            "top_operations": top, "metric_points": metric_points}


def _summary(paths: list[str]) -> dict[str, Any]:
    try:
        from knhk.analysis import open_dataset
    except ImportError:
        return _recording_summary(paths)
    return open_dataset(paths).summary()


def _fmt_ns(ns: int | None) -> str:
    import datetime as dt

    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def cmd_stats(args: argparse.Namespace) -> int:
    from knhk import replay

    paths: list[str] = []
    for item in args.files:
        paths.extend(replay._expand(item))
    summary = _summary(paths)
    start, end = summary.get("start_ns"), summary.get("end_ns")
    rows: list[tuple[str, Any]] = [
        ("files", len(paths)), ("spans", summary["spans"]), ("traces", summary["traces"]),
        ("services", summary["services"]), ("first span start", _fmt_ns(start)),
        ("last span end", _fmt_ns(end)),
        ("time span (s)", (end - start) / 1e9 if start is not None and end is not None else 0.0),
        ("error rate", f"{summary['error_rate']:.2%}")]
    if summary.get("metric_points"):
        rows.append(("metric points", summary["metric_points"]))
    print(_table(rows))
    top = summary["top_operations"]
    if top.num_rows:
        print("top operations by p99:")
        print(_table([(f"{r['service']} {r['name']}", f"p99 {r['p99_ms']:10.2f} ms  "
                       f"n={r['count']:,}") for r in top.slice(0, args.top).to_pylist()]))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from knhk.validation import cli as vcli

    if args.registry_cmd == "check":
        return vcli.registry_check_main(args.rest)
    return vcli.live_check_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knhk", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, compiled kernels and library versions")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="run receivers, pipelines and exporters until SIGTERM")
    p.add_argument("--config", default=None,
                   help="a Collector-shaped YAML config (default: the embedded one)")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration that would run, and exit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate-config", help="check serve configs without starting anything")
    p.add_argument("files", nargs="+", help="YAML config files")
    p.set_defaults(func=cmd_validate_config)

    p = sub.add_parser("generate",
                       help="write a synthetic workload to an Arrow IPC file or send it over OTLP")
    p.add_argument("--spans", type=int, default=100_000)
    p.add_argument("--out", default=None, help="output .arrow file")
    p.add_argument("--otlp", default=None, metavar="HOST:PORT",
                   help="send the spans to an OTLP receiver (knhk serve, a Collector)")
    p.add_argument("--otlp-protocol", choices=["grpc", "http/protobuf", "http/json"],
                   default="grpc")
    p.add_argument("--otlp-retry-for", type=float, default=30.0, metavar="SECONDS",
                   help="how long a refused or failed request is retried before giving up "
                        "(0: sent once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--services", type=int, default=8)
    p.add_argument("--error-rate", type=float, default=0.01)
    p.add_argument("--slow-rate", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=None,
                   help="spans per batch (default 10,000; 512 per OTLP request)")
    p.add_argument("--compression", choices=["lz4", "zstd", "none"], default="lz4")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("stats", help="summarise recorded Arrow IPC files (no pipeline)")
    p.add_argument("files", nargs="+", help="files, directories or globs")
    p.add_argument("--top", type=int, default=10, help="operations listed by p99")
    p.set_defaults(func=cmd_stats)

    def pipeline_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--batch-size", type=int, default=4096)
        q.add_argument("--capacity", type=int, default=100_000)
        q.add_argument("--registry", default=None, help="Weaver registry directory")
        q.add_argument("--no-sampling", dest="sample", action="store_false")

    p = sub.add_parser("replay", help="re-run recorded Arrow IPC files through a pipeline")
    p.add_argument("files", nargs="+", help="files or globs")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--speed", type=float, default=None,
                       help="pace by recorded timestamps, X times real time")
    speed.add_argument("--max", action="store_true", help="as fast as possible (default)")
    p.add_argument("--config", default=None,
                   help="run the pipelines of a serve config (its receivers do not listen)")
    pipeline_args(p)
    dask = p.add_argument_group("on a Dask cluster (pip install 'knhk[distributed]')")
    dask.add_argument("--dask", metavar="ADDRESS", default=None,
                      help="local:N (N worker processes here) or tcp://scheduler:8786")
    dask.add_argument("--dask-timeout", type=float, default=10.0,
                      help="seconds to wait for the scheduler")
    dask.add_argument("--analyses", default="aggregates,traces",
                      help="comma-separated: aggregates, traces, validation")
    dask.add_argument("--window", type=float, default=60.0, help="window length in seconds")
    dask.add_argument("--exact-quantiles", action="store_true",
                      help="exact quantiles through a shuffle instead of sketches")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="generate a workload, run the full pipeline, print stats")
    p.add_argument("--spans", type=int, default=200_000)
    p.add_argument("--services", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="knhk-data")
    pipeline_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("registry", help="semantic-convention registry tools")
    p.add_argument("registry_cmd", choices=["check", "live-check"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_registry)
    return parser


def _stdout_closed() -> int:
    """The reader of stdout went away (``knhk info | head -1``): exit 1 without a message.

    As the Python documentation advises for SIGPIPE (``signal`` module, "Note on
    SIGPIPE"): stdout's descriptor is pointed at devnull so that Python's flush at
    exit does not raise a second BrokenPipeError.
    """
    with contextlib.suppress(OSError, ValueError):   # ValueError: stdout has no descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "spans", 1) is not None and getattr(args, "spans", 1) < 0:
        print("error: --spans must be >= 0", file=sys.stderr)
        return 2
    from knhk.errors import KnhkError

    try:
        code = int(args.func(args) or 0)
        # a closed pipe must surface here, not in the interpreter's flush at exit
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except (KnhkError, ValueError, OSError, ImportError) as exc:
        # user mistakes and missing optional extras: one line, no traceback
        print(f"knhk {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
