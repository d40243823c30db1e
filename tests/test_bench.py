"""The benchmark runner's contract (DESIGN.md, "Benchmarks"): the JSON shape and usage errors.

Runs the real runner in a subprocess, as scripts/bench does. Speed is not checked here:
on a shared machine a wall-clock threshold would fail at random; the figures are for people.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURE_KEYS = {
    "bench",
    "name",
    "value",
    "unit",
    "baseline",
    "baseline_value",
    "ratio",
    "better",
}


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_quick_storage_run_writes_the_figures_json(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = _bench("storage", "--quick", "--json", str(out))
    assert done.returncode == 0, done.stderr
    payload = json.loads(out.read_text())
    assert set(payload) == {"figures"}
    figures = payload["figures"]
    assert figures, "the storage benchmark reported no figures"
    for fig in figures:
        assert set(fig) == FIGURE_KEYS, fig
        assert fig["bench"] == "storage"
        assert isinstance(fig["name"], str) and fig["name"]
        assert isinstance(fig["unit"], str) and fig["unit"]
        assert fig["better"] in ("higher", "lower")
        assert isinstance(fig["value"], int | float) and fig["value"] > 0
        if fig["baseline"] is None:
            assert fig["baseline_value"] is None and fig["ratio"] is None, fig
        else:
            assert isinstance(fig["baseline"], str) and fig["baseline"]
            assert isinstance(fig["baseline_value"], int | float) and fig["baseline_value"] > 0
            assert isinstance(fig["ratio"], int | float) and fig["ratio"] > 0
            assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    names = {f["name"] for f in figures}
    assert {"index_file", "import_models", "chunks", "mean chunk size"} <= names
    # Every figure is also a row of the printed table.
    for fig in figures:
        assert any(fig["name"] in line for line in done.stdout.splitlines())


def test_an_unknown_benchmark_is_a_usage_error_naming_the_known_ones() -> None:
    done = _bench("no-such-bench", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no-such-bench" in lines[0] and "storage" in lines[0]
    assert done.stdout == ""


def test_help_lists_the_benchmarks_and_options() -> None:
    done = _bench("--help", timeout=60)
    assert done.returncode == 0
    for word in ("--json", "--quick", "storage", "ratio"):
        assert word in done.stdout


@pytest.mark.slow
def test_quick_transfer_run_reports_positive_figures(tmp_path: Path) -> None:
    """Real node processes on loopback: pulls, peak RSS and the delta all come out positive."""
    out = tmp_path / "figures.json"
    done = _bench("transfer", "--quick", "--json", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    assert figures, "the transfer benchmark reported no figures"
    for fig in figures:
        assert set(fig) == FIGURE_KEYS, fig
        assert fig["bench"] == "transfer"
        assert fig["value"] > 0 and fig["baseline_value"] > 0 and fig["ratio"] > 0, fig
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    names = " | ".join(f["name"] for f in figures)
    for word in ("1 peer", "peers at once", "peak RSS", "delta"):
        assert word in names, names


@pytest.mark.slow
def test_quick_discovery_run_reports_find_and_propagation_figures(tmp_path: Path) -> None:
    """Eight real nodes in the runner's process: the figures are there and plausible.

    No timing is asserted (a shared machine); counts of misses may be zero, the rest
    are measured seconds and must be positive.
    """
    out = tmp_path / "figures.json"
    done = _bench("discovery", "--quick", "--json", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    timed = {
        "find p50",
        "find p95 (goal <= 1 s)",
        "find p95, literal prefix",
        "find p95, no prefix",
        "propagation p50 to all",
        "propagation max to all (goal <= 2 s)",
    }
    counts = {"find misses", "exact-key misses", "propagation misses"}
    assert timed | counts <= set(figures), sorted(figures)
    for name, fig in figures.items():
        assert set(fig) == FIGURE_KEYS, fig
        assert fig["bench"] == "discovery"
        if name in counts:
            assert fig["unit"] == "count" and fig["value"] >= 0, fig
        else:
            assert fig["value"] > 0, fig
    for name in timed:
        fig = figures[name]
        assert fig["unit"] == "s" and fig["better"] == "lower"
        assert fig["baseline"] and fig["baseline_value"] > 0, fig
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    # The absolute goals are printed under the table by the runner.
    assert "goal discovery/find p95 (goal <= 1 s)" in done.stdout


@pytest.mark.slow
def test_quick_swarm_run_builds_a_shaped_lan_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Three hosts in network namespaces: the figures are there, and so is no namespace."""
    out = tmp_path / "figures.json"
    done = _bench("swarm", "--quick", "--json", str(out), timeout=400)
    assert done.returncode == 0, done.stderr
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert set(figures) == {
        "one dmm pull alone",
        "N=2: all have the model",
        "N=2: all have it, vs one download",
        "N=2: holder upload",
        "N=2: node CPU per puller",
        "N=2: all have it, vs CPU-bound floor",
    }
    for fig in figures.values():
        assert set(fig) == FIGURE_KEYS and fig["bench"] == "swarm", fig
        assert fig["value"] > 0 and fig["baseline_value"] > 0, fig
        assert fig["better"] == "lower"
    # The registry case sends the model once per puller (plus headers).
    assert figures["N=2: holder upload"]["baseline_value"] >= 2.0
    # CPU can only be the floor of the time if it is measured: a whole node process runs
    # Noise, Yamux and sha256 for every byte of a 4 MiB pull.
    assert figures["N=2: node CPU per puller"]["baseline_value"] > 0.05
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "dmmlab" not in left.stdout


@pytest.mark.slow
def test_quick_replication_run_reports_latency_cpu_share_and_heal_time(tmp_path: Path) -> None:
    """A measured `dmm node start` process and five in-process peers: every figure is
    there, positive, with its baseline; no timing is asserted (a shared machine)."""
    out = tmp_path / "figures.json"
    done = _bench("replication", "--quick", "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert len(figures) == 5, sorted(figures)
    for fig in figures.values():
        assert set(fig) == FIGURE_KEYS and fig["bench"] == "replication", fig
        assert fig["value"] >= 0 and fig["better"] == "lower", fig
    with_baseline = [f for f in figures.values() if f["baseline"]]
    assert len(with_baseline) == 3
    for fig in with_baseline:
        assert fig["baseline_value"] > 0
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"])
    assert "enforcement latency" in done.stdout  # the table, on stdout


def test_a_failing_benchmark_is_reported_and_the_others_still_print(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench
    from bench.__main__ import main

    def broken(quick: bool) -> list[bench.Figure]:
        raise RuntimeError("the lab is on fire")

    def fine(quick: bool) -> list[bench.Figure]:
        return [bench.Figure.against("zz-fine", "speed", 2.0, "x", "baseline", 4.0)]

    known = {
        "aa-broken": bench.Benchmark("aa-broken", broken, "fails"),
        "zz-fine": bench.Benchmark("zz-fine", fine, "works"),
    }
    monkeypatch.setattr("bench.__main__.discover", lambda: known)
    out = tmp_path / "figures.json"
    assert main(["--json", str(out)]) == 1
    printed = capsys.readouterr()
    assert "aa-broken failed" in printed.err and "the lab is on fire" in printed.err
    assert "zz-fine" in printed.out and "0.500" in printed.out
    assert "failed: aa-broken" in printed.out
    assert [f["bench"] for f in json.loads(out.read_text())["figures"]] == ["zz-fine"]


def test_a_run_whose_only_benchmark_fails_still_prints_its_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no figure at all, the table used to crash on its column widths."""
    import bench
    from bench.__main__ import main

    def broken(quick: bool) -> list[bench.Figure]:
        raise RuntimeError("the lab is on fire")

    known = {"aa-broken": bench.Benchmark("aa-broken", broken, "fails")}
    monkeypatch.setattr("bench.__main__.discover", lambda: known)
    assert main([]) == 1
    printed = capsys.readouterr()
    assert "aa-broken failed" in printed.err and "the lab is on fire" in printed.err
    assert printed.out.startswith("bench  figure") and "failed: aa-broken" in printed.out
