"""Shared fixtures: real GGUF models written by our generator, and stores on real disks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from storage.store import ModelStore
from storage.testmodels import generate_model
from tests.oci_registry import oci_registry  # noqa: F401  (a session fixture)

MiB = 1024 * 1024
MakeModel = Callable[..., Path]


@pytest.fixture
def make_model(tmp_path: Path) -> MakeModel:
    """make_model(name, size, **generate_model kwargs) -> path of a real GGUF file."""
    folder = tmp_path / "gguf"
    folder.mkdir()

    def make(name: str = "model.gguf", size: int = 2 * MiB, **kwargs: object) -> Path:
        path = folder / name
        generate_model(path, size, **kwargs)  # type: ignore[arg-type]
        return path

    return make


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ModelStore]:
    with ModelStore(
        tmp_path / "models", tmp_path / "data" / "dmm.db", tmp_path / "data" / "cas"
    ) as s:
        yield s


def clean_env() -> dict[str, str]:
    """The environment without settings that would point a dmm process at the user's store."""
    return {k: v for k, v in os.environ.items() if k not in ("DMM_CONFIG", "OLLAMA_MODELS")}


def dmm(config: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run the real `dmm` command on ``config``; assert its exit code unless ``check`` is None."""
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr + proc.stdout
    return proc


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is waiting (pytest-trio uses it)."""
    return trio.testing.MockClock(autojump_threshold=0)
