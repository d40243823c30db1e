"""zstd packs: a blob kept compressed on a replica-only node, readable at any offset.

Each content-defined chunk is one independent zstd frame, so serving a chunk or a
byte range decompresses only the frames it touches. Layout::

    b"DMMPACK1" | frame 0 | frame 1 | ... | table | footer
    table:  per frame  <raw_offset u64><raw_length u32><packed_offset u64><packed_length u32>
    footer: <frame count u32><raw size u64><sha256 32 bytes><b"DMMPACK1">

The pack names the blob it holds (sha256 in the footer) and is written atomically.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from storage.chunks import ChunkRef, Progress
from storage.fsutil import atomic_writer

MAGIC = b"DMMPACK1"
_ENTRY = struct.Struct("<QIQI")
_FOOTER = struct.Struct("<IQ32s8s")
_LEVEL = 3
# A pack's table has one entry per chunk; chunks are >= 64 bytes, so this bounds
# what a corrupt footer can make us allocate.
_MAX_FRAMES = 1 << 24


class PackError(ValueError):
    """A pack file that is corrupt or does not hold the expected blob."""


@dataclass(frozen=True, slots=True)
class Frame:
    raw_offset: int
    raw_length: int
    packed_offset: int
    packed_length: int


class PackReader:
    """Random access into a pack; not thread-safe (open one per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.frames, self.size, self.digest = self._read_table()
        except BaseException:
            self._f.close()
            raise
        self._starts = [fr.raw_offset for fr in self.frames]
        self._dctx = zstandard.ZstdDecompressor()

    def _read_table(self) -> tuple[list[Frame], int, str]:
        f = self._f
        end = f.seek(0, os.SEEK_END)
        if end < len(MAGIC) + _FOOTER.size:
            raise PackError(f"{self.path}: too short to be a pack")
        f.seek(end - _FOOTER.size)
        count, size, digest, magic = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic != MAGIC:
            raise PackError(f"{self.path}: bad pack footer")
        table_size = count * _ENTRY.size
        if count > _MAX_FRAMES or table_size > end - _FOOTER.size - len(MAGIC):
            raise PackError(f"{self.path}: pack table is larger than the file")
        f.seek(end - _FOOTER.size - table_size)
        table = f.read(table_size)
        frames = [Frame(*_ENTRY.unpack_from(table, i * _ENTRY.size)) for i in range(count)]
        expected = 0
        for fr in frames:
            if fr.raw_offset != expected or fr.packed_offset + fr.packed_length > end:
                raise PackError(f"{self.path}: pack table is inconsistent")
            expected += fr.raw_length
        if expected != size:
            raise PackError(f"{self.path}: pack frames cover {expected} bytes, footer says {size}")
        return frames, size, "sha256:" + digest.hex()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frame_bytes(self, frame: Frame) -> bytes:
        self._f.seek(frame.packed_offset)
        packed = self._f.read(frame.packed_length)
        try:
            raw = self._dctx.decompress(packed, max_output_size=frame.raw_length)
        except zstandard.ZstdError as exc:
            raise PackError(f"{self.path}: frame at {frame.raw_offset} is corrupt: {exc}") from None
        if len(raw) != frame.raw_length:
            raise PackError(f"{self.path}: frame at {frame.raw_offset} has the wrong length")
        return raw

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} is outside the blob ({self.size} bytes)")
        out = bytearray()
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while len(out) < length and i < len(self.frames):
            frame = self.frames[i]
            raw = self._frame_bytes(frame)
            start = max(offset - frame.raw_offset, 0)
            out += raw[start : start + length - len(out)]
            i += 1
        return bytes(out)

    def iter_raw(self) -> Iterator[bytes]:
        for frame in self.frames:
            yield self._frame_bytes(frame)


def write_pack(
    src: Path, dest: Path, digest: str, chunks: Sequence[ChunkRef], progress: Progress | None = None
) -> int:
    """Compress ``src`` frame-per-chunk into ``dest``; return the packed size."""
    # Frame checksums make a flipped bit an error on read, not silently wrong bytes.
    cctx = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)
    frames: list[Frame] = []
    with atomic_writer(dest) as out, open(src, "rb") as f:
        out.write(MAGIC)
        pos = len(MAGIC)
        for chunk in chunks:
            f.seek(chunk.offset)
            raw = f.read(chunk.length)
            if len(raw) != chunk.length:
                raise PackError(f"{src}: ends before offset {chunk.offset + chunk.length}")
            packed = cctx.compress(raw)
            out.write(packed)
            frames.append(Frame(chunk.offset, chunk.length, pos, len(packed)))
            pos += len(packed)
            if progress is not None:
                progress(chunk.length)
        for fr in frames:
            out.write(_ENTRY.pack(fr.raw_offset, fr.raw_length, fr.packed_offset, fr.packed_length))
        size = sum(c.length for c in chunks)
        out.write(_FOOTER.pack(len(frames), size, bytes.fromhex(digest[7:]), MAGIC))
        pos += len(frames) * _ENTRY.size + _FOOTER.size
    return pos


def unpack_to(pack: Path, dest: Path, progress: Progress | None = None) -> str:
    """Write the raw blob held by ``pack`` to ``dest`` atomically; return its sha256."""
    h = hashlib.sha256()
    with PackReader(pack) as reader, atomic_writer(dest) as out:
        for raw in reader.iter_raw():
            h.update(raw)
            out.write(raw)
            if progress is not None:
                progress(len(raw))
        digest = "sha256:" + h.hexdigest()
        if digest != reader.digest:
            raise PackError(f"{pack}: content hashes to {digest}, pack says {reader.digest}")
    return digest
