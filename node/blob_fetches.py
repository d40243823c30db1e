"""One fetch per blob in a node: pulls that need a blob another pull is fetching wait for it.

Two ``ollama pull``s of one model, or an ``/api/pull`` and a ``/v2/`` read of the same
blob, would otherwise each try to open the blob's partial file, and the second would fail
with "already being fetched". Here the first caller leads the fetch; later callers follow
it, see its progress, and get its outcome. A leader that is cancelled (its client hung up)
hands over: a follower still waiting takes the lead and resumes from the partial file.

Event loop only; no locks needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

__all__ = ["BlobFetches", "SharedFetch"]


@dataclass(eq=False, slots=True)
class SharedFetch:
    """The fetch of one blob, as its followers see it."""

    digest: str
    done_bytes: int = 0
    finished: trio.Event = field(default_factory=trio.Event)
    path: Path | None = None  # set when the blob is in the store
    error: str | None = None  # set when the fetch failed (not when it was cancelled)

    def progress(self, n: int) -> None:
        self.done_bytes += n


class BlobFetches:
    def __init__(self) -> None:
        self._running: dict[str, SharedFetch] = {}

    def get(self, digest: str) -> SharedFetch | None:
        return self._running.get(digest)

    @contextmanager
    def lead(self, digest: str) -> Iterator[SharedFetch]:
        """Run the fetch of ``digest`` in this block; set ``path`` or ``error`` on it.
        Leaving the block, however it ends, releases the followers."""
        if digest in self._running:
            raise RuntimeError(f"blob {digest} already has a fetch")
        shared = self._running[digest] = SharedFetch(digest)
        try:
            yield shared
        finally:
            del self._running[digest]
            shared.finished.set()

    def __len__(self) -> int:
        return len(self._running)
