"""Tests for node/bootstrap.py: real nodes on loopback joining through bootstrap peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import node.bootstrap
from node.daemon import Node, open_node
from node.dht import Dht
from node.testing import node_config


@asynccontextmanager
async def _joined_pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """A seed, and a node that bootstrapped from it and has joined."""
    async with (
        open_node(node_config(tmp_path, "seed")) as seed,
        open_node(node_config(tmp_path, "b", seed.host.listen_addrs)) as b,
    ):
        await b.bootstrap.joined.wait()
        yield seed, b


async def test_nodes_started_together_each_learn_every_other(tmp_path: Path) -> None:
    """Three nodes bootstrap from one seed at once: each ends with the other three in its
    routing table, and the seed with all three (with DHT streams kept between requests,
    defect 28 of node/p2p.py, the seed had kept an empty table)."""
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(open_node(node_config(tmp_path, "seed")))
        nodes = [
            await stack.enter_async_context(
                open_node(node_config(tmp_path, f"n{i}", seed.host.listen_addrs))
            )
            for i in range(3)
        ]
        everyone = {seed.peer_id, *(n.peer_id for n in nodes)}
        with trio.fail_after(60):
            for node in nodes:
                await node.bootstrap.joined.wait()
            # The last lookups of the joins are answered and their askers added.
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        for node in (seed, *nodes):
            table = set(node.dht.routing_table_peers())
            assert table == everyone - {node.peer_id}, (node.config.node.name, len(table))


async def test_a_bootstrap_peer_that_comes_up_late_is_reached(tmp_path: Path) -> None:
    seed_config = node_config(tmp_path, "seed", fixed_ports=True)
    with trio.fail_after(30):
        async with open_node(seed_config) as seed:
            seed_addr, seed_id = seed.host.listen_addrs[0], seed.peer_id
        async with open_node(node_config(tmp_path, "b", [seed_addr])) as b:
            await b.wait_until(lambda: b.bootstrap.failed_dials >= 1)
            # Backing off: the next dial waits for its time, not for the next change.
            assert b.bootstrap.due() == []
            async with open_node(seed_config) as seed:
                assert seed.peer_id == seed_id
                await b.wait_until(lambda: b.bootstrap.connects == 1)
                assert b.host.is_connected(seed_id)
                assert seed_id in b.dht.routing_table_peers()
                await b.bootstrap.joined.wait()


async def test_bootstrap_peers_are_dialed_again_only_when_short_of_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed prunes the connections of nodes that bootstrapped from it; a node with
    other peers must not dial straight back (at 100 nodes that storm kept newcomers
    out). One left alone dials its routing table first, and its seed when nobody in the
    table answers."""
    monkeypatch.setattr(node.bootstrap, "MIN_PEERS", 1)
    with trio.fail_after(30):
        async with (
            open_node(node_config(tmp_path, "seed")) as seed,
            open_node(node_config(tmp_path, "b", seed.host.listen_addrs)) as b,
        ):
            await b.wait_until(lambda: b.bootstrap.connects == 1)
            await b.bootstrap.joined.wait()
            async with open_node(node_config(tmp_path, "other")) as other:
                await b.host.connect(other.host.listen_addrs[0])
                assert await b.dht.add_peer(other.peer_id)

                await seed.host.disconnect(b.peer_id)
                await b.host.wait_connected(seed.peer_id, connected=False)
                assert b.host.connected_peers() == [other.peer_id]
                assert b.bootstrap.due() == []  # one peer is enough here
                assert b.bootstrap.neighbours_due() == []

                await b.host.disconnect(other.peer_id)
                await b.wait_until(lambda: b.bootstrap.neighbour_connects == 1)
                assert b.host.connected_peers() == [other.peer_id]
                assert b.bootstrap.connects == 1
            # Its one table peer is gone (and was just dialed): the seed is the fallback.
            await b.wait_until(lambda: b.bootstrap.connects == 2)
            assert b.host.is_connected(seed.peer_id)


async def test_a_joined_node_left_with_its_seed_tops_up_from_its_routing_table(
    tmp_path: Path,
) -> None:
    """Gossip travels on connections. In a 100-node swarm most joined nodes were left
    holding one connection, to their seed, once their lookups' connections had closed:
    with no mesh of their own, announcements never reached them."""
    with trio.fail_after(60):
        async with open_node(node_config(tmp_path, "seed")) as seed:
            boot = seed.host.listen_addrs
            async with (
                open_node(node_config(tmp_path, "x1", boot)) as x1,
                open_node(node_config(tmp_path, "x2", boot)) as x2,
                open_node(node_config(tmp_path, "x3", boot)) as x3,
                open_node(node_config(tmp_path, "b", boot)) as b,
            ):
                others = {x.peer_id for x in (x1, x2, x3)}
                await b.bootstrap.joined.wait()
                await b.wait_until(lambda: others <= set(b.dht.routing_table_peers()))
                for peer in others:
                    await b.host.disconnect(peer)
                await b.wait_until(lambda: all(b.host.is_connected(p) for p in others))
                assert b.bootstrap.connects == 1  # the seed was not dialed again
                assert b.host.is_connected(seed.peer_id)


async def test_a_thin_routing_table_is_refreshed_again_backing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joining nodes whose lookups timed out on a busy seed (60 of 80 at 100 nodes in one
    process) kept the seed alone in their tables, and nothing ever refreshed them."""
    monkeypatch.setattr(node.bootstrap, "THIN_RETRY_FIRST", 0.2)
    with trio.fail_after(30):
        async with _joined_pair(tmp_path) as (_seed, b):
            assert b.dht.routing_table_size() < node.bootstrap.MIN_PEERS  # the seed alone
            await b.wait_until(lambda: b.bootstrap.refreshes >= 3)
            # 0.2 s after the join's refresh, then 0.4 s, 0.8 s...: backing off, not
            # hammering the seed.
            boot = b.bootstrap
            assert boot.next_refresh - boot.refreshed_at == pytest.approx(
                0.2 * 2 ** (boot.refreshes - 1)
            )


async def test_a_full_enough_routing_table_is_refreshed_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.bootstrap, "MIN_PEERS", 1)
    monkeypatch.setattr(node.bootstrap, "REFRESH_INTERVAL", 0.5)
    with trio.fail_after(30):
        async with _joined_pair(tmp_path) as (_seed, b):
            await b.wait_until(lambda: b.bootstrap.refreshes >= 3)
            boot = b.bootstrap
            assert boot.next_refresh - boot.refreshed_at == pytest.approx(0.5)
            assert boot.connects == 1  # refreshed, not re-joined


async def test_redialing_the_seed_does_not_refresh_a_table_that_is_full_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed over its high watermark prunes idle connections; nodes that redialed it
    and refreshed their whole table each time kept a 100-node swarm busy with lookups."""
    monkeypatch.setattr(node.bootstrap, "MIN_PEERS", 1)  # the seed alone is enough
    with trio.fail_after(30):
        async with _joined_pair(tmp_path) as (seed, b):
            assert b.bootstrap.refreshes == 1
            for dials in (2, 3):
                await seed.host.disconnect(b.peer_id)
                await b.wait_until(lambda n=dials: b.bootstrap.connects == n)
            # The third dial came after the second's round was over, refresh or not.
            assert b.bootstrap.refreshes == 1


async def test_a_join_whose_refresh_stalls_still_ends_and_keeps_dialing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh after a bootstrap dial had no deadline: one that stalled left the node
    never joined, and its bootstrapper never dialed again. A stalled DHT walk cannot be
    made on demand with real peers, so the refresh is made to stall here."""

    async def stalls(self: Dht) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(node.bootstrap, "REFRESH_TIMEOUT", 0.5)
    monkeypatch.setattr(Dht, "refresh", stalls)
    with trio.fail_after(30):
        async with _joined_pair(tmp_path) as (seed, b):
            assert b.bootstrap.refreshes_cut_short == 1
            await seed.host.disconnect(b.peer_id)
            await b.wait_until(lambda: b.bootstrap.connects == 2)
            await b.wait_until(lambda: b.bootstrap.refreshes_cut_short >= 2)


async def test_a_node_reached_by_peers_before_its_seed_joins_through_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose bootstrap peer did not answer, but that enough other peers dialed (DHT
    walks dial the nodes they learn of), had no bootstrap dial due and never refreshed its
    routing table: in a 200-node run one node stayed "not joined" for 10 minutes."""
    monkeypatch.setattr(node.bootstrap, "MIN_PEERS", 1)
    seed_config = node_config(tmp_path, "seed", fixed_ports=True)
    async with open_node(seed_config) as seed:
        dead_seed = seed.host.listen_addrs[0]
    with trio.fail_after(30):
        async with (
            open_node(node_config(tmp_path, "b", [dead_seed])) as b,
            open_node(node_config(tmp_path, "other")) as other,
        ):
            await b.wait_until(lambda: b.bootstrap.failed_dials >= 1)
            await other.host.connect(b.host.listen_addrs[0])
            await b.bootstrap.joined.wait()
            assert b.bootstrap.connects == 0
            assert other.peer_id in b.dht.routing_table_peers()
