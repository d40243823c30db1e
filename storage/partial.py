"""A blob being assembled from verified chunks, in any order, resumable after a crash.

Two files live in the blobs directory while a blob is fetched, both dot-prefixed so
neither our walkers nor Ollama take them for blobs:

``.dmm-<hex>.partial``
    The blob's bytes, pre-sized (sparse) to the blob's size. Each chunk is written at
    its own offset with ``pwrite``, so workers write different chunks at once.
``.dmm-<hex>.progress``
    Which chunks are durable in the partial file. Replaced atomically by ``flush``
    after the partial file was fsynced, so a crash can lose progress but never mark a
    chunk done whose bytes did not reach the disk. Layout (little-endian)::

        b"DMMPROG\\n" | version u16 (=1) | reserved u16 | chunk count u32 | size u64
        | chunk-list hash (32) | done bitmap, ceil(count / 8) bytes, bit i = chunk i
        | sha256 of everything before (32)

    The chunk-list hash covers the blob digest, its size and every chunk's (offset,
    length, sha256), so progress recorded against another chunk list is ignored. A
    sidecar that is missing, short, of another version or fails its checksum means
    "nothing done yet", never an error.

Nothing becomes visible under ``sha256-<hex>`` until every chunk is written and the
whole file hashed to the digest. An exclusive ``flock`` on the partial file keeps two
writers (two processes, or two transfers in one) off the same partial. Progress is
kept in memory and on disk only: the metadata database is not touched per chunk.
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
from collections.abc import Iterable, Sequence
from pathlib import Path

from storage.cas import ContentAddressedStore, StoreBusyError
from storage.chunks import DEFAULT_PARAMS, BlobIndex, ChunkParams, ChunkRef, MiB, index_file
from storage.fsutil import StoreFullError
from storage.locks import FileBusy, open_locked
from storage.names import digest_hex, parse_digest

# Chunks are read whole into memory (to hash before writing); ChunkParams caps them at
# 16 MiB, and a chunk list asking for more is refused rather than trusted.
MAX_CHUNK = 16 * MiB

PARTIAL_SUFFIX = ".partial"
PROGRESS_SUFFIX = ".progress"
_PREFIX = ".dmm-"
_MAGIC = b"DMMPROG\n"
_VERSION = 1
_HEADER = struct.Struct("<8sHHIQ32s")
_CHECKSUM = 32
_LIST_DOMAIN = b"dmm-chunk-list-v1\x00"
_CHUNK_ENTRY = struct.Struct("<QQ32s")

Buffer = bytes | bytearray | memoryview


class ChunkMismatch(ValueError):
    """Bytes offered for a chunk do not have its length or sha256; nothing was written."""


class BlobIncomplete(RuntimeError):
    """``finish`` found chunks missing or bad; ``missing`` lists the indices to (re)fetch."""

    def __init__(self, digest: str, missing: Sequence[int], reason: str) -> None:
        self.digest = digest
        self.missing: tuple[int, ...] = tuple(missing)
        shown = ", ".join(map(str, self.missing[:10])) + (", ..." if len(self.missing) > 10 else "")
        super().__init__(f"blob {digest}: {reason}: {len(self.missing)} chunk(s) [{shown}]")


class BadChunkList(ValueError):
    """Every chunk matched its sha256 but the whole blob did not: the chunk list is wrong.

    Raised by ``finish`` after discarding the partial; the caller must get a chunk list
    that describes the blob (from another peer) and start again.
    """


class PartialBusy(StoreBusyError):
    """Another writer (this process or another) holds this blob's partial file."""


def chunk_list_hash(digest: str, size: int, chunks: Sequence[ChunkRef]) -> bytes:
    """The sha256 binding progress to one (blob, chunk list) pair."""
    h = hashlib.sha256(_LIST_DOMAIN)
    h.update(digest_hex(digest).encode())
    h.update(struct.pack("<QI", size, len(chunks)))
    for c in chunks:
        h.update(_CHUNK_ENTRY.pack(c.offset, c.length, c.digest))
    return h.digest()


def encode_progress(list_hash: bytes, size: int, count: int, done: Iterable[int]) -> bytes:
    bitmap = bytearray((count + 7) // 8)
    for i in done:
        bitmap[i >> 3] |= 1 << (i & 7)
    body = _HEADER.pack(_MAGIC, _VERSION, 0, count, size, list_hash) + bytes(bitmap)
    return body + hashlib.sha256(body).digest()


def decode_progress(data: bytes, list_hash: bytes, size: int, count: int) -> set[int]:
    """The done chunks a sidecar records, or an empty set if it is not for this chunk list."""
    expected_len = _HEADER.size + (count + 7) // 8 + _CHECKSUM
    if len(data) != expected_len:
        return set()
    body, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
    if hashlib.sha256(body).digest() != checksum:
        return set()
    magic, version, _, got_count, got_size, got_hash = _HEADER.unpack_from(body)
    if (magic, version, got_count, got_size, got_hash) != (
        _MAGIC,
        _VERSION,
        count,
        size,
        list_hash,
    ):
        return set()
    bitmap = body[_HEADER.size :]
    return {i for i in range(count) if bitmap[i >> 3] >> (i & 7) & 1}


def partial_paths(cas: ContentAddressedStore, digest: str) -> tuple[Path, Path]:
    """(partial data file, progress sidecar) of a blob."""
    stem = _PREFIX + digest_hex(digest)
    return cas.blobs_dir / (stem + PARTIAL_SUFFIX), cas.blobs_dir / (stem + PROGRESS_SUFFIX)


def stale_partials(cas: ContentAddressedStore, older_than: float) -> list[Path]:
    """Partial files (and their sidecars) untouched for ``older_than`` seconds.

    CAS garbage collection leaves these alone, since a fetch may resume them; a caller
    that gives up on old fetches deletes what this returns.
    """
    cutoff = time.time() - older_than
    found: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cas.blobs_dir):
            name = entry.name
            if name.startswith(_PREFIX) and (
                name.endswith((PARTIAL_SUFFIX, PROGRESS_SUFFIX, PROGRESS_SUFFIX + ".tmp"))
            ):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        found.append(Path(entry.path))
    return sorted(found)


def _check_chunks(size: int, chunks: Sequence[ChunkRef]) -> None:
    # A gap, overlap or overrun would leave bytes no chunk verifies, or let one chunk
    # overwrite another: refuse the list rather than assemble something unverified.
    if size < 0:
        raise ValueError(f"blob size must be >= 0, not {size}")
    end = 0
    for i, c in enumerate(chunks):
        if c.offset != end:
            raise ValueError(f"chunk {i} starts at {c.offset}, expected {end}")
        if not 0 < c.length <= MAX_CHUNK:
            raise ValueError(f"chunk {i} has length {c.length} (1..{MAX_CHUNK} allowed)")
        if len(c.digest) != 32:
            raise ValueError(f"chunk {i} digest is {len(c.digest)} bytes, not 32")
        end += c.length
    if end != size:
        raise ValueError(f"chunks cover {end} bytes of a {size}-byte blob")


def _sidecar_tmp(progress_path: Path) -> Path:
    return progress_path.with_name(progress_path.name + ".tmp")


def _full(exc: OSError, what: str) -> StoreFullError:
    return StoreFullError(errno.ENOSPC, f"disk full while {what}")


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < length:
        data = os.pread(fd, length - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class PartialBlob:
    """One blob under assembly. Open with ``PartialBlob.open``; end with finish/discard/close.

    ``write_chunk`` and ``copy_local`` may be called from several threads at once for
    different (or even the same) indices. ``flush`` makes what was written so far
    survive a crash; call it every few MiB or every second. ``finish`` is the only way
    bytes become a blob.
    """

    def __init__(
        self,
        cas: ContentAddressedStore,
        digest: str,
        size: int,
        chunks: tuple[ChunkRef, ...],
        fd: int,
        done: set[int],
    ) -> None:
        # Use PartialBlob.open: it creates, locks and sizes the file this wraps.
        self.cas = cas
        self.digest = digest
        self.size = size
        self.chunks = chunks
        self.path, self.progress_path = partial_paths(cas, digest)
        self.index: BlobIndex | None = None  # the finished blob's chunk index, for the DB
        self._fd = fd
        self._list_hash = chunk_list_hash(digest, size, chunks)
        self._done = done
        self._done_bytes = sum(chunks[i].length for i in done)
        # Guards _done, _done_bytes, _closed, _finishing and _inflight. _inflight counts
        # calls using the fd right now; the fd is closed only when it is zero, so a slow
        # writer never writes through a closed (or reused) descriptor.
        self._cond = threading.Condition()
        self._inflight = 0
        self._flush_lock = threading.Lock()  # one sidecar writer at a time, newest wins
        self._closed = False
        self._finishing = False
        # Dropping the object without close() releases the fd and its lock but flushes
        # nothing: exactly what a crash leaves, and what the progress file is built for.
        self._finalizer = weakref.finalize(self, os.close, fd)

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        cas: ContentAddressedStore,
        digest: str,
        size: int,
        chunks: Sequence[ChunkRef],
    ) -> PartialBlob:
        """Create the partial file for ``digest``, or resume the one a previous run left.

        Raises ValueError for a chunk list that does not tile ``[0, size)``, PartialBusy
        if another writer holds it, StoreFullError if the disk cannot hold what is left.
        """
        digest = parse_digest(digest)
        chunk_tuple = tuple(chunks)
        _check_chunks(size, chunk_tuple)
        path, progress_path = partial_paths(cas, digest)
        try:
            fd, created = open_locked(path, (progress_path, _sidecar_tmp(progress_path)))
        except FileBusy as exc:
            what = "its partial file keeps changing under us" if exc.changing else None
            raise PartialBusy(
                f"blob {digest}: {what}" if what else f"blob {digest} is already being fetched"
            ) from None
        try:
            st = os.fstat(fd)
            done: set[int] = set()
            # Progress counts only for the same chunk list over a partial file that was
            # here before us at the right size; a fresh or resized file holds nothing.
            if not created and st.st_size == size:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    done = decode_progress(
                        progress_path.read_bytes(),
                        chunk_list_hash(digest, size, chunk_tuple),
                        size,
                        len(chunk_tuple),
                    )
            if st.st_size != size:
                os.ftruncate(fd, size)
            # The file is sparse, so a full disk would otherwise surface only after most
            # of the blob was downloaded; say so now. (Advisory: space can still vanish.)
            needed = size - min(size, os.fstat(fd).st_blocks * 512)
            vfs = os.fstatvfs(fd)
            if needed > vfs.f_bavail * vfs.f_frsize:
                raise StoreFullError(
                    errno.ENOSPC,
                    f"disk full: blob {digest} needs {needed} more bytes, "
                    f"{vfs.f_bavail * vfs.f_frsize} free",
                )
        except BaseException as exc:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                if isinstance(exc, StoreFullError):
                    raise
                raise _full(exc, f"creating the partial file of {digest}") from exc
            raise
        return cls(cas, digest, size, chunk_tuple, fd, done)

    # --- state --------------------------------------------------------------------------

    def missing(self) -> list[int]:
        """Indices of the chunks not written yet, ascending."""
        with self._cond:
            return [i for i in range(len(self.chunks)) if i not in self._done]

    @property
    def done_bytes(self) -> int:
        with self._cond:
            return self._done_bytes

    def is_done(self, index: int) -> bool:
        with self._cond:
            return index in self._done

    def _check_open(self) -> None:
        # Called with self._cond held.
        if self._closed:
            raise ValueError(f"partial blob {self.digest} is closed")

    # --- writing ------------------------------------------------------------------------

    def write_chunk(self, index: int, data: Buffer) -> None:
        """Verify ``data`` is chunk ``index`` and write it at its offset.

        Raises ChunkMismatch (nothing written) for wrong bytes, StoreFullError when the
        disk is full (the chunk stays missing; the partial stays resumable). Writing a
        chunk that is already done does nothing.
        """
        if not 0 <= index < len(self.chunks):
            raise IndexError(f"chunk index {index} out of range 0..{len(self.chunks) - 1}")
        chunk = self.chunks[index]
        # A mutable buffer could change between the hash and the write: hash and write
        # an immutable copy instead (bytes are used as they are).
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        if len(view) != chunk.length:
            raise ChunkMismatch(
                f"chunk {index} of {self.digest} is {chunk.length} bytes, got {len(view)}"
            )
        if hashlib.sha256(view).digest() != chunk.digest:
            raise ChunkMismatch(f"chunk {index} of {self.digest} does not hash to {chunk.hex}")
        with self._cond:
            self._check_open()
            if index in self._done:
                return  # the same verified bytes are already there
            if self._finishing:
                raise ValueError(f"partial blob {self.digest} is being finished")
            self._inflight += 1
        ok = False
        try:
            written = 0
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], chunk.offset + written)
            ok = True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _full(exc, f"writing chunk {index} of {self.digest}") from exc
            raise
        finally:
            with self._cond:
                self._inflight -= 1
                if ok and index not in self._done:
                    self._done.add(index)
                    self._done_bytes += chunk.length
                self._cond.notify_all()

    def read_chunk(self, index: int, out: memoryview) -> bool:
        """Fill ``out`` with chunk ``index`` if it is written; False if not (yet), or if the
        partial is closed or unreadable.

        For serving a blob's chunks to peers while it is still being fetched. The bytes
        were verified when written, but the caller checks them again before trusting
        them: a disk can still rot.
        """
        chunk = self.chunks[index]
        if len(out) != chunk.length:
            raise ValueError(f"chunk {index} is {chunk.length} bytes, buffer is {len(out)}")
        with self._cond:
            if self._closed or index not in self._done:
                return False
            self._inflight += 1
        try:
            got = 0
            while got < len(out):
                n = os.preadv(self._fd, [out[got:]], chunk.offset + got)
                if n == 0:
                    return False
                got += n
            return True
        except OSError:
            return False
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def copy_local(self, index: int, src: Path, src_offset: int) -> None:
        """Write chunk ``index`` from bytes a local file holds at ``src_offset`` (delta sync).

        The source is read and hashed like bytes from the network: a source that is
        short or corrupt raises ChunkMismatch and nothing is written.
        """
        if not 0 <= index < len(self.chunks):
            raise IndexError(f"chunk index {index} out of range 0..{len(self.chunks) - 1}")
        length = self.chunks[index].length
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _pread_exact(fd, length, src_offset)
        finally:
            os.close(fd)
        try:
            self.write_chunk(index, data)
        except ChunkMismatch as exc:
            raise ChunkMismatch(f"{src} at offset {src_offset}: {exc}") from None

    def flush(self) -> None:
        """Make every chunk written so far durable, then record it in the sidecar."""
        with self._flush_lock:
            with self._cond:
                self._check_open()
                # Snapshot before the fsync: every chunk in it finished its pwrite before
                # the fsync began, so the fsync covers it. A chunk that lands later waits
                # for the next flush.
                snapshot = set(self._done)
                self._inflight += 1
            try:
                os.fdatasync(self._fd)
                self._write_sidecar(snapshot)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and not isinstance(exc, StoreFullError):
                    raise _full(exc, f"saving progress of {self.digest}") from exc
                raise
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()

    def _write_sidecar(self, done: set[int]) -> None:
        data = encode_progress(self._list_hash, self.size, len(self.chunks), done)
        # A fixed temp name is safe: flushes are serialised by _flush_lock and other
        # writers are kept out by the flock.
        tmp = _sidecar_tmp(self.progress_path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            # No directory fsync: if the rename is lost in a crash the older sidecar
            # remains, which under-reports progress and is therefore still safe.
            os.replace(tmp, self.progress_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # --- ending -------------------------------------------------------------------------

    def finish(self, params: ChunkParams = DEFAULT_PARAMS) -> Path:
        """Verify the whole blob and give it its name; return the blob's path.

        Afterwards ``self.index`` holds the blob's chunk index (chunked with ``params``)
        for the caller to store, and the partial is closed. Raises BlobIncomplete when
        chunks are missing, or when the blob does not hash to its digest: then every
        chunk is re-checked, the bad ones are marked missing (and that is flushed) and
        listed in the exception; the partial stays open for them to be fetched again.
        Raises BadChunkList (and discards the partial) if every chunk is right but the
        blob is not.
        """
        with self._cond:
            self._check_open()
            if self._finishing:
                raise ValueError(f"partial blob {self.digest} is already being finished")
            missing = [i for i in range(len(self.chunks)) if i not in self._done]
            if missing:
                raise BlobIncomplete(self.digest, missing, "chunks still missing")
            self._finishing = True
            self._cond.wait_for(lambda: self._inflight == 0)
            self._inflight += 1  # a concurrent close() must not close the fd under us
        outcome: BaseException | None = None
        try:
            os.fsync(self._fd)
            index = index_file(self.path, params)
            if index.digest == self.digest and index.size == self.size:
                # A resumed partial may be old; GC deletes unreferenced blobs by age, so
                # the new blob must look new until the caller's manifest references it.
                os.utime(self._fd)
                # Placed while we still hold the flock, so no other writer can open the
                # partial between the check and the rename.
                final = self.cas.place(self.path, self.digest)
                self.progress_path.unlink(missing_ok=True)
                self.index = index
            else:
                bad = self._bad_chunks()
                with self._cond:
                    for i in bad:
                        self._done.discard(i)
                        self._done_bytes -= self.chunks[i].length
                if bad:
                    outcome = BlobIncomplete(self.digest, bad, "chunks corrupt on disk")
                else:
                    outcome = BadChunkList(
                        f"every chunk matched but the blob hashes to {index.digest}, "
                        f"not {self.digest}: its chunk list is wrong"
                    )
        finally:
            with self._cond:
                self._inflight -= 1
                self._finishing = False
                self._cond.notify_all()
        if isinstance(outcome, BlobIncomplete):
            self.flush()  # so a crash now does not resurrect the bad chunks as done
            raise outcome
        if outcome is not None:
            self.discard()
            raise outcome
        self._release()
        return final

    def _bad_chunks(self) -> list[int]:
        bad = []
        for i, c in enumerate(self.chunks):
            data = _pread_exact(self._fd, c.length, c.offset)
            if len(data) != c.length or hashlib.sha256(data).digest() != c.digest:
                bad.append(i)
        return bad

    def close(self) -> None:
        """Flush progress and let go of the partial; a later ``open`` resumes it.

        Does nothing after finish, discard or an earlier close.
        """
        with self._cond:
            if self._closed:
                return
        try:
            self.flush()
        finally:
            self._release()

    def discard(self) -> None:
        """Delete the partial file and its progress; a retry starts from nothing.

        Does nothing after finish or close: the files may by then belong to another
        writer.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(lambda: self._inflight == 0)
        # Unlinked while we still hold the flock, so no other writer adopts a file
        # that is being removed.
        self.path.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
        _sidecar_tmp(self.progress_path).unlink(missing_ok=True)
        self._finalizer()

    def _release(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._inflight == 0)
        self._finalizer()  # closes the fd (and so drops the flock) exactly once

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "MAX_CHUNK",
    "BadChunkList",
    "BlobIncomplete",
    "ChunkMismatch",
    "PartialBlob",
    "PartialBusy",
    "chunk_list_hash",
    "partial_paths",
    "stale_partials",
]
