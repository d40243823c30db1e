"""Tests for node/announce.py: real hosts on 127.0.0.1 gossiping in one trio process."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import combinations

import nacl.signing
import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from node import p2p
from node.announce import Announcer
from node.p2p import P2PHost, open_host
from protocols import _cbor
from protocols.records import ANNOUNCE_TOPIC, Announcement, VersionRecord, hlc_pack

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
AUTHOR = nacl.signing.SigningKey.generate()


def record(name: str, version: int = 0) -> VersionRecord:
    content = f"{name}:{version}".encode()
    return VersionRecord.sign(
        model=f"registry.ollama.ai/library/{name}",
        tag="latest",
        manifest_digest="sha256:" + hashlib.sha256(content).hexdigest(),
        size=len(content),
        parents=(),
        hlc=hlc_pack(1_700_000_000_000 + version, 0),
        signing_key=AUTHOR,
    )


class Inbox:
    """An ``on_records`` callback that keeps what arrives and lets tests wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Announcement]] = []
        self._changed = trio.Event()

    async def __call__(self, peer_id: str, announcement: Announcement) -> None:
        self.items.append((peer_id, announcement))
        self._changed.set()
        self._changed = trio.Event()

    @property
    def records(self) -> list[VersionRecord]:
        return [r for _, announcement in self.items for r in announcement.records]

    async def wait_records(self, count: int) -> list[VersionRecord]:
        while len(self.records) < count:
            await self._changed.wait()
        return self.records


@dataclasses.dataclass
class Node:
    host: P2PHost
    announcer: Announcer
    inbox: Inbox

    @property
    def peer_id(self) -> str:
        return self.host.peer_id


@asynccontextmanager
async def gossiping(count: int, **kwargs: int) -> AsyncIterator[list[Node]]:
    """`count` running announcers, all connected and subscribed to one another."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(open_host(create_new_key_pair(), [LOOPBACK]))
            for _ in range(count)
        ]
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes = []
        for host in hosts:
            inbox = Inbox()
            announcer = Announcer(host, inbox, **kwargs)
            await nursery.start(announcer.run)
            nodes.append(Node(host, announcer, inbox))
        for a, b in combinations(nodes, 2):
            await a.host.connect(b.host.listen_addrs[0])
        for a, b in combinations(nodes, 2):
            await a.announcer.wait_for_peer(b.peer_id, in_mesh=True)
            await b.announcer.wait_for_peer(a.peer_id, in_mesh=True)
        yield nodes


async def test_gossip_mesh_links_are_never_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 35: the host trims connections whose only streams are pubsub's; those to
    our mesh peers carry the gossip, so the announcer tells the host to keep them. With
    room for one connection, a keeps both its mesh peers and drops the one that is not."""
    monkeypatch.setattr(
        p2p,
        "CONNECTION_CONFIG",
        ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=1,
            low_watermark=1,
            high_watermark=2,
            grace_period=0,
        ),
    )
    with trio.fail_after(20):
        async with (
            gossiping(3) as (a, b, c),
            open_host(create_new_key_pair(), [LOOPBACK]) as outsider,
        ):
            await outsider.connect(a.host.listen_addrs[0])
            await a.host.wait_connected(outsider.peer_id)
            await a.host._swarm.connection_pruner.maybe_prune_connections()
            assert sorted(a.host.connected_peers()) == sorted([b.peer_id, c.peer_id])


async def test_announced_record_arrives_verified_at_the_others() -> None:
    with trio.fail_after(20):
        async with gossiping(3) as (a, b, c):
            mine = record("llama3")
            a.announcer.announce_nowait([mine], a.host.listen_addrs)
            for node in (b, c):
                assert await node.inbox.wait_records(1) == [mine]
                assert node.inbox.items == [
                    (a.peer_id, Announcement((mine,), tuple(a.host.listen_addrs)))
                ]
            assert a.inbox.items == []
            assert a.announcer.stats.published == 1
            assert b.announcer.stats.received == 1


async def test_burst_of_100_records_all_arrive_in_batches() -> None:
    """py-libp2p drops a peer's messages past 10/s per topic; 100 records queued at once
    go out as 7 announcements of at most 16, paced, and every one arrives."""
    burst = [record(f"model-{i}") for i in range(100)]
    with trio.fail_after(30):
        async with gossiping(3) as (a, b, c):
            a.announcer.announce_nowait(burst[:50])
            a.announcer.announce_nowait(burst[50:])
            a.announcer.announce_nowait(burst[:10])  # still queued: not sent twice
            for node in (b, c):
                got = await node.inbox.wait_records(100)
                assert sorted(r.name for r in got) == sorted(r.name for r in burst)
                assert all(len(ann.records) <= 16 for _, ann in node.inbox.items)
            assert a.announcer.stats.published == 7
            assert a.announcer.stats.records_published == 100


async def test_overflow_coalesces_same_tag_to_newest_then_drops_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dmm.announce")
    versions = [record(name, version) for version in range(5) for name in "abcd"]
    with trio.fail_after(20):
        async with gossiping(2, max_queued_records=16) as (a, b):
            a.announcer.announce_nowait(versions)
            assert a.announcer.stats.coalesced == 16
            assert sorted(r.name for r in await b.inbox.wait_records(4)) == [
                f"registry.ollama.ai/library/{name}:latest" for name in "abcd"
            ]
            assert b.inbox.records == versions[-4:]
            distinct = [record(f"d{i}") for i in range(20)]
            a.announcer.announce_nowait(distinct)
            assert (await b.inbox.wait_records(4 + 16))[4:] == distinct[4:]
            stats = a.announcer.stats
            assert (stats.overflows, stats.coalesced, stats.dropped_overflow) == (2, 16, 4)
            assert len([r for r in caplog.records if r.name == "dmm.announce"]) == 2


async def test_bad_announcements_are_dropped_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer publishing straight through py-libp2p sends garbage (twice), a forged record
    and a record list of the wrong type: every node drops all 4, counts them against that
    peer, logs one line, forwards none, and still takes that peer's next valid one."""
    caplog.set_level(logging.WARNING, logger="dmm.announce")
    good = record("llama3")
    forged = Announcement((dataclasses.replace(good, signature=bytes(64)),)).encode()
    wrong_type = _cbor.dumps({"v": 1, "r": ["not bytes"], "l": []})
    with trio.fail_after(30):
        async with gossiping(3) as honest, open_host(create_new_key_pair(), [LOOPBACK]) as rogue:
            router = GossipSub(
                protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_interval=1,
            )
            pubsub = Pubsub(rogue.host, router)
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                await pubsub.subscribe(ANNOUNCE_TOPIC)
                for node in honest:
                    await rogue.connect(node.host.listen_addrs[0])
                for node in honest:
                    await node.announcer.wait_for_peer(rogue.peer_id)
                    # Everything the rogue publishes goes to every honest node directly.
                    await pubsub.wait_for_mesh(node.host.host.get_id(), ANNOUNCE_TOPIC)
                for data in (b"\xff garbage", forged, wrong_type, b"\xff garbage again"):
                    await pubsub.publish(ANNOUNCE_TOPIC, data)
                await pubsub.publish(ANNOUNCE_TOPIC, Announcement((good,)).encode())
                for node in honest:
                    assert await node.inbox.wait_records(1) == [good]
                # Quiet network: every message has been through every validator.
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                for node in honest:
                    stats = node.announcer.stats
                    assert (stats.dropped_bad, stats.bad_by_peer) == (4, {rogue.peer_id: 4})
                    assert node.inbox.items == [(rogue.peer_id, Announcement((good,)))]
                    assert stats.received == 1
                warnings = [r.getMessage() for r in caplog.records if r.name == "dmm.announce"]
                assert len(warnings) == 3
                assert all(rogue.peer_id in line for line in warnings)
