"""Joining the swarm through the bootstrap peers, and rejoining when the node falls out.

As in IPFS, a node dials every bootstrap peer when it starts, and again whenever it has
fewer than `MIN_PEERS` connections; each bootstrap peer has its own backoff. A node does
not hold a connection to each bootstrap peer for ever: a seed that many nodes bootstrap
from keeps only its high watermark of connections (node/p2p.py) and prunes the rest, and
when every pruned node dialed straight back, and refreshed its routing table each time,
the seed did little but handshakes: at 100 nodes on one seed, nodes that had just
started could not get a connection through for minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from node.dht import Dht
from node.p2p import P2PError, P2PHost

log = logging.getLogger("dmm.bootstrap")

# Below this many connections the bootstrap peers are dialed again (go-ipfs uses 4).
MIN_PEERS = 4
DIAL_TIMEOUT = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# Even with no connection change to wake it, a node looks this often.
CHECK_INTERVAL = 10.0
# A join's routing-table refresh keeps what it found by then. The library bounds each
# query, not the walk (one per non-empty bucket, each up to 30 s, and stream closes with
# no deadline): unbounded, a stalled walk held the node "not joined" and stopped it
# dialing its bootstrap peers again.
REFRESH_TIMEOUT = 120.0

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
    ) -> None:
        self._host = host
        self._dht = dht
        self._seeds = [_Seed(addr, addr.rsplit("/p2p/", 1)[-1]) for addr in addrs]
        self._on_connected = on_connected
        self.connects = 0
        self.failed_dials = 0
        self.refreshes_cut_short = 0
        self.joined = trio.Event()

    def short_of_peers(self) -> bool:
        return len(self._host.connected_peers()) < MIN_PEERS

    def due(self) -> list[_Seed]:
        """The bootstrap peers to dial now: none while the node has enough connections."""
        if not self.short_of_peers():
            return []
        now = trio.current_time()
        connected = set(self._host.connected_peers())
        return [s for s in self._seeds if s.peer not in connected and s.next_dial <= now]

    async def run(self) -> None:
        if not self._seeds:
            return
        while True:
            due = self.due()
            if due:
                await self._dial(due)
            if self._join_due():
                # Other peers reached us while no bootstrap peer answered (the DHT's
                # walks dial the nodes they learn of): join through them. With enough
                # of them no bootstrap dial is due, and the node never joined.
                await self._refresh()
            # A lost connection wakes us at once; a backoff ending, by the deadline.
            waiting = [s.next_dial for s in self._seeds if s.next_dial > trio.current_time()]
            wake = min([*waiting, trio.current_time() + CHECK_INTERVAL])
            with trio.move_on_at(wake):
                await self._host.changes.wait_until(lambda: bool(self.due()) or self._join_due())

    def _join_due(self) -> bool:
        return not self.joined.is_set() and bool(self._host.connected_peers())

    async def _dial(self, seeds: list[_Seed]) -> None:
        connected: list[str] = []
        async with trio.open_nursery() as nursery:
            for seed in seeds:
                nursery.start_soon(self._dial_one, seed, connected)
        if connected:
            # One refresh for the round: it is what finds the rest of the swarm.
            await self._refresh()

    async def _refresh(self) -> None:
        with trio.move_on_after(REFRESH_TIMEOUT) as deadline:
            try:
                await self._dht.refresh()
            except Exception as exc:  # the library's lookups raise what they like
                log.info("routing table refresh after bootstrap failed: %r", exc)
        if deadline.cancelled_caught:
            self.refreshes_cut_short += 1
            log.info(
                "routing table refresh after bootstrap cut short after %.0fs: %d peers known",
                REFRESH_TIMEOUT,
                self._dht.routing_table_size(),
            )
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
