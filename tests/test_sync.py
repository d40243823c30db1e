"""SyncManager between real nodes: sync states, a partition healed under `newest` and
`keep-both`, manual resolution, policies at run time, and the CLI against node processes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.changes import wait_until_any
from node.daemon import Node, open_node
from node.identity import Identity
from node.sync import LocalChange, SyncError
from node.testing import node_config, open_swarm
from protocols.dag import VersionDag, conflict_tag
from protocols.records import VersionRecord
from storage.names import ModelName, parse_model_name
from tests.conftest import MakeModel, dmm
from tests.test_node_cli import RunningNode, _config

MiB = 1024 * 1024
NAME = parse_model_name("shared:latest")


async def _add(node: Node, make_model: MakeModel, name: str, seed: int) -> VersionRecord:
    path = make_model(f"{name.replace(':', '_')}-{seed}.gguf", size=MiB, seed=seed)
    result = await node.sync.create_model_version(name, path)
    record = next(
        r
        for r in node.book.records(parse_model_name(name))
        if r.version_id.hex() == result["version"]
    )
    return record


def _held(node: Node, name: ModelName = NAME) -> str | None:
    stored = node.store.layout.read(name)
    return stored.digest if stored is not None else None


async def _until(
    nodes: Sequence[Node], predicate: Callable[[], bool], what: str, timeout: float = 60
) -> None:
    """Wait for a condition over several nodes, re-checked whenever any of them changes."""
    with trio.move_on_after(timeout):
        await wait_until_any([node.changes for node in nodes], predicate)
        return
    raise AssertionError(f"{what}: not reached within {timeout:g} s")


async def _state(node: Node, peer: str) -> str:
    status = await node.sync.get_sync_state(NAME.display)
    return str(next(s["state"] for s in status["peers"] if s["peer"] == peer))


async def test_behind_then_in_sync_after_synchronize(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_swarm(tmp_path, 2) as (a, b):
        v1 = await _add(a, make_model, NAME.display, 1)
        with trio.fail_after(60):
            first = await b.sync.synchronize_model(NAME.display, a.peer_id)
        assert first["changed"] and _held(b) == v1.manifest_digest
        assert await _state(b, a.peer_id) == "in-sync"
        v2 = await _add(a, make_model, NAME.display, 2)
        assert v2.parents == (v1.version_id,)
        with trio.fail_after(30):
            assert await _state(b, a.peer_id) == "behind"
            assert await _state(a, b.peer_id) == "ahead"
        with trio.fail_after(60):
            result = await b.sync.synchronize_model(NAME.display, a.peer_id, "delta")
        assert result["changed"] and result["version"] == v2.version_id.hex()
        assert result["peers"][0]["state"] == "in-sync"
        assert _held(b) == v2.manifest_digest
        assert b.store.get(NAME).raw == a.store.get(NAME).raw and b.store.verify(NAME.display).ok
        # Pulling v2 signed nothing new on b: it holds a's version, not one of its own.
        assert {r.version_id for r in b.book.records(NAME)} == {v1.version_id, v2.version_id}
        with trio.fail_after(30):
            assert await _state(b, a.peer_id) == "in-sync"
            again = await b.sync.synchronize_model(NAME.display, a.peer_id, "full")
        assert not again["changed"] and again["bytes_fetched"] == 0
        # A peer that cannot be reached is an error, with the reason, and nothing changes.
        stranger = Identity.generate().peer_id_str
        with trio.fail_after(30), pytest.raises(SyncError, match="none of the 1 peer"):
            await b.sync.synchronize_model(NAME.display, stranger)
        (model,) = b.sync.status()["models"]
        errors = [p for p in model["peers"] if p["peer"] == stranger]
        assert errors[0]["state"] == "error" and "did not answer" in errors[0]["reason"]
        assert _held(b) == v2.manifest_digest


async def test_full_sync_fetches_what_delta_would_copy(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Three versions differing only in their chat template: `delta` copies the unchanged
    chunks from the blob already here, `full` fetches the whole blob again."""
    name = parse_model_name("edited:v1")

    async def version(template: str) -> None:
        path = make_model(f"{len(template)}.gguf", size=8 * MiB, seed=5, chat_template=template)
        await a.sync.create_model_version(name.display, path)

    async with open_swarm(tmp_path, 2) as (a, b):
        await version("{{ .Prompt }}")
        with trio.fail_after(60):
            await b.sync.synchronize_model(name.display, a.peer_id)
        await version("{{ .System }} {{ .Prompt }}")
        with trio.fail_after(60):
            full = await b.sync.synchronize_model(name.display, a.peer_id, "full")
        assert full["changed"] and full["sync_type"] == "full"
        whole = b.store.db.deltas(name.full)[-1]
        assert whole.bytes_local == 0 and whole.bytes_fetched >= 8 * MiB
        await version("{{ .System }}\n{{ .Prompt }}\n")
        with trio.fail_after(60):
            delta = await b.sync.synchronize_model(name.display, a.peer_id)
        assert delta["changed"] and delta["sync_type"] == "delta"
        reused = b.store.db.deltas(name.full)[-1]
        assert reused.bytes_local >= 4 * MiB and reused.bytes_fetched < 4 * MiB
        assert b.store.get(name).raw == a.store.get(name).raw and b.store.verify(name.display).ok


async def test_sync_never_reverts_a_local_change_not_yet_recorded(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """A sync pass that ran between a local add's manifest write and its version record
    saw the older head, switched the name back to it, and the new version was lost."""
    extra = '[sync]\nfollow = ["shared*"]\nsync_interval = "1h"\n'
    async with open_node(node_config(tmp_path, "a", (), extra)) as a:
        v1 = await _add(a, make_model, NAME.display, 1)
        newer = make_model("newer.gguf", size=MiB, seed=2)
        # The add's first half, as a concurrent `dmm add` leaves it: no record yet.
        added = await trio.to_thread.run_sync(a.store.add_model, NAME.full, newer)
        assert added.digest != v1.manifest_digest
        with trio.fail_after(30):
            result = await a.sync.synchronize_model(NAME.display)
        assert not result["changed"] and _held(a) == added.digest

        # Once a sync has decided: the name no longer points where it did then.
        with trio.fail_after(30), pytest.raises(LocalChange, match="changed"):
            await a.sync.switch(NAME, added.digest, [], "delta", replacing=v1.manifest_digest)
        assert _held(a) == added.digest


async def test_a_local_change_during_the_switch_leaves_the_sync_not_crashed(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """A local add landing while a sync fetched the newer version: the switch refuses to
    overwrite it (LocalChange), and the sync reports nothing changed. It used to log the
    version it had given up on, and died of an AttributeError doing so."""
    async with open_swarm(tmp_path, 2) as (a, b):
        await _add(a, make_model, NAME.display, 1)
        with trio.fail_after(60):
            await b.sync.synchronize_model(NAME.display, a.peer_id)
        await _add(a, make_model, NAME.display, 2)
        local = make_model("local.gguf", size=MiB, seed=3)
        switch = b.sync.switch
        added: list[str] = []

        async def switch_after_a_local_add(*args: Any, **kwargs: Any) -> int:
            # As a `dmm add` on b would leave it: the manifest written, no record yet.
            stored = await trio.to_thread.run_sync(b.store.add_model, NAME.full, local)
            added.append(stored.digest)
            return await switch(*args, **kwargs)

        b.sync.switch = switch_after_a_local_add  # type: ignore[method-assign]
        with trio.fail_after(60):
            result = await b.sync.synchronize_model(NAME.display, a.peer_id)
        assert not result["changed"]
        assert len(added) == 1 and _held(b) == added[0]


@asynccontextmanager
async def _groups(
    root: Path, extra: str, size: int = 2
) -> AsyncIterator[tuple[list[Node], list[Node]]]:
    """Two groups of nodes that cannot reach each other: no bootstrap link between them."""
    async with AsyncExitStack() as stack:
        groups: list[list[Node]] = []
        for g in ("a", "b"):
            seed = await stack.enter_async_context(open_node(node_config(root, f"{g}0", (), extra)))
            group = [seed]
            for i in range(1, size):
                config = node_config(root, f"{g}{i}", [seed.host.listen_addrs[0]], extra)
                group.append(await stack.enter_async_context(open_node(config)))
            groups.append(group)
        yield groups[0], groups[1]


async def _shared_v1(a0: Node, b0: Node, make_model: MakeModel) -> VersionRecord:
    """v1 made on a0, carried to b0 by hand (the groups cannot talk yet)."""
    v1 = await _add(a0, make_model, NAME.display, 1)
    await trio.to_thread.run_sync(b0.book.accept, v1)
    report = await trio.to_thread.run_sync(b0.store.import_models, a0.store.models_dir)
    assert report.models_new == [NAME.display]
    await b0.refresh()
    assert b0.book.latest(NAME) == v1  # the same version, not a copy signed by b0
    return v1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["newest", "keep-both"])
async def test_a_healed_partition_converges(
    tmp_path: Path, make_model: MakeModel, strategy: str
) -> None:
    extra = (
        f'[sync]\nfollow = ["shared*"]\nsync_interval = "1s"\nconflict_strategy = "{strategy}"\n'
    )
    async with _groups(tmp_path, extra) as (group_a, group_b):
        a0, a1 = group_a
        b0, b1 = group_b
        v1 = await _shared_v1(a0, b0, make_model)
        await _until(
            (a1, b1), lambda: _held(a1) == _held(b1) == v1.manifest_digest, "v1 everywhere"
        )
        v2a = await _add(a0, make_model, NAME.display, 2)
        v2b = await _add(b0, make_model, NAME.display, 3)  # later: the newest
        assert v2a.parents == v2b.parents == (v1.version_id,) and v2b.hlc > v2a.hlc
        await _until((a1,), lambda: _held(a1) == v2a.manifest_digest, "v2a in group a")
        await _until((b1,), lambda: _held(b1) == v2b.manifest_digest, "v2b in group b")
        nodes = [*group_a, *group_b]
        for node in nodes:
            assert not node.host.connected_peers() or all(
                p in {n.peer_id for n in (group_a if node in group_a else group_b)}
                for p in node.host.connected_peers()
            )

        # Heal: one link between the groups (the refresh walks both groups' tables).
        with trio.fail_after(30):
            await a0.host.connect(b0.host.listen_addrs[0])
            await a0.dht.add_peer(b0.peer_id)
            await a0.dht.refresh()

        loser_tag = NAME.with_tag(conflict_tag(NAME.tag, v2a))

        def converged() -> bool:
            for node in nodes:
                dag = VersionDag(node.book.records(NAME))
                if dag.conflict() is not None or _held(node) != v2b.manifest_digest:
                    return False
                if strategy == "keep-both" and _held(node, loser_tag) != v2a.manifest_digest:
                    return False
            return True

        await _until(nodes, converged, "every node on v2b", timeout=90)
        for node in nodes:
            assert node.store.verify(NAME.display).ok
            dag = VersionDag(node.book.records(NAME))
            head = dag.resolved_head()
            assert head is not None and dag.original(head) == v2b
            assert {v2a.version_id, v2b.version_id} <= set(dag.ancestors(head.version_id))
            if strategy == "keep-both":
                assert node.store.verify(loser_tag.display).ok
            else:
                assert _held(node, loser_tag) is None
            assert await node.sync.conflicts() == []


@pytest.mark.slow
async def test_manual_conflicts_wait_for_resolve(tmp_path: Path, make_model: MakeModel) -> None:
    extra = '[sync]\nfollow = ["shared*"]\nsync_interval = "1h"\nconflict_strategy = "manual"\n'
    async with _groups(tmp_path, extra, size=1) as ((a0,), (b0,)):
        v1 = await _shared_v1(a0, b0, make_model)
        v2a = await _add(a0, make_model, NAME.display, 2)
        v2b = await _add(b0, make_model, NAME.display, 3)
        with trio.fail_after(10):
            await a0.host.connect(b0.host.listen_addrs[0])
        fired: list[tuple[str, str, dict[str, object]]] = []

        class Hooks:  # what node/hooks.py offers, where it exists
            def fire(self, event: str, model: str, **details: object) -> None:
                fired.append((event, model, details))

        a0.hooks = Hooks()  # type: ignore[attr-defined]
        with trio.fail_after(60):
            result = await a0.sync.synchronize_model(NAME.display, b0.peer_id)
        assert result["conflict"] and not result["changed"] and result["merge"] is None
        assert [(e, m) for e, m, _ in fired] == [("on-conflict", NAME.display)]
        assert fired[0][2]["winner"] == v2b.version_id.hex()
        assert _held(a0) == v2a.manifest_digest  # manual: nothing moves by itself
        (conflict,) = await a0.sync.conflicts()
        assert conflict["model"] == NAME.display and conflict["strategy"] == "manual"
        assert {h["version"] for h in conflict["heads"]} == {
            v2a.version_id.hex(),
            v2b.version_id.hex(),
        }
        assert conflict["suggested"] == v2b.version_id.hex()
        async with httpx.AsyncClient(base_url=a0.api_urls[0], timeout=60) as client:
            listed = (await client.get("/api/sync/conflicts")).json()["conflicts"]
            assert [c["model"] for c in listed] == [NAME.display]
            bad = await client.post(
                "/api/sync/resolve", json={"model": NAME.display, "pick": "zzzz"}
            )
            assert bad.status_code == 400 and "hex" in bad.json()["error"]
            unknown = await client.post(
                "/api/sync/resolve", json={"model": NAME.display, "pick": "0000000"}
            )
            assert unknown.status_code == 400 and "matches no" in unknown.json()["error"]
            # Pick the older one: the user's word beats the newest rule.
            picked = await client.post(
                "/api/sync/resolve",
                json={"model": NAME.display, "pick": v2a.version_id.hex()[:10]},
            )
            assert picked.status_code == 200, picked.text
        merge_id = bytes.fromhex(picked.json()["merge"])
        merge = next(r for r in a0.book.records(NAME) if r.version_id == merge_id)
        assert set(merge.parents) == {v2a.version_id, v2b.version_id}
        assert merge.manifest_digest == v2a.manifest_digest
        assert await a0.sync.conflicts() == []
        # The merge travels: b0 takes it in and follows it, though it held v2b.
        with trio.fail_after(60):
            await b0.sync.synchronize_model(NAME.display, a0.peer_id)
        assert _held(b0) == v2a.manifest_digest and await b0.sync.conflicts() == []
        assert v1.version_id in VersionDag(b0.book.records(NAME)).ancestors(merge_id)


async def test_policies_at_run_time_persist_and_are_checked(
    tmp_path: Path, make_model: MakeModel
) -> None:
    config = node_config(tmp_path, "p", extra='[sync]\nfollow = ["from-config*"]\n')
    async with (
        open_node(config) as node,
        httpx.AsyncClient(base_url=node.api_urls[0], timeout=30) as client,
    ):
        made = await client.post(
            "/api/sync/policies",
            json={"glob": "live*", "interval": "2s", "conflict_strategy": "keep-both"},
        )
        assert made.status_code == 200 and made.json()["interval"] == 2.0
        for bad in (
            {"glob": "x*", "conflict_strategy": "coin"},
            {"interval": "1s"},
            {"glob": "x*", "trusted_authors": ["nope"]},
            {"glob": "x*", "colour": "red"},
        ):
            r = await client.post("/api/sync/policies", json=bad)
            assert r.status_code == 400 and "\n" not in r.json()["error"], bad
        globs = [p["glob"] for p in (await client.get("/api/sync/policies")).json()["policies"]]
        assert globs == ["live*", "from-config*"]
        status = (await client.get("/api/sync/status")).json()
        assert status["runtime_policies"] == ["live*"]
        nobody = await client.post("/api/sync", json={"model": "live-one:v1"})
        assert nobody.status_code == 404 and "no peer holds" in nobody.json()["error"]
        bad_name = await client.post("/api/sync", json={"model": "../etc"})
        assert bad_name.status_code == 400
    async with open_node(config) as again:
        policy = again.sync.policy_for(parse_model_name("live-one:v1"))
        assert policy is not None and policy.conflict_strategy == "keep-both"
        assert await again.sync.remove_policy("live*")
        assert again.sync.policy_for(parse_model_name("live-one:v1")) is None


@pytest.fixture
def processes() -> Iterator[list[RunningNode]]:
    running: list[RunningNode] = []
    yield running
    for node in running:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


@pytest.mark.slow
def test_cli_sync_states_against_node_processes(
    tmp_path: Path, make_model: MakeModel, processes: list[RunningNode]
) -> None:
    """`dmm node start` processes: b is behind a, `dmm sync` brings it in sync."""
    a_cfg = _config(tmp_path, "a")
    processes.append(RunningNode(a_cfg))
    b_cfg = _config(tmp_path, "b", [processes[0].p2p])
    processes.append(RunningNode(b_cfg))
    v1 = make_model("v1.gguf", size=MiB, seed=1)
    v2 = make_model("v2.gguf", size=MiB, seed=2)
    dmm(a_cfg, "add", "cli-model:v1", str(v1))
    # b finds a as a holder once it has joined a's DHT: retry until then.
    deadline = time.monotonic() + 30
    while (first := dmm(b_cfg, "sync", "cli-model:v1", "--json", check=None)).returncode:
        assert "no peer holds" in first.stderr and time.monotonic() < deadline, first.stderr
        time.sleep(0.2)
    synced = json.loads(first.stdout)
    assert synced["changed"] and synced["peers"][0]["state"] == "in-sync"
    dmm(a_cfg, "add", "cli-model:v1", str(v2))
    status = json.loads(dmm(b_cfg, "sync", "status", "cli-model:v1", "--json").stdout)
    assert [p["state"] for p in status["peers"]] == ["behind"]
    assert status["followed"] is False and status["conflict"] is False
    out = dmm(b_cfg, "sync", "cli-model:v1").stdout
    assert "updated" in out and "in-sync" in out
    status = json.loads(dmm(b_cfg, "sync", "status", "cli-model:v1", "--json").stdout)
    assert [p["state"] for p in status["peers"]] == ["in-sync"]
    assert json.loads(dmm(b_cfg, "conflicts", "--json").stdout) == {"conflicts": []}
    assert "no conflicts" in dmm(b_cfg, "conflicts").stdout
    summary = json.loads(dmm(b_cfg, "sync", "status", "--json").stdout)
    assert summary["syncs"] == 2
    # Bad usage is exit 2, a refused request exit 1, each with one line.
    assert dmm(b_cfg, "sync", "status", "x", "--peer", "p", check=2).stderr.count("\n") == 1
    refused = dmm(b_cfg, "resolve", "cli-model:v1", "--pick", "abcd", check=1)
    assert "no conflict" in refused.stderr
    assert dmm(b_cfg, "resolve", "../x", "--pick", "abcd", check=2).returncode == 2
