"""Run knhk's side-by-side benchmarks, print JSON, and update RESULTS.md.

    python benchmarks/run.py                 # every area, full sizes
    python benchmarks/run.py ingest --quick  # one area, smaller sizes
    python benchmarks/run.py --no-write      # print only

Each area is a ``bench_<area>.py`` module with a ``scenarios(quick)`` function
returning :class:`_harness.Result` records: knhk and the tool a user would
otherwise pick, measured in the same run (medians of several runs where the
figure is a rate). RESULTS.md keeps one section per area between markers, so
areas can be re-run separately.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _areas() -> list[str]:
    return sorted(f[6:-3] for f in os.listdir(HERE)
                  if f.startswith("bench_") and f.endswith(".py"))


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _section(area: str, results: list, command: str) -> str:
    import knhk

    lines = [
        f"<!-- area:{area} -->",
        f"### {area}",
        "",
        f"`{command}` — {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"knhk {knhk.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores ({platform.machine()})",
        "",
        "| measure | unit | knhk | peer | knhk/peer | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.name} | {r.unit} | {_fmt(r.knhk)} | {_fmt(r.peer)} | "
                     f"{_fmt(r.ratio)} | {r.target or '-'} | {met} |")
    notes = [f"- {r.name}: peer = {r.peer_name}. {r.notes}".rstrip()
             for r in results if r.peer_name or r.notes]
    if notes:
        lines += ["", *notes]
    lines.append(f"<!-- /area:{area} -->")
    return "\n".join(lines)


def update_results(path: str, area: str, section: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = (
            "# Benchmark results\n\nMeasured on the development machine; the machine is "
            "noisy, so compare the ratios (knhk beside its peer in the same run), not "
            "absolute figures across runs.\n")
    pattern = re.compile(rf"<!-- area:{re.escape(area)} -->.*?<!-- /area:{re.escape(area)} -->",
                         re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("areas", nargs="*", help=f"areas (default all): {', '.join(_areas())}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    areas = args.areas or _areas()
    out = {}
    for area in areas:
        mod = importlib.import_module(f"bench_{area}")
        if not hasattr(mod, "scenarios"):
            continue
        results = mod.scenarios(quick=args.quick)
        out[area] = [r.as_dict() for r in results]
        command = "python benchmarks/run.py " + area + (" --quick" if args.quick else "")
        if not args.no_write:
            update_results(os.path.join(HERE, "RESULTS.md"), area,
                           _section(area, results, command))
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
