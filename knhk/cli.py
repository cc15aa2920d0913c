"""The ``knhk`` command: info, generate, replay, demo, registry.

Only this module prints. Each subcommand is a function taking parsed
arguments and returning an exit code, so tests call ``main([...])`` directly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("numpy", "pyarrow", "PyYAML", "grpcio", "protobuf", "opentelemetry-proto",
                 "prometheus-client", "lz4", "Cython"):
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
    from knhk.exporters.ipc import IpcFileWriter
    from knhk.schema import SPAN_SCHEMA

    config = workload.WorkloadConfig(seed=args.seed, services=args.services,
                                     error_rate=args.error_rate, slow_rate=args.slow_rate)
    out = args.out
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    started = time.perf_counter()
    done = 0
    if os.path.exists(out):
        os.remove(out)  # the writer never truncates a file; generate replaces it on purpose
    with IpcFileWriter(out, SPAN_SCHEMA,
                       compression=None if args.compression == "none" else args.compression
                       ) as writer:
        for batch in workload.generate_batches(args.spans, config=config,
                                               batch_size=args.batch_size):
            writer.write(batch)
            done += batch.num_rows
            _progress(done, args.spans, started)
    elapsed = time.perf_counter() - started
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    size = os.path.getsize(out)
    print(f"wrote {done:,} spans to {out} ({size:,} bytes, {size / max(done, 1):.1f} bytes/span, "
          f"{args.compression}) in {elapsed:.2f} s")
    return 0


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


def cmd_replay(args: argparse.Namespace) -> int:
    from knhk import replay
    from knhk.errors import CorruptFileError

    counter = _CountingExporter()
    pipeline = _build_pipeline(args, [counter])
    started = time.perf_counter()
    status = 0
    try:
        result = replay.replay(args.files, pipeline, speed=None if args.max else args.speed,
                               progress=lambda n: _progress(n, None, started))
    except CorruptFileError as exc:
        print(f"knhk replay: error: {exc}", file=sys.stderr)
        status = 2
        result = getattr(exc, "replay_stats", None)
    except (OSError, ValueError) as exc:
        print(f"knhk replay: error: {exc}", file=sys.stderr)
        pipeline.shutdown()
        return 2
    pipeline.shutdown()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    stats = pipeline.stats()
    rows: list[tuple[str, Any]] = []
    if result is not None:
        rows += [("files", result.files), ("batches read", result.batches),
                 ("spans read", result.spans), ("elapsed (s)", result.elapsed_s),
                 ("spans/s", result.spans / max(result.elapsed_s, 1e-9))]
    rows += _stats_rows(stats)
    print(_table(rows))
    return status


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
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.getcwd(), "registry"),
                      os.path.join(package, "_registry"),
                      os.path.join(os.path.dirname(package), "registry")):
        if os.path.isfile(os.path.join(candidate, "registry_manifest.yaml")) or \
                os.path.isfile(os.path.join(candidate, "manifest.yaml")):
            return candidate
    return None


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

    p = sub.add_parser("generate", help="write a synthetic workload to an Arrow IPC file")
    p.add_argument("--spans", type=int, default=100_000)
    p.add_argument("--out", required=True, help="output .arrow file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--services", type=int, default=8)
    p.add_argument("--error-rate", type=float, default=0.01)
    p.add_argument("--slow-rate", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--compression", choices=["lz4", "zstd", "none"], default="lz4")
    p.set_defaults(func=cmd_generate)

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
    pipeline_args(p)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "spans", 1) is not None and getattr(args, "spans", 1) < 0:
        print("error: --spans must be >= 0", file=sys.stderr)
        return 2
    from knhk.errors import KnhkError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (KnhkError, ValueError, OSError) as exc:
        print(f"knhk {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
