"""Version announcements over gossipsub (``dmm/announce/1``): batched, paced, verified.

`Announcer` runs py-libp2p's Pubsub with a GossipSub router on the node's host and
subscribes to `ANNOUNCE_TOPIC`.

Sending. `Announcer.announce_nowait` queues records; one sender task packs queued
records into `Announcement`s (at most `MAX_ANNOUNCED_RECORDS` records and
`MAX_ANNOUNCEMENT_SIZE` bytes each) and publishes at most ``rate`` of them per second.
py-libp2p drops, without a word, whatever a peer sends past 10 messages per second per
topic (our own publishes included) and past 32 queued per peer or per subscription:
pacing below that is what makes 100 records announced at once all arrive. Our own queue
holds `DEFAULT_MAX_QUEUED_RECORDS`; when it overflows, queued records of the same
``model:tag`` are coalesced into the newest, and if that is not enough the oldest are
dropped; both are counted and logged. Gossip is not stored: what is published while no
peer listens is gone (the DHT's version records cover that).

Receiving. A topic validator decodes every message (``Announcement.decode`` verifies each
record's signature) before pubsub delivers or forwards it, so a bad announcement gets no
further than the first dmm node. Bad ones are counted per originating peer and logged
once per peer. Good ones from other peers go to ``on_records(peer_id, announcement)``
from one task, in arrival order, through a bounded queue so a slow callback never makes
py-libp2p drop messages; if that queue fills, announcements are dropped, counted and
logged.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from node.acl import Acl
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.records import (
    ANNOUNCE_TOPIC,
    MAX_ANNOUNCED_RECORDS,
    Announcement,
    VersionRecord,
)

from .p2p import DmmGossipSub, DmmPubsub, P2PHost, guard_pubsub_streams

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_QUEUED_RECORDS",
    "DEFAULT_RATE",
    "FORWARD_LIMIT",
    "MAX_RATE",
    "AnnounceStats",
    "Announcer",
    "OnRecords",
]

log = logging.getLogger("dmm.announce")

OnRecords = Callable[[str, Announcement], Awaitable[None]]

DEFAULT_RATE = 5.0
# py-libp2p drops a peer's messages past 10 per second per topic. Our sends are spaced
# 1/rate apart, so any second holds at most rate + 1 of them.
MAX_RATE = 8.0
DEFAULT_HEARTBEAT_INTERVAL = 1.0  # the library's default is 120 s
DEFAULT_MAX_QUEUED_RECORDS = 1024
# Received announcements waiting for `on_records`.
DELIVERY_QUEUE = 256
# What our router accepts per second per topic from one neighbour (library: 10). The
# limit counts what a neighbour forwards from every origin, so with a few announcing
# nodes a relay passes 10/s while each origin stays at `MAX_RATE`.
FORWARD_LIMIT = 100.0
# Peers whose bad announcements are counted individually; past that the oldest entry
# goes (a rogue can make peer ids for free).
MAX_BAD_PEERS_TRACKED = 1024


@dataclass(slots=True)
class AnnounceStats:
    published: int = 0  # announcements we published
    records_published: int = 0
    received: int = 0  # valid announcements from other peers
    dropped_bad: int = 0  # invalid announcements, from any peer
    bad_by_peer: dict[str, int] = field(default_factory=dict)
    coalesced: int = 0  # queued records replaced by a newer one of the same model:tag
    overflows: int = 0  # times our send queue overflowed
    dropped_overflow: int = 0  # queued records dropped when coalescing was not enough
    dropped_backlog: int = 0  # valid announcements dropped because on_records fell behind


class Announcer:
    """Publishes our version records and hands on the ones peers publish.

    Start ``run`` with ``nursery.start``; it returns (started) once subscribed.
    ``announce_nowait`` may be called any time; records wait until ``run`` sends them.
    """

    def __init__(
        self,
        host: P2PHost,
        on_records: OnRecords | None,
        *,
        rate: float = DEFAULT_RATE,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_queued_records: int = DEFAULT_MAX_QUEUED_RECORDS,
        acl: Acl | None = None,
        on_rejected: Callable[[str, VersionRecord | None, str], None] | None = None,
    ) -> None:
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] announcements per second")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if max_queued_records < MAX_ANNOUNCED_RECORDS:
            raise ValueError(f"max_queued_records must be at least {MAX_ANNOUNCED_RECORDS}")
        self._host = host
        # Announcements carrying a record whose author may not publish it are dropped and
        # not forwarded, as bad ones are; ``on_rejected(origin, record or None, reason)``
        # hears of each (for the audit log).
        self._acl = acl
        self._on_rejected = on_rejected
        self._my_id = host.host.get_id()
        self._on_records = on_records
        self._interval = 1.0 / rate
        self._heartbeat_interval = heartbeat_interval
        self._max_queued = max_queued_records
        self._queue: deque[VersionRecord] = deque()
        self._queued_ids: set[bytes] = set()
        self._queued = trio.Event()
        self._listen_addrs: tuple[str, ...] = ()
        self._overflow_logged = False
        self._backlog_logged = False
        self._deliver_send, self._deliver_receive = trio.open_memory_channel[
            tuple[str, Announcement]
        ](DELIVERY_QUEUE)
        self._pubsub: Pubsub | None = None
        self.stats = AnnounceStats()

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        router = DmmGossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=self._heartbeat_interval,  # type: ignore[arg-type]
            max_messages_per_topic_per_second=FORWARD_LIMIT,
        )
        pubsub = DmmPubsub(self._host.host, router)
        guard_pubsub_streams(self._host, router.get_protocols(), pubsub.stream_handler)
        pubsub.set_topic_validator(ANNOUNCE_TOPIC, self._validate, is_async_validator=False)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(ANNOUNCE_TOPIC)
            self._pubsub = pubsub
            # A trimmed mesh link would have to be grafted again: gossip travels on them.
            self._host.keep_peers(
                lambda peer: any(ID.from_base58(peer) in m for m in router.mesh.values())
            )
            async with trio.open_nursery() as nursery:
                # Pubsub only notices connections made after it started.
                for peer in self._host.host.get_connected_peers():
                    nursery.start_soon(pubsub.ensure_peer_stream, peer)
                nursery.start_soon(self._receive_loop, subscription)
                nursery.start_soon(self._deliver_loop)
                nursery.start_soon(self._send_loop, pubsub)
                log.info("announcing on %s as %s", ANNOUNCE_TOPIC, self._host.peer_id)
                task_status.started()

    async def wait_for_peer(self, peer_id: str, *, in_mesh: bool = False) -> None:
        """Return once `peer_id` is subscribed to the announce topic (as we know it).

        With `in_mesh`, also wait until it is in our gossip mesh, so it gets what we
        publish straight from us rather than through other peers or a later heartbeat's
        gossip. A mesh holds at most 12 peers: in a larger network some never join it.
        """
        if self._pubsub is None:
            raise RuntimeError("the announcer is not running")
        peer = ID.from_base58(peer_id)
        await self._pubsub.wait_for_subscription(peer, ANNOUNCE_TOPIC, timeout=math.inf)
        if in_mesh:
            await self._pubsub.wait_for_mesh(peer, ANNOUNCE_TOPIC, timeout=math.inf)

    # ------------------------------------------------------------------ sending

    def announce_nowait(
        self, records: Sequence[VersionRecord], listen_addrs: Sequence[str] = ()
    ) -> None:
        """Queue `records` for announcing, with our `listen_addrs` as fetch hints.

        Never blocks. Raises ``LocalProtocolError`` (and queues nothing) if a record or
        the addresses cannot go in an announcement. The latest `listen_addrs` given go
        with every announcement sent after.
        """
        addrs = tuple(listen_addrs)
        for record in records:
            Announcement((record,), addrs).encode()  # every check a batch will face
        self._listen_addrs = addrs
        for record in records:
            version_id = record.version_id
            if version_id in self._queued_ids:
                continue
            self._queue.append(record)
            self._queued_ids.add(version_id)
        if len(self._queue) > self._max_queued:
            self._overflow()
        if self._queue:
            self._queued.set()

    def _overflow(self) -> None:
        """Coalesce same model:tag records to the newest; then drop the oldest."""
        self.stats.overflows += 1
        newest: dict[str, VersionRecord] = {}
        for record in self._queue:
            best = newest.get(record.name)
            if best is None or (record.hlc, record.version_id) > (best.hlc, best.version_id):
                newest[record.name] = record
        kept = [record for record in self._queue if newest[record.name] is record]
        coalesced = len(self._queue) - len(kept)
        dropped = max(0, len(kept) - self._max_queued)
        self.stats.coalesced += coalesced
        self.stats.dropped_overflow += dropped
        self._queue = deque(kept[dropped:])
        self._queued_ids = {record.version_id for record in self._queue}
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning(
                "announce queue overflowed (%d records): coalesced %d, dropped %d oldest;"
                " further overflows before it drains are only counted",
                self._max_queued,
                coalesced,
                dropped,
            )

    async def _send_loop(self, pubsub: Pubsub) -> None:
        next_slot = -math.inf
        while True:
            while not self._queue:
                self._overflow_logged = False
                await self._queued.wait()
                self._queued = trio.Event()
            slot = max(next_slot, trio.current_time())
            await trio.sleep_until(slot)
            # Records queued while we waited join this batch.
            announcement, data = self._next_batch()
            await pubsub.publish(ANNOUNCE_TOPIC, data)
            next_slot = slot + self._interval
            self.stats.published += 1
            self.stats.records_published += len(announcement.records)
            log.debug("announced %s (%d bytes)", _names(announcement.records), len(data))

    def _next_batch(self) -> tuple[Announcement, bytes]:
        count = min(len(self._queue), MAX_ANNOUNCED_RECORDS)
        while True:
            records = tuple(self._queue[i] for i in range(count))
            announcement = Announcement(records, self._listen_addrs)
            try:
                data = announcement.encode()
            except LocalProtocolError:
                if count == 1:  # announce_nowait checked each record alone: cannot happen
                    raise
                count -= 1
                continue
            for _ in range(count):
                self._queued_ids.discard(self._queue.popleft().version_id)
            return announcement, data

    # ---------------------------------------------------------------- receiving

    def _validate(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        """Pubsub's topic validator: False drops the message and stops its forwarding."""
        origin = ID(message.from_id)
        if origin == self._my_id:
            return True
        try:
            announcement = Announcement.decode(message.data)
        except RemoteProtocolError as exc:
            self._bad(str(origin), forwarder, exc)
            return False
        if self._acl is not None:
            for record in announcement.records:
                refusal = self._acl.publish_refusal(record)
                if refusal is not None:
                    self._bad(str(origin), forwarder, RemoteProtocolError(refusal), record)
                    return False
        return True

    def _bad(
        self,
        peer: str,
        forwarder: ID,
        exc: RemoteProtocolError,
        record: VersionRecord | None = None,
    ) -> None:
        self.stats.dropped_bad += 1
        counts = self.stats.bad_by_peer
        first = peer not in counts
        if first and len(counts) >= MAX_BAD_PEERS_TRACKED:
            del counts[next(iter(counts))]
        counts[peer] = counts.get(peer, 0) + 1
        # Told after the counts: whoever it wakes sees them.
        if self._on_rejected is not None:
            self._on_rejected(peer, record, str(exc))
        if not first:
            return
        log.warning(
            "dropped a bad announcement from %s (via %s): %s; further ones from this peer"
            " are only counted",
            peer,
            forwarder,
            exc,
        )

    async def _receive_loop(self, subscription: ISubscriptionAPI) -> None:
        while True:
            message = await subscription.get()
            origin = ID(message.from_id)
            if origin == self._my_id:
                continue
            try:
                announcement = Announcement.decode(message.data)
            except RemoteProtocolError as exc:  # the validator let it through: cannot happen
                self._bad(str(origin), origin, exc)
                continue
            self.stats.received += 1
            try:
                self._deliver_send.send_nowait((str(origin), announcement))
            except trio.WouldBlock:
                self.stats.dropped_backlog += 1
                if not self._backlog_logged:
                    self._backlog_logged = True
                    log.warning(
                        "dropped an announcement from %s: %d wait for on_records already",
                        origin,
                        DELIVERY_QUEUE,
                    )
                continue
            log.debug("announcement from %s: %s", origin, _names(announcement.records))

    async def _deliver_loop(self) -> None:
        async for peer, announcement in self._deliver_receive:
            if self._on_records is not None:
                try:
                    await self._on_records(peer, announcement)
                except Exception:
                    log.exception(
                        "on_records failed for %s from %s", _names(announcement.records), peer
                    )
            if self._deliver_receive.statistics().current_buffer_used == 0:
                self._backlog_logged = False


def _names(records: Sequence[VersionRecord]) -> str:
    shown = ", ".join(record.name for record in records[:3])
    return shown if len(records) <= 3 else f"{shown} (+{len(records) - 3} more)"
