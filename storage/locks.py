"""Exclusive locks on files that a writer fills over time and may resume after a crash
(partial blobs, ranged downloads): flock, so a lock dies with its process.

``open_locked`` opens (or creates) such a file and takes its lock without waiting;
``is_locked`` tells whether some process holds it now (garbage collection must leave
those alone).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from storage.fsutil import fsync_dir

__all__ = ["FileBusy", "is_locked", "open_locked"]

_ATTEMPTS = 10


class FileBusy(Exception):
    """Another writer holds the file (``changing`` False) or keeps replacing it (True)."""

    def __init__(self, changing: bool) -> None:
        super().__init__("the file keeps changing" if changing else "another writer holds it")
        self.changing = changing


def open_locked(path: Path, stale: Iterable[Path]) -> tuple[int, bool]:
    """Open (or create) ``path`` and flock it exclusively: ``(fd, created)``.

    Before a new file is created, the files in ``stale`` (progress that described an
    earlier file at ``path``: finished, discarded or lost in a crash) are removed, durably,
    so they can never describe the new one. Raises ``FileBusy``.
    """
    stale = list(stale)
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            created = False
        except FileNotFoundError:
            for old in stale:
                old.unlink(missing_ok=True)
            fsync_dir(path.parent)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue  # another writer created it in between: look again
            created = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileBusy(changing=False) from None
        # The writer we raced may have renamed this inode into place as the finished
        # file, or unlinked it, before we got the lock: only the inode still at the path
        # is ours to write, or we would scribble on a live blob.
        try:
            at_path = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (at_path.st_dev, at_path.st_ino):
            return fd, created
        os.close(fd)
    raise FileBusy(changing=True)


def is_locked(path: Path) -> bool:
    """Whether some process holds ``path``'s flock right now (False if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
