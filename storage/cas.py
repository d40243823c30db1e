"""The content-addressed store: blobs by sha256, in Ollama's layout, never half-written.

Plain blobs live where Ollama expects them (``<models>/blobs/sha256-<hex>``); blobs a
replica-only node keeps compressed live as packs in the CAS directory and read back
through the same calls. A blob appears under its final name only after its bytes
hashed to that name. Writers of manifests hold the shared store lock while they
make a blob referenced; GC holds it exclusively, so it never sees a blob in the
moment between its rename and its manifest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from storage.chunks import ChunkRef, MiB, Progress
from storage.fsutil import StoreFullError, fsync_dir, temp_path_for
from storage.names import blob_filename, parse_digest
from storage.packs import PackError, PackReader, unpack_to, write_pack

Location = Literal["file", "pack"]
VerifyStatus = Literal["ok", "missing", "truncated", "corrupt"]
_COPY_BLOCK = 8 * MiB


class BlobMismatchError(ValueError):
    """Bytes that do not hash to the digest they were given under."""


class StoreBusyError(RuntimeError):
    """Another process holds the store lock for longer than we were willing to wait."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    digest: str
    status: VerifyStatus
    detail: str = ""


def is_blob_name(name: str) -> bool:
    return (
        name.startswith("sha256-")
        and len(name) == 71
        and all(c in "0123456789abcdef" for c in name[7:])
    )


class ContentAddressedStore:
    def __init__(self, models_dir: Path, packs_dir: Path) -> None:
        self.models_dir = models_dir
        self.blobs_dir = models_dir / "blobs"
        self.packs_dir = packs_dir
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = models_dir / ".dmm-lock"

    # --- where things are ---------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return self.blobs_dir / blob_filename(digest)

    def pack_path(self, digest: str) -> Path:
        return self.packs_dir / (blob_filename(digest) + ".dmmpack")

    def location(self, digest: str) -> Location | None:
        if self.path(digest).is_file():
            return "file"
        if self.pack_path(digest).is_file():
            return "pack"
        return None

    def has(self, digest: str) -> bool:
        return self.location(digest) is not None

    def size(self, digest: str) -> int | None:
        where = self.location(digest)
        if where == "file":
            return self.path(digest).stat().st_size
        if where == "pack":
            with PackReader(self.pack_path(digest)) as reader:
                return reader.size
        return None

    def list_digests(self) -> list[str]:
        """Every complete blob, plain or packed; temp and partial files are not blobs."""
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.blobs_dir):
                if is_blob_name(entry.name) and entry.is_file():
                    found.add("sha256:" + entry.name[7:])
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.packs_dir):
                stem = entry.name.removesuffix(".dmmpack")
                if stem != entry.name and is_blob_name(stem):
                    found.add("sha256:" + stem[7:])
        return sorted(found)

    def mtime(self, digest: str) -> float | None:
        for p in (self.path(digest), self.pack_path(digest)):
            with contextlib.suppress(FileNotFoundError):
                return p.stat().st_mtime
        return None

    # --- locking ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, kind: int, wait: float) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, kind | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreBusyError(
                            f"{self.models_dir} is locked by another dmm process; try again"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def commit_lock(self, wait: float = 60.0) -> contextlib.AbstractContextManager[None]:
        """Shared: held while blobs become referenced by a manifest."""
        return self._flock(fcntl.LOCK_SH, wait)

    def gc_lock(self, wait: float = 60.0) -> contextlib.AbstractContextManager[None]:
        """Exclusive: held by GC while it decides and deletes."""
        return self._flock(fcntl.LOCK_EX, wait)

    # --- writing ------------------------------------------------------------------------

    def _place(self, tmp: Path, digest: str) -> Path:
        """Rename a verified temp file to its blob name (or drop it if already there)."""
        final = self.path(digest)
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
            fsync_dir(self.blobs_dir)
        return final

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected is not None and parse_digest(expected) != digest:
            raise BlobMismatchError(f"content hashes to {digest}, not {expected}")
        if self.path(digest).exists():
            return digest
        tmp = temp_path_for(self.path(digest))
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._place(tmp, digest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _reraise_full(exc)
            raise
        return digest

    def copy_in(self, src: Path, digest: str, progress: Progress | None = None) -> Path:
        """Copy ``src`` into the store as ``digest``, hashing the copy; never trust the source.

        The source may change between whoever hashed it and this copy, so the bytes
        written are hashed again as they are written and must match.
        """
        digest = parse_digest(digest)
        final = self.path(digest)
        if final.exists():
            return final
        tmp = temp_path_for(final)
        h = hashlib.sha256()
        try:
            with open(src, "rb", buffering=0) as fin, open(tmp, "xb") as fout:
                buf = bytearray(_COPY_BLOCK)
                view = memoryview(buf)
                while n := fin.readinto(view):
                    h.update(view[:n])
                    fout.write(view[:n])
                    if progress is not None:
                        progress(n)
                fout.flush()
                os.fsync(fout.fileno())
            got = "sha256:" + h.hexdigest()
            if got != digest:
                raise BlobMismatchError(f"{src} changed while it was copied ({got} != {digest})")
            return self._place(tmp, digest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _reraise_full(exc)
            raise

    def stage(self, src: Path, digest: str) -> tuple[Path, bool]:
        """Bring ``src`` into the blobs directory under a temp name, unverified.

        Hard-linked when on the same filesystem (no bytes move), copied otherwise.
        Returns (temp path, linked). The caller hashes the temp file and then either
        ``place``s it under its name or ``discard``s it; it is never visible before.
        """
        tmp = temp_path_for(self.path(digest))
        try:
            os.link(src, tmp)
            return tmp, True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        try:
            shutil.copyfile(src, tmp)  # sendfile/copy_file_range: the kernel moves the bytes
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _reraise_full(exc)
            raise
        return tmp, False

    def place(self, tmp: Path, digest: str) -> Path:
        """Give a temp file whose bytes were verified to hash to ``digest`` its blob name."""
        return self._place(tmp, parse_digest(digest))

    @staticmethod
    def discard(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def stale_temp_files(self, older_than: float) -> list[Path]:
        """Temp files left by a crash, older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.blobs_dir):
                if entry.name.startswith(".sha256-") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < cutoff:
                            found.append(Path(entry.path))
        return found

    def delete(self, digest: str) -> None:
        for p in (self.path(digest), self.pack_path(digest)):
            p.unlink(missing_ok=True)

    # --- reading ------------------------------------------------------------------------

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes of a blob, plain or packed; raise FileNotFoundError if absent."""
        try:
            with open(self.path(digest), "rb", buffering=0) as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            if not self.pack_path(digest).exists():
                raise
            with PackReader(self.pack_path(digest)) as reader:
                return reader.read_range(offset, length)
        if len(data) != length:
            raise EOFError(f"blob {digest} ends before offset {offset + length}")
        return data

    def verify(
        self, digest: str, expected_size: int | None = None, progress: Progress | None = None
    ) -> VerifyResult:
        """Re-hash a blob and compare with its name."""
        digest = parse_digest(digest)
        h = hashlib.sha256()
        size = 0
        try:
            where = self.location(digest)
            if where is None:
                return VerifyResult(digest, "missing", "no such blob in the store")
            if where == "file":
                with open(self.path(digest), "rb", buffering=0) as f:
                    buf = bytearray(_COPY_BLOCK)
                    view = memoryview(buf)
                    while n := f.readinto(view):
                        h.update(view[:n])
                        size += n
                        if progress is not None:
                            progress(n)
            else:
                with PackReader(self.pack_path(digest)) as reader:
                    for raw in reader.iter_raw():
                        h.update(raw)
                        size += len(raw)
                        if progress is not None:
                            progress(len(raw))
        except PackError as exc:
            return VerifyResult(digest, "corrupt", str(exc))
        if expected_size is not None and size < expected_size:
            return VerifyResult(digest, "truncated", f"{size} of {expected_size} bytes")
        got = "sha256:" + h.hexdigest()
        if got != digest:
            return VerifyResult(digest, "corrupt", f"content hashes to {got}")
        return VerifyResult(digest, "ok")

    # --- packs --------------------------------------------------------------------------

    def pack(
        self, digest: str, chunks: Sequence[ChunkRef], progress: Progress | None = None
    ) -> int:
        """Turn a plain blob into a zstd pack (replica-only copies); return packed size."""
        src = self.path(digest)
        if not src.is_file():
            raise FileNotFoundError(f"blob {digest} is not stored as a plain file")
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        packed = write_pack(src, self.pack_path(digest), digest, chunks, progress)
        with PackReader(self.pack_path(digest)) as reader:
            if reader.size != src.stat().st_size:
                self.pack_path(digest).unlink()
                raise PackError(f"pack of {digest} does not cover the whole blob")
        src.unlink()
        fsync_dir(self.blobs_dir)
        return packed

    def unpack(self, digest: str, progress: Progress | None = None) -> Path:
        """Restore a packed blob to a plain Ollama blob (a user now wants the model)."""
        final = self.path(digest)
        if final.exists():
            return final
        tmp = temp_path_for(final)
        try:
            got = unpack_to(self.pack_path(digest), tmp, progress)
            if got != parse_digest(digest):
                raise BlobMismatchError(f"pack for {digest} holds {got}")
            self._place(tmp, digest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _reraise_full(exc)
            raise
        self.pack_path(digest).unlink()
        return final

    def disk_usage(self) -> int:
        total = 0
        for d in self.list_digests():
            for p in (self.path(d), self.pack_path(d)):
                with contextlib.suppress(FileNotFoundError):
                    total += p.stat().st_size
        return total


def _reraise_full(exc: BaseException) -> None:
    if (
        isinstance(exc, OSError)
        and exc.errno == errno.ENOSPC
        and not isinstance(exc, StoreFullError)
    ):
        raise StoreFullError(errno.ENOSPC, "disk full: the write was abandoned") from exc


__all__ = [
    "BlobMismatchError",
    "ContentAddressedStore",
    "StoreBusyError",
    "VerifyResult",
]
