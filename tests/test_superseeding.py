"""Elsewhere over the wire: a holder sends the puller to other peers (node/seeding.py),
the puller fetches from them, and a named peer that cannot help never stops the fetch."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

import node.fetch_session
import node.transfer
from node.peerscore import PeerScores
from node.provider import BlockProvider
from node.seeding import SuperSeeder
from storage.testmodels import generate_model
from tests.test_transfer import MiB, hold, new_store, sha256_of, swarm


class NamesOnePeer(SuperSeeder):
    """Sends every first request for a chunk to ``target``, whatever the contention."""

    def __init__(self) -> None:
        super().__init__(lambda peer: True)
        self.target = ""
        self.asked: set[tuple[str, bytes]] = set()

    def elsewhere(
        self, peer: str, digest: str, chunk_id: bytes, now: float, *, length: int
    ) -> tuple[str, ...]:
        if (peer, chunk_id) in self.asked:
            return ()
        self.asked.add((peer, chunk_id))
        self.redirected += 1
        return (self.target,)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "small.gguf"
    generate_model(path, 8 * MiB, seed=11)
    return path


async def test_the_puller_fetches_from_the_peer_it_is_sent_to(tmp_path: Path, gguf: Path) -> None:
    stores = [new_store(tmp_path, name) for name in ("seed", "other")]
    with new_store(tmp_path, "puller") as store:
        blob, again = (hold(s, "small:latest", gguf) for s in stores)
        assert blob == again
        seeder = NamesOnePeer()
        seed = BlockProvider(stores[0], PeerScores(), seeder=seeder)
        other = BlockProvider(stores[1], PeerScores())
        with trio.fail_after(60):
            async with swarm([seed, other]) as (puller, holders):
                seeder.target = holders[1].peer_id
                # Only the seed is named as a provider: the other joins through Elsewhere.
                result = await node.transfer.fetch_blob(
                    puller, store, PeerScores(), model="small:latest", digest=blob.digest,
                    size=blob.size, chunks=blob.chunks, providers=[holders[0].peer_id],
                )  # fmt: skip
        for s in stores:
            s.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        assert result.bytes_by_peer == {holders[1].peer_id: blob.size}
        assert seed.stats.blocks_served == 0
        assert seed.stats.blocks_redirected == seeder.redirected == len(set(blob.chunks))


@pytest.mark.parametrize("named", ["unreachable", "empty"])
async def test_a_named_peer_that_cannot_help_is_a_detour_not_a_failure(
    tmp_path: Path, gguf: Path, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The puller asks a named peer again a few times before coming back: short here.
    monkeypatch.setattr(node.fetch_session, "NAMED_RETRY_DELAYS", (0.05, 0.1))
    seed_store, empty_store = new_store(tmp_path, "seed"), new_store(tmp_path, "empty")
    with new_store(tmp_path, "puller") as store:
        blob = hold(seed_store, "small:latest", gguf)
        seeder = NamesOnePeer()
        seed = BlockProvider(seed_store, PeerScores(), seeder=seeder)
        empty = BlockProvider(empty_store, PeerScores())
        with trio.fail_after(60):
            async with swarm([seed, empty]) as (puller, holders):
                seeder.target = (
                    holders[1].peer_id
                    if named == "empty"
                    else ID.from_pubkey(create_new_key_pair().public_key).to_base58()
                )
                result = await node.transfer.fetch_blob(
                    puller, store, PeerScores(), model="small:latest", digest=blob.digest,
                    size=blob.size, chunks=blob.chunks, providers=[holders[0].peer_id],
                )  # fmt: skip
        seed_store.close()
        empty_store.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        # Every chunk came from the seed after all, each sent once.
        assert result.bytes_by_peer == {holders[0].peer_id: blob.size}
        assert seed.stats.blocks_redirected == len(set(blob.chunks))
        assert seed.stats.blocks_served == len(set(blob.chunks))
        if named == "empty":
            assert empty.stats.blocks_missing >= len(set(blob.chunks))
