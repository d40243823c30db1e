"""Benchmarks: each measures a figure and, in the same run on the same data, a baseline.

A benchmark is a function in a module of this package, registered with ``@register``:

    @register("name")
    def run(quick: bool) -> list[Figure]:
        \"\"\"One line for ``python -m bench --help``.\"\"\"
        ...

``discover()`` imports every public module here, so dropping a file into ``bench/`` is
all it takes to add one. ``quick`` asks for small sizes (the test suite's smoke run);
figures from a quick run are not to be compared with full ones.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Better",
    "Figure",
    "RunFn",
    "discover",
    "progress",
    "register",
]

Better = Literal["higher", "lower"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number, with the baseline it is judged against (if any).

    ``ratio`` is always value / baseline_value; ``better`` says which way is good.
    ``goal`` is the ratio the figure should reach; it is shown under the table and is
    not part of the JSON contract.
    """

    bench: str
    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    better: Better = "higher"
    goal: float | None = None

    @classmethod
    def against(
        cls,
        bench: str,
        name: str,
        value: float,
        unit: str,
        baseline: str,
        baseline_value: float,
        *,
        better: Better = "higher",
        goal: float | None = None,
    ) -> Figure:
        """A figure with its ratio to a baseline measured in the same run."""
        if baseline_value <= 0:
            raise ValueError(f"{bench}/{name}: baseline {baseline!r} measured {baseline_value}")
        return cls(
            bench, name, value, unit, baseline, baseline_value, value / baseline_value, better, goal
        )

    def goal_met(self) -> bool | None:
        if self.goal is None or self.ratio is None:
            return None
        return self.ratio >= self.goal if self.better == "higher" else self.ratio <= self.goal

    def to_json(self) -> dict[str, Any]:
        """Exactly the keys of the benchmark contract in DESIGN.md."""
        return {
            "bench": self.bench,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "better": self.better,
        }


# run(quick) -> the figures, baselines included.
RunFn = Callable[[bool], list[Figure]]


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    run: RunFn
    summary: str


BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str) -> Callable[[RunFn], RunFn]:
    """Register ``fn(quick) -> list[Figure]`` under ``name``; its docstring's first line
    is the summary ``--help`` shows."""

    def add(fn: RunFn) -> RunFn:
        if name in BENCHMARKS and BENCHMARKS[name].run is not fn:
            raise ValueError(f"benchmark {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()
        BENCHMARKS[name] = Benchmark(name, fn, summary[0] if summary else "")
        return fn

    return add


def discover() -> dict[str, Benchmark]:
    """Import every public module of this package so their ``@register``s run."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(BENCHMARKS.items()))


def progress(message: str) -> None:
    """What a benchmark is doing, on stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)
