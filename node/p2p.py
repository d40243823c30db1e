"""The libp2p host dmm runs on, and the one place that works around py-libp2p 0.8.1.

`open_host` starts a TCP host that speaks Noise and Yamux only and yields a `P2PHost`.
Streams reach dmm code as `Stream`, a trio `HalfCloseableStream`: EOF is `b""`, peer and
network failures are `trio.BrokenResourceError` (library error in ``__cause__``), use after
our own close is `trio.ClosedResourceError`, and small writes are coalesced.

Library defects handled here, each pinned by a test in ``tests/test_p2p.py``:

1. ``new_host`` offers and accepts ``/plaintext/2.0.0`` (plus TLS and secio) by default:
   we build the upgrader with Noise as the only security transport.
2. ``Swarm.dial_peer`` races a second address after 250 ms unless it already holds
   ``max_connections_per_peer`` connections, so every dial waits 250 ms at the default of
   3: ``ConnectionConfig(max_connections_per_peer=1)``.
3. ``Swarm._handle_inbound_connection`` takes a slot of ``_inbound_limiter`` (capacity
   ``max_connections - min_connections`` = 284) and its inner handler then waits for the
   *swarm* to finish, not the connection, so the slot is only returned at shutdown and
   the 251st inbound connection ever is refused: `_Swarm` returns it when the connection
   closes.
4. ``YamuxStream.write`` gives up with ``MuxedStreamError`` ("Timed out waiting for
   window update after 5 seconds") when the send window stays empty for 5 s, which
   ``NetStream`` turns into a stream reset: any reader that pauses 5 s kills the stream.
   `_YamuxStream.write` waits for the window as long as it takes (trio style: the caller
   sets deadlines) and is woken by the window update instead of polling every 10 ms.
5. ``NetStream.read`` raises ``StreamEOF`` at end of stream: `Stream.receive_some`
   returns ``b""``.
6. Each write becomes at least one Yamux frame and one Noise message, so small writes are
   slow: `Stream.send_all` buffers writes smaller than `COALESCE_BYTES`.
7. A Yamux frame of 65,536 bytes is one byte more than a Noise message carries (65,519
   plaintext bytes), so every full frame costs two Noise messages: our frames are at most
   `YAMUX_FRAME_BYTES` = 65,519 bytes, header included.
8. ``Swarm.dial_peer`` remembers a peer whose addresses all failed for 60 s and refuses to
   dial it again: an explicit `P2PHost.connect` forgets that first.
9. The TCP listener sets ``SO_REUSEPORT``, so a second node on a busy port listens
   happily and the kernel splits incoming connections between the two: `open_host`
   first checks that each fixed port is free.
10. py-libp2p logs ordinary churn at WARNING/ERROR into a logger with ``propagate=False``:
    `configure_libp2p_logging` routes it into ``dmm.p2p`` at sensible levels.
11. A stream the peer reset, or one cut off by closing its connection, reads as a clean
    end of stream once Yamux drops its bookkeeping, or when a read runs between a
    GO_AWAY's two steps (the connection marked shutting down, then its streams reset),
    so truncated data looks complete: `_YamuxStream.read` and `_Yamux.close` make those
    a reset. Only the peer's FIN ends a stream cleanly.

The Kademlia DHT (`KadDht`, a ``KadDHT`` with these handled):

12. ``KadDHT(protocol_prefix=...)`` is ignored: ``/ipfs/kad/1.0.0`` is imported by value
    in five modules, so every node would join (and answer) the IPFS DHT. `KadDht` sees
    the host through `_KadHost`, which renames it to `KAD_PROTOCOL_ID`.
13. ``put_value`` and inbound ``PUT_VALUE`` accept keys of any unregistered namespace
    unless ``strict_validation=True``, and the default validators also take ``/pk/`` and
    ``/ipns/`` records: `KadDht` is strict and knows only the validators it is given.
14. ``find_providers`` answers from the local store alone whenever it holds any record
    for the key, so a node that once saw one provider never learns of new ones for
    48 hours, and it lists a provider once per peer that named it:
    `KadDht.find_providers_of` always asks the network and lists each peer once.
15. ``get_value`` likewise returns a local value without asking anyone, however old:
    `KadDht.get_newest_value` asks the network and keeps the validator's choice.
16. ``ADD_PROVIDER`` is fire-and-forget and a receiver silently drops more than 10 per
    peer per 10 s, so a node providing its store loses most records: `KadDht` accepts
    `KAD_ADD_PROVIDER_LIMIT` per window; senders pace themselves below it.
17. ``provide`` adds the key to a set the library re-provides every 22 hours forever,
    with no way to stop: `KadDht.provide_key` leaves re-providing to the caller and
    `KadDht.stop_providing` withdraws our own record.
18. Keys are capped by the receiver: ``ADD_PROVIDER`` keys at 80 bytes
    (`KAD_MAX_PROVIDER_KEY_BYTES`), ``GET_VALUE`` keys at 128 (`KAD_MAX_VALUE_KEY_BYTES`);
    a longer value key can be stored but never fetched, so `KadDht` refuses it.
    Every DHT stream the peer closes is logged at WARNING (defect 10 covers it).
19. The ``FIND_NODE`` handler refuses a key that is neither a multihash nor at most 50
    bytes, so the library's closest-peer lookup for a longer text key (every
    ``/dmm/version/`` key) never leaves the local routing table: `KadDht` walks values
    with ``GET_VALUE``, whose answers name closer peers (and their addresses) too.
    ``GET_PROVIDERS`` answers drop the closer peers' addresses, so a provider lookup
    (multihash keys, fine for ``FIND_NODE``) that is named peers it cannot dial finds
    the closest peers first and walks again from them.

Found later, in Yamux over Noise:

20. A frame write cancelled after Noise encrypted it (``SocketStream.send_all`` checks
    for cancellation before its first byte) or midway skips a nonce or leaves half a
    message on the wire: the peer fails to decrypt everything after it and the whole
    connection dies. Readers write too (window updates), so cancelling a read was enough.
    `_write_whole_frame` lets cancellation in only before a frame's write begins.
21. The swarm's auto-connector dials peers from the peerstore until it holds the midpoint
    of the low and high watermarks (100 and 300 by default: 200 connections), so every
    node of a swarm under 200 connects to every other. Each connection pings and sweeps
    every 30 s at both ends; 100 nodes in one process spent most of a core on that. With
    a lower target it fought the pruner instead: nodes pruned down to the low watermark
    dialed back up to the target, and a 200-node swarm spent its core on handshakes.
    go-libp2p has no such dialer (its connection manager only trims), and a dmm node
    dials when it has work (lookups, fetches) and when it is short of peers
    (node/bootstrap.py): `_Swarm` runs no auto-connector, and idle connections above
    the high watermark (64) are pruned down to the low one (48); ones carrying streams
    other than pubsub's never are (defect 35).
22. Yamux pings every connection every 30 s, from both ends, to estimate an RTT nothing
    reads: at 100 nodes in one process, sending and answering those pings took ~40 % of
    the core. `_Yamux` sends none (it still answers a peer's).
23. A pubsub stream that delivers a message while the pubsub service is stopping makes
    ``continuously_read_stream`` start a task in its closed nursery; the RuntimeError
    escapes the stream handler into the connection and out of ``open_host``, so a node
    stopping while gossip arrives crashed. `guard_pubsub_streams` ends such a stream.
24. ``BasicHost.get_addrs`` reads the address of every listener's socket, and
    ``TCPListener.close`` closes the sockets before it forgets them: an identify request
    answered while the host stops its listeners raised ``OSError`` (bad file descriptor)
    out of the stream handler and crashed the host. `P2PHost` takes the listeners out of
    the swarm's table before it closes them.
25. ``GossipSub.mesh_heartbeat`` prunes mesh peers over ``degree_high`` without a backoff
    on its own side, while the pruned peer keeps one; a later heartbeat short of
    ``degree_low`` grafts the same peer again within it, the peer takes that GRAFT for a
    flood and prunes back, and mesh links flap (the "GRAFT flood detected" warnings of
    every swarm over a dozen nodes). `DmmGossipSub` backs off from the peers it prunes.
26. ``KadDHT`` serves at most 12 inbound DHT streams at once and resets the rest, and a
    stream holds its slot until the asker closes it: after the asker has also checked
    the answer's signed records and added its peers to its table, seconds under load.
    So a node served about 3 lookups a second; a seed that 10 joining nodes asked at
    once reset most of them, each asker dropped the seed from its table for the
    "failure", and joined knowing no one else (median routing table 1 at 50 nodes).
    `KadDht` serves `KAD_INBOUND_STREAMS` at once and `KAD_INBOUND_STREAMS_PER_PEER`
    of any one peer: the cap bounds what one peer can hold, not the whole swarm's work.
27. ``Pubsub`` opens its stream to each newly connected peer, and retries while the peer
    stays connected, but only after a ``SwarmException``: when the stream is opened
    and its protocol negotiation fails (``StreamFailure``: the peer's pubsub has not
    started yet, or the answer took over 10 s on a busy node) it gives up on the peer
    for as long as the connection lasts. At 40 nodes in one process 70 % of connections
    ended up with no pubsub stream, so gossip reached far fewer peers than were
    connected. `DmmPubsub` retries those too.
28. Every DHT request opens a new stream, with its multistream negotiation (round trips,
    and CPU at both ends that a busy node spends on nothing else as much), and closes it
    after one answer, though the DHT server reads request after request from a stream.
    A pull that provides its 8 keys in a swarm of 16 sends each peer a ``FIND_NODE`` and
    an ``ADD_PROVIDER`` per key: 256 streams. `_KadHost` keeps a stream whose request was
    answered cleanly for the next request to that peer; requests to one peer take turns
    on `KAD_POOL_PER_PEER` streams, closed after `KAD_POOL_IDLE`. The server echoes an
    ``ADD_PROVIDER`` that the library's client never reads: the echo is read off before
    the stream serves another request.
29. ``provide`` finds its closest peers with ``find_closest_peers_network``, then sends
    the ``ADD_PROVIDER``s three at a time, each allowed ``QUERY_TIMEOUT`` (10 s). On a
    busy node that walk came back with far peers, and the sends to them timed out in
    turn: in a 50-node swarm that had just joined, a model's first provide took 59 s and
    stored its record nowhere, and a third of exact lookups then missed the holder.
    `KadDht.provide_key` walks as the provider lookup does and tells the closest peers
    that answered, all at once.
30. Reading a Yamux stream sends a window update for every read that returns data, not
    once half the window is consumed as go-yamux does: a connection's set-up (identify
    and two pubsub streams) sent 37 window updates against 16 data frames, each its
    own Noise message and wake-up at both ends; in one process, a connection cost about
    45 ms of CPU. `_YamuxStream` credits the window back only once half of it was read.
31. ``KadDHT``'s handler catches whatever a request's handling raises, the write of the
    answer included, and logs it as a warning: "Failed to parse protobuf message: "
    with an empty reason. The usual cause is an asker that stopped waiting (a walk that
    has its answers closes the rest), so the answer's write finds the stream closed: a
    full benchmark run logged 4,861 of them. `_ServedKadStream` drops an answer its
    asker will never read and ends the stream as a clean end of input.
32. ``KadDHT.run`` starts a maintenance loop that refreshes the routing table at start and
    every 10 minutes, and republishes the values put through it, besides whatever the
    application does: a dmm node's bootstrapper already refreshes on join and every 10
    minutes (node/bootstrap.py), and `Dht` re-puts and re-provides on its own schedule,
    so every node refreshed twice as often as it meant to, and every version record was
    put twice. A 100-node swarm in one process that idled at 10 % of a core spent all of
    it, for minutes, once the refreshes fell due. `KadDht`'s loop only expires records.
33. Every signed peer record that arrives is parsed and its Ed25519 signature checked,
    again each time: a ``FIND_NODE`` answer names 20 peers, each with its record, and
    every gossip RPC and identify answer carries its sender's, so the same few hundred
    records were verified over and over (a quarter of the CPU a DHT query cost, both
    ends counted). `_VerifiedRecords` remembers the records it has verified, by their
    exact bytes.
34. ``refresh_routing_table`` looks up our own key, then a random key for every
    non-empty bucket. Its buckets split on any full one, so their number grows with the
    table (80 peers make at least 4), and each bucket's key is hashed again by the
    lookup, so it lands anywhere but in its bucket: a refresh was a handful of random
    lookups. `KadDht`'s refresh looks up our key, then one key per prefix length it does
    not yet know enough peers of (`prefix_lengths_to_refresh`), as in Kademlia: a node
    joining a 100-node swarm sent 67 ``FIND_NODE`` requests against 98.
35. The connection pruner closes no connection that has a stream, and every connection
    carries pubsub's, so above the high watermark nothing was ever trimmed: every peer a
    DHT walk asked stayed connected, nodes of a 100-node swarm held 62-99 connections,
    and a 200-node swarm in one process ran out of open files. `_ConnectionTrimmer` trims
    as go-libp2p's connection manager does: above the high watermark, down to the low
    one, the connections whose only streams are pubsub's, past their grace period, and
    not to a peer the host is told to keep (`P2PHost.keep_peers`: the gossip mesh).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import logging
import math
import os
import re
import socket
import struct
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import libp2p.identity.update
import libp2p.kad_dht.utils
import libp2p.pubsub.gossipsub
import libp2p.pubsub.utils
import trio
from libp2p.abc import (
    IHost,
    IMuxedConn,
    INetConn,
    INetStream,
    INetwork,
    INotifee,
    IRawConnection,
    ISecureConn,
)
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol, TSecurityOptions
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.basic_host import BasicHost
from libp2p.host.exceptions import StreamFailure
from libp2p.io.abc import ReadWriteCloser
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE, DEFAULT_TTL, QUERY_TIMEOUT
from libp2p.kad_dht.common import PROTOCOL_ID as _LIBRARY_KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.kad_dht.provider_store import PROVIDER_RECORD_EXPIRATION_INTERVAL
from libp2p.kad_dht.routing_table import peer_id_to_key
from libp2p.kad_dht.utils import shared_prefix_len, sort_peer_ids_by_distance
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.connection_pruner import ConnectionPruner, is_connection_in_allow_list
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.envelope import Envelope, consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore, PeerStoreError
from libp2p.protocol_muxer.multiselect import DEFAULT_NEGOTIATE_TIMEOUT
from libp2p.pubsub.floodsub import PROTOCOL_ID as FLOODSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12 as GOSSIPSUB_V12
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr import new_resource_manager
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    GO_AWAY_NORMAL,
    HEADER_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader
from multiaddr import Multiaddr

from node.changes import Changes

__all__ = [
    "COALESCE_BYTES",
    "CONNECTION_CONFIG",
    "FRAME_WRITE_TIMEOUT",
    "KAD_ADD_PROVIDER_LIMIT",
    "KAD_ADD_PROVIDER_WINDOW",
    "KAD_MAX_PROVIDER_KEY_BYTES",
    "KAD_MAX_VALUE_KEY_BYTES",
    "KAD_PROTOCOL_ID",
    "KAD_PROVIDER_RECORD_TTL",
    "KAD_VALUE_RECORD_TTL",
    "NOISE_PROTOCOL_ID",
    "YAMUX_FRAME_BYTES",
    "YAMUX_PROTOCOL_ID",
    "ConnectionGate",
    "DialError",
    "DmmGossipSub",
    "DmmPubsub",
    "KadDht",
    "OnRefused",
    "P2PError",
    "P2PHost",
    "Stream",
    "StreamHandler",
    "StreamMeter",
    "StreamRefused",
    "configure_libp2p_logging",
    "guard_pubsub_streams",
    "open_host",
    "prefix_lengths_to_refresh",
    "random_key_at_prefix_length",
]

log = logging.getLogger("dmm.p2p")

# Defect 2: one connection per peer, so a dial returns as soon as it has one. Defect 21:
# idle connections above 64 are pruned to 48 (defect 35: "idle" whatever pubsub's
# streams), and nothing dials to make up a number.
# max_connections stays at the library's 300: with defect 3 it also sizes the inbound
# slots (max - min), and a bootstrap seed must take every newcomer's first connection.
CONNECTION_CONFIG = ConnectionConfig(
    max_connections_per_peer=1, min_connections=4, low_watermark=48, high_watermark=64
)

# Defect 20: a frame write that has begun may ignore cancellation for this long; past
# it the connection is taken for dead and closed.
FRAME_WRITE_TIMEOUT = 30.0

# Defect 7: the largest Noise plaintext, so a full Yamux frame is one Noise message.
YAMUX_FRAME_BYTES = 65_519
_FRAME_PAYLOAD = YAMUX_FRAME_BYTES - HEADER_SIZE

# Defect 6: `Stream.send_all` holds writes until this many bytes are pending.
COALESCE_BYTES = 256 * 1024

# `Stream.receive_some()` without a size reads up to this much.
DEFAULT_RECEIVE_BYTES = 1024 * 1024

# `open_host` gives its connections this long to close before the host is torn down.
_CLOSE_GRACE_SECONDS = 1.5


class P2PError(Exception):
    """A libp2p operation failed; the library's exception is in ``__cause__``."""


class DialError(P2PError):
    """The peer could not be reached, or refused the connection."""


class StreamRefused(P2PError):
    """The peer did not accept a stream for the protocol (unknown protocol or refused)."""


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a peer id: {peer_id!r}") from exc


# --- Yamux (defects 4, 7, 11 and 20) -----------------------------------------------


class _YamuxStream(YamuxStream):
    """A `YamuxStream` whose writer waits for the send window without a deadline.

    py-libp2p constructs ``YamuxStream`` by name, so `_Yamux` swaps this class onto each
    stream as it is handed out. ``send_window`` and ``closed`` become properties over the
    same instance attributes so that every change wakes a writer waiting for window.
    """

    @property
    def send_window(self) -> int:
        value: int = self.__dict__["send_window"]
        return value

    @send_window.setter
    def send_window(self, value: int) -> None:
        self.__dict__["send_window"] = value
        self._wake_writer()

    @property
    def closed(self) -> bool:
        value: bool = self.__dict__["closed"]
        return value

    @closed.setter
    def closed(self, value: bool) -> None:
        self.__dict__["closed"] = value
        self._wake_writer()

    def _wake_writer(self) -> None:
        event: trio.Event | None = self.__dict__.pop("_dmm_window_changed", None)
        if event is not None:
            event.set()

    async def _wait_window_changed(self) -> None:
        event: trio.Event | None = self.__dict__.get("_dmm_window_changed")
        if event is None:
            event = self.__dict__["_dmm_window_changed"] = trio.Event()
        await event.wait()

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        # Defect 30: go-yamux's rule alone. What was read since the last update counts
        # toward `delta` (bytes buffered but unread do not); below half the window the
        # sender still has at least half of it, so nothing is owed yet.
        if not self._credit_owed():
            return
        async with self.window_lock:
            if not self._credit_owed():
                return
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    def _credit_owed(self) -> bool:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        return self.target_recv_window - (self.recv_window + buffered) >= self._grow_threshold()

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        sent = 0
        while True:
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            if self.closed:
                raise MuxedStreamError("Stream is closed")
            if sent >= total:
                return
            window = self.send_window
            if window <= 0:
                # Defect 4: the library raises after 5 s here; a slow reader is not an error.
                await self._wait_window_changed()
                continue
            size = min(window, _FRAME_PAYLOAD, total - sent)
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
            frame = header + view[sent : sent + size]
            # Straight to the secured connection: `Yamux._write_frame` formats a debug
            # line for every frame, whatever the log level. The window is taken only
            # once the frame is sure to go (defect 20).
            await _write_whole_frame(self.conn, frame, self._take_window, size)
            sent += size

    def _take_window(self, size: int) -> None:
        self.send_window -= size

    async def read(self, n: int | None = -1) -> bytes:
        try:
            return await super().read(n)
        except MuxedStreamEOF:
            # Defect 11: once a reset stream's bookkeeping is dropped, the library reports
            # a clean end of stream; so does a read that finds its connection shutting
            # down before the streams are marked reset (a GO_AWAY is handled in two
            # steps). Only the peer's FIN, alone, ends a stream cleanly.
            if self.reset_received or not self.recv_closed:
                raise MuxedStreamReset("Stream was reset") from None
            raise


async def _write_whole_frame(
    conn: Yamux,
    frame: bytes,
    on_start: Callable[[int], None] | None = None,
    size: int = 0,
) -> None:
    """Write one Yamux frame to the secured connection: all of it, or none of it.

    Defect 20: Noise encrypts a frame with the next nonce and only then writes it, so a
    write cancelled after the encryption (even before its first byte) or midway leaves
    a skipped nonce or half a message on the wire, and the peer can never decrypt this
    connection again. Waiting for the lock can be cancelled (nothing is sent yet); once
    the lock is held, ``on_start(size)`` is called and the write ignores cancellation. A
    write stuck for `FRAME_WRITE_TIMEOUT` means a dead peer: the connection is closed.
    """
    async with conn._write_lock:
        if on_start is not None:
            on_start(size)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT
            await conn.secured_conn.write(frame)
    if scope.cancelled_caught:
        with trio.CancelScope(shield=True):
            try:
                await conn.secured_conn.close()
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                log.debug("closing a stuck connection: %r", exc)
        raise RawConnError(f"a frame write took over {FRAME_WRITE_TIMEOUT:g} s: connection closed")


class _Yamux(Yamux):
    """Yamux whose streams are `_YamuxStream`, whose close cuts streams off, whose frame
    writes are never cut off by cancellation, and which sends no RTT pings."""

    async def _measure_rtt_loop(self) -> None:
        # Defect 22: nothing reads the estimate; the ping costs every connection two
        # encrypted frames each way every 30 s. Pings from other peers are still answered.
        return

    async def _write_frame(self, data: bytes) -> None:
        # Defect 20. (Also skips the library's per-frame debug formatting.)
        await _write_whole_frame(self, data)
        await trio.lowlevel.checkpoint()

    async def close(self, error_code: int = GO_AWAY_NORMAL) -> None:
        # Defect 11: a stream still receiving when we close the connection reads as a
        # clean end of stream; mark it reset so the reader sees a truncation.
        for stream in list(self.streams.values()):
            if not stream.recv_closed:
                stream.reset_received = True
        await super().close(error_code)

    async def open_stream(self) -> YamuxStream:
        stream = await super().open_stream()
        stream.__class__ = _YamuxStream
        return stream

    async def accept_stream(self) -> YamuxStream:
        stream = await super().accept_stream()
        stream.__class__ = _YamuxStream
        return stream  # type: ignore[return-value]


class _MuxerMultistream(MuxerMultistream):
    """Builds the negotiated muxer from our options (the library hard-codes ``Yamux``)."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, muxer_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout
        )
        muxed_conn = muxer_class(conn, peer_id)
        return self._annotate_connection(muxed_conn, conn, protocol)


class _Upgrader(TransportUpgrader):
    def __init__(self, security: TSecurityOptions, muxers: TMuxerOptions) -> None:
        super().__init__(security, muxers)
        self.muxer_multistream = _MuxerMultistream(muxers, DEFAULT_NEGOTIATE_TIMEOUT)


# --- security and swarm (defects 1, 3, 8, allowlist) -------------------------------------


# Called with (peer id, "connect" or "stream", reason) for each refusal.
OnRefused = Callable[[str, str, str], None]
# Called with a peer id once its Noise handshake proves it: a reason to refuse, or None.
ConnectionGate = Callable[[str], str | None]


class _Noise(NoiseTransport):
    """Noise that refuses inbound connections from peers outside the allowlist, or that
    the gate refuses, as soon as the handshake proves who they are: before the muxer is
    negotiated, so no stream, and no protocol handler, ever exists for them."""

    def __init__(
        self,
        key_pair: KeyPair,
        allowlist: frozenset[str] | None,
        gate: ConnectionGate | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        super().__init__(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self._allowlist = allowlist
        self._gate = gate
        self._on_refused = on_refused

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        secure_conn = await super().secure_inbound(conn)
        peer = str(secure_conn.get_remote_peer())
        reason = None
        if self._allowlist is not None and peer not in self._allowlist:
            reason = "not in the allowlist"
        elif self._gate is not None:
            reason = self._gate(peer)
        if reason is not None:
            await secure_conn.close()
            if self._on_refused is not None:
                self._on_refused(peer, "connect", reason)
            raise HandshakeFailure(f"peer {peer} refused: {reason}")
        return secure_conn


class _NoAutoConnector(AutoConnector):
    """Defect 21: dials nobody to make up a connection count."""

    async def run_background_task(self, nursery: trio.Nursery) -> None:
        return

    async def maybe_connect(self) -> None:
        return


# Defect 35: streams that do not make a connection busy. Pubsub keeps one open each
# way on every connection for as long as it lasts.
_PUBSUB_PROTOCOLS = frozenset({GOSSIPSUB_V10, GOSSIPSUB_V11, GOSSIPSUB_V12, FLOODSUB_PROTOCOL_ID})


class _ConnectionTrimmer(ConnectionPruner):
    """Trims connections as go-libp2p's connection manager does (defect 35)."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__(swarm=swarm, allow_list=swarm.connection_config.allow_list)
        self.keep: Callable[[ID], bool] = lambda peer: False

    async def _maybe_prune_connections(self) -> None:
        swarm = self.swarm
        config = swarm.connection_config
        connections = swarm.get_connections()
        if len(connections) <= config.high_watermark:
            return
        idle = [c for c in connections if self._trimmable(c, config.grace_period)]
        # Least in use first, then the oldest.
        idle.sort(key=lambda c: (len(c.get_streams()), getattr(c, "_created_at", 0.0)))
        for connection in idle[: len(connections) - config.low_watermark]:
            log.debug("trimming the connection to %s", connection.muxed_conn.peer_id)
            with contextlib.suppress(Exception):  # the library raises what it likes
                await connection.close()

    def _trimmable(self, connection: INetConn, grace_period: float) -> bool:
        if self._is_connection_within_grace_period(connection, grace_period):
            return False
        if self.keep(connection.muxed_conn.peer_id):
            return False
        if is_connection_in_allow_list(connection, self.swarm):
            return False
        return all(
            str(stream.get_protocol()) in _PUBSUB_PROTOCOLS for stream in connection.get_streams()
        )


class _Swarm(Swarm):
    """The library's swarm with its inbound slot returned when a connection closes, no
    auto-connector, and `_ConnectionTrimmer` for its pruner."""

    def __init__(
        self,
        peer_id: ID,
        peerstore: PeerStore,
        upgrader: TransportUpgrader,
        *,
        allowlist: frozenset[str] | None,
        on_refused: OnRefused | None = None,
    ) -> None:
        super().__init__(
            peer_id, peerstore, upgrader, transports=[TCP()], connection_config=CONNECTION_CONFIG
        )
        self._allowlist = allowlist
        self._on_refused = on_refused
        self.auto_connector = _NoAutoConnector(
            swarm=self, auto_connect_interval=CONNECTION_CONFIG.auto_connect_interval
        )
        self.connection_pruner = _ConnectionTrimmer(self)

    async def _do_handle_inbound_connection(
        self, read_write_closer: ReadWriteCloser, maddr: Multiaddr, failure_event: Any
    ) -> None:
        # Our caller holds a slot of `_inbound_limiter` until we return. The library
        # returns when the swarm stops (defect 3); we return when the connection closes.
        remote = self._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await self.connection_gate.is_allowed(remote):
            await read_write_closer.close()
            return
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as exc:  # a stranger's bytes can make the handshake raise anything
            log.debug("inbound connection on %s failed: %r", maddr, exc)
            await raw_conn.close()
            return
        await cast(Yamux, muxed_conn).event_closed.wait()

    def set_stream_handler(self, stream_handler: Callable[[INetStream], Awaitable[None]]) -> None:
        allowlist = self._allowlist
        if allowlist is None:
            super().set_stream_handler(stream_handler)
            return

        async def gated(net_stream: INetStream) -> None:
            peer = str(net_stream.muxed_conn.peer_id)
            if peer not in allowlist:
                log.debug("refused a stream from %s: not in the allowlist", peer)
                if self._on_refused is not None:
                    self._on_refused(peer, "stream", "not in the allowlist")
                await net_stream.reset()
                return
            await stream_handler(net_stream)

        super().set_stream_handler(gated)

    def forget_dial_failure(self, peer_id: ID) -> None:
        """Let the next dial to `peer_id` try again at once (defect 8)."""
        self._negative_peer_cache.evict(str(peer_id))


def _build_host(
    key_pair: KeyPair,
    allowlist: frozenset[str] | None,
    gate: ConnectionGate | None = None,
    on_refused: OnRefused | None = None,
) -> BasicHost:
    peer_id = ID.from_pubkey(key_pair.public_key)
    peerstore = PeerStore()
    peerstore.add_key_pair(peer_id, key_pair)
    # Defect 1: Noise is the only security transport offered or accepted.
    security: TSecurityOptions = {NOISE_PROTOCOL_ID: _Noise(key_pair, allowlist, gate, on_refused)}
    muxers: TMuxerOptions = {TProtocol(YAMUX_PROTOCOL_ID): _Yamux}
    swarm = _Swarm(
        peer_id,
        peerstore,
        _Upgrader(security, muxers),
        allowlist=allowlist,
        on_refused=on_refused,
    )
    return BasicHost(network=swarm, resource_manager=new_resource_manager())


# --- streams (defects 5 and 6) --------------------------------------------------------


class StreamMeter(Protocol):
    """Byte accounting for every `Stream` of a host (rate limits): each may wait.

    ``on_receive`` is called for bytes already read: it must not let a cancellation
    through (shield its waits), or the caller would lose them."""

    async def on_send(self, peer: str, nbytes: int) -> None: ...

    async def on_receive(self, peer: str, nbytes: int) -> None: ...


class Stream(trio.abc.HalfCloseableStream):
    """A libp2p stream with trio stream semantics.

    - `receive_some` returns ``b""`` at end of stream.
    - `send_all` may hold data smaller than `COALESCE_BYTES` in a buffer. The buffer is
      written out by `flush`, `receive_some`, `send_eof` and `aclose`; call `flush` when the
      peer must see the data now without waiting for a reply.
    - A failure of the peer or the network raises `trio.BrokenResourceError` with the
      library's exception in ``__cause__``; use after `aclose` or `reset` raises
      `trio.ClosedResourceError`; overlapping calls of the same direction raise
      `trio.BusyResourceError`.
    """

    def __init__(self, net_stream: INetStream, meter: StreamMeter | None = None) -> None:
        self._net_stream = net_stream
        self._meter = meter
        self.peer_id = str(net_stream.muxed_conn.peer_id)
        self.protocol = str(net_stream.get_protocol() or "")
        self._buffer = bytearray()
        self._write_lock = trio.Lock()
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        self._closed = False

    @property
    def net_stream(self) -> INetStream:
        """The py-libp2p stream underneath, for library code that needs it."""
        return self._net_stream

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed:
            return trio.ClosedResourceError("stream was closed")
        return trio.BrokenResourceError(f"stream to {self.peer_id} failed: {exc!r}")

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._net_stream.write(data)  # type: ignore[arg-type]
        except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
            raise self._broken(exc) from exc

    async def _flush_locked(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            await self._write(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called")
            if self._meter is not None:
                await self._meter.on_send(self.peer_id, len(data))
            async with self._write_lock:
                self._check_open()
                if not self._buffer and len(data) >= COALESCE_BYTES:
                    await self._write(data)
                    return
                self._buffer += data
                if len(self._buffer) >= COALESCE_BYTES:
                    await self._flush_locked()
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def flush(self) -> None:
        """Write out whatever `send_all` is holding."""
        self._check_open()
        async with self._write_lock:
            self._check_open()
            await self._flush_locked()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            self._check_open()
            # A reply is usually awaited after a request: send what we hold first. When a
            # sender holds the lock it is writing the buffer already; waiting for it could
            # deadlock against a peer that writes before it reads.
            if self._buffer and not self._eof_sent and not self._write_lock.locked():
                await self.flush()
            try:
                data = await self._net_stream.read(max_bytes)
            except StreamEOF:
                return b""  # Defect 5: the library raises at end of stream.
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                raise self._broken(exc) from exc
            self._check_open()
            if self._meter is not None and data:
                await self._meter.on_receive(self.peer_id, len(data))
            return data
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Flush, then half-close: the peer reads ``b""``; we can still receive."""
        self._check_open()
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        async with self._write_lock:
            self._check_open()
            await self._flush_locked()
            self._eof_sent = True
            try:
                await cast(NetStream, self._net_stream).close_write()
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                raise self._broken(exc) from exc

    async def aclose(self) -> None:
        """Flush and close both directions. If data cannot be flushed, reset and raise."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._sending:
            # A send is blocked (on a full window): it cannot finish, so abort it.
            await self.reset()
            return
        try:
            async with self._write_lock:
                await self._flush_locked()
        except BaseException:
            await self.reset()
            raise
        self._closed = True
        try:
            await self._net_stream.close()
        except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
            # Nothing was pending, so nothing is lost: the connection is already gone.
            log.debug("closing a stream to %s: %r", self.peer_id, exc)

    async def reset(self) -> None:
        """Abort the stream in both directions, dropping unsent data."""
        self._closed = True
        self._buffer = bytearray()
        with trio.CancelScope(shield=True):
            try:
                await self._net_stream.reset()
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                log.debug("resetting a stream to %s: %r", self.peer_id, exc)


StreamHandler = Callable[[Stream], Awaitable[None]]


# --- the host -------------------------------------------------------------------------


class _ConnectionChanges(INotifee):
    """Notifies `changes` when a connection opens or closes (after the swarm's tables say so)."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.changes.notify()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.changes.notify()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class P2PHost:
    """A running libp2p host. `host` is the py-libp2p host for the DHT and pubsub.

    ``changes`` is notified whenever a connection opens or closes; the node notifies it of
    its own changes too (node/changes.py).
    """

    def __init__(self, host: BasicHost) -> None:
        self.host = host
        self._swarm: _Swarm = host.get_network()  # type: ignore[assignment]
        self.changes = Changes()
        self._swarm.register_notifee(_ConnectionChanges(self.changes))
        # Set by the node to rate-limit every dmm stream's bytes; None = unmetered.
        self.meter: StreamMeter | None = None

    def keep_peers(self, keep: Callable[[str], bool]) -> None:
        """Never trim the connection to a peer for which `keep(peer_id)` is true."""
        pruner = cast(_ConnectionTrimmer, self._swarm.connection_pruner)
        pruner.keep = lambda peer: keep(str(peer))

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs of our listeners, with the bound ports and ``/p2p/<id>``."""
        suffix = f"/p2p/{self.peer_id}"
        return [f"{addr}{suffix}" for addr in self.host.get_transport_addrs()]

    async def connect(self, multiaddr: str) -> str:
        """Connect to the peer at a ``.../p2p/<id>`` multiaddr; return its peer id."""
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except (ValueError, BaseLibp2pError) as exc:
            raise ValueError(f"not a /p2p/ multiaddr: {multiaddr!r}") from exc
        self._swarm.forget_dial_failure(info.peer_id)
        try:
            await self.host.connect(info)
        except (BaseLibp2pError, OSError) as exc:
            raise DialError(f"could not connect to {multiaddr}: {exc}") from exc
        return str(info.peer_id)

    async def connect_peer(self, peer_id: str) -> None:
        """Connect to a peer at the addresses the peerstore holds for it (a no-op when
        connected); raises ``DialError``."""
        peer = _parse_peer_id(peer_id)
        if self._swarm.get_connections(peer):
            return
        self._swarm.forget_dial_failure(peer)
        try:
            await self.host.connect(self.host.get_peerstore().peer_info(peer))
        except (BaseLibp2pError, OSError, KeyError) as exc:  # KeyError: unknown peer
            raise DialError(f"could not connect to {peer_id}: {exc}") from exc

    async def disconnect(self, peer_id: str) -> None:
        await self.host.disconnect(_parse_peer_id(peer_id))

    def connected_peers(self) -> list[str]:
        return [str(peer) for peer, conns in self._swarm.connections.items() if conns]

    async def wait_connected(self, peer_id: str, *, connected: bool = True) -> None:
        """Return once ``peer_id`` is connected (or, with ``connected=False``, is not)."""
        await self.changes.wait_until(lambda: self.is_connected(peer_id) == connected)

    def is_connected(self, peer_id: str) -> bool:
        try:
            peer = _parse_peer_id(peer_id)
        except ValueError:
            return False
        return bool(self._swarm.connections.get(peer))

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Run `handler` for each inbound stream of `protocol_id`.

        The stream is closed when the handler returns and reset when it raises. A handler
        that fails with `trio.BrokenResourceError` (the peer went away) is logged at DEBUG,
        any other exception at ERROR; neither reaches the connection.
        """

        async def run(net_stream: INetStream) -> None:
            stream = Stream(net_stream, self.meter)
            try:
                await handler(stream)
            except trio.BrokenResourceError as exc:
                log.debug("%s stream from %s broke: %s", protocol_id, stream.peer_id, exc)
                await stream.reset()
                return
            except Exception:
                log.exception("%s handler failed for %s", protocol_id, stream.peer_id)
                await stream.reset()
                return
            try:
                await stream.aclose()
            except trio.BrokenResourceError as exc:
                log.debug("%s stream from %s broke on close: %s", protocol_id, stream.peer_id, exc)

        self.host.set_stream_handler(TProtocol(protocol_id), run)

    async def open_stream(self, peer_id: str, protocol_id: str) -> Stream:
        """Open a stream, dialing the peer from the peerstore if not connected."""
        peer = _parse_peer_id(peer_id)
        await self.connect_peer(peer_id)
        try:
            net_stream = await self.host.new_stream(peer, [TProtocol(protocol_id)])
        except (BaseLibp2pError, OSError) as exc:
            raise StreamRefused(f"{peer_id} refused a {protocol_id} stream: {exc}") from exc
        return Stream(net_stream, self.meter)

    async def _close_connections(self) -> None:
        # Stop accepting first: a peer that dials in while we close would otherwise get a
        # connection nobody closes, and keep it until this process exits (the churn
        # soak's lingering connection). Cancelling the listener also ends upgrades under way.
        # Defect 24: out of the swarm's table before they close, so nobody reads their sockets.
        listeners = list(self._swarm.listeners.values())
        self._swarm.listeners.clear()
        for listener in listeners:
            try:
                await listener.close()
            except Exception as exc:  # the library raises what it likes; closing goes on
                log.debug("closing listener failed: %r", exc)
        for _ in range(_CLOSE_PASSES):
            peers = list(self._swarm.connections)
            if not peers:
                return
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self.host.disconnect, peer)


def _check_port_free(addr: Multiaddr) -> None:
    """Raise `OSError` if a fixed TCP port in `addr` is taken (defect 9).

    A bind without ``SO_REUSEPORT`` fails where another socket listens, even one that set
    ``SO_REUSEPORT``. The port could be taken between this check and the listen; this
    catches the real case, a second node started on the same configuration.
    """
    protocols = {protocol.name for protocol in addr.protocols()}
    if "tcp" not in protocols or int(addr.value_for_protocol("tcp")) == 0:
        return
    if "ip4" in protocols:
        family, ip = socket.AF_INET, addr.value_for_protocol("ip4")
    elif "ip6" in protocols:
        family, ip = socket.AF_INET6, addr.value_for_protocol("ip6")
    else:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, int(addr.value_for_protocol("tcp"))))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from exc


# Defect 33: signed peer records remembered once verified. A node sees each peer's
# current record (a few hundred bytes) over and over; a swarm of thousands fits.
VERIFIED_RECORDS_KEPT = 4096


class _VerifiedRecords:
    """``consume_envelope`` that remembers what it verified (defect 33).

    Verifying is a pure function of the record's bytes and the signature domain, so a
    record seen before gets the same answer without parsing or checking it again. A
    record that fails to verify is not remembered: it raises every time, as before.
    """

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._verified: collections.OrderedDict[tuple[bytes, str], tuple[Envelope, PeerRecord]] = (
            collections.OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def __call__(self, data: bytes, domain: str) -> tuple[Envelope, PeerRecord]:
        key = (bytes(data), domain)
        known = self._verified.get(key)
        if known is not None:
            self._verified.move_to_end(key)
            self.hits += 1
            return known
        verified = consume_envelope(data, domain)
        self.misses += 1
        self._verified[key] = verified
        if len(self._verified) > self._kept:
            self._verified.popitem(last=False)
        return verified


verified_records = _VerifiedRecords(VERIFIED_RECORDS_KEPT)


def _remember_verified_records() -> None:
    """Route identify's, the DHT's and pubsub's record checks through `verified_records`:
    they call ``consume_envelope`` by the name they imported, so that is what is replaced."""
    modules = (
        libp2p.identity.update,
        libp2p.kad_dht.utils,
        libp2p.pubsub.utils,
        libp2p.pubsub.gossipsub,
    )
    for module in modules:
        module.consume_envelope = verified_records  # type: ignore[attr-defined]


@asynccontextmanager
async def open_host(
    key_pair: KeyPair,
    listen_addrs: Iterable[str],
    *,
    allowlist: frozenset[str] | None = None,
    gate: ConnectionGate | None = None,
    on_refused: OnRefused | None = None,
) -> AsyncIterator[P2PHost]:
    """Run a Noise + Yamux TCP host listening on `listen_addrs` (port 0 picks a port).

    With an `allowlist` of peer ids, inbound connections and streams from other peers are
    refused before any handler runs; so are inbound connections of peers for which
    `gate(peer_id)` gives a reason. Each refusal is reported to `on_refused(peer_id,
    "connect" | "stream", reason)`. Raises `OSError` if an address cannot be listened on.
    On exit, connections get `_CLOSE_GRACE_SECONDS` to close, then everything is torn down.
    """
    configure_libp2p_logging()
    _remember_verified_records()
    addrs = [Multiaddr(addr) for addr in listen_addrs]
    for addr in addrs:
        _check_port_free(addr)
    host = _build_host(key_pair, allowlist, gate, on_refused)
    async with host.run(addrs):
        swarm = host.get_network()
        failed = [str(addr) for addr in addrs if str(addr) not in swarm.listeners]
        if failed:
            raise OSError(f"could not listen on {', '.join(failed)}")
        p2p_host = P2PHost(host)
        try:
            yield p2p_host
        finally:
            with trio.move_on_after(_CLOSE_GRACE_SECONDS) as scope:
                scope.shield = True
                await p2p_host._close_connections()


# Sweeps over the connections when closing: one that arrived during a sweep gets the next.
_CLOSE_PASSES = 3


# --- Pubsub (defects 23 and 25) -----------------------------------------------------


_PeerTopics = collections.defaultdict[ID, list[str]]


class DmmGossipSub(GossipSub):
    """GossipSub that backs off from the mesh peers its heartbeat prunes (defect 25)."""

    def mesh_heartbeat(self) -> tuple[_PeerTopics, _PeerTopics]:
        to_graft, to_prune = super().mesh_heartbeat()
        for peer, topics in to_prune.items():
            for topic in topics:
                self._add_back_off(peer, topic, False)
        return to_graft, to_prune


class DmmPubsub(Pubsub):
    """Pubsub that keeps trying to open its stream to a connected peer (defect 27)."""

    async def _handle_new_peer(self, peer_id: ID) -> None:
        try:
            await super()._handle_new_peer(peer_id)
        except StreamFailure as exc:
            # The one failure the library's retry loop retries.
            raise SwarmException(f"no pubsub stream to {peer_id} yet: {exc}") from exc


def guard_pubsub_streams(
    host: P2PHost,
    protocols: Iterable[str],
    handler: Callable[[INetStream], Awaitable[None]],
) -> None:
    """Serve pubsub's ``protocols`` with ``handler`` (``Pubsub.stream_handler``), but end
    the stream instead of crashing the connection once the pubsub service has stopped."""

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except RuntimeError as exc:
            if "closed to new arrivals" not in str(exc):
                raise
            log.debug("pubsub stream from %s ended: pubsub has stopped", stream.muxed_conn.peer_id)
            with contextlib.suppress(Exception):  # the library raises what it likes
                await stream.reset()

    for protocol in protocols:
        host.host.set_stream_handler(TProtocol(protocol), guarded)


# --- Kademlia DHT (defects 12-19) ------------------------------------------------------

# Defect 12: the protocol dmm's DHT speaks, so it never mixes with the IPFS DHT.
KAD_PROTOCOL_ID = "/dmm/kad/1.0.0"
# Defect 18: what a receiving py-libp2p node accepts.
KAD_MAX_PROVIDER_KEY_BYTES = 80
KAD_MAX_VALUE_KEY_BYTES = 128
# A provider record is dropped this long after it was stored (wall clock, not
# configurable): providers must re-provide before then.
KAD_PROVIDER_RECORD_TTL: float = PROVIDER_RECORD_EXPIRATION_INTERVAL
# A stored value is dropped this long after it was stored (wall clock): whoever put it
# puts it again before then.
KAD_VALUE_RECORD_TTL: float = DEFAULT_TTL
# Defect 16: ADD_PROVIDER messages we accept from one peer per window (library: 10).
KAD_ADD_PROVIDER_WINDOW = 10.0
KAD_ADD_PROVIDER_LIMIT = 300
# Defect 26: inbound DHT streams served at once, in all and of one peer. One lookup holds
# up to ALPHA (3) streams to a peer; a node may run a few lookups at once, and keeps up
# to KAD_POOL_PER_PEER idle for its next requests (defect 28): a served stream waiting
# for the next request costs a task, not work.
KAD_INBOUND_STREAMS = 1024
KAD_INBOUND_STREAMS_PER_PEER = 16


# Defect 28: idle DHT streams kept per peer for the next request, and for how long. A
# lookup asks a peer once; the reuse is across the lookups and provides a node makes in
# a burst (a pull's 8 provides, a find's rounds of lookups).
KAD_POOL_PER_PEER = 2
KAD_POOL_IDLE = 5.0
# Requests to one peer share its KAD_POOL_PER_PEER streams, one request at a time on
# each, as go-libp2p's DHT serialises them on one; a request that has waited this long
# for a free stream opens another.
KAD_LEASE_WAIT = 1.0
# How long an owed ADD_PROVIDER echo may take to arrive before the stream is given up,
# and the most read at once while reading one (it is about the request's size).
KAD_ECHO_WAIT = 2.0
KAD_ECHO_READ = 64 * 1024
# Closing or resetting a stream we are done with never waits longer than this.
KAD_CLOSE_WAIT = 2.0
# How long the pool remembers that a peer answered a request (a provide asks whether
# the peers of its walk, a few seconds long, did).
KAD_ANSWER_MEMORY = 300.0
# After a walk that found fewer than BUCKET_SIZE peers in all, every one of them
# answering, a provide this soon after tells them all without walking again, and a walk
# asks them all at once: in a network that small, the closest peers to any key are all
# of them.
KAD_WHOLE_NETWORK_MEMORY = 60.0


# Defect 34: the longest prefix length a routing-table refresh looks up (as go-libp2p's
# maxCplForRefresh): past it a random target takes over 65,000 tries to find, and
# there are 2 ** 16 times fewer peers than in the whole network.
KAD_REFRESH_MAX_PREFIX_LENGTH = 15
# Defect 32: how often expired provider and value records are dropped (the library's
# maintenance period).
KAD_EXPIRY_INTERVAL = 600.0


def _to_dmm_kad(protocol_id: TProtocol) -> TProtocol:
    return TProtocol(KAD_PROTOCOL_ID) if protocol_id == _LIBRARY_KAD_PROTOCOL_ID else protocol_id


class _KadPeerStore:
    """The peerstore as `KadDht` sees it: a peer speaking our DHT protocol speaks "its" one.

    The routing table only admits peers whose identified protocols include the library's
    DHT protocol id.
    """

    def __init__(self, peerstore: Any) -> None:
        self._peerstore = peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peerstore, name)

    def get_protocols(self, peer_id: ID) -> list[str]:
        protocols: list[str] = self._peerstore.get_protocols(peer_id)
        return [
            str(_LIBRARY_KAD_PROTOCOL_ID) if protocol == KAD_PROTOCOL_ID else protocol
            for protocol in protocols
        ]


class _KadHost:
    """The host as `KadDht` sees it: the DHT protocol id renamed (defect 12)."""

    def __init__(self, host: BasicHost) -> None:
        self._host = host
        self._peerstore = _KadPeerStore(host.get_peerstore())
        self.pool = _KadStreamPool(host)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def get_peerstore(self) -> Any:
        return self._peerstore

    def set_stream_handler(self, protocol_id: TProtocol, handler: Any) -> None:
        self._host.set_stream_handler(_to_dmm_kad(protocol_id), handler)

    def remove_stream_handler(self, protocol_id: TProtocol) -> None:
        self._host.remove_stream_handler(_to_dmm_kad(protocol_id))

    async def new_stream(self, peer_id: ID, protocol_ids: Sequence[TProtocol]) -> INetStream:
        protocols = [_to_dmm_kad(p) for p in protocol_ids]
        if protocols != [KAD_PROTOCOL_ID]:
            return await self._host.new_stream(peer_id, protocols)
        return cast(INetStream, await self.pool.lease(peer_id))


class _Frames:
    """Counts the varint-length-prefixed frames in a byte stream fed to it in pieces;
    keeps their bodies when ``keep`` (requests, to tell their type)."""

    def __init__(self, *, keep: bool) -> None:
        self.keep = keep
        self.bodies: list[bytes] = []
        self.count = 0
        self._length = 0
        self._shift = 0
        self._remaining: int | None = None  # of the body being read; None: in a prefix
        self._body = bytearray()

    @property
    def partial(self) -> bool:
        return self._remaining is not None or self._shift > 0

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._remaining is None:
                byte = data[i]
                i += 1
                self._length |= (byte & 0x7F) << self._shift
                self._shift += 7
                if not byte & 0x80:
                    self._remaining, self._length, self._shift = self._length, 0, 0
                    if self._remaining == 0:
                        self._end()
                continue
            take = min(self._remaining, len(data) - i)
            if self.keep:
                self._body += data[i : i + take]
            self._remaining -= take
            i += take
            if self._remaining == 0:
                self._end()

    def _end(self) -> None:
        self.count += 1
        if self.keep:
            self.bodies.append(bytes(self._body))
            self._body.clear()
        self._remaining = None


def _is_add_provider(body: bytes) -> bool:
    message = Message()
    try:
        message.ParseFromString(body)
    except Exception:  # not ours to judge: the request went out as the library wrote it
        return False
    return bool(message.type == Message.MessageType.ADD_PROVIDER)


class _LeasedKadStream:
    """A DHT stream as the library's request code sees it; its ``close`` hands it back
    to the pool, which keeps it if every request on it was answered (defect 28)."""

    def __init__(
        self, pool: _KadStreamPool, peer: ID, stream: INetStream, permit: trio.Semaphore | None
    ) -> None:
        self._pool = pool
        self.peer = peer
        self.stream = stream
        self.permit = permit  # the peer's stream slot it holds, if it got one
        self.sent = _Frames(keep=True)
        self.received = _Frames(keep=False)
        self.broken = False
        self.released = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except BaseException:
            self.broken = True
            raise
        self.sent.feed(data)

    async def read(self, n: int | None = None) -> bytes:
        try:
            data = await self.stream.read(n)
        except BaseException:
            self.broken = True
            raise
        if not data:
            self.broken = True
        self.received.feed(data)
        return data

    async def close(self) -> None:
        await self._pool.release(self)

    async def reset(self) -> None:
        self.broken = True
        await self._pool.release(self)

    def owed(self) -> int | None:
        """Echoes still to read once the library is done with the stream (ADD_PROVIDER),
        or None when the stream cannot be reused."""
        if self.broken or self.sent.partial or self.received.partial:
            return None
        echoes = sum(_is_add_provider(body) for body in self.sent.bodies)
        answered = self.sent.count - echoes
        if self.received.count != answered:
            return None
        return echoes


class _ServedKadStream:
    """An inbound DHT stream as the library's handler reads it. The handler puts the asker
    in the routing table as a stream starts, and that fails while identify has not yet
    told us the asker's addresses; one stream per request retried it soon enough. A kept
    stream carries many requests (defect 28), so each request that starts while the
    asker is not in the table tries again."""

    def __init__(self, stream: INetStream, dht: KadDht) -> None:
        self.stream = stream
        self._dht = dht
        self._peer = stream.muxed_conn.peer_id
        self._requests = _Frames(keep=False)
        self._asker_gone = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    async def write(self, data: bytes) -> None:
        if self._asker_gone:
            return
        try:
            await self.stream.write(data)
        except (StreamError, MuxedStreamError) as exc:
            # Defect 31: the asker closed its end; the answer has no reader.
            log.debug("DHT answer to %s dropped: the asker closed its stream (%r)", self._peer, exc)
            self._asker_gone = True

    async def close(self) -> None:
        if self._asker_gone:
            with contextlib.suppress(Exception):  # the library raises what it likes
                await self.stream.reset()
            return
        await self.stream.close()

    async def read(self, n: int | None = None) -> bytes:
        if self._asker_gone:
            return b""  # the handler's loop ends as at a clean end of input
        between = self._requests.count > 0 and not self._requests.partial
        if between and not self._dht.routing_table.peer_in_table(self._peer):
            with contextlib.suppress(Exception):  # as the handler's own attempt: not fatal
                await self._dht.add_peer(self._peer, skip_server_mode_check=True)
        data = await self.stream.read(n)
        self._requests.feed(data)
        return data


@dataclass(slots=True)
class _IdleKadStream:
    stream: INetStream
    owed: int  # ADD_PROVIDER echoes not read yet
    since: float


class _KadStreamPool:
    """Open DHT streams kept per peer between requests (defect 28)."""

    def __init__(self, host: BasicHost) -> None:
        self._host = host
        self._idle: dict[ID, list[_IdleKadStream]] = {}
        self._slots: dict[ID, trio.Semaphore] = {}
        self.opened = 0  # streams negotiated, for the tests
        self.reused = 0
        # Peer -> when a request to it last got an answer: the library's request code
        # tells a failure from an empty answer to no one.
        self._answered: dict[ID, float] = {}

    def answered_since(self, peer: ID, when: float) -> bool:
        """Whether a request to ``peer`` got an answer at or after ``when``."""
        return self._answered.get(peer, -math.inf) >= when

    async def lease(self, peer: ID) -> _LeasedKadStream:
        slots = self._slots.setdefault(peer, trio.Semaphore(KAD_POOL_PER_PEER))
        permit: trio.Semaphore | None = None
        with trio.move_on_after(KAD_LEASE_WAIT):
            await slots.acquire()
            permit = slots
        try:
            stream = await self._kept(peer)
            if stream is None:
                stream = await self._host.new_stream(peer, [TProtocol(KAD_PROTOCOL_ID)])
                self.opened += 1
            else:
                self.reused += 1
        except BaseException:
            self._give_back(peer, permit)
            raise
        return _LeasedKadStream(self, peer, stream, permit)

    async def _kept(self, peer: ID) -> INetStream | None:
        """A kept stream to ``peer`` ready for a request, if there is one."""
        idle = self._idle.get(peer, [])
        while idle:
            kept = idle.pop()
            if not idle:
                self._idle.pop(peer, None)
            if trio.current_time() - kept.since <= KAD_POOL_IDLE and await self._drain(kept):
                return kept.stream
            await _discard(kept.stream)
        return None

    def _give_back(self, peer: ID, permit: trio.Semaphore | None) -> None:
        if permit is None:
            return
        permit.release()
        if permit.value == KAD_POOL_PER_PEER and self._slots.get(peer) is permit:
            del self._slots[peer]  # nobody holds or waits for one: forget the peer

    async def _drain(self, kept: _IdleKadStream) -> bool:
        """Read the echoes a kept stream owes; False if it cannot serve another request."""
        if _stream_closed(kept.stream):
            return False
        if not kept.owed:
            return True
        frames = _Frames(keep=False)
        with trio.move_on_after(KAD_ECHO_WAIT):
            try:
                while frames.count < kept.owed:
                    data = await kept.stream.read(KAD_ECHO_READ)
                    if not data:
                        return False
                    frames.feed(data)
            except Exception:  # the library raises what it likes
                return False
            return not frames.partial and frames.count == kept.owed
        return False

    async def release(self, leased: _LeasedKadStream) -> None:
        if leased.released:
            return
        leased.released = True
        if leased.received.count:
            self._answered[leased.peer] = trio.current_time()
        owed = leased.owed()
        idle = self._idle.setdefault(leased.peer, [])
        if owed is None or len(idle) >= KAD_POOL_PER_PEER:
            if not idle:
                self._idle.pop(leased.peer, None)
            self._give_back(leased.peer, leased.permit)
            await _discard(leased.stream, clean=owed is not None)
            return
        idle.append(_IdleKadStream(leased.stream, owed, trio.current_time()))
        self._give_back(leased.peer, leased.permit)

    async def close_idle(self, *, older_than: float = KAD_POOL_IDLE) -> int:
        """Close the streams idle for longer than ``older_than``; how many."""
        now = trio.current_time()
        for peer, when in list(self._answered.items()):
            if now - when > KAD_ANSWER_MEMORY:
                del self._answered[peer]
        closing: list[INetStream] = []
        for peer, idle in list(self._idle.items()):
            stale = [kept for kept in idle if now - kept.since > older_than]
            if stale:
                closing += [kept.stream for kept in stale]
                idle[:] = [kept for kept in idle if now - kept.since <= older_than]
                if not idle:
                    del self._idle[peer]
        for stream in closing:
            await _discard(stream, clean=True)
        return len(closing)

    def idle_count(self, peer: ID | None = None) -> int:
        if peer is not None:
            return len(self._idle.get(peer, ()))
        return sum(len(idle) for idle in self._idle.values())


def _stream_closed(stream: INetStream) -> bool:
    """Whether a kept stream, or its connection, has ended (checked without waiting)."""
    conn = getattr(stream, "muxed_conn", None)
    muxed = getattr(stream, "muxed_stream", None)
    ended = ("closed", "send_closed", "recv_closed", "reset_received")
    return bool(getattr(conn, "is_closed", False)) or any(
        getattr(muxed, flag, False) is True for flag in ended
    )


async def _discard(stream: INetStream, *, clean: bool = False) -> None:
    """Close a stream we are done with (reset it when a request on it went wrong);
    shielded, as the library closes streams in ``finally`` blocks being cancelled."""
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(KAD_CLOSE_WAIT),
        contextlib.suppress(Exception),  # the library raises what it likes
    ):
        if clean:
            await stream.close()
        else:
            await stream.reset()


@dataclass(frozen=True, slots=True)
class WalkTrace:
    """One DHT walk: its sequential query rounds (hops) and the peers it asked."""

    rounds: int
    asked: int


_walk_traces: contextvars.ContextVar[list[WalkTrace] | None] = contextvars.ContextVar(
    "dmm_walk_traces", default=None
)


@contextmanager
def trace_walks() -> Iterator[list[WalkTrace]]:
    """Collect a `WalkTrace` for each DHT walk this task makes inside the block.

    For measuring hops (the benchmarks): tasks started elsewhere are not traced.
    """
    traces: list[WalkTrace] = []
    token = _walk_traces.set(traces)
    try:
        yield traces
    finally:
        _walk_traces.reset(token)


class KadDht(KadDHT):
    """py-libp2p's server-mode ``KadDHT`` with defects 12-19 handled.

    Keys are bytes for providers and text (``/<namespace>/...``) for values. Only the
    namespaces in `validators` are stored or accepted, locally and from peers. Run it
    with ``background_trio_service``. The inherited ``provide``, ``find_providers`` and
    ``get_value`` keep the library's defects: use the methods defined here.
    """

    def __init__(self, host: P2PHost, validators: Mapping[str, Validator]) -> None:
        # Defect 13: strict, and no default pk/ipns validators (validator_changed).
        super().__init__(
            cast(IHost, _KadHost(host.host)),
            DHTMode.SERVER,
            validator=NamespacedValidator(dict(validators), strict_validation=True),
            validator_changed=True,
            strict_validation=True,
        )
        # Defect 16.
        self._provider_rate_window = KAD_ADD_PROVIDER_WINDOW
        self._provider_rate_max = KAD_ADD_PROVIDER_LIMIT
        # Defect 26: the library's own limiter (12 in all) is no longer used.
        self._inbound_streams: collections.Counter[ID] = collections.Counter()
        # When a walk last found the whole network, and its peers (`provide_key`).
        self._whole_network: tuple[float, frozenset[ID]] | None = None

    async def handle_stream(self, stream: INetStream) -> None:
        """Serve one inbound DHT stream, or reset it when its peer, or everyone, already
        holds as many as we serve at once (defect 26)."""
        peer = stream.muxed_conn.peer_id
        held = self._inbound_streams
        if held.total() >= KAD_INBOUND_STREAMS or held[peer] >= KAD_INBOUND_STREAMS_PER_PEER:
            log.debug(
                "DHT stream from %s reset: %d streams held, %d by it",
                peer,
                held.total(),
                held[peer],
            )
            with contextlib.suppress(Exception):  # the library raises what it likes
                await stream.reset()
            return
        held[peer] += 1
        try:
            await self._do_handle_stream(cast(INetStream, _ServedKadStream(stream, self)))
        finally:
            held[peer] -= 1
            if not held[peer]:
                del held[peer]

    async def _run_main_loop(self) -> None:
        """Expire stored records; nothing else (defect 32): the routing table is
        refreshed by the node's bootstrapper, and `Dht` re-provides and re-puts."""
        while self.manager.is_running:
            self.value_store.cleanup_expired()
            self.provider_store.cleanup_expired()
            await trio.sleep(KAD_EXPIRY_INTERVAL)

    @property
    def _validator(self) -> NamespacedValidator:
        return cast(NamespacedValidator, self.validator)

    @property
    def streams(self) -> _KadStreamPool:
        """The DHT streams kept between requests (defect 28)."""
        return cast(_KadHost, self.host).pool

    async def close_idle_streams_forever(self) -> None:
        """Close kept DHT streams once idle for `KAD_POOL_IDLE`: each holds a slot of
        its peer's DHT server."""
        while True:
            await trio.sleep(KAD_POOL_IDLE / 2)
            await self.streams.close_idle()

    # ---------------------------------------------------------------- providers

    async def provide_key(self, key: bytes) -> bool:
        """Record us as a provider of `key` here and at the `BUCKET_SIZE` peers closest
        to it, once (defect 29).

        True if at least one peer was told. The caller re-provides before
        `KAD_PROVIDER_RECORD_TTL` passes (defect 17). Keys that are not a multihash
        must be at most 50 bytes for the closest-peer lookup to work (defect 19).
        """
        if not 0 < len(key) <= KAD_MAX_PROVIDER_KEY_BYTES:
            raise ValueError(f"a provider key is 1..{KAD_MAX_PROVIDER_KEY_BYTES} bytes")
        store = self.provider_store
        store.add_provider(key, PeerInfo(self.local_peer_id, self.host.get_addrs()))
        closest = self._closest_in_whole_network(key)
        if closest is None:
            # The provider lookup's walk finds the closest peers, and caches the providers
            # they name on the way, as `find_providers_of` does.
            walked = await self._provider_walk(key, self._providers_asker(key, None), lambda: False)
            closest = walked[:BUCKET_SIZE]
        told = [0]

        async def tell(peer: ID) -> None:
            with trio.move_on_after(QUERY_TIMEOUT):
                told[0] += await store._send_add_provider(peer, key)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(tell, peer)
        log.debug(
            "provider record for %s stored by %d of %d peers", key.hex(), told[0], len(closest)
        )
        return told[0] > 0

    def stop_providing(self, key: bytes) -> None:
        """Withdraw our own provider record for `key` (peers keep theirs until it expires)."""
        store = self.provider_store
        store.providing_keys.discard(key)
        records = store.providers.get(key)
        if records is not None:
            records.pop(str(self.local_peer_id), None)
            if not records:
                del store.providers[key]

    async def find_providers_of(
        self,
        key: bytes,
        count: int = BUCKET_SIZE,
        *,
        timeout: float = math.inf,
        on_found: Callable[[PeerInfo], None] | None = None,
    ) -> list[PeerInfo]:
        """Up to `count` other peers providing `key`, each once: the closest peers to the
        key are asked even when the local store knows some already (defect 14).

        After `timeout` seconds the lookup stops and returns the providers found so far
        (the local store's first): one slow peer must not cost the answers of the rest.
        `on_found` is called with each provider as soon as it is found, so a caller can
        use the first ones while the walk goes on (go-libp2p's FindProvidersAsync).
        """
        found: dict[ID, PeerInfo] = {}

        def add(providers: Iterable[PeerInfo]) -> None:
            for provider in providers:
                new = provider.peer_id not in found
                if provider.peer_id != self.local_peer_id and new and len(found) < count:
                    found[provider.peer_id] = provider
                    if on_found is not None:
                        on_found(provider)

        add(self.provider_store.get_providers(key))
        with trio.move_on_after(timeout):
            await self._provider_walk(
                key, self._providers_asker(key, add), lambda: len(found) >= count
            )
        return list(found.values())

    def _providers_asker(
        self, key: bytes, add: Callable[[list[PeerInfo]], None] | None
    ) -> Callable[[ID], Awaitable[list[ID]]]:
        """A `_walk` step sending GET_PROVIDERS: the providers named are cached and
        served, as the library does, and handed to `add`."""

        async def ask(peer: ID) -> list[ID]:
            store = self.provider_store
            providers, closer = await store._get_providers_from_peer_with_closers(peer, key)
            for provider in providers:
                store.add_provider(key, provider)
            if add is not None:
                add(providers)
            return closer

        return ask

    async def _provider_walk(
        self,
        key: bytes,
        ask: Callable[[ID], Awaitable[list[ID]]],
        done: Callable[[], bool],
    ) -> list[ID]:
        """Walk toward `key` with GET_PROVIDERS from the routing table, as Kademlia does;
        returns the peers that answered, closest first.

        Only peers named without an address (defect 19) need the FIND_NODE walk that
        finds them, and a second walk from there; in a network this node already knows
        whole, none are, and the lookup costs one walk rather than two.
        """
        undialable: set[ID] = set()

        async def ask_dialable(peer: ID) -> list[ID]:
            if not self._dialable(peer):
                undialable.add(peer)
                return []
            return await ask(peer)

        answered: set[ID] = set()
        failed: set[ID] = set()
        closest = await self._walk(key, ask_dialable, done, answered=answered, failed=failed)
        if undialable and not done():
            seed = await self.peer_routing.find_closest_peers_network(key)
            failed -= undialable  # not asked: the FIND_NODE walk may have found them
            closest = await self._walk(key, ask_dialable, done, seed, answered, failed)
        # A walk that ran its course asked every peer anyone named, up to BUCKET_SIZE; one
        # that `done()` stopped early says nothing either way.
        if not done():
            whole = not failed and not undialable and len(answered) < BUCKET_SIZE
            self._whole_network = (trio.current_time(), frozenset(answered)) if whole else None
        return closest

    def _whole_network_peers(self) -> frozenset[ID] | None:
        """Every peer of the network, when a recent walk found it whole and it has not
        grown since (no peer in the routing table, or connected, that the walk did not
        find); None when that is not known."""
        if self._whole_network is None:
            return None
        at, peers = self._whole_network
        known = {*self.routing_table.get_peer_ids(), *self.host.get_connected_peers()}
        if trio.current_time() - at > KAD_WHOLE_NETWORK_MEMORY or not known <= peers:
            self._whole_network = None
            return None
        return peers

    def _closest_in_whole_network(self, key: bytes) -> list[ID] | None:
        """The closest peers to `key` without a walk, or None when a walk is needed."""
        peers = self._whole_network_peers()
        if peers is None:
            return None
        live = [peer for peer in peers if self._dialable(peer)]
        return sort_peer_ids_by_distance(key, live)[:BUCKET_SIZE]

    def _dialable(self, peer: ID) -> bool:
        if peer in self.host.get_connected_peers():
            return True
        try:
            return bool(self.host.get_peerstore().addrs(peer))
        except PeerStoreError:
            return False

    # ------------------------------------------------------------------- values

    async def put_value(self, key: str, value: bytes) -> None:
        """Validate, store here and at the peers closest to `key` (defect 19).

        Raises ``ValueError`` for a key no peer would serve (defect 18) or a value older
        than the one held here, and whatever the namespace's validator raises.
        """
        key_bytes = _value_key_bytes(key)
        self._validator.validate(key, value)
        held = self.value_store.get(key_bytes)
        newer_held = (
            held is not None
            and held.value != value
            and self._validator.select(key, [value, held.value]) != 0
        )
        if newer_held:
            raise ValueError(f"a newer value for {key} is held here")
        self.value_store.put(key_bytes, value)
        stored = [0]

        async def store_at(peer: ID) -> None:
            with trio.move_on_after(QUERY_TIMEOUT):
                stored[0] += await self.value_store._store_at_peer(peer, key_bytes, value)

        closest = await self._walk(key_bytes, self._value_asker(key, {}), lambda: False)
        async with trio.open_nursery() as nursery:
            for peer in closest[:BUCKET_SIZE]:
                nursery.start_soon(store_at, peer)
        log.debug("%s stored by %d of %d peers", key, stored[0], min(len(closest), BUCKET_SIZE))

    async def get_newest_value(self, key: str) -> bytes | None:
        """The value the validator selects among ours and every valid one the closest
        peers hold (defects 15, 19); peers holding an older one, and we, are given it."""
        key_bytes = _value_key_bytes(key)
        answers: dict[ID, Record] = {}
        await self._walk(key_bytes, self._value_asker(key, answers), lambda: False)
        local = self.value_store.get(key_bytes)
        candidates = [*([local] if local is not None else []), *answers.values()]
        if not candidates:
            return None
        best = candidates[self._validator.select(key, [record.value for record in candidates])]
        if local is None or local.value != best.value:
            self.value_store.put_record(key_bytes, best)
        outdated = [peer for peer, record in answers.items() if record.value != best.value]
        async with trio.open_nursery() as nursery:
            for peer in outdated:
                nursery.start_soon(self._correct, peer, key_bytes, best)
        return best.value

    def _value_asker(
        self, key: str, answers: dict[ID, Record]
    ) -> Callable[[ID], Awaitable[list[ID]]]:
        """A `_walk` step sending GET_VALUE: valid values go into `answers`."""
        key_bytes = key.encode()

        async def ask(peer: ID) -> list[ID]:
            answer = await self.value_store._get_from_peer(
                peer, key_bytes, return_record=True, return_closer_peers=True
            )
            record, closer = cast(tuple[Record | None, list[ID]], answer)
            if record is not None:
                try:
                    self._validator.validate(key, record.value)
                except Exception as exc:  # validators raise whatever they like
                    log.debug("%s sent an invalid value for %s: %s", peer, key, exc)
                else:
                    answers[peer] = record
            return closer

        return ask

    async def _correct(self, peer: ID, key: bytes, record: Record) -> None:
        with trio.move_on_after(QUERY_TIMEOUT):
            await self.value_store._store_at_peer(peer, key, record.value, record=record)

    # ------------------------------------------------------------------- lookups

    async def refresh_routing_table(self) -> None:
        """Fill the routing table as Kademlia's refresh does (defect 34): look up our own
        key, which finds the peers closest to us and every peer of the prefix lengths
        they share with us, then a random key at each shorter prefix length whose
        peers the table holds fewer than `BUCKET_SIZE` of."""
        own = peer_id_to_key(self.local_peer_id)
        await self._look_up(self.local_peer_id.to_bytes())
        keys = [peer_id_to_key(peer) for peer in self.routing_table.get_peer_ids()]
        for prefix_length in prefix_lengths_to_refresh(own, keys):
            # Up to 2 ** 16 hashes: in a thread, like any hashing.
            target = await trio.to_thread.run_sync(random_key_at_prefix_length, own, prefix_length)
            await self._look_up(target)

    async def _look_up(self, target: bytes) -> None:
        """Walk to the peers closest to `target` with ``FIND_NODE``. The library adds
        each peer an answer names to the table, and each peer it asks, if its addresses
        are known by then; a peer that dialed us may have sent them only in its answer,
        so every peer that answered is added once the walk is over."""

        async def ask(peer: ID) -> list[ID]:
            return await self.peer_routing._query_peer_for_closest(peer, target)

        for peer in await self._walk(target, ask, lambda: False):
            await self.routing_table.add_peer(peer)

    async def _walk(
        self,
        key: bytes,
        ask: Callable[[ID], Awaitable[list[ID]]],
        done: Callable[[], bool],
        seed: Iterable[ID] = (),
        answered: set[ID] | None = None,
        failed: set[ID] | None = None,
    ) -> list[ID]:
        """Ask the peers closest to `key`, `ALPHA` at a time (all at once in a network
        known whole), learning closer peers from each answer, until `done()` or the
        `BUCKET_SIZE` closest known that answer were all asked: as in Kademlia, a peer
        that fails to answer gives its place to the next closest.

        Starts from `seed`, the routing table and the connected peers, and walks with
        the operation's own request (defect 19). A walk continuing an earlier one passes
        that one's `answered` and `failed` sets, which it fills in turn; their peers are
        not asked again. Returns the peers that answered, closest first.
        """
        answered = set() if answered is None else answered
        failed = set() if failed is None else failed
        known = list(dict.fromkeys(seed))
        local = self.routing_table.find_local_closest_peers(key, BUCKET_SIZE)
        for peer in [*local, *self.host.get_connected_peers()]:
            if peer not in known:
                known.append(peer)
        rounds = asked = 0
        # A walk in a network known whole asks every peer anyway: all at once, in one
        # round trip rather than ALPHA at a time.
        width = BUCKET_SIZE if self._whole_network_peers() is not None else ALPHA

        async def ask_one(peer: ID) -> None:
            since = trio.current_time()
            with trio.move_on_after(QUERY_TIMEOUT):
                for closer in await ask(peer):
                    if closer not in known:
                        known.append(closer)
            # The library's request code answers a failure as it would an empty answer;
            # the stream pool saw whether an answer came.
            (answered if self.streams.answered_since(peer, since) else failed).add(peer)

        while not done():
            nearest = sort_peer_ids_by_distance(key, known)
            candidates = [p for p in nearest if p not in failed and p != self.local_peer_id]
            batch = [p for p in candidates[:BUCKET_SIZE] if p not in answered][:width]
            if not batch:
                break
            asked += len(batch)
            rounds += 1
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    nursery.start_soon(ask_one, peer)
        traces = _walk_traces.get()
        if traces is not None:
            traces.append(WalkTrace(rounds, asked))
        return sort_peer_ids_by_distance(key, list(answered))


def prefix_lengths_to_refresh(own: bytes, keys: Iterable[bytes]) -> list[int]:
    """The prefix lengths a routing-table refresh looks up a random key at, given our
    key and the table's (defect 34).

    A lookup of our own key ends having asked the `BUCKET_SIZE` peers closest to us, so
    every prefix length from the farthest of those on is known in full; a shorter one
    needs a lookup of its own only while the table holds fewer than `BUCKET_SIZE` peers
    of it. In a network under `BUCKET_SIZE` peers the self lookup found them all.
    """
    lengths = sorted((shared_prefix_len(own, key) for key in keys), reverse=True)
    if len(lengths) < BUCKET_SIZE:
        return []
    held = collections.Counter(lengths)
    known_from = min(lengths[BUCKET_SIZE - 1], KAD_REFRESH_MAX_PREFIX_LENGTH)
    return [length for length in range(known_from) if held[length] < BUCKET_SIZE]


def random_key_at_prefix_length(own: bytes, prefix_length: int) -> bytes:
    """A random lookup target whose key (its SHA-256, as the DHT hashes every target)
    shares exactly `prefix_length` leading bits with `own`. Found by trying, as
    go-libp2p-kbucket does: 2 ** (prefix_length + 1) tries on average."""
    if not 0 <= prefix_length <= KAD_REFRESH_MAX_PREFIX_LENGTH:
        raise ValueError(f"a prefix length is 0..{KAD_REFRESH_MAX_PREFIX_LENGTH}")
    while True:
        target = os.urandom(32)
        if shared_prefix_len(own, hashlib.sha256(target).digest()) == prefix_length:
            return target


def _value_key_bytes(key: str) -> bytes:
    key_bytes = key.encode()
    if len(key_bytes) > KAD_MAX_VALUE_KEY_BYTES:
        raise ValueError(f"a value key is at most {KAD_MAX_VALUE_KEY_BYTES} bytes")
    return key_bytes


# --- logging (defect 10) ---------------------------------------------------------------

# WARNING/ERROR messages py-libp2p emits for connections and streams ending normally.
_ORDINARY = re.compile(
    "|".join(
        [
            r"Failed to open stream to peer",
            r"MultiselectClient handshake",
            r"Error in handle_incoming for peer .*(ClosedResource|BrokenResource|RawConn"
            r"|IncompleteRead|ConnectionClosed)",
            r"Yamux connection closed",
            r"RawConnError during connection handling",
            r"Incomplete read",
            r"\[ADDCONN_FAIL\]",
            r"fail to upgrade mux for peer",
            r"failed to upgrade security",
            r"Error closing secured_conn",
            r"Error sending (FIN|RST)",
            r"Window update failed",
            r"Unexpected error during window update",
            r"Error closing connection to",
            r"Identify .*(failed|error)",
            r"Failed to open TCP stream",
            r"Stream entered",
            r"Failed to read DHT message from stream: $",  # the peer closed it (defect 18)
            r"Failed to store value at peer \S+: $",  # the peer refused the value
            # Our validator refused a peer's value (an ACL refusal is audited by the node).
            r"Failed to store value [0-9a-f]+ for key",
            # A peer grafting us while we back off from it: answered with a PRUNE, as
            # gossipsub says; a py-libp2p peer may try again every heartbeat, a warning each.
            r"GRAFT: ignoring request from \S+, back off until",
        ]
    )
)


def _libp2p_level(record: logging.LogRecord) -> int:
    if record.levelno < logging.WARNING:
        return logging.DEBUG
    if _ORDINARY.search(record.getMessage()):
        return logging.DEBUG
    return record.levelno


class _ToDmmLog(logging.Handler):
    """Re-emits py-libp2p records on ``dmm.p2p`` at the level `_libp2p_level` gives."""

    def emit(self, record: logging.LogRecord) -> None:
        level = _libp2p_level(record)
        if not log.isEnabledFor(level):
            return
        forwarded = log.makeRecord(
            log.name,
            level,
            record.pathname,
            record.lineno,
            "%s: %s",
            (record.name, record.getMessage()),
            record.exc_info if level >= logging.WARNING else None,
            record.funcName,
        )
        log.handle(forwarded)


def configure_libp2p_logging() -> None:
    """Send py-libp2p's log records to ``dmm.p2p`` (idempotent; `open_host` calls it).

    INFO and below become DEBUG, as do WARNING/ERROR records about connections and streams
    ending normally; other WARNING/ERROR records keep their level. The library logger is
    set to DEBUG only while ``dmm.p2p`` logs DEBUG, because each enabled library debug
    call costs a record: call this again after turning ``dmm.p2p`` DEBUG on. Left alone
    when ``LIBP2P_DEBUG`` is set: the library's own logging was asked for.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    libp2p_log = logging.getLogger("libp2p")
    for handler in list(libp2p_log.handlers):
        libp2p_log.removeHandler(handler)
    libp2p_log.addHandler(_ToDmmLog())
    libp2p_log.propagate = False
    libp2p_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
