"""Swarming: pullers of the same blob serve each other the chunks they already hold, so
the first holder uploads the model about once, not once per puller."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from node.config import Config, load_config
from node.daemon import Node, open_node
from node.live_chunks import LiveChunks
from node.testing import node_config
from storage.chunks import ChunkParams
from storage.partial import PartialBlob
from tests.conftest import MakeModel

MiB = 1024 * 1024
# A pipeline of requests to the slow holder is committed to it; with chunks a quarter of
# the default size, the in-flight share of a small test model is as small as in a big one.
SMALL_CHUNKS = (
    '[sync]\nchunk_size = "256KiB"\nmin_chunk_size = "64KiB"\nmax_chunk_size = "512KiB"\n'
)


async def _quiet(event: dict[str, Any]) -> None:
    pass


async def test_pullers_trade_chunks_and_spare_the_holder(
    tmp_path: Path, make_model: MakeModel
) -> None:
    size = 16 * MiB
    pullers = 3
    async with AsyncExitStack() as stack:
        # The holder's upload is slow, as a home uplink is; the pullers' links are fast.
        holder = await stack.enter_async_context(open_node(_holder_config(tmp_path)))
        boot = [holder.host.listen_addrs[0]]
        nodes: list[Node] = []
        for i in range(pullers):
            config = node_config(tmp_path, f"p{i}", boot, extra=SMALL_CHUNKS)
            nodes.append(await stack.enter_async_context(open_node(config)))
        path = make_model("swarmed.gguf", size=size)
        await trio.to_thread.run_sync(lambda: holder.store.add_model("swarmed:v1", path))
        await holder.refresh()
        results: dict[str, dict[str, Any]] = {}

        async def pull(node: Node) -> None:
            results[node.peer_id] = await node.pull("swarmed:v1", _quiet)

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(pull, node)
        blob = holder.store.get("swarmed:v1").manifest.layers[0].digest
        for node in nodes:
            assert node.store.cas.path(blob).read_bytes() == path.read_bytes()
        uploaded = sum(holder.provider.stats.bytes_out.values())
        from_pullers = sum(
            n
            for node in nodes
            for peer, n in node.provider.stats.bytes_out.items()
            if peer != holder.peer_id
        )
        # Without swarming the holder sends every puller the whole model (3x its size).
        assert from_pullers > 0, "no puller served another"
        assert uploaded < 2.5 * size, f"holder uploaded {uploaded / size:.2f}x the model"
        # Every byte any puller fetched came from the holder or from another puller.
        fetched = sum(r["bytes_fetched"] for r in results.values())
        assert fetched == uploaded + from_pullers
        redirected = holder.provider.stats.blocks_redirected
        print(
            f"holder uploaded {uploaded / size:.2f}x, pullers served {from_pullers / size:.2f}x, "
            f"holder sent {redirected} requests elsewhere"
        )


def _holder_config(root: Path) -> Config:
    config = node_config(root, "holder", extra=SMALL_CHUNKS)
    assert config.path is not None
    text = config.path.read_text().replace(
        '[storage]\nmodels_dir = "models"\n',
        '[storage]\nmodels_dir = "models"\nupload_rate_limit = "2MiB"\n',
    )
    config.path.write_text(text)
    return load_config(config.path)


def test_live_chunks_serve_only_written_chunks(tmp_path: Path) -> None:
    from storage.cas import ContentAddressedStore
    from storage.chunks import index_file

    data = random.Random(7).randbytes(3 * MiB)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    index = index_file(source, ChunkParams(64 * 1024, 256 * 1024, 512 * 1024))
    (tmp_path / "models" / "blobs").mkdir(parents=True)
    cas = ContentAddressedStore(tmp_path / "models", tmp_path / "packs")
    live = LiveChunks()
    blob = PartialBlob.open(cas, index.digest, index.size, index.chunks)
    try:
        live.add(blob)
        first, second = index.chunks[0], index.chunks[1]
        assert not live.holds(first.digest)
        blob.write_chunk(0, data[first.offset : first.offset + first.length])
        assert live.holds(first.digest)
        out = bytearray(first.length)
        assert live.read(first.digest, memoryview(out))
        assert bytes(out) == data[first.offset : first.offset + first.length]
        assert not live.read(second.digest, memoryview(bytearray(second.length)))
        # A buffer of the wrong size is never filled from a chunk of another size.
        assert not live.read(first.digest, memoryview(bytearray(first.length + 1)))
        live.remove(blob)
        assert not live.holds(first.digest) and len(live) == 0
    finally:
        blob.close()
    # A closed partial serves nothing, even while still registered.
    again = PartialBlob.open(cas, index.digest, index.size, index.chunks)
    live.add(again)
    again.close()
    assert not live.read(first.digest, memoryview(bytearray(first.length)))
