"""storage/locks.py: one writer per resumable file; stale progress never outlives its file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.locks import FileBusy, is_locked, open_locked


def test_first_open_creates_and_removes_stale_progress(tmp_path: Path) -> None:
    data, progress = tmp_path / "blob.partial", tmp_path / "blob.progress"
    progress.write_bytes(b"describes an earlier file")
    fd, created = open_locked(data, (progress,))
    try:
        assert created and data.exists() and not progress.exists()
        assert is_locked(data)
        with pytest.raises(FileBusy) as busy:
            open_locked(data, (progress,))
        assert busy.value.changing is False
    finally:
        os.close(fd)
    assert not is_locked(data)
    # Reopened after the writer left: not created, and progress next to it is kept.
    progress.write_bytes(b"ours")
    fd, created = open_locked(data, (progress,))
    os.close(fd)
    assert not created and progress.read_bytes() == b"ours"


def test_a_missing_file_is_not_locked(tmp_path: Path) -> None:
    assert not is_locked(tmp_path / "nothing")
