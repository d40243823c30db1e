"""Pulling models between real nodes: bit-exact, manifest last, Ollama's progress stream,
nothing moves when complete, and a followed model arrives on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from node.daemon import Node, open_node
from node.testing import node_config, open_swarm
from storage.names import parse_model_name
from tests.conftest import MakeModel

MiB = 1024 * 1024


async def _add(node: Node, make_model: MakeModel, name: str, size: int, **kw: Any) -> Path:
    path = make_model(f"{name.replace(':', '_')}.gguf", size=size, **kw)
    await trio.to_thread.run_sync(
        lambda: node.store.add_model(name, path, template="{{ .Prompt }}")
    )
    await node.refresh()
    return path


async def test_pull_is_bit_exact_and_writes_the_manifest_last(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        source = await _add(a, make_model, "pulled:v1", 64 * MiB)
        events: list[dict[str, Any]] = []

        async def record(event: dict[str, Any]) -> None:
            # Until "writing manifest", the model must not be visible in b's store.
            if event["status"] != "success":
                assert b.store.layout.read(parse_model_name("pulled:v1")) is None
            events.append(event)

        with trio.fail_after(60):
            result = await b.pull("pulled:v1", record)
        assert result["already_complete"] is False and result["peers"] == [a.peer_id]
        stored = b.store.get("pulled:v1")
        assert stored.raw == a.store.get("pulled:v1").raw
        model_layer = stored.manifest.layers[0]
        assert b.store.cas.path(model_layer.digest).read_bytes() == source.read_bytes()
        statuses = [e["status"] for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        assert any(s == f"pulling {model_layer.digest[7:19]}" for s in statuses)
        assert b.store.verify("pulled:v1").ok
        # Complete already: reported as such, nothing moves.
        again: list[dict[str, Any]] = []

        async def keep(event: dict[str, Any]) -> None:
            again.append(event)

        second = await b.pull("pulled:v1", keep)
        assert second["already_complete"] is True and second["bytes_fetched"] == 0
        assert again == [
            {"status": "pulling manifest"},
            {"status": "success", "already_complete": True},
        ]


async def test_api_pull_streams_ollama_progress(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "streamed:q4", 6 * MiB)
        async with httpx.AsyncClient(base_url=b.api_urls[0], timeout=60) as client:
            async with client.stream("POST", "/api/pull", json={"model": "streamed:q4"}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) async for line in r.aiter_lines() if line.strip()]
            assert lines[0] == {"status": "pulling manifest"}
            assert lines[-1]["status"] == "success"
            layer = [e for e in lines if "digest" in e]
            assert layer and all({"digest", "total", "completed"} <= set(e) for e in layer)
            assert max(e["completed"] for e in layer) == max(e["total"] for e in layer)
            once = await client.post("/api/pull", json={"model": "streamed:q4", "stream": False})
            assert once.json() == {"status": "success", "already_complete": True}
            missing = await client.post("/api/pull", json={"model": "nobody-has-this"})
            lines = [json.loads(x) for x in missing.text.splitlines() if x.strip()]
            assert "error" in lines[-1] and "no reachable peer" in lines[-1]["error"]
            bad = await client.post("/api/pull", json={"model": "../../etc"})
            assert bad.status_code == 400


async def test_a_followed_model_is_pulled_when_announced(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 1) as (a,):
        config = node_config(
            tmp_path, "follower", [a.host.listen_addrs[0]], extra='[sync]\nfollow = ["auto*"]\n'
        )
        async with open_node(config) as follower:
            with trio.fail_after(20):
                await follower.host.wait_connected(a.peer_id)
                await follower.announcer.wait_for_peer(a.peer_id)
            await _add(a, make_model, "auto-model:v1", 3 * MiB)
            await _add(a, make_model, "ignored:v1", 1 * MiB, seed=4)
            name = parse_model_name("auto-model:v1")
            with trio.fail_after(60):
                await follower.wait_until(lambda: follower.store.layout.read(name) is not None)
            assert "ignored:v1" not in {m.name.display for m in follower.store.list_models()}
            assert follower.store.verify("auto-model:v1").ok


async def test_metadata_only_edit_pulls_a_few_chunks(tmp_path: Path, make_model: MakeModel) -> None:
    """v2 of a 256 MiB model differs only in its chat template: the pull of v2 moves no more
    than 3 chunks plus the small blobs (Ollama would re-download all 256 MiB)."""
    v1 = make_model("v1.gguf", size=256 * MiB, chat_template="{{ .Prompt }}", seed=11)
    v2 = make_model(
        "v2.gguf", size=256 * MiB, chat_template="{{ .System }}\n{{ .Prompt }}\n" * 8, seed=11
    )

    async def quiet(event: dict[str, Any]) -> None:
        pass

    async with open_swarm(tmp_path, 2) as (a, b):
        await trio.to_thread.run_sync(lambda: a.store.add_model("edited:latest", v1))
        await a.refresh()
        with trio.fail_after(120):
            await b.pull("edited:latest", quiet)
        await trio.to_thread.run_sync(lambda: a.store.add_model("edited:latest", v2))
        await a.refresh()
        with trio.fail_after(120):
            result = await b.pull("edited:latest", quiet)
        assert result["already_complete"] is False
        stored = b.store.get("edited:latest").manifest
        model_blob = stored.layer_of_type("model")
        assert model_blob is not None
        assert b.store.cas.path(model_blob.digest).read_bytes() == v2.read_bytes()
        small = sum(layer.size for layer in stored.all_layers() if layer is not model_blob)
        max_chunk = max(c.length for c in b.store.db.blob_chunks(model_blob.digest))
        assert result["bytes_fetched"] <= 3 * max_chunk + small
        assert result["bytes_local"] >= 250 * MiB


async def test_a_holder_that_went_away_does_not_fail_the_pull(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Regression: a stopped holder still listed in the DHT made the pull fail on dialing it."""

    async def quiet(event: dict[str, Any]) -> None:
        pass

    async with open_swarm(tmp_path, 2) as (a, puller):
        await _add(a, make_model, "twice:v1", 2 * MiB)
        config = node_config(tmp_path, "gone", [a.host.listen_addrs[0]])
        async with open_node(config) as gone:
            path = make_model("twice_copy.gguf", size=2 * MiB)
            await trio.to_thread.run_sync(
                lambda: gone.store.add_model("twice:v1", path, template="{{ .Prompt }}")
            )
            await gone.refresh()
            # Let the puller hear of both holders before one of them goes.
            with trio.fail_after(30):
                await puller.wait_until(
                    lambda: len({p for hs in puller.gossip_holders().values() for p in hs}) >= 2
                )
        with trio.fail_after(60):
            result = await puller.pull("twice:v1", quiet)
        assert result["peers"] == [a.peer_id]


async def test_two_pulls_of_one_model_at_once_share_one_fetch(
    tmp_path: Path, make_model: MakeModel
) -> None:
    # Two `ollama pull`s of one model on one node: the second waits for the first's
    # fetch instead of failing with "already being fetched", and no byte moves twice.
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, "twice:v1", 32 * MiB)
        results: list[dict[str, Any]] = []
        followed: list[dict[str, Any]] = []

        async def pull(events: list[dict[str, Any]] | None) -> None:
            async def record(event: dict[str, Any]) -> None:
                if events is not None:
                    events.append(event)

            results.append(await b.pull("twice:v1", record))

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull, None)
                nursery.start_soon(pull, followed)
        assert len(results) == 2 and all(r["already_complete"] is False for r in results)
        size = b.store.get("twice:v1").manifest.total_size
        assert sum(r["bytes_fetched"] for r in results) == size
        assert b.store.verify("twice:v1").ok
        assert len(b.blob_fetches) == 0
        # The follower reported progress of the layer it waited for, ending complete.
        layer = b.store.get("twice:v1").manifest.layers[0]
        done = [e for e in followed if e.get("digest") == layer.digest]
        assert done and done[-1]["completed"] == layer.size


async def test_a_pull_asks_connected_peers_when_neither_dht_nor_gossip_names_a_holder(
    tmp_path: Path, make_model: MakeModel
) -> None:
    from node.daemon import model_key

    async with open_swarm(tmp_path, 1) as (a,):
        await _add(a, make_model, "quiet:v1", 2 * MiB)
        # Announced before b joined (so b's gossip table never hears of it), and no
        # longer provided in the DHT: only asking a neighbour finds it.
        a.dht.unprovide(model_key(parse_model_name("quiet:v1")))
        async with open_node(node_config(tmp_path, "b", [a.host.listen_addrs[0]])) as b:
            with trio.fail_after(30):
                await b.host.wait_connected(a.peer_id)
                assert await b.dht.find_providers(model_key(parse_model_name("quiet:v1"))) == []
                # a re-announces what it holds to a new peer; on a busy swarm that can
                # come after the pull has looked: b has not heard it yet.
                b._gossip.clear()
                result = await b.pull("quiet:v1", _ignore)
            assert result["peers"] == [a.peer_id]
            assert b.store.verify("quiet:v1").ok


async def _ignore(event: dict[str, Any]) -> None:
    pass
