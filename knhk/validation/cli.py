"""``knhk registry check`` and ``knhk registry live-check``, as functions of argv.

``knhk.cli`` wires these to the ``knhk`` command; each takes the arguments
after the subcommand and returns the exit code, so tests call them directly.
This module prints (it is the CLI); everything else in knhk.validation logs.

Example
-------
``registry_check_main(["registry/"])`` prints ``registry .../registry: OK (...)``
with the counts, and returns 0 (1 with the errors printed, when the registry
does not load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from knhk.errors import RegistryError

__all__ = ["live_check_main", "registry_check_main"]


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="knhk registry check",
        description="Load and resolve a Weaver semantic-convention registry; print its "
                    "counts, or every error with file, line and group (exit code 1).")
    p.add_argument("registry", metavar="DIR", help="registry directory")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--cache-dir", default=None,
                   help="compiled-registry cache (default $XDG_CACHE_HOME/knhk)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not write the compiled registry to the cache")
    return p


def registry_check_main(argv: Sequence[str]) -> int:
    """``knhk registry check DIR``: 0 if the registry resolves, 1 if not, 2 on bad usage."""
    try:
        args = _check_parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    from knhk.validation.compiled import CompiledRegistry, save_compiled
    from knhk.validation.loader import RegistryFiles, resolve_files

    t0 = time.perf_counter()
    try:
        files = RegistryFiles(args.registry)
        registry = resolve_files(files)
    except RegistryError as exc:
        issues = getattr(exc, "errors", None)
        if args.format == "json":
            print(json.dumps({"registry": os.path.abspath(args.registry), "ok": False,
                              "errors": [{"file": i.file, "line": i.line, "group": i.group,
                                          "message": i.message} for i in issues or []]
                              or [str(exc)]}, indent=2))
        else:
            print(f"registry {os.path.abspath(args.registry)}: "
                  f"{len(issues) if issues else 1} error(s)", file=sys.stderr)
            for issue in issues or [exc]:
                print(f"  {issue}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    if not args.no_cache:
        save_compiled(CompiledRegistry.from_registry(registry, files), args.cache_dir or None)
    summary = registry.summary()
    if args.format == "json":
        print(json.dumps({"registry": registry.path, "ok": True, "seconds": elapsed,
                          **summary, "manifest": registry.manifest}, indent=2, default=str))
        return 0
    print(f"registry {registry.path}: OK ({elapsed:.2f} s)")
    name = registry.manifest.get("name") or registry.manifest.get("schema_url")
    if name:
        print(f"  {'manifest':<23}{name}")
    for key in ("files", "attributes", "templates", "enums", "deprecated_attributes",
                "stable_attributes", "groups", "metrics", "events"):
        print(f"  {key.replace('_', ' '):<23}{summary[key]:,}")
    for gtype, count in summary["groups_by_type"].items():
        print(f"    {gtype:<21}{count:,}")
    return 0


def _live_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="knhk registry live-check",
        description="Check telemetry samples against a registry and report as Weaver's "
                    "live-check does. Input: an Arrow IPC file of knhk batches, Weaver's "
                    "JSON sample format, or text (one 'name' or 'name=value' per line).")
    p.add_argument("--registry", "-r", required=True, metavar="DIR")
    p.add_argument("--input", "-i", required=True, metavar="FILE")
    p.add_argument("--input-format", choices=["auto", "ipc", "json", "text"], default="auto")
    p.add_argument("--format", choices=["json", "text"], default="text")
    p.add_argument("--fail-on", choices=["violation", "improvement", "information", "none"],
                   default="violation",
                   help="exit 1 if any finding reaches this level (default violation)")
    p.add_argument("--output", "-o", default=None, help="write the report here (default stdout)")
    p.add_argument("--span-group", action="append", default=[], metavar="NAME=GROUP",
                   help="check spans named NAME (a glob) against GROUP; repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="ID",
                   help="do not report this finding id; repeatable")
    p.add_argument("--max-samples", type=int, default=None,
                   help="keep at most this many batch rows as samples in the report")
    p.add_argument("--cache-dir", default=None)
    return p


def live_check_main(argv: Sequence[str]) -> int:
    """``knhk registry live-check``: exit 0, or 1 if a finding reaches ``--fail-on``;
    2 for bad usage, an unreadable input or a registry that does not load."""
    try:
        args = _live_parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    from knhk.validation.live_check import LiveCheckInputError, run
    from knhk.validation.validator import WeaverValidator

    mapping = {}
    for item in args.span_group:
        name, sep, group = item.partition("=")
        if not sep or not name or not group:
            print(f"error: --span-group takes NAME=GROUP, got {item!r}", file=sys.stderr)
            return 2
        mapping[name] = group
    try:
        validator = WeaverValidator(args.registry, span_groups=mapping, exclude=args.exclude,
                                    cache_dir=args.cache_dir)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        lc = run(validator, args.input, args.input_format, args.max_samples)
    except (LiveCheckInputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        text = json.dumps(lc.report(), indent=2, default=str)
    else:
        text = _text_report(lc)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 1 if lc.fails(args.fail_on) else 0


def _text_report(lc) -> str:
    lines = []
    for sample in lc.samples:
        (kind, body), = sample.items()
        lines.extend(_text_sample(kind, body, ""))
    st = lc.statistics()
    lines.append("")
    lines.append(f"entities  {st['total_entities']:,} "
                 f"({', '.join(f'{k} {v:,}' for k, v in st['total_entities_by_type'].items())})")
    lines.append(f"advice    {st['total_advisories']:,} "
                 f"({', '.join(f'{k} {v:,}' for k, v in st['advice_level_counts'].items())})")
    for fid, count in sorted(st["advice_type_counts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {fid:<46}{count:,}")
    lines.append(f"no advice {st['no_advice_count']:,}")
    lines.append(f"registry coverage {st['registry_coverage']:.1%}")
    return "\n".join(lines)


def _text_sample(kind: str, body: dict, indent: str) -> list[str]:
    name = body.get("name", body.get("event_name", ""))
    res = body.get("live_check_result") or {}
    head = f"{indent}{kind} {name!r}"
    if "value" in body and body.get("value") is not None:
        head += f" = {body['value']!r}"
    out = [head]
    for adv in res.get("all_advice", []):
        out.append(f"{indent}  [{adv['level']}] {adv['id']}: {adv['message']}")
    for a in body.get("attributes") or []:
        if isinstance(a, dict) and (a.get("live_check_result") or {}).get("all_advice"):
            out.extend(_text_sample("attribute", a, indent + "  "))
    for key in ("span_events", "span_links", "data_points"):
        for sub in body.get(key) or []:
            if isinstance(sub, dict):
                sub_lines = _text_sample(key[:-1], sub, indent + "  ")
                if len(sub_lines) > 1:
                    out.extend(sub_lines)
    return out
