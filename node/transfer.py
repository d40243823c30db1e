"""``/dmm/blocks/1``, fetching side: one blob from many peers at once, verified chunk by chunk.

The serving side is ``node/provider.py``; the protocol is sans-IO in ``protocols/blocks.py``.

``fetch_blob`` assembles a blob in a ``PartialBlob`` (invisible until it is complete and
its sha256 checked):

1. Open the partial; a previous attempt's verified chunks count as done (resume).
2. Chunks that any local blob holds are copied from disk (``DeltaTracker``), re-hashed.
3. The rest come from ``providers`` over one stream each: a ``WantHave`` learns who holds
   what, then up to ``window`` ``WantBlock`` requests stay in flight per peer. Peers pull
   work from one queue, so faster peers take more; a peer's window also shrinks with its
   measured rate relative to the fastest peer's. Each peer is asked for the rarest chunk
   it has first (fewest peers holding it), ties in an order of this node's own.
   Swarming: a peer that lacks chunks we need is asked again what it has (it may be
   fetching the same blob and serving what it got, see ``live``), and ``discover`` is
   asked for new providers as the fetch starts, when no chunk has come for a while, and
   every 30 s; so nodes pulling one model at once trade chunks, and the first holder
   uploads it about once rather than once per puller.
4. Every arriving chunk is hashed and written in a worker thread (``write_chunk``). A bad
   one is a strike against its peer (``PeerScores.bad``) and goes back to the queue; the
   strike that bans a peer also disconnects it. A request with no answer (and nothing
   else from that peer) for ``chunk_timeout`` seconds is cancelled and re-queued
   (``PeerScores.timeout``). A peer whose stream dies has its requests re-queued.
5. Progress is made durable every 16 MiB or 1 s; a cancelled or failed fetch leaves the
   partial for the next attempt.
6. ``PartialBlob.finish`` hashes the whole blob and renames it into place; only then is
   the chunk index written to the database and the delta recorded.

Errors: ``TransferError`` when no provider could supply some chunks (the partial stays)
or the chunk list does not describe the blob; ``PartialBusy`` when another fetch of the
same blob is running; disk errors (``StoreFullError``, ``OSError``) as they are.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from node.fetch_session import Discover, FetchSession
from node.live_chunks import LiveChunks
from node.p2p import P2PHost
from node.peerscore import PeerScores
from protocols.blocks import (
    DEFAULT_MAX_WANTLIST,
)
from storage.chunks import BlobIndex, ChunkRef
from storage.delta import DeltaPlan, DeltaTracker
from storage.names import parse_digest
from storage.partial import BadChunkList, BlobIncomplete, PartialBlob
from storage.store import ModelStore

__all__ = ["FetchResult", "TransferError", "fetch_blob"]

log = logging.getLogger("dmm.transfer")

# How many times a blob that fails its final check is repaired before giving up.
MAX_FINISH_ATTEMPTS = 3
# Worker threads hashing and writing chunks, per fetch unless a limiter is passed.
DEFAULT_WRITE_THREADS = 4

_T = TypeVar("_T")


class TransferError(RuntimeError):
    """The blob could not be fetched; ``missing`` chunks are still absent (the partial
    stays for a later attempt unless the chunk list itself was wrong)."""

    def __init__(self, digest: str, message: str, missing: int = 0) -> None:
        super().__init__(f"blob {digest}: {message}")
        self.digest = digest
        self.missing = missing


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What one ``fetch_blob`` call did.

    ``bytes_local`` were copied from other local blobs, ``bytes_fetched`` came over the
    network (verified chunk bytes, each distinct chunk counted once), ``bytes_resumed``
    were already in the partial from an earlier attempt.
    """

    path: Path
    bytes_local: int
    bytes_fetched: int
    bytes_by_peer: dict[str, int]
    peers_used: tuple[str, ...]
    bytes_resumed: int = 0


async def fetch_blob(
    host: P2PHost,
    store: ModelStore,
    scores: PeerScores,
    *,
    model: str,
    digest: str,
    size: int,
    chunks: Sequence[ChunkRef],
    providers: Sequence[str],
    on_progress: Callable[[int], None] | None = None,
    window: int = 8,
    chunk_timeout: float = 20.0,
    source: str | None = None,
    limiter: trio.CapacityLimiter | None = None,
    live: LiveChunks | None = None,
    discover: Discover | None = None,
    reuse_local: bool = True,
) -> FetchResult:
    """Fetch blob ``digest`` (``size`` bytes, cut into ``chunks``) for ``model``.

    ``providers`` are peer ids to ask (ourselves and banned peers are skipped).
    ``on_progress(n)`` is called on the event loop each time ``n`` more bytes of the
    blob are in place (resumed and local bytes first, then each chunk). ``source`` is
    the older version the delta is recorded against. ``limiter`` bounds the worker
    threads hashing and writing (one per fetch when not given). ``live``, when given,
    shares the verified chunks with peers while the fetch runs. ``discover()`` is asked
    now and then for more providers (other nodes fetching the same blob join that way).
    ``reuse_local=False`` fetches every chunk from peers (a "full" sync) instead of
    copying those local blobs hold. Returns when the blob is in the store under its name,
    indexed.
    """
    digest = parse_digest(digest)
    if not 1 <= window <= DEFAULT_MAX_WANTLIST:
        raise ValueError(f"window must be in 1..{DEFAULT_MAX_WANTLIST}, not {window}")
    if chunk_timeout <= 0:
        raise ValueError("chunk_timeout must be positive")
    limiter = limiter or trio.CapacityLimiter(DEFAULT_WRITE_THREADS)
    cas = store.cas

    async def in_thread(fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn, limiter=limiter)

    if await in_thread(partial(cas.location, digest)) == "file":
        log.info("blob %s of %s is already in the store", digest, model)
        return FetchResult(cas.path(digest), 0, 0, {}, ())
    try:
        blob = await in_thread(partial(PartialBlob.open, cas, digest, size, chunks))
    except ValueError as exc:
        raise TransferError(digest, f"unusable chunk list: {exc}") from exc
    tracker = DeltaTracker(store.db, cas)
    if live is not None:
        live.add(blob)
    try:
        resumed = blob.done_bytes
        plan = await in_thread(partial(tracker.create_delta, model, source, blob.chunks, digest))
        if not reuse_local:
            plan.fetch.extend(op.index for op in plan.copy_local)
            plan.copy_local.clear()
        copied = await in_thread(partial(tracker.apply_delta, blob, plan))
        if on_progress is not None and resumed + copied:
            on_progress(resumed + copied)
        log.info(
            "fetching blob %s of %s: %d bytes in %d chunks; %d resumed, %d copied locally",
            digest,
            model,
            size,
            len(blob.chunks),
            resumed,
            copied,
        )
        fetched = 0
        by_peer: collections.Counter[str] = collections.Counter()
        dropped: set[str] = set()  # peers that failed this fetch: not asked again
        started = trio.current_time()
        for attempt in range(1, MAX_FINISH_ATTEMPTS + 1):
            missing = blob.missing()
            if missing:
                session = FetchSession(
                    host,
                    blob,
                    scores,
                    model=model,
                    indices=missing,
                    peers=_usable(host, scores, providers, dropped, digest),
                    window=window,
                    chunk_timeout=chunk_timeout,
                    limiter=limiter,
                    on_progress=on_progress,
                    discover=discover,
                    order_seed=f"{host.peer_id}/{digest}/{attempt}",
                )
                stuck = await session.run()
                fetched += session.bytes_fetched
                by_peer.update(session.bytes_by_peer)
                dropped |= session.dropped
                if stuck:
                    raise TransferError(
                        digest,
                        f"{stuck} of {len(blob.chunks)} chunks could not be fetched from "
                        f"{len(providers)} provider(s); the partial is kept for a later pull",
                        missing=stuck,
                    )
            try:
                path = await in_thread(partial(blob.finish, store.params))
                break
            except BlobIncomplete as exc:
                log.warning("blob %s (attempt %d): %s; fetching them again", digest, attempt, exc)
            except BadChunkList as exc:
                raise TransferError(digest, f"wrong chunk list: {exc}") from exc
        else:
            raise TransferError(
                digest,
                f"still corrupt on disk after {MAX_FINISH_ATTEMPTS} attempts",
                missing=len(blob.missing()),
            )
        index = blob.index
        assert index is not None  # finish() sets it
        await in_thread(partial(_record, store, tracker, index, path, model, source, plan, fetched))
    finally:
        if live is not None:
            live.remove(blob)
        # After finish this does nothing; otherwise it saves progress for a resume.
        with trio.CancelScope(shield=True):
            await in_thread(blob.close)
    seconds = trio.current_time() - started
    log.info(
        "fetched blob %s of %s: %d bytes from %d peer(s) in %.2f s (%.1f MB/s), %d local",
        digest,
        model,
        fetched,
        len(by_peer),
        seconds,
        fetched / max(seconds, 1e-6) / 1e6,
        copied,
    )
    return FetchResult(
        path=path,
        bytes_local=copied,
        bytes_fetched=fetched,
        bytes_by_peer=dict(by_peer),
        peers_used=tuple(sorted(peer for peer, n in by_peer.items() if n)),
        bytes_resumed=resumed,
    )


def _usable(
    host: P2PHost,
    scores: PeerScores,
    providers: Sequence[str],
    dropped: set[str],
    digest: str,
) -> list[str]:
    usable: list[str] = []
    for peer in dict.fromkeys(providers):
        if peer == host.peer_id or peer in dropped:
            continue
        if scores.is_banned(peer):
            log.info("blob %s: not asking banned peer %s", digest, peer)
            continue
        usable.append(peer)
    return usable


def _record(
    store: ModelStore,
    tracker: DeltaTracker,
    index: BlobIndex,
    path: Path,
    model: str,
    source: str | None,
    plan: DeltaPlan,
    fetched: int,
) -> None:
    """The database learns of the blob only now that it is complete and in place."""
    store.db.put_blob_index(index, path.stat().st_mtime_ns)
    tracker.record_delta(model, source, index.digest, plan, fetched)


# --------------------------------------------------------------------------- session
