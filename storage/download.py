"""A blob downloaded in byte ranges (from an HTTP registry), resumable, verified before placed.

``PartialBlob`` assembles blobs from chunks whose hashes are known in advance; a registry
only tells the whole blob's sha256, so bytes are trusted only once the whole file hashes
to it. The blob is cut into a few equal parts, each downloaded front to back by its own
request; what each part holds is recorded so a restart asks only for the rest. Two files
live in the blobs directory meanwhile, dot-prefixed so neither our walkers nor Ollama
take them for blobs:

``.dmm-<hex>.download``
    The blob's bytes, pre-sized (sparse); each part writes at its own offsets.
``.dmm-<hex>.download-progress``
    Bytes done per part, replaced atomically by ``flush`` after the data was fsynced
    (a crash can lose progress, never claim bytes that did not reach the disk). Layout
    (little-endian): ``b"DMMDL1\\n\\0" | size u64 | part size u64 | part count u32 |
    done u64 per part | sha256 of everything before``. A sidecar that is missing, short,
    for another size or part size, or fails its checksum means "nothing done yet".

An exclusive ``flock`` on the data file keeps two writers off the same download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from storage.cas import BlobMismatchError, ContentAddressedStore
from storage.chunks import DEFAULT_PARAMS, BlobIndex, ChunkParams, index_file
from storage.fsutil import StoreFullError, fsync_dir
from storage.locks import FileBusy, is_locked, open_locked
from storage.names import digest_hex, parse_digest
from storage.partial import PartialBusy

DATA_SUFFIX = ".download"
PROGRESS_SUFFIX = ".download-progress"
_PREFIX = ".dmm-"
_MAGIC = b"DMMDL1\n\x00"
_HEADER = struct.Struct("<8sQQI")
_CHECKSUM = 32

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes ``[start, end)`` of the blob; ``done`` of them, from ``start``, are on disk."""

    index: int
    start: int
    end: int
    done: int

    @property
    def next_offset(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int:
        return self.end - self.start - self.done


def download_paths(cas: ContentAddressedStore, digest: str) -> tuple[Path, Path]:
    """(data file, progress sidecar) of a blob being downloaded."""
    stem = _PREFIX + digest_hex(digest)
    return cas.blobs_dir / (stem + DATA_SUFFIX), cas.blobs_dir / (stem + PROGRESS_SUFFIX)


def stale_downloads(cas: ContentAddressedStore, older_than: float) -> list[Path]:
    """Download files (and sidecars) untouched for ``older_than`` seconds and not in use.

    GC deletes these: a pull abandoned that long ago starts over when it is retried.
    """
    cutoff = time.time() - older_than
    found: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cas.blobs_dir):
            name = entry.name
            if not name.startswith(_PREFIX) or not name.endswith(
                (DATA_SUFFIX, PROGRESS_SUFFIX, PROGRESS_SUFFIX + ".tmp")
            ):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime >= cutoff:
                    continue
                data = Path(entry.path[: entry.path.index(DATA_SUFFIX)] + DATA_SUFFIX)
                if not is_locked(data):
                    found.append(Path(entry.path))
    return sorted(found)


def _encode(size: int, part_size: int, done: list[int]) -> bytes:
    body = _HEADER.pack(_MAGIC, size, part_size, len(done)) + struct.pack(f"<{len(done)}Q", *done)
    return body + hashlib.sha256(body).digest()


def _decode(data: bytes, size: int, part_size: int, count: int) -> list[int] | None:
    if len(data) != _HEADER.size + 8 * count + _CHECKSUM:
        return None
    body, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
    if hashlib.sha256(body).digest() != checksum:
        return None
    if _HEADER.unpack_from(body) != (_MAGIC, size, part_size, count):
        return None
    return list(struct.unpack_from(f"<{count}Q", body, _HEADER.size))


class RangedDownload:
    """One blob under download. Open with ``RangedDownload.open``; end with finish/discard/close.

    ``write`` may be called from several threads at once for different parts; each part
    is written front to back. ``flush`` makes progress survive a crash.
    """

    def __init__(
        self,
        cas: ContentAddressedStore,
        digest: str,
        size: int,
        part_size: int,
        fd: int,
        done: list[int],
    ) -> None:
        # Use RangedDownload.open: it creates, locks and sizes the file this wraps.
        self.cas = cas
        self.digest = digest
        self.size = size
        self.part_size = part_size
        self.path, self.progress_path = download_paths(cas, digest)
        self.index: BlobIndex | None = None  # set by finish, for the metadata DB
        self._fd = fd
        self._done = done
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._closed = False
        self.resumed = sum(done)  # bytes already on disk when opened
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(
        cls, cas: ContentAddressedStore, digest: str, size: int, part_size: int
    ) -> RangedDownload:
        """Create the download file for ``digest``, or resume the one a previous run left.

        Raises PartialBusy if another writer holds it, StoreFullError if the disk cannot
        hold the blob.
        """
        digest = parse_digest(digest)
        if size < 0 or part_size <= 0:
            raise ValueError(f"bad size {size} or part size {part_size}")
        count = max(1, -(-size // part_size))
        path, progress_path = download_paths(cas, digest)
        try:
            fd, created = open_locked(path, (progress_path,))
        except FileBusy as exc:
            what = "its download file keeps changing under us" if exc.changing else None
            raise PartialBusy(
                f"blob {digest}: {what}" if what else f"blob {digest} is already being downloaded"
            ) from None
        try:
            done: list[int] | None = None
            if not created and os.fstat(fd).st_size == size:
                with contextlib.suppress(FileNotFoundError):
                    done = _decode(progress_path.read_bytes(), size, part_size, count)
            if done is None or any(
                not 0 <= d <= min(part_size, size - i * part_size) for i, d in enumerate(done)
            ):
                done = [0] * count
            os.ftruncate(fd, size)
            vfs = os.fstatvfs(fd)
            needed = size - min(size, os.fstat(fd).st_blocks * 512)
            if needed > vfs.f_bavail * vfs.f_frsize:
                raise StoreFullError(
                    errno.ENOSPC, f"disk full: blob {digest} needs {needed} more bytes"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(cas, digest, size, part_size, fd, done)

    def parts(self) -> list[Part]:
        """Every part, with how much of it is on disk."""
        with self._lock:
            return [
                Part(i, i * self.part_size, min(self.size, (i + 1) * self.part_size), d)
                for i, d in enumerate(self._done)
            ]

    @property
    def done_bytes(self) -> int:
        with self._lock:
            return sum(self._done)

    def write(self, index: int, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``, which must be where part ``index`` continues."""
        with self._lock:
            if self._closed:
                raise ValueError(f"download of {self.digest} is closed")
            start = index * self.part_size
            end = min(self.size, start + self.part_size)
            if offset != start + self._done[index] or offset + len(data) > end:
                raise ValueError(
                    f"part {index} of {self.digest} continues at {start + self._done[index]}"
                    f" and ends at {end}; got {len(data)} bytes at {offset}"
                )
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], offset + written)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFullError(errno.ENOSPC, f"disk full writing {self.digest}") from exc
            raise
        with self._lock:
            self._done[index] += len(view)

    def flush(self) -> None:
        """Make every byte written so far durable, then record it in the sidecar."""
        with self._flush_lock:
            with self._lock:
                if self._closed:
                    return
                snapshot = list(self._done)
            os.fdatasync(self._fd)
            data = _encode(self.size, self.part_size, snapshot)
            tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
            try:
                tmp.write_bytes(data)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.progress_path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def finish(self, params: ChunkParams = DEFAULT_PARAMS) -> Path:
        """Hash the whole blob; if it is ``digest``, give it its name and return the path.

        ``self.index`` then holds its chunk index. Raises BlobMismatchError (after
        deleting the download: those bytes will never be right) if it hashes to
        anything else, ValueError if parts are still missing.
        """
        missing = [p.index for p in self.parts() if p.remaining]
        if missing:
            raise ValueError(f"blob {self.digest}: parts {missing} are not complete")
        os.fsync(self._fd)
        index = index_file(self.path, params)
        if index.digest != self.digest or index.size != self.size:
            self.discard()
            raise BlobMismatchError(
                f"blob {self.digest}: the registry sent bytes that hash to {index.digest}; "
                "nothing was stored"
            )
        # The download may be old; GC goes by age, so the new blob must look new.
        os.utime(self._fd)
        final = self.cas.place(self.path, self.digest)
        self.progress_path.unlink(missing_ok=True)
        self.index = index
        self._release()
        return final

    def close(self) -> None:
        """Save progress and let go; a later ``open`` resumes. Nothing after finish/discard."""
        with self._lock:
            if self._closed:
                return
        try:
            self.flush()
        finally:
            self._release()

    def discard(self) -> None:
        """Delete the download and its progress; a retry starts from nothing."""
        with self._lock:
            if self._closed:
                return
        # Unlinked while we hold the flock, so no other writer adopts a dying file.
        self.path.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> RangedDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DATA_SUFFIX",
    "PROGRESS_SUFFIX",
    "Part",
    "RangedDownload",
    "download_paths",
    "stale_downloads",
]
