"""RangedDownload: a blob fetched in byte ranges, resumable, placed only when its sha256 matches."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from storage.cas import BlobMismatchError, ContentAddressedStore
from storage.chunks import ChunkParams
from storage.download import RangedDownload, download_paths
from storage.partial import PartialBusy

KiB = 1024
PARAMS = ChunkParams(min_size=4 * KiB, avg_size=8 * KiB, max_size=16 * KiB)
PART = 64 * KiB


@pytest.fixture
def cas(tmp_path: Path) -> ContentAddressedStore:
    return ContentAddressedStore(tmp_path / "models", tmp_path / "cas")


def _blob(size: int, seed: int = 1) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _write_all(download: RangedDownload, data: bytes, upto: int | None = None) -> None:
    """Each part front to back in 10 KiB pieces, stopping ``upto`` bytes into each part."""
    for part in download.parts():
        offset = part.next_offset
        stop = part.end if upto is None else min(part.end, part.start + upto)
        while offset < stop:
            n = min(10 * KiB, stop - offset)
            download.write(part.index, offset, data[offset : offset + n])
            offset += n


# Sizes: empty, one byte, either side of a part boundary, several parts.
@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 3 * PART + 17])
def test_a_whole_download_becomes_the_blob(cas: ContentAddressedStore, size: int) -> None:
    data, digest = _blob(size)
    with RangedDownload.open(cas, digest, size, PART) as download:
        assert len(download.parts()) == max(1, -(-size // PART))
        _write_all(download, data)
        path = download.finish(PARAMS)
    assert path == cas.path(digest) and path.read_bytes() == data
    assert download.index is not None and download.index.digest == digest
    assert not any(p.exists() for p in download_paths(cas, digest))


def test_progress_survives_close_and_only_the_rest_is_asked_for(
    cas: ContentAddressedStore,
) -> None:
    data, digest = _blob(3 * PART + 5)
    with RangedDownload.open(cas, digest, len(data), PART) as first:
        _write_all(first, data, upto=20 * KiB)
    with RangedDownload.open(cas, digest, len(data), PART) as again:
        assert again.resumed == 3 * 20 * KiB + 5  # the last part is only 5 bytes
        assert [p.next_offset for p in again.parts()] == [
            20 * KiB,
            PART + 20 * KiB,
            2 * PART + 20 * KiB,
            3 * PART + 5,
        ]
        _write_all(again, data)
        again.finish(PARAMS)
    assert cas.path(digest).read_bytes() == data


def test_unflushed_bytes_do_not_count_after_a_crash(cas: ContentAddressedStore) -> None:
    data, digest = _blob(2 * PART)
    download = RangedDownload.open(cas, digest, len(data), PART)
    _write_all(download, data, upto=10 * KiB)
    download.flush()
    _write_all(download, data, upto=30 * KiB)
    del download  # a crash: the fd and lock go, nothing more is saved
    with RangedDownload.open(cas, digest, len(data), PART) as again:
        assert again.resumed == 2 * 10 * KiB


def test_progress_for_another_part_size_or_a_corrupt_sidecar_is_ignored(
    cas: ContentAddressedStore,
) -> None:
    data, digest = _blob(2 * PART)
    with RangedDownload.open(cas, digest, len(data), PART) as first:
        _write_all(first, data, upto=10 * KiB)
    with RangedDownload.open(cas, digest, len(data), PART // 2) as other:
        assert other.resumed == 0
    with RangedDownload.open(cas, digest, len(data), PART) as third:
        _write_all(third, data, upto=10 * KiB)
    progress = download_paths(cas, digest)[1]
    raw = bytearray(progress.read_bytes())
    raw[20] ^= 1
    progress.write_bytes(bytes(raw))
    with RangedDownload.open(cas, digest, len(data), PART) as broken:
        assert broken.resumed == 0


def test_wrong_bytes_are_never_placed_and_the_download_is_dropped(
    cas: ContentAddressedStore,
) -> None:
    data, digest = _blob(2 * PART)
    wrong = bytearray(data)
    wrong[PART + 3] ^= 0xFF
    with RangedDownload.open(cas, digest, len(data), PART) as download:
        _write_all(download, bytes(wrong))
        with pytest.raises(BlobMismatchError, match="nothing was stored"):
            download.finish(PARAMS)
    assert not cas.has(digest)
    assert not any(p.exists() for p in download_paths(cas, digest))


def test_writes_must_continue_their_part_and_finish_needs_every_byte(
    cas: ContentAddressedStore,
) -> None:
    data, digest = _blob(2 * PART)
    with RangedDownload.open(cas, digest, len(data), PART) as download:
        with pytest.raises(ValueError, match="continues at 0"):
            download.write(0, 10, data[10:20])
        with pytest.raises(ValueError, match="ends at"):
            download.write(0, 0, data[: PART + 1])
        download.write(0, 0, data[:PART])
        with pytest.raises(ValueError, match=r"parts \[1\] are not complete"):
            download.finish(PARAMS)


def test_a_second_writer_is_refused(cas: ContentAddressedStore) -> None:
    data, digest = _blob(PART)
    with RangedDownload.open(cas, digest, len(data), PART), pytest.raises(PartialBusy):
        RangedDownload.open(cas, digest, len(data), PART)


def test_a_stale_sidecar_never_describes_a_new_file(cas: ContentAddressedStore) -> None:
    """A crash between placing a blob and removing its progress leaves a sidecar; once the
    blob is gone again, a new download must not believe it."""
    data, digest = _blob(2 * PART)
    with RangedDownload.open(cas, digest, len(data), PART) as first:
        _write_all(first, data)
        first.flush()
        saved = download_paths(cas, digest)[1].read_bytes()
        first.finish(PARAMS)
    os.unlink(cas.path(digest))
    download_paths(cas, digest)[1].write_bytes(saved)
    with RangedDownload.open(cas, digest, len(data), PART) as again:
        assert again.resumed == 0


def test_gc_removes_abandoned_downloads_but_not_one_in_progress(tmp_path: Path) -> None:
    from storage.store import ModelStore

    with ModelStore(tmp_path / "models", tmp_path / "dmm.db", tmp_path / "cas") as store:
        old_data, old_digest = _blob(PART, seed=2)
        with RangedDownload.open(store.cas, old_digest, PART, PART) as abandoned:
            _write_all(abandoned, old_data, upto=KiB)
        data, digest = _blob(PART, seed=3)
        with RangedDownload.open(store.cas, digest, PART, PART) as running:
            _write_all(running, data, upto=KiB)
            running.flush()
            report = store.gc(older_than=-1)
            assert sorted(report.temp_files) == sorted(download_paths(store.cas, old_digest))
            assert all(p.exists() for p in download_paths(store.cas, digest))
        assert not any(p.exists() for p in download_paths(store.cas, old_digest))
