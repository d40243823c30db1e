"""Private swarms and access control per model, between real nodes over libp2p.

- an allowlisted node closes an outsider's connection before any protocol runs, and
  `dmm peers` shows the attempts;
- a version record whose author lacks the publisher role is rejected by every node
  (gossip, DHT, catalog/pull);
- the reader role is enforced on listing, version records, manifests and blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from node.acl import Acl
from node.catalog_service import CatalogError, open_catalog_client
from node.config import AccessRule, ConfigError, load_config
from node.daemon import Node, open_node
from node.identity import Identity
from node.p2p import DialError, StreamRefused
from node.provider import BLOCKS_PROTOCOL
from node.pull import PullError
from node.testing import free_port
from protocols.blocks import Block, ErrorReply, HaveReply, WantBlock, WantHave
from storage.names import parse_model_name
from tests._security import audit_lines, blocks_exchange, config, write_config
from tests.conftest import MakeModel, dmm

MiB = 1024 * 1024
A = "12D3KooWBuiXxuFsE9X1NzjAM1yy17AQ5ohip8dmoEzSATYMZz3K"
B = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


async def quiet(event: Any) -> None:
    pass


async def add(node: Node, make_model: MakeModel, name: str, size: int = 2 * MiB) -> None:
    gguf = make_model(f"{name.replace(':', '_')}.gguf", size=size)
    await trio.to_thread.run_sync(lambda: node.store.add_model(name, gguf))
    await node.refresh()


def records(node: Node, name: str) -> list[Any]:
    return node.book.records(parse_model_name(name))


def rules(*items: tuple[list[str], str, list[str]]) -> str:
    return "".join(
        f"[[access]]\npeers = {json.dumps(p)}\nmodels = {json.dumps(m)}\nroles = {json.dumps(r)}\n"
        for p, m, r in items
    )


# --- the rules themselves ------------------------------------------------------------------


def test_no_rules_means_everyone_may_do_everything() -> None:
    acl = Acl([])
    assert acl.open
    assert all(acl.allowed(B, role, "anything:latest") for role in ("reader", "publisher"))


def test_rules_grant_by_peer_glob_and_role() -> None:
    acl = Acl(
        [
            AccessRule(("*",), "*", frozenset({"reader"})),
            AccessRule((A,), "llama*", frozenset({"publisher", "replicator"})),
        ],
        self_peer=B,
    )
    assert acl.allowed(A, "reader", "mistral:7b")
    assert acl.allowed(A, "publisher", "llama3:8b")
    assert acl.allowed(A, "publisher", "registry.ollama.ai/library/llama3:8b")
    assert not acl.allowed(A, "publisher", "mistral:7b")
    assert not acl.allowed("12D3KooWOther", "replicator", "llama3:8b")
    assert acl.allowed(B, "publisher", "mistral:7b")  # this node itself
    assert not acl.allowed(A, "reader", "../bad name")
    tagged = Acl([AccessRule((A,), "llama3:8b", frozenset({"reader"}))])
    assert tagged.allowed(A, "reader", "llama3:8b") and not tagged.allowed(
        A, "reader", "llama3:70b"
    )
    with pytest.raises(ValueError, match="unknown role"):
        acl.allowed(A, "owner", "x")  # type: ignore[arg-type]


def test_access_rules_load_from_node_toml(tmp_path: Path) -> None:
    loaded = config(tmp_path, "n", extra=rules(([A, "*"], "llama*", ["reader", "publisher"])))
    assert loaded.access.rules == (
        AccessRule((A, "*"), "llama*", frozenset({"reader", "publisher"})),
    )


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        (rules(([A], "*", ["owner"])), "access[0].roles[0]", '"owner" is not a role'),
        (rules((["nope"], "*", ["reader"])), "access[0].peers[0]", "is not a peer id"),
        (rules(([A], "*", [])), "access[0].roles", "non-empty"),
        ("[[access]]\npeers = ['*']\nrole = ['reader']\n", "access[0].role", "did you mean"),
        ("[access]\npeers = ['*']\n", "access", "[[access]]"),
    ],
)
def test_bad_access_rules_are_one_line_errors(
    tmp_path: Path, extra: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "n", extra=extra))
    assert err.value.key == key and problem in str(err.value)


# --- private swarm -------------------------------------------------------------------------


async def test_allowlist_refuses_an_outsider_and_dmm_peers_shows_it(tmp_path: Path) -> None:
    friend_id = Identity.generate()
    port = free_port()
    path = write_config(
        tmp_path,
        "private",
        network=f'allowlist = ["{friend_id.peer_id_str}"]\n',
        api=f'listen = "127.0.0.1:{port}"\n',
    )
    with trio.fail_after(120):
        async with open_node(load_config(path)) as private:
            ran: list[str] = []
            handled = trio.Event()

            async def sentinel(stream: Any) -> None:
                ran.append(stream.peer_id)
                handled.set()

            private.host.set_stream_handler("/dmm/test-sentinel/1", sentinel)
            async with open_node(config(tmp_path, "outsider")) as outsider:
                for _ in range(2):
                    with pytest.raises(DialError):
                        await outsider.host.connect(private.host.listen_addrs[0])
                assert outsider.peer_id not in private.host.connected_peers()
                # A connection the private node made itself still carries no stream of theirs.
                await private.host.connect(outsider.host.listen_addrs[0])
                with pytest.raises(StreamRefused):
                    await outsider.host.open_stream(private.peer_id, "/dmm/test-sentinel/1")
                assert ran == []
                friend_cfg = config(tmp_path, "friend", bootstrap=[private.host.listen_addrs[0]])
                async with open_node(friend_cfg, identity=friend_id) as friend:
                    await private.host.wait_connected(friend.peer_id)
                    stream = await friend.host.open_stream(private.peer_id, "/dmm/test-sentinel/1")
                    await stream.aclose()

                    shown = await trio.to_thread.run_sync(lambda: dmm(path, "peers", "--json"))
                    text = await trio.to_thread.run_sync(lambda: dmm(path, "peers"))
                await private.audit.flush()
            await handled.wait()
            assert ran == [friend_id.peer_id_str]
    answer = json.loads(shown.stdout)
    (refused,) = answer["refused"]
    assert refused["peer_id"] == outsider.peer_id
    # Two connections, then streams: ours, and the DHT's and gossip's on that connection.
    assert refused["count"] >= 3
    assert refused["first"] <= refused["last"] and refused["reason"] == "not in the allowlist"
    assert outsider.peer_id in text.stdout and "REFUSED PEER" in text.stdout
    lines = [e for e in audit_lines(private.config.audit.path) if e["outcome"] == "refused"]
    actions = [e["action"] for e in lines]
    # (The outsider's own node may dial back meanwhile: more refused connections.)
    assert actions[:2] == ["connect", "connect"] and set(actions) == {"connect", "stream"}
    assert len(lines) >= refused["count"]
    assert all(e["peer"] == outsider.peer_id for e in lines)


# --- publisher role ------------------------------------------------------------------------


async def test_a_record_by_a_non_publisher_is_rejected_by_every_node(
    tmp_path: Path, make_model: MakeModel
) -> None:
    ids = [Identity.generate() for _ in range(3)]
    publisher, reader_one, rogue = (i.peer_id_str for i in ids)
    access = rules((["*"], "*", ["reader", "replicator"]), ([publisher], "*", ["publisher"]))
    with trio.fail_after(150):
        a_cfg = config(tmp_path, "a", extra=access)
        async with open_node(a_cfg, identity=ids[0]) as a:
            boot = [a.host.listen_addrs[0]]
            b_cfg = config(tmp_path, "b", bootstrap=boot, extra=access)
            c_cfg = config(tmp_path, "c", bootstrap=boot, extra=access)
            async with (
                open_node(b_cfg, identity=ids[1]) as b,
                open_node(c_cfg, identity=ids[2]) as c,
            ):
                # Every node hears the rogue's gossip straight from it, not only via a.
                await b.host.connect(c.host.listen_addrs[0])
                for node, peers in ((a, (b, c)), (b, (a, c)), (c, (a, b))):
                    for peer in peers:
                        await node.announcer.wait_for_peer(peer.peer_id, in_mesh=True)
                # The rogue node keeps its own record (its operator is trusted locally)...
                await add(c, make_model, "rogue:v1")
                assert records(c, "rogue:v1")
                # ...gossip drops it at every node that hears it,
                for node in (a, b):
                    await node.wait_until(
                        lambda node=node: rogue in node.announcer.stats.bad_by_peer
                    )
                    assert records(node, "rogue:v1") == []
                # the DHT refuses to store or return it,
                for node in (a, b):
                    full = "registry.ollama.ai/library/rogue"
                    assert await node.dht.get_version(full, "v1") is None
                # and a pull finds no acceptable version.
                for node in (a, b):
                    with pytest.raises(PullError, match="no reachable peer"):
                        await node.pull("rogue:v1", quiet)
                    assert records(node, "rogue:v1") == []
                # The publisher's records are accepted everywhere (the same paths work).
                await add(a, make_model, "blessed:v1")
                for node in (b, c):
                    await node.wait_until(lambda node=node: bool(records(node, "blessed:v1")))
                result = await b.pull("blessed:v1", quiet)
                assert result["already_complete"] is False
                for node in (a, b):
                    await node.audit.flush()
    assert reader_one == b.peer_id
    for cfg in (a_cfg, b_cfg):
        refused = [e for e in audit_lines(cfg.audit.path) if e["action"] == "record"]
        assert refused and all(e["outcome"] == "refused" for e in refused)
        assert all(e["model"] == "registry.ollama.ai/library/rogue:v1" for e in refused)
        assert {e["reason"].split(":")[0] for e in refused} >= {"gossip", "dht"}


# --- reader role ---------------------------------------------------------------------------


async def test_reader_role_is_enforced_on_catalog_and_blocks(
    tmp_path: Path, make_model: MakeModel
) -> None:
    with trio.fail_after(150):
        holder_cfg = config(tmp_path, "holder", extra=rules((["*"], "open*", ["reader"])))
        async with open_node(holder_cfg) as holder:
            other_cfg = config(tmp_path, "other", bootstrap=[holder.host.listen_addrs[0]])
            async with open_node(other_cfg) as other:
                await holder.announcer.wait_for_peer(other.peer_id, in_mesh=True)
                await add(holder, make_model, "open:v1")
                await add(holder, make_model, "secret:v1", size=3 * MiB)
                result = await other.pull("open:v1", quiet)
                assert result["already_complete"] is False
                with pytest.raises(PullError):
                    await other.pull("secret:v1", quiet)
                secret = holder.store.get("secret:v1")
                blob = secret.manifest.layers[0].digest
                async with open_catalog_client(other.host, holder.peer_id) as catalog:
                    # Names travel by gossip and the DHT; the listing shows only readable ones.
                    listed = await catalog.list_models("*")
                    assert [f"{m.name}:{m.tag}" for m in listed.models] == [
                        "registry.ollama.ai/library/open:v1"
                    ]
                    with pytest.raises(CatalogError) as err:
                        await catalog.get_versions("secret:v1")
                    assert err.value.code == "refused" and "may not read" in str(err.value)
                    for wanted in ("secret:v1", secret.digest):
                        with pytest.raises(CatalogError, match="refused"):
                            await catalog.get_manifest(wanted)
                    with pytest.raises(CatalogError, match="refused"):
                        await catalog.get_chunks(blob)
                # Blocks: the secret blob's chunks are "not had", and asked for, refused.
                chunk = holder.store.db.blob_chunks(blob)[0]
                events = await blocks_exchange(
                    other.host,
                    holder.peer_id,
                    [
                        WantHave(0, (chunk.digest,)),
                        WantBlock(1, chunk.digest, blob, chunk.offset, chunk.length),
                    ],
                )
                have = next(e for e in events if isinstance(e, HaveReply))
                assert have.have == () and have.dont_have == (chunk.digest,)
                refusal = next(e for e in events if isinstance(e, ErrorReply))
                assert refusal.request_id == 1 and refusal.code == "refused"
                assert not any(isinstance(e, Block) for e in events)
                assert BLOCKS_PROTOCOL  # the stream above was the real protocol
                await holder.audit.flush()
    refused = [e for e in audit_lines(holder_cfg.audit.path) if e["outcome"] == "refused"]
    assert {e["action"] for e in refused} == {"catalog", "fetch"}
    assert all(e["peer"] == other.peer_id for e in refused)
    assert any(e["model"] == "secret:v1" for e in refused)
