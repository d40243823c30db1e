"""node/provider.py + node/transfer.py: /dmm/blocks/1 between real libp2p hosts on 127.0.0.1.

Every node has its own ModelStore on disk; holders get real GGUF models through
``store.add_model``, so their chunk index is the real one, and the puller receives the
chunk list a holder's database gives (``db.blob_chunks``), as the catalog would send it.
Misbehaving providers are subclasses of the real one: everything goes over the real wire.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.p2p import P2PHost, open_host
from node.peerscore import PeerScores
from node.provider import BLOCKS_PROTOCOL, BlockProvider
from node.transfer import FetchResult, TransferError, fetch_blob
from protocols.blocks import (
    NEED_DATA,
    BlockExchange,
    EndOfStream,
    ErrorReply,
    HaveReply,
    Role,
    WantBlock,
    WantHave,
)
from protocols.framing import encode_frame
from storage.chunks import ChunkRef
from storage.partial import partial_paths
from storage.store import ModelStore
from storage.testmodels import generate_model

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MiB = 1024 * 1024
BIG = 64 * MiB
STALL = 2.0  # seconds a stalling provider sits on each block
LONG_TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}" * 40


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "big.gguf"
    generate_model(path, BIG, seed=7)
    return path


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    chunks: list[ChunkRef]


def new_store(root: Path, name: str) -> ModelStore:
    base = root / name
    return ModelStore(base / "models", base / "data" / "dmm.db", base / "data" / "cas")


def hold(store: ModelStore, name: str, gguf: Path) -> Blob:
    """Add ``gguf`` to ``store`` as ``name``; the model blob as a puller is told of it."""
    added = store.add_model(name, gguf)
    chunks = store.db.blob_chunks(added.model_blob)
    return Blob(added.model_blob, sum(c.length for c in chunks), chunks)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Holder:
    peer_id: str
    provider: BlockProvider
    stop: trio.Event = field(default_factory=trio.Event)


async def _serve(
    provider: BlockProvider, stop: trio.Event, *, task_status: trio.TaskStatus[P2PHost]
) -> None:
    async with open_host(create_new_key_pair(), [LOOPBACK]) as host:
        host.set_stream_handler(BLOCKS_PROTOCOL, provider.handle)
        task_status.started(host)
        await stop.wait()


@asynccontextmanager
async def swarm(providers: Sequence[BlockProvider]) -> AsyncIterator[tuple[P2PHost, list[Holder]]]:
    """A puller host connected to one host per provider; ``Holder.stop`` closes one."""
    holders: list[Holder] = []
    async with trio.open_nursery() as nursery:
        try:
            async with open_host(create_new_key_pair(), [LOOPBACK]) as puller:
                for provider in providers:
                    stop = trio.Event()
                    host = await nursery.start(_serve, provider, stop)
                    await puller.connect(host.listen_addrs[0])
                    holders.append(Holder(host.peer_id, provider, stop))
                yield puller, holders
        finally:
            for holder in holders:
                holder.stop.set()


async def fetch(
    puller: P2PHost,
    store: ModelStore,
    scores: PeerScores,
    blob: Blob,
    holders: Sequence[Holder],
    *,
    model: str = "llama:latest",
    on_progress: Callable[[int], None] | None = None,
    **kwargs: object,
) -> FetchResult:
    return await fetch_blob(
        puller,
        store,
        scores,
        model=model,
        digest=blob.digest,
        size=blob.size,
        chunks=blob.chunks,
        providers=[h.peer_id for h in holders],
        on_progress=on_progress,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_64_mib_blob_between_two_nodes_is_bit_exact_and_hidden_until_done(
    tmp_path: Path, big_gguf: Path
) -> None:
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        blob = hold(held, "llama:latest", big_gguf)
        final = store.cas.path(blob.digest)
        partial_file, _ = partial_paths(store.cas, blob.digest)
        # (blob visible, partial present, blob in the database) as each chunk lands
        seen: list[tuple[bool, bool, bool]] = []

        def on_progress(n: int) -> None:
            indexed = store.db.get_blob(blob.digest) is not None
            seen.append((final.exists(), partial_file.exists(), indexed))

        provider = BlockProvider(held, PeerScores())
        with trio.fail_after(60):
            async with swarm([provider]) as (puller, holders):
                started = trio.current_time()
                result = await fetch(
                    puller, store, PeerScores(), blob, holders, on_progress=on_progress
                )
                seconds = trio.current_time() - started
        # Shown with `pytest -s`: the figure the report quotes.
        print(f"64 MiB between two hosts in one process: {blob.size / seconds / 1e6:.0f} MB/s")
        assert result.path == final
        assert await trio.to_thread.run_sync(sha256_of, final) == blob.digest
        assert seen and set(seen) == {(False, True, False)}
        assert not partial_file.exists()
        assert result.bytes_fetched == blob.size and result.bytes_local == 0
        assert result.bytes_by_peer == {holders[0].peer_id: blob.size}
        assert result.peers_used == (holders[0].peer_id,)
        assert provider.stats.bytes_out[puller.peer_id] == blob.size
        assert store.db.blob_chunks(blob.digest) == blob.chunks
        assert [d.bytes_fetched for d in store.db.deltas("llama:latest")] == [blob.size]


async def test_three_holders_share_the_work_and_one_dying_midway_is_survived(
    tmp_path: Path, big_gguf: Path
) -> None:
    stores = [new_store(tmp_path, f"holder{i}") for i in range(3)]
    with new_store(tmp_path, "puller") as store:
        blobs = [hold(s, "llama:latest", big_gguf) for s in stores]
        blob = blobs[0]
        assert all(b == blob for b in blobs)
        # Rate-limited so the transfer lasts long enough to kill a holder in the middle.
        providers = [BlockProvider(s, PeerScores(), rate_limit=24 * MiB) for s in stores]
        done = 0
        quarter = trio.Event()

        def on_progress(n: int) -> None:
            nonlocal done
            done += n
            if done >= blob.size // 4:
                quarter.set()

        with trio.fail_after(60):
            async with swarm(providers) as (puller, holders), trio.open_nursery() as nursery:
                victim = holders[0]

                async def kill() -> None:
                    await quarter.wait()
                    victim.stop.set()

                nursery.start_soon(kill)
                result = await fetch(
                    puller, store, PeerScores(), blob, holders, on_progress=on_progress
                )
                assert victim.peer_id not in puller.connected_peers()
        for s in stores:
            s.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        assert victim.stop.is_set()
        assert sum(result.bytes_by_peer.values()) == result.bytes_fetched == blob.size
        assert len(result.peers_used) >= 2
        assert result.bytes_by_peer.get(victim.peer_id, 0) < blob.size
        survivors = [h.peer_id for h in holders[1:]]
        assert sum(result.bytes_by_peer.get(p, 0) for p in survivors) > 0


class FlippingProvider(BlockProvider):
    """Serves every block with one bit flipped, after the provider's own check."""

    def _load_block(self, want: WantBlock) -> bytearray | None:
        buf = super()._load_block(want)
        if buf is not None:
            buf[-1] ^= 0x01
        return buf


async def test_a_provider_of_corrupt_blocks_is_banned_and_disconnected(
    tmp_path: Path, big_gguf: Path
) -> None:
    stores = [new_store(tmp_path, f"holder{i}") for i in range(3)]
    with new_store(tmp_path, "puller") as store:
        blobs = [hold(s, "llama:latest", big_gguf) for s in stores]
        blob = blobs[0]
        assert all(b == blob for b in blobs)
        evil = FlippingProvider(stores[0], PeerScores())
        providers = [evil, *(BlockProvider(s, PeerScores()) for s in stores[1:])]
        scores = PeerScores()
        with trio.fail_after(60):
            async with swarm(providers) as (puller, holders):
                result = await fetch(puller, store, scores, blob, holders)
                evil_id = holders[0].peer_id
                assert evil_id not in puller.connected_peers()
        for s in stores:
            s.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        assert scores.is_banned(evil_id)
        assert scores.get(evil_id).bad_chunks >= scores.ban_after
        assert evil.stats.blocks_served >= scores.ban_after
        assert evil_id not in result.bytes_by_peer
        assert sum(result.bytes_by_peer.values()) == blob.size
        for honest in holders[1:]:
            assert not scores.is_banned(honest.peer_id)


class StallingProvider(BlockProvider):
    """Says it has every chunk, then takes far longer than the puller waits for each."""

    def _load_block(self, want: WantBlock) -> bytearray | None:
        time.sleep(STALL)
        return super()._load_block(want)


async def test_chunks_that_time_out_are_fetched_from_another_peer(tmp_path: Path) -> None:
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 16 * MiB, seed=4)
    stores = [new_store(tmp_path, f"holder{i}") for i in range(2)]
    with new_store(tmp_path, "puller") as store:
        blobs = [hold(s, "small:latest", gguf) for s in stores]
        blob = blobs[0]
        slow = StallingProvider(stores[0], PeerScores())
        scores = PeerScores()
        with trio.fail_after(60):
            async with swarm([slow, BlockProvider(stores[1], PeerScores())]) as (puller, holders):
                result = await fetch(puller, store, scores, blob, holders, chunk_timeout=STALL / 4)
        for s in stores:
            s.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        slow_id, fast_id = (h.peer_id for h in holders)
        assert scores.get(slow_id).timeouts >= 1
        assert not scores.is_banned(slow_id)
        assert result.bytes_by_peer == {fast_id: blob.size}


class Lookups:
    """A ``discover`` that records when it is called and answers from ``answers``."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[float] = []

    async def __call__(self) -> list[str]:
        self.calls.append(trio.current_time())
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


async def test_providers_are_looked_up_once_while_chunks_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle means no chunk for 3 s here; the rate-limited holder sends one far more often.
    monkeypatch.setattr("node.fetch_session.DISCOVER_IDLE", 3.0)
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 8 * MiB, seed=5)
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        blob = hold(held, "small:latest", gguf)
        provider = BlockProvider(held, PeerScores(), rate_limit=2 * MiB)
        lookups = Lookups([])
        with trio.fail_after(60):
            async with swarm([provider]) as (puller, holders):
                started = trio.current_time()
                result = await fetch(puller, store, PeerScores(), blob, holders, discover=lookups)
                took = trio.current_time() - started
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        # Polling every few seconds, as before, asked the DHT 3 times in a 4 s fetch.
        assert len(lookups.calls) == 1, f"{len(lookups.calls)} lookups in a {took:.1f} s fetch"


async def test_a_starved_fetch_looks_for_providers_and_uses_the_one_found(
    tmp_path: Path,
) -> None:
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 8 * MiB, seed=6)
    stores = [new_store(tmp_path, f"holder{i}") for i in range(2)]
    with new_store(tmp_path, "puller") as store:
        blob, _ = (hold(s, "small:latest", gguf) for s in stores)
        stalling = StallingProvider(stores[0], PeerScores())
        with trio.fail_after(60):
            async with swarm([stalling, BlockProvider(stores[1], PeerScores())]) as (
                puller,
                (slow, fast),
            ):
                # The fast holder is not known as the fetch starts; a later lookup finds it.
                lookups = Lookups([], [fast.peer_id])
                result = await fetch(
                    puller, store, PeerScores(), blob, [slow], discover=lookups, window=2,
                    chunk_timeout=30,
                )  # fmt: skip
        for s in stores:
            s.close()
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        assert len(lookups.calls) >= 2
        # The stalling holder has 2 chunks in flight at a time, 2 s each: the rest is free.
        assert result.bytes_by_peer.get(fast.peer_id, 0) > 0


async def test_delta_fetches_only_the_chunks_the_old_version_lacks(
    tmp_path: Path, big_gguf: Path
) -> None:
    v2_gguf = tmp_path / "v2.gguf"
    generate_model(v2_gguf, BIG, seed=7, chat_template=LONG_TEMPLATE)
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        v1 = hold(store, "llama:v1", big_gguf)
        v2 = hold(held, "llama:v2", v2_gguf)
        assert v1.digest != v2.digest
        with trio.fail_after(60):
            async with swarm([BlockProvider(held, PeerScores())]) as (puller, holders):
                result = await fetch(
                    puller, store, PeerScores(), v2, holders, model="llama:v2", source=v1.digest
                )
        assert await trio.to_thread.run_sync(sha256_of, result.path) == v2.digest
        assert result.bytes_fetched <= v2.size // 10
        assert result.bytes_local + result.bytes_fetched == v2.size
        (record,) = store.db.deltas("llama:v2")
        assert (record.source, record.target) == (v1.digest, v2.digest)
        assert (record.bytes_local, record.bytes_fetched) == (
            result.bytes_local,
            result.bytes_fetched,
        )


async def test_a_cancelled_fetch_resumes_where_it_stopped(tmp_path: Path, big_gguf: Path) -> None:
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        blob = hold(held, "llama:latest", big_gguf)
        biggest = max(c.length for c in blob.chunks)
        done = 0
        third = trio.Event()

        def on_progress(n: int) -> None:
            nonlocal done
            done += n
            if done >= blob.size // 3:
                third.set()

        provider = BlockProvider(held, PeerScores(), rate_limit=32 * MiB)
        with trio.fail_after(60):
            async with swarm([provider]) as (puller, holders):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            fetch,
                            puller,
                            store,
                            PeerScores(),
                            blob,
                            holders,
                            on_progress=on_progress,
                        )
                    )
                    await third.wait()
                    nursery.cancel_scope.cancel()
                partial_file, progress_file = partial_paths(store.cas, blob.digest)
                assert not store.cas.path(blob.digest).exists()
                assert partial_file.exists() and progress_file.exists()
                assert blob.size // 3 <= done < blob.size
                missing_then = blob.size - done
                result = await fetch(puller, store, PeerScores(), blob, holders)
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        assert result.bytes_fetched <= missing_then + 2 * biggest
        assert result.bytes_resumed + result.bytes_fetched == blob.size
        assert result.bytes_resumed > 0


async def test_one_upload_slot_and_a_rate_limit_still_serve_correctly(tmp_path: Path) -> None:
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 8 * MiB, seed=3)
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        blob = hold(held, "small:latest", gguf)
        provider = BlockProvider(held, PeerScores(), upload_slots=1, rate_limit=8 * MiB)
        with trio.fail_after(60):
            async with swarm([provider]) as (puller, holders):
                result = await fetch(puller, store, PeerScores(), blob, holders, window=16)
        assert await trio.to_thread.run_sync(sha256_of, result.path) == blob.digest
        distinct = {c.digest: c.length for c in blob.chunks}
        assert provider.stats.blocks_served == len(distinct)
        assert provider.stats.bytes_out[puller.peer_id] == sum(distinct.values())


async def test_no_provider_for_some_chunks_is_an_error_that_keeps_the_partial(
    tmp_path: Path, big_gguf: Path
) -> None:
    """A holder of another model has only the chunks the two share: the rest are named
    missing, and what did arrive stays in the partial for a later pull."""
    v2_gguf = tmp_path / "v2.gguf"
    generate_model(v2_gguf, BIG, seed=7, chat_template=LONG_TEMPLATE)
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        v1 = hold(held, "llama:v1", big_gguf)
        v2_store = new_store(tmp_path, "describer")
        v2 = hold(v2_store, "llama:v2", v2_gguf)
        v2_store.close()
        unique = {c.digest for c in v2.chunks} - {c.digest for c in v1.chunks}
        assert unique
        with trio.fail_after(60):
            async with swarm([BlockProvider(held, PeerScores())]) as (puller, holders):
                with pytest.raises(TransferError, match=rf"{v2.digest}: \d+ of \d+ chunks") as err:
                    await fetch(puller, store, PeerScores(), v2, holders)
        assert err.value.missing == sum(1 for c in v2.chunks if c.digest in unique)
        assert not store.cas.path(v2.digest).exists()
        assert partial_paths(store.cas, v2.digest)[0].exists()


async def test_provider_answers_have_and_survives_garbage(tmp_path: Path) -> None:
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 2 * MiB, seed=5)
    with new_store(tmp_path, "holder") as held:
        blob = hold(held, "small:latest", gguf)
        provider = BlockProvider(held, PeerScores())
        with trio.fail_after(30):
            async with swarm([provider]) as (puller, holders):
                peer = holders[0].peer_id
                # A well-formed exchange: who has what, one block.
                stream = await puller.open_stream(peer, BLOCKS_PROTOCOL)
                conn = BlockExchange(Role.CLIENT)
                unknown = bytes(32)
                first = blob.chunks[0]
                await stream.send_all(conn.send(WantHave(0, (first.digest, unknown))))
                await stream.send_all(
                    conn.send(WantBlock(1, first.digest, blob.digest, first.offset, first.length))
                )
                await stream.send_all(conn.send(WantBlock(2, unknown, blob.digest, 0, 100)))
                conn.send(EndOfStream())
                await stream.send_eof()
                events = []
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        data = await stream.receive_some(conn.max_read)
                        conn.receive_eof() if not data else conn.receive_data(data)
                    elif isinstance(event, EndOfStream):
                        break
                    else:
                        events.append(event)
                await stream.aclose()
                have = next(e for e in events if isinstance(e, HaveReply))
                assert (have.have, have.dont_have) == ((first.digest,), (unknown,))
                kinds = sorted(type(e).__name__ for e in events)
                assert kinds == ["Block", "DontHave", "HaveReply"]
                # Garbage: a final error, the stream ends, the provider serves on.
                stream = await puller.open_stream(peer, BLOCKS_PROTOCOL)
                await stream.send_all(encode_frame(b"\xff\x00garbage", 1024))
                await stream.send_eof()
                conn = BlockExchange(Role.CLIENT)
                received = b""
                while data := await stream.receive_some():
                    received += data
                conn.receive_data(received)
                conn.receive_eof()
                final = conn.next_event()
                assert isinstance(final, ErrorReply) and final.request_id is None
                await stream.aclose()
                store = new_store(tmp_path, "puller")
                result = await fetch(puller, store, PeerScores(), blob, holders)
                store.close()
        assert result.bytes_fetched == blob.size


async def test_a_banned_peer_is_refused(tmp_path: Path) -> None:
    gguf = tmp_path / "small.gguf"
    generate_model(gguf, 2 * MiB, seed=6)
    with new_store(tmp_path, "holder") as held, new_store(tmp_path, "puller") as store:
        blob = hold(held, "small:latest", gguf)
        holder_scores = PeerScores()
        provider = BlockProvider(held, holder_scores)
        with trio.fail_after(30):
            async with swarm([provider]) as (puller, holders):
                for _ in range(holder_scores.ban_after):
                    holder_scores.bad(puller.peer_id, "test")
                with pytest.raises(TransferError, match="could not be fetched"):
                    await fetch(puller, store, PeerScores(), blob, holders)
        assert provider.stats.streams_refused == 1
        assert provider.stats.blocks_served == 0
