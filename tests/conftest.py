"""Shared fixtures: real GGUF models written by our generator, and stores on real disks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.store import ModelStore
from storage.testmodels import generate_model

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
