"""Joining the swarm through the bootstrap peers, and staying in it.

As in IPFS, a node dials every bootstrap peer when it starts, and again whenever it has
fewer than `MIN_PEERS` connections; each bootstrap peer has its own backoff. A node does
not hold a connection to each bootstrap peer for ever: a seed that many nodes bootstrap
from keeps only its high watermark of connections (node/p2p.py) and prunes the rest, and
when every pruned node dialed straight back, and refreshed its routing table each time,
the seed did little but handshakes: at 100 nodes on one seed, nodes that had just
started could not get a connection through for minutes.

So once a node has joined, it tops itself up to `MIN_PEERS` from its routing table
first (random peers, each with its own backoff), and falls back on the bootstrap peers
only when the table has nobody left to dial. Connections are what gossip travels on:
a joined node left holding only its seed (most of a 100-node swarm, once its lookups'
connections were gone) had no mesh of its own, and announcements never reached it.
The table itself is refreshed every `REFRESH_INTERVAL`, as in Kademlia, and sooner
(backing off) while it is too thin to top up from.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from node.dht import Dht
from node.p2p import P2PError, P2PHost

log = logging.getLogger("dmm.bootstrap")

# Below this many connections a node dials more (go-ipfs uses 4 for its bootstrap): the
# announce topic's gossip mesh (node/announce.py: D = 6, D_low = 4) is drawn from them.
MIN_PEERS = 6
DIAL_TIMEOUT = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# Even with no connection change to wake it, a node looks this often.
CHECK_INTERVAL = 10.0
# A routing-table peer we connected to is not dialed again for this long, should the
# connection end (a peer over its high watermark prunes the idle ones).
REDIAL_AFTER = 30.0
# A join's routing-table refresh keeps what it found by then. Each request is bounded,
# not the refresh (a few walks, each as long as its slowest round): unbounded, a stalled
# walk held the node "not joined" and stopped it dialing its bootstrap peers again.
REFRESH_TIMEOUT = 120.0
# Kademlia refreshes its table hourly (the paper's tRefresh). go-libp2p-kad-dht's 10
# minutes come with skipping the prefix lengths a lookup covered since; every refresh
# dials the peers its walks ask, and at 10 minutes a 200-node swarm in one process spent
# its whole core on those refreshes' connections once it had grown. New peers still
# reach the table sooner: those that ask us, and those our lookups' answers name.
REFRESH_INTERVAL = 3600.0
# A table thinner than MIN_PEERS after a refresh is refreshed again soon, backing off:
# a join whose lookups timed out on a busy seed (60 of 80 joining nodes at 100 in one
# process) kept the seed alone in its table, and so could not top up its connections.
THIN_RETRY_FIRST = 5.0
THIN_RETRY_MAX = 300.0

# What a failed dial raises varies with where it failed.
_DIAL_ERRORS = (OSError, trio.TooSlowError, P2PError, trio.BrokenResourceError)


@dataclass(slots=True)
class _Seed:
    addr: str
    peer: str
    delay: float = BACKOFF_FIRST
    next_dial: float = -float("inf")  # trio time


class Bootstrapper:
    """Dials the bootstrap peers at start and whenever the node is short of connections.

    ``on_connected(peer)`` is called after each successful bootstrap dial; ``connects``
    and ``failed_dials`` count the dials, and the host's ``changes`` hear of each.
    ``joined`` is set once a bootstrap peer was reached, or other peers reached us while
    none was, and the routing-table refresh that followed is over (or cut short after
    `REFRESH_TIMEOUT`, counted in ``refreshes_cut_short``): the node has found what part
    of the swarm it could.
    """

    def __init__(
        self,
        host: P2PHost,
        dht: Dht,
        addrs: Sequence[str],
        on_connected: Callable[[str], None],
        *,
        shunned: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self._host = host
        self._dht = dht
        self._seeds = [_Seed(addr, addr.rsplit("/p2p/", 1)[-1]) for addr in addrs]
        self._on_connected = on_connected
        self._shunned = shunned
        # Routing-table peers dialed lately: peer -> (not before, delay after a failure).
        self._neighbour_backoff: dict[str, tuple[float, float]] = {}
        # Trio times of the last refresh's end and of the next one; set by each refresh.
        self.refreshed_at = -float("inf")
        self.next_refresh = float("inf")
        self._thin_retry = THIN_RETRY_FIRST
        self.neighbour_connects = 0
        self.connects = 0
        self.failed_dials = 0
        self.refreshes = 0
        self.refreshes_cut_short = 0
        self.joined = trio.Event()

    async def wait_joined(self, timeout: float) -> bool:
        """Wait until the node has joined the network through its bootstrap peers (its
        first routing-table refresh after connecting), for up to ``timeout`` seconds: a
        DHT lookup made before then, by a node just started, finds no one. True at once
        for a node with no bootstrap peers."""
        if not self._seeds:
            return True
        with trio.move_on_after(timeout):
            await self.joined.wait()
        return self.joined.is_set()

    def short_of_peers(self) -> bool:
        return len(self._host.connected_peers()) < MIN_PEERS

    def due(self) -> list[_Seed]:
        """The bootstrap peers to dial now: none while the node has enough connections,
        or, once it has joined, while its routing table has peers left to dial."""
        if not self.short_of_peers():
            return []
        if self.joined.is_set() and self.neighbours_due():
            return []
        now = trio.current_time()
        connected = set(self._host.connected_peers())
        return [s for s in self._seeds if s.peer not in connected and s.next_dial <= now]

    def neighbours_due(self) -> list[str]:
        """Routing-table peers a node short of connections may dial now: not connected,
        not a bootstrap peer (those keep their own backoff), not shunned, not backing off."""
        if not self.short_of_peers():
            return []
        now = trio.current_time()
        skip = {*self._host.connected_peers(), *(s.peer for s in self._seeds)}
        skip.add(self._host.peer_id)
        return [
            peer
            for peer in self._dht.routing_table_peers()
            if peer not in skip
            and self._neighbour_backoff.get(peer, (now, 0.0))[0] <= now
            and not self._shunned(peer)
        ]

    async def run(self) -> None:
        if not self._seeds:
            return  # a node nobody told of others waits to be found (seeds, mDNS)
        while True:
            due = self.due()
            if due:
                await self._dial(due)
            if self._join_due():
                # Other peers reached us while no bootstrap peer answered (the DHT's
                # walks dial the nodes they learn of): join through them. With enough
                # of them no bootstrap dial is due, and the node never joined.
                await self._refresh()
            elif self.joined.is_set() and trio.current_time() >= self.next_refresh:
                await self._refresh()
            neighbours = self.neighbours_due()
            if neighbours and self.joined.is_set():
                await self._dial_neighbours(neighbours)
            # A lost connection wakes us at once; a backoff or refresh falling due, by
            # the deadline.
            now = trio.current_time()
            waiting = [s.next_dial for s in self._seeds if s.next_dial > now]
            waiting.append(self.next_refresh)
            waiting += [t for t, _ in self._neighbour_backoff.values() if t > now]
            wake = min([*waiting, now + CHECK_INTERVAL])
            with trio.move_on_at(wake):
                await self._host.changes.wait_until(self._work_due)

    def _work_due(self) -> bool:
        if self._join_due() or (self.joined.is_set() and self.neighbours_due()):
            return True
        return bool(self.due())

    def _join_due(self) -> bool:
        return not self.joined.is_set() and bool(self._host.connected_peers())

    async def _dial_neighbours(self, candidates: list[str]) -> None:
        table = set(self._dht.routing_table_peers())
        for gone in [p for p in self._neighbour_backoff if p not in table]:
            del self._neighbour_backoff[gone]
        wanted = MIN_PEERS - len(self._host.connected_peers())
        chosen = random.sample(candidates, min(max(wanted, 0), len(candidates)))
        async with trio.open_nursery() as nursery:
            for peer in chosen:
                nursery.start_soon(self._dial_neighbour, peer)

    async def _dial_neighbour(self, peer: str) -> None:
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self._host.connect_peer(peer)
        except _DIAL_ERRORS as exc:
            delay = self._neighbour_backoff.get(peer, (0.0, BACKOFF_FIRST))[1]
            self._neighbour_backoff[peer] = (
                trio.current_time() + delay,
                min(delay * 2, BACKOFF_MAX),
            )
            log.debug("routing-table peer %s unreachable (%s); retrying in %.0fs", peer, exc, delay)
            self._host.changes.notify()
            return
        # Not again for a while even so: a peer over its high watermark prunes us.
        self._neighbour_backoff[peer] = (trio.current_time() + REDIAL_AFTER, BACKOFF_FIRST)
        self.neighbour_connects += 1
        self._host.changes.notify()
        log.debug("connected to routing-table peer %s (short of peers)", peer)

    async def _dial(self, seeds: list[_Seed]) -> None:
        connected: list[str] = []
        async with trio.open_nursery() as nursery:
            for seed in seeds:
                nursery.start_soon(self._dial_one, seed, connected)
        if connected and (not self.joined.is_set() or self._dht.routing_table_size() < MIN_PEERS):
            # One refresh for the round: it is what finds the rest of the swarm. A joined
            # node with a table to top up from has its periodic refresh instead: nodes the
            # seed pruned, redialing it and refreshing each time, kept a 100-node swarm
            # busy with lookups.
            await self._refresh()

    async def _refresh(self) -> None:
        with trio.move_on_after(REFRESH_TIMEOUT) as deadline:
            try:
                await self._dht.refresh()
            except Exception as exc:  # the library's lookups raise what they like
                log.info("routing table refresh failed: %r", exc)
        if deadline.cancelled_caught:
            self.refreshes_cut_short += 1
            log.info(
                "routing table refresh cut short after %.0fs: %d peers known",
                REFRESH_TIMEOUT,
                self._dht.routing_table_size(),
            )
        self.refreshed_at = trio.current_time()
        if self._dht.routing_table_size() < MIN_PEERS:
            self.next_refresh = self.refreshed_at + self._thin_retry
            self._thin_retry = min(self._thin_retry * 2, THIN_RETRY_MAX)
        else:
            self.next_refresh = self.refreshed_at + REFRESH_INTERVAL
            self._thin_retry = THIN_RETRY_FIRST
        self.refreshes += 1
        self.joined.set()
        self._host.changes.notify()

    async def _dial_one(self, seed: _Seed, connected: list[str]) -> None:
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self._host.connect(seed.addr)
            await self._dht.add_peer(seed.peer)
        except _DIAL_ERRORS as exc:
            seed.next_dial = trio.current_time() + seed.delay
            log.info(
                "bootstrap peer %s unreachable (%s); retrying in %.0fs", seed.peer, exc, seed.delay
            )
            seed.delay = min(seed.delay * 2, BACKOFF_MAX)
            self.failed_dials += 1
            self._host.changes.notify()
            return
        seed.delay = BACKOFF_FIRST
        self.connects += 1
        self._host.changes.notify()
        log.info("connected to bootstrap peer %s", seed.peer)
        self._on_connected(seed.peer)
        connected.append(seed.peer)
