"""The one-pass indexer: its chunks equal a whole-buffer FastCDC pass, its digest is sha256."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from storage import chunks
from storage.chunks import DEFAULT_PARAMS, ChunkParams, chunk_bytes, index_file

KiB, MiB = 1024, 1024 * 1024
P = DEFAULT_PARAMS

# Sizes around the chunker's limits: empty, one byte, a chunk just under/at/over the
# minimum and maximum, and enough for many chunks.
INTERESTING_SIZES = [
    0,
    1,
    P.min_size - 1,
    P.min_size,
    P.min_size + 1,
    P.max_size - 1,
    P.max_size,
    P.max_size + 1,
    9 * MiB + 12345,
]


def _data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _check(path: Path, data: bytes, params: ChunkParams) -> None:
    index = index_file(path, params)
    assert index.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert index.size == len(data)
    assert list(index.chunks) == chunk_bytes(data, params)
    # Chunks tile the blob exactly, and each is within the limits (the last may be short).
    pos = 0
    for i, c in enumerate(index.chunks):
        assert c.offset == pos
        assert c.length <= params.max_size
        if i < len(index.chunks) - 1:
            assert c.length >= params.min_size
        assert c.digest == hashlib.sha256(data[c.offset : c.offset + c.length]).digest()
        pos += c.length
    assert pos == len(data)


@pytest.mark.parametrize("size", INTERESTING_SIZES)
def test_index_matches_reference(tmp_path: Path, size: int) -> None:
    data = _data(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    _check(path, data, DEFAULT_PARAMS)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 1 * MiB - 1, 1 * MiB, 1 * MiB + 1, 5 * MiB + 7])
def test_windows_do_not_change_cuts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Pins the window carry-over: cuts across mmap windows equal one whole pass."""
    monkeypatch.setattr(chunks, "WINDOW", 256 * KiB)
    monkeypatch.setattr(chunks, "HASH_BLOCK", 64 * KiB)
    params = ChunkParams(min_size=4 * KiB, avg_size=16 * KiB, max_size=64 * KiB)
    data = _data(size, seed=size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    _check(path, data, params)


def test_identical_content_gives_identical_chunks_after_a_shift(tmp_path: Path) -> None:
    """Content-defined: inserting bytes at the front changes only the first chunks."""
    body = _data(16 * MiB, seed=7)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"header-v1" + body)
    b.write_bytes(b"a longer header, version two" + body)
    ids_a = {c.digest for c in index_file(a).chunks}
    ids_b = [c.digest for c in index_file(b).chunks]
    shared = sum(1 for d in ids_b if d in ids_a)
    assert shared >= len(ids_b) - 2


def test_progress_adds_up_to_size(tmp_path: Path) -> None:
    data = _data(5 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    seen: list[int] = []
    index_file(path, DEFAULT_PARAMS, seen.append)
    assert sum(seen) == len(data)


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk sizes"):
        ChunkParams(min_size=2 * MiB, avg_size=1 * MiB, max_size=4 * MiB)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        index_file(tmp_path / "nope")
