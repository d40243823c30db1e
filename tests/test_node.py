"""Real nodes on loopback: bootstrap, provide, find by glob across hops, the HTTP API."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from node.daemon import Node, open_node
from node.testing import node_config, open_chain
from tests.conftest import MakeModel

MiB = 1024 * 1024


async def _add(node: Node, make_model: MakeModel, name: str, **kwargs: object) -> None:
    path = make_model(f"{name.replace(':', '_').replace('/', '_')}.gguf", **kwargs)
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, path))
    await node.refresh()


async def _wait_connected(node: Node, peer: str) -> None:
    with trio.fail_after(20):
        await node.host.wait_connected(peer)


async def test_find_a_model_held_three_bootstrap_hops_away(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """A knows only B, B only C, C only D; D's model is found from A through the DHT.

    (That the DHT lookup itself crosses hops the asker's routing table lacks is pinned
    at the DHT level in tests/test_dht.py; here the whole node path is exercised.)
    """
    async with open_chain(tmp_path, 4) as (a, b, c, d):
        for left, right in ((a, b), (b, c), (c, d)):
            await _wait_connected(right, left.peer_id)
        await _add(d, make_model, "llama-tiny:q4", size=1 * MiB)
        await _add(d, make_model, "other:1", size=1 * MiB, seed=9)
        with trio.fail_after(30):
            while True:
                result = await a.find("llama*", timeout=5)
                if result["models"]:
                    break
                await trio.sleep(0.2)
        [entry] = result["models"]
        assert entry["name"] == "llama-tiny:q4"
        assert entry["peers"] == [d.peer_id] and entry["availability"] == "1/1"
        assert result["seconds"] >= 0


async def test_find_a_model_announced_before_the_asker_joined(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_chain(tmp_path, 2) as (a, b):
        await _wait_connected(b, a.peer_id)
        await _add(b, make_model, "early:v1", size=1 * MiB)
        config = node_config(tmp_path, "late", [a.host.listen_addrs[0]])
        async with open_node(config) as late:
            await _wait_connected(late, a.peer_id)
            with trio.fail_after(30):
                while not (result := await late.find("early*", timeout=5))["models"]:
                    await trio.sleep(0.2)
            assert result["models"][0]["peers"] == [b.peer_id]


async def test_http_api_reports_the_node(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_node(node_config(tmp_path, "solo")) as node:
        await _add(node, make_model, "demo:v1", size=1 * MiB)
        base = node.api_urls[0]
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            health = (await client.get("/api/health")).json()
            assert health["status"] == "ok" and health["peer_id"] == node.peer_id
            tags = (await client.get("/api/tags")).json()["models"]
            assert [m["name"] for m in tags] == ["demo:v1"]
            assert tags[0]["details"]["format"] == "gguf"
            assert (await client.get("/api/version")).json()["version"]
            assert (await client.get("/api/peers")).json()["peers"] == []
            found = (await client.get("/api/find", params={"glob": "demo*"})).json()
            assert [m["name"] for m in found["models"]] == ["demo:v1"]
            missing = await client.get("/api/find")
            assert missing.status_code == 400 and "glob" in missing.json()["error"]
            assert (await client.get("/api/nope")).status_code == 404


async def test_find_names_the_holders_that_did_not_answer(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """A holder gone since it provided is still named by the DHT: the find says it did
    not answer rather than quietly listing less."""
    async with open_chain(tmp_path, 2) as (a, b):
        await _wait_connected(b, a.peer_id)
        config = node_config(tmp_path, "gone", [a.host.listen_addrs[0]])
        async with open_node(config) as gone:
            await _wait_connected(gone, a.peer_id)
            await _add(gone, make_model, "leaving:v1", size=1 * MiB)
            with trio.fail_after(30):
                while True:
                    result = await b.find("leaving*", timeout=5)
                    if any(gone.peer_id in m["reachable"] for m in result["models"]):
                        break
                    await trio.sleep(0.2)
            assert result["providers_silent"] == []
        with trio.fail_after(30):
            result = await b.find("leaving*", timeout=5)
        assert result["providers_silent"] == [gone.peer_id]
        assert all(gone.peer_id not in m["reachable"] for m in result["models"])
