"""Tests for node/p2p.py: real py-libp2p hosts on 127.0.0.1, one test per library defect."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import libp2p.kad_dht.kad_dht
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as LIBRARY_KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import shared_prefix_len, sort_peer_ids_by_distance
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.envelope import seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, TYPE_WINDOW_UPDATE, Yamux, YamuxStream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from node import p2p
from node.p2p import (
    COALESCE_BYTES,
    KAD_ADD_PROVIDER_LIMIT,
    KAD_INBOUND_STREAMS_PER_PEER,
    KAD_POOL_PER_PEER,
    KAD_PROTOCOL_ID,
    NOISE_PROTOCOL_ID,
    DialError,
    DmmGossipSub,
    DmmPubsub,
    KadDht,
    P2PHost,
    Stream,
    StreamRefused,
    configure_libp2p_logging,
    guard_pubsub_streams,
    open_host,
    prefix_lengths_to_refresh,
    random_key_at_prefix_length,
    trace_walks,
)
from node.testing import free_port

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
PEER_RECORD_DOMAIN = "libp2p-peer-record"
ECHO = "/dmm/test-echo/1"
SINK = "/dmm/test-sink/1"


@asynccontextmanager
async def hosts(count: int, **kwargs: frozenset[str]) -> AsyncIterator[list[P2PHost]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_host(create_new_key_pair(), [LOOPBACK], **kwargs))
            for _ in range(count)
        ]


async def read_all(stream: Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def echo(stream: Stream) -> None:
    await stream.send_all(await read_all(stream))


def swarm_of(host: P2PHost) -> Swarm:
    return cast(Swarm, host.host.get_network())


def peer_id_of(key_pair: KeyPair) -> str:
    return str(ID.from_pubkey(key_pair.public_key))


class Sink:
    """A stream handler that reads a whole stream and remembers what arrived."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.received: list[tuple[str, bytes]] = []
        self.done = trio.Event()

    async def __call__(self, stream: Stream) -> None:
        if self.pause:
            await trio.sleep(self.pause)
        self.received.append((stream.peer_id, await read_all(stream)))
        self.done.set()


async def test_host_listens_on_real_port_and_connects() -> None:
    """listen_addrs carry the bound port and /p2p/<id>; connect returns the peer id."""
    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            (addr,) = a.listen_addrs
            assert addr.endswith(f"/p2p/{a.peer_id}")
            assert "/tcp/0/" not in addr
            assert await b.connect(addr) == a.peer_id
            assert b.connected_peers() == [a.peer_id]
            a.set_stream_handler(ECHO, echo)
            stream = await b.open_stream(a.peer_id, ECHO)
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"ping"
            await stream.aclose()
            await b.disconnect(a.peer_id)
            assert b.connected_peers() == []


async def test_plaintext_peer_is_refused_both_ways() -> None:
    """Defect 1: py-libp2p's default security list accepts /plaintext/2.0.0.

    A peer that offers only plaintext can neither dial us nor be dialed by us.
    """
    key_pair = create_new_key_pair()
    plain = new_host(
        key_pair=key_pair,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    with trio.fail_after(20):
        async with hosts(1) as (ours,), plain.run([Multiaddr(LOOPBACK)]):
            offered = swarm_of(ours).upgrader.security_multistream.transports
            assert list(offered) == [NOISE_PROTOCOL_ID]
            with pytest.raises(BaseLibp2pError):
                await plain.connect(info_from_p2p_addr(Multiaddr(ours.listen_addrs[0])))
            with pytest.raises(DialError):
                await ours.connect(str(plain.get_addrs()[0]))
            assert ours.connected_peers() == []
            assert plain.get_connected_peers() == []


async def test_one_connection_per_peer() -> None:
    """Defect 2: dial_peer waits 250 ms for a second connection unless the per-peer cap is 1.

    Pins the configuration (not the timing) and that both dial directions share one
    connection.
    """
    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            for host in (a, b):
                assert swarm_of(host).connection_config.max_connections_per_peer == 1
            await a.connect(b.listen_addrs[0])
            await b.connect(a.listen_addrs[0])
            assert len(a.host.get_network().get_connections()) == 1
            assert len(b.host.get_network().get_connections()) == 1


async def test_no_peer_is_dialed_to_make_up_a_connection_count() -> None:
    """Defect 21: the library's auto-connector dialed peerstore peers up to (low + high
    watermark) / 2 connections, and fought the pruner. A host that knows a peer's address
    and holds no connection dials nobody when the auto-connector's turn comes."""
    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            swarm = swarm_of(a)
            swarm.peerstore.add_addrs(
                ID.from_base58(b.peer_id), [Multiaddr(b.listen_addrs[0])], 3600
            )
            assert swarm.get_total_connections() < swarm.connection_config.min_connections
            await swarm.auto_connector.maybe_connect()
            assert not a.is_connected(b.peer_id)
            config = swarm.connection_config
            assert config.low_watermark < config.high_watermark  # idle ones above are pruned
            assert config.max_connections - config.min_connections >= 250  # defect 3's slots


async def test_connections_above_the_high_watermark_are_trimmed_whatever_pubsub_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect 35: the pruner kept every connection with a stream, and pubsub holds one on
    every connection, so nothing was ever trimmed (a 200-node swarm in one process ran
    out of open files). Connections whose only streams are pubsub's go, down to the low
    watermark; one carrying another stream stays, and so does a peer the host keeps."""
    config = ConnectionConfig(
        max_connections_per_peer=1,
        min_connections=1,
        low_watermark=2,
        high_watermark=3,
        grace_period=0,
    )
    monkeypatch.setattr(p2p, "CONNECTION_CONFIG", config)
    gossip = "/meshsub/1.1.0"
    held = trio.Event()

    async def hold(stream: Stream) -> None:
        await held.wait()

    with trio.fail_after(30):
        async with hosts(6) as (hub, *spokes):
            hub.set_stream_handler(gossip, hold)
            hub.set_stream_handler(ECHO, hold)
            busy, kept = spokes[3], spokes[4]
            hub.keep_peers(lambda peer: peer == kept.peer_id)
            for spoke in spokes:
                await spoke.connect(hub.listen_addrs[0])
                await spoke.open_stream(hub.peer_id, gossip)
            await busy.open_stream(hub.peer_id, ECHO)
            await trio.testing.wait_all_tasks_blocked()
            assert len(hub.connected_peers()) == 5
            await swarm_of(hub).connection_pruner.maybe_prune_connections()
            assert sorted(hub.connected_peers()) == sorted([busy.peer_id, kept.peer_id])
            held.set()


async def test_connections_send_no_rtt_pings() -> None:
    """Defect 22: yamux's RTT loop pings every connection every 30 s from both ends, for
    an estimate nothing reads. Ours returns at once and has sent nothing."""
    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            await a.connect(b.listen_addrs[0])
            for host in (a, b):
                (conn,) = swarm_of(host).get_connections()
                muxed = conn.muxed_conn
                with trio.fail_after(1):
                    await muxed._measure_rtt_loop()  # type: ignore[attr-defined]
                assert muxed._ping_id == 0  # type: ignore[attr-defined]


async def test_a_pubsub_stream_after_pubsub_stopped_is_ended_not_a_crash() -> None:
    """Defect 23: pubsub's handler starting a task in its closed nursery raised out of the
    connection and out of open_host. Guarded, the stream is reset and the host stays up."""
    reached = trio.Event()

    async def stopped_pubsub(stream: Any) -> None:
        reached.set()
        raise RuntimeError("Nursery is closed to new arrivals")

    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            guard_pubsub_streams(a, ["/dmm/test-pubsub/1"], stopped_pubsub)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, "/dmm/test-pubsub/1")
            await stream.send_all(b"hello")
            await reached.wait()
            with pytest.raises(trio.BrokenResourceError):
                await read_all(stream)  # reset, not a clean end
            assert a.is_connected(b.peer_id)


async def test_gossip_backs_off_from_the_mesh_peers_its_heartbeat_prunes() -> None:
    """Defect 25: the heartbeat pruned mesh peers over degree_high with no backoff of its
    own, so it grafted them again while they still backed off from it, and they took the
    GRAFT for a flood. Three leaves graft one centre whose mesh holds one peer: the peers
    its heartbeat prunes are backed off from at once."""
    topic = "dmm/test-mesh/1"
    checked: list[dict[ID, bool]] = []
    pruned = trio.Event()
    with trio.fail_after(20):
        async with hosts(4) as (centre, *leaves), AsyncExitStack() as stack:
            routers = []
            for host in (centre, *leaves):
                router = DmmGossipSub(
                    protocols=[PROTOCOL_ID_V11],
                    degree=1,
                    degree_low=1,
                    degree_high=1,
                    heartbeat_interval=0.2,  # type: ignore[arg-type]
                )
                pubsub = Pubsub(host.host, router)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
                await pubsub.subscribe(topic)
                routers.append(router)
            heartbeat = routers[0].mesh_heartbeat

            def watched() -> tuple[Any, Any]:
                to_graft, to_prune = heartbeat()
                if to_prune:
                    checked.append({p: routers[0]._check_back_off(p, topic) for p in to_prune})
                    pruned.set()
                return to_graft, to_prune

            routers[0].mesh_heartbeat = watched  # type: ignore[method-assign]
            for leaf in leaves:
                await leaf.connect(centre.listen_addrs[0])
            await pruned.wait()
    assert checked and all(all(backed_off.values()) for backed_off in checked)


async def test_pubsub_keeps_trying_a_peer_whose_pubsub_was_not_up_yet() -> None:
    """Defect 27: a peer whose pubsub stream failed to negotiate (its pubsub had not started,
    or answered after 10 s) was never tried again while connected: no gossip either way."""
    with trio.fail_after(30):
        async with hosts(2) as (a, b), AsyncExitStack() as stack:

            async def start_pubsub(host: P2PHost) -> DmmPubsub:
                router = DmmGossipSub(
                    protocols=[PROTOCOL_ID_V11], degree=1, degree_low=1, degree_high=2
                )
                pubsub = DmmPubsub(host.host, router)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
                return pubsub

            pubsub_a = await start_pubsub(a)
            await b.connect(a.listen_addrs[0])
            # a's first stream to b fails: b speaks no pubsub protocol yet.
            await trio.testing.wait_all_tasks_blocked()
            assert b.host.get_id() not in pubsub_a.peers
            await start_pubsub(b)
            await pubsub_a.wait_for_peer(b.host.get_id(), timeout=20)


async def test_the_hosts_addresses_read_while_its_listeners_close() -> None:
    """Defect 24: ``get_addrs`` (identify answers with it) read the sockets of listeners
    being closed and raised OSError (bad file descriptor), which crashed a stopping host.
    Read at every checkpoint of the close, it now answers each time."""
    with trio.fail_after(10):
        async with hosts(1) as (host,):
            closed = trio.Event()
            reads = 0

            async def close() -> None:
                await host._close_connections()
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close)
                while not closed.is_set():
                    host.host.get_addrs()
                    reads += 1
                    await trio.lowlevel.checkpoint()
            assert reads > 1
            assert host.host.get_addrs() == []


async def test_listener_accepts_after_400_connections() -> None:
    """Defect 3: the inbound cap (250) counted every connection ever accepted.

    After 400 connect/disconnect cycles (16 dialers, 25 each) a fresh peer still gets in.
    """
    with trio.fail_after(55):
        async with hosts(1) as (listener,), hosts(16) as dialers:
            listener.set_stream_handler(ECHO, echo)
            addr = listener.listen_addrs[0]

            async def cycle(dialer: P2PHost) -> None:
                for _ in range(25):
                    await dialer.connect(addr)
                    await dialer.disconnect(listener.peer_id)

            async with trio.open_nursery() as nursery:
                for dialer in dialers:
                    nursery.start_soon(cycle, dialer)

            async with hosts(1) as (fresh,):
                await fresh.connect(addr)
                stream = await fresh.open_stream(listener.peer_id, ECHO)
                await stream.send_all(b"still here")
                await stream.send_eof()
                assert await read_all(stream) == b"still here"


async def test_paused_reader_is_not_reset() -> None:
    """Defect 4: a writer facing an empty window gave up after 5 s and reset the stream.

    The reader here is busy for 6 s while more than the largest receive window waits; then
    it reads everything. The sleep is the point of the test.
    """
    data = os.urandom(MAX_WINDOW_SIZE + 1024 * 1024)
    sink = Sink(pause=6.0)
    with trio.fail_after(30):
        async with hosts(2) as (a, b):
            a.set_stream_handler(SINK, sink)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, SINK)
            await stream.send_all(data)
            await stream.send_eof()
            await sink.done.wait()
            assert sink.received == [(b.peer_id, data)]
            await stream.aclose()


async def test_receive_some_returns_empty_at_eof() -> None:
    """Defect 5: NetStream.read raises StreamEOF instead of returning b"" at the end."""
    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            a.set_stream_handler(ECHO, echo)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, ECHO)
            await stream.send_all(b"hello")
            await stream.send_eof()
            assert await read_all(stream) == b"hello"
            assert await stream.receive_some() == b""
            assert await stream.receive_some(10) == b""
            await stream.aclose()


async def test_stream_errors_are_trio_errors() -> None:
    """A peer reset is BrokenResourceError with the library error as cause; use after
    aclose is ClosedResourceError; sending after send_eof is ClosedResourceError."""
    reset_done = trio.Event()

    async def resetter(stream: Stream) -> None:
        await stream.receive_some()
        await stream.reset()
        reset_done.set()

    with trio.fail_after(10):
        async with hosts(2) as (a, b):
            a.set_stream_handler(SINK, resetter)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, SINK)
            await stream.send_all(b"x")
            await stream.flush()
            await reset_done.wait()
            with pytest.raises(trio.BrokenResourceError) as broken:
                await stream.receive_some()
            assert isinstance(broken.value.__cause__, BaseLibp2pError)
            await stream.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")

            a.set_stream_handler(ECHO, echo)
            stream = await b.open_stream(a.peer_id, ECHO)
            await stream.send_eof()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"late")
            assert await read_all(stream) == b""
            await stream.aclose()


async def test_cut_streams_are_broken_not_eof() -> None:
    """Defect 11: a stream cut off by a reset or a closed connection read as a clean EOF,
    so truncated data looked complete. Both ends now see BrokenResourceError.

    Twelve rounds, because one way in was a race: a GO_AWAY marks the connection shutting
    down, then waits for a lock to reset its streams, and a read in between saw a clean
    end of stream (half the rounds did once reads stopped sending window updates)."""
    with trio.fail_after(60):
        async with hosts(2) as (a, b):
            for _ in range(12):
                outcome: list[type[BaseException]] = []
                reading = trio.Event()
                cut = trio.Event()

                async def reader(
                    stream: Stream,
                    outcome: list[type[BaseException]] = outcome,
                    reading: trio.Event = reading,
                    cut: trio.Event = cut,
                ) -> None:
                    reading.set()
                    try:
                        await read_all(stream)
                    except trio.BrokenResourceError as exc:
                        outcome.append(type(exc))
                        raise
                    finally:
                        cut.set()

                a.set_stream_handler(SINK, reader)
                await b.connect(a.listen_addrs[0])
                stream = await b.open_stream(a.peer_id, SINK)
                await stream.send_all(b"partial")
                await stream.flush()
                await reading.wait()
                await b.disconnect(a.peer_id)
                await cut.wait()
                assert outcome == [trio.BrokenResourceError]
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()


async def test_small_writes_are_coalesced_and_arrive_in_order() -> None:
    """Defect 6: each write was its own Yamux frame and Noise message.

    Small writes stay in our buffer (the Yamux send window is untouched) until a flush,
    and 20,000 of them of varying sizes arrive intact and in order.
    """
    pieces = [i.to_bytes(4, "big") * (i % 13 + 1) for i in range(20_000)]
    expected = b"".join(pieces)
    sink = Sink()
    with trio.fail_after(30):
        async with hosts(2) as (a, b):
            a.set_stream_handler(SINK, sink)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, SINK)
            muxed = cast(YamuxStream, cast(NetStream, stream.net_stream).muxed_stream)
            window = muxed.send_window
            for piece in pieces[:100]:
                await stream.send_all(piece)
            pending = sum(map(len, pieces[:100]))
            assert pending < COALESCE_BYTES
            assert muxed.send_window == window
            await stream.flush()
            assert muxed.send_window == window - pending
            for piece in pieces[100:]:
                await stream.send_all(piece)
            await stream.send_eof()
            await sink.done.wait()
            assert sink.received == [(b.peer_id, expected)]
            await stream.aclose()


async def test_window_updates_wait_for_half_the_window_to_be_read() -> None:
    """Defect 30: every read that returned data sent a window update, a frame of its own.

    300 small request/answer rounds on one stream send no window update either way (a
    fraction of the window was read); 1 MiB more on it still arrives whole, crediting
    the sender back once each half window is read."""
    rounds, size, bulk = 300, 100, 1024 * 1024
    sent_updates: dict[str, int] = {}

    def count_window_updates(host: P2PHost) -> None:
        (conn,) = swarm_of(host).get_connections()
        muxed = conn.muxed_conn
        write = muxed._write_frame  # type: ignore[attr-defined]

        async def counting(frame: bytes) -> None:
            if frame[1] == TYPE_WINDOW_UPDATE and int.from_bytes(frame[2:4], "big") == 0:
                sent_updates[host.peer_id] = sent_updates.get(host.peer_id, 0) + 1
            await write(frame)

        muxed._write_frame = counting  # type: ignore[attr-defined]

    bulk_received = trio.Event()
    received: list[int] = []

    async def answer(stream: Stream) -> None:
        for _ in range(rounds):
            request = await receive_exactly(stream, size)
            await stream.send_all(request[::-1])
            await stream.flush()
        received.append(len(await read_all(stream)))
        bulk_received.set()

    with trio.fail_after(30):
        async with hosts(2) as (a, b):
            a.set_stream_handler(ECHO, answer)
            await b.connect(a.listen_addrs[0])
            count_window_updates(a)
            count_window_updates(b)
            stream = await b.open_stream(a.peer_id, ECHO)
            for i in range(rounds):
                request = i.to_bytes(4, "big") * (size // 4)
                await stream.send_all(request)
                await stream.flush()
                assert await receive_exactly(stream, size) == request[::-1]
            assert sent_updates == {}
            await stream.send_all(os.urandom(bulk))
            await stream.send_eof()
            await bulk_received.wait()
            assert received == [bulk]
            # The window is 256 KiB: 1 MiB needs at least three credits back.
            assert 3 <= sent_updates.get(a.peer_id, 0) <= bulk // (128 * 1024)
            await stream.aclose()


async def receive_exactly(stream: Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "end of stream"
        data += chunk
    return bytes(data)


async def test_cancelled_reads_and_writes_leave_the_connection_usable() -> None:
    """Defect 20: a frame write cancelled after Noise encrypted it skipped a nonce (or left
    half a message), and the peer could decrypt nothing more on that connection.

    Readers write window updates, so cancelled reads did it as well as cancelled writes.
    Rounds of streams are cut off by timeouts mid-transfer; afterwards a new stream on the
    same connection must still carry data intact.
    """
    payload = os.urandom(1024 * 1024)
    delays = iter([n / 997 % 0.02 for n in range(1, 1000, 7)])

    async def discard(stream: Stream) -> None:
        while await stream.receive_some():
            pass

    async def cut_writer(a: P2PHost, b: P2PHost) -> None:
        stream = await b.open_stream(a.peer_id, SINK)
        with trio.move_on_after(next(delays)):
            while True:
                await stream.send_all(payload)
        await stream.reset()

    async def cut_reader(a: P2PHost, b: P2PHost) -> None:
        stream = await b.open_stream(a.peer_id, ECHO)
        await stream.send_all(payload * 4)
        await stream.send_eof()
        with trio.move_on_after(next(delays) * 2):
            while await stream.receive_some():
                pass
        await stream.reset()

    with trio.fail_after(60):
        async with hosts(2) as (a, b):
            a.set_stream_handler(SINK, discard)
            a.set_stream_handler(ECHO, echo)
            await b.connect(a.listen_addrs[0])
            for _ in range(15):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(cut_writer, a, b)
                        nursery.start_soon(cut_reader, a, b)
            assert len(swarm_of(b).get_connections(ID.from_base58(a.peer_id))) == 1
            stream = await b.open_stream(a.peer_id, ECHO)
            await stream.send_all(payload)
            await stream.send_eof()
            assert await read_all(stream) == payload
            await stream.aclose()


async def test_64_mib_moves_bit_exact() -> None:
    """64 MiB over one stream arrives bit-exact (sha256), in 1 MiB writes."""
    data = os.urandom(64 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    result: list[tuple[int, str]] = []
    done = trio.Event()

    async def hasher(stream: Stream) -> None:
        sha, size = hashlib.sha256(), 0
        while chunk := await stream.receive_some():
            sha.update(chunk)
            size += len(chunk)
        result.append((size, sha.hexdigest()))
        done.set()

    view = memoryview(data)
    with trio.fail_after(50):
        async with hosts(2) as (a, b):
            a.set_stream_handler(SINK, hasher)
            await b.connect(a.listen_addrs[0])
            stream = await b.open_stream(a.peer_id, SINK)
            for offset in range(0, len(data), 1024 * 1024):
                await stream.send_all(view[offset : offset + 1024 * 1024])
            await stream.send_eof()
            await done.wait()
            assert result == [(len(data), digest)]
            await stream.aclose()


async def test_allowlist_refuses_other_peers_connections() -> None:
    """An allowlisted host accepts its friend and refuses a stranger's connection."""
    friend_key, stranger_key = create_new_key_pair(), create_new_key_pair()
    friend_id, stranger_id = (str(peer_id_of(k)) for k in (friend_key, stranger_key))
    sink = Sink()
    with trio.fail_after(20):
        async with (
            hosts(1, allowlist=frozenset({friend_id})) as (private,),
            open_host(friend_key, [LOOPBACK]) as friend,
            open_host(stranger_key, [LOOPBACK]) as stranger,
        ):
            private.set_stream_handler(SINK, sink)
            with pytest.raises(DialError):
                await stranger.connect(private.listen_addrs[0])
            assert stranger_id not in private.connected_peers()

            await friend.connect(private.listen_addrs[0])
            stream = await friend.open_stream(private.peer_id, SINK)
            await stream.send_all(b"hi")
            await stream.aclose()
            await sink.done.wait()
            assert sink.received == [(friend_id, b"hi")]


async def test_allowlist_refuses_streams_on_connections_we_dialed() -> None:
    """A stranger we dialed ourselves still cannot open a stream to us: no handler runs."""
    sink = Sink()
    with trio.fail_after(20):
        async with hosts(1, allowlist=frozenset()) as (private,), hosts(1) as (stranger,):
            private.set_stream_handler(SINK, sink)
            await private.connect(stranger.listen_addrs[0])
            with pytest.raises(StreamRefused):
                await stranger.open_stream(private.peer_id, SINK)
            assert sink.received == []


async def test_connect_retries_a_peer_that_failed_before() -> None:
    """Defect 8: after a failed dial the swarm refused to dial that peer for 60 s."""
    key_pair = create_new_key_pair()
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"
    with trio.fail_after(20):
        async with hosts(1) as (dialer,):
            with pytest.raises(DialError):
                await dialer.connect(f"{addr}/p2p/{peer_id_of(key_pair)}")
            async with open_host(key_pair, [addr]) as late:
                assert await dialer.connect(late.listen_addrs[0]) == late.peer_id


async def test_port_in_use_is_an_error() -> None:
    """Defect 9: the TCP listener sets SO_REUSEPORT, so a second node on a busy port
    "listened" and took half the connections; open_host refuses instead."""
    with trio.fail_after(10):
        async with hosts(1) as (first,):
            busy = first.listen_addrs[0].rsplit("/p2p/", 1)[0]
            with pytest.raises(OSError):
                async with open_host(create_new_key_pair(), [busy]):
                    pass


async def test_exit_closes_connections_within_two_seconds() -> None:
    """Leaving open_host closes all of its connections, quickly."""
    with trio.fail_after(20):
        async with hosts(4) as others:
            with trio.fail_after(2):
                async with open_host(create_new_key_pair(), [LOOPBACK]) as host:
                    for other in others:
                        await host.connect(other.listen_addrs[0])
                    assert len(host.connected_peers()) == 4
                    gone = host.peer_id
            with trio.fail_after(5):
                for other in others:
                    await other.wait_connected(gone, connected=False)


def test_libp2p_logs_reach_dmm_logger(caplog: pytest.LogCaptureFixture) -> None:
    """Defect 10: libp2p logged ordinary disconnects at ERROR into a non-propagating logger.

    They now reach "dmm.p2p" at DEBUG; a real error keeps its level.
    """
    caplog.set_level(logging.DEBUG, logger="dmm.p2p")
    configure_libp2p_logging()
    yamux_log = logging.getLogger("libp2p.stream_muxer.yamux.yamux")
    yamux_log.error("Error in handle_incoming for peer Qm: ClosedResourceError: ")
    yamux_log.error("Received GO_AWAY for peer Qm: Protocol error")
    graft = "GRAFT: ignoring request from Qm, back off until 1796056666"
    logging.getLogger("libp2p.pubsub.gossipsub").warning(graft)
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        (
            "dmm.p2p",
            logging.DEBUG,
            "libp2p.stream_muxer.yamux.yamux: "
            "Error in handle_incoming for peer Qm: ClosedResourceError: ",
        ),
        (
            "dmm.p2p",
            logging.ERROR,
            "libp2p.stream_muxer.yamux.yamux: Received GO_AWAY for peer Qm: Protocol error",
        ),
        ("dmm.p2p", logging.DEBUG, f"libp2p.pubsub.gossipsub: {graft}"),
    ]
    caplog.set_level(logging.WARNING, logger="dmm.p2p")
    configure_libp2p_logging()
    assert logging.getLogger("libp2p").level == logging.WARNING


# --- Kademlia DHT (defects 12-19) ---------------------------------------------------


class Newest(Validator):
    """Values are decimal numbers; the largest wins."""

    def validate(self, key: str, value: bytes) -> None:
        if not value.isdigit():
            raise ValueError(f"{value!r} is not a number")

    def select(self, key: str, values: list[bytes]) -> int:
        return max(range(len(values)), key=lambda i: int(values[i]))


def multihash(text: str) -> bytes:
    return b"\x12\x20" + hashlib.sha256(text.encode()).digest()


KadNode = tuple[P2PHost, KadDht]


@asynccontextmanager
async def kad_nodes(
    count: int, namespaces: tuple[str, ...] = ("t",)
) -> AsyncIterator[list[KadNode]]:
    """`count` hosts running `KadDht`, alone."""
    async with hosts(count) as all_hosts, AsyncExitStack() as stack:
        nodes = [(host, KadDht(host, {ns: Newest() for ns in namespaces})) for host in all_hosts]
        for _, dht in nodes:
            await stack.enter_async_context(background_trio_service(dht))
        await trio.testing.wait_all_tasks_blocked()
        yield nodes


async def kad_link(a: KadNode, b: KadNode) -> None:
    await a[0].connect(b[0].listen_addrs[0])
    await b[0].connect(a[0].listen_addrs[0])
    assert await a[1].add_peer(b[1].local_peer_id)
    assert await b[1].add_peer(a[1].local_peer_id)


async def test_dht_speaks_its_own_protocol_id() -> None:
    """Defect 12: KadDHT speaks /ipfs/kad/1.0.0 whatever protocol_prefix says."""
    with trio.fail_after(10):
        async with kad_nodes(1) as [(host, _)], hosts(1) as (other,):
            await other.connect(host.listen_addrs[0])
            with pytest.raises(StreamRefused):
                await other.open_stream(host.peer_id, LIBRARY_KAD_PROTOCOL_ID)
            stream = await other.open_stream(host.peer_id, KAD_PROTOCOL_ID)
            await stream.aclose()


async def test_dht_stores_only_registered_namespaces() -> None:
    """Defect 13: without strict validation any namespace was stored, and pk/ipns always."""
    with trio.fail_after(15):
        async with kad_nodes(1, ("t", "other")) as [rogue], kad_nodes(1) as [honest]:
            await kad_link(rogue, honest)
            for key in ("/pk/x", "/ipns/x", "/other/x", "plain"):
                with pytest.raises(InvalidRecordType):
                    await honest[1].put_value(key, b"1")
            await rogue[1].put_value("/other/x", b"1")
            await rogue[1].put_value("/t/x", b"1")
            assert honest[1].value_store.get(b"/other/x") is None
            assert honest[1].value_store.get(b"/t/x") is not None


async def test_find_providers_asks_the_network_and_lists_each_peer_once() -> None:
    """Defect 14: find_providers listed a provider once per peer that named it, and once
    the local store knew any provider it never asked the network again."""
    key = multihash("/dmm/model/x")
    with trio.fail_after(20):
        async with kad_nodes(4) as (provider, holder, finder, late):
            await kad_link(provider, holder)
            assert await provider[1].provide_key(key)
            await late[1].provide_key(key)  # alone: only in its own store
            await kad_link(finder, provider)
            await kad_link(finder, holder)
            library = await finder[1].provider_store.find_providers(key)
            assert [info.peer_id for info in library] == [provider[1].local_peer_id] * 2

            await kad_link(finder, late)
            library = await finder[1].provider_store.find_providers(key)
            assert [info.peer_id for info in library] == [provider[1].local_peer_id]
            found = await finder[1].find_providers_of(key)
            assert {info.peer_id for info in found} == {
                provider[1].local_peer_id,
                late[1].local_peer_id,
            }
            assert len(found) == 2


async def test_each_provider_is_handed_over_while_the_lookup_still_waits_on_others() -> None:
    """A find asks each holder the moment it is found: a peer that never answers must
    hold back the end of the walk, not the providers already found."""
    key = multihash("/dmm/model/x")
    handed: list[str] = []
    first = trio.Event()
    returned = trio.Event()

    def on_found(info: PeerInfo) -> None:
        handed.append(str(info.peer_id))
        first.set()

    async def never_answer(stream: Stream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with kad_nodes(3) as (provider, holder, finder), hosts(1) as (stalled,):
            stalled.set_stream_handler(KAD_PROTOCOL_ID, never_answer)
            await kad_link(provider, holder)
            assert await provider[1].provide_key(key)
            await kad_link(finder, holder)
            await finder[0].connect(stalled.listen_addrs[0])
            async with trio.open_nursery() as nursery:

                async def find() -> None:
                    await finder[1].find_providers_of(key, on_found=on_found)
                    returned.set()

                nursery.start_soon(find)
                await first.wait()
                assert handed == [str(provider[1].local_peer_id)]
                assert not returned.is_set()  # still waiting on the stalled peer
                nursery.cancel_scope.cancel()


async def test_get_newest_value_asks_the_network() -> None:
    """Defect 15: get_value returned any local value without asking anyone."""
    with trio.fail_after(15):
        async with kad_nodes(2) as (old, new):
            await old[1].put_value("/t/x", b"1")
            await new[1].put_value("/t/x", b"2")
            await kad_link(old, new)
            assert await old[1].get_value("/t/x") == b"1"
            assert await old[1].get_newest_value("/t/x") == b"2"
            assert old[1].value_store.get(b"/t/x").value == b"2"  # type: ignore[union-attr]
            assert await old[1].get_newest_value("/t/missing") is None


async def test_many_provides_from_one_peer_are_all_kept() -> None:
    """Defect 16: a receiver silently dropped ADD_PROVIDER past 10 per peer per 10 s."""
    keys = [multihash(f"/dmm/model/m{i}") for i in range(40)]
    with trio.fail_after(30):
        async with kad_nodes(3) as (sender, ours, stock):
            stock[1]._provider_rate_max = 10  # the library's default
            await kad_link(sender, ours)
            await kad_link(sender, stock)
            handled = trio.Event()
            seen: list[ID] = []
            check = ours[1]._check_provider_rate_limit

            def counting_check(peer_id: ID) -> bool:
                seen.append(peer_id)
                if len(seen) == len(keys):
                    handled.set()
                return check(peer_id)

            ours[1]._check_provider_rate_limit = counting_check  # type: ignore[method-assign]
            for key in keys:
                assert await sender[1].provide_key(key)
            await handled.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert len(keys) <= KAD_ADD_PROVIDER_LIMIT
            kept = [k for k in keys if ours[1].provider_store.get_providers(k)]
            dropped = [k for k in keys if not stock[1].provider_store.get_providers(k)]
            assert len(kept) == len(keys)
            assert len(dropped) == len(keys) - 10


async def test_provide_key_leaves_reproviding_to_the_caller() -> None:
    """Defect 17: the library re-provided every key ever provided, with no way to stop."""
    key = multihash("/dmm/model/x")
    with trio.fail_after(10):
        async with kad_nodes(2) as (a, b):
            await kad_link(a, b)
            await a[1].provide(key.hex())  # the library's own call
            assert a[1].provider_store.providing_keys == {key}
            a[1].provider_store.providing_keys.clear()
            assert await a[1].provide_key(key)
            assert a[1].provider_store.providing_keys == set()
            assert [p.peer_id for p in a[1].provider_store.get_providers(key)] == [
                a[1].local_peer_id
            ]
            a[1].stop_providing(key)
            assert a[1].provider_store.get_providers(key) == []
            assert await b[1].find_providers_of(key) != []  # peers keep theirs until expiry


async def test_a_provider_record_is_stored_at_the_closest_peers_that_answer() -> None:
    """Defect 29: the library's provide walked with its own closest-peer lookup and sent
    three ADD_PROVIDERs at a time, each allowed 10 s; on a busy node the record went to
    far peers, or nowhere. Ours goes to exactly the BUCKET_SIZE closest peers that
    answer: one that does not gives its place to the next."""
    key = multihash("/dmm/model/closest")
    with trio.fail_after(60):
        async with kad_nodes(BUCKET_SIZE + 3) as nodes:
            provider, *others = nodes
            for node in others:
                await kad_link(provider, node)
            ids = [dht.local_peer_id for _, dht in others]
            # The closest peer's DHT stops answering: still connected, still in the table.
            gone = next(
                n for n in others if n[1].local_peer_id == sort_peer_ids_by_distance(key, ids)[0]
            )
            gone[0].host.remove_stream_handler(TProtocol(KAD_PROTOCOL_ID))
            others.remove(gone)
            assert len(others) == BUCKET_SIZE + 1
            arrived = trio.Event()
            received: list[ID] = []
            for _, dht in others:

                def counting(peer_id: ID, dht: KadDht = dht) -> bool:
                    received.append(dht.local_peer_id)
                    if len(received) == BUCKET_SIZE:
                        arrived.set()
                    return True

                dht._check_provider_rate_limit = counting  # type: ignore[method-assign]
            assert await provider[1].provide_key(key)
            await arrived.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            live = [dht.local_peer_id for _, dht in others]
            closest = sort_peer_ids_by_distance(key, live)[:BUCKET_SIZE]
            holders = [pid for pid, (_, dht) in zip(live, others, strict=True)
                       if dht.provider_store.get_providers(key)]  # fmt: skip
            assert len(received) == BUCKET_SIZE
            assert set(received) == set(holders) == set(closest)


async def test_long_value_keys_reach_the_closest_peers() -> None:
    """Defects 18 and 19: FIND_NODE refused keys over 50 bytes that are not multihashes,
    so a put never left the local routing table; GET_VALUE refuses keys over 128 bytes."""
    key = "/t/" + "k" * 60
    with trio.fail_after(20):
        async with kad_nodes(3) as (a, b, c):
            await kad_link(a, b)
            await kad_link(b, c)
            closest = await a[1].peer_routing.find_closest_peers_network(key.encode())
            assert c[1].local_peer_id not in closest
            await a[1].put_value(key, b"7")
            assert c[1].value_store.get(key.encode()) is not None
            with pytest.raises(ValueError, match="at most 128"):
                await a[1].put_value("/t/" + "k" * 126, b"1")
            with pytest.raises(ValueError, match="at most 128"):
                await a[1].get_newest_value("/t/" + "k" * 126)
            with pytest.raises(ValueError, match=r"1\.\.80"):
                await a[1].provide_key(b"k" * 81)


async def test_idle_dht_streams_of_other_peers_do_not_turn_a_lookup_away() -> None:
    """Defect 26: a node served 12 DHT streams at once, counting ones open but idle, and
    reset the rest; the asker dropped it from its table and learned no one through it.
    One peer still holds at most KAD_INBOUND_STREAMS_PER_PEER."""
    with trio.fail_after(30):
        async with kad_nodes(3) as (server, third, asker), hosts(2) as hogs:
            await kad_link(server, third)
            held: list[Stream] = []
            for hog in hogs:
                await hog.connect(server[0].listen_addrs[0])
                for _ in range(10):
                    held.append(await hog.open_stream(server[0].peer_id, KAD_PROTOCOL_ID))
            await trio.testing.wait_all_tasks_blocked()
            await kad_link(asker, server)
            target = third[1].local_peer_id
            closest = await asker[1].peer_routing.find_closest_peers_network(target.to_bytes())
            assert target in closest
            assert server[1].local_peer_id in asker[1].routing_table.get_peer_ids()

            for _ in range(KAD_INBOUND_STREAMS_PER_PEER - 10):
                held.append(await hogs[0].open_stream(server[0].peer_id, KAD_PROTOCOL_ID))
            # The reset may land while the stream is still being negotiated.
            with pytest.raises((StreamRefused, trio.BrokenResourceError)):
                extra = await hogs[0].open_stream(server[0].peer_id, KAD_PROTOCOL_ID)
                await extra.receive_some()
            for stream in held:
                await stream.aclose()


async def test_dht_requests_reuse_a_stream_per_peer_and_stay_in_step() -> None:
    """Defect 28: every DHT request opened, negotiated and closed a stream of its own. Kept
    streams serve the next requests, and the ADD_PROVIDER echoes the library never read do
    not answer a later lookup in place of its own answer."""
    keys = [multihash(f"/dmm/model/r{i}") for i in range(6)]
    theirs = multihash("/dmm/model/theirs")
    with trio.fail_after(30):
        async with kad_nodes(3) as (provider, server, finder):
            await kad_link(provider, server)
            await kad_link(finder, server)
            for key in keys:  # a walk and an ADD_PROVIDER each, echoes left unread
                assert await provider[1].provide_key(key)
            assert await finder[1].provide_key(theirs)
            # The provider's kept stream to the server owes 6 echoes: read off first.
            found = await provider[1].find_providers_of(theirs)
            assert [info.peer_id for info in found] == [finder[1].local_peer_id]
            for key in keys:
                found = await finder[1].find_providers_of(key)
                assert [info.peer_id for info in found] == [provider[1].local_peer_id]
            for _, dht in (provider, finder):
                # Each talked to the server (and the finder to the provider) in turn.
                assert dht.streams.opened <= 2, dht.streams.opened
                assert dht.streams.reused >= 6
                assert dht.streams.idle_count(server[1].local_peer_id) >= 1


async def test_concurrent_dht_requests_to_a_peer_share_its_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect 28: a burst of requests to one peer (a pull's 8 provides at once) opened a
    stream each; they now take turns on KAD_POOL_PER_PEER of them."""
    monkeypatch.setattr("node.p2p.KAD_LEASE_WAIT", 60.0)  # no fallback on a slow machine
    keys = [multihash(f"/dmm/model/c{i}") for i in range(10)]
    with trio.fail_after(60):
        async with kad_nodes(3) as (provider, server, finder):
            await kad_link(provider, server)
            await kad_link(finder, server)
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(provider[1].provide_key, key)
            # Two peers (the walks find the finder through the server), each asked a
            # FIND_NODE and sent an ADD_PROVIDER per key: 40 streams, one per request.
            assert provider[1].streams.opened <= 2 * KAD_POOL_PER_PEER
            found = [await finder[1].find_providers_of(key) for key in keys]
            assert all([i.peer_id for i in f] == [provider[1].local_peer_id] for f in found)


async def test_an_asker_missing_from_the_table_is_added_on_its_next_request() -> None:
    """Defect 28: the server adds an asker to its table as a stream starts, which fails
    until identify has given it the asker's addresses; with one stream per request the
    next request retried, on a kept stream none did, and a swarm of 16 nodes started
    together kept tables of one peer. (Here the asker is taken out of the table after
    its first request, as if that add had failed.)"""
    with trio.fail_after(30):
        async with kad_nodes(2) as (server, asker):
            await asker[0].connect(server[0].listen_addrs[0])
            assert await asker[1].add_peer(server[1].local_peer_id)
            await trio.testing.wait_all_tasks_blocked()
            table = server[1].routing_table
            await asker[1].peer_routing.find_closest_peers_network(multihash("/dmm/model/a"))
            assert table.peer_in_table(asker[1].local_peer_id)
            table.remove_peer(asker[1].local_peer_id)
            await asker[1].peer_routing.find_closest_peers_network(multihash("/dmm/model/b"))
            assert asker[1].streams.opened == 1  # the same stream carried both
            assert table.peer_in_table(asker[1].local_peer_id)


async def test_kept_dht_streams_end_with_their_connection_and_when_idle() -> None:
    """A kept stream whose connection closed is not used again, and kept streams are
    closed once idle, giving back their slots at the peer's DHT server."""
    key = multihash("/dmm/model/k")
    with trio.fail_after(30):
        async with kad_nodes(3) as (provider, server, finder):
            await kad_link(provider, server)
            await kad_link(finder, server)
            assert await provider[1].provide_key(key)
            assert [i.peer_id for i in await finder[1].find_providers_of(key)] == [
                provider[1].local_peer_id
            ]
            pool = finder[1].streams
            assert pool.idle_count(server[1].local_peer_id) == 1
            await finder[0].disconnect(server[0].peer_id)
            await kad_link(finder, server)
            opened = pool.opened
            assert [i.peer_id for i in await finder[1].find_providers_of(key)] == [
                provider[1].local_peer_id
            ]
            assert pool.opened > opened  # a new stream: the kept one died with its connection

            assert await pool.close_idle(older_than=0) >= 1
            assert pool.idle_count() == 0
            await trio.testing.wait_all_tasks_blocked()
            assert finder[1].local_peer_id not in server[1]._inbound_streams


async def test_an_answer_its_asker_stopped_waiting_for_is_dropped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect 31: the write of an answer whose asker had closed its stream was logged as
    "Failed to parse protobuf message: " at WARNING (4,861 times in one benchmark run).
    The answer here is larger than a Yamux window, so the server is mid-write when the
    asker resets; the server then goes on serving that peer."""
    caplog.set_level(logging.WARNING, logger="dmm.p2p")
    big = b"7" * (3 * MAX_WINDOW_SIZE)
    with trio.fail_after(20):
        async with kad_nodes(2) as (asker, server):
            await kad_link(asker, server)
            server[1].value_store.put(b"/t/big", big)
            server[1].value_store.put(b"/t/small", b"8")
            stream = await asker[0].open_stream(server[0].peer_id, KAD_PROTOCOL_ID)
            request = Message(type=Message.MessageType.GET_VALUE, key=b"/t/big")
            await stream.send_all(encode_varint_prefixed(request.SerializeToString()))
            await stream.flush()
            # The server's write waits for window the asker never gives: it stopped waiting.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            await stream.net_stream.reset()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert await asker[1].get_newest_value("/t/small") == b"8"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


async def test_the_dht_leaves_refreshing_and_republishing_to_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect 32: the library's maintenance loop refreshed the routing table and put our
    values again on its own schedule, besides the node's. Here its period is cut to 10 ms:
    three rounds of expiry must pass without a refresh or a republish."""
    monkeypatch.setattr(p2p, "KAD_EXPIRY_INTERVAL", 0.01)
    monkeypatch.setattr(libp2p.kad_dht.kad_dht, "ROUTING_TABLE_REFRESH_INTERVAL", 0.01)
    with trio.fail_after(20):
        async with hosts(2) as (a, b):
            dhts = [KadDht(host, {"t": Newest()}) for host in (a, b)]
            dht = dhts[0]
            refreshes: list[bytes] = []
            expiries = 0
            expired_thrice = trio.Event()

            async def refresh() -> None:
                refreshes.append(b"")

            def cleanup_expired() -> int:
                nonlocal expiries
                expiries += 1
                if expiries == 3:
                    expired_thrice.set()
                return 0

            async def republish(*args: Any) -> None:
                refreshes.append(b"republish")

            monkeypatch.setattr(dht.peer_routing, "refresh_routing_table", refresh)
            monkeypatch.setattr(dht.provider_store, "cleanup_expired", cleanup_expired)
            monkeypatch.setattr(dht.value_store, "_republish_records", republish)
            async with AsyncExitStack() as stack:
                for each in dhts:
                    await stack.enter_async_context(background_trio_service(each))
                await kad_link((a, dhts[0]), (b, dhts[1]))
                await dht.put_value("/t/v", b"1")
                await expired_thrice.wait()
            assert refreshes == []


def test_a_verified_peer_record_is_not_verified_again() -> None:
    """Defect 33: the same signed peer records, checked again in every DHT answer and
    gossip RPC, cost a quarter of a DHT query's CPU. A record that does not verify is
    refused every time, and the oldest records are forgotten past the limit."""
    records = p2p._VerifiedRecords(2)
    envelopes = []
    for _ in range(3):
        keys = create_new_key_pair()
        record = PeerRecord(ID.from_pubkey(keys.public_key), [Multiaddr(LOOPBACK)])
        envelopes.append(seal_record(record, keys.private_key).marshal_envelope())
    first = records(envelopes[0], PEER_RECORD_DOMAIN)
    assert records(envelopes[0], PEER_RECORD_DOMAIN) is first
    assert (records.hits, records.misses) == (1, 1)

    forged = bytearray(envelopes[0])
    forged[-1] ^= 1
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - the library raises what it likes
            records(bytes(forged), PEER_RECORD_DOMAIN)
    with pytest.raises(Exception):  # noqa: B017 - the same bytes under another domain
        records(envelopes[0], "another-domain")

    records(envelopes[1], PEER_RECORD_DOMAIN)
    records(envelopes[2], PEER_RECORD_DOMAIN)  # the oldest, envelopes[0], goes
    assert records(envelopes[0], PEER_RECORD_DOMAIN) is not first
    assert records.hits == 1


async def test_dht_answers_check_each_peers_record_once() -> None:
    """Defect 33 in place: a second FIND_NODE naming the same peers checks no record."""
    with trio.fail_after(30):
        async with kad_nodes(3) as (asker, server, other):
            await kad_link(asker, server)
            await kad_link(other, server)
            key = multihash("/dmm/model/r")
            assert await asker[1].peer_routing._query_peer_for_closest(server[1].local_peer_id, key)
            misses = p2p.verified_records.misses
            hits = p2p.verified_records.hits
            assert await asker[1].peer_routing._query_peer_for_closest(server[1].local_peer_id, key)
            assert p2p.verified_records.misses == misses
            assert p2p.verified_records.hits >= hits + 2  # the server's own, and other's


def key_at(own: bytes, prefix_length: int) -> bytes:
    """A key sharing exactly `prefix_length` leading bits with `own`."""
    value = int.from_bytes(own, "big") ^ (1 << (255 - prefix_length))
    value ^= int.from_bytes(os.urandom(32), "big") >> (prefix_length + 1)
    return value.to_bytes(32, "big")


def test_a_refresh_looks_up_only_the_prefix_lengths_it_lacks_peers_of() -> None:
    """Defect 34: the library's refresh looked up a key per bucket (7-15 lookups at 100
    nodes). After the self lookup, the BUCKET_SIZE closest peers are known, and so is
    every prefix length from the farthest of theirs on; a shorter one is looked up only
    while the table holds fewer than BUCKET_SIZE of its peers."""
    own = os.urandom(32)
    assert all(shared_prefix_len(own, key_at(own, n)) == n for n in range(40))
    # A 200-node network as a table holds it: prefix length 0 full, 1 and 2 thin,
    # 3 and beyond (the 20 closest are at 4 and beyond, and 3) known from the lookup.
    table = [
        key_at(own, n)
        for n, count in {0: 60, 1: 19, 2: 5, 3: 9, 4: 6, 5: 5, 6: 3}.items()
        for _ in range(count)
    ]
    assert prefix_lengths_to_refresh(own, table) == [1, 2]
    assert prefix_lengths_to_refresh(own, table[:19]) == []  # a table under a bucket
    # No prefix length past the limit, however close the peers.
    deep = [key_at(own, 30) for _ in range(BUCKET_SIZE)]
    assert prefix_lengths_to_refresh(own, deep) == list(range(p2p.KAD_REFRESH_MAX_PREFIX_LENGTH))


def test_a_refresh_target_hashes_into_its_prefix_length() -> None:
    """The DHT hashes a lookup's target: the library's refresh keys, drawn from each
    bucket's range of hashes, landed anywhere once hashed again."""
    own = os.urandom(32)
    for prefix_length in range(8):
        target = random_key_at_prefix_length(own, prefix_length)
        assert shared_prefix_len(own, hashlib.sha256(target).digest()) == prefix_length
    with pytest.raises(ValueError):
        random_key_at_prefix_length(own, p2p.KAD_REFRESH_MAX_PREFIX_LENGTH + 1)


async def test_a_refresh_in_a_small_network_is_one_lookup_that_finds_everyone() -> None:
    """Under BUCKET_SIZE peers, the self lookup finds them all, and nothing else is looked
    up: the library's refresh walked once more for each of its buckets."""
    with trio.fail_after(30):
        async with kad_nodes(6) as nodes:
            hub, *rest = nodes
            for node in rest:
                await kad_link(node, hub)
            newcomer = rest[0][1]
            with trace_walks() as walks:
                await newcomer.refresh_routing_table()
            assert len(walks) == 1
            assert set(newcomer.routing_table.get_peer_ids()) == {
                dht.local_peer_id for _, dht in nodes if dht is not newcomer
            }


def test_dht_stream_ends_are_not_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """Defect 18: every DHT stream its peer closed was logged at WARNING."""
    caplog.set_level(logging.DEBUG, logger="dmm.p2p")
    configure_libp2p_logging()
    kad_log = logging.getLogger("libp2p.kad_dht.kad_dht")
    kad_log.warning("Failed to read DHT message from stream: ")
    kad_log.warning("Failed to read DHT message from stream: unexpected frame")
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.WARNING]
    caplog.set_level(logging.WARNING, logger="dmm.p2p")
    configure_libp2p_logging()
