"""One fetch session of ``/dmm/blocks/1``: which peer is asked for which chunk, and when.

``fetch_blob`` (node/transfer.py) opens the partial blob, copies what local blobs hold,
and runs a ``FetchSession`` for the chunks still missing. The session talks to every
provider over one stream each; the scheduling rules are in transfer.py's docstring
(rarest first, windows scaled by rate, re-asking, discovery, Elsewhere). ``run``
returns how many chunk indices could not be fetched (0 = all written).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from node.exc_groups import first_leaf, only
from node.p2p import P2PError, P2PHost, Stream
from node.peerscore import PeerScores
from protocols.blocks import (
    DEFAULT_MAX_BLOCK,
    MAX_BLOCK_LIMIT,
    MAX_IDS_PER_MESSAGE,
    NEED_DATA,
    PROTOCOL_ID,
    Block,
    BlockExchange,
    BufferLike,
    Cancel,
    DontHave,
    Elsewhere,
    EndOfStream,
    ErrorReply,
    HaveReply,
    Role,
    State,
    WantBlock,
    WantHave,
)
from protocols.errors import LocalProtocolError, RemoteProtocolError
from storage.chunks import MiB
from storage.partial import ChunkMismatch, PartialBlob

__all__ = ["Discover", "FetchSession"]

log = logging.getLogger("dmm.transfer")

# Progress is made durable after this many bytes or this many seconds, whichever first.
FLUSH_BYTES = 16 * MiB
FLUSH_INTERVAL = 1.0
# Timeouts of one chunk at one peer before that peer is not asked for it again.
MAX_TIMEOUTS_PER_CHUNK = 3
# Sending a few requests or cancels should never take long; a peer that does not read
# them for this long is dropped.
WRITE_TIMEOUT = 10.0
# How long a finished peer gets to end its side of the stream before it is reset.
CLOSE_GRACE = 2.0
# A peer that lacks chunks we still need is asked again what it has (it may be fetching
# the same blob): first after this long, backing off to REASK_MAX while it gains nothing.
REASK_MIN = 0.5
REASK_MAX = 4.0
# ``discover`` (a DHT walk: the costliest thing a puller does besides moving bytes) is
# asked for more providers as a Bitswap session asks: when the fetch starts, then when no
# chunk has arrived for DISCOVER_IDLE (doubling to DISCOVER_MAX while lookups find no one
# new), and every DISCOVER_PERIOD regardless, so a long fetch still meets pullers that
# started after it. While chunks flow, and holders name the other pullers (Elsewhere),
# polling it found no one and cost a swarm of 8 pullers half its time.
DISCOVER_IDLE = 1.0
DISCOVER_MAX = 8.0
DISCOVER_PERIOD = 30.0
# Peers one fetch talks to at most: discovery and Elsewhere replies add no more.
MAX_SESSION_PEERS = 64
# A peer named in an Elsewhere may not have verified the chunk yet when we ask: asked
# again after these delays before it counts as not having it.
NAMED_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)

Discover = Callable[[], Awaitable[Sequence[str]]]


@dataclass(slots=True)
class _Unit:
    """One distinct chunk to fetch: its bytes fill every index in ``indices``."""

    number: int
    chunk_id: bytes
    indices: list[int]
    offset: int  # of the first index, where providers holding this blob find it
    length: int


class _PeerFailed(Exception):
    """This peer cannot be used any more for this fetch."""


@dataclass(eq=False, slots=True)
class _Peer:
    peer_id: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    active: bool = True
    known: bool = False  # every WantHave answered
    has: set[int] = field(default_factory=set)
    # (availability when pushed, unit) for the units it has: rarest first, then our order
    heap: list[tuple[int, int]] = field(default_factory=list)
    wants: dict[int, float] = field(default_factory=dict)  # WantHave id -> sent at
    requests: dict[int, tuple[int, float]] = field(default_factory=dict)  # id -> (unit, sent)
    writing: int = 0  # blocks from it being hashed and written
    last_arrival: float = 0.0  # of its latest reply
    timeouts: collections.Counter[int] = field(default_factory=collections.Counter)
    banned: bool = False
    reask_at: float = 0.0  # when to ask again what it has (0 = not scheduled)
    reask_delay: float = REASK_MIN
    has_before_ask: int = 0  # len(has) when the latest WantHave round went out
    # Units it holds but sent us elsewhere for (super-seeding): kept out of `has` while
    # someone else may supply them, given back the moment no one can.
    deferred: set[int] = field(default_factory=set)
    # Units another peer named it for (Elsewhere) -> its DontHave answers to them so far.
    named: dict[int, int] = field(default_factory=dict)
    holdoff: dict[int, float] = field(default_factory=dict)  # unit -> not asked before


class _Link:
    """The stream to one peer and its client machine; sends are serialised and whole."""

    def __init__(self, stream: Stream, conn: BlockExchange) -> None:
        self.stream = stream
        self.conn = conn
        self.lock = trio.Lock()
        self.eof_sent = False
        self.clean = False  # both sides ended the stream properly
        self.reader_done = trio.Event()

    def check_open(self) -> None:
        """Raise ``_PeerFailed`` once the server has ended its side: no request may follow."""
        if self.conn.their_state is not State.OPEN:
            raise _PeerFailed("ended its side of the stream")

    async def write(self, data: bytes) -> None:
        # Called with `lock` held. Half a frame on the wire would corrupt the stream:
        # finish the write or give up on the stream, whatever cancels the caller.
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(WRITE_TIMEOUT):
                    if data:
                        await self.stream.send_all(data)
                        await self.stream.flush()
            except trio.TooSlowError:
                raise _PeerFailed(f"read nothing we sent for {WRITE_TIMEOUT:g} s") from None

    async def close_send(self) -> None:
        async with self.lock:
            self.conn.send(EndOfStream())
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(WRITE_TIMEOUT):
                        await self.stream.send_eof()
                except trio.TooSlowError:
                    raise _PeerFailed("did not take our end of stream") from None
            self.eof_sent = True


_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)
_PEER_ERRORS = (
    *_BROKEN,
    trio.TooSlowError,
    RemoteProtocolError,
    _PeerFailed,
)


class FetchSession:
    """Fetches the chunks at ``indices`` of a partial blob from ``peers``.

    ``run`` returns how many chunk indices could not be fetched (0 = all written).
    """

    def __init__(
        self,
        host: P2PHost,
        blob: PartialBlob,
        scores: PeerScores,
        *,
        model: str,
        indices: Sequence[int],
        peers: Sequence[str],
        window: int,
        chunk_timeout: float,
        limiter: trio.CapacityLimiter,
        on_progress: Callable[[int], None] | None,
        discover: Discover | None = None,
        order_seed: str = "",
    ) -> None:
        self.host = host
        self.blob = blob
        self.digest = blob.digest
        self.scores = scores
        self.model = model
        self.window = window
        self.chunk_timeout = chunk_timeout
        self.limiter = limiter
        self.on_progress = on_progress
        self.discover = discover
        # Equal chunks at several indices are fetched once.
        by_id: dict[bytes, _Unit] = {}
        for i in sorted(indices):
            ref = blob.chunks[i]
            unit = by_id.get(ref.digest)
            if unit is None:
                unit = by_id[ref.digest] = _Unit(0, ref.digest, [], ref.offset, ref.length)
            unit.indices.append(i)
        # Units are taken lowest number first. Numbering them in an order of our own
        # (seeded, so a node retries in the same order) means that nodes fetching the
        # same blob at once hold different chunks early, and have something to trade.
        self.units = list(by_id.values())
        random.Random(order_seed).shuffle(self.units)
        for number, unit in enumerate(self.units):
            unit.number = number
        self.unit_of = {unit.chunk_id: unit.number for unit in self.units}
        self.max_block = min(
            MAX_BLOCK_LIMIT, max([DEFAULT_MAX_BLOCK, *(u.length for u in self.units)])
        )
        self.peers = [_Peer(peer) for peer in peers]
        self.pending: set[int] = set(range(len(self.units)))  # waiting for a peer
        self.assigned: dict[int, _Peer] = {}  # requested from, or being written from
        self.remaining: set[int] = set(self.pending)  # not written yet
        self.bytes_fetched = 0
        self.bytes_by_peer: collections.Counter[str] = collections.Counter()
        self.dropped: set[str] = set()
        self.finished = trio.Event()
        self._changed = trio.Event()
        self._writes: trio.Nursery | None = None
        self._unflushed = 0
        self._dirty = trio.Event()
        self._flush_due = trio.Event()
        self._peer_nursery: trio.Nursery | None = None
        # How many active peers have each unit. Rarest first means the first holder is
        # asked for what only it has, while pullers trade what they already got.
        self.avail: collections.Counter[int] = collections.Counter()
        self.last_block = 0.0  # when the latest block arrived, or the fetch started

    # ---------------------------------------------------------------- running

    async def run(self) -> int:
        if not self.remaining:
            return 0
        if not self.peers:
            log.warning("blob %s of %s: no provider to ask", self.digest, self.model)
            return self._stuck_indices()
        self.last_block = trio.current_time()
        async with trio.open_nursery() as outer:
            outer.start_soon(self._flusher)
            # Writes outlive the peer that sent them: a good chunk from a peer that
            # dies right after is still written.
            async with trio.open_nursery() as writes:
                self._writes = writes
                async with trio.open_nursery() as peers:
                    self._peer_nursery = peers
                    for peer in self.peers:
                        peers.start_soon(self._run_peer, peer)
                    if self.discover is not None:
                        peers.start_soon(self._discoverer)
            outer.cancel_scope.cancel()
        # Progress since the last flush is saved by finish() or close(), whichever follows.
        return self._stuck_indices()

    def _stuck_indices(self) -> int:
        return sum(len(self.units[u].indices) for u in self.remaining)

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            with trio.move_on_after(FLUSH_INTERVAL):
                await self._flush_due.wait()
            self._dirty, self._flush_due, self._unflushed = trio.Event(), trio.Event(), 0
            await trio.to_thread.run_sync(self.blob.flush, limiter=self.limiter)

    # ------------------------------------------------------------- bookkeeping

    def _notify(self) -> None:
        """Something changed: re-check whether we are done, wake every waiting task."""
        if not self.finished.is_set():
            # Done when every chunk is written, or when nothing is in flight and no
            # peer left can supply any chunk still missing.
            stuck = not self.assigned and not any(self._obtainable(u) for u in self.pending)
            if stuck and self.remaining and self._restore_deferred(self.pending):
                stuck = False
            if not self.remaining or stuck:
                self.finished.set()
        self._changed.set()
        self._changed = trio.Event()

    def _obtainable(self, unit: int) -> bool:
        return any(p.active and (not p.known or unit in p.has) for p in self.peers)

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _take_for(self, peer: _Peer) -> int | None:
        held: list[tuple[int, int]] = []
        try:
            while peer.heap:
                avail, unit = heapq.heappop(peer.heap)
                if unit not in self.pending or unit not in peer.has:
                    continue
                if avail != self.avail[unit]:  # more (or fewer) peers have it since: re-rank
                    heapq.heappush(peer.heap, (self.avail[unit], unit))
                    continue
                due = peer.holdoff.get(unit)
                if due is not None:
                    if due > trio.current_time():
                        held.append((avail, unit))
                        continue
                    del peer.holdoff[unit]
                self.pending.discard(unit)
                self.assigned[unit] = peer
                return unit
            return None
        finally:
            for item in held:
                heapq.heappush(peer.heap, item)

    def _gain(self, peer: _Peer, unit: int) -> None:
        if unit in peer.has:
            return
        peer.has.add(unit)
        if peer.active:
            self.avail[unit] += 1
        heapq.heappush(peer.heap, (self.avail[unit], unit))

    def _lose(self, peer: _Peer, unit: int) -> None:
        if unit in peer.has:
            peer.has.discard(unit)
            if peer.active:
                self.avail[unit] -= 1
            self._restore_deferred((unit,))

    def _deactivate(self, peer: _Peer) -> None:
        if peer.active:
            peer.active = False
            for unit in peer.has:
                self.avail[unit] -= 1
            self._restore_deferred(peer.has)

    def _restore_deferred(self, units: Iterable[int]) -> bool:
        """Give units back to the peers that deferred them where no one else may supply
        them any more; whether any came back."""
        restored = False
        for unit in units:
            if unit not in self.remaining or self._obtainable(unit):
                continue
            for peer in self.peers:
                if peer.active and unit in peer.deferred:
                    peer.deferred.discard(unit)
                    self._gain(peer, unit)
                    restored = True
        return restored

    def _requeue(self, unit: int, peer: _Peer) -> None:
        """``peer`` no longer works on ``unit``: give it back to the queue."""
        if self.assigned.get(unit) is not peer:
            return
        del self.assigned[unit]
        if unit not in self.remaining:
            return
        self.pending.add(unit)
        for other in self.peers:
            if other.active and unit in other.has:
                heapq.heappush(other.heap, (self.avail[unit], unit))

    def _limit(self, peer: _Peer) -> int:
        """Requests ``peer`` may have in flight: the window, scaled by its rate relative
        to the fastest active peer's (unknown rates get the whole window)."""
        rate = self.scores.rate(peer.peer_id)
        best = max((self.scores.rate(p.peer_id) for p in self.peers if p.active), default=0.0)
        if rate <= 0 or best <= 0:
            return self.window
        return max(min(2, self.window), min(self.window, math.ceil(self.window * rate / best)))

    def _peer_done(self, peer: _Peer) -> bool:
        # A peer waiting to be asked again (it may gain chunks) is not done, nor is one
        # holding chunks it sent us elsewhere for.
        return (
            peer.known
            and peer.reask_at == 0
            and not peer.requests
            and not peer.writing
            and peer.has.isdisjoint(self.remaining)
            # It sent us elsewhere for these: it serves them if that fails.
            and peer.deferred.isdisjoint(self.remaining)
        )

    # ------------------------------------------------------------------ a peer

    async def _run_peer(self, peer: _Peer) -> None:
        link: _Link | None = None
        try:
            with peer.scope:
                try:
                    with trio.fail_after(self.chunk_timeout):
                        stream = await self.host.open_stream(peer.peer_id, PROTOCOL_ID)
                except (P2PError, trio.TooSlowError) as exc:
                    raise _PeerFailed(f"no stream: {exc}") from exc
                link = _Link(
                    stream,
                    BlockExchange(Role.CLIENT, max_frame=self.max_block, max_in_flight=self.window),
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, peer, link)
                    nursery.start_soon(self._timer, peer, link)
                    await self._sender(peer, link)
                    # The server ends its side once it has answered everything. One that
                    # may still be working on requests we cancelled is not waited for:
                    # the stream is reset instead.
                    if not link.conn.cancelled:
                        with trio.move_on_after(CLOSE_GRACE):
                            await link.reader_done.wait()
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            # BaseException: a peer's failure while the session is being cancelled comes
            # in a group with its tasks' Cancelled, and is still only a dropped peer.
            if not only(exc, _PEER_ERRORS):
                raise
            reason = first_leaf(exc)
            log.info("blob %s: dropped peer %s: %s", self.digest, peer.peer_id, reason)
            self.dropped.add(peer.peer_id)
            if isinstance(reason, RemoteProtocolError):
                banned = self.scores.bad(peer.peer_id, f"broke /dmm/blocks/1: {reason}")
                peer.banned = banned or self.scores.is_banned(peer.peer_id)
        finally:
            self._deactivate(peer)
            for unit, _ in peer.requests.values():
                self._requeue(unit, peer)
            peer.requests.clear()
            with trio.CancelScope(shield=True):
                if link is not None:
                    if link.clean:
                        with contextlib.suppress(*_BROKEN):
                            await link.stream.aclose()
                    else:
                        await link.stream.reset()
                if peer.banned:
                    self.dropped.add(peer.peer_id)
                    log.warning("blob %s: disconnecting banned peer %s", self.digest, peer.peer_id)
                    with trio.move_on_after(WRITE_TIMEOUT):
                        try:
                            await self.host.disconnect(peer.peer_id)
                        except Exception as exc:  # the library raises what it likes
                            log.info("disconnecting %s failed: %r", peer.peer_id, exc)
            self._notify()

    async def _sender(self, peer: _Peer, link: _Link) -> None:
        conn = link.conn
        # Who has what: ask about every chunk still wanted, in as few requests as fit.
        await self._ask_have(peer, link, [u for u in range(len(self.units)) if u in self.remaining])
        while not self.finished.is_set() and not self._peer_done(peer):
            if self._reask_due(peer):
                await self._ask_have(peer, link, sorted(self.remaining - peer.has))
                continue
            room = self._limit(peer) - len(conn.outstanding) - peer.writing
            if room <= 0 or not peer.heap:
                await self._wait_changed_until(peer.reask_at)
                continue
            async with link.lock:
                link.check_open()
                parts: list[bytes] = []
                now = trio.current_time()
                for _ in range(room):
                    unit_number = self._take_for(peer)
                    if unit_number is None:
                        break
                    unit = self.units[unit_number]
                    rid = conn.next_request_id
                    parts.append(
                        conn.send(
                            WantBlock(rid, unit.chunk_id, self.digest, unit.offset, unit.length)
                        )
                    )
                    peer.requests[rid] = (unit_number, now)
                if parts:
                    self._notify()  # the timer has a new deadline
                    await link.write(b"".join(parts))
            if not parts:
                await self._wait_changed_until(peer.reask_at)
        await link.close_send()

    async def _ask_have(self, peer: _Peer, link: _Link, units: list[int]) -> None:
        """One round of ``WantHave`` for ``units``; the replies fill ``peer.has``."""
        conn = link.conn
        ids = [self.units[u].chunk_id for u in units]
        batches = [
            ids[i : i + MAX_IDS_PER_MESSAGE] for i in range(0, len(ids), MAX_IDS_PER_MESSAGE)
        ]
        peer.reask_at = 0.0
        peer.has_before_ask = len(peer.has)
        if not batches:
            peer.known = True
            self._schedule_reask(peer)
            return
        for batch in batches:
            while len(conn.outstanding) >= self.window:
                await self._wait_changed()
            async with link.lock:
                link.check_open()
                rid = conn.next_request_id
                data = conn.send(WantHave(rid, tuple(batch)))
                peer.wants[rid] = trio.current_time()
                peer.known = False
                self._notify()  # the timer has a new deadline
                await link.write(data)

    def _schedule_reask(self, peer: _Peer) -> None:
        """After a round of answers: if the peer lacks chunks we still need, ask again
        later — sooner when the last round found new ones (it is fetching them too)."""
        if self.remaining <= peer.has:
            peer.reask_at = 0.0
            return
        if len(peer.has) > peer.has_before_ask:
            peer.reask_delay = REASK_MIN
        else:
            peer.reask_delay = min(peer.reask_delay * 2, REASK_MAX)
        peer.reask_at = trio.current_time() + peer.reask_delay

    def _reask_due(self, peer: _Peer) -> bool:
        return (
            peer.known
            and peer.reask_at > 0
            and trio.current_time() >= peer.reask_at
            and not self.remaining <= peer.has
        )

    async def _wait_changed_until(self, deadline: float) -> None:
        if deadline > 0:
            with trio.move_on_at(deadline):
                await self._wait_changed()
        else:
            await self._wait_changed()

    async def _discoverer(self) -> None:
        """Asks ``discover`` for more providers (see DISCOVER_IDLE) and starts the new ones."""
        assert self.discover is not None and self._peer_nursery is not None
        idle_for = DISCOVER_IDLE
        last: float | None = None  # when the latest lookup ended; the first is at once
        while not self.finished.is_set():
            if last is not None:
                # Each chunk that arrives pushes the next lookup back, so this wakes at
                # most once per `idle_for` while chunks flow.
                while (due := self._discover_due(last, idle_for)) > trio.current_time():
                    with trio.move_on_at(due):
                        await self.finished.wait()
                    if self.finished.is_set():
                        return
            found: Sequence[str] = ()
            try:
                found = await self.discover()
            except Exception as exc:  # discovery is an extra; the fetch goes on without
                log.info("blob %s: looking for more providers failed: %s", self.digest, exc)
            last = trio.current_time()
            known = {p.peer_id for p in self.peers}
            joined = [
                peer_id
                for peer_id in dict.fromkeys(found)
                if peer_id not in known and self._join(peer_id, "found as a provider")
            ]
            idle_for = DISCOVER_IDLE if joined else min(idle_for * 2, DISCOVER_MAX)

    def _discover_due(self, last: float, idle_for: float) -> float:
        """When the next lookup is due, the latest one having ended at ``last``."""
        return min(last + DISCOVER_PERIOD, max(last, self.last_block) + idle_for)

    def _join(self, peer_id: str, why: str) -> _Peer | None:
        """Start fetching from one more peer, unless it is us, failed, banned or too many."""
        if (
            peer_id == self.host.peer_id
            or peer_id in self.dropped
            or self.scores.is_banned(peer_id)
            or self.finished.is_set()
            or len(self.peers) >= MAX_SESSION_PEERS
            or self._peer_nursery is None
        ):
            return None
        peer = _Peer(peer_id)
        self.peers.append(peer)
        log.info("blob %s: peer %s joins the fetch (%s)", self.digest, peer_id, why)
        self._peer_nursery.start_soon(self._run_peer, peer)
        return peer

    async def _reader(self, peer: _Peer, link: _Link) -> None:
        conn = link.conn
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await link.stream.receive_some(conn.max_read)
                    if data:
                        conn.receive_data(data)
                    else:
                        conn.receive_eof()
                elif isinstance(event, Block):
                    self._on_block(peer, event)
                elif isinstance(event, HaveReply):
                    self._on_have(peer, event.request_id, event.have)
                elif isinstance(event, DontHave):
                    self._on_dont_have(peer, event.request_id)
                elif isinstance(event, Elsewhere):
                    self._on_elsewhere(peer, event.request_id, event.peers)
                elif isinstance(event, ErrorReply):
                    if event.request_id is None:
                        raise _PeerFailed(f"ended the stream: {event.code}: {event.message}")
                    self._on_refused(peer, event.request_id, f"{event.code}: {event.message}")
                elif isinstance(event, EndOfStream):
                    if not link.eof_sent:
                        raise _PeerFailed("ended the stream early")
                    link.clean = True
                    return
                else:  # the machine only lets a server send replies
                    raise AssertionError(f"unexpected blocks event {event!r}")
        finally:
            link.reader_done.set()

    def _on_have(self, peer: _Peer, rid: int, have: tuple[bytes, ...]) -> None:
        peer.wants.pop(rid, None)
        peer.last_arrival = trio.current_time()
        for chunk_id in have:
            unit = self.unit_of[chunk_id]
            if unit in self.remaining and unit not in peer.deferred:
                self._gain(peer, unit)
        if not peer.wants:
            peer.known = True
            self._schedule_reask(peer)
            log.debug(
                "blob %s: peer %s has %d of the %d chunks wanted",
                self.digest,
                peer.peer_id,
                len(peer.has),
                len(self.units),
            )
        self._notify()

    def _on_dont_have(self, peer: _Peer, rid: int) -> None:
        entry = peer.requests.get(rid)
        unit = None if entry is None else entry[0]
        answers = None if unit is None else peer.named.get(unit)
        if unit is None or answers is None or answers >= len(NAMED_RETRY_DELAYS):
            self._on_refused(peer, rid, "does not have it")
            return
        # Named for it a moment ago: it is most likely still receiving or checking it.
        del peer.requests[rid]
        peer.last_arrival = trio.current_time()
        peer.named[unit] = answers + 1
        due = peer.last_arrival + NAMED_RETRY_DELAYS[answers]
        peer.holdoff[unit] = due
        self._requeue(unit, peer)
        assert self._peer_nursery is not None
        self._peer_nursery.start_soon(self._wake_at, due)
        self._notify()

    async def _wake_at(self, when: float) -> None:
        with trio.move_on_at(when):
            await self.finished.wait()
        self._notify()

    def _on_refused(self, peer: _Peer, rid: int, reason: str) -> None:
        if rid in peer.wants:
            # A refused WantHave: as if it had none of those.
            self._on_have(peer, rid, ())
            return
        entry = peer.requests.pop(rid, None)
        if entry is None:
            return
        unit = entry[0]
        log.info(
            "blob %s: peer %s refused chunk %d: %s",
            self.digest,
            peer.peer_id,
            self.units[unit].indices[0],
            reason,
        )
        self._lose(peer, unit)
        self._requeue(unit, peer)
        self._notify()

    def _on_elsewhere(self, peer: _Peer, rid: int, named: tuple[str, ...]) -> None:
        """``peer`` holds the chunk but sent us to ``named``, which got it from it lately."""
        entry = peer.requests.pop(rid, None)
        if entry is None:
            return
        peer.last_arrival = trio.current_time()
        unit = entry[0]
        by_id = {p.peer_id: p for p in self.peers}
        takers = 0
        for peer_id in named:
            other = by_id.get(peer_id) or self._join(peer_id, f"named by {peer.peer_id}")
            if other is not None and other is not peer and other.active:
                self._gain(other, unit)
                other.named.setdefault(unit, 0)
                takers += 1
        log.debug(
            "blob %s: peer %s sent chunk %d elsewhere (%d of %d named peers usable)",
            self.digest,
            peer.peer_id,
            self.units[unit].indices[0],
            takers,
            len(named),
        )
        if takers:
            # Gained by the others first, so losing it here does not count it unobtainable.
            peer.deferred.add(unit)
            self._lose(peer, unit)
        self._requeue(unit, peer)
        self._notify()

    def _on_block(self, peer: _Peer, block: Block) -> None:
        entry = peer.requests.pop(block.request_id, None)
        if entry is None:  # the machine drops replies to cancelled requests
            return
        unit, sent = entry
        now = trio.current_time()
        # Requests are pipelined: the time this block took is since the later of its
        # request and the previous arrival, not since its request alone.
        seconds = now - max(sent, peer.last_arrival)
        peer.last_arrival = now
        self.last_block = now
        peer.writing += 1
        assert self._writes is not None
        self._writes.start_soon(self._land, peer, unit, block.data, seconds)
        self._notify()

    async def _land(self, peer: _Peer, unit_number: int, data: BufferLike, seconds: float) -> None:
        unit = self.units[unit_number]
        landed = False
        try:
            try:
                await trio.to_thread.run_sync(
                    partial(self._write_unit, unit, data), limiter=self.limiter
                )
            except ChunkMismatch as exc:
                self._bad_block(peer, unit, str(exc))
                return
            landed = True
            # No checkpoint from here on: the bookkeeping matches what is on disk.
            self.remaining.discard(unit_number)
            self.assigned.pop(unit_number, None)
            self.bytes_fetched += unit.length
            self.bytes_by_peer[peer.peer_id] += unit.length
            self.scores.good(peer.peer_id, unit.length, seconds)
            written = unit.length * len(unit.indices)
            self._unflushed += written
            self._dirty.set()
            if self._unflushed >= FLUSH_BYTES:
                self._flush_due.set()
            if self.on_progress is not None:
                self.on_progress(written)
        finally:
            peer.writing -= 1
            if not landed:
                self._requeue(unit_number, peer)
            self._notify()

    def _write_unit(self, unit: _Unit, data: BufferLike) -> None:
        for index in unit.indices:
            self.blob.write_chunk(index, data)

    def _bad_block(self, peer: _Peer, unit: _Unit, reason: str) -> None:
        self._lose(peer, unit.number)
        banned = self.scores.bad(peer.peer_id, f"blob {self.digest}: {reason}")
        if banned or self.scores.is_banned(peer.peer_id):
            peer.banned = True
            self._deactivate(peer)
            peer.scope.cancel()

    async def _timer(self, peer: _Peer, link: _Link) -> None:
        """Cancels and re-queues requests the peer has left unanswered for ``chunk_timeout``
        while sending nothing else; drops a peer that does not say what it has."""
        timeout = self.chunk_timeout
        while True:
            sent = [at for _, at in peer.requests.values()] + list(peer.wants.values())
            if not sent:
                await self._wait_changed()
                continue
            now = trio.current_time()
            deadline = max(min(sent), peer.last_arrival) + timeout
            if now < deadline:
                with trio.move_on_at(deadline):
                    await self._wait_changed()
                continue
            if any(max(at, peer.last_arrival) + timeout <= now for at in peer.wants.values()):
                raise _PeerFailed(f"did not say which chunks it has within {timeout:g} s")
            expired = [
                rid
                for rid, (_, at) in peer.requests.items()
                if max(at, peer.last_arrival) + timeout <= now
            ]
            async with link.lock:
                parts: list[bytes] = []
                for rid in expired:
                    unit, _ = peer.requests.pop(rid)
                    self._expire(peer, unit)
                    try:
                        parts.append(link.conn.send(Cancel(rid)))
                    except LocalProtocolError as exc:
                        raise _PeerFailed(f"answers nothing: {exc}") from None
                self._notify()
                await link.write(b"".join(parts))

    def _expire(self, peer: _Peer, unit: int) -> None:
        self.scores.timeout(peer.peer_id)
        peer.timeouts[unit] += 1
        others = any(p is not peer and p.active and unit in p.has for p in self.peers)
        log.info(
            "blob %s: chunk %d timed out at peer %s (%d time(s)); asking %s",
            self.digest,
            self.units[unit].indices[0],
            peer.peer_id,
            peer.timeouts[unit],
            "another peer" if others else "again",
        )
        if others or peer.timeouts[unit] >= MAX_TIMEOUTS_PER_CHUNK:
            self._lose(peer, unit)
        self._requeue(unit, peer)
