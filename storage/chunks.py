"""Content-defined chunking: one streaming pass gives a blob's sha256 and its chunk list.

The whole-blob sha256 runs on a thread of its own, the FastCDC cut points are found
in the calling thread, and the per-chunk sha256s run on two workers; hashlib
releases the GIL on large buffers, so on two cores the two hash passes overlap
instead of adding up. The file is memory-mapped in windows: no copies, and memory
bounded whatever the blob size.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pyfastcdc import FastCDC

KiB = 1024
MiB = 1024 * KiB
# Bytes mapped at once per pass; a multiple of mmap.ALLOCATIONGRANULARITY.
WINDOW = 16 * MiB
HASH_BLOCK = 8 * MiB

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ChunkParams:
    min_size: int = 256 * KiB
    avg_size: int = 1 * MiB
    max_size: int = 2 * MiB

    def __post_init__(self) -> None:
        if not (64 <= self.min_size <= self.avg_size <= self.max_size <= 16 * MiB):
            raise ValueError(
                f"chunk sizes must satisfy 64 <= min <= avg <= max <= 16 MiB, got "
                f"{self.min_size}/{self.avg_size}/{self.max_size}"
            )

    def chunker(self) -> FastCDC:
        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size)


DEFAULT_PARAMS = ChunkParams()


@dataclass(frozen=True, slots=True)
class ChunkRef:
    offset: int
    length: int
    digest: bytes  # raw 32-byte sha256 of the chunk's bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True, slots=True)
class BlobIndex:
    digest: str  # "sha256:<hex>" of the whole blob
    size: int
    chunks: tuple[ChunkRef, ...]


def _map_window(fileno: int, start: int, size: int) -> tuple[int, mmap.mmap]:
    """Map up to WINDOW bytes of the file from ``start`` (rounded down to the granularity)."""
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(fileno, min(WINDOW, size - offset), access=mmap.ACCESS_READ, offset=offset)
    m.madvise(mmap.MADV_SEQUENTIAL)
    return offset, m


def _hash_whole(path: Path, size: int, out: list[str], errors: list[BaseException]) -> None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            start = 0
            while start < size:
                offset, m = _map_window(f.fileno(), start, size)
                with m, memoryview(m) as view:
                    for o in range(start - offset, len(view), HASH_BLOCK):
                        h.update(view[o : o + HASH_BLOCK])
                    start = offset + len(view)
        out.append("sha256:" + h.hexdigest())
    except BaseException as exc:  # re-raised in the caller's thread
        errors.append(exc)


def _sha256_at(view: memoryview, offset: int, length: int) -> bytes:
    with view[offset : offset + length] as piece:
        return hashlib.sha256(piece).digest()


def _cut_window(
    chunker: FastCDC, pool: ThreadPoolExecutor, view: memoryview, base: int, final: bool
) -> list[ChunkRef]:
    # Each chunk is submitted for hashing as soon as its cut is found, so cutting and
    # hashing overlap. A chunk ending at the window's edge may have been cut short by
    # the edge; it is held back and cut again from the next window unless this one
    # reaches EOF. Every other cut depends only on bytes from its own start, so
    # windows give exactly the cuts of one whole pass.
    submitted: list[tuple[int, int, Future[bytes]]] = []
    held: tuple[int, int] | None = None
    for c in chunker.cut_buf(view):
        if held is not None:
            submitted.append((*held, pool.submit(_sha256_at, view, *held)))
        held = (c.offset, c.length)
    if held is not None and (final or not submitted):
        submitted.append((*held, pool.submit(_sha256_at, view, *held)))
    return [ChunkRef(base + off, length, fut.result()) for off, length, fut in submitted]


def index_file(
    path: Path, params: ChunkParams = DEFAULT_PARAMS, progress: Progress | None = None
) -> BlobIndex:
    """Hash and chunk a file in one pass over its pages.

    The file is memory-mapped a window at a time, so nothing is copied and memory
    stays bounded whatever the size. The file must not be truncated while this runs
    (blobs in the store are immutable; callers copy outside files in first).
    """
    size = os.stat(path).st_size
    if size == 0:
        return BlobIndex("sha256:" + hashlib.sha256(b"").hexdigest(), 0, ())
    digest_out: list[str] = []
    errors: list[BaseException] = []
    whole = threading.Thread(
        target=_hash_whole, args=(path, size, digest_out, errors), name="dmm-blob-hash", daemon=True
    )
    whole.start()
    chunks: list[ChunkRef] = []
    chunker = params.chunker()
    try:
        with open(path, "rb") as f, ThreadPoolExecutor(2, "dmm-chunk-hash") as pool:
            start = 0  # the first byte not yet in a complete chunk
            while start < size:
                offset, m = _map_window(f.fileno(), start, size)
                with m, memoryview(m) as view, view[start - offset :] as window:
                    final = offset + len(view) >= size
                    cut = _cut_window(chunker, pool, window, start, final)
                chunks.extend(cut)
                if progress is not None:
                    progress(sum(c.length for c in cut))
                start = cut[-1].offset + cut[-1].length
    finally:
        whole.join()
    if errors:
        raise errors[0]
    return BlobIndex(digest_out[0], size, tuple(chunks))


def chunk_bytes(data: bytes, params: ChunkParams = DEFAULT_PARAMS) -> list[ChunkRef]:
    """Chunk an in-memory buffer in one go (the reference the streaming pass must equal)."""
    view = memoryview(data)
    return [
        ChunkRef(c.offset, c.length, hashlib.sha256(view[c.offset : c.offset + c.length]).digest())
        for c in params.chunker().cut_buf(view)
    ]


def iter_file_range(path: Path, offset: int, length: int, block: int = 4 * MiB) -> Iterator[bytes]:
    """Read ``length`` bytes at ``offset`` in blocks; raise EOFError if the file is shorter."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        remaining = length
        while remaining:
            data = f.read(min(block, remaining))
            if not data:
                raise EOFError(f"{path} ends before offset {offset + length}")
            remaining -= len(data)
            yield data
