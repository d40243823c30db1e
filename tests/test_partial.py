"""PartialBlob: a blob assembled from verified chunks in any order, resumable after a crash."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from storage.cas import ContentAddressedStore
from storage.chunks import ChunkParams, ChunkRef, chunk_bytes
from storage.fsutil import StoreFullError
from storage.partial import (
    BadChunkList,
    BlobIncomplete,
    ChunkMismatch,
    PartialBlob,
    PartialBusy,
    partial_paths,
    stale_partials,
)

KiB = 1024
MiB = 1024 * KiB
# Small chunks, so a blob of a few hundred KiB has dozens of them.
PARAMS = ChunkParams(min_size=4 * KiB, avg_size=8 * KiB, max_size=16 * KiB)
REPO = Path(__file__).resolve().parent.parent

# Sizes around chunk boundaries: empty, one byte, either side of the smallest and
# largest chunk, and many chunks.
INTERESTING_SIZES = [
    0,
    1,
    PARAMS.min_size - 1,
    PARAMS.min_size,
    PARAMS.min_size + 1,
    PARAMS.max_size - 1,
    PARAMS.max_size,
    PARAMS.max_size + 1,
    600 * KiB,
]


class Blob:
    def __init__(self, size: int, seed: int = 1) -> None:
        self.data = random.Random(seed).randbytes(size)
        self.size = size
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.chunks = chunk_bytes(self.data, PARAMS)

    def chunk(self, i: int) -> bytes:
        c = self.chunks[i]
        return self.data[c.offset : c.offset + c.length]

    def open(self, cas: ContentAddressedStore) -> PartialBlob:
        return PartialBlob.open(cas, self.digest, self.size, self.chunks)


@pytest.fixture
def cas(tmp_path: Path) -> ContentAddressedStore:
    return ContentAddressedStore(tmp_path / "models", tmp_path / "packs")


def _blobs_dir_names(cas: ContentAddressedStore) -> list[str]:
    return sorted(os.listdir(cas.blobs_dir))


@pytest.mark.parametrize("size", INTERESTING_SIZES)
def test_chunks_in_random_order_give_the_exact_blob_only_after_finish(
    cas: ContentAddressedStore, size: int
) -> None:
    blob = Blob(size, seed=size)
    p = blob.open(cas)
    order = list(range(len(blob.chunks)))
    random.Random(size).shuffle(order)
    for n, i in enumerate(order):
        p.write_chunk(i, blob.chunk(i))
        if n % 7 == 3:
            p.flush()
        assert not cas.has(blob.digest)
    assert p.missing() == []
    assert p.done_bytes == size
    # Nothing that looks like a blob exists yet: only dot-files.
    assert cas.list_digests() == []
    assert all(name.startswith(".") for name in _blobs_dir_names(cas))
    path = p.finish(PARAMS)
    assert path == cas.path(blob.digest)
    assert path.read_bytes() == blob.data
    assert cas.list_digests() == [blob.digest]
    assert _blobs_dir_names(cas) == [path.name]  # partial and sidecar are gone
    assert p.index is not None
    assert p.index.digest == blob.digest
    assert list(p.index.chunks) == blob.chunks


def test_wrong_bytes_are_refused_and_nothing_is_written(cas: ContentAddressedStore) -> None:
    blob = Blob(200 * KiB)
    p = blob.open(cas)
    c = blob.chunks[2]
    good = blob.chunk(2)
    flipped = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ChunkMismatch, match="does not hash"):
        p.write_chunk(2, flipped)
    with pytest.raises(ChunkMismatch, match="bytes, got"):
        p.write_chunk(2, good + b"x")
    with pytest.raises(ChunkMismatch):
        p.write_chunk(2, good[:-1])
    with pytest.raises(IndexError):
        p.write_chunk(len(blob.chunks), good)
    assert p.missing() == list(range(len(blob.chunks)))
    assert p.done_bytes == 0
    p.flush()
    with open(p.path, "rb") as f:
        f.seek(c.offset)
        assert f.read(c.length) == bytes(c.length)
    p.close()


def test_dropped_without_finish_resumes_with_only_unflushed_chunks_missing(
    cas: ContentAddressedStore,
) -> None:
    blob = Blob(400 * KiB)
    n = len(blob.chunks)
    p = blob.open(cas)
    flushed = list(range(0, n, 2))
    for i in flushed:
        p.write_chunk(i, blob.chunk(i))
    p.flush()
    unflushed = [1, 3, 5]
    for i in unflushed:
        p.write_chunk(i, blob.chunk(i))
    del p  # a crash: no close, no flush
    gc.collect()
    p = blob.open(cas)  # the lock went with the dropped object
    assert p.missing() == sorted(set(range(n)) - set(flushed))
    assert p.done_bytes == sum(blob.chunks[i].length for i in flushed)
    for i in p.missing():
        p.write_chunk(i, blob.chunk(i))
    assert p.finish().read_bytes() == blob.data


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storage.cas import ContentAddressedStore
    from storage.chunks import ChunkParams, chunk_bytes
    from storage.partial import PartialBlob

    src, models, digest, n_flushed, n_more = sys.argv[1:]
    data = Path(src).read_bytes()
    chunks = chunk_bytes(data, ChunkParams(4096, 8192, 16384))
    cas = ContentAddressedStore(Path(models), Path(models) / "packs")
    p = PartialBlob.open(cas, digest, len(data), chunks)
    order = list(range(len(chunks)))[::-1]
    def put(i):
        c = chunks[i]
        p.write_chunk(i, data[c.offset : c.offset + c.length])
    for i in order[: int(n_flushed)]:
        put(i)
    p.flush()
    for i in order[int(n_flushed) : int(n_flushed) + int(n_more)]:
        put(i)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_mid_fetch_resumes_from_the_last_flush(
    cas: ContentAddressedStore, tmp_path: Path
) -> None:
    blob = Blob(500 * KiB, seed=9)
    src = tmp_path / "source.bin"
    src.write_bytes(blob.data)
    n = len(blob.chunks)
    n_flushed = n // 2
    args = [str(src), str(cas.models_dir), blob.digest, str(n_flushed), "4"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(PartialBusy):
            blob.open(cas)  # the writer still holds it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert not cas.has(blob.digest)
    p = blob.open(cas)
    flushed = set(list(range(n))[::-1][:n_flushed])
    assert p.missing() == sorted(set(range(n)) - flushed)
    for i in p.missing():
        p.write_chunk(i, blob.chunk(i))
    assert p.finish().read_bytes() == blob.data


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "extended", "other_chunk_list", "directory"],
)
def test_a_bad_sidecar_means_nothing_done(cas: ContentAddressedStore, damage: str) -> None:
    blob = Blob(200 * KiB)
    p = blob.open(cas)
    for i in range(len(blob.chunks)):
        p.write_chunk(i, blob.chunk(i))
    p.close()
    _, sidecar = partial_paths(cas, blob.digest)
    good = sidecar.read_bytes()
    chunks = blob.chunks
    if damage == "garbage":
        sidecar.write_bytes(random.Random(3).randbytes(len(good)))
    elif damage == "truncated":
        sidecar.write_bytes(good[:-1])
    elif damage == "empty":
        sidecar.write_bytes(b"")
    elif damage == "extended":
        sidecar.write_bytes(good + b"\0")
    elif damage == "other_chunk_list":
        # Same bytes, chunked differently (another peer's parameters): the old
        # progress says nothing about these chunks.
        chunks = chunk_bytes(blob.data, ChunkParams(2 * KiB, 4 * KiB, 8 * KiB))
    else:
        sidecar.unlink()
        sidecar.mkdir()
    p = PartialBlob.open(cas, blob.digest, blob.size, chunks)
    assert p.missing() == list(range(len(chunks)))
    assert p.done_bytes == 0
    if damage == "directory":
        sidecar.rmdir()
    for i, c in enumerate(chunks):
        p.write_chunk(i, blob.data[c.offset : c.offset + c.length])
    assert p.finish().read_bytes() == blob.data


def test_a_sidecar_without_its_partial_file_is_ignored(cas: ContentAddressedStore) -> None:
    blob = Blob(100 * KiB)
    p = blob.open(cas)
    for i in range(len(blob.chunks)):
        p.write_chunk(i, blob.chunk(i))
    p.close()
    partial, sidecar = partial_paths(cas, blob.digest)
    partial.unlink()  # someone cleaned up the data but not the progress
    p = blob.open(cas)
    assert p.missing() == list(range(len(blob.chunks)))
    # Gone before the new file existed, so a crash now cannot pair it with the new file.
    assert not sidecar.exists()
    p.discard()
    assert _blobs_dir_names(cas) == []


def test_corrupt_chunk_on_disk_is_named_by_finish_and_refetched(
    cas: ContentAddressedStore,
) -> None:
    blob = Blob(300 * KiB)
    p = blob.open(cas)
    for i in range(len(blob.chunks)):
        p.write_chunk(i, blob.chunk(i))
    p.flush()
    bad = 4
    with open(p.path, "r+b") as f:  # bit rot, or a bug elsewhere
        f.seek(blob.chunks[bad].offset + 17)
        f.write(b"\xff\xfe")
    with pytest.raises(BlobIncomplete, match="corrupt") as info:
        p.finish()
    assert info.value.missing == (bad,)
    assert p.missing() == [bad]
    assert not cas.has(blob.digest)
    p.close()
    # The bad chunk's "done" mark did not survive on disk either.
    p = blob.open(cas)
    assert p.missing() == [bad]
    with pytest.raises(BlobIncomplete, match="missing"):
        p.finish()
    p.write_chunk(bad, blob.chunk(bad))
    assert p.finish().read_bytes() == blob.data


def test_a_chunk_list_that_lies_about_the_blob_is_detected(cas: ContentAddressedStore) -> None:
    real, other = Blob(100 * KiB, seed=1), Blob(100 * KiB, seed=2)
    # Chunks of `other`, claimed to make up `real`: every chunk verifies, the blob does not.
    p = PartialBlob.open(cas, real.digest, real.size, other.chunks)
    for i in range(len(other.chunks)):
        p.write_chunk(i, other.chunk(i))
    with pytest.raises(BadChunkList):
        p.finish()
    assert _blobs_dir_names(cas) == []


def test_chunk_lists_that_do_not_tile_the_blob_are_refused(cas: ContentAddressedStore) -> None:
    blob = Blob(100 * KiB)
    c = blob.chunks
    gap = [c[0], ChunkRef(c[1].offset + 1, c[1].length - 1, c[1].digest), *c[2:]]
    for chunks in (c[:-1], gap, [*c[:-1], ChunkRef(c[-1].offset, c[-1].length, b"x")]):
        with pytest.raises(ValueError):
            PartialBlob.open(cas, blob.digest, blob.size, chunks)
    assert _blobs_dir_names(cas) == []


def test_disk_full_while_writing_leaves_the_partial_resumable(
    cas: ContentAddressedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = Blob(200 * KiB)
    p = blob.open(cas)
    p.write_chunk(0, blob.chunk(0))
    p.flush()

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreFullError):
        p.write_chunk(1, blob.chunk(1))
    monkeypatch.undo()
    assert p.missing() == list(range(1, len(blob.chunks)))
    assert cas.list_digests() == []
    p.close()
    p = blob.open(cas)
    assert p.missing() == list(range(1, len(blob.chunks)))
    for i in p.missing():
        p.write_chunk(i, blob.chunk(i))
    assert p.finish().read_bytes() == blob.data


def test_open_refuses_a_blob_the_disk_cannot_hold(
    cas: ContentAddressedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = Blob(200 * KiB)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: SimpleNamespace(f_bavail=1, f_frsize=4096))
    with pytest.raises(StoreFullError, match="disk full"):
        blob.open(cas)
    assert _blobs_dir_names(cas) == []


def test_concurrent_writers_and_flushes(cas: ContentAddressedStore) -> None:
    blob = Blob(2 * MiB, seed=5)
    p = blob.open(cas)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            p.flush()

    t = threading.Thread(target=flusher)
    t.start()
    order = list(range(len(blob.chunks))) * 2  # every chunk twice: duplicates are no-ops
    random.Random(4).shuffle(order)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: p.write_chunk(i, blob.chunk(i)), order))
    finally:
        stop.set()
        t.join()
    assert p.done_bytes == blob.size
    assert p.finish().read_bytes() == blob.data
    with pytest.raises(ValueError, match="closed"):
        p.write_chunk(0, blob.chunk(0))


def test_one_writer_per_partial(cas: ContentAddressedStore) -> None:
    blob = Blob(100 * KiB)
    p = blob.open(cas)
    p.write_chunk(0, blob.chunk(0))
    with pytest.raises(PartialBusy):
        blob.open(cas)
    p.close()
    with blob.open(cas) as q:
        assert q.missing() == list(range(1, len(blob.chunks)))


def test_copy_local_verifies_its_source(cas: ContentAddressedStore, tmp_path: Path) -> None:
    blob = Blob(100 * KiB)
    src = tmp_path / "older.bin"
    src.write_bytes(b"prefix" + blob.data)
    p = blob.open(cas)
    c = blob.chunks[1]
    with pytest.raises(ChunkMismatch):
        p.copy_local(1, src, c.offset)  # off by the prefix
    with pytest.raises(ChunkMismatch):
        p.copy_local(len(blob.chunks) - 1, src, src.stat().st_size - 10)  # short read
    assert p.missing() == list(range(len(blob.chunks)))
    for i, c in enumerate(blob.chunks):
        p.copy_local(i, src, c.offset + 6)
    assert p.finish().read_bytes() == blob.data


def test_stale_partials_are_listed_for_cleanup(cas: ContentAddressedStore) -> None:
    blob = Blob(100 * KiB)
    p = blob.open(cas)
    p.write_chunk(0, blob.chunk(0))
    p.close()
    assert stale_partials(cas, older_than=3600) == []
    partial, sidecar = partial_paths(cas, blob.digest)
    assert stale_partials(cas, older_than=-1) == sorted([partial, sidecar])
    p = blob.open(cas)
    p.discard()
    assert _blobs_dir_names(cas) == []
