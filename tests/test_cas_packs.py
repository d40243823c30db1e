"""The content-addressed store and zstd packs: atomic, verified, readable the same either way."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path

import pytest

from storage.cas import BlobMismatchError, ContentAddressedStore
from storage.chunks import DEFAULT_PARAMS, chunk_bytes
from storage.fsutil import StoreFullError
from storage.packs import PackError, PackReader

MiB = 1024 * 1024
P = DEFAULT_PARAMS
INTERESTING_SIZES = [0, 1, P.min_size - 1, P.max_size, P.max_size + 1, 7 * MiB + 3]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def cas(tmp_path: Path) -> ContentAddressedStore:
    return ContentAddressedStore(tmp_path / "models", tmp_path / "cas")


def _leftovers(cas: ContentAddressedStore) -> list[str]:
    return [n for n in os.listdir(cas.blobs_dir) if n.startswith(".")]


def test_put_bytes_names_blob_by_hash(cas: ContentAddressedStore) -> None:
    digest = cas.put_bytes(b"hello")
    assert digest == _digest(b"hello")
    assert cas.path(digest).read_bytes() == b"hello"
    assert cas.path(digest).name == "sha256-" + digest[7:]
    assert cas.list_digests() == [digest]


def test_put_bytes_with_wrong_expected_digest_writes_nothing(cas: ContentAddressedStore) -> None:
    with pytest.raises(BlobMismatchError):
        cas.put_bytes(b"hello", expected=_digest(b"other"))
    assert cas.list_digests() == [] and _leftovers(cas) == []


def test_copy_in_rejects_a_source_that_does_not_match(
    cas: ContentAddressedStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"abc" * 1000)
    with pytest.raises(BlobMismatchError):
        cas.copy_in(src, _digest(b"something else"))
    assert cas.list_digests() == [] and _leftovers(cas) == []


def test_stage_links_on_the_same_filesystem(cas: ContentAddressedStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    tmp, linked = cas.stage(src, _digest(src.read_bytes()))
    assert linked and os.stat(tmp).st_ino == os.stat(src).st_ino
    assert cas.list_digests() == []  # not visible until placed
    cas.place(tmp, _digest(src.read_bytes()))
    assert cas.list_digests() == [_digest(src.read_bytes())]


def test_disk_full_leaves_nothing_behind(
    cas: ContentAddressedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    data = random.Random(1).randbytes(3 * MiB)
    src.write_bytes(data)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreFullError):
        cas.copy_in(src, _digest(data))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert cas.list_digests() == [] and _leftovers(cas) == []


@pytest.mark.parametrize(
    "status,mutate",
    [
        ("corrupt", lambda p: p.write_bytes(b"Y" + p.read_bytes()[1:])),
        ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-10])),
        ("missing", lambda p: p.unlink()),
    ],
)
def test_verify_names_the_problem(cas: ContentAddressedStore, status: str, mutate) -> None:  # type: ignore[no-untyped-def]
    data = b"X" * 100_000
    digest = cas.put_bytes(data)
    assert cas.verify(digest, len(data)).status == "ok"
    mutate(cas.path(digest))
    assert cas.verify(digest, len(data)).status == status


@pytest.mark.parametrize("size", INTERESTING_SIZES)
def test_pack_reads_back_transparently(cas: ContentAddressedStore, size: int) -> None:
    rng = random.Random(size)
    # Half compressible, half random, like quantized weights after a text header.
    data = (b"token " * (size // 12 + 1))[: size // 2] + rng.randbytes(size - size // 2)
    digest = cas.put_bytes(data)
    chunks = chunk_bytes(data)
    cas.pack(digest, chunks)
    assert cas.location(digest) == "pack"
    assert not cas.path(digest).exists()
    assert cas.size(digest) == size
    assert cas.verify(digest, size).status == "ok"
    for offset, length in [(0, size), (0, min(size, 10)), (size // 3, size // 3), (size, 0)]:
        assert cas.read_range(digest, offset, length) == data[offset : offset + length]
    cas.unpack(digest)
    assert cas.location(digest) == "file"
    assert cas.path(digest).read_bytes() == data


def test_corrupt_pack_is_reported_not_served(cas: ContentAddressedStore) -> None:
    data = random.Random(2).randbytes(5 * MiB)
    digest = cas.put_bytes(data)
    cas.pack(digest, chunk_bytes(data))
    pack = cas.pack_path(digest)
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0xFF
    pack.write_bytes(bytes(raw))
    assert cas.verify(digest, len(data)).status == "corrupt"
    with pytest.raises(PackError):
        cas.read_range(digest, 0, 1000)
    with pytest.raises(PackError):
        cas.unpack(digest)
    assert not cas.path(digest).exists() and _leftovers(cas) == []


@pytest.mark.parametrize(
    "garbage", [b"", b"DMMPACK1", b"x" * 100, b"DMMPACK1" + b"\xff" * 52 + b"DMMPACK1"]
)
def test_garbage_pack_files_raise_pack_error(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "p.dmmpack"
    path.write_bytes(garbage)
    with pytest.raises(PackError):
        PackReader(path)


def test_gc_lock_excludes_commit_lock(cas: ContentAddressedStore) -> None:
    from storage.cas import StoreBusyError

    with cas.gc_lock(), pytest.raises(StoreBusyError), cas.commit_lock(wait=0.1):
        pass
    with cas.commit_lock(), cas.commit_lock(wait=0.1):
        pass  # shared with shared is fine
