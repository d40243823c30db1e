"""Chunks of blobs still being fetched, verified and on disk: a puller serves them too.

This is what makes a swarm out of many pullers of one model: each serves the chunks it
already holds while it fetches the rest, so the first holder uploads the model about
once instead of once per puller (BitTorrent's idea). The fetcher registers each partial
blob for the length of its fetch; the block provider looks chunks up here when no
complete blob in the store holds them. Used from worker threads: guarded by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from storage.partial import PartialBlob


def _any_blob(digest: str) -> bool:
    return True


class LiveChunks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # chunk id -> every (partial blob, index) that will hold it once written
        self._where: dict[bytes, list[tuple[PartialBlob, int]]] = {}

    def add(self, blob: PartialBlob) -> None:
        with self._lock:
            for index, ref in enumerate(blob.chunks):
                self._where.setdefault(ref.digest, []).append((blob, index))

    def remove(self, blob: PartialBlob) -> None:
        with self._lock:
            for ref in blob.chunks:
                places = self._where.get(ref.digest)
                if places is None:
                    continue
                places[:] = [(b, i) for b, i in places if b is not blob]
                if not places:
                    del self._where[ref.digest]

    def _places(self, chunk_id: bytes) -> list[tuple[PartialBlob, int]]:
        with self._lock:
            return list(self._where.get(chunk_id, ()))

    def holds(self, chunk_id: bytes, allowed: Callable[[str], bool] = _any_blob) -> bool:
        """Whether a partial of a blob ``allowed(digest)`` accepts has the chunk written."""
        return any(
            blob.is_done(index) and allowed(blob.digest) for blob, index in self._places(chunk_id)
        )

    def read(
        self, chunk_id: bytes, out: memoryview, allowed: Callable[[str], bool] = _any_blob
    ) -> bool:
        """Fill ``out`` with the chunk from a partial (of a blob ``allowed(digest)``
        accepts) that has it; False if none does."""
        for blob, index in self._places(chunk_id):
            if (
                blob.chunks[index].length == len(out)
                and allowed(blob.digest)
                and blob.read_chunk(index, out)
            ):
                return True
        return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)
