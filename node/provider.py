"""``/dmm/blocks/1``, serving side: chunks read from the blob files, checked, sent whole.

The protocol (messages, limits, the state machine) is sans-IO in ``protocols/blocks.py``;
the fetching side is ``node/transfer.py``. This module owns the trio tasks around it::

    provider = BlockProvider(store, scores, upload_slots=4, rate_limit=0)
    host.set_stream_handler(BLOCKS_PROTOCOL, provider.handle)

What a caller may rely on:

- ``WantHave`` is answered from the chunk index: a chunk is "had" when a blob that is in
  the store (plain or packed) holds it.
- ``WantBlock`` is read from the named blob at the named offset, or, when that blob is
  absent or those bytes are something else, from any blob the chunk index lists. The bytes
  are hashed before they are sent: data that does not hash to the chunk id is never
  served (the answer is ``DontHave`` and a warning names the corrupt blob).
- A block goes out as one write of prefix + data, read from disk straight into the
  buffer that is written (``send_block_in_place``), then the stream is flushed.
- At most ``upload_slots`` blocks per peer (over all its streams) are being read or sent
  at once; ``rate_limit`` bytes/s (0 = unlimited) is shared by every peer.
- With a ``seeder`` (node/seeding.py), a block another peer got from us a moment ago may
  be answered ``Elsewhere(peers)`` while several peers fetch the same blob (super-seeding).
- Streams from a peer that ``scores.is_banned`` are reset at once.
- Disk reads and hashing run in worker threads (at most ``read_threads``), never on the
  event loop. ``handle`` never raises: a broken stream is reset and logged in one line, a
  peer that breaks the protocol gets a final ``ErrorReply(None, ...)`` and a strike.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio

from node.acl import StoreAccess
from node.exc_groups import first_leaf, only
from node.limits import LimitExceeded, Limits
from node.live_chunks import LiveChunks
from node.p2p import Stream
from node.peerscore import PeerScores, TokenBucket
from node.seeding import SuperSeeder
from protocols.blocks import (
    DEFAULT_MAX_BLOCK,
    DEFAULT_MAX_WANTLIST,
    MAX_BLOCK_LIMIT,
    MAX_BLOCK_PREFIX,
    MAX_ERROR_MESSAGE_LENGTH,
    NEED_DATA,
    PROTOCOL_ID,
    BadRequest,
    BlockExchange,
    Cancel,
    DontHave,
    Elsewhere,
    EndOfStream,
    ErrorReply,
    HaveReply,
    Message,
    Role,
    State,
    WantBlock,
    WantHave,
    verify_block,
)
from protocols.errors import LocalProtocolError, RemoteProtocolError
from storage.packs import PackError
from storage.store import ModelStore

__all__ = ["BLOCKS_PROTOCOL", "BlockProvider", "ProviderStats"]

log = logging.getLogger("dmm.provider")

# The protocol id under the name the node registers it by.
BLOCKS_PROTOCOL = PROTOCOL_ID

# A block that cannot be written in this long means the peer stopped reading.
DEFAULT_WRITE_TIMEOUT = 30.0
# A stream with nothing outstanding and no new request for this long is ended.
DEFAULT_IDLE_TIMEOUT = 120.0

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)
_T = TypeVar("_T")


@dataclass(slots=True)
class ProviderStats:
    """What this node served since it started. Updated on the event loop only."""

    bytes_out: collections.Counter[str] = field(default_factory=collections.Counter)
    blocks_served: int = 0
    blocks_missing: int = 0  # answered DontHave
    blocks_redirected: int = 0  # answered Elsewhere
    corrupt_reads: int = 0  # bytes on disk that did not hash to their chunk id
    streams_refused: int = 0  # streams from banned peers


class _PeerSlots:
    """The upload slots of one peer, shared by all of its streams."""

    __slots__ = ("semaphore", "streams")

    def __init__(self, slots: int) -> None:
        self.semaphore = trio.Semaphore(slots)
        self.streams = 0


class BlockProvider:
    """Serves ``/dmm/blocks/1`` from a ``ModelStore``; ``handle`` is the stream handler."""

    def __init__(
        self,
        store: ModelStore,
        scores: PeerScores,
        *,
        upload_slots: int = 4,
        rate_limit: int = 0,
        read_threads: int = 4,
        max_wantlist: int = DEFAULT_MAX_WANTLIST,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        live: LiveChunks | None = None,
        limits: Limits | None = None,
        access: StoreAccess | None = None,
        seeder: SuperSeeder | None = None,
    ) -> None:
        if upload_slots < 1:
            raise ValueError("upload_slots must be at least 1")
        if rate_limit < 0:
            raise ValueError("rate_limit must be >= 0 (0 = unlimited)")
        self.store = store
        self.scores = scores
        # Chunks of blobs this node is still fetching: served as well (swarming).
        self.live = live
        self.upload_slots = upload_slots
        self.rate_limit = rate_limit
        self.max_wantlist = max_wantlist
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        # `limits` paces requests and counts refused ones; `access` serves a peer only chunks
        # of blobs some model it may read references. None = neither.
        self.limits = limits
        self.access = access
        self.seeder = seeder
        # The largest chunk the store's chunker makes: blocks up to that size are served.
        self.max_block = min(MAX_BLOCK_LIMIT, max(DEFAULT_MAX_BLOCK, store.params.max_size))
        self.stats = ProviderStats()
        # A burst of one largest block, so a block is never split into several waits.
        self._bucket = TokenBucket(rate_limit, burst=max(rate_limit, self.max_block))
        self._readers = trio.CapacityLimiter(read_threads)
        self._peers: dict[str, _PeerSlots] = {}
        # Counted from worker threads; folded into stats on the event loop.
        self._corrupt_lock = threading.Lock()
        self._corrupt_pending = 0

    # ---------------------------------------------------------------- streams

    async def handle(self, stream: Stream) -> None:
        """Serve one inbound stream until either side ends it. Never raises ``Exception``."""
        peer = stream.peer_id
        if self.scores.is_banned(peer):
            self.stats.streams_refused += 1
            log.info("refused a blocks stream from banned peer %s", peer)
            await stream.reset()
            return
        slots = self._peers.get(peer)
        if slots is None:
            slots = self._peers[peer] = _PeerSlots(self.upload_slots)
        slots.streams += 1
        served = _ServedStream(self, stream, slots)
        try:
            await served.run()
        except Exception as exc:
            if only(exc, _BROKEN):
                log.info("blocks stream from %s broke: %s", peer, first_leaf(exc))
            else:
                log.error("blocks stream from %s failed: %r", peer, first_leaf(exc))
            await stream.reset()
        finally:
            slots.streams -= 1
            if not slots.streams:
                del self._peers[peer]
            if served.blocks or served.missing:
                log.info(
                    "served %d blocks (%d bytes) to %s, %d not held",
                    served.blocks,
                    served.bytes,
                    peer,
                    served.missing,
                )

    # ------------------------------------------------------------- disk (threads)

    def _for_peer(self, peer: str) -> dict[str, str]:
        # Only passed with an ACL, so subclasses overriding the one-argument forms of
        # `_have` and `_load_block` (tests' stalling and corrupting providers) keep working.
        return {} if self.access is None else {"peer": peer}

    def _readable(self, peer: str | None) -> Callable[[str], bool]:
        access = self.access
        if access is None or peer is None:
            return lambda blob: True
        return lambda blob: access.may_read_blob(peer, blob)

    def _have(
        self, chunk_ids: tuple[bytes, ...], peer: str | None = None
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(held, not held): held when a blob that is in the store, or a verified chunk of
        a blob still being fetched, that ``peer`` may read, holds the chunk."""
        found = self.store.db.find_chunks(chunk_ids)
        readable = self._readable(peer)
        present: dict[str, bool] = {}
        have: list[bytes] = []
        dont: list[bytes] = []
        for chunk_id in chunk_ids:
            held = False
            for loc in found.get(chunk_id, ()):
                if loc.blob not in present:
                    present[loc.blob] = self.store.cas.location(loc.blob) is not None and readable(
                        loc.blob
                    )
                if present[loc.blob]:
                    held = True
                    break
            if not held and self.live is not None:
                held = self.live.holds(chunk_id, readable)
            (have if held else dont).append(chunk_id)
        return tuple(have), tuple(dont)

    def _load_block(self, want: WantBlock, peer: str | None = None) -> bytearray | None:
        """A buffer of ``MAX_BLOCK_PREFIX`` spare bytes then the chunk's bytes, checked
        against its id; ``None`` when no blob here (that ``peer`` may read) holds bytes
        that hash to it."""
        readable = self._readable(peer)
        buf = bytearray(MAX_BLOCK_PREFIX + want.length)
        data = memoryview(buf)[MAX_BLOCK_PREFIX:]
        named = (want.blob_digest, want.offset)
        if (
            readable(want.blob_digest)
            and self._read_at(want.blob_digest, want.offset, data)
            and verify_block(want.chunk_id, data)
        ):
            return buf
        for loc in self.store.db.find_chunk(want.chunk_id):
            if loc.length != want.length or not readable(loc.blob):
                continue
            if (loc.blob, loc.offset) == named:
                # The index says the named place holds it, and its bytes are something else.
                self._corrupt(loc.blob, loc.offset, want.chunk_id)
                continue
            if not self._read_at(loc.blob, loc.offset, data):
                continue
            if verify_block(want.chunk_id, data):
                return buf
            self._corrupt(loc.blob, loc.offset, want.chunk_id)
        if self.live is not None and self.live.read(want.chunk_id, data, readable):
            if verify_block(want.chunk_id, data):
                return buf
            self._corrupt(want.blob_digest, want.offset, want.chunk_id)
        return None

    def _read_at(self, digest: str, offset: int, out: memoryview) -> bool:
        """Fill ``out`` from blob ``digest`` at ``offset``; False if it is absent or short."""
        cas = self.store.cas
        try:
            fd = os.open(cas.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                data = cas.read_range(digest, offset, len(out))
            except (FileNotFoundError, EOFError):
                return False
            except (PackError, OSError) as exc:
                log.warning("reading packed blob %s at %d failed: %s", digest, offset, exc)
                return False
            out[:] = data
            return True
        except (OSError, ValueError) as exc:
            log.warning("opening blob %s failed: %s", digest, exc)
            return False
        try:
            got = 0
            while got < len(out):
                n = os.preadv(fd, [out[got:]], offset + got)
                if n == 0:
                    return False
                got += n
            return True
        except OSError as exc:
            log.warning("reading blob %s at %d failed: %s", digest, offset, exc)
            return False
        finally:
            os.close(fd)

    def _corrupt(self, blob: str, offset: int, chunk_id: bytes) -> None:
        log.warning(
            "blob %s at offset %d does not hash to chunk %s: not serving it (run `dmm verify`)",
            blob,
            offset,
            chunk_id.hex()[:16],
        )
        with self._corrupt_lock:
            self._corrupt_pending += 1

    def _fold_corrupt(self) -> None:
        with self._corrupt_lock:
            self.stats.corrupt_reads += self._corrupt_pending
            self._corrupt_pending = 0

    async def in_thread(self, fn: Callable[[], _T]) -> _T:
        # Not abandoned on cancel: a read finishes (quickly) and its buffer is dropped.
        return await trio.to_thread.run_sync(fn, limiter=self._readers)


class _ServedStream:
    """One inbound stream: the reader runs in ``run``, each request in its own task."""

    def __init__(self, provider: BlockProvider, stream: Stream, slots: _PeerSlots) -> None:
        self.provider = provider
        self.stream = stream
        self.peer = stream.peer_id
        self.slots = slots
        self.conn = BlockExchange(
            Role.SERVER, max_frame=provider.max_block, max_wantlist=provider.max_wantlist
        )
        self._write_lock = trio.Lock()
        self._work: dict[int, trio.CancelScope] = {}
        self._idle_scope: trio.CancelScope | None = None
        self.blocks = 0
        self.bytes = 0
        self.missing = 0

    async def run(self) -> None:
        final: ErrorReply | None = None
        async with trio.open_nursery() as work:
            final = await self._read(work)
            if final is not None:
                # The final reply fails every outstanding request: stop working on them.
                work.cancel_scope.cancel()
        if final is not None and self.conn.our_state is State.OPEN:
            await self._send(final)
        if self.conn.our_state is not State.CLOSED:
            await self._send(EndOfStream())

    async def _read(self, work: trio.Nursery) -> ErrorReply | None:
        """Read and dispatch until the client is done; the final error reply, if any."""
        provider = self.provider
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                reason = str(exc)[:MAX_ERROR_MESSAGE_LENGTH]
                log.info("blocks peer %s broke the protocol: %s", self.peer, reason)
                provider.scores.bad(self.peer, f"broke /dmm/blocks/1: {reason}")
                if provider.limits is not None:
                    provider.limits.violation(self.peer, f"blocks: {reason}")
                return ErrorReply(None, "bad-request", reason)
            if event is NEED_DATA:
                with trio.CancelScope() as scope:
                    self._idle_scope = scope
                    self._update_idle_deadline()
                    data = await self.stream.receive_some(self.conn.max_read)
                self._idle_scope = None
                if scope.cancelled_caught:
                    log.debug("blocks stream from %s idle: ending it", self.peer)
                    return None
                if data:
                    self.conn.receive_data(data)
                else:
                    self.conn.receive_eof()
            elif isinstance(event, EndOfStream):
                return None
            elif isinstance(event, BadRequest):
                log.info("blocks peer %s: %s request: %s", self.peer, event.code, event.reason)
                if provider.limits is not None and provider.limits.violation(
                    self.peer, f"blocks: {event.reason}"
                ):
                    return ErrorReply(None, "refused", "over this node's limits: disconnected")
                if event.request_id is None:
                    return event.error_reply()
                work.start_soon(self._send, event.error_reply())
            elif isinstance(event, Cancel):
                stopped = self._work.pop(event.request_id, None)
                if stopped is not None:
                    stopped.cancel()
                self._update_idle_deadline()
            elif isinstance(event, WantHave | WantBlock):
                if provider.scores.is_banned(self.peer):
                    log.info("ending the blocks stream of banned peer %s", self.peer)
                    return ErrorReply(None, "refused", "this peer is banned here")
                if provider.limits is not None:
                    # Waits while the peer is over its request rate: we stop reading.
                    try:
                        await provider.limits.request(self.peer)
                    except LimitExceeded as exc:
                        return ErrorReply(None, "refused", str(exc)[:MAX_ERROR_MESSAGE_LENGTH])
                # Made here, not in the task, so a Cancel read before the task starts
                # still reaches it.
                task_scope = trio.CancelScope()
                self._work[event.request_id] = task_scope
                work.start_soon(self._serve, event, task_scope)
            else:  # the machine only lets a client send requests and cancels
                raise AssertionError(f"unexpected blocks event {event!r}")

    def _update_idle_deadline(self) -> None:
        # Never cancel a read while replies are owed: a cancelled libp2p read can lose
        # bytes. An idle stream is ended instead, so a lost byte does not matter.
        if self._idle_scope is not None:
            idle = not self.conn.outstanding
            self._idle_scope.deadline = (
                trio.current_time() + self.provider.idle_timeout if idle else math.inf
            )

    async def _serve(self, request: WantHave | WantBlock, scope: trio.CancelScope) -> None:
        try:
            with scope:
                if isinstance(request, WantHave):
                    await self._serve_have(request)
                else:
                    await self._serve_block(request)
        finally:
            if self._work.get(request.request_id) is scope:
                del self._work[request.request_id]
            self._update_idle_deadline()

    async def _serve_have(self, want: WantHave) -> None:
        provider = self.provider
        try:
            have, dont = await provider.in_thread(
                partial(provider._have, want.chunk_ids, **provider._for_peer(self.peer))
            )
        except Exception as exc:  # the database failing must not end the node
            log.error("chunk lookup for %s failed: %r", self.peer, exc)
            await self._send(ErrorReply(want.request_id, "internal", "chunk lookup failed"))
            return
        log.debug("have %d of %d chunks asked by %s", len(have), len(want.chunk_ids), self.peer)
        await self._send(HaveReply(want.request_id, have, dont))

    async def _serve_block(self, want: WantBlock) -> None:
        provider = self.provider
        if provider.access is not None:
            refusal = await provider.in_thread(
                partial(provider.access.blob_refusal, self.peer, want.blob_digest)
            )
            if refusal is not None:
                await self._send(
                    ErrorReply(want.request_id, "refused", refusal[:MAX_ERROR_MESSAGE_LENGTH])
                )
                return
        async with self.slots.semaphore:
            # Decided once a slot is ours, not on arrival: a request that waited in line
            # sees what went out meanwhile.
            if provider.seeder is not None:
                peers = provider.seeder.elsewhere(
                    self.peer,
                    want.blob_digest,
                    want.chunk_id,
                    trio.current_time(),
                    length=want.length,
                )
                if peers:
                    if await self._send(Elsewhere(want.request_id, peers)):
                        provider.stats.blocks_redirected += 1
                    return
            try:
                buf = await provider.in_thread(
                    partial(provider._load_block, want, **provider._for_peer(self.peer))
                )
            except Exception as exc:
                log.error(
                    "reading chunk %s of %s for %s failed: %r",
                    want.chunk_id.hex()[:16],
                    want.blob_digest,
                    self.peer,
                    exc,
                )
                buf = None
            provider._fold_corrupt()
            if buf is None:
                log.debug(
                    "chunk %s of %s asked by %s: not held",
                    want.chunk_id.hex()[:16],
                    want.blob_digest,
                    self.peer,
                )
                if await self._send(DontHave(want.request_id)):
                    self.missing += 1
                    provider.stats.blocks_missing += 1
                return
            await provider._bucket.take(want.length)
            if provider.seeder is not None:
                provider.seeder.sending(
                    self.peer, want.blob_digest, want.chunk_id, trio.current_time()
                )
            if await self._send_block(want, buf):
                self.blocks += 1
                self.bytes += want.length
                provider.stats.blocks_served += 1
                provider.stats.bytes_out[self.peer] += want.length

    async def _send_block(self, want: WantBlock, buf: bytearray) -> bool:
        async with self._write_lock:
            view = self.conn.send_block_in_place(want.request_id, want.chunk_id, buf)
            if not view:
                return False  # cancelled meanwhile
            await self._write(view)
        return True

    async def _send(self, event: Message | EndOfStream) -> bool:
        """Send one message; False when it was a reply to a request no longer wanted."""
        async with self._write_lock:
            try:
                data = self.conn.send(event)
            except LocalProtocolError as exc:
                if isinstance(event, EndOfStream) or event.request_id is None:
                    raise
                log.warning("blocks reply to %s not sendable: %s", self.peer, exc)
                data = self.conn.send(
                    ErrorReply(event.request_id, "internal", "the reply could not be encoded")
                )
            if data:
                await self._write(data)
            if isinstance(event, EndOfStream):
                await self._end()
            return bool(data)

    async def _write(self, data: bytes | memoryview) -> None:
        # A write cut off halfway would corrupt the framing: finish it or give up on the
        # stream, whatever cancels the task that started it.
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.provider.write_timeout):
                    await self.stream.send_all(data)
                    await self.stream.flush()
            except trio.TooSlowError:
                raise trio.BrokenResourceError(
                    f"{self.peer} read nothing for {self.provider.write_timeout:g} s"
                ) from None

    async def _end(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.provider.write_timeout):
                    await self.stream.send_eof()
            except trio.TooSlowError:
                raise trio.BrokenResourceError(f"{self.peer} stopped reading") from None
