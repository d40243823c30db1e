"""Ten real nodes in one process: glob finds exactly the matching models; forgeries go nowhere;
a restarted node keeps its peer id and its models are found again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from node.daemon import Node, open_node
from node.testing import node_config, open_swarm
from protocols.records import ANNOUNCE_TOPIC, Announcement
from tests.conftest import MakeModel

MiB = 1024 * 1024


async def _add(node: Node, make_model: MakeModel, name: str, seed: int) -> None:
    path = make_model(f"{name.replace(':', '_')}.gguf", size=MiB // 2, seed=seed)
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, path))
    await node.refresh()


async def _find_until(node: Node, glob: str, expected: set[str]) -> dict[str, list[str]]:
    """Find until the expected names show up (records spread within a second or so)."""
    with trio.fail_after(40):
        while True:
            result = await node.find(glob, timeout=5)
            found = {m["name"]: m["peers"] for m in result["models"]}
            if set(found) >= expected:
                return found
            await trio.sleep(0.2)


async def test_ten_nodes_glob_finds_exactly_the_matching_models(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 10) as nodes:
        await _add(nodes[1], make_model, "llama-one:q4", 1)
        await _add(nodes[2], make_model, "llama-two:q8", 2)
        await _add(nodes[3], make_model, "mistral:7b", 3)
        asker = nodes[4]
        llamas = await _find_until(asker, "llama*", {"llama-one:q4", "llama-two:q8"})
        assert llamas == {"llama-one:q4": [nodes[1].peer_id], "llama-two:q8": [nodes[2].peer_id]}
        assert await _find_until(asker, "*:q8", {"llama-two:q8"}) == {
            "llama-two:q8": [nodes[2].peer_id]
        }
        assert await _find_until(asker, "mis*", {"mistral:7b"}) == {
            "mistral:7b": [nodes[3].peer_id]
        }
        assert (await asker.find("gemma*", timeout=3))["models"] == []

        # A forged announcement (valid CBOR, a signature that does not verify) goes nowhere.
        good = nodes[1].book.latest("registry.ollama.ai/library/llama-one:q4")
        assert good is not None
        forged = dataclasses.replace(good, manifest_digest="sha256:" + "6" * 64)
        pubsub = nodes[5].announcer._pubsub
        assert pubsub is not None
        await pubsub.publish(ANNOUNCE_TOPIC, Announcement((forged,)).encode())
        # Then a genuine one from the same node, so we know gossip got through after it.
        await _add(nodes[5], make_model, "after:1", 5)
        with trio.fail_after(30):
            for node in nodes[6:]:
                await node.wait_until(
                    lambda node=node: bool(node.book.records("registry.ollama.ai/library/after:1"))
                )
        for node in nodes:
            digests = {r.manifest_digest for r in node.book.records(good.name)}
            assert forged.manifest_digest not in digests
        # It did go out, and the receivers counted it as bad.
        assert sum(n.announcer.stats.dropped_bad for n in nodes if n is not nodes[5]) >= 1


async def test_a_restarted_node_keeps_its_id_and_its_models_are_found_again(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_swarm(tmp_path, 2) as (seed, asker):
        config = node_config(tmp_path, "restarts", [seed.host.listen_addrs[0]])
        async with open_node(config) as first_run:
            peer_id = first_run.peer_id
            await _add(first_run, make_model, "persistent:v1", 7)
            assert (await _find_until(asker, "persist*", {"persistent:v1"}))["persistent:v1"] == [
                peer_id
            ]
        # While it is down, it is listed (gossip remembers) but not reachable.
        down = (await asker.find("persist*", timeout=3))["models"]
        assert all(peer_id not in m["reachable"] for m in down)
        async with open_node(config) as second_run:
            assert second_run.peer_id == peer_id
            with trio.fail_after(40):
                while True:
                    found = (await asker.find("persist*", timeout=5))["models"]
                    if found and peer_id in found[0]["reachable"]:
                        break
                    await trio.sleep(0.2)
            assert found[0]["availability"] == "1/1"
