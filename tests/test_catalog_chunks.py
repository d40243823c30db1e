"""GetChunks / ChunkList in the catalog codec: round trips, and lists that cannot be right."""

from __future__ import annotations

import hashlib

import pytest

from protocols._catalog_events import (
    ChunkEntry,
    ChunkList,
    GetChunks,
    MalformedMessage,
    decode_message,
    encode_message,
)
from protocols.errors import LocalProtocolError

DIGEST = "sha256:" + "ab" * 32


def _entries(*lengths: int, start: int = 0) -> tuple[ChunkEntry, ...]:
    out, offset = [], start
    for n in lengths:
        out.append(ChunkEntry(offset, n, hashlib.sha256(str(offset).encode()).digest()))
        offset += n
    return tuple(out)


@pytest.mark.parametrize(
    "message",
    [
        GetChunks(1, DIGEST, 0, 100),
        ChunkList(2, DIGEST, 30, 3, 0, _entries(10, 10, 10)),
        ChunkList(3, DIGEST, 30, 3, 2, _entries(10, start=20)),
        ChunkList(4, DIGEST, 0, 0, 0, ()),
    ],
)
def test_round_trip(message: GetChunks | ChunkList) -> None:
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "bad,reason",
    [
        (ChunkList(1, DIGEST, 20, 3, 0, _entries(10, 5, 10)), "fit"),  # runs past the size
        (ChunkList(1, DIGEST, 30, 2, 0, _entries(10, 10, 10)), "total"),
        (ChunkList(1, DIGEST, 30, 3, 0, _entries(10, start=5)), "offset 0"),
        (ChunkList(1, DIGEST, 30, 3, 0, (*_entries(10), *_entries(10, start=15))), "contiguous"),
        (ChunkList(1, DIGEST, 30, 1, 0, (ChunkEntry(0, 0, b"x" * 32),)), "fit"),
    ],
)
def test_impossible_chunk_lists_are_refused(bad: ChunkList, reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=reason):
        encode_message(bad)


def test_a_peer_sending_an_impossible_list_is_a_remote_error() -> None:
    good = encode_message(ChunkList(1, DIGEST, 20, 2, 0, _entries(10, 10)))
    # Grow the second entry's length past the blob inside the packed bytes.
    tampered = good.replace((10).to_bytes(4, "little"), (11).to_bytes(4, "little"))
    with pytest.raises(MalformedMessage):
        decode_message(tampered)


def test_a_chunk_entry_that_is_not_one_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(ChunkList(1, DIGEST, 10, 1, 0, ("nope",)))  # type: ignore[arg-type]
