"""The seed's DeltaTracker: which chunks of a new blob this node already holds.

A version of a model is a list of content-defined chunks. A delta is the chunks the
target has that this node lacks: the plan says, for every chunk of the target blob,
either "copy it from this local blob at this offset" or "fetch it". Any blob in the
store may supply a chunk, not only the previous version's, since the chunk index
already knows where every chunk lives. Applying the plan copies the local chunks into
a PartialBlob, each re-hashed on the way (the index may be stale, the disk may lie);
the fetched ones come from peers; PartialBlob.finish verifies the whole blob.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from storage.cas import ContentAddressedStore, Location
from storage.chunks import ChunkRef, MiB
from storage.db import ChunkLocation, DeltaRecord, MetadataDB
from storage.fsutil import StoreFullError
from storage.names import parse_digest
from storage.packs import PackError
from storage.partial import ChunkMismatch, PartialBlob

log = logging.getLogger(__name__)

# apply_delta flushes the partial this often, so a crash mid-copy keeps most of it.
_FLUSH_EVERY = 64 * MiB


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """Target chunk ``index`` is at ``src_offset`` in local blob ``src_blob``."""

    index: int
    src_blob: str
    src_offset: int
    length: int


@dataclass(slots=True)
class DeltaPlan:
    """How to assemble ``target_digest``: chunks to copy locally, chunk indices to fetch.

    ``apply_delta`` moves a copy whose local bytes turn out bad into ``fetch``; the
    byte and chunk counts are computed from the two lists, so they follow.
    """

    model: str
    source: str | None
    target_digest: str
    chunks: tuple[ChunkRef, ...]
    copy_local: list[LocalCopy] = field(default_factory=list)
    fetch: list[int] = field(default_factory=list)
    bad_sources: set[str] = field(default_factory=set)  # local blobs found corrupt

    @property
    def target_size(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def bytes_local(self) -> int:
        return sum(c.length for c in self.copy_local)

    @property
    def bytes_fetch(self) -> int:
        return sum(self.chunks[i].length for i in self.fetch)

    @property
    def chunks_local(self) -> int:
        return len(self.copy_local)

    @property
    def chunks_fetch(self) -> int:
        return len(self.fetch)


class DeltaTracker:
    """Plans, applies and records deltas against everything in the local store."""

    def __init__(self, db: MetadataDB, cas: ContentAddressedStore) -> None:
        self.db = db
        self.cas = cas

    def create_delta(
        self,
        model: str,
        source: str | None,
        target_chunks: Sequence[ChunkRef],
        target_digest: str,
    ) -> DeltaPlan:
        """Decide, per chunk of the target, whether a local blob has it or it must be fetched.

        ``source`` (the older version's manifest or blob digest) is only recorded; every
        blob in the store is a candidate source.
        """
        plan = DeltaPlan(model, source, parse_digest(target_digest), tuple(target_chunks))
        found = self.db.find_chunks(c.digest for c in plan.chunks)
        blobs = _BlobFacts(self.cas)
        for i, chunk in enumerate(plan.chunks):
            loc = self._best_location(chunk, found.get(chunk.digest, ()), blobs)
            if loc is None:
                plan.fetch.append(i)
            else:
                plan.copy_local.append(LocalCopy(i, loc.blob, loc.offset, loc.length))
        return plan

    def _best_location(
        self, chunk: ChunkRef, candidates: Sequence[ChunkLocation], blobs: _BlobFacts
    ) -> ChunkLocation | None:
        # A plain file is read in place; a pack costs a zstd frame decode, so it is only
        # the fallback. A row whose length disagrees with the chunk, or that runs past
        # the blob's end, is a stale or damaged index entry, never a source.
        packed: ChunkLocation | None = None
        for loc in candidates:
            if loc.length != chunk.length or loc.offset < 0:
                continue
            where, size = blobs.facts(loc.blob)
            if where is None or size is None or loc.offset + loc.length > size:
                continue
            if where == "file":
                return loc
            packed = packed or loc
        return packed

    def apply_delta(self, partial: PartialBlob, plan: DeltaPlan) -> int:
        """Copy every local chunk of ``plan`` into ``partial``; return the bytes copied.

        Each chunk is re-hashed before it is written. One whose local bytes are bad or
        gone moves from ``plan.copy_local`` to ``plan.fetch`` (its blob is added to
        ``plan.bad_sources``), so the caller fetches it with the rest. Chunks the
        partial already has (a resumed fetch) are skipped. StoreFullError propagates.
        """
        if partial.digest != plan.target_digest or partial.chunks != plan.chunks:
            raise ValueError(
                f"plan for {plan.target_digest} does not match partial {partial.digest}"
            )
        copied = 0
        since_flush = 0
        kept: list[LocalCopy] = []
        failed: list[int] = []
        for op in plan.copy_local:
            kept.append(op)
            if partial.is_done(op.index):
                continue
            try:
                if self.cas.location(op.src_blob) == "file":
                    partial.copy_local(op.index, self.cas.path(op.src_blob), op.src_offset)
                else:
                    data = self.cas.read_range(op.src_blob, op.src_offset, op.length)
                    partial.write_chunk(op.index, data)
            except StoreFullError:
                raise
            except (ChunkMismatch, PackError, EOFError, OSError) as exc:
                log.warning(
                    "local copy of chunk %d of %s from %s failed (%s); fetching it instead",
                    op.index,
                    plan.target_digest,
                    op.src_blob,
                    exc,
                )
                kept.pop()
                failed.append(op.index)
                plan.bad_sources.add(op.src_blob)
                continue
            copied += op.length
            since_flush += op.length
            if since_flush >= _FLUSH_EVERY:
                partial.flush()
                since_flush = 0
        if since_flush:
            partial.flush()
        plan.copy_local = kept
        plan.fetch = sorted({*plan.fetch, *failed})
        return copied

    def record_delta(
        self,
        model: str,
        source: str | None,
        target_digest: str,
        plan: DeltaPlan,
        fetched_bytes: int,
    ) -> DeltaRecord:
        """Remember what a finished delta sync reused and fetched; return the record."""
        record = DeltaRecord(
            model=model,
            source=source,
            target=parse_digest(target_digest),
            bytes_local=plan.bytes_local,
            bytes_fetched=fetched_bytes,
            chunks_local=plan.chunks_local,
            chunks_fetched=plan.chunks_fetch,
            created_at=time.time(),
        )
        self.db.add_delta(record)
        return record

    def get_deltas(self, model: str) -> list[DeltaRecord]:
        """Deltas recorded for ``model``, oldest first."""
        return self.db.deltas(model)


class _BlobFacts:
    """Where each candidate blob is and how big, looked up once per plan, not per chunk."""

    def __init__(self, cas: ContentAddressedStore) -> None:
        self._cas = cas
        self._seen: dict[str, tuple[Location | None, int | None]] = {}

    def facts(self, digest: str) -> tuple[Location | None, int | None]:
        if digest not in self._seen:
            try:
                where = self._cas.location(digest)
                size = self._cas.size(digest) if where is not None else None
            except (OSError, PackError):
                where, size = None, None
            self._seen[digest] = (where, size)
        return self._seen[digest]


__all__ = ["DeltaPlan", "DeltaRecord", "DeltaTracker", "LocalCopy"]
