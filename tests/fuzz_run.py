"""``scripts/fuzz [TARGET ...] [--examples N] [--seed S] [--jobs N]``: the long fuzz pass.

Runs every target of ``tests/fuzz_targets.py`` (and ``http``: the node's API router, on a
real node in a scratch directory) for ``--examples`` inputs each, and prints per target
the inputs tried, how many were refused with the typed error and how many accepted.
Exit 1 if any target did anything else, with the (shrunk) reproducer printed; 2 on bad
usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz_targets import ACCEPTED, DEFAULT_BUDGET, REFUSED, TARGETS, Target, check

HTTP = "http"


@dataclass
class Result:
    name: str
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    failure: str | None = None


def _parser() -> argparse.ArgumentParser:
    names = [*TARGETS, HTTP]
    listing = "\n".join(f"  {t.name:<16} {t.summary}" for t in TARGETS.values())
    listing += f"\n  {HTTP:<16} the node's HTTP API: bodies, query strings, any path (a real node)"
    return argparse.ArgumentParser(
        prog="scripts/fuzz",
        description=(
            "Fuzz every decoder a peer or HTTP client can reach with arbitrary bytes and\n"
            "mutated valid inputs; each must accept or refuse with its typed error, never\n"
            "raise anything else and never hang. Prints inputs tried, refused, accepted."
        ),
        epilog=(
            f"targets (default: all of {', '.join(names)}):\n{listing}\n\n"
            "exit status: 0 nothing found, 1 a finding (reproducer printed), 2 bad usage."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _run_target(target: Target, examples: int, random_seed: int, budget: float) -> Result:
    result = Result(target.name)
    last: list[Any] = [None]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @seed(random_seed)
    @given(target.strategy)
    def fuzz(value: Any) -> None:
        last[0] = value
        result.counts[check(target, value, budget)] += 1

    started = time.monotonic()
    try:
        fuzz()
    except Exception:
        # Hypothesis replays the shrunk example last, so `last` is the minimal reproducer.
        result.failure = f"input: {last[0]!r:.4000}\n{traceback.format_exc(limit=8)}"
    result.seconds = time.monotonic() - started
    return result


def _run_named(name: str, examples: int, random_seed: int, budget: float) -> Result:
    return _run_target(TARGETS[name], examples, random_seed, budget)


def _run_http(examples: int, random_seed: int) -> Result:
    from node.api import build_router
    from node.daemon import open_node
    from node.testing import node_config
    from tests.fuzz_http import HttpCase, run_http_fuzz

    result = Result(HTTP)
    failing: list[str] = []

    def on_failure(case: HttpCase, exc: BaseException) -> None:
        failing[:] = [f"input: {case!r:.4000}"]

    async def main(root: Path) -> None:
        async with open_node(node_config(root, "fuzzed")) as node:
            router = build_router(node)
            await trio.to_thread.run_sync(
                lambda: run_http_fuzz(
                    router,
                    examples=examples,
                    derandomize=False,
                    random_seed=random_seed,
                    counts=result.counts,
                    on_failure=on_failure,
                )
            )

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dmm-fuzz-") as root:
        try:
            trio.run(main, Path(root))
        except Exception:
            result.failure = "\n".join([*failing, traceback.format_exc(limit=8)])
    result.seconds = time.monotonic() - started
    return result


def _table(results: Sequence[Result]) -> str:
    header = ("target", "inputs", "refused", "accepted", "inputs/s", "result")
    rows = []
    for r in results:
        tried = sum(r.counts.values())
        rows.append(
            (
                r.name,
                f"{tried:,}",
                f"{r.counts[REFUSED]:,}",
                f"{r.counts[ACCEPTED]:,}",
                f"{tried / r.seconds:,.0f}" if r.seconds else "-",
                "FINDING" if r.failure else "ok",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if 0 < i < 5 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET", help="targets to run (default: all)"
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=100_000,
        metavar="N",
        help="inputs per target (default 100000; http runs about 50 inputs/s)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="hypothesis seed (default: random, printed)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        metavar="SECONDS",
        help=f"time one input may take before it counts as a hang (default {DEFAULT_BUDGET:g})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="targets fuzzed at once, each in its own process (default 1)",
    )
    args = parser.parse_args(argv)
    known = [*TARGETS, HTTP]
    unknown = [t for t in args.targets if t not in known]
    if unknown or args.examples < 1 or args.budget <= 0 or args.jobs < 1:
        what = (
            f"unknown target {', '.join(unknown)}"
            if unknown
            else "--examples, --budget and --jobs must be > 0"
        )
        print(f"fuzz: {what}; targets: {', '.join(known)}", file=sys.stderr)
        return 2
    random_seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzz: seed {random_seed}, {args.examples:,} inputs per target", file=sys.stderr)
    names = list(dict.fromkeys(args.targets or known))
    done: dict[str, Result] = {}

    def report(result: Result) -> None:
        done[result.name] = result
        print(f"fuzz: {result.name} done", file=sys.stderr, flush=True)
        if result.failure:
            print(
                f"fuzz: FINDING in {result.name} (seed {random_seed}):\n{result.failure}",
                file=sys.stderr,
            )

    if HTTP in names:
        report(_run_http(args.examples, random_seed))
    others = [n for n in names if n != HTTP]
    if args.jobs > 1:
        # Targets are looked up by name in each worker: strategies do not pickle.
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(_run_named, n, args.examples, random_seed, args.budget) for n in others
            ]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
    else:
        for name in others:
            report(_run_target(TARGETS[name], args.examples, random_seed, args.budget))
    results = [done[n] for n in names]
    print(_table(results))
    return 1 if any(r.failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
