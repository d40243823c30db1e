"""``python -m bench [NAME ...] [--json FILE] [--quick]``: run benchmarks, print one table."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import Benchmark, Figure, discover

COLUMNS = ("bench", "figure", "value", "unit", "baseline", "baseline value", "ratio", "better")


def _parser(known: dict[str, Benchmark]) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {b.name:<12} {b.summary}" for b in known.values())
    return argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Run dmm's benchmarks and print one table of figures.\n\n"
            "Each figure with a baseline was measured in the same run, on the same data,\n"
            "as that baseline; ratio = value / baseline value, and 'better' says which\n"
            "direction is good. Absolute figures depend on the machine; compare ratios.\n"
            "Progress goes to stderr, the table to stdout."
        ),
        epilog=(
            f"benchmarks:\n{listing}\n\n"
            "exit status: 0 ok, 1 a benchmark failed, 2 bad usage (e.g. an unknown name)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (default: all of them)"
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help='also write {"figures": [...]} to FILE, one object per table row',
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, for smoke tests; the figures are not comparable with full runs",
    )


def _cell(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) >= 10 else f"{value:.3f}"


def format_table(figures: Sequence[Figure]) -> str:
    rows = [
        (
            f.bench,
            f.name,
            _cell(f.value),
            f.unit,
            _cell(f.baseline),
            _cell(f.baseline_value),
            _cell(f.ratio),
            f.better,
        )
        for f in figures
    ]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(COLUMNS)]
    # Numbers right-aligned so their magnitudes line up; text left-aligned.
    numeric = {2, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    for f in figures:
        met = f.goal_met()
        if met is not None:
            sign = ">=" if f.better == "higher" else "<="
            out.append(
                f"goal {f.bench}/{f.name}: ratio {sign} {f.goal:.2f} "
                f"({'met' if met else 'MISSED'}: {f.ratio:.3f})"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    known = discover()
    parser = _parser(known)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(
            f"bench: unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    chosen = [known[n] for n in dict.fromkeys(args.names)] if args.names else list(known.values())
    figures: list[Figure] = []
    failed: list[str] = []
    for benchmark in chosen:
        started = time.monotonic()
        try:
            figures.extend(benchmark.run(args.quick))
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            failed.append(benchmark.name)
            print(
                f"bench: {benchmark.name} failed after {time.monotonic() - started:.0f} s: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            traceback.print_exc(file=sys.stderr)
        else:
            print(
                f"bench: {benchmark.name} took {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        if args.json is not None:
            # Rewritten after each benchmark: a long run cut short keeps what it measured.
            payload = {"figures": [f.to_json() for f in figures]}
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(format_table(figures))
    if failed:
        print(f"failed: {', '.join(failed)} (see stderr)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
