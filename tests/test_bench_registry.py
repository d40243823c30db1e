"""Smoke run of ``scripts/bench registry --quick``: it runs and reports positive figures.

Speed is not checked (a wall-clock threshold on a shared machine fails at random)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.testregistry import OciRegistry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_registry_run_reports_positive_figures(
    tmp_path: Path, oci_registry: OciRegistry
) -> None:
    # (oci_registry: fail with what to do, as every registry test does, when it is missing.)
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "registry", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    assert len(figures) == 2
    for fig in figures:
        assert fig["bench"] == "registry" and fig["unit"] == "MB/s"
        assert fig["value"] > 0 and fig["baseline_value"] > 0 and fig["ratio"] > 0
