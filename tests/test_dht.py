"""Tests for node/dht.py: real hosts on 127.0.0.1 running our Kademlia in one trio process.

Latencies are printed (run with ``-s``) for information, never asserted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import nacl.signing
import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht import provider_store
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from node.dht import PROVIDE_WALKS, Dht, ProviderInfo, provider_key_bytes
from node.p2p import KadDht, P2PHost, open_host, trace_walks
from protocols.catalog import index_key_for_glob, index_keys_for_name
from protocols.errors import LocalProtocolError
from protocols.records import VersionRecord, hlc_pack, version_key

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MODEL = "registry.ollama.ai/library/llama3"
HLC = hlc_pack(1_700_000_000_000, 0)


@dataclasses.dataclass
class Node:
    host: P2PHost
    dht: Dht

    @property
    def peer_id(self) -> str:
        return self.host.peer_id


@asynccontextmanager
async def dht_nodes(count: int, **kwargs: float) -> AsyncIterator[list[Node]]:
    """`count` hosts, each running a started `Dht`; nothing connected yet."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(open_host(create_new_key_pair(), [LOOPBACK]))
            for _ in range(count)
        ]
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes = []
        for host in hosts:
            dht = Dht(host, **kwargs)  # type: ignore[arg-type]
            await nursery.start(dht.run)
            nodes.append(Node(host, dht))
        yield nodes


async def link(a: Node, b: Node) -> None:
    """Connect a and b and put each in the other's routing table.

    Both sides dial: the dial is what teaches a host the other's listen address (the
    second one reuses the connection).
    """
    await a.host.connect(b.host.listen_addrs[0])
    await b.host.connect(a.host.listen_addrs[0])
    assert await a.dht.add_peer(b.peer_id)
    assert await b.dht.add_peer(a.peer_id)


async def star(hub: Node, others: list[Node]) -> None:
    """Link every node to the hub, then refresh every table: each then knows all."""
    for node in others:
        await link(node, hub)
    for node in [hub, *others]:
        await node.dht.refresh()


def record(
    signing_key: nacl.signing.SigningKey,
    *,
    model: str = MODEL,
    tag: str = "latest",
    hlc: int = HLC,
    content: bytes = b"manifest",
) -> VersionRecord:
    return VersionRecord.sign(
        model=model,
        tag=tag,
        manifest_digest="sha256:" + hashlib.sha256(content).hexdigest(),
        size=len(content),
        parents=(),
        hlc=hlc,
        signing_key=signing_key,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def ids(providers: list[ProviderInfo]) -> list[str]:
    return [provider.peer_id for provider in providers]


async def test_five_nodes_provide_and_find() -> None:
    """One node provides a model key and its index keys; another finds it, listed once."""
    with trio.fail_after(30):
        async with dht_nodes(5) as nodes:
            hub, provider, *_, finder = nodes
            await star(hub, nodes[1:])
            assert all(node.dht.routing_table_size() == 4 for node in nodes)

            keys = ["/dmm/model/llama3", *index_keys_for_name("llama3")]
            start = time.perf_counter()
            for key in keys:
                assert await provider.dht.provide(key)
            provided = (time.perf_counter() - start) / len(keys)
            start = time.perf_counter()
            found = await finder.dht.find_providers("/dmm/model/llama3")
            print(f"\n5 nodes: provide {ms(provided)}/key, find {ms(time.perf_counter() - start)}")
            assert ids(found) == [provider.peer_id]
            (addr,) = found[0].addrs
            assert addr == provider.host.listen_addrs[0]
            assert ids(await finder.dht.find_providers(index_key_for_glob("lla*"))) == [
                provider.peer_id
            ]
            assert ids(await finder.dht.find_providers(index_key_for_glob("*"))) == [
                provider.peer_id
            ]
            assert await finder.dht.find_providers("/dmm/model/nobody-has-this") == []
            # A provider does not list itself; a second provider is listed too.
            assert await provider.dht.find_providers("/dmm/model/llama3") == []
            assert await finder.dht.provide("/dmm/model/llama3")
            found = await nodes[2].dht.find_providers("/dmm/model/llama3")
            assert sorted(ids(found)) == sorted([provider.peer_id, finder.peer_id])


async def test_three_hops_find_provider_and_version() -> None:
    """A-B-C-D in a line: A's routing table lacks D, yet A finds D's provider record and
    D's version record through B and C."""
    signing_key = nacl.signing.SigningKey.generate()
    with trio.fail_after(30):
        async with dht_nodes(4) as (a, b, c, d):
            # The library refreshes each routing table once when its service starts:
            # let that finish while every node is alone.
            await trio.testing.wait_all_tasks_blocked()
            # D, still alone, keeps both records to itself.
            assert not await d.dht.provide("/dmm/model/deep")
            deep = record(signing_key, model="registry.ollama.ai/library/deep")
            assert await d.dht.put_version(deep)
            await link(a, b)
            await link(b, c)
            await link(c, d)
            assert a.dht.routing_table_peers() == [b.peer_id]
            assert d.peer_id not in a.host.connected_peers()

            start = time.perf_counter()
            assert ids(await a.dht.find_providers("/dmm/model/deep")) == [d.peer_id]
            found = time.perf_counter() - start
            start = time.perf_counter()
            assert await a.dht.get_version(deep.model, deep.tag) == deep
            print(f"\n3 hops: find {ms(found)}, get {ms(time.perf_counter() - start)}")
            assert d.peer_id in a.dht.routing_table_peers()


async def test_a_provider_lookup_in_a_network_known_whole_is_one_walk() -> None:
    """Peers named without an address need a FIND_NODE walk first; when the routing table
    holds every peer, none are, and the lookup does not make that walk (it did, always)."""
    with trio.fail_after(30):
        async with dht_nodes(4) as nodes:
            hub, provider, *_, finder = nodes
            await star(hub, nodes[1:])
            assert await provider.dht.provide("/dmm/model/known")
            routing = finder.dht._kad.peer_routing
            closest_walks = 0
            library_walk = routing.find_closest_peers_network

            async def counted(key: bytes, count: int = 20) -> list[object]:
                nonlocal closest_walks
                closest_walks += 1
                return await library_walk(key, count)

            routing.find_closest_peers_network = counted  # type: ignore[method-assign]
            assert ids(await finder.dht.find_providers("/dmm/model/known")) == [provider.peer_id]
            assert closest_walks == 0


async def test_provides_in_a_network_a_walk_found_whole_do_not_walk_again() -> None:
    """In a network smaller than a bucket every provide walk asked everyone: a pulled
    model's 7 keys cost 7 walks of the whole network. After one walk found it whole,
    provides tell every peer at once and lookups ask every peer at once, until a peer the
    walk did not find shows up."""
    keys = [f"/dmm/model/w{i}" for i in range(6)]
    with trio.fail_after(30):
        async with dht_nodes(6) as nodes:
            hub, provider, *others, late = nodes
            await star(hub, [provider, *others])
            with trace_walks() as walks:
                for key in keys:
                    assert await provider.dht.provide(key)
            assert len(walks) == 1
            for key in keys:
                for finder in [hub, *others]:
                    assert ids(await finder.dht.find_providers(key)) == [provider.peer_id]
            # Those lookups found the network whole too: the next asks everyone at once.
            with trace_walks() as walks:
                assert ids(await hub.dht.find_providers(keys[0])) == [provider.peer_id]
            assert [(w.rounds, w.asked) for w in walks] == [(1, 4)]
            # A newcomer in the provider's table: the next provide walks, and reaches it.
            await link(late, provider)
            with trace_walks() as walks:
                assert await provider.dht.provide("/dmm/model/after")
            assert len(walks) == 1
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # ADD_PROVIDER has no reply
            assert late.dht._kad.provider_store.get_providers(
                provider_key_bytes("/dmm/model/after")
            )


async def test_a_node_walks_for_a_few_provides_at_a_time() -> None:
    """A new model's ~8 keys were provided all at once: on a busy node every walk slowed
    until its requests timed out and the records were stored nowhere."""
    keys = [f"/dmm/model/m{i}" for i in range(3 * PROVIDE_WALKS)]
    with trio.fail_after(30):
        async with dht_nodes(3) as nodes:
            provider, *others = nodes
            await star(provider, others)
            kad = provider.dht._kad
            walking = most = 0
            in_flight: list[int] = []
            provide_key = kad.provide_key

            async def counted(key: bytes) -> bool:
                nonlocal walking, most
                walking += 1
                most = max(most, walking)
                in_flight.append(provider.dht.provides_in_flight)
                try:
                    return await provide_key(key)
                finally:
                    walking -= 1

            kad.provide_key = counted  # type: ignore[method-assign]
            sent: list[bool] = []

            async def provide(key: str) -> None:
                sent.append(await provider.dht.provide(key))

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(provide, key)
            assert sent == [True] * len(keys)
            assert most == PROVIDE_WALKS
            # Those waiting for a walk count as under way: the node is not settled.
            assert max(in_flight) == len(keys)
            assert provider.dht.provides_in_flight == 0
            for key in keys:
                assert ids(await others[0].dht.find_providers(key)) == [provider.peer_id]


class AcceptAnything(Validator):
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


async def test_version_records_are_validated_by_the_nodes_that_store_them() -> None:
    """A rogue node that skips validation puts a badly signed record and a record under
    another model's key: every honest node refuses them, so neither can be fetched.
    Of two valid records the newest wins, whichever order they were put in."""
    author = nacl.signing.SigningKey.generate()
    old = record(author, hlc=hlc_pack(1_700_000_000_000, 0), content=b"v1")
    new = record(author, hlc=hlc_pack(1_700_000_000_001, 0), content=b"v2")
    forged = dataclasses.replace(new, signature=bytes(64))
    other = record(author, model="registry.ollama.ai/library/other", content=b"x")
    with trio.fail_after(40):
        async with dht_nodes(4) as honest, AsyncExitStack() as stack:
            rogue_host = await stack.enter_async_context(
                open_host(create_new_key_pair(), [LOOPBACK])
            )
            rogue = KadDht(rogue_host, {"dmm": AcceptAnything()})
            await stack.enter_async_context(background_trio_service(rogue))
            for node in honest[1:]:
                await link(node, honest[0])
            for node in honest:
                await rogue_host.connect(node.host.listen_addrs[0])
                await node.host.connect(rogue_host.listen_addrs[0])
                await node.dht.add_peer(rogue_host.peer_id)
            for node in honest:
                await node.dht.refresh()

            key = version_key(MODEL, "latest")
            await rogue.put_value(key, forged.encode())
            await rogue.put_value(key, other.encode())
            await rogue.put_value("/dmm/model/llama3", b"not a version record")
            for node in honest:
                assert node.dht._kad.value_store.get(key.encode()) is None
                assert node.dht._kad.value_store.get(b"/dmm/model/llama3") is None
            # The rogue still serves its forgery; the getter validates every answer.
            assert await honest[1].dht.get_version(MODEL, "latest") is None

            assert await honest[1].dht.put_version(old)
            assert await honest[2].dht.put_version(new)
            assert await honest[3].dht.get_version(MODEL, "latest") == new
            # Putting the older one again: refused here, and by every node that stores it.
            assert not await honest[1].dht.put_version(old)
            await rogue.put_value(key, old.encode())
            for node in honest:
                assert await node.dht.get_version(MODEL, "latest") == new

            with pytest.raises(LocalProtocolError):
                await honest[0].dht.put_version(forged)
            # A name too long for a readable key (peers serve 128 bytes) goes under its
            # hash, and is stored, validated and found like any other.
            long_model, long_tag = "registry.ollama.ai/library/" + "m" * 80, "t" * 30
            long_record = record(author, model=long_model, tag=long_tag)
            assert await honest[0].dht.put_version(long_record)
            assert await honest[3].dht.get_version(long_model, long_tag) == long_record


async def test_reprovide_outlives_the_provider_record_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Provider records expire on the wall clock (48 h, a module constant): with it cut
    to 1 s, a key re-provided every 0.2 s stays findable after 1.5 s while one
    unprovided at the start is gone everywhere."""
    ttl = 1.0
    monkeypatch.setattr(provider_store, "PROVIDER_RECORD_EXPIRATION_INTERVAL", ttl)
    with trio.fail_after(30):
        async with dht_nodes(3, reprovide_interval=0.2) as (provider, hub, finder):
            await link(provider, hub)
            await link(finder, hub)
            await provider.dht.refresh()
            await finder.dht.refresh()
            kad = provider.dht._kad
            calls: list[tuple[float, bytes]] = []
            enough = trio.Event()
            provide_key = kad.provide_key

            async def counting_provide_key(key: bytes) -> bool:
                sent = await provide_key(key)
                calls.append((time.monotonic(), key))
                if time.monotonic() - started > 1.5 * ttl:
                    enough.set()
                return sent

            monkeypatch.setattr(kad, "provide_key", counting_provide_key)
            started = time.monotonic()
            assert await provider.dht.provide("/dmm/model/kept")
            assert await provider.dht.provide("/dmm/model/dropped")
            assert ids(await finder.dht.find_providers("/dmm/model/dropped")) == [provider.peer_id]
            provider.dht.unprovide("/dmm/model/dropped")
            await enough.wait()

            kept = provider_key_bytes("/dmm/model/kept")
            assert {key for _, key in calls} == {kept, provider_key_bytes("/dmm/model/dropped")}
            assert len([key for _, key in calls if key == kept]) >= 5
            assert provider.dht.stats.reprovides >= 4
            assert provider.dht.provided_keys() == ["/dmm/model/kept"]
            assert ids(await finder.dht.find_providers("/dmm/model/kept")) == [provider.peer_id]
            assert await finder.dht.find_providers("/dmm/model/dropped") == []
            assert await hub.dht.find_providers("/dmm/model/dropped") == []
